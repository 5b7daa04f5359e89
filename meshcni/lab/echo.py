"""A TCP echo server for byte-exactness tests: every byte received is sent back, in order, until EOF.

Run inside a pod as `python -m meshcni.lab.echo --port 9000`. It echoes as data arrives (no buffering of
the whole stream), then half-closes after the client does, so a client can send any amount and compare.
"""

from __future__ import annotations

import argparse
import socket
import socketserver


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock: socket.socket = self.request
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            sock.sendall(chunk)
        sock.shutdown(socket.SHUT_WR)


class _Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True
    request_queue_size = 128


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bind", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=9000)
    args = parser.parse_args(argv)
    with _Server((args.bind, args.port), _Echo) as server:
        server.serve_forever()


if __name__ == "__main__":
    main()
