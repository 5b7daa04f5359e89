"""Root tests: the iptables backend keeps the pod netns's conntrack consistent across live mode switches.

Each test is one of the ways a switch lost or mis-captured a request under load (bench/mode_toggle.py),
reduced to one connection in a two-netns topology: a redirected connection open while the rules go must
keep its translation; a connection closed while no rule needs conntrack must not leave a frozen entry that
captures (or fails to capture) the next connection of its 4-tuple; and a connection made before the rules
must not be adopted mid-stream and redirected into a reset.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
import threading

import pytest

from meshcni.agent import core as agent_core
from meshcni.agent.core import AgentCore
from meshcni.agent.registry import PodRecord, Registry
from meshcni.config import Mode
from meshcni.datapath.iptables import IptablesInterceptor
from meshcni.sys import iptables as ipt
from meshcni.sys.netns import in_netns

from test_iptables_interceptor import iptables_config, topo  # noqa: F401 (topo is a fixture)

pytestmark = pytest.mark.root


class LineEcho:
    """A listener in a netns that answers each line of each connection with "<name>:<line>"."""

    def __init__(self, netns: str, name: str, host: str, port: int):
        self.name = name
        with in_netns(netns):
            self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(8)
        self.threads: list[threading.Thread] = []
        self.accepted = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            t.start()
            self.threads.append(t)

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(10)
            try:
                for line in conn.makefile("rb"):
                    conn.sendall(f"{self.name}:{line.decode().strip()}\n".encode())
            except OSError:
                pass

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


@pytest.fixture
def echo():
    made: list[LineEcho] = []

    def make(netns, name, host, port):
        made.append(LineEcho(netns, name, host, port))
        return made[-1]

    yield make
    for listener in made:
        listener.close()


def open_conn(netns: str, host: str, port: int, source: tuple[str, int] | None = None) -> socket.socket:
    with in_netns(netns):
        sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.settimeout(5)
    if source:
        sock.bind(source)
    sock.connect((host, port))
    return sock


def ask(sock: socket.socket, line: str) -> str:
    """Send a line and return the answer; "" when the connection was reset or closed instead."""
    try:
        sock.sendall(line.encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
        return data.decode().strip()
    except (ConnectionResetError, BrokenPipeError):
        return ""


def abort(sock: socket.socket) -> None:
    """Close with a reset (SO_LINGER 0), the way HAProxy ends its server-side connections."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def redirected_connection(topo, echo):  # noqa: F811
    """A captured pod with an outbound proxy and a peer, and one open connection the rules redirected."""
    echo(topo.pod, "proxy", "127.0.0.1", 15001)
    echo(topo.peer, "peer", "0.0.0.0", 8080)
    interceptor = IptablesInterceptor("nft")
    pod = topo.podnet(iptables_config(), ipv6=False)
    interceptor.capture(pod)
    return interceptor, pod, open_conn(topo.pod, topo.peer_ip, 8080)


def test_a_redirected_connection_open_across_release_keeps_its_translation(topo, echo):  # noqa: F811
    interceptor, pod, conn = redirected_connection(topo, echo)
    try:
        assert ask(conn, "before") == "proxy:before"
        # e.g. the pod moves to eBPF; this connection is still the proxy's, so the hold stays (False)
        assert interceptor.release(pod) is False
        assert ask(conn, "after") == "proxy:after"
    finally:
        conn.close()
    assert ipt.conntrack_count(topo.pod) > 0  # so the hold stayed


def test_a_connection_closed_after_release_leaves_no_frozen_entry_for_its_4_tuple(topo, echo):  # noqa: F811
    proxy = echo(topo.pod, "proxy", "127.0.0.1", 15001)
    echo(topo.peer, "peer", "0.0.0.0", 8080)
    interceptor = IptablesInterceptor("nft")
    # The first connection is one the rules leave alone (under load: the proxy's own upstream connection).
    excluded = iptables_config(exclude_outbound_cidrs=(ipaddress.ip_network(f"{topo.peer_ip}/32"),))
    interceptor.capture(topo.podnet(excluded, ipv6=False))
    first = open_conn(topo.pod, topo.peer_ip, 8080)
    source = first.getsockname()
    assert ask(first, "first") == "peer:first"
    interceptor.release(topo.podnet(excluded, ipv6=False))
    abort(first)  # conntrack must see this reset, or the untranslated entry stays ESTABLISHED for days
    # Captured again, now including the peer: the next connection of the same 4-tuple must be redirected.
    interceptor.capture(topo.podnet(iptables_config(), ipv6=False))
    second = open_conn(topo.pod, topo.peer_ip, 8080, source=source)
    try:
        assert second.getsockname() == source
        assert ask(second, "second") == "proxy:second"
    finally:
        second.close()
    assert proxy.accepted == 1


def test_a_connection_made_before_capture_is_not_redirected_mid_stream(topo, echo):  # noqa: F811
    app = echo(topo.pod, "app", "0.0.0.0", 8080)
    echo(topo.pod, "inbound-proxy", "0.0.0.0", 15006)
    interceptor = IptablesInterceptor("nft")
    pod = topo.podnet(iptables_config(), ipv6=False)
    # A first capture and release leave the netns the way a switch to eBPF does (idle: no hold, no tracking).
    interceptor.capture(pod)
    assert interceptor.release(pod) is True  # nothing redirected was open: no hold is left
    conn = open_conn(topo.peer, topo.pod_ip, 8080)  # made while nothing in the pod is captured by iptables
    try:
        assert ask(conn, "before") == "app:before"
        interceptor.capture(pod)  # now inbound connections are redirected to 15006 ...
        assert ask(conn, "after") == "app:after"  # ... but not this one, which conntrack never saw begin
    finally:
        conn.close()
    assert app.accepted == 1
    assert ipt.conntrack_tcp_loose(topo.pod) is False
    assert interceptor.verify(pod) == []


