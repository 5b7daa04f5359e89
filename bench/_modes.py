"""The five paths the throughput bench compares (and two eBPF variants: without splicing, and with the app
splicing opt-in), as backends with the same verbs (enter, url, check, leave).

- `direct`: pod A's client talks to nginx in pod B; nothing is captured and no proxy is crossed.
- `explicit`: no capture; the client targets its own sidecar's explicit listener (127.0.0.1:15101), which
  forwards to pod B's sidecar (15106), which forwards to B's nginx — the cost of two proxy hops alone.
- `explicit-routed`: the same, through listeners (15103/15108) that handle the connection exactly as the
  capture listeners do — TCP mode, HTTP backend by destination port, the app reached from 127.0.0.6 — so
  ebpf/explicit-routed is the cost of the capture mechanism alone.
- `ebpf`: the meshcni eBPF datapath is loaded on the lab's cgroup and both pods are enrolled; the client
  dials B:80, connect4 sends it to A's sidecar (15001), sk_lookup steers the sidecar's connection into B's
  inbound listener (15006).
- `ebpf-nosplice` and `ebpf-splice-app` (for cost_per_request.py): `ebpf` without the proxy <-> proxy
  splicing, and with the pods' app-splicing opt-in as well.
- `iptables`: the same path made by Istio's nat rules (REDIRECT) inside both pods' namespaces.
The lab is created without capture; each mode switches its mechanism on in `enter` and fully off in
`leave` (the eBPF programs are unloaded and unpinned, not just the pods released; the iptables rules and
their conntrack hold are removed), so no mode pays for another's hooks, and `enter` of every mode first
proves that nothing else is still capturing. `enter` also ends the TIME_WAIT sockets earlier runs left in
the pods: under iptables the app's own socket carries the pod-to-pod 4-tuple, so its TIME_WAIT entries
(60 s each, not reusable off loopback) occupy the ephemeral ports the next mode's proxy needs for the same
destination, and connect() then searches the port range on every call. Each run starts from the same
empty port space; what a mode leaves within its own run stays part of its figure. The eBPF mode
records its pin directory and enrolled pods in the lab state before touching them, so `lab down` cleans up
even if the bench dies half-way.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

from meshcni.datapath.ebpf import EbpfDatapath
from meshcni.datapath.interceptor import PodNet
from meshcni.datapath.iptables import CONNTRACK_CHAIN, OUR_CHAINS, IptablesInterceptor
from meshcni.lab import haproxy
from meshcni.lab.lab import pod_net
from meshcni.lab.nginx import APP_PORTS
from meshcni.lab.state import LabState, PodState
from meshcni.sys import iptables as ipt
from meshcni.sys.netns import run_in_netns

from _evidence import CaptureNotVerified, ProxyPath
from _wrk import WrkResult


@dataclass
class Bench:
    """The lab under test and the two pods traffic flows between (src → dst)."""

    state: LabState
    src: PodState
    dst: PodState
    pin_dir: str  # where the eBPF mode pins its programs and maps while it is active
    iptables: IptablesInterceptor = field(default_factory=IptablesInterceptor)
    datapath: EbpfDatapath | None = None  # open only while the eBPF mode is active
    splice: bool = True  # the eBPF mode's sk_msg splicing of proxy <-> proxy pairs (the datapath's default)


def capture_leftovers(b: Bench, *, ebpf: bool = True, iptables: bool = True) -> list[str]:
    """Any capture mechanism still in place in the lab (what an uncaptured mode must not find)."""
    found = []
    if ebpf and Path(b.pin_dir).exists():  # pins or a half-removed pin directory
        found.append(f"eBPF pins at {b.pin_dir}")
    if iptables:
        for pod in b.state.pods:
            table = ipt.save(pod.netns, ipt.Family.IPV4, b.iptables.backend, "nat")
            ours = sorted(set(OUR_CHAINS) & set(table.chains))
            if ours:
                found.append(f"iptables chains {', '.join(ours)} in pod {pod.name}")
            if CONNTRACK_CHAIN in table.chains:  # conntrack would still track every packet in the pod
                found.append(f"the conntrack hold ({CONNTRACK_CHAIN}) in pod {pod.name}")
    return found


# How long Iptables.leave waits for the last redirected connection to end, before and after ending idle ones.
CONNTRACK_SETTLE_S = 10.0


def end_time_wait(b: Bench) -> int:
    """End every TIME_WAIT socket in the lab's pods (sock_diag destroy, `ss -K`); returns how many it ended."""
    ended = 0
    for pod in b.state.pods:
        proc = run_in_netns(pod.netns, ["ss", "-K", "-H", "-t", "state", "time-wait"],
                            capture_output=True, text=True, timeout=60)
        ended += len(proc.stdout.splitlines())
        left = run_in_netns(pod.netns, ["ss", "-H", "-t", "state", "time-wait"],
                            capture_output=True, text=True, timeout=60).stdout.splitlines()
        if left:
            raise CaptureNotVerified(f"{len(left)} TIME_WAIT sockets survived `ss -K` in pod {pod.name} "
                                     f"(this kernel cannot destroy them); runs would not start alike")
    return ended


