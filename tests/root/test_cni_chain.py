"""A real CNI chain on the real kernel: Debian's loopback, bridge + host-local, then meshcni, executed by
meshcni.cni.runtime for every supported cniVersion (add, check, del, del again, status, gc).

The chain runs with a throwaway network namespace standing in for the node (`nsenter --net=` prefix), so
the bridge `mcnitest0`, its veths and the ip_forward sysctl the bridge plugin sets for isGateway all land
there and never on the real host; the pod is a second throwaway netns. The agent is the fake from
tests/cni_fake_agent.py (the real agent does not exist yet). meshcni runs both as `python -m meshcni.cni`
and as the PyInstaller bundle.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cni_fake_agent import FakeAgent  # noqa: E402

from meshcni.cni import spec  # noqa: E402
from meshcni.cni.runtime import Attachment, CniRuntime, PluginFailed, RuntimeConfigError  # noqa: E402

pytestmark = pytest.mark.root

REPO = Path(__file__).resolve().parents[2]
BUNDLE = REPO / "dist" / "meshcni-cni" / "meshcni"
REFERENCE = Path("/usr/lib/cni")
SUBNET = ipaddress.ip_network("10.239.0.0/24")
BRIDGE = "mcnitest0"


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, check=check, timeout=60)


def host_rule_count() -> int:
    out = sh("iptables-save").stdout
    return sum(1 for line in out.splitlines() if line.startswith("-A"))


@pytest.fixture(scope="session")
def bundle() -> Path:
    """The built plugin bundle, rebuilt when any plugin source is newer than it."""
    sources = list((REPO / "meshcni" / "cni").glob("*.py"))
    if not BUNDLE.exists() or max(p.stat().st_mtime for p in sources) > BUNDLE.stat().st_mtime:
        sh(str(REPO / "scripts" / "build-plugin.sh"))
    return BUNDLE


@pytest.fixture(params=["module", "bundle"])
def plugin_exe(request, tmp_path) -> Path:
    if request.param == "bundle":
        return request.getfixturevalue("bundle")
    wrapper = tmp_path / "meshcni-module"
    wrapper.write_text(f"#!/bin/sh\nPYTHONPATH={REPO} exec {sys.executable} -m meshcni.cni\n")
    wrapper.chmod(0o755)
    return wrapper


class Chain:
    """Everything one scenario needs: namespaces, a CNI bin dir, a runtime, the fake agent, the conflists."""

    def __init__(self, tmp: Path, uid: str, plugin_exe: Path, agent: FakeAgent):
        self.node = f"mcni-cni-node-{uid}"
        self.pod = f"mcni-cni-pod-{uid}"
        self.pod_path = f"/run/netns/{self.pod}"
        self.tmp = tmp
        self.agent = agent
        self.bin = tmp / "bin"
        self.bin.mkdir()
        for name in ("bridge", "host-local", "loopback"):
            (self.bin / name).symlink_to(REFERENCE / name)
        (self.bin / "meshcni").symlink_to(plugin_exe)
        self.runtime = CniRuntime([str(self.bin)], str(tmp / "cache"), exec_prefix=["nsenter", f"--net=/run/netns/{self.node}"])
        self.att = Attachment(f"ctr-{uid}", self.pod_path, "eth0",
                              {"K8S_POD_NAME": "web-0", "K8S_POD_NAMESPACE": "shop", "K8S_POD_UID": f"uid-{uid}"})
        self.lo_att = Attachment(self.att.container_id, self.pod_path, "lo")

    def conflist(self, version: str, **meshcni: object) -> dict:
        return {
            "cniVersion": version,
            "name": "mcnitest",
            "plugins": [
                {"type": "bridge", "bridge": BRIDGE, "isGateway": True, "ipMasq": False,
                 "ipam": {"type": "host-local", "ranges": [[{"subnet": str(SUBNET)}]],
                          "dataDir": str(self.tmp / "ipam")}},
                {"type": "meshcni", "agentSocket": self.agent.socket_path, "pendingDir": str(self.tmp / "pending"),
                 "logFile": str(self.tmp / "meshcni.log"), "connectTimeoutSeconds": 0.5, **meshcni},
            ],
        }

    def loopback(self, version: str) -> dict:
        return {"cniVersion": version, "name": "lo", "type": "loopback"}

    def pod_eth0_addresses(self) -> list[str]:
        out = sh("ip", "-n", self.pod, "-j", "addr", "show", "dev", "eth0", check=False)
        if out.returncode != 0:
            return []
        return [f"{a['local']}/{a['prefixlen']}" for link in json.loads(out.stdout) for a in link["addr_info"]
                if a["family"] == "inet"]

    def exec_meshcni(self, command: str, conf: dict) -> tuple[int, dict | None]:
        """Run meshcni alone, the way the runtime would, for verbs the runtime itself declines."""
        env = {"CNI_COMMAND": command, "CNI_CONTAINERID": self.att.container_id, "CNI_NETNS": self.pod_path,
               "CNI_IFNAME": "eth0", "CNI_PATH": str(self.bin), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
        proc = subprocess.run([str(self.bin / "meshcni")], input=json.dumps(conf).encode(), env=env,
                              capture_output=True, timeout=30)
        assert b"Traceback" not in proc.stderr
        return proc.returncode, (json.loads(proc.stdout) if proc.stdout.strip() else None)


@pytest.fixture
def chain(tmp_path, unique_id, plugin_exe):
    node, pod = f"mcni-cni-node-{unique_id}", f"mcni-cni-pod-{unique_id}"
    rules_before = host_rule_count()
    agent = FakeAgent(str(tmp_path / "agent.sock"))
    try:
        sh("ip", "netns", "add", node)
        sh("ip", "netns", "add", pod)
        agent.start()
        yield Chain(tmp_path, unique_id, plugin_exe, agent)
        # Neither the host nor the stand-in node got a single iptables rule (no ipMasq, meshcni adds none).
        assert host_rule_count() == rules_before
        node_rules = sh("ip", "netns", "exec", node, "iptables-save").stdout
        assert [line for line in node_rules.splitlines() if line.startswith("-A")] == []
    finally:
        agent.stop()
        sh("ip", "-n", node, "link", "del", BRIDGE, check=False)
        sh("ip", "netns", "del", pod, check=False)
        sh("ip", "netns", "del", node, check=False)


@pytest.mark.parametrize("version", spec.SUPPORTED_VERSIONS)
def test_chain_lifecycle(chain: Chain, version: str) -> None:
    rt, agent, att = chain.runtime, chain.agent, chain.att
    conf = chain.conflist(version)
    key = (att.container_id, "eth0")

    # ADD: loopback on its own (as containerd does), then bridge → meshcni.
    rt.add(chain.loopback(version), chain.lo_att)
    result = rt.add(conf, att)
    assert result["cniVersion"] == version
    address = result["ips"][0]["address"]
    assert ipaddress.ip_interface(address) in {ipaddress.ip_interface(f"{h}/24") for h in SUBNET.hosts()}
    assert ("version" in result["ips"][0]) == (version in ("0.3.1", "0.4.0"))
    assert chain.pod_eth0_addresses() == [address]
    enrolled = agent.enrolled[key]
    assert enrolled["netns"] == chain.pod_path and enrolled["ips"] == [address]
    assert (enrolled["pod_name"], enrolled["pod_namespace"]) == ("web-0", "shop")
    assert enrolled["cni_version"] == version  # meshcni received the list's version, not an adapted one
    assert enrolled["plugin_config"]["name"] == "mcnitest"

    # CHECK: passes while captured, fails with 101 once the agent no longer has the pod.
    if spec.at_least(version, "0.4.0"):
        rt.check(conf, att)
        saved = agent.enrolled.pop(key)
        with pytest.raises(PluginFailed) as info:
            rt.check(conf, att)
        assert (info.value.plugin, info.value.code) == ("meshcni", 101)
        agent.enrolled[key] = saved
        rt.check(conf, att)
    else:
        with pytest.raises(RuntimeConfigError):
            rt.check(conf, att)
        rc, err = chain.exec_meshcni("CHECK", {**conf["plugins"][1], "cniVersion": version, "name": "mcnitest",
                                               "prevResult": result})
        assert rc == 1 and err["code"] == spec.ERR_INCOMPATIBLE_VERSION

    # STATUS and GC exist from 1.1.0 on.
    plugin_conf = {**conf["plugins"][1], "cniVersion": version, "name": "mcnitest"}
    if version == "1.1.0":
        rt.status(conf)
        agent.datapath_loaded = False
        with pytest.raises(PluginFailed) as info:
            rt.status(conf)
        assert (info.value.plugin, info.value.code) == ("meshcni", 50)
        agent.datapath_loaded = True
        agent.enrolled[("stale-ctr", "eth0")] = dict(saved, container_id="stale-ctr")
        rt.gc(conf, [att])
        assert list(agent.enrolled) == [key]
    else:
        rt.status(conf)  # a no-op below 1.1.0, as in libcni
        rt.gc(conf, [att])
        for verb in ("STATUS", "GC"):
            rc, err = chain.exec_meshcni(verb, {**plugin_conf, "cni.dev/valid-attachments": []})
            assert rc == 1 and err["code"] == spec.ERR_INCOMPATIBLE_VERSION

    # DEL, then DEL again: both succeed and leave nothing behind.
    rt.delete(conf, att)
    assert agent.enrolled == {}
    assert chain.pod_eth0_addresses() == []
    rt.delete(conf, att)
    rt.delete(chain.loopback(version), chain.lo_att)
    assert agent.verbs().count("del") == 2


def test_agent_down_closed_then_open(chain: Chain) -> None:
    rt, att = chain.runtime, chain.att
    chain.agent.stop()

    closed = chain.conflist("1.0.0", failurePolicy="closed")
    with pytest.raises(PluginFailed) as info:
        rt.add(closed, att)
    assert (info.value.plugin, info.value.code) == ("meshcni", 11)
    assert chain.agent.socket_path in info.value.msg
    rt.delete(closed, att)  # the runtime tears the half-made pod down; DEL must not need the agent
    assert chain.pod_eth0_addresses() == []

    opened = chain.conflist("1.0.0", failurePolicy="open")
    result = rt.add(opened, att)
    record = json.loads((chain.tmp / "pending" / f"{att.container_id}.json").read_text())
    assert record["ips"] == [result["ips"][0]["address"]] and record["netns"] == chain.pod_path
    assert "pod passes uncaptured" in (chain.tmp / "meshcni.log").read_text()
    rt.delete(opened, att)
    assert not (chain.tmp / "pending" / f"{att.container_id}.json").exists()
