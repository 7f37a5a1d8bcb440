// The Node.js worker of the benchmarks: the hello-world server of the
// Node.js cluster docs, run four ways with the same request handler.
//
//   BENCH_MODE=reuseport  (default) one worker that binds PORT itself with
//                         reusePort: true. Under shoal it is a shoal worker;
//                         started N times by hand it is a bare process.
//   BENCH_MODE=cluster    Node's own cluster module: this process is the
//                         primary, forks BENCH_WORKERS workers, and the
//                         workers listen WITHOUT reusePort, so the primary
//                         owns the socket and hands connections round-robin
//                         (cluster.SCHED_RR, the default on Linux).
//   BENCH_MODE=cluster-reuseport  the cluster module, but the workers listen
//                         with reusePort: true. Node >= 22.12 then lets each
//                         worker bind the port itself and the primary
//                         carries no traffic (checked by run.sh with ss).
//
// BENCH_NOTIFY=1 makes every request send {cmd: 'notifyRequest'} to the
// master (shoal, or the cluster primary, which counts them in
// worker.on('message')): the second example of the Node.js v0.6 docs.
//
// BENCH_GRACEFUL=1 (the PM2 scenario, for both contenders) makes a worker
// behave as PM2's graceful start and shutdown documentation asks: it calls
// process.send('ready') once it listens (PM2's wait_ready; shoal's
// --ready message), and on SIGINT (PM2) or SIGTERM (shoal) it stops
// accepting, answers every request after that with "Connection: close", and
// exits when the last connection has closed (the supervisor's stop timeout
// ends a connection that stays open and idle).
'use strict';
const cluster = require('node:cluster');
const http = require('node:http');
const net = require('node:net');

const mode = process.env.BENCH_MODE || 'reuseport';
const notify = process.env.BENCH_NOTIFY === '1';
const port = +process.env.PORT;
const host = process.env.HOST || '127.0.0.1';

if (mode.startsWith('cluster') && cluster.isPrimary) {
  cluster.schedulingPolicy = cluster.SCHED_RR; // the default on Linux; said explicitly
  const n = +process.env.BENCH_WORKERS || 2;
  let numReqs = 0;
  for (let i = 0; i < n; i++) {
    const worker = cluster.fork();
    worker.on('message', (msg) => {
      if (msg && msg.cmd === 'notifyRequest') numReqs++;
    });
  }
  let listening = 0;
  cluster.on('listening', () => {
    if (++listening === n) console.log(`cluster primary ${process.pid}: ${n} workers listening`);
  });
  // Report the count on SIGUSR2 (run.sh checks it against wrk's total).
  process.on('SIGUSR2', () => console.log(`numReqs=${numReqs}`));
  const stop = () => {
    for (const id in cluster.workers) cluster.workers[id].process.kill('SIGKILL');
    process.exit(0);
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
} else {
  const server = http.createServer((req, res) => {
    res.writeHead(200);
    res.end('hello world\n');
    if (notify) process.send({ cmd: 'notifyRequest' });
  });
  const opts = { port, host };
  if (mode !== 'cluster') opts.reusePort = true;
  if (process.env.BENCH_GRACEFUL === '1') {
    let closing = false;
    server.prependListener('request', (req, res) => {
      if (closing) res.setHeader('Connection', 'close');
    });
    const shutdown = () => {
      if (closing) return;
      closing = true;
      // Stop listening, but not with http.Server's close(), which (since
      // Node.js 19) also closes every keep-alive connection that has no
      // request in progress *as the server sees it*, racing requests the
      // client already sent: under load that fails requests. Each open
      // connection instead gets "Connection: close" on its next answer;
      // 'close' comes when the last one has ended.
      net.Server.prototype.close.call(server, () => process.exit(0));
    };
    process.on('SIGINT', shutdown);
    process.on('SIGTERM', shutdown);
    server.listen(opts, () => process.send && process.send('ready'));
  } else {
    server.listen(opts);
  }
}
