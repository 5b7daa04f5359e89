"""A connection-per-request HTTP load that counts every failure by kind: the yardstick of zero-loss upgrades.

Run inside a pod (`python -m meshcni.handoff.load HOST PORT`), it opens a new TCP connection for every request
(GET with `Connection: close`) from N threads until SIGTERM/SIGINT, then prints one JSON line with counts.
It prints `running` once the first request succeeded, so a caller can start upgrading only under load.
Failures are classified where they happened, because that is what tells a closed listener from a killed proxy:
`refused` (connect got RST: nothing listened), `connect_timeout`, `reset` (connected, then RST or EOF before a
complete response: the proxy holding it died), `timeout` (connected, no answer), `status` (not 200),
`unproxied` (200 without the expected proxy header: the request went around the proxy).
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import sys
import threading
import time

KINDS = ("refused", "connect_timeout", "connect_error", "reset", "timeout", "status", "unproxied")
TIMEOUT = 10.0


class Load:
    def __init__(self, host: str, port: int, expect_header: str | None):
        self.host, self.port = host, port
        self.expect = expect_header.lower().encode() if expect_header else None
        self.request = f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
        self.stop = threading.Event()
        self.ok = 0
        self.failures = {k: 0 for k in KINDS}
        self.samples: list[dict] = []
        self.lock = threading.Lock()
        self.first_ok = threading.Event()
        self.last_error = None

    def one(self) -> str | None:
        """One request on a fresh connection; None on success, else the failure kind."""
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(TIMEOUT)
        try:
            try:
                s.connect((self.host, self.port))
            except ConnectionRefusedError:
                return "refused"
            except socket.timeout:
                return "connect_timeout"
            except OSError as exc:
                self.last_error = exc.strerror or str(exc)
                return "connect_error"
            data = b""
            try:
                s.sendall(self.request)
                while True:
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    data += chunk
            except socket.timeout:
                return "timeout"
            except OSError:
                # An RST after the whole response arrived (a proxy killed while closing) cost the client
                # nothing; only a response cut short is a failure.
                return "reset" if _judge(data, self.expect, need_length=True) == "reset" else _judge(data, self.expect)
        finally:
            s.close()
        return _judge(data, self.expect)

    def worker(self) -> None:
        while not self.stop.is_set():
            kind = self.one()
            with self.lock:
                if kind is None:
                    self.ok += 1
                    self.first_ok.set()
                else:
                    self.failures[kind] += 1
                    if len(self.samples) < 50:
                        self.samples.append({"kind": kind, "time": time.time(), "error": self.last_error})

    def report(self, seconds: float) -> dict:
        failed = sum(self.failures.values())
        return {"requests": self.ok + failed, "ok": self.ok, "failed": failed, "failures": self.failures,
                "samples": self.samples, "seconds": round(seconds, 3)}


def _judge(data: bytes, expect: bytes | None, need_length: bool = False) -> str | None:
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return "reset"  # EOF before the end of the headers
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) < 2 or parts[1] != b"200":
        return "status"
    headers: dict[bytes, list[bytes]] = {}  # a header may repeat: every proxy on the path adds its own
    for line in lines[1:]:
        k, _, v = line.partition(b":")
        headers.setdefault(k.strip().lower(), []).append(v.strip())
    length = headers.get(b"content-length", [None])[-1]
    if length is None and need_length:
        return "reset"  # no length and no clean EOF: whether it is complete cannot be told
    if length is not None and len(body) < int(length):
        return "reset"  # cut off mid-body
    if expect is not None:
        name, _, value = expect.partition(b"=")
        if value not in headers.get(name, []):
            return "unproxied"
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("host")
    ap.add_argument("port", type=int)
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--expect-header", help="NAME=VALUE a proxied response carries (lower-case name)")
    args = ap.parse_args(argv)
    load = Load(args.host, args.port, args.expect_header)
    # The stop signals are blocked in every thread (the workers inherit the mask) and taken synchronously
    # here. A Python handler that set an Event could deadlock: it runs in the main thread, which may hold
    # that Event's own lock at that moment (inside wait()), and the lock is not reentrant.
    stop_signals = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    started = time.monotonic()
    threads = [threading.Thread(target=load.worker, daemon=True) for _ in range(args.concurrency)]
    for t in threads:
        t.start()
    stopped = False
    while not load.first_ok.is_set() and not stopped:
        stopped = signal.sigtimedwait(stop_signals, 0.05) is not None
    print("running", flush=True)
    if not stopped:
        signal.sigwait(stop_signals)
    load.stop.set()
    for t in threads:
        t.join(TIMEOUT + 1)
    print(json.dumps(load.report(time.monotonic() - started)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
