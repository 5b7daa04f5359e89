"""Root tests: a lab with eBPF capture sends pod-to-pod traffic through both sidecars, keeps bytes exact,
leaves the proxies' own and the host's connections alone, and `down` removes the BPF pins too.

Facts checked are what the client saw (which pod answered, from which peer address, which proxies added a
header) and counts (HAProxy session totals, datapath counters), as deltas so test order does not matter.
"""

from __future__ import annotations

import http.client
import os
from pathlib import Path

import pytest

from meshcni.lab import haproxy, traffic
from meshcni.lab import lab as lab_core
from meshcni.lab import pod as podproc
from meshcni.lab.payload import digest, payload
from meshcni.lab.state import LabError
from tests.root.lab_fixture import HAVE_BCC, captured_lab

pytestmark = pytest.mark.root
MIB = 1 << 20

@pytest.fixture(scope="module")
def lab():
    with captured_lab(f"t-capture-{os.getpid() % 100000}") as state:
        yield state


def _frontends(state, pod) -> dict[str, int]:
    return haproxy.stats(podproc.proxy_socket(state, pod))["frontends"]


def _counters(state) -> dict[str, dict[str, int]]:
    return traffic.capture_counters(state)


def test_status_reports_both_pods_fully_captured(lab):
    st = lab_core.status(lab)
    assert st["healthy"] is True
    assert [(p["captured"], p["capture_problems"]) for p in st["pods"]] == [(True, []), (True, [])]


def test_pod_to_pod_http_goes_through_source_outbound_and_destination_inbound(lab):
    a, b = lab.pods
    for src, dst in ((a, b), (b, a)):
        fs_src, fs_dst, cs = _frontends(lab, src), _frontends(lab, dst), _counters(lab)
        rep = traffic.request(lab, src, dst.ip, 80, "/")
        assert rep["status"] == 200
        # The app still believes it talked to the pod IP; the destination nginx sees the inbound proxy's
        # passthrough source, and both sidecars stamped the response.
        assert rep["body"] == f"pod={dst.name} ip={dst.ip} peer=127.0.0.6\n"
        assert traffic.proxy_headers(rep) == [f"{dst.name}-inbound", f"{src.name}-outbound"]
        assert _frontends(lab, src)["outbound"] - fs_src["outbound"] == 1
        assert _frontends(lab, dst)["inbound"] - fs_dst["inbound"] == 1
        after = _counters(lab)
        assert after[src.name]["outbound_captured"] - cs[src.name]["outbound_captured"] == 1
        assert after[dst.name]["inbound_steered"] - cs[dst.name]["inbound_steered"] == 1


def test_captured_bulk_transfers_are_byte_exact(lab):
    a, b = lab.pods
    got = traffic.request(lab, a, b.ip, 80, f"/bytes/{MIB}")
    assert (got["body_bytes"], got["body_sha256"]) == (MIB, digest(payload(MIB)))
    assert traffic.proxy_headers(got) == [f"{b.name}-inbound", f"{a.name}-outbound"]
    posted = traffic.request(lab, a, b.ip, 80, "/upload", method="POST", body_bytes=MIB)
    assert posted["body"] == f"pod={b.name} received={MIB}\n"
    before = _frontends(lab, a)["outbound"]
    echoed = traffic.echo(lab, a, b.ip, haproxy.ECHO_PORT, MIB)
    assert echoed["received_bytes"] == MIB and echoed["received_sha256"] == echoed["sent_sha256"]
    assert _frontends(lab, a)["outbound"] - before == 1  # the raw TCP stream went through the sidecar too


def test_explicit_proxy_path_is_not_captured_again(lab):
    a, b = lab.pods
    fa, fb = _frontends(lab, a), _frontends(lab, b)
    rep = traffic.request(lab, a, "127.0.0.1", haproxy.EXPLICIT_HTTP_OUT, "/")
    assert traffic.proxy_headers(rep) == [f"{b.name}-explicit-in", f"{a.name}-explicit-out"]
    after_a, after_b = _frontends(lab, a), _frontends(lab, b)
    # The proxy's own connection (uid 1337) to B:15106 and the excluded explicit ports stay uncaptured.
    assert after_a["outbound"] == fa["outbound"] and after_b["inbound"] == fb["inbound"]
    assert after_a["explicit_http_out"] - fa["explicit_http_out"] == 1
    assert after_b["explicit_http_in"] - fb["explicit_http_in"] == 1


def test_host_process_outside_the_lab_cgroup_is_not_captured_outbound(lab):
    """This test process lives in the host netns and cgroup: its connect() must not be redirected; only the
    destination pod's inbound capture (which belongs to that pod's netns) handles the connection."""
    _, b = lab.pods
    conn = http.client.HTTPConnection(b.ip, 80, timeout=10)
    try:
        conn.request("GET", "/")
        resp = conn.getresponse()
        body = resp.read().decode()
        headers = [v for k, v in resp.getheaders() if k.lower() == haproxy.PROXY_HEADER]
    finally:
        conn.close()
    assert body.startswith(f"pod={b.name} ")
    assert headers == [f"{b.name}-inbound"]


def test_failed_capture_rolls_back_pins_processes_and_netns(unique_id, monkeypatch):
    if not HAVE_BCC:
        pytest.skip("bcc (python3-bpfcc) is not installed")
    from meshcni.datapath.ebpf import EbpfDatapath

    name = f"t-{unique_id}"
    real_capture = EbpfDatapath.capture
    enrolled: list[str] = []

    def capture_then_fail(self, pod, *args, **kwargs):
        if enrolled:
            raise LabError("injected capture failure for the second pod")
        enrolled.append(pod.name)
        return real_capture(self, pod, *args, **kwargs)

    monkeypatch.setattr(EbpfDatapath, "capture", capture_then_fail)
    try:
        with pytest.raises(LabError, match="injected capture failure.*rolled back"):
            lab_core.up(lab_core.LabOptions(name=name, capture=True, agent=False))
        # Checked before the safety net below, which would otherwise hide an incomplete rollback.
        assert enrolled == ["a"]
        assert not Path(f"/sys/fs/bpf/meshcni-lab-{name}").exists()
        assert not any(ns.startswith(f"mcni-lab-{name}-") for ns in lab_core.host.netns_names())
        assert not Path(f"/var/run/meshcni/lab/{name}").exists()
    finally:
        lab_core.down(name)


def test_agent_refusing_a_pod_rolls_the_whole_lab_back(unique_id):
    """Through the agent: a pod whose annotation is malformed is refused at CNI ADD, and `up` undoes it all."""
    if not HAVE_BCC:
        pytest.skip("bcc (python3-bpfcc) is not installed")
    name = f"t-{unique_id}"
    try:
        with pytest.raises(LabError, match="meshcni.io/mode.*bogus") as info:
            lab_core.up(lab_core.LabOptions(name=name, annotations={"b": {"meshcni.io/mode": "bogus"}}))
        assert "rolled back" in str(info.value)
        assert not Path(f"/sys/fs/bpf/meshcni-lab-{name}").exists()
        assert not any(ns.startswith(f"mcni-lab-{name}-") for ns in lab_core.host.netns_names())
        assert not Path(f"/var/run/meshcni/lab/{name}").exists()
    finally:
        lab_core.down(name)
