"""sk_msg splicing with the datapath's DEFAULTS, through real HAProxy sidecars: proxy <-> proxy pairs are spliced
and lose no byte, an application's own sockets never enter the SOCKHASH (so a blocking app cannot meet the
EAGAIN of tcp_bpf_recvmsg), and `meshcni.io/splice-app: "true"` opts a pod's app sockets in.

A two-pod lab (meshcni.lab: bridge CNI, HAProxy sidecars as uid 1337, an echo app on port 9000) is brought up
with eBPF capture enrolled straight into the datapath, with no override of `EbpfDatapath.splice`. Paths:
- pod to pod: app A -> proxy A (loopback, not spliced) -> proxy B (spliced: A's proxy connected as uid 1337,
  B's sk_lookup steered the SYN to its proxy) -> app B (127.0.0.6 passthrough, not spliced);
- same pod: proxy A connects to its own pod IP, which sk_lookup steers to its own inbound listener, so the
  proxy <-> proxy pair inside one pod is spliced too.
Each run is a 1 MiB echo checked by sha256. The blocking client is this file run as a script inside pod A: one
thread sends 1 MiB and half-closes while another blocks in recv(), the pattern that got EAGAIN when app sockets
were spliced (see "Splicing" in docs/architecture.md and bench/splice.py); between steps it waits for the test,
which reads the SOCKHASH keys while the connection is open.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

MIB = 1 << 20
RUNS = 20
BLOCKING_TRIES = 20
SOCKHASH = "mcni_socks_v1"
CLIENT_STEP_TIMEOUT = 60.0


# --- the in-pod client (this file run as a script; standard library only) --------------------------------


def _payload(size: int) -> bytes:
    return bytes((i * 7 + 3) % 251 for i in range(256)) * (size // 256) + bytes(size % 256)


def _client(host: str, port: int, tries: int, size: int, blocking: bool) -> None:
    """Per try: connect, report the addresses, wait for "go", echo `size` bytes, report, wait for "go", close."""
    data = _payload(size)
    for _ in range(tries):
        s = socket.create_connection((host, port), timeout=30)
        s.settimeout(None if blocking else 30)  # None: recv() may only return data, EOF or a real error
        print(json.dumps({"local": s.getsockname()[:2], "peer": s.getpeername()[:2]}), flush=True)
        sys.stdin.readline()
        sender = threading.Thread(target=lambda: (s.sendall(data), s.shutdown(socket.SHUT_WR)))
        sender.start()
        got, outcome = bytearray(), None
        try:
            while chunk := s.recv(65536):
                got += chunk
        except BlockingIOError:
            outcome = "eagain"
        except OSError as exc:
            outcome = f"error: {exc}"
        sender.join()
        outcome = outcome or ("intact" if hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
                              else f"damaged ({len(got)} bytes)")
        print(json.dumps({"outcome": outcome}), flush=True)
        sys.stdin.readline()
        s.close()


if __name__ == "__main__":
    _client(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "blocking")
    sys.exit(0)


# --- the tests -------------------------------------------------------------------------------------------------

from meshcni.config import ANN_SPLICE_APP, PROXY_GID, PROXY_UID, PodConfig  # noqa: E402
from meshcni.datapath import layout as L  # noqa: E402
from meshcni.datapath.ebpf import netns_cookie  # noqa: E402
from meshcni.lab import haproxy, traffic  # noqa: E402
from meshcni.lab import lab as lab_core  # noqa: E402
from meshcni.lab import pod as podproc  # noqa: E402
from meshcni.sys import proc  # noqa: E402
from tests.root.lab_fixture import captured_lab  # noqa: E402

pytestmark = pytest.mark.root

@pytest.fixture(scope="module")
def lab():
    # enrolled straight into the datapath, with its defaults
    with captured_lab(f"t-splice-{os.getpid() % 100000}", agent=False) as state:
        dp = lab_core.datapath(state)
        try:
            yield state, dp
        finally:
            dp.close()


def _net(pod):
    return lab_core.pod_net(pod)


def _flags(dp, pod) -> int:
    return dp.maps["mcni_pod_config_v1"].lookup(L.U32(dp.slot_of(_net(pod)))).flags


def _echo_runs(state, src, dst) -> list[str]:
    """RUNS echoes of 1 MiB from `src` to `dst`'s echo app; returns a description of every damaged run."""
    damaged = []
    for i in range(RUNS):
        got = traffic.echo(state, src, dst.ip, haproxy.ECHO_PORT, MIB)
        if "error" in got or (got["received_bytes"], got["received_sha256"]) != (MIB, got["sent_sha256"]):
            damaged.append(f"run {i}: {got}")
    return damaged


