"""failurePolicy "iptables": the plugin core with a fake agent that is away and a recording interceptor.

The real `IptablesFallback` runs here (it builds the `PodNet` and undoes failed captures); only the
interceptor under it is a stand-in. The real rules in a real netns, and the agent adopting the pod, are
covered by tests/root/test_cni_fallback_iptables.py.
"""

from __future__ import annotations

import ipaddress
import io
import subprocess
import sys

import pytest
from test_cni_plugin import NETNS, PREV_040, FakeClient, make  # noqa: E402 - tests/unit is on sys.path

from meshcni.cni import plugin, spec
from meshcni.cni import conf as confmod
from meshcni.cni.fallback import IptablesFallback
from meshcni.cni.log import PluginLog
from meshcni.cni.protocol import AgentRefused, AgentUnavailable
from meshcni.cni.spec import CniError
from meshcni.config import Mode
from meshcni.sys.errors import SysError

DOWN = AgentUnavailable("/run/fake.sock", "socket does not exist")


class RecordingInterceptor:
    """Records capture/release/verify; `fail_capture` is raised by capture, `leftovers` returned by verify."""

    def __init__(self, fail_capture: Exception | None = None, fail_release: Exception | None = None,
                 leftovers: list[str] | None = None):
        self.fail_capture = fail_capture
        self.fail_release = fail_release
        self.leftovers = leftovers or []
        self.calls: list[tuple[str, object]] = []

    def capture(self, pod):
        self.calls.append(("capture", pod))
        if self.fail_capture:
            raise self.fail_capture

    def release(self, pod):
        self.calls.append(("release", pod))
        if self.fail_release:
            raise self.fail_release

    def verify(self, pod):
        self.calls.append(("verify", pod))
        return list(self.leftovers)

    def verbs(self) -> list[str]:
        return [verb for verb, _ in self.calls]


def run(command, tmp_path, client, interceptor, log: io.StringIO | None = None, **kw):
    inv, cfg, pending = make(command, tmp_path, **kw)
    fallback = IptablesFallback(interceptor_factory=lambda: interceptor)
    out = plugin.run_command(inv, cfg, client, pending, PluginLog(log or io.StringIO()), fallback)
    return out, pending


# ------------------------------------------------------------------------------------------------ conf

def test_conf_accepts_iptables_and_its_exclusions_sorted_and_unique(tmp_path) -> None:
    _, cfg, _ = make("ADD", tmp_path, failurePolicy="iptables",
                     iptablesFallback={"excludeInboundPorts": [9090, 22, 9090], "excludeOutboundPorts": [53]})
    assert cfg.failure_policy == "iptables"
    assert cfg.fallback_exclude_inbound == (22, 9090) and cfg.fallback_exclude_outbound == (53,)
    assert "iptables" in confmod.FAILURE_POLICIES


def test_conf_without_exclusions_has_none(tmp_path) -> None:
    _, cfg, _ = make("ADD", tmp_path, failurePolicy="iptables")
    assert cfg.fallback_exclude_inbound == () and cfg.fallback_exclude_outbound == ()


# ------------------------------------------------------------------------------------------------ ADD

@pytest.mark.parametrize("failure", [DOWN, AgentRefused(11, "agent starting")])
def test_add_with_agent_away_captures_with_node_defaults_and_records_the_fallback(tmp_path, failure) -> None:
    interceptor = RecordingInterceptor()
    out, pending = run("ADD", tmp_path, FakeClient(fail=failure), interceptor, failurePolicy="iptables",
                       iptablesFallback={"excludeInboundPorts": [9090], "excludeOutboundPorts": [53]})
    assert out == spec.convert_result(PREV_040, "0.4.0")
    assert interceptor.verbs() == ["capture"]
    pod = interceptor.calls[0][1]
    assert (pod.key, pod.netns, pod.ips) == ("ctr-1", NETNS, (ipaddress.ip_address("10.239.0.9"),))
    c = pod.config
    assert c.mode is Mode.IPTABLES
    assert (c.proxy_uid, c.proxy_gid, c.outbound_port, c.inbound_port) == (1337, 1337, 15001, 15006)
    assert c.exclude_inbound_ports == (9090,) and c.exclude_outbound_ports == (53,)
    assert c.include_inbound_ports is None and c.include_outbound_cidrs is None  # capture everything
    record = pending.load("ctr-1")
    assert record["fallback"] == "iptables" and record["netns"] == NETNS and record["reason"]


def test_add_with_agent_up_never_touches_iptables(tmp_path) -> None:
    interceptor = RecordingInterceptor()
    _, pending = run("ADD", tmp_path, FakeClient(), interceptor, failurePolicy="iptables")
    assert interceptor.calls == [] and pending.container_ids() == []


def test_add_real_refusal_is_reported_and_nothing_is_captured(tmp_path) -> None:
    interceptor = RecordingInterceptor()
    with pytest.raises(CniError) as info:
        run("ADD", tmp_path, FakeClient(fail=AgentRefused(7, "bad annotation")), interceptor,
            failurePolicy="iptables")
    assert info.value.code == 7 and interceptor.calls == []


