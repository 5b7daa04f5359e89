"""Short-connection load for the original-destination tests, run as an app inside a captured lab pod.

Two ways to stress the record the datapath keeps for each captured connection:
- `burst N CONCURRENCY HOST PORT`: N HTTP/1.1 requests with `Connection: close`, CONCURRENCY at a time, each on
  its own connection (what wrk does with `-H "Connection: close"`), each read to the end. Ephemeral ports get
  reused quickly, which is the churn under which records used to go missing.
- `abandon N HOST PORT`: N connections that each send a request and close at once without waiting for the
  answer — a client that gives up (or a process that exits) before its proxy got round to the connection.

Prints one JSON line: how many connections were made and how many answers had which status and proxy header.
"""

import json
import socket
import sys
import threading
from collections import Counter

PROXY_HEADER = b"x-meshcni-proxy"


def _request(host: str) -> bytes:
    return f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()


def one_request(host: str, port: int) -> str:
    """One connection, one request; returns "<status> <proxy headers>" or "error <reason>"."""
    try:
        with socket.create_connection((host, port), timeout=20) as conn:
            conn.sendall(_request(host))
            chunks = []
            while True:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
    except OSError as exc:
        return f"error {exc.strerror or exc}"
    head = b"".join(chunks).split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    status = head[0].split(b" ")[1].decode() if len(head[0].split(b" ")) > 1 else "none"
    proxies = sorted(line.split(b":", 1)[1].strip().decode() for line in head[1:]
                     if line.lower().startswith(PROXY_HEADER + b":"))
    return f"{status} {','.join(proxies)}"


def burst(n: int, concurrency: int, host: str, port: int) -> dict:
    results: Counter = Counter()
    lock = threading.Lock()
    todo = iter(range(n))

    def worker() -> None:
        while True:
            with lock:
                if next(todo, None) is None:
                    return
            outcome = one_request(host, port)
            with lock:
                results[outcome] += 1

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"connections": n, "outcomes": dict(results)}


def abandon(n: int, host: str, port: int) -> dict:
    made = 0
    for _ in range(n):
        with socket.create_connection((host, port), timeout=20) as conn:
            conn.sendall(_request(host))
        made += 1  # closed here, before any answer could be read
    return {"connections": made, "outcomes": {}}


def main() -> None:
    cmd = sys.argv[1]
    if cmd == "burst":
        out = burst(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5]))
    elif cmd == "abandon":
        out = abandon(int(sys.argv[2]), sys.argv[3], int(sys.argv[4]))
    else:
        raise SystemExit(f"unknown command {cmd!r}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
