"""The plugin core (`run_command`) and exec wrapper (`main`) with an in-process fake agent client.

The fake records every request and answers as told; the real HTTP path is covered by test_cni_client.py
and the subprocess tables, the real chain by tests/root/test_cni_chain.py.
"""

from __future__ import annotations

import io
import json
import os
from typing import Any

import pytest

from meshcni.cni import conf as confmod
from meshcni.cni import plugin, spec
from meshcni.cni.log import PluginLog
from meshcni.cni.pending import PendingStore
from meshcni.cni.protocol import AgentProtocolError, AgentRefused, AgentUnavailable
from meshcni.cni.spec import CniError

NETNS = "/proc/self/ns/net"  # a real network namespace every process can name
PREV_040 = {"cniVersion": "0.4.0", "interfaces": [{"name": "eth0", "sandbox": NETNS}],
            "ips": [{"version": "4", "interface": 0, "address": "10.239.0.9/24", "gateway": "10.239.0.1"}], "dns": {}}


class FakeClient:
    """Answers like the agent would; `fail` is an exception to raise instead, `status_reply` the STATUS body."""

    socket_path = "/run/fake.sock"

    def __init__(self, fail: Exception | None = None, status_reply: dict | None = None):
        self.fail = fail
        self.status_reply = status_reply or {"ok": True, "datapath_loaded": True}
        self.calls: list[tuple[str, Any]] = []

    def _answer(self, verb: str, request: Any, reply: dict) -> dict:
        self.calls.append((verb, request))
        if self.fail is not None:
            raise self.fail
        return reply

    def add(self, request):
        return self._answer("add", request, {"ok": True, "captured": True, "mode": "ebpf"})

    def delete(self, request):
        return self._answer("del", request, {"ok": True})

    def check(self, request):
        return self._answer("check", request, {"ok": True})

    def gc(self, request):
        return self._answer("gc", request, {"ok": True, "removed": []})

    def status(self):
        return self._answer("status", None, self.status_reply)


def make(command: str, tmp_path, version: str = "0.4.0", prev: dict | None = PREV_040, netns: str = NETNS,
         **extra: Any):
    raw = {"cniVersion": version, "name": "k8s-pod-network", "type": "meshcni",
           "agentSocket": "/run/fake.sock", "pendingDir": str(tmp_path / "pending"), **extra}
    if prev is not None:
        raw["prevResult"] = prev
    env = {"CNI_COMMAND": command, "CNI_CONTAINERID": "ctr-1", "CNI_NETNS": netns, "CNI_IFNAME": "eth0",
           "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAME=web-0;K8S_POD_NAMESPACE=shop;K8S_POD_UID=u-1;"
                       "K8S_POD_INFRA_CONTAINER_ID=ctr-1"}
    inv = confmod.parse_invocation(env)
    cfg = confmod.parse_config(raw, command)
    return inv, cfg, PendingStore(cfg.pending_dir)


def run(command, tmp_path, client, **kw):
    inv, cfg, pending = make(command, tmp_path, **kw)
    return plugin.run_command(inv, cfg, client, pending, PluginLog(io.StringIO())), pending


def code_of(fn) -> int:
    with pytest.raises(CniError) as info:
        fn()
    return info.value.code


# ------------------------------------------------------------------------------------------------ ADD

def test_add_forwards_pod_identity_ips_and_config_and_prints_prev_result(tmp_path) -> None:
    client = FakeClient()
    out, _ = run("ADD", tmp_path, client, failurePolicy="closed", mode="ebpf")
    assert out == spec.convert_result(PREV_040, "0.4.0")
    (verb, req), = client.calls
    assert verb == "add"
    assert (req["container_id"], req["netns"], req["ifname"]) == ("ctr-1", NETNS, "eth0")
    assert (req["pod_name"], req["pod_namespace"], req["pod_uid"]) == ("web-0", "shop", "u-1")
    assert req["infra_container_id"] == "ctr-1"
    assert req["ips"] == ["10.239.0.9/24"]
    assert req["plugin_config"]["mode"] == "ebpf" and "prevResult" not in req["plugin_config"]
    assert req["cni_version"] == "0.4.0"


@pytest.mark.parametrize("version", spec.SUPPORTED_VERSIONS)
def test_add_prints_prev_result_in_the_requested_version(tmp_path, version) -> None:
    out, _ = run("ADD", tmp_path, FakeClient(), version=version)
    assert out["cniVersion"] == version
    assert ("version" in out["ips"][0]) == (version in ("0.3.1", "0.4.0"))


def test_add_without_prev_result_is_invalid_config_and_never_reaches_the_agent(tmp_path) -> None:
    client = FakeClient()
    assert code_of(lambda: run("ADD", tmp_path, client, prev=None)) == spec.ERR_INVALID_CONFIG
    assert client.calls == []


