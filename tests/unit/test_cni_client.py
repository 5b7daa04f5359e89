"""HttpAgentClient against a real HTTP-over-unix-socket server: the fake agent, and hand-rolled misbehaving
servers for the failure modes (refused, silent, not JSON)."""

from __future__ import annotations

import socket
import sys
import threading
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cni_fake_agent import FakeAgent  # noqa: E402

from meshcni.cni import protocol  # noqa: E402
from meshcni.cni.client import HttpAgentClient  # noqa: E402


def body(cid: str = "c1", netns: str = "/proc/self/ns/net") -> dict:
    return protocol.pod_request(cni_version="1.1.0", container_id=cid, netns=netns, ifname="eth0",
                                cni_args={"K8S_POD_NAME": "p"}, ips=["10.0.0.2/24"], plugin_config={"type": "meshcni"})


@pytest.fixture
def agent(tmp_path):
    with FakeAgent(str(tmp_path / "agent.sock")) as a:
        yield a


def test_add_check_del_gc_status_round_trip(agent) -> None:
    client = HttpAgentClient(agent.socket_path)
    assert client.add(body())["captured"] is True
    assert ("c1", "eth0") in agent.enrolled
    assert client.check(body()) == {"ok": True}
    assert client.status()["datapath_loaded"] is True
    client.add(body("c2"))
    assert client.gc(protocol.gc_request(cni_version="1.1.0", valid=[("c1", "eth0")], plugin_config={}))[
        "removed"] == [{"container_id": "c2", "ifname": "eth0"}]
    client.delete(body())
    assert agent.enrolled == {}
    assert agent.verbs() == ["add", "check", "status", "add", "gc", "del"]


def test_contract_errors_become_agent_refused_with_the_code(agent) -> None:
    client = HttpAgentClient(agent.socket_path)
    with pytest.raises(protocol.AgentRefused) as info:
        client.check(body("never-added"))
    assert info.value.code == 101 and info.value.http_status == 404
    agent.not_ready = True
    with pytest.raises(protocol.AgentRefused) as info:
        client.add(body())
    assert info.value.code == 11 and info.value.http_status == 503


def test_missing_socket_and_refused_socket_are_unavailable(tmp_path) -> None:
    with pytest.raises(protocol.AgentUnavailable, match="does not exist"):
        HttpAgentClient(str(tmp_path / "nope.sock")).status()
    path = str(tmp_path / "dead.sock")
    s = socket.socket(socket.AF_UNIX)
    s.bind(path)
    s.close()  # bound but never listening: connect() → ECONNREFUSED
    with pytest.raises(protocol.AgentUnavailable, match="refused"):
        HttpAgentClient(path).status()


def read_request(conn: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        data += conn.recv(65536)
    head, _, rest = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    while len(rest) < length:
        rest += conn.recv(65536)
    return head


def serve_once(path: str, reply: bytes | None) -> threading.Thread:
    """Accept one connection; send `reply` (or nothing, holding the connection) after reading the request."""
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(1)
    done = threading.Event()

    def run() -> None:
        conn, _ = srv.accept()
        read_request(conn)
        if reply is not None:
            conn.sendall(reply)
        else:
            done.wait(5)
        conn.close()
        srv.close()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.done = done  # type: ignore[attr-defined]
    return t


def test_silent_agent_times_out_as_unavailable(tmp_path) -> None:
    path = str(tmp_path / "silent.sock")
    t = serve_once(path, None)
    try:
        with pytest.raises(protocol.AgentUnavailable, match="no reply"):
            HttpAgentClient(path, connect_timeout=0.5, timeout=0.3).add(body())
    finally:
        t.done.set()
        t.join(5)


@pytest.mark.parametrize("reply", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n[]",
    b"HTTP/1.1 500 Oops\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
    b'HTTP/1.1 500 Oops\r\nContent-Length: 24\r\nConnection: close\r\n\r\n{"error":{"code":"ten"}}',
])
def test_off_contract_replies_are_protocol_errors(tmp_path, reply) -> None:
    path = str(tmp_path / "odd.sock")
    t = serve_once(path, reply)
    with pytest.raises(protocol.AgentProtocolError):
        HttpAgentClient(path).add(body())
    t.join(5)
