"""A stand-in sidecar that accepts only when told to, for tests of when the original destination must exist.

Listens on host:port (argv) with a backlog, prints "ready", then for every line `accept N` on stdin accepts N
connections from the backlog and prints one JSON line: per connection, the peer and the SO_ORIGINAL_DST answer
(or its errno). Connections completed by the kernel but not yet accepted are what a busy proxy has — the app
may already have closed its end by the time the proxy asks where the connection was going.
"""

import json
import socket
import sys

from probe_server import original_dst  # this directory is on sys.path when run as a script


def main() -> None:
    host, port = sys.argv[1], int(sys.argv[2])
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as lsock:
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lsock.bind((host, port))
        lsock.listen(1024)
        print("ready", flush=True)
        for line in sys.stdin:
            words = line.split()
            if words[:1] != ["accept"]:
                continue
            out = []
            for _ in range(int(words[1])):
                conn, peer = lsock.accept()
                with conn:
                    out.append({"peer": list(peer[:2]), "original_dst": original_dst(conn)})
            print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
