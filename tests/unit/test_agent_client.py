"""AgentClient's call deadlines: an upgrade asks the agent to wait for the next proxy and for the old one's
drain, so its call must outlive both waits; every other call keeps the client's own timeout. The gRPC stub is
replaced by a recorder (no agent runs in the unit tier)."""

from __future__ import annotations

from meshcni.agent.client import AgentClient
from meshcni.api import agent_pb2 as pb
from meshcni.handoff.upgrade import DRAIN_TIMEOUT, READY_TIMEOUT


class RecordingStub:
    def __init__(self):
        self.calls: list[tuple[str, object, float]] = []

    def UpgradeProxy(self, request, timeout):
        self.calls.append(("UpgradeProxy", request, timeout))
        return pb.UpgradeReply(kind=request.kind, old_pid=1, new_pid=2, old_exited=True)

    def ProxyStatus(self, request, timeout):
        self.calls.append(("ProxyStatus", request, timeout))
        return pb.ProxyStatusReply()


def _client(tmp_path) -> tuple[AgentClient, RecordingStub]:
    sock = tmp_path / "agent.sock"
    sock.touch()  # the client checks that the socket exists before calling
    client = AgentClient(str(sock), timeout=30.0)
    client._stub = stub = RecordingStub()
    return client, stub


def test_an_upgrade_call_outlives_the_readiness_and_drain_waits_it_asks_for(tmp_path):
    client, stub = _client(tmp_path)
    try:
        assert client.upgrade_proxy("lab/b", "graceful")["new_pid"] == 2
        client.upgrade_proxy("lab/b", "crash", timeout=120.0)
    finally:
        client.close()
    (_, default_req, default_deadline), (_, slow_req, slow_deadline) = stub.calls
    assert default_req.timeout_seconds == 0 and default_deadline == 30.0 + READY_TIMEOUT + DRAIN_TIMEOUT
    assert slow_req.timeout_seconds == 120.0 and slow_deadline == 30.0 + 120.0 + DRAIN_TIMEOUT


def test_other_calls_keep_the_clients_timeout(tmp_path):
    client, stub = _client(tmp_path)
    try:
        client.proxy_status("lab/b")
    finally:
        client.close()
    assert [(name, deadline) for name, _, deadline in stub.calls] == [("ProxyStatus", 30.0)]
