"""Root tests: with a feature masked, the preflight plan splits capture between eBPF and iptables, and real
pod-to-pod HTTP in a lab still goes through both sidecars — each direction by the backend the plan names.

Evidence is counted, as deltas: HAProxy frontend sessions (which proxy handled the connection), the eBPF
datapath's per-pod counters (`outbound_captured` moves only when connect() capture did it,
`inbound_steered` only when sk_lookup did), the rules' own counts for the other direction, and the live
nat rules in each pod's netns. The lab starts without capture; the test loads its own datapath on the lab's
cgroup and removes it afterwards.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path

import pytest

from meshcni import preflight
from meshcni.config import Mode
from meshcni.datapath.iptables import CONNTRACK_CHAIN, CONNTRACK_HOLD_SPEC, INBOUND, OUTPUT, IptablesInterceptor
from meshcni.datapath.hybrid import HybridInterceptor
from meshcni.lab import haproxy, traffic
from meshcni.lab import lab as lab_core
from meshcni.lab import pod as podproc
from meshcni.lab.state import LabError
from meshcni.sys import iptables as ipt

pytestmark = pytest.mark.root

try:
    import bcc  # noqa: F401

    HAVE_BCC = True
except ImportError:
    HAVE_BCC = False

IPT = IptablesInterceptor()  # reads the rules' counters, whichever interceptor wrote them
HOST_SAVE_TOOLS = ["iptables-nft-save", "ip6tables-nft-save", "iptables-legacy-save", "ip6tables-legacy-save"]


def _host_rules() -> dict[str, list[str]]:
    # No `-t`: naming a table would make legacy instantiate it in the host namespace.
    out = {}
    for tool in HOST_SAVE_TOOLS:
        text = subprocess.run([tool], capture_output=True, text=True).stdout
        out[tool] = [line for line in text.splitlines() if line.startswith("-A ")]
    return out


@pytest.fixture(scope="module")
def lab():
    if not HAVE_BCC:
        pytest.skip("bcc (python3-bpfcc) is not installed")
    from meshcni.datapath.ebpf import EbpfDatapath

    host_before = _host_rules()
    name = f"t-hybrid-{os.getpid() % 100000}"
    try:
        state = lab_core.up(lab_core.LabOptions(name=name, capture=False))
    except LabError:
        lab_core.down(name)
        raise
    pin_dir = Path(f"/sys/fs/bpf/meshcni-test-hybrid-{uuid.uuid4().hex[:8]}")
    dp = None
    try:
        dp = EbpfDatapath.load(pin_dir=pin_dir, cgroup=state.cgroup)
        yield state, dp
    finally:
        try:
            if dp is not None:
                dp.unload()
            elif pin_dir.exists():
                subprocess.run(["rm", "-rf", str(pin_dir)], check=False)
        finally:
            lab_core.down(name)
    assert not pin_dir.exists(), f"{pin_dir} left behind"
    assert _host_rules() == host_before, "the host's iptables changed"


def _frontends(state, pod) -> dict[str, int]:
    return haproxy.stats(podproc.proxy_socket(state, pod))["frontends"]


def _nat(pod) -> ipt.Table:
    return ipt.save(pod.netns, ipt.Family.IPV4, ipt.detect_backend(), "nat")


def _jumps(table: ipt.Table, builtin: str, chain: str) -> int:
    return sum(1 for spec in table.chain_rules(builtin) if ipt.rule_target(spec) == chain)


def _check_pod_to_pod(state, dp, *, outbound_by_ebpf: bool, inbound_by_ebpf: bool) -> None:
    nets = {p.name: lab_core.pod_net(p) for p in state.pods}
    a, b = state.pods
    for src, dst in ((a, b), (b, a)):
        fs_src, fs_dst = _frontends(state, src), _frontends(state, dst)
        c_src, c_dst = dp.counters(nets[src.name]), dp.counters(nets[dst.name])
        i_src, i_dst = IPT.counters(nets[src.name]), IPT.counters(nets[dst.name])
        rep = traffic.request(state, src, dst.ip, 80, "/")
        assert rep["status"] == 200
        # The app still talks to the pod IP; the destination app sees the inbound proxy's passthrough source.
        assert rep["body"] == f"pod={dst.name} ip={dst.ip} peer=127.0.0.6\n"
        assert traffic.proxy_headers(rep) == [f"{dst.name}-inbound", f"{src.name}-outbound"]
        assert _frontends(state, src)["outbound"] - fs_src["outbound"] == 1
        assert _frontends(state, dst)["inbound"] - fs_dst["inbound"] == 1
        after_src, after_dst = dp.counters(nets[src.name]), dp.counters(nets[dst.name])
        assert after_src["outbound_captured"] - c_src["outbound_captured"] == (1 if outbound_by_ebpf else 0)
        assert after_dst["inbound_steered"] - c_dst["inbound_steered"] == (1 if inbound_by_ebpf else 0)
        # the other direction's rules count it instead: the two backends' counters add up to one each way
        ipt_src, ipt_dst = IPT.counters(nets[src.name]), IPT.counters(nets[dst.name])
        assert ipt_src["outbound_captured"] - i_src["outbound_captured"] == (0 if outbound_by_ebpf else 1)
        assert ipt_dst["inbound_steered"] - i_dst["inbound_steered"] == (0 if inbound_by_ebpf else 1)


def _release_and_check_direct(state, hybrid) -> None:
    a, b = state.pods
    for pod in state.pods:
        hybrid.release(lab_core.pod_net(pod))
    for pod in state.pods:
        nat = _nat(pod)
        assert [c for c in nat.chains if c.startswith("ISTIO_")] == []
        # Nothing is left but the conntrack hold (it redirects nothing), and that only while a connection the
        # rules redirected is open: HAProxy's pooled idle server connections can be, or can have timed out.
        left = {chain: rules for chain, rules in nat.rules.items() if rules}
        assert left in ({}, {CONNTRACK_CHAIN: [CONNTRACK_HOLD_SPEC]})
        if not left:  # dropped at release, so none was open then, and none can have been redirected since
            assert not ipt.conntrack_redirected_open(pod.netns)
    assert hybrid.ebpf.enrolled() == {}
    fa, fb = _frontends(state, a), _frontends(state, b)
    rep = traffic.request(state, a, b.ip, 80, "/")
    assert rep["body"] == f"pod={b.name} ip={b.ip} peer={a.ip}\n"
    assert traffic.proxy_headers(rep) == []
    assert (_frontends(state, a)["outbound"], _frontends(state, b)["inbound"]) == (fa["outbound"], fb["inbound"])


def _capture_all(state, hybrid) -> None:
    for pod in state.pods:
        hybrid.capture(lab_core.pod_net(pod))
    for pod in state.pods:
        assert hybrid.verify(lab_core.pod_net(pod)) == []


def test_without_sk_lookup_outbound_is_ebpf_and_inbound_is_iptables(lab):
    state, dp = lab
    plan = preflight.plan(preflight.probe(masked=["sk_lookup"]))
    assert (plan.outbound, plan.inbound) == (Mode.EBPF, Mode.IPTABLES)
    assert any(r.startswith("inbound by iptables") and "sk_lookup" in r for r in plan.degraded)
    hybrid = HybridInterceptor(dp, IptablesInterceptor(), plan)
    try:
        _capture_all(state, hybrid)
        for pod in state.pods:
            nat = _nat(pod)
            assert _jumps(nat, "PREROUTING", INBOUND) == 1
            assert _jumps(nat, "OUTPUT", OUTPUT) == 0 and OUTPUT not in nat.chains
        assert not list(dp.pins.links.glob("sk_lookup-netns-*"))
        _check_pod_to_pod(state, dp, outbound_by_ebpf=True, inbound_by_ebpf=False)
    finally:
        _release_and_check_direct(state, hybrid)


def test_without_connect_hooks_outbound_is_iptables_and_inbound_is_ebpf(lab, monkeypatch):
    state, dp = lab
    monkeypatch.setenv(preflight.MASK_ENV, "cgroup_sock_addr")  # the operator's way to mask a feature
    plan = preflight.plan(preflight.probe())
    assert (plan.outbound, plan.inbound) == (Mode.IPTABLES, Mode.EBPF)
    assert plan.splice is False
    hybrid = HybridInterceptor(dp, IptablesInterceptor(), plan)
    try:
        _capture_all(state, hybrid)
        for pod in state.pods:
            nat = _nat(pod)
            assert _jumps(nat, "OUTPUT", OUTPUT) == 1
            assert _jumps(nat, "PREROUTING", INBOUND) == 0 and INBOUND not in nat.chains
        assert len(list(dp.pins.links.glob("sk_lookup-netns-*"))) == len(state.pods)
        _check_pod_to_pod(state, dp, outbound_by_ebpf=False, inbound_by_ebpf=True)
    finally:
        _release_and_check_direct(state, hybrid)


def test_switching_a_captured_pod_between_plans_leaves_only_the_new_split(lab):
    """Re-capturing under another plan moves each direction: stale chains and the sk_lookup link go."""
    state, dp = lab
    inbound_ipt = preflight.plan(preflight.probe(masked=["sk_lookup"]))
    outbound_ipt = preflight.plan(preflight.probe(masked=["cgroup_sock_addr"]))
    first = HybridInterceptor(dp, IptablesInterceptor(), outbound_ipt)
    second = HybridInterceptor(dp, IptablesInterceptor(), inbound_ipt)
    try:
        _capture_all(state, first)
        _capture_all(state, second)  # verify() inside checks nothing of the first split is left
        for pod in state.pods:
            nat = _nat(pod)
            assert OUTPUT not in nat.chains and _jumps(nat, "OUTPUT", OUTPUT) == 0
        assert not list(dp.pins.links.glob("sk_lookup-netns-*"))
        _check_pod_to_pod(state, dp, outbound_by_ebpf=True, inbound_by_ebpf=False)
    finally:
        _release_and_check_direct(state, second)
