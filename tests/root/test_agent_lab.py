"""The agent with real pods in the lab: a kill -9 and restart under load loses no request, leaves the
attachments as they were and the counters carrying on; a live mode switch takes effect for new connections."""

from __future__ import annotations

import json
import subprocess
import time

import pytest

pytestmark = pytest.mark.root

bcc = pytest.importorskip("bcc")

from meshcni.agent.client import AgentClient  # noqa: E402
from meshcni.lab import agent as lab_agent  # noqa: E402
from meshcni.lab import lab as lab_core  # noqa: E402
from meshcni.lab import haproxy, traffic  # noqa: E402
from meshcni.lab import pod as podproc  # noqa: E402
from meshcni.sys import iptables as ipt  # noqa: E402


@pytest.fixture
def lab(unique_id):
    name = f"t-{unique_id}"
    try:
        yield lab_core.up(lab_core.LabOptions(name=name))
    finally:
        lab_core.down(name)


def cgroup_programs(state) -> list[str]:
    out = subprocess.run(["bpftool", "cgroup", "show", state.cgroup, "-j"], capture_output=True, text=True, check=True)
    return sorted(p["name"] for p in json.loads(out.stdout))


def pod_counters(client: AgentClient) -> dict[str, dict[str, int]]:
    return {p["pod_name"]: p["counters"] for p in client.counters()}


def wait_for_requests(load_min: int, state, a, b) -> None:
    """Let the load run until the source pod's proxy has served `load_min` more captured connections."""
    def served() -> int:
        return traffic.proxy_stats(state)[a.name]["frontends"]["outbound"]

    start = served()
    deadline = time.monotonic() + 60
    while served() - start < load_min and time.monotonic() < deadline:
        time.sleep(0.05)


def test_agent_kill9_under_load_loses_no_request(lab):
    a, b = lab.pods
    sock = str(lab_agent.paths(lab)["socket"])
    with AgentClient(sock) as c:
        before_counters = pod_counters(c)
        before_status = c.status()
    before_programs = cgroup_programs(lab)
    load = traffic.BackgroundLoad(lab, a, b.ip, 80)
    try:
        wait_for_requests(50, lab, a, b)
        lab_agent.restart(lab, kill=True)  # SIGKILL, then a fresh agent that re-adopts everything
        with AgentClient(sock) as c:
            during = c.list_pods()
        wait_for_requests(50, lab, a, b)
        report = load.stop()
    finally:
        load.kill()
    assert report["failed"] == 0, report["errors"]
    assert report["ok"] >= 100
    assert set(report["via"]) == {f"{b.name}-inbound,{a.name}-outbound"}  # every request went through both proxies
    assert [p["listener"] for p in during] == ["registered", "registered"]
    assert cgroup_programs(lab) == before_programs  # re-adopted in place: no duplicate, no gap
    with AgentClient(sock) as c:
        after_status = c.status()
        after_counters = pod_counters(c)
    assert after_status["attached_programs"] == before_status["attached_programs"]
    # the counters live in pinned maps, so they carried on across the restart
    assert after_counters[a.name]["outbound_captured"] >= before_counters[a.name]["outbound_captured"] + report["ok"]
    assert after_counters[b.name]["inbound_steered"] >= before_counters[b.name]["inbound_steered"] + report["ok"]


def test_each_live_mode_switch_takes_effect_for_new_connections(lab):
    """Switch both pods back and forth: after each switch a new connection goes through both proxies and
    moves the pod's counters by one, read from the eBPF maps or the iptables rules as its mode says.
    (Switches under load: the test below.)"""
    a, b = lab.pods
    sock = str(lab_agent.paths(lab)["socket"])
    with AgentClient(sock) as c:
        for wanted in ("iptables", "ebpf", "iptables", "ebpf"):
            for pod in (a, b):
                assert c.set_mode(wanted, f"lab/{pod.name}")["changed"][0]["mode"] == wanted
            assert [p["mode"] for p in c.list_pods()] == [wanted, wanted]
            before = pod_counters(c)[a.name].get("outbound_captured", 0)
            report = traffic.request(lab, a, b.ip, 80)
            assert report["status"] == 200
            assert traffic.proxy_headers(report) == [f"{b.name}-inbound", f"{a.name}-outbound"]
            after = pod_counters(c)[a.name]
            assert after["outbound_captured"] - before == 1
            # the eBPF datapath's own counters (splicing) exist only where it captures
            assert ("msgs_spliced" in after) == (wanted == "ebpf")
        # back to annotations and the node default
        assert c.set_mode("", f"lab/{a.name}")["changed"][0]["mode_source"] == "node"


