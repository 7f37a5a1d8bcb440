# A UDP echo server that knows nothing of shoal but PORT: it binds the port
# with SO_REUSEPORT and answers every datagram with "PID DATA".
import os
import signal
import socket
import sys

port = int(os.environ["PORT"])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
s.bind(("127.0.0.1", port))
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
pid = str(os.getpid()).encode()
while True:
    data, addr = s.recvfrom(2048)
    s.sendto(pid + b" " + data, addr)
