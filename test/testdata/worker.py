# The README's Python worker: binds PORT with SO_REUSEPORT and reports each
# request to the master over fd 3.
import os, socket, json
from http.server import HTTPServer, BaseHTTPRequestHandler

class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"hello world\n")
        ipc.sendall(b'{"cmd":"notifyRequest"}\n')

    def log_message(self, *args):
        pass

class Server(HTTPServer):
    def server_bind(self):
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

ipc = socket.socket(fileno=int(os.environ["SHOAL_IPC_FD"]))
Server((os.environ.get("HOST", ""), int(os.environ["PORT"])), Handler).serve_forever()