def _wait_sockhash(dp, want: int, seconds: float = 10.0) -> int:
    """Closing sockets leave the SOCKHASH as the kernel tears them down; wait (bounded) for the count."""
    deadline = time.monotonic() + seconds
    while (n := dp.map_entries(SOCKHASH)) != want and time.monotonic() < deadline:
        time.sleep(0.1)
    return n


def _sockhash_tuples(dp) -> set[tuple]:
    """(netns, local ip, local port, remote ip, remote port) of every socket in the SOCKHASH."""
    return {(k.netns, str(k.local.address()), k.local_port, str(k.remote.address()), k.remote_port)
            for k in dp.maps[SOCKHASH].keys()}


def _proxy_pair(tuples, a_ip: str, b_ip: str) -> tuple[int, int]:
    """How many proxy A -> pod B:echo sockets (A's end, B's end) the SOCKHASH holds."""
    a_end = sum(1 for t in tuples if t[0] == 0 and t[1] == a_ip and t[3:] == (b_ip, haproxy.ECHO_PORT))
    b_end = sum(1 for t in tuples if t[0] == 0 and t[1:3] == (b_ip, haproxy.ECHO_PORT) and t[3] == a_ip)
    return a_end, b_end


def _app_sockets(tuples, cookie: int, app_port: int) -> list[tuple]:
    """Entries for the app's captured connection: its own socket and the proxy's accepted end facing it."""
    return [t for t in tuples if t[0] == cookie and app_port in (t[2], t[4])]