def test_failed_capture_is_undone_verified_and_reported_naming_the_netns(tmp_path) -> None:
    interceptor = RecordingInterceptor(fail_capture=SysError("ip6tables-restore: no such table"))
    with pytest.raises(CniError) as info:
        run("ADD", tmp_path, FakeClient(fail=DOWN), interceptor, failurePolicy="iptables")
    err = info.value
    assert err.code == plugin.ERR_FALLBACK_FAILED and 100 <= err.code < 200
    assert NETNS in err.msg
    assert "ip6tables-restore" in err.details and "nothing left behind" in err.details
    assert interceptor.verbs() == ["capture", "release", "verify"]
    assert interceptor.calls[2][1].config.mode is Mode.OFF  # verified against "no capture at all"
    assert not (tmp_path / "pending").exists()


def test_failed_undo_is_named_in_the_error(tmp_path) -> None:
    interceptor = RecordingInterceptor(fail_capture=SysError("restore failed"),
                                       leftovers=["ipv4 nat: chain ISTIO_OUTPUT exists although capture is off"])
    with pytest.raises(CniError) as info:
        run("ADD", tmp_path, FakeClient(fail=DOWN), interceptor, failurePolicy="iptables")
    assert "ISTIO_OUTPUT exists" in info.value.details


def test_unwritable_pending_dir_undoes_the_capture_and_fails_with_io(tmp_path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    interceptor = RecordingInterceptor()
    with pytest.raises(CniError) as info:
        run("ADD", tmp_path, FakeClient(fail=DOWN), interceptor, failurePolicy="iptables",
            pendingDir=str(blocker / "pending"))
    assert info.value.code == spec.ERR_IO
    assert interceptor.verbs() == ["capture", "release"]


# ------------------------------------------------------------------------------------------------ DEL

def test_del_with_agent_down_removes_the_rules_and_the_record(tmp_path) -> None:
    run("ADD", tmp_path, FakeClient(fail=DOWN), RecordingInterceptor(), failurePolicy="iptables")
    interceptor = RecordingInterceptor()
    out, pending = run("DEL", tmp_path, FakeClient(fail=DOWN), interceptor, failurePolicy="iptables")
    assert out is None
    assert interceptor.verbs() == ["release"] and interceptor.calls[0][1].netns == NETNS
    assert pending.container_ids() == []


def test_del_never_fails_because_the_rules_cannot_be_removed(tmp_path) -> None:
    run("ADD", tmp_path, FakeClient(fail=DOWN), RecordingInterceptor(), failurePolicy="iptables")
    interceptor = RecordingInterceptor(fail_release=SysError("iptables-restore: resource busy"))
    log = io.StringIO()
    _, pending = run("DEL", tmp_path, FakeClient(fail=DOWN), interceptor, log=log, failurePolicy="iptables")
    assert pending.container_ids() == []
    assert "resource busy" in log.getvalue()


def test_del_without_a_fallback_record_leaves_iptables_alone(tmp_path) -> None:
    run("ADD", tmp_path, FakeClient(fail=DOWN), RecordingInterceptor(), failurePolicy="open")
    interceptor = RecordingInterceptor()
    _, pending = run("DEL", tmp_path, FakeClient(fail=DOWN), interceptor, failurePolicy="iptables")
    assert interceptor.calls == [] and pending.container_ids() == []


def test_del_with_an_empty_netns_only_forgets_the_record(tmp_path) -> None:
    run("ADD", tmp_path, FakeClient(fail=DOWN), RecordingInterceptor(), failurePolicy="iptables")
    interceptor = RecordingInterceptor()
    _, pending = run("DEL", tmp_path, FakeClient(fail=DOWN), interceptor, netns="", prev=None,
                     failurePolicy="iptables")
    assert interceptor.calls == [] and pending.container_ids() == []


# ------------------------------------------------------------------------------------------ import cost

def test_the_plugin_imports_the_datapath_only_on_the_fallback_path() -> None:
    code = ("import sys; import meshcni.cni.plugin as p; p.IptablesFallback(); "
            "print(sorted(m for m in sys.modules if m.startswith(('meshcni.datapath', 'meshcni.sys'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_build_without_the_datapath_fails_with_a_clear_fallback_error(tmp_path, monkeypatch) -> None:
    # What a PyInstaller bundle that excludes meshcni.datapath sees: the import itself fails.
    monkeypatch.setitem(sys.modules, "meshcni.datapath.iptables", None)
    inv, cfg, pending = make("ADD", tmp_path, failurePolicy="iptables")
    with pytest.raises(CniError) as info:
        plugin.run_command(inv, cfg, FakeClient(fail=DOWN), pending, PluginLog(io.StringIO()))
    assert info.value.code == plugin.ERR_FALLBACK_FAILED
    assert "has no iptables fallback" in info.value.details
    assert pending.container_ids() == []
