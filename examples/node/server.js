// The worker half of the second example of the Node.js cluster docs, run
// under shoal, which is the master: unchanged but for reusePort: true.
//
//   shoal --workers 2 -- node examples/node/server.js
//
// Each worker binds port 8000 itself with SO_REUSEPORT (Node.js >= 22.12)
// and tells the master about every request; shoal counts them
// (shoal_requests_total on /metrics).
var http = require('http');

http.Server(function(req, res) {
  res.writeHead(200);
  res.end("hello world\n");
  // Send message to master process
  process.send({ cmd: 'notifyRequest' });
}).listen({ port: process.env.PORT || 8000, host: process.env.HOST, reusePort: true });