def end_sidecar_connections(b: Bench) -> int:
    """End the established TCP connections of the lab's pods to or from an app port, or to the pod's capture
    listeners (the proxies' idle pooled connections once a run is over); returns how many sockets were ended."""
    ended = 0
    for pod in b.state.pods:
        config = pod_net(pod).config
        terms = [f"dport = :{p} or sport = :{p}" for p in APP_PORTS]
        terms += [f"sport = :{p}" for p in (config.outbound_port, config.inbound_port)]
        proc = run_in_netns(pod.netns, ["ss", "-K", "-H", "-t", "state", "established",
                                        f"( {' or '.join(terms)} )"],
                            capture_output=True, text=True, timeout=60)
        ended += len(proc.stdout.splitlines())
    return ended


def start_clean(b: Bench, mode: str) -> dict:
    """What every `enter` does first: prove nothing captures, and give the mode an empty port space."""
    left = capture_leftovers(b)
    if left:
        raise CaptureNotVerified(f"mode {mode} must start from an uncaptured lab, but found: {'; '.join(left)}")
    return {"time_wait_ended": end_time_wait(b)}


class Mode:
    """Defaults shared by the four modes: nothing to switch, the pod IP as target."""

    name = ""
    captured_by: str | None = None  # the mechanism this mode measures; None for the uncaptured modes

    def enter(self, b: Bench) -> dict:
        """Switch the mode on; returns facts worth recording (e.g. how long loading took)."""
        return start_clean(b, self.name)

    def leave(self, b: Bench) -> None:
        """Switch the mode off again; the next mode's `enter` checks it really is off."""

    def url(self, b: Bench, path: str) -> str:
        return f"http://{b.dst.ip}:80{path}"

    def proxy_path(self, b: Bench) -> ProxyPath:
        return ProxyPath()

    def counters(self, b: Bench) -> dict:
        """Mechanism counters read around each run (beyond the proxies' own)."""
        return {}

    def check(self, b: Bench, moved: dict, result: WrkResult, close_each: bool, connections: int) -> list[str]:
        """Extra problems a run's mechanism counters show (the proxy path is checked by the caller)."""
        return []


def _captured_path(b: Bench) -> ProxyPath:
    # The outbound/inbound frontends are TCP mode and hand HTTP ports to the *_http backends; they still count
    # the HTTP requests of those streams.
    return ProxyPath(
        listeners={b.src.name: "outbound", b.dst.name: "inbound"},
        allowed_sections={b.src.name: frozenset({"outbound", "outbound_http"}),
                          b.dst.name: frozenset({"inbound", "inbound_http"})},
        fallback_sections={b.src.name: frozenset({"outbound_tcp"}), b.dst.name: frozenset({"inbound_tcp"})},
    )


class Direct(Mode):
    name = "direct"