def test_release_with_no_redirected_connection_open_stops_tracking(topo, echo):  # noqa: F811
    interceptor, pod, conn = redirected_connection(topo, echo)
    assert ask(conn, "captured") == "proxy:captured"
    abort(conn)  # ended: its entry may linger in conntrack, but nothing needs its translation any more
    interceptor.release(pod)  # e.g. the pod moves to eBPF
    assert not interceptor.conntrack_held(pod)
    assert ipt.conntrack_count(topo.pod) == 0  # emptied as tracking stopped: nothing frozen
    later = open_conn(topo.pod, topo.peer_ip, 8080)
    try:
        assert ask(later, "uncaptured") == "peer:uncaptured"
        assert ipt.conntrack_count(topo.pod) == 0  # and the pod no longer pays conntrack per packet
    finally:
        later.close()


def test_a_hold_kept_for_an_open_redirected_connection_goes_once_it_ends(topo, echo):  # noqa: F811
    interceptor, pod, conn = redirected_connection(topo, echo)
    assert ask(conn, "before") == "proxy:before"
    interceptor.release(pod)
    assert interceptor.conntrack_hold_needed(pod) is True  # the agent's check, which changes nothing
    assert interceptor.drop_conntrack_hold(pod) is False  # still needed: the connection is open
    assert interceptor.conntrack_held(pod)
    assert ask(conn, "still") == "proxy:still"
    abort(conn)  # a reset takes the entry straight out of the open states
    assert interceptor.conntrack_hold_needed(pod) is False
    assert interceptor.conntrack_held(pod)  # asking did not drop it
    assert interceptor.drop_conntrack_hold(pod) is True
    assert not interceptor.conntrack_held(pod)
    assert ipt.conntrack_count(topo.pod) == 0
    # Captured again from here, the first connection is redirected as usual.
    interceptor.capture(pod)
    again = open_conn(topo.pod, topo.peer_ip, 8080)
    try:
        assert ask(again, "again") == "proxy:again"
    finally:
        again.close()
    interceptor.release(pod)


def test_a_live_capture_keeps_its_hold(topo):  # noqa: F811
    interceptor = IptablesInterceptor("nft")
    pod = topo.podnet(iptables_config(), ipv6=False)
    interceptor.capture(pod)
    assert interceptor.conntrack_hold_needed(pod) is False
    assert interceptor.drop_conntrack_hold(pod) is True  # nothing to wait for: the hold is the capture's
    assert interceptor.conntrack_held(pod)
    assert interceptor.verify(pod) == []
    interceptor.release(pod)
    assert not interceptor.conntrack_held(pod)


def test_without_conntrack_tools_the_hold_waits_for_an_empty_table(topo, echo, monkeypatch):  # noqa: F811
    monkeypatch.setattr(ipt, "conntrack_redirected_open", lambda netns: None)  # as if the tool were missing
    interceptor, pod, conn = redirected_connection(topo, echo)
    assert ask(conn, "before") == "proxy:before"
    abort(conn)  # ended, but its entry lingers and cannot be told apart from an open one
    interceptor.release(pod)
    assert ipt.conntrack_count(topo.pod) > 0
    assert interceptor.conntrack_held(pod)
    assert interceptor.conntrack_hold_needed(pod) is True
    assert interceptor.drop_conntrack_hold(pod) is False


def test_an_agent_restarted_while_a_redirected_connection_is_open_still_drops_the_hold(topo, echo, tmp_path,  # noqa: F811
                                                                                      monkeypatch):
    monkeypatch.setattr(agent_core, "CONNTRACK_RETRY_S", 0.0)  # every tick is due: the test counts ticks
    interceptor, pod, conn = redirected_connection(topo, echo)
    registry = Registry(tmp_path)
    registry.load()
    registry.put(PodRecord(container_id="c-restart", netns=topo.pod, ips=[topo.pod_ip], pod_name="restart",
                           pod_namespace="default", config=pod.config.to_dict(), mode=Mode.IPTABLES.value,
                           phase="captured"))
    first = AgentCore(registry, {Mode.IPTABLES: interceptor}, node_mode=Mode.IPTABLES)
    try:
        assert ask(conn, "before") == "proxy:before"
        first.set_pod_mode("c-restart", Mode.OFF.value)  # the connection is open: the hold stays
        assert interceptor.conntrack_held(pod)
        # The first agent dies here, its retry schedule with it; the pod record on disk says "off".
        restarted = AgentCore(Registry(tmp_path), {Mode.IPTABLES: interceptor}, node_mode=Mode.IPTABLES)
        assert restarted.recover()["readopted"] == 1
        assert restarted.drop_conntrack_holds() == 0  # still needed: the connection is open
        assert ask(conn, "still") == "proxy:still"
    finally:
        abort(conn)
    assert restarted.drop_conntrack_holds() == 1
    assert not interceptor.conntrack_held(pod)
    assert ipt.conntrack_count(topo.pod) == 0