def test_add_closed_policy_agent_down_is_try_again_naming_the_socket(tmp_path) -> None:
    client = FakeClient(fail=AgentUnavailable("/run/fake.sock", "connection refused"))
    with pytest.raises(CniError) as info:
        run("ADD", tmp_path, client)
    assert info.value.code == spec.ERR_TRY_AGAIN
    assert "/run/fake.sock" in info.value.msg
    assert not (tmp_path / "pending").exists()


@pytest.mark.parametrize("failure", [AgentUnavailable("/run/fake.sock", "socket does not exist"),
                                     AgentRefused(11, "agent starting")])
def test_add_open_policy_passes_the_pod_and_records_it_pending(tmp_path, failure) -> None:
    out, pending = run("ADD", tmp_path, FakeClient(fail=failure), failurePolicy="open")
    assert out["ips"][0]["address"] == "10.239.0.9/24"
    assert pending.container_ids() == ["ctr-1"]
    record = pending.load("ctr-1")
    assert record["ips"] == ["10.239.0.9/24"] and record["pod_name"] == "web-0" and record["reason"]
    assert oct(os.stat(pending.path_for("ctr-1")).st_mode & 0o777) == "0o600"


def test_add_open_policy_does_not_swallow_a_real_refusal(tmp_path) -> None:
    client = FakeClient(fail=AgentRefused(7, "bad annotation", "meshcni.io/mode: nope"))
    assert code_of(lambda: run("ADD", tmp_path, client, failurePolicy="open")) == 7
    assert not (tmp_path / "pending").exists()


def test_successful_add_supersedes_a_pending_record(tmp_path) -> None:
    run("ADD", tmp_path, FakeClient(fail=AgentUnavailable("/s", "down")), failurePolicy="open")
    _, pending = run("ADD", tmp_path, FakeClient(), failurePolicy="open")
    assert pending.container_ids() == []


def test_add_agent_protocol_error_is_102(tmp_path) -> None:
    client = FakeClient(fail=AgentProtocolError("reply is not JSON"))
    assert code_of(lambda: run("ADD", tmp_path, client)) == spec.ERR_AGENT_PROTOCOL


@pytest.mark.parametrize("netns,code", [("/nonexistent/netns", 3), ("/proc/self/ns/mnt", 4), ("/etc/hostname", 4),
                                        ("proc/self/ns/net", 4), ("/proc/../proc/self/ns/net", 4)])
def test_add_validates_the_netns(tmp_path, netns, code) -> None:
    client = FakeClient()
    assert code_of(lambda: run("ADD", tmp_path, client, netns=netns)) == code
    assert client.calls == []


# ------------------------------------------------------------------------------------------------ DEL

@pytest.mark.parametrize("failure", [AgentUnavailable("/s", "refused"), AgentRefused(3, "unknown pod")])
def test_del_succeeds_when_agent_or_pod_is_gone(tmp_path, failure) -> None:
    out, _ = run("DEL", tmp_path, FakeClient(fail=failure))
    assert out is None


def test_del_reports_a_real_agent_failure(tmp_path) -> None:
    client = FakeClient(fail=AgentRefused(100, "cannot detach"))
    assert code_of(lambda: run("DEL", tmp_path, client)) == 100


def test_del_with_gone_netns_and_no_prev_result_still_releases(tmp_path) -> None:
    client = FakeClient()
    out, _ = run("DEL", tmp_path, client, prev=None, netns="")
    assert out is None
    (verb, req), = client.calls
    assert verb == "del" and req["netns"] == "" and req["ips"] == []


def test_del_drops_a_malformed_netns_instead_of_failing(tmp_path) -> None:
    client = FakeClient()
    run("DEL", tmp_path, client, netns="../escape")
    assert client.calls[0][1]["netns"] == ""


def test_del_removes_the_pending_record(tmp_path) -> None:
    _, pending = run("ADD", tmp_path, FakeClient(fail=AgentUnavailable("/s", "down")), failurePolicy="open")
    assert pending.container_ids() == ["ctr-1"]
    run("DEL", tmp_path, FakeClient(fail=AgentUnavailable("/s", "down")), failurePolicy="open")
    assert pending.container_ids() == []


# ---------------------------------------------------------------------------------------------- CHECK

def test_check_asks_the_agent_and_passes_its_verdict(tmp_path) -> None:
    client = FakeClient()
    assert run("CHECK", tmp_path, client)[0] is None
    assert client.calls[0][0] == "check" and client.calls[0][1]["ips"] == ["10.239.0.9/24"]
    refused = FakeClient(fail=AgentRefused(101, "pod not captured"))
    assert code_of(lambda: run("CHECK", tmp_path, refused)) == 101