def test_lab_status_checks_each_pod_in_its_own_mode(lab):
    """`lab status` asks the agent: a pod in iptables mode is checked against its rules, not reported as
    missing from the eBPF datapath, and a rule deleted behind the agent's back shows up for that pod only."""
    a, b = lab.pods
    with AgentClient(str(lab_agent.paths(lab)["socket"])) as c:
        assert c.set_mode("iptables", f"lab/{a.name}")["changed"][0]["mode"] == "iptables"
        st = lab_core.status(lab)
        assert [(p["capture_mode"], p["capture_problems"]) for p in st["pods"]] == [("iptables", []), ("ebpf", [])]
        assert st["healthy"] is True

        backend = ipt.detect_backend()
        ipt.restore(a.netns, ipt.Family.IPV4, backend, "*nat\n-F ISTIO_OUTPUT\nCOMMIT\n")
        st = lab_core.status(lab)
        problems = {p["name"]: p["capture_problems"] for p in st["pods"]}
        assert problems[b.name] == []
        assert any("ISTIO_OUTPUT" in x for x in problems[a.name]), problems
        assert st["healthy"] is False

        assert c.set_mode("ebpf", f"lab/{a.name}")["changed"][0]["mode"] == "ebpf"
        st = lab_core.status(lab)
        assert [(p["capture_mode"], p["capture_problems"]) for p in st["pods"]] == [("ebpf", []), ("ebpf", [])]


def test_demo_on_a_lab_in_iptables_mode_passes_and_counts_what_the_proxies_served(unique_id):
    """`meshcni lab demo --mode iptables`: every check passes, and each pod's counters (the rules' packet
    counts, read through the agent) equal the sessions its captured listeners took."""
    from meshcni.lab import demo

    name = f"t-{unique_id}"
    try:
        state = lab_core.up(lab_core.LabOptions(name=name, agent_mode="iptables"))
        data = demo.exercise(state)
    finally:
        lab_core.down(name)
    assert data["ok"] is True, [c["problems"] for c in data["checks"] if not c["ok"]]
    assert [p["capture_mode"] for p in data["lab"]["pods"]] == ["iptables", "iptables"]
    for pod, counts in data["capture_counters"].items():
        served = data["proxy_stats"][pod]["frontends"]
        assert (counts["outbound_captured"], counts["inbound_steered"]) == (served["outbound"], served["inbound"])
        assert counts["outbound_captured"] + counts["inbound_steered"] > 0


TOGGLES = 40


def test_live_mode_toggles_under_load_lose_no_request_and_capture_every_one(lab):
    """Flip both pods between ebpf and iptables TOGGLES times under a connection-per-request load: every
    request succeeds and every one goes through both proxies. What used to break it (see the iptables
    module's docstring): conntrack in a pod netns stopped when the REDIRECT rules went, freezing entries that
    later connections of the same 4-tuple matched, and adopted eBPF-era connections mid-stream."""
    a, b = lab.pods
    load = traffic.BackgroundLoad(lab, a, b.ip, 80)
    try:
        with AgentClient(str(lab_agent.paths(lab)["socket"])) as c:
            for i in range(TOGGLES):
                mode = "iptables" if i % 2 == 0 else "ebpf"
                for pod in (a, b):
                    assert c.set_mode(mode, f"lab/{pod.name}")["changed"][0]["mode"] == mode
                wait_for_requests(20, lab, a, b)  # some load through each state, however fast the machine is
        report = load.stop()
    finally:
        load.kill()
    incidents = {kind: samples for kind, samples in report["samples"].items()
                 if kind != f"via {b.name}-inbound,{a.name}-outbound"}
    assert report["failed"] == 0, incidents
    assert report["via"] == {f"{b.name}-inbound,{a.name}-outbound": report["ok"]}, incidents  # none half-captured
    assert report["ok"] >= TOGGLES * 20
    # and not one request had to be retried by pod a's sidecar (lab RETRIES) to get there
    assert haproxy.retries(podproc.proxy_socket(lab, a)) == 0
