"""sk_msg splicing ON, through real HAProxy sidecars: every byte arrives, splicing really happened, and the
SOCKHASH empties again when the connections close.

A two-pod lab (meshcni.lab: bridge CNI, HAProxy sidecars, an echo app on port 9000) is brought up with eBPF
capture enrolled straight into the datapath, then both pods are re-enrolled with `EbpfDatapath.splice` set,
which turns MCNI_F_SPLICE on. Paths exercised, 1 MiB each way per run, checked by sha256 of what came back:
- same pod: app -> its own outbound proxy (127.0.0.1:15001) -> the same pod's inbound proxy -> app, so the
  app<->proxy loopback pairs, the proxy's 127.0.0.6 passthrough and a same-netns pod-IP pair are spliced;
- pod to pod: app A -> proxy A -> proxy B -> app B, adding the proxy<->proxy pair across two namespaces.
The clients are the lab's (socket timeouts, so they retry EAGAIN): see "Splicing" in docs/architecture.md for
why a blocking reader of a spliced socket can see EAGAIN on this kernel and why splicing stays opt-in.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from meshcni.lab import haproxy, traffic
from meshcni.lab import lab as lab_core
from meshcni.lab.state import LabError

pytestmark = pytest.mark.root
MIB = 1 << 20
RUNS = 20
SOCKHASH = "mcni_socks_v1"

try:
    import bcc  # noqa: F401

    HAVE_BCC = True
except ImportError:
    HAVE_BCC = False


@pytest.fixture(scope="module")
def spliced_lab():
    if not HAVE_BCC:
        pytest.skip("bcc (python3-bpfcc) is not installed")
    name = f"t-splice-{os.getpid() % 100000}"
    opts = lab_core.LabOptions(name=name, capture=True)
    if hasattr(opts, "agent"):
        opts.agent = False  # enrol straight into the datapath, whose instance this test then switches
    try:
        state = lab_core.up(opts)
    except LabError:
        lab_core.down(name)
        raise
    dp = None
    try:
        dp = lab_core.datapath(state)
        dp.splice = True
        for pod in state.pods:
            dp.capture(lab_core.pod_net(pod))  # re-enrolment keeps the slot and rewrites the flags
        assert all(dp.verify(lab_core.pod_net(pod)) == [] for pod in state.pods)
        yield state, dp
    finally:
        pin_dir = state.bpf_pin_dir
        if dp is not None:
            dp.close()
        lab_core.down(name)
        assert not Path(pin_dir).exists(), f"{pin_dir} left behind"


def _spliced(dp, state) -> tuple[int, int]:
    totals = [dp.counters(lab_core.pod_net(pod)) for pod in state.pods]
    return sum(c["msgs_spliced"] for c in totals), sum(c["bytes_spliced"] for c in totals)


def _echo_runs(state, src, dst) -> list[str]:
    """RUNS echoes of 1 MiB from `src` to `dst`'s echo app; returns a description of every damaged run."""
    damaged = []
    for i in range(RUNS):
        got = traffic.echo(state, src, dst.ip, haproxy.ECHO_PORT, MIB)
        if "error" in got or (got["received_bytes"], got["received_sha256"]) != (MIB, got["sent_sha256"]):
            damaged.append(f"run {i}: {got}")
    return damaged


def _wait_sockhash(dp, want: int, seconds: float = 10.0) -> int:
    """Closing sockets leave the SOCKHASH as the kernel tears them down; wait (bounded) for the count."""
    deadline = time.monotonic() + seconds
    while (n := dp.map_entries(SOCKHASH)) != want and time.monotonic() < deadline:
        time.sleep(0.1)
    return n


def test_same_pod_app_and_proxy_pairs_lose_no_byte_when_spliced(spliced_lab):
    state, dp = spliced_lab
    a = state.pods[0]
    baseline = _wait_sockhash(dp, 0)
    msgs, nbytes = _spliced(dp, state)
    errors = sum(dp.counters(lab_core.pod_net(p))["errors"] for p in state.pods)

    assert _echo_runs(state, a, a) == []

    msgs_after, bytes_after = _spliced(dp, state)
    assert msgs_after > msgs and bytes_after > nbytes, "nothing was spliced: the test proved nothing"
    assert sum(dp.counters(lab_core.pod_net(p))["errors"] for p in state.pods) == errors
    assert _wait_sockhash(dp, baseline) == baseline


def test_pod_to_pod_through_two_haproxy_sidecars_loses_no_byte_when_spliced(spliced_lab):
    state, dp = spliced_lab
    a, b = state.pods
    baseline = _wait_sockhash(dp, 0)
    before = {p.name: dp.counters(lab_core.pod_net(p)) for p in state.pods}

    assert _echo_runs(state, a, b) == []
    assert _echo_runs(state, b, a) == []

    after = {p.name: dp.counters(lab_core.pod_net(p)) for p in state.pods}
    for pod in (a, b):  # each pod's app<->proxy hops and its proxy's sends to the other proxy
        assert after[pod.name]["bytes_spliced"] > before[pod.name]["bytes_spliced"], pod.name
        assert after[pod.name]["errors"] == before[pod.name]["errors"], pod.name
    assert _wait_sockhash(dp, baseline) == baseline


def test_sockhash_is_empty_once_the_lab_is_idle(spliced_lab):
    """Every spliced socket leaves the map when it closes: nothing accumulates across the runs above."""
    _, dp = spliced_lab
    assert _wait_sockhash(dp, 0) == 0
