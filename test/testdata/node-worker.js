// The seed's second example as a shoal worker (reusePort: true), plus
// handlers the tests drive: echo, relay through the master, disconnect.
var http = require('http');
var id = +process.env.SHOAL_WORKER_ID;

http.Server(function(req, res) {
  res.writeHead(200);
  res.end("hello world\n");
  process.send({ cmd: 'notifyRequest' });
}).listen({ port: +process.env.PORT, host: process.env.HOST || '127.0.0.1', reusePort: true });

// An application message and one of Node's own, which shoal ignores.
process.send({ app: 'hello from node', from: id });
process.send({ cmd: 'NODE_TEST_INTERNAL' });

process.on('message', function(m) {
  if (m && m.echo !== undefined) process.send({ echoed: m.echo, from: id });
  if (m && m.relay) process.send({ cmd: 'shoal:send', to: m.relay, msg: { hello: id } });
  if (m && m.hello) {
    console.log('worker ' + id + ' got hello from ' + m.hello);
    if (!m.back) process.send({ cmd: 'shoal:send', to: m.hello, msg: { hello: id, back: true } });
  }
});
// With RELAY=1, worker 1 greets worker 2 through the master until worker 2
// greets it back.
if (process.env.RELAY === '1' && id === 1) {
  var relay = setInterval(function() {
    process.send({ cmd: 'shoal:send', to: 2, msg: { hello: id } });
  }, 100);
  process.on('message', function(m) { if (m && m.back) clearInterval(relay); });
}

process.on('disconnect', function() {
  console.log('worker ' + id + ' disconnected');
  process.exit(0);
});
