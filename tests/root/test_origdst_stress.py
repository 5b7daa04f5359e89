"""Root tests: every captured connection reaches the HTTP backend its original destination picks, under churn.

A lab pod with eBPF capture and its HAProxy sidecar gets many short connections, the way wrk's
connection-per-request profile makes them, and connections whose app closes before the proxy got to them.
HAProxy's captured listener hands a connection to the HTTP backend only when getsockopt(SO_ORIGINAL_DST)
gives it port 80; without a record it falls back to the raw-TCP backend (`outbound_tcp`), which then connects
to its own listener. So `outbound_tcp` moving at all means a captured connection lost its original destination:
these tests assert it never moves, by counts on HAProxy's own statistics.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from meshcni.lab import haproxy
from meshcni.lab import pod as podproc
from meshcni.sys import proc
from tests.root.lab_fixture import captured_lab

pytestmark = pytest.mark.root
CLIENT = str(Path(__file__).resolve().parent / "origdst_client.py")

@pytest.fixture(scope="module")
def lab():
    with captured_lab(f"ha-od-{os.getpid() % 100000}", agent=False) as state:
        yield state


def _sections(state, pod) -> dict[str, int]:
    """"pxname/svname" -> cumulative sessions (stot) of every section of the pod's proxy."""
    rows = haproxy.parse_show_stat(haproxy.command(podproc.proxy_socket(state, pod), "show stat"))
    return {f"{r['pxname']}/{r['svname']}": int(r.get("stot") or 0) for r in rows}


def _moved(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}


def _client(state, src, *args: str, timeout: float = 120) -> dict:
    done = proc.run([sys.executable, CLIENT, *args], netns=src.netns, cgroup=state.cgroup,
                    uid=podproc.APP_UID, gid=podproc.APP_GID, cwd="/", timeout=timeout)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    return json.loads(done.stdout.decode().splitlines()[-1])


def _wait_until_routed(state, pod, n: int, before: dict[str, int], timeout: float = 30) -> dict[str, int]:
    """Wait until the outbound listener handed `n` sessions to a backend (either one); returns the deltas."""
    deadline = time.monotonic() + timeout
    while True:
        moved = _moved(before, _sections(state, pod))
        if moved.get("outbound_http/BACKEND", 0) + moved.get("outbound_tcp/BACKEND", 0) >= n:
            return moved
        if time.monotonic() > deadline:
            raise AssertionError(f"pod {pod.name}'s proxy never routed {n} sessions: {moved}")
        time.sleep(0.1)


def _cut_self_loops(state, pod) -> None:
    """A connection that lost its destination loops through its own proxy until cut; never leave one behind."""
    haproxy.command(podproc.proxy_socket(state, pod), "shutdown sessions server outbound_tcp/orig")


def test_thousands_of_short_connections_all_reach_the_http_backend(lab):
    a, b = lab.pods
    n = 3000
    before = _sections(lab, a)
    try:
        got = _client(lab, a, "burst", str(n), "32", b.ip, "80")
        moved = _moved(before, _sections(lab, a))
    finally:
        _cut_self_loops(lab, a)
    assert got["outcomes"] == {"200 " + ",".join(sorted([f"{a.name}-outbound", f"{b.name}-inbound"])): n}
    assert moved.get("outbound/FRONTEND") == n
    assert moved.get("outbound_http/BACKEND") == n
    assert moved.get("outbound_tcp/BACKEND", 0) == 0, moved


def test_connections_the_app_closed_before_its_proxy_accepted_still_reach_their_destination(lab):
    """The fault wrk's exit used to trigger: the proxy is busy (here: stopped), the app sends and closes, and
    only then does the proxy accept and ask for the original destination."""
    a, b = lab.pods
    n = 40
    proxy = a.processes["haproxy"]
    before = _sections(lab, a)
    os.kill(proxy.pid, signal.SIGSTOP)
    try:
        got = _client(lab, a, "abandon", str(n), b.ip, "80")
        # the app's sockets must be fully closed before the proxy runs again (not merely FIN sent)
        deadline = time.monotonic() + 30
        while _app_sockets(a.netns, "fin-wait-1"):
            assert time.monotonic() < deadline, "the app's FINs were never acknowledged"
            time.sleep(0.05)
    finally:
        os.kill(proxy.pid, signal.SIGCONT)
    try:
        assert got["connections"] == n
        moved = _wait_until_routed(lab, a, n, before)
    finally:
        _cut_self_loops(lab, a)
    assert moved.get("outbound_tcp/BACKEND", 0) == 0, moved
    assert moved.get("outbound/FRONTEND") == n
    assert moved.get("outbound_http/BACKEND") == n


def _app_sockets(netns: str, state: str) -> list[str]:
    import subprocess

    out = subprocess.run(["nsenter", f"--net={netns}", "ss", "-Htn", "state", state],
                         capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if line.strip()]
