"""Root tests: the datapath's connection events, from the kernel's ring buffer to `meshcni events`.

A lab enrolled straight into the datapath has the test as the ring's only reader: one request makes exactly
the four decisions of its path (the app's connect captured, the two sidecars' own connects bypassed as the
proxy's, the SYN to the peer steered), bypasses name their reason, and nothing is written while nobody
watches. A lab with an agent serves the same events over gRPC, filtered by pod, and through the CLI.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from meshcni.datapath import layout as L
from meshcni.lab import lab as lab_core
from meshcni.lab import traffic
from meshcni.lab.state import LAB_NAMESPACE
from meshcni.sys import bpf, ringbuf
from tests.root.lab_fixture import captured_lab

pytestmark = pytest.mark.root

APP_UID, PROXY_UID = 65534, 1337


@pytest.fixture(scope="module")
def lab():
    with captured_lab(f"t-events-{os.getpid() % 100000}", agent=False) as state:
        yield state


def _slots(state) -> dict[int, str]:
    dp = lab_core.datapath(state)
    try:
        return {dp.slot_of(lab_core.pod_net(p)): p.name for p in state.pods}
    finally:
        dp.close()


def _watched(state, action) -> list[tuple]:
    """(pod, kind, reason, event) of every event `action` makes, read by a tap opened around it."""
    from meshcni.datapath.events import EventTap

    slots = _slots(state)
    with EventTap(state.bpf_pin_dir) as tap:
        action()
        found, empty_reads = [], 0
        while empty_reads < 3:  # the last decision is taken before `action` returns; three empty reads end it
            batch = tap.read(timeout=0.1)
            empty_reads = 0 if batch else empty_reads + 1
            found += batch
        assert tap.lost() == 0
    return [(slots.get(e.slot), e.kind, e.reason, e) for e in found]


def test_a_request_makes_exactly_the_decisions_of_its_path(lab):
    a, b = lab.pods
    seen = _watched(lab, lambda: traffic.request(lab, a, b.ip, 80, "/"))
    assert sorted((pod, kind, reason) for pod, kind, reason, _ in seen) == [
        (a.name, "outbound_bypassed", "proxy"),  # a's sidecar dials B:80 itself
        (a.name, "outbound_captured", ""),  # the app's connect()
        (b.name, "inbound_steered", ""),  # the SYN from a's sidecar, to b's inbound listener
        (b.name, "outbound_bypassed", "proxy"),  # b's sidecar passes the connection on to its app
    ]
    captured = next(e for pod, kind, _, e in seen if kind == "outbound_captured")
    assert (captured.dst, captured.dport, captured.uid, captured.family) == (b.ip, 80, APP_UID, 4)
    assert captured.pid > 0 and captured.src == ""
    steered = next(e for _, kind, _, e in seen if kind == "inbound_steered")
    assert (steered.src, steered.dst, steered.dport, steered.pid, steered.uid) == (a.ip, b.ip, 80, 0, 0)
    assert steered.sport > 0
    assert {e.comm for _, kind, _, e in seen if kind == "outbound_bypassed"} == {"haproxy"}
    assert {e.uid for _, kind, _, e in seen if kind == "outbound_bypassed"} == {PROXY_UID}


def test_bypasses_name_their_reason(lab):
    a, b = lab.pods
    seen = _watched(lab, lambda: traffic.request(lab, a, "127.0.0.1", 80, "/"))
    assert [(pod, kind, reason) for pod, kind, reason, _ in seen] == [(a.name, "outbound_bypassed", "loopback")]

    # b's explicit listener port is excluded from capture both ways in the lab's policy
    seen = _watched(lab, lambda: traffic.request(lab, a, b.ip, 15101, "/"))
    kinds = {(pod, kind, reason) for pod, kind, reason, _ in seen}
    assert (a.name, "outbound_bypassed", "policy") in kinds
    assert (b.name, "inbound_bypassed", "policy") in kinds
    assert not [k for k in kinds if k[1] in ("outbound_captured", "inbound_steered")]
    app = next(e for pod, _, reason, e in seen if pod == a.name and reason == "policy" and e.uid == APP_UID)
    assert (app.dst, app.dport) == (b.ip, 15101)


def test_nothing_is_written_while_nobody_watches(lab):
    a, b = lab.pods
    ring_fd = bpf.obj_get(str(Path(lab.bpf_pin_dir) / "mcni_events_v1"))
    ctl = bpf.RawMap(bpf.obj_get(str(Path(lab.bpf_pin_dir) / "mcni_events_ctl_v1")), "ctl", L.U32, L.U64)
    try:
        _watched(lab, lambda: None)  # a reader came and went
        assert ctl.lookup(L.U32(L.EV_CTL_ON)).value == 0
        before = ringbuf.positions(ring_fd)[1]
        assert traffic.request(lab, a, b.ip, 80, "/")["status"] == 200
        assert ringbuf.positions(ring_fd)[1] == before
    finally:
        ctl.close()
        os.close(ring_fd)


# --- through the agent ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def agent_lab():
    with captured_lab(f"t-evagent-{os.getpid() % 100000}") as state:
        yield state


def _socket(state) -> str:
    from meshcni.lab import agent as lab_agent

    return str(lab_agent.paths(state)["socket"])


def test_watch_events_streams_one_pods_decisions_and_switches_events_off_after(agent_lab):
    from meshcni.agent.client import AgentClient

    a, b = agent_lab.pods
    got: list[dict] = []
    with AgentClient(_socket(agent_lab)) as client:
        stream = client.watch_events(f"{LAB_NAMESPACE}/{a.name}", duration=60)  # returns once the agent watches
        for _ in range(3):
            assert traffic.request(agent_lab, a, b.ip, 80, "/")["status"] == 200
        for event in stream:  # all were taken before the requests returned; read them, then leave
            got.append(event)
            if len(got) == 6:
                break
    # each request: a's app captured, a's sidecar bypassed as the proxy; b's two decisions are filtered out
    assert sorted((e["kind"], e["reason"]) for e in got) == [("outbound_bypassed", "proxy")] * 3 + \
        [("outbound_captured", "")] * 3
    assert {(e["pod_namespace"], e["pod_name"]) for e in got} == {(LAB_NAMESPACE, a.name)}
    assert all(e["dropped"] == 0 for e in got)
    captured = [e for e in got if e["kind"] == "outbound_captured"]
    assert {(e["dst"], e["dport"], e["uid"]) for e in captured} == {(b.ip, 80, APP_UID)}

    ctl = bpf.RawMap(bpf.obj_get(str(Path(agent_lab.bpf_pin_dir) / "mcni_events_ctl_v1")), "ctl", L.U32, L.U64)
    try:
        for _ in range(100):  # the agent turns events off when it sees the stream end
            if ctl.lookup(L.U32(L.EV_CTL_ON)).value == 0:
                break
            time.sleep(0.05)
        assert ctl.lookup(L.U32(L.EV_CTL_ON)).value == 0
    finally:
        ctl.close()


def test_cli_prints_events_as_json_lines(agent_lab):
    a, b = agent_lab.pods
    cli = subprocess.Popen([sys.executable, "-m", "meshcni", "events", f"{LAB_NAMESPACE}/{b.name}", "--count", "2",
                            "--duration", "60", "-o", "json", "--socket", _socket(agent_lab)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(200):
            if cli.poll() is not None:
                break
            traffic.request(agent_lab, a, b.ip, 80, "/")
        out, err = cli.communicate(timeout=30)
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.communicate()
    assert cli.returncode == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    assert len(events) == 2
    assert {e["pod_name"] for e in events} == {b.name}
    assert {e["kind"] for e in events} <= {"inbound_steered", "outbound_bypassed"}
    for e in events:
        if e["kind"] == "inbound_steered":
            assert (e["src"], e["dst"], e["dport"]) == (a.ip, b.ip, 80)


def test_cli_names_an_unknown_pod(agent_lab):
    proc = subprocess.run([sys.executable, "-m", "meshcni", "events", "no-such-pod", "--count", "1", "-o", "json",
                           "--socket", _socket(agent_lab)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert json.loads(proc.stdout)["error"]["kind"] == "not_found"


def test_the_demo_shows_the_four_decisions_of_its_first_request(agent_lab):
    from meshcni.lab import demo

    data = demo.exercise(agent_lab)
    assert data["ok"] is True, [c["problems"] for c in data["checks"] if not c["ok"]]
    (check,) = [c for c in data["checks"] if "events" in c]
    assert check["ok"] and len(check["events"]) == 4
    assert "outbound_captured" in demo.render_demo({**data, "kept": True})
