// A Node.js server that takes its socket from the master (shoal --bind
// master): fd 3, as systemd passes it. It prints its pid and LISTEN_PID.
const http = require('http');
console.log(`worker ${process.env.SHOAL_WORKER_ID} pid ${process.pid} LISTEN_PID ${process.env.LISTEN_PID}`);
const server = http.createServer((req, res) => {
  res.end('hello world\n');
});
server.listen({ fd: 3 });
process.on('SIGTERM', () => server.close(() => process.exit(0)));
