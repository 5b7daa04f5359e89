"""The agent's tick retries the conntrack hold a pod keeps after leaving iptables mode, until it goes.

The iptables interceptor here is a stand-in that answers `conntrack_hold_needed` and `drop_conntrack_hold`
from a script: what the kernel answers is covered by tests/root/test_iptables_conntrack.py; this checks the
agent asks again, asks without its core lock while the hold is needed, stops asking once the hold is gone or
the pod is back in iptables mode or deleted, and bounds a tick's work.
"""

from __future__ import annotations

import threading

import pytest

from meshcni.agent import core as agent_core
from meshcni.agent.core import AgentCore
from meshcni.agent.registry import PodRecord, Registry
from meshcni.config import Mode
from meshcni.sys.errors import SysError


class ScriptedIptables:
    """Answers whether each pod's hold can go from a list (the last answer repeats), one answer per question:
    `drop_conntrack_hold` drops when the answer is yes, `conntrack_hold_needed` says no then. It records
    which questions came with the agent's core lock held."""

    def __init__(self, answers: dict[str, list[bool]]):
        self.answers = answers
        self.asked: list[str] = []  # drop_conntrack_hold, pod by pod
        self.checked: list[str] = []  # conntrack_hold_needed, pod by pod
        self.checked_under_lock = 0
        self.released: list[str] = []
        self.core: AgentCore | None = None
        self.during_check = None  # called inside conntrack_hold_needed, as a switch racing the check would

    def release(self, pod) -> bool:
        """As the real one: the rules go, then the hold if it can (one scripted answer)."""
        self.released.append(pod.key)
        return self.drop_conntrack_hold(pod)

    def capture(self, pod) -> None:  # re-adopting a pod in iptables mode after an agent restart
        pass

    def drop_conntrack_hold(self, pod) -> bool:
        self.asked.append(pod.key)
        return self._answer(pod)

    def conntrack_hold_needed(self, pod) -> bool:
        self.checked.append(pod.key)
        if self.core is not None and _held_elsewhere(self.core.lock):
            self.checked_under_lock += 1
        if self.during_check is not None:
            self.during_check(pod)
        return not self._answer(pod)

    def _answer(self, pod) -> bool:
        script = self.answers[pod.key]
        return script.pop(0) if len(script) > 1 else script[0]


def _held_elsewhere(lock) -> bool:
    """Whether `lock` is held, seen from another thread (an RLock is re-entrant for its own)."""
    got: list[bool] = []

    def probe():
        got.append(lock.acquire(blocking=False))
        if got[0]:
            lock.release()

    thread = threading.Thread(target=probe)
    thread.start()
    thread.join()
    return not got[0]


@pytest.fixture
def make_core(tmp_path, monkeypatch):
    monkeypatch.setattr(agent_core, "CONNTRACK_RETRY_S", 0.0)  # every tick is due: the test counts ticks

    def make(answers: dict[str, list[bool]], mode: str = "ebpf"):
        registry = Registry(tmp_path)
        registry.load()
        for i, cid in enumerate(answers):
            registry.put(PodRecord(container_id=cid, netns=f"/var/run/netns/p{i}", ips=[f"10.0.0.{i + 2}"],
                                   pod_name=cid, pod_namespace="default", config={"mode": mode},
                                   mode=mode, phase="captured"))
        iptables = ScriptedIptables(answers)
        core = AgentCore(registry, {Mode.IPTABLES: iptables})
        iptables.core = core
        return core, iptables

    return make


def leave_iptables(core: AgentCore, cid: str) -> None:
    assert core._release(core.registry.get(cid), Mode.IPTABLES) == []


def test_the_hold_is_retried_until_the_last_redirected_connection_ends(make_core):
    core, iptables = make_core({"c-a": [False, False, True]})
    leave_iptables(core, "c-a")  # release itself asks first: still held
    assert iptables.released == ["c-a"]
    assert [core.drop_conntrack_holds() for _ in range(3)] == [0, 1, 0]
    # Each due tick checks first, without the core lock; only the check that says the hold can go is followed
    # by the drop (which checks again, under the lock). Settled: never asked again.
    assert iptables.checked == ["c-a"] * 2 and iptables.checked_under_lock == 0
    assert iptables.asked == ["c-a"] * 2  # release's own drop, then the second tick's


