"""The agent reads a pod's counters from whatever captures it: the eBPF slot, the iptables rules, or both on a
hybrid node, where each backend owns its own directions and the two add up.

The backends here are stand-ins returning fixed counts: what the kernel counts is covered by the root tests
(tests/root/test_iptables_interceptor.py, test_hybrid.py, test_agent_lab.py); this checks which backend the
agent asks for which pod, and how it combines the answers.
"""

from __future__ import annotations

from meshcni.agent.core import AgentCore
from meshcni.agent.registry import PodRecord, Registry
from meshcni.config import Mode
from meshcni.datapath.hybrid import HybridInterceptor
from meshcni.preflight.plan import CapturePlan

EBPF_COUNTS = {"outbound_captured": 7, "inbound_steered": 0, "bypassed": 2, "msgs_spliced": 40}
RULE_COUNTS = {"outbound_captured": 0, "inbound_steered": 5, "bypassed": 1}


class FakeEbpf:
    def __init__(self):
        self.slots_read: list[int] = []

    def counters(self, slot: int) -> dict[str, int]:
        self.slots_read.append(slot)
        return dict(EBPF_COUNTS)

    def slot_of(self, pod):
        return None


class FakeIptables:
    def __init__(self):
        self.pods_read: list[str] = []

    def counters(self, pod) -> dict[str, int]:
        self.pods_read.append(pod.key)
        return dict(RULE_COUNTS)


def make_core(tmp_path, mode: str, slot: int, ebpf_interceptor=None):
    registry = Registry(tmp_path)
    registry.load()
    registry.put(PodRecord(container_id="c-1", netns="/var/run/netns/p1", ips=["10.0.0.2"], pod_name="p1",
                           pod_namespace="default", config={"mode": mode}, mode=mode, phase="captured", slot=slot))
    ebpf, iptables = FakeEbpf(), FakeIptables()
    interceptors = {Mode.EBPF: ebpf_interceptor(ebpf, iptables) if ebpf_interceptor else ebpf,
                    Mode.IPTABLES: iptables}
    return AgentCore(registry, interceptors, ebpf=ebpf), ebpf, iptables


def test_a_pod_in_ebpf_mode_counts_from_its_slot_alone(tmp_path):
    core, ebpf, iptables = make_core(tmp_path, "ebpf", slot=3)
    assert core.counters(core.registry.get("c-1")) == EBPF_COUNTS
    assert ebpf.slots_read == [3] and iptables.pods_read == []


def test_a_pod_in_iptables_mode_counts_from_its_rules_alone(tmp_path):
    core, ebpf, iptables = make_core(tmp_path, "iptables", slot=-1)
    assert core.counters(core.registry.get("c-1")) == RULE_COUNTS
    assert ebpf.slots_read == [] and iptables.pods_read == ["c-1"]


def test_a_pod_in_mode_off_counts_nothing(tmp_path):
    core, ebpf, iptables = make_core(tmp_path, "off", slot=-1)
    assert core.counters(core.registry.get("c-1")) == {}
    assert ebpf.slots_read == [] and iptables.pods_read == []


def test_on_a_hybrid_node_the_two_backends_add_up(tmp_path):
    plan = CapturePlan(outbound=Mode.EBPF, inbound=Mode.IPTABLES, splice=True)
    core, ebpf, iptables = make_core(tmp_path, "ebpf", slot=3,
                                     ebpf_interceptor=lambda e, i: HybridInterceptor(e, i, plan))
    assert core.counters(core.registry.get("c-1")) == {"outbound_captured": 7, "inbound_steered": 5,
                                                       "bypassed": 3, "msgs_spliced": 40}
    assert ebpf.slots_read == [3] and iptables.pods_read == ["c-1"]


def test_a_hybrid_plan_that_gives_iptables_nothing_never_reads_rules(tmp_path):
    plan = CapturePlan(outbound=Mode.EBPF, inbound=Mode.EBPF, splice=True)
    core, ebpf, iptables = make_core(tmp_path, "ebpf", slot=3,
                                     ebpf_interceptor=lambda e, i: HybridInterceptor(e, i, plan))
    assert core.counters(core.registry.get("c-1")) == EBPF_COUNTS
    assert iptables.pods_read == []