class Explicit(Mode):
    """The app dials its own sidecar's explicit listener; `out`/`into` name the two frontends it crosses and
    `sections` every proxy section the path may move (anything else moving means traffic went astray)."""

    name = "explicit"
    port = haproxy.EXPLICIT_HTTP_OUT
    out, into = "explicit_http_out", "explicit_http_in"
    sections = ((), ())

    def url(self, b: Bench, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def proxy_path(self, b: Bench) -> ProxyPath:
        out_more, into_more = self.sections
        return ProxyPath(
            listeners={b.src.name: self.out, b.dst.name: self.into},
            allowed_sections={b.src.name: frozenset({self.out, *out_more}),
                              b.dst.name: frozenset({self.into, *into_more})},
        )


class ExplicitRouted(Explicit):
    """`explicit` through the listeners that route like the capture ones: what capture adds over it is the
    mechanism alone (hooks, steering, the original-destination lookup), not HAProxy's port routing."""

    name = "explicit-routed"
    port = haproxy.EXPLICIT_ROUTED_OUT
    out, into = "routed_out", "routed_in"
    sections = (("routed_out_http",), ("routed_in_http",))


class Ebpf(Mode):
    name = "ebpf"
    captured_by = "ebpf"

    def net(self, pod: PodState) -> PodNet:
        """The pod as the datapath enrols, verifies and releases it in this mode (the lab's pod config)."""
        return pod_net(pod)

    def enter(self, b: Bench) -> dict:
        facts = start_clean(b, self.name)
        st = b.state
        st.bpf_pin_dir = b.pin_dir  # recorded first: `lab down` unloads whatever part of this exists
        st.save()
        t0 = time.monotonic()
        b.datapath = EbpfDatapath.load(pin_dir=b.pin_dir, cgroup=st.cgroup)
        load_s = time.monotonic() - t0
        b.datapath.splice = b.splice  # read when a pod is enrolled, so set before capture
        for pod in st.pods:
            pod.captured = True
            st.save()
            b.datapath.capture(self.net(pod))
        problems = {p.name: b.datapath.verify(self.net(p)) for p in st.pods}
        if any(problems.values()):
            raise CaptureNotVerified(f"the eBPF datapath reports incomplete capture: {problems}")
        return {**facts, "bpf_load_s": round(load_s, 3), "splice": bool(b.datapath.splice)}

    def leave(self, b: Bench) -> None:
        st = b.state
        if b.datapath is None:
            return
        dp, b.datapath = b.datapath, None
        try:
            for pod in st.pods:
                if pod.captured:
                    dp.release(self.net(pod))
                    pod.captured = False
                    st.save()
        finally:
            dp.unload()  # detaches every link and removes every pin; closes the maps
        st.bpf_pin_dir = None
        st.save()

    def proxy_path(self, b: Bench) -> ProxyPath:
        return _captured_path(b)

    def counters(self, b: Bench) -> dict:
        if b.datapath is None:
            raise CaptureNotVerified("the eBPF counters were read while the eBPF mode was not active")
        return {p.name: b.datapath.counters(self.net(p)) for p in (b.src, b.dst)}

    def check(self, b: Bench, moved: dict, result: WrkResult, close_each: bool, connections: int) -> list[str]:
        problems = []
        # Keep-alive: each wrk connection is captured once; connection-per-request: every request is a connect.
        want = result.requests if close_each else connections - result.errors.get("connect", 0)
        got = moved.get(b.src.name, {}).get("outbound_captured", 0)
        if got < want:
            problems.append(f"connect4 captured {got} of pod {b.src.name}'s connects, expected at least {want}")
        if moved.get(b.dst.name, {}).get("inbound_steered", 0) < 1:
            problems.append(f"sk_lookup steered no connection into pod {b.dst.name}'s inbound listener")
        return problems


class EbpfWithoutSplice(Ebpf):
    """`ebpf` with the proxy <-> proxy sk_msg splicing off, whatever the bench's --splice says: for
    cost_per_request, which compares the two in one lab (throughput.py switches splicing per run instead)."""

    name = "ebpf-nosplice"

    def enter(self, b: Bench) -> dict:
        splice, b.splice = b.splice, False
        try:
            return super().enter(b)
        finally:
            b.splice = splice  # read at enrolment only, so the bench's own setting is back for `ebpf`


class EbpfSpliceApp(Ebpf):
    """`ebpf` with both pods opted in to app splicing (`meshcni.io/splice-app: "true"`): the app's loopback
    pair with its sidecar and the sidecar's 127.0.0.6 passthrough to nginx are spliced too, not only the
    proxy <-> proxy pair. Safe here because wrk and nginx are non-blocking event loops (see "Splicing" in
    docs/architecture.md for why it is opt-in); it shows what the opt-in buys, not the default's figure."""

    name = "ebpf-splice-app"

    def net(self, pod: PodState) -> PodNet:
        net = pod_net(pod)
        return dataclasses.replace(net, config=dataclasses.replace(net.config, splice_app=True))


class Iptables(Mode):
    name = "iptables"
    captured_by = "iptables"

    def enter(self, b: Bench) -> dict:
        facts = start_clean(b, self.name)
        t0 = time.monotonic()
        for pod in b.state.pods:
            b.iptables.capture(pod_net(pod))
        apply_s = time.monotonic() - t0
        problems = {p.name: b.iptables.verify(pod_net(p)) for p in b.state.pods}
        if any(problems.values()):
            raise CaptureNotVerified(f"the iptables rules are not fully in place: {problems}")
        return {**facts, "iptables_apply_s": round(apply_s, 3), "iptables_backend": b.iptables.backend.value}

    def leave(self, b: Bench) -> None:
        """Remove the rules, then wait for the conntrack hold to go with the last redirected connection, as
        the agent's tick would let it; the next mode's `enter` refuses to start while it is there."""
        for pod in b.state.pods:
            b.iptables.release(pod_net(pod))
        held = self._settle(b, list(b.state.pods))
        if held:
            # What keeps them is the proxies' idle pooled connections (keep-alive: A's sidecar keeps its
            # connections to B:80, which B redirected). No traffic flows between modes, so end them as an
            # idle timeout would, rather than wait a minute for one; every mode builds its own pool anyway.
            end_sidecar_connections(b)
            held = self._settle(b, held)
        if held:
            raise CaptureNotVerified(f"the conntrack hold of pod(s) {', '.join(p.name for p in held)} did not go "
                                     f"within {CONNTRACK_SETTLE_S:.0f}s of the last redirected connection")

    @staticmethod
    def _settle(b: Bench, pods: list) -> list:
        deadline = time.monotonic() + CONNTRACK_SETTLE_S
        while pods:
            pods = [pod for pod in pods if not b.iptables.drop_conntrack_hold(pod_net(pod))]
            if not pods or time.monotonic() >= deadline:
                break
            time.sleep(0.5)
        return pods

    def proxy_path(self, b: Bench) -> ProxyPath:
        return _captured_path(b)


MODES: dict[str, type[Mode]] = {m.name: m for m in (Direct, Explicit, ExplicitRouted, Ebpf, EbpfWithoutSplice,
                                                    EbpfSpliceApp, Iptables)}
