# A naive HTTP server, as many are: it binds PORT with SO_REUSEPORT,
# answers "pid N" to every request, and on SIGTERM closes its listener and
# exits at once, with no drain: what it accepted and has not answered is
# lost.
import os
import signal
import socket
import sys

port = int(os.environ["PORT"])
ln = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
ln.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
ln.bind(("127.0.0.1", port))
ln.listen(128)


def stop(*_):
    ln.close()
    os._exit(0)


signal.signal(signal.SIGTERM, stop)
body = ("pid %d\n" % os.getpid()).encode()
resp = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
while True:
    try:
        c, _ = ln.accept()
    except OSError:
        sys.exit(0)
    try:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = c.recv(4096)
            if not chunk:
                break
            data += chunk
        c.sendall(resp)
    finally:
        c.close()