def test_check_needs_040_prev_result_and_a_reachable_agent(tmp_path) -> None:
    assert code_of(lambda: run("CHECK", tmp_path, FakeClient(), version="0.3.1",
                               prev={"ips": [{"version": "4", "address": "10.0.0.1/24"}]})) == 1
    assert code_of(lambda: run("CHECK", tmp_path, FakeClient(), prev=None)) == 7
    assert code_of(lambda: run("CHECK", tmp_path, FakeClient(fail=AgentUnavailable("/s", "x")))) == 11
    assert code_of(lambda: run("CHECK", tmp_path, FakeClient(), netns="/nonexistent")) == 3


# ------------------------------------------------------------------------------------------ STATUS/GC

def test_status(tmp_path) -> None:
    assert run("STATUS", tmp_path, FakeClient(), version="1.1.0", prev=None)[0] is None
    not_loaded = FakeClient(status_reply={"ok": True, "datapath_loaded": False})
    assert code_of(lambda: run("STATUS", tmp_path, not_loaded, version="1.1.0", prev=None)) == 50
    down = FakeClient(fail=AgentUnavailable("/s", "refused"))
    assert code_of(lambda: run("STATUS", tmp_path, down, version="1.1.0", prev=None)) == 50
    assert code_of(lambda: run("STATUS", tmp_path, FakeClient(), version="1.0.0", prev=None)) == 1


def test_gc_hands_valid_attachments_to_the_agent_and_prunes_pending(tmp_path) -> None:
    store = PendingStore(str(tmp_path / "pending"))
    for cid in ("keep-me", "stale-1"):
        store.record({"container_id": cid, "ips": []}, "test")
    client = FakeClient()
    valid = [{"containerID": "keep-me", "ifname": "eth0"}, {"containerID": "other", "ifname": "net1"}]
    run("GC", tmp_path, client, version="1.1.0", prev=None, **{"cni.dev/valid-attachments": valid})
    (verb, req), = client.calls
    assert verb == "gc"
    assert req["valid_attachments"] == [{"container_id": "keep-me", "ifname": "eth0"},
                                        {"container_id": "other", "ifname": "net1"}]
    assert "cni.dev/valid-attachments" not in req["plugin_config"]
    assert store.container_ids() == ["keep-me"]
    assert code_of(lambda: run("GC", tmp_path, client, version="1.0.0", prev=None,
                               **{"cni.dev/valid-attachments": valid})) == 1
    assert code_of(lambda: run("GC", tmp_path, client, version="1.1.0", prev=None)) == 7


# ----------------------------------------------------------------------------------------------- main

def call_main(env: dict, stdin: bytes, client: FakeClient | None = None) -> tuple[int, dict | None, str]:
    out, err = io.BytesIO(), io.StringIO()
    rc = plugin.main(env, io.BytesIO(stdin), out, err, client_factory=lambda *a: client or FakeClient())
    text = out.getvalue().decode()
    return rc, (json.loads(text) if text else None), err.getvalue()


def test_main_add_prints_only_the_result_on_stdout(tmp_path) -> None:
    conf = {"cniVersion": "1.0.0", "name": "n", "type": "meshcni", "pendingDir": str(tmp_path), "prevResult": PREV_040}
    env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c", "CNI_NETNS": NETNS, "CNI_IFNAME": "eth0"}
    rc, out, _ = call_main(env, json.dumps(conf).encode())
    assert rc == 0 and out == spec.convert_result(PREV_040, "1.0.0")


def test_main_error_echoes_the_requested_version_and_logs_to_stderr_and_file(tmp_path) -> None:
    log = tmp_path / "cni.log"
    conf = {"cniVersion": "0.4.0", "name": "n", "logFile": str(log), "prevResult": PREV_040}
    env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c", "CNI_NETNS": NETNS, "CNI_IFNAME": "eth0"}
    rc, out, err = call_main(env, json.dumps(conf).encode(), FakeClient(fail=AgentUnavailable("/s", "refused")))
    assert rc == 1 and out["cniVersion"] == "0.4.0" and out["code"] == 11
    assert "code 11" in err and "code 11" in log.read_text()


def test_main_turns_a_plugin_bug_into_error_json_without_traceback(tmp_path) -> None:
    class Exploding(FakeClient):
        def add(self, request):
            raise KeyError("boom")

    conf = {"cniVersion": "1.1.0", "name": "n", "pendingDir": str(tmp_path), "prevResult": PREV_040}
    env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c", "CNI_NETNS": NETNS, "CNI_IFNAME": "eth0"}
    rc, out, err = call_main(env, json.dumps(conf).encode(), Exploding())
    assert rc == 1 and out["code"] == plugin.ERR_INTERNAL and "KeyError" in out["msg"]
    assert "Traceback" not in err


def test_main_version_with_empty_stdin() -> None:
    rc, out, _ = call_main({"CNI_COMMAND": "VERSION"}, b"")
    assert rc == 0 and out == {"cniVersion": "1.1.0", "supportedVersions": list(spec.SUPPORTED_VERSIONS)}
