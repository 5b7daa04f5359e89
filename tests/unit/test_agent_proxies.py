"""Unit tests of the agent's proxy side that need no kernel: naming, annotation parsing, how the next proxy
generation's command is put together, and the refusal of upgrades that cannot apply."""

from __future__ import annotations

import pytest

from meshcni.agent import proxies
from meshcni.config import ANN_LISTENERS, ConfigError, PodConfig
from meshcni.datapath.interceptor import PodNet
from meshcni.handoff.errors import UpgradeError


def test_handoff_socket_is_named_after_the_pod_a_sidecar_knows():
    assert proxies.handoff_socket_name("shop", "cart-7d9", "c" * 64) == "shop_cart-7d9.sock"
    assert proxies.handoff_socket_name("", "web", "abc") == "default_web.sock"
    assert proxies.handoff_socket_name("", "", "f" * 64) == "f" * 24 + ".sock"


@pytest.mark.parametrize("value, held", [("agent", True), ("proxy", False), (" Agent ", True)])
def test_listeners_annotation(value, held):
    assert PodConfig.from_annotations({ANN_LISTENERS: value}).hold_listeners is held


def test_listeners_annotation_rejects_anything_else_by_name():
    with pytest.raises(ConfigError, match="meshcni.io/listeners"):
        PodConfig.from_annotations({ANN_LISTENERS: "yes"})


def test_node_default_holds_and_round_trips():
    config = PodConfig.from_annotations({}, PodConfig(hold_listeners=True))
    assert config.hold_listeners is True
    assert PodConfig.from_dict(config.to_dict()) == config


def test_next_generation_runs_through_cgroup_netns_and_proxy_exec(tmp_path, monkeypatch):
    started = {}

    class FakePopen:  # records the argv instead of forking: the composition is what is tested here
        def __init__(self, argv, **kwargs):
            started["argv"], started["env"], started["cwd"] = argv, kwargs["env"], kwargs["cwd"]

    monkeypatch.setattr(proxies.subprocess, "Popen", FakePopen)
    monkeypatch.setattr(proxies.netns_sys, "check_netns", lambda path: None)
    launcher = proxies.AgentLauncher(argv=["haproxy", "-db", "-f", "/etc/h.cfg"], netns="/run/netns/p",
                                     handoff_socket="/run/meshcni/proxy/ns_p.sock", cgroup="/sys/fs/cgroup/pods/p",
                                     env={"HOME": "/"}, cwd=str(tmp_path))
    launcher.start()
    argv = started["argv"]
    assert argv[:2] == ["/bin/sh", "-c"] and argv[4] == "/sys/fs/cgroup/pods/p"
    nsenter = argv[5:]
    assert nsenter[:4] == ["nsenter", "--net=/run/netns/p", "--setgid=1337", "--setuid=1337"]
    assert nsenter[nsenter.index("--") + 1:][-7:] == ["--socket", "/run/meshcni/proxy/ns_p.sock", "--",
                                                      "haproxy", "-db", "-f", "/etc/h.cfg"]
    assert started["env"] == {"HOME": "/"} and started["cwd"] == str(tmp_path)


def test_handoff_variables_of_the_old_generation_are_not_copied():
    for name in ("LISTEN_FDS", "LISTEN_FDNAMES", "LISTEN_PID", "MESHCNI_FD_INBOUND"):
        assert proxies._HANDOFF_ENV.match(name)
    assert not proxies._HANDOFF_ENV.match("HAPROXY_CFG")


def test_upgrades_that_cannot_apply_are_refused_before_anything_starts(tmp_path):
    manager = proxies.ProxyManager(tmp_path / "handoff")
    pod = PodNet(key="c1", netns="/run/netns/x", ips=(), config=PodConfig(), name="p", namespace="ns")
    with pytest.raises(UpgradeError, match="unknown upgrade kind"):
        manager.upgrade(None, pod, "reboot")
    with pytest.raises(UpgradeError, match="only --adopt"):
        manager.upgrade(None, pod, "graceful")


def test_holding_listeners_outside_the_attach_cgroup_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(proxies, "_cgroup_of", lambda pid: "/sys/fs/cgroup/system.slice/agent.service")
    manager = proxies.ProxyManager(tmp_path / "handoff", attach_cgroup="/sys/fs/cgroup/kubepods")
    pod = PodNet(key="c1", netns="/run/netns/x", ips=(), config=PodConfig(hold_listeners=True), name="p")
    with pytest.raises(proxies.HandoffError, match="outside the attach cgroup"):
        manager.hold("c1", "ns/p", pod)
    assert manager.all() == [] and not (tmp_path / "handoff").exists()
