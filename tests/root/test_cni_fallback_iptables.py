"""failurePolicy "iptables" for real: the plugin, executed as `python -m meshcni.cni` with no agent behind
its socket, writes Istio's nat rules into a throwaway pod netns; a real agent then adopts the pod into eBPF
and removes those rules; DEL with the agent still down removes them itself; a capture that fails half-way
(IPv4 written, IPv6 refused by the netns) leaves nothing behind.

Every pod netns comes from `AgentEnv` and is deleted by its `close()`, like the agent, its cgroup and pins.
No rule is ever written in the host netns; the host rule count is checked before and after.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from meshcni.sys import iptables as ipt
from meshcni.sys.iptables import Family
from tests.root.agent_env import AgentEnv

pytestmark = pytest.mark.root

REPO = Path(__file__).resolve().parents[2]
ADOPT_TIMEOUT = 60.0
POD_IP = "10.238.0.7/24"
OUR_CHAINS = ("ISTIO_INBOUND", "ISTIO_IN_REDIRECT", "ISTIO_OUTPUT", "ISTIO_REDIRECT")


def host_rule_count() -> int:
    out = subprocess.run(["iptables-save"], capture_output=True, text=True, check=True).stdout
    return sum(1 for line in out.splitlines() if line.startswith("-A"))


@pytest.fixture
def env(tmp_path):
    before = host_rule_count()
    e = AgentEnv(tmp_path, uuid.uuid4().hex[:6])
    try:
        e.policy.write_text(json.dumps({"pods": {}}))
        yield e
    finally:
        e.close()
    assert host_rule_count() == before


@pytest.fixture
def plugin_exe(tmp_path) -> Path:
    """`python -m meshcni.cni`, or the executable MESHCNI_TEST_PLUGIN_EXE names (e.g. a PyInstaller bundle)."""
    if os.environ.get("MESHCNI_TEST_PLUGIN_EXE"):
        return Path(os.environ["MESHCNI_TEST_PLUGIN_EXE"])
    wrapper = tmp_path / "meshcni-module"
    wrapper.write_text(f"#!/bin/sh\nPYTHONPATH={REPO} exec {sys.executable} -m meshcni.cni\n")
    wrapper.chmod(0o755)
    return wrapper


def prev_result(*addresses: str) -> dict:
    ips = [{"address": a, "interface": 0} for a in addresses]
    return {"cniVersion": "1.0.0", "interfaces": [{"name": "eth0", "sandbox": "x"}], "ips": ips}


def run_plugin(exe: Path, env: AgentEnv, command: str, cid: str, netns: str, *addresses: str) -> tuple[int, dict]:
    conf = {"cniVersion": "1.0.0", "name": "fallback-test", "type": "meshcni", "failurePolicy": "iptables",
            "agentSocket": str(env.cni_socket), "pendingDir": str(env.pending), "connectTimeoutSeconds": 1}
    if command == "ADD":
        conf["prevResult"] = prev_result(*(addresses or (POD_IP,)))
    run_env = {"PATH": os.environ["PATH"], "CNI_COMMAND": command, "CNI_CONTAINERID": cid, "CNI_NETNS": netns,
               "CNI_IFNAME": "eth0", "CNI_PATH": str(exe.parent),
               "CNI_ARGS": f"K8S_POD_NAME={cid};K8S_POD_NAMESPACE=shop;K8S_POD_UID=uid-{cid}"}
    proc = subprocess.run([str(exe)], input=json.dumps(conf).encode(), env=run_env, capture_output=True,
                          timeout=60)
    out = proc.stdout.decode().strip()
    return proc.returncode, (json.loads(out) if out else {})


def nat_rules(netns: str, family: Family = Family.IPV4) -> list[str]:
    """The pod's nat table as the real save tool of the node's backend prints it."""
    tool = ipt.tool(ipt.detect_backend(), family, "save")
    out = subprocess.run(["ip", "netns", "exec", Path(netns).name, tool, "-t", "nat"], capture_output=True,
                         text=True, check=True).stdout
    return [line for line in out.splitlines() if line.startswith((":", "-A"))]


def our_chains(rules: list[str]) -> set[str]:
    return {line[1:].split()[0] for line in rules if line.startswith(":") and line[1:].split()[0] in OUR_CHAINS}


def assert_captured_by_istio_rules(netns: str) -> None:
    rules = nat_rules(netns)
    assert our_chains(rules) == set(OUR_CHAINS)
    assert "-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001" in rules
    assert "-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006" in rules
    assert "-A OUTPUT -p tcp -j ISTIO_OUTPUT" in rules and "-A PREROUTING -p tcp -j ISTIO_INBOUND" in rules
    assert "-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN" in rules


def wait_for(predicate, what: str, env: AgentEnv):
    deadline = time.monotonic() + ADOPT_TIMEOUT
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} never happened; agent log:\n{env.log.read_text()[-3000:]}")
        time.sleep(0.1)


def test_agent_down_add_captures_with_iptables_then_the_agent_adopts_into_ebpf(env, plugin_exe) -> None:
    pytest.importorskip("bcc")
    netns = env.make_netns(0)
    cid = f"fb-{env.uid}"
    code, out = run_plugin(plugin_exe, env, "ADD", cid, netns)
    assert code == 0, out
    assert [ip["address"] for ip in out["ips"]] == [POD_IP]  # prevResult printed back
    assert_captured_by_istio_rules(netns)
    record = json.loads((env.pending / f"{cid}.json").read_text())
    assert record["fallback"] == "iptables" and record["netns"] == netns

    env.start()
    with env.client() as client:
        # The record appears in phase "adding" before the capture is applied; wait for the finished one.
        pod = wait_for(lambda: next((p for p in client.list_pods() if p["container_id"] == cid and p["captured"]),
                                    None), "adoption of the pending pod", env)
        assert pod["mode"] == "ebpf"
        wait_for(lambda: not (env.pending / f"{cid}.json").exists(), "removal of the pending record", env)
    assert our_chains(nat_rules(netns)) == set()  # released after eBPF captured
    assert not any(line.startswith("-A") for line in nat_rules(netns))
    assert list(env.pending.iterdir()) == []


def test_del_with_agent_down_removes_the_fallback_rules(env, plugin_exe) -> None:
    netns = env.make_netns(0)
    cid = f"fbdel-{env.uid}"
    assert run_plugin(plugin_exe, env, "ADD", cid, netns)[0] == 0
    assert_captured_by_istio_rules(netns)
    code, out = run_plugin(plugin_exe, env, "DEL", cid, netns)
    assert (code, out) == (0, {})
    assert nat_rules(netns) == [line for line in nat_rules(netns) if line.startswith(":")]  # no rule at all
    assert our_chains(nat_rules(netns)) == set()
    assert not (env.pending / f"{cid}.json").exists()
    # DEL again, and DEL after the netns is gone, both succeed
    assert run_plugin(plugin_exe, env, "DEL", cid, netns)[0] == 0
    env.delete_netns(netns)
    assert run_plugin(plugin_exe, env, "DEL", cid, "")[0] == 0


def test_a_capture_that_fails_half_way_leaves_nothing_behind(env, plugin_exe) -> None:
    netns = env.make_netns(0)
    name = Path(netns).name
    # The pod has an IPv6 address but IPv6 is off in its netns: IPv4 rules go in, then the IPv6 step fails.
    subprocess.run(["ip", "netns", "exec", name, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1",
                    "net.ipv6.conf.lo.disable_ipv6=1"], check=True)
    cid = f"fbfail-{env.uid}"
    code, out = run_plugin(plugin_exe, env, "ADD", cid, netns, POD_IP, "fd00:238::7/64")
    assert code == 1
    assert out["code"] == 103 and netns in out["msg"]
    assert "IPv6 is disabled" in out["details"] and "nothing left behind" in out["details"]
    assert our_chains(nat_rules(netns)) == set()
    assert not any(line.startswith("-A") for line in nat_rules(netns))
    assert not (env.pending / f"{cid}.json").exists()
