"""The lab's traffic client: one HTTP request or one TCP echo exchange, reported as a JSON line.

It runs *inside* a pod (network namespace, lab cgroup, a non-proxy uid), started by `run_in_pod`, so the
connection it makes is exactly what an app in that pod would make — which is what the capture datapath must
see. It reports what it observed (status, every response header, body size and digest, bytes echoed) and never
judges; the demo and the tests compare against expectations.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import sys
import threading
import time

from meshcni.lab.payload import digest, payload

TIMEOUT = 15.0


def http_request(host: str, port: int, path: str, method: str = "GET", body_bytes: int = 0) -> dict:
    body = payload(body_bytes) if body_bytes else None
    conn = http.client.HTTPConnection(host, port, timeout=TIMEOUT)
    started = time.monotonic()
    try:
        conn.request(method, path, body=body, headers={"user-agent": "meshcni-lab"})
        resp = conn.getresponse()
        data = resp.read()
        local = conn.sock.getsockname() if conn.sock else None
    finally:
        conn.close()
    text = data.decode("utf-8", errors="replace") if len(data) <= 4096 else None
    return {
        "kind": "http",
        "method": method,
        "url": f"http://{host}:{port}{path}",
        "sent_bytes": body_bytes,
        "status": resp.status,
        "headers": [[k.lower(), v] for k, v in resp.getheaders()],
        "body": text,
        "body_bytes": len(data),
        "body_sha256": digest(data),
        "local": list(local) if local else None,
        "seconds": round(time.monotonic() - started, 6),
    }


def tcp_echo(host: str, port: int, nbytes: int) -> dict:
    data = payload(nbytes)
    received = bytearray()
    started = time.monotonic()
    with socket.create_connection((host, port), timeout=TIMEOUT) as sock:
        local = sock.getsockname()

        # A separate sender thread, so a large payload can never deadlock with both sides' buffers full.
        def send_all() -> None:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send_all, daemon=True)
        sender.start()
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
        sender.join(TIMEOUT)
    return {
        "kind": "tcp",
        "url": f"tcp://{host}:{port}",
        "sent_bytes": nbytes,
        "sent_sha256": digest(data),
        "received_bytes": len(received),
        "received_sha256": digest(bytes(received)),
        "local": list(local),
        "seconds": round(time.monotonic() - started, 6),
    }


SAMPLES_PER_KIND = 20  # detail records kept per failure reason and per proxy path


def load(host: str, port: int, stop_file: str, path: str = "/", max_seconds: float = 600.0) -> dict:
    """Connection-per-request HTTP until `stop_file` exists: every new connection must succeed.

    This is the load a zero-loss claim is measured under (agent restarts, mode toggles, proxy upgrades):
    each request opens a fresh connection, so any moment capture is not in place, or a listener is
    missing, shows up as a refused or reset connection. Failures are counted by reason, never retried.
    The first few requests of each failure reason and of each proxy path are also kept in detail (wall
    time, the phase that failed, errno, the client's local address), so a rare failure can be matched
    with what the datapath did at that moment.
    """
    ok = failed = 0
    errors: dict[str, int] = {}
    proxies: dict[str, int] = {}
    samples: dict[str, list[dict]] = {}
    deadline = time.monotonic() + max_seconds
    while not os.path.exists(stop_file) and time.monotonic() < deadline:
        conn = http.client.HTTPConnection(host, port, timeout=TIMEOUT)
        detail = {"t": round(time.time(), 6), "phase": "connect", "local": None}
        try:
            conn.connect()
            detail["local"] = "%s:%d" % conn.sock.getsockname()[:2]
            detail["phase"] = "request"
            conn.request("GET", path, headers={"user-agent": "meshcni-lab-load", "connection": "close"})
            detail["phase"] = "response"
            resp = conn.getresponse()
            resp.read()
            if resp.status != 200:
                raise http.client.HTTPException(f"status {resp.status}")
            ok += 1
            via = ",".join(v for k, v in resp.getheaders() if k.lower() == "x-meshcni-proxy") or "direct"
            proxies[via] = proxies.get(via, 0) + 1
            kind = f"via {via}"
        except (OSError, http.client.HTTPException) as exc:
            failed += 1
            reason = f"{type(exc).__name__}: {exc}"[:120]
            errors[reason] = errors.get(reason, 0) + 1
            kind = f"failed {reason}"
            detail["errno"] = getattr(exc, "errno", None)
        finally:
            conn.close()
        detail["seconds"] = round(time.time() - detail["t"], 6)
        kept = samples.setdefault(kind, [])
        if len(kept) < SAMPLES_PER_KIND:
            kept.append(detail)
    return {"kind": "load", "url": f"http://{host}:{port}{path}", "ok": ok, "failed": failed, "errors": errors,
            "via": proxies, "samples": samples}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="kind", required=True)
    h = sub.add_parser("http")
    h.add_argument("host")
    h.add_argument("port", type=int)
    h.add_argument("path", nargs="?", default="/")
    h.add_argument("--method", default="GET")
    h.add_argument("--body-bytes", type=int, default=0)
    t = sub.add_parser("tcp")
    t.add_argument("host")
    t.add_argument("port", type=int)
    t.add_argument("--bytes", type=int, default=1 << 20)
    ld = sub.add_parser("load")
    ld.add_argument("host")
    ld.add_argument("port", type=int)
    ld.add_argument("--stop-file", required=True)
    ld.add_argument("--path", default="/")
    args = parser.parse_args(argv)
    try:
        if args.kind == "load":
            result = load(args.host, args.port, args.stop_file, args.path)
        elif args.kind == "http":
            result = http_request(args.host, args.port, args.path, args.method, args.body_bytes)
        else:
            result = tcp_echo(args.host, args.port, args.bytes)
    except (OSError, http.client.HTTPException) as exc:
        json.dump({"kind": args.kind, "error": f"{type(exc).__name__}: {exc}"}, sys.stdout)
        sys.stdout.write("\n")
        return 1
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
