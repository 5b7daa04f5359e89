"""The load generator behind the hot-upgrade tests and bench stops cleanly on SIGTERM or SIGINT, whenever
the signal lands, and reports what it counted.

It once set a threading.Event from a Python signal handler: when the signal landed while the main thread
held that Event's lock (inside wait()), the handler blocked on it for good and the workers kept going, so
about one stop in 150 hung (2 of 300 against a loopback server; a hot-upgrade test timed out on a fresh
clone). The 60 stop cycles here, against a loopback HTTP server, caught the old code: a hang fails the test
by count, not by a time bound.
"""

from __future__ import annotations

import http.server
import json
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time

import pytest

CYCLES = 60


class _Ok(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (the handler API's name)
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.send_header("x-meshcni-proxy", "b-inbound")
        self.end_headers()
        self.wfile.write(b"ok")

    def handle(self):
        try:
            super().handle()
        except OSError:
            pass  # the load closed mid-answer on its way out

    def log_message(self, *_):
        pass


@pytest.fixture
def server():
    srv = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Ok)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv.server_address[1]
    srv.shutdown()
    srv.server_close()


def _start(port: int) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-m", "meshcni.handoff.load", "127.0.0.1", str(port), "--concurrency", "2",
                          "--expect-header", "x-meshcni-proxy=b-inbound"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout.readline().strip() == b"running"
    return p


def _stop(p: subprocess.Popen, sig: int) -> dict | None:
    """The report, or None when the process did not exit (it is killed then)."""
    p.send_signal(sig)
    try:
        out, _ = p.communicate(timeout=30)  # a request in flight takes at most its 10 s socket timeout
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate()
        return None
    assert p.returncode == 0
    return json.loads(out.decode().strip().splitlines()[-1])


def _blocks_sigterm(pid: int) -> bool:
    with open(f"/proc/{pid}/status") as f:
        blocked = next(line for line in f if line.startswith("SigBlk:")).split()[1]
    return bool(int(blocked, 16) & (1 << (signal.SIGTERM - 1)))


def test_every_stop_ends_the_load_with_a_report(server):
    hung, requests = 0, 0
    for i in range(CYCLES):
        report = _stop(_start(server), signal.SIGTERM if i % 2 else signal.SIGINT)
        if report is None:
            hung += 1
            continue
        assert report["failed"] == 0, report
        requests += report["ok"]
    assert hung == 0
    assert requests >= CYCLES  # each run got its first answer before it said "running"


def test_a_stop_before_any_answer_still_reports():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))  # bound, never listening: every connect is refused
        port = s.getsockname()[1]
        p = subprocess.Popen([sys.executable, "-m", "meshcni.handoff.load", "127.0.0.1", str(port)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        # No answer ever comes, so nothing is printed before the signal is taken: wait until the load has
        # blocked SIGTERM (it takes it synchronously from then on) instead.
        while not _blocks_sigterm(p.pid):
            assert p.poll() is None, p.communicate()
            time.sleep(0.01)
        report = _stop(p, signal.SIGTERM)
    assert report is not None
    assert report["ok"] == 0 and report["failures"]["refused"] > 0
