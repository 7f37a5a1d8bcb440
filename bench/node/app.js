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
'use strict';
const cluster = require('node:cluster');
const http = require('node:http');

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
  server.listen(opts);
}