class _Stepped:
    """A client in a lab pod whose steps are driven line by line: it prints a line when a step is done and
    reads one before it takes the next."""

    def __init__(self, state, pod, argv: list[str], uid: int, gid: int):
        self._proc = proc.spawn(argv, netns=pod.netns, cgroup=state.cgroup, uid=uid, gid=gid, cwd="/",
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def read(self):
        """The next step's report, one JSON value per line."""
        ready, _, _ = select.select([self._proc.stdout], [], [], CLIENT_STEP_TIMEOUT)
        line = self._proc.stdout.readline() if ready else b""
        if not line:
            self._proc.kill()
            raise AssertionError(f"the in-pod client stopped answering: {self._proc.stderr.read()[-800:]!r}")
        return json.loads(line)

    def go(self) -> None:
        self._proc.stdin.write(b"go\n")
        self._proc.stdin.flush()

    def stop(self) -> None:
        proc.stop(self._proc, grace=1)


class _InPodClient(_Stepped):
    """This file as a script in a lab pod, as the app uid."""

    def __init__(self, state, pod, host: str, port: int, tries: int, blocking: bool):
        super().__init__(state, pod, [sys.executable, str(Path(__file__).resolve()), host, str(port), str(tries),
                                      str(MIB), "blocking" if blocking else "timeout"],
                         podproc.APP_UID, podproc.APP_GID)


def _drive(dp, client, tries: int, cookie: int, a_ip: str, b_ip: str) -> dict:
    """Run the client's tries; per try, look at the SOCKHASH while the connection is open (before and after
    the echo). Returns outcomes, app entries seen, and proxy pairs seen."""
    seen = {"outcomes": [], "app_entries": [], "proxy_pairs": []}
    for _ in range(tries):
        addrs = client.read()
        app_port = addrs["local"][1]
        assert addrs["peer"] == ["127.0.0.1", 15001], addrs  # captured: the app talks to its proxy
        # the proxy's own connection to pod B follows the app's; wait (bounded) until both its ends are in
        deadline = time.monotonic() + 10
        while (pair := _proxy_pair(tuples := _sockhash_tuples(dp), a_ip, b_ip)) != (1, 1) \
                and time.monotonic() < deadline:
            time.sleep(0.02)
        seen["proxy_pairs"].append(pair)
        seen["app_entries"] += _app_sockets(tuples, cookie, app_port)
        client.go()
        seen["outcomes"].append(client.read()["outcome"])
        seen["app_entries"] += _app_sockets(_sockhash_tuples(dp), cookie, app_port)
        client.go()
    return seen


def test_defaults_splice_proxy_pairs_and_no_app_socket(lab):
    state, dp = lab
    assert dp.splice is True
    for pod in state.pods:
        flags = _flags(dp, pod)
        assert flags & L.F_SPLICE and not flags & L.F_SPLICE_APP, (pod.name, hex(flags))
        assert dp.verify(_net(pod)) == []


def test_same_pod_proxy_pair_is_spliced_and_loses_no_byte(lab):
    state, dp = lab
    a = state.pods[0]
    baseline = _wait_sockhash(dp, 0)
    before = dp.counters(_net(a))

    assert _echo_runs(state, a, a) == []

    after = dp.counters(_net(a))
    assert after["msgs_spliced"] > before["msgs_spliced"], "nothing was spliced: the test proved nothing"
    assert after["bytes_spliced"] > before["bytes_spliced"]
    assert after["errors"] == before["errors"]
    assert _wait_sockhash(dp, baseline) == baseline


def test_pod_to_pod_through_two_haproxy_sidecars_loses_no_byte_when_spliced(lab):
    state, dp = lab
    a, b = state.pods
    baseline = _wait_sockhash(dp, 0)
    before = {p.name: dp.counters(_net(p)) for p in state.pods}

    assert _echo_runs(state, a, b) == []
    assert _echo_runs(state, b, a) == []

    after = {p.name: dp.counters(_net(p)) for p in state.pods}
    for pod in (a, b):  # each proxy's sends to the other proxy
        assert after[pod.name]["msgs_spliced"] > before[pod.name]["msgs_spliced"], pod.name
        assert after[pod.name]["bytes_spliced"] > before[pod.name]["bytes_spliced"], pod.name
        assert after[pod.name]["errors"] == before[pod.name]["errors"], pod.name
    assert _wait_sockhash(dp, baseline) == baseline


def test_a_blocking_app_is_never_spliced_and_never_sees_eagain(lab):
    state, dp = lab
    a, b = state.pods
    cookie = netns_cookie(a.netns)
    before = dp.counters(_net(a))
    client = _InPodClient(state, a, b.ip, haproxy.ECHO_PORT, BLOCKING_TRIES, blocking=True)
    try:
        seen = _drive(dp, client, BLOCKING_TRIES, cookie, a.ip, b.ip)
    finally:
        client.stop()

    assert seen["outcomes"] == ["intact"] * BLOCKING_TRIES
    assert seen["app_entries"] == []
    # meanwhile the proxies' connection of every try was in the SOCKHASH, and bytes were spliced
    assert seen["proxy_pairs"] == [(1, 1)] * BLOCKING_TRIES
    assert dp.counters(_net(a))["bytes_spliced"] >= before["bytes_spliced"] + BLOCKING_TRIES * MIB // 2


def test_splice_app_annotation_lets_the_app_sockets_in(lab):
    state, dp = lab
    a, b = state.pods
    cookie = netns_cookie(a.netns)
    config = PodConfig.from_annotations({ANN_SPLICE_APP: "true"}, defaults=lab_core.lab_pod_config())
    assert config.splice_app is True
    try:
        dp.capture(dataclasses.replace(_net(a), config=config))  # keeps the slot, rewrites the flags
        assert _flags(dp, a) & L.F_SPLICE_APP
        # a socket timeout makes CPython poll and retry EAGAIN, which is what an opted-in app must do
        client = _InPodClient(state, a, b.ip, haproxy.ECHO_PORT, 1, blocking=False)
        try:
            seen = _drive(dp, client, 1, cookie, a.ip, b.ip)
        finally:
            client.stop()
    finally:
        dp.capture(_net(a))
    assert not _flags(dp, a) & L.F_SPLICE_APP
    assert seen["outcomes"] == ["intact"]
    assert seen["proxy_pairs"] == [(1, 1)]
    lo = str(ipaddress.ip_address("127.0.0.1"))
    # the app's socket and the proxy's end facing it, each seen open before and after the echo
    assert sorted({t for t in seen["app_entries"] if t[1] == lo and t[3] == lo}) == sorted(set(seen["app_entries"]))
    assert len(set(seen["app_entries"])) == 2, seen["app_entries"]


def test_sockhash_is_empty_once_the_lab_is_idle(lab):
    """Every spliced socket leaves the map when it closes: nothing accumulates across the runs above."""
    _, dp = lab
    assert _wait_sockhash(dp, 0) == 0


# A connection as the proxy's uid from a fixed source port, one step at a time: bind, connect, echo five bytes.
# The timeout makes CPython poll and retry an EAGAIN from a spliced socket's receive path.
_STEPPED_CLIENT = r"""
import json, socket, sys
s = socket.socket()
s.settimeout(30)
s.bind((sys.argv[1], int(sys.argv[4])))
print(json.dumps("bound"), flush=True); sys.stdin.readline()
s.connect((sys.argv[2], int(sys.argv[3])))
print(json.dumps("connected"), flush=True); sys.stdin.readline()
s.sendall(b"held\n")
got = b""
while len(got) < 5 and (chunk := s.recv(5 - len(got))):
    got += chunk
print(json.dumps(got.decode().strip() or "eof"), flush=True)
s.close()
"""
STRAY_PORT = 23456  # below the ephemeral range, so no other connection of the lab can hold it


def test_a_stray_segment_leaves_nothing_that_marks_a_later_unsteered_connection(lab):
    """Only sockets the proxy's inbound listener accepts are proxy ends. sk_lookup steers a stray segment too (it
    runs for any segment that finds no socket and cannot see the flags), so a mark it recorded by tuple would
    make a later connection with that tuple look like the proxy's even when it is not steered: here B excludes
    the port by then and its app accepts, and the app's socket must stay out of the SOCKHASH."""
    state, dp = lab
    a, b = state.pods
    steered = dp.counters(_net(b))["inbound_steered"]
    sent = proc.run([sys.executable, str(Path(__file__).with_name("stray_segment.py")), a.ip, b.ip,
                     str(STRAY_PORT), str(haproxy.ECHO_PORT)], netns=a.netns)
    assert sent.stdout == b"sent\n", sent.stderr.decode()
    assert dp.counters(_net(b))["inbound_steered"] == steered + 1  # the stray was steered to B's proxy

    lab_config = lab_core.lab_pod_config()
    excluded = dataclasses.replace(lab_config,
                                   exclude_inbound_ports=lab_config.exclude_inbound_ports + (haproxy.ECHO_PORT,))
    client = None
    try:
        dp.capture(dataclasses.replace(_net(b), config=excluded))
        client = _Stepped(state, a, [sys.executable, "-c", _STEPPED_CLIENT, a.ip, b.ip, str(haproxy.ECHO_PORT),
                                     str(STRAY_PORT)], PROXY_UID, PROXY_GID)
        assert client.read() == "bound"
        client.go()
        assert client.read() == "connected"
        ends = {t for t in _sockhash_tuples(dp) if STRAY_PORT in (t[2], t[4])}
        # A's end is a proxy end (the proxy's uid connected to a pod); B's app socket is not one
        assert ends == {(0, a.ip, STRAY_PORT, b.ip, haproxy.ECHO_PORT)}, ends
        client.go()
        assert client.read() == "held"  # unspliced, on TCP
    finally:
        if client is not None:
            client.stop()
        dp.capture(_net(b))
