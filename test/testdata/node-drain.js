// A Node.js worker that drains on SIGTERM without losing a request, in the
// order shoal's Go workers use: stop listening first (the kernel moves the
// queued connections to the other workers), answer what comes with
// "Connection: close", close what stays idle after a grace, then exit.
// http.Server#close() alone would close idle keep-alive connections at once,
// under clients that may be sending on them.
var http = require('http');
var net = require('net');

var draining = false;
var server = http.createServer(function(req, res) {
  if (draining) res.setHeader('Connection', 'close');
  res.end('hello world\n');
}).listen({ port: +process.env.PORT, host: process.env.HOST || '127.0.0.1', reusePort: true });

process.on('SIGTERM', function() {
  draining = true;
  net.Server.prototype.close.call(server, function() { process.exit(0); });
  setTimeout(function() { server.closeIdleConnections(); }, 1000);
});
