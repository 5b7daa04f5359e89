"""Connects to host:port like an ordinary app, reads the server's JSON line, sends a payload and reads the echo.

Prints one JSON object: what the server reported, whether the echo came back byte for byte, and the
client's own view of the connection (its peer address, which a captured connection shows as the proxy).
"""

import hashlib
import json
import socket
import sys


def main() -> None:
    host, port, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 0
    payload = bytes((i * 7 + 3) % 251 for i in range(size))
    with socket.create_connection((host, port), timeout=10) as conn:
        peer = list(conn.getpeername()[:2])
        f = conn.makefile("rb")
        info = json.loads(f.readline())
        conn.sendall(payload)
        conn.shutdown(socket.SHUT_WR)
        echoed = f.read()
        out = {
            "server": info,
            "client_peer": peer,
            "sent": len(payload),
            "received": len(echoed),
            "intact": hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest(),
        }
    print(json.dumps(out))


if __name__ == "__main__":
    try:
        main()
    except OSError as exc:
        print(json.dumps({"error": exc.strerror or str(exc), "errno": exc.errno}))