def test_a_check_that_fails_keeps_the_hold_and_asks_again(make_core):
    core, iptables = make_core({"c-a": [False, True]})
    leave_iptables(core, "c-a")

    def tool_fails(pod):  # e.g. conntrack or iptables-save timing out in the pod netns
        raise SysError("conntrack -L timed out")

    iptables.during_check = tool_fails
    assert core.drop_conntrack_holds() == 0
    assert iptables.asked == ["c-a"]  # no drop after a failed check
    iptables.during_check = None
    assert core.drop_conntrack_holds() == 1  # still scheduled: the next tick's check answers


def test_a_pod_switched_back_to_iptables_while_its_hold_was_checked_keeps_it(make_core):
    core, iptables = make_core({"c-a": [False, True]})
    leave_iptables(core, "c-a")

    def switch_back(pod):  # what SetMode does meanwhile, holding the lock the check does not hold
        with core.lock:
            core.registry.get("c-a").mode = Mode.IPTABLES.value

    iptables.during_check = switch_back
    assert core.drop_conntrack_holds() == 0
    assert iptables.asked == ["c-a"]  # release's own drop only: the hold belongs to the new capture
    iptables.during_check = None
    assert core.drop_conntrack_holds() == 0 and iptables.checked == ["c-a"]  # and it is off the schedule


def test_a_hold_release_dropped_itself_is_never_asked_about_again(make_core):
    core, iptables = make_core({"c-idle": [True]})
    leave_iptables(core, "c-idle")
    assert [core.drop_conntrack_holds() for _ in range(2)] == [0, 0]
    assert iptables.asked == ["c-idle"]  # only release's own check


def test_a_pod_back_in_iptables_mode_or_deleted_is_no_longer_asked_about(make_core):
    core, iptables = make_core({"c-back": [False], "c-gone": [False]})
    leave_iptables(core, "c-back")
    leave_iptables(core, "c-gone")
    core.registry.get("c-back").mode = Mode.IPTABLES.value  # its hold belongs to the new capture
    core.registry.remove("c-gone")
    assert core.drop_conntrack_holds() == 0
    assert core.drop_conntrack_holds() == 0
    assert iptables.asked == ["c-back", "c-gone"]  # by their own release only


def test_one_tick_asks_about_a_bounded_number_of_pods(make_core):
    pods = {f"c-{i}": [False, True] for i in range(agent_core.CONNTRACK_PER_TICK + 3)}
    core, iptables = make_core(pods)
    for cid in pods:
        leave_iptables(core, cid)  # each still held when it leaves
    assert core.drop_conntrack_holds() == agent_core.CONNTRACK_PER_TICK
    assert core.drop_conntrack_holds() == 3
    assert sorted(iptables.asked) == sorted(list(pods) * 2)


def test_leaving_another_mode_schedules_nothing(make_core):
    core, iptables = make_core({"c-a": [False]})
    core.interceptors[Mode.EBPF] = iptables  # any interceptor: only leaving iptables keeps conntrack on
    assert core._release(core.registry.get("c-a"), Mode.EBPF) == []
    assert core.drop_conntrack_holds() == 0 and iptables.asked == ["c-a"]  # its release's own check only


def test_a_restarted_agent_looks_again_at_pods_outside_iptables_mode(make_core, monkeypatch, tmp_path):
    # The first agent moved a pod from iptables to off with a redirected connection open, then died before
    # its tick saw the connection end: the schedule was in its memory, the hold is in the pod netns.
    core, iptables = make_core({"c-off": [False, False, True]}, mode="off")
    leave_iptables(core, "c-off")
    monkeypatch.setattr(agent_core.netns_sys, "check_netns", lambda path: None)  # the netns paths are made up
    restarted = AgentCore(Registry(tmp_path), {Mode.IPTABLES: iptables}, node_mode=Mode.OFF)
    assert restarted.recover()["readopted"] == 1
    assert [restarted.drop_conntrack_holds() for _ in range(3)] == [0, 1, 0]
    assert iptables.checked == ["c-off"] * 2  # the restarted agent's first two ticks
    assert iptables.asked == ["c-off"] * 2  # the first agent's release, then the drop of the second tick


def test_a_restarted_agent_leaves_the_hold_of_a_pod_still_in_iptables_mode_alone(make_core, monkeypatch,
                                                                                  tmp_path):
    core, iptables = make_core({"c-ipt": [True]}, mode="iptables")
    monkeypatch.setattr(agent_core.netns_sys, "check_netns", lambda path: None)
    restarted = AgentCore(Registry(tmp_path), {Mode.IPTABLES: iptables}, node_mode=Mode.IPTABLES)
    assert restarted.recover()["readopted"] == 1
    assert restarted.drop_conntrack_holds() == 0 and iptables.asked == []
