"""Proof of the path a benchmark run took: proxy counters before and after, and what they must show per mode.

A throughput figure is only worth something if the traffic really went where the mode says. Around every
measured wrk run we read each sidecar's `show stat` (and, when the eBPF datapath is loaded, its per-pod
counters) and check the deltas against the mode's expected path: every request wrk counted must appear in
the HTTP request count of each proxy's listener on the path (at least as many, and at most as many more as
there can be requests in flight when wrk stops), and no other proxy section may have seen a single session
or request. Requests are counted where they arrive, on the listener (frontend `req_tot`): a backend's count
lags it by the odd request HAProxy rejected or the client abandoned, which is not a bypass.
The direct mode therefore proves that *no* proxy was involved, and the captured modes prove that *every*
request was captured — not merely some. A failed check raises, so a run can never silently measure the
wrong path. One thing is counted rather than fatal: a captured connection that reaches its own pod's capture
listener but is handed to the raw-TCP backend, which happens when the proxy could not learn the connection's
original destination port. That is a datapath fault on the measured path (not a bypass), and the figure is
reported next to the mode's errors instead of hiding the whole run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from meshcni.lab import haproxy
from meshcni.lab import pod as podproc
from meshcni.lab.state import LabState

# Counters of a `show stat` row that move when traffic passes a proxy section (sessions, HTTP requests), and
# the ones that say why a request failed there (5xx answers, failed connects, failed responses).
MOVING_FIELDS = ("stot", "req_tot")
ERROR_FIELDS = ("hrsp_4xx", "hrsp_5xx", "econ", "eresp", "ereq", "dcon")


class CaptureNotVerified(RuntimeError):
    """The counters contradict the path the mode claims; the run's figures must not be reported."""


@dataclass(frozen=True)
class ProxyPath:
    """The proxy sections a mode's traffic must cross: per pod name, the listener (frontend) that receives
    each request, and every section (frontend or backend name) that may legitimately move."""

    listeners: dict[str, str] = field(default_factory=dict)
    allowed_sections: dict[str, frozenset[str]] = field(default_factory=dict)
    # Sections on the path's own listeners that a connection only takes when its original destination was
    # lost (counted as misrouted, not fatal).
    fallback_sections: dict[str, frozenset[str]] = field(default_factory=dict)


def proxy_counters(state: LabState) -> dict[str, dict[str, dict[str, int]]]:
    """pod -> "pxname/svname" -> {stot, req_tot} for every sidecar in the lab."""
    out: dict[str, dict[str, dict[str, int]]] = {}
    for pod in state.pods:
        rows = haproxy.parse_show_stat(haproxy.command(podproc.proxy_socket(state, pod), "show stat"))
        out[pod.name] = {
            f"{r['pxname']}/{r['svname']}": {f: int(r.get(f) or 0) for f in MOVING_FIELDS + ERROR_FIELDS} for r in rows
        }
    return out


def delta(before: dict, after: dict) -> dict:
    """after - before, recursively over nested dicts of ints; only non-zero entries are kept."""
    out = {}
    for key, value in after.items():
        if isinstance(value, dict):
            d = delta(before.get(key, {}), value)
            if d:
                out[key] = d
        else:
            diff = value - before.get(key, 0)
            if diff:
                out[key] = diff
    return out


def check_proxies(path: ProxyPath, moved: dict, requests: int, slack: int) -> list[str]:
    """Problems with the proxy deltas of one run (empty when the path is proven)."""
    problems = []
    for pod, sections in moved.items():
        allowed = path.allowed_sections.get(pod, frozenset()) | path.fallback_sections.get(pod, frozenset())
        for section, counts in sections.items():
            if section.split("/")[0] not in allowed and any(counts.get(f) for f in MOVING_FIELDS):
                problems.append(f"pod {pod}: proxy section {section} saw traffic {sections[section]}, "
                                f"which this mode's path never crosses")
    for pod, listener in path.listeners.items():
        seen = moved.get(pod, {}).get(f"{listener}/FRONTEND", {}).get("req_tot", 0)
        if seen < requests:
            problems.append(f"pod {pod}: only {seen} of the {requests} requests wrk completed arrived at "
                            f"its proxy's {listener} listener (some bypassed the proxy)")
        elif seen > requests + slack:
            problems.append(f"pod {pod}: listener {listener} counted {seen} requests, more than the {requests} "
                            f"wrk completed plus {slack} in flight: another client is using this lab")
    return problems


FALLBACK_BACKENDS = ("outbound_tcp", "inbound_tcp")
CLIENT_FRONTENDS = ("outbound", "explicit_http_out", "routed_out")


def _current(state: LabState) -> dict[str, list[dict[str, str]]]:
    return {pod.name: haproxy.parse_show_stat(haproxy.command(podproc.proxy_socket(state, pod), "show stat"))
            for pod in state.pods}


def fallback_sessions(state: LabState) -> dict[str, dict[str, int]]:
    """Open sessions (`scur`) on the raw-TCP backends, where a self-connection chain lives (see
    shut_fallback_sessions); none may be open when a run starts."""
    out: dict[str, dict[str, int]] = {}
    for pod, rows in _current(state).items():
        busy = {f"{r['pxname']}/{r['svname']}": int(r.get("scur") or 0) for r in rows
                if r["pxname"] in FALLBACK_BACKENDS and int(r.get("scur") or 0)}
        if busy:
            out[pod] = busy
    return out


def client_sessions(state: LabState, src: str) -> int:
    """Open sessions on the source pod's client-facing listeners (wrk's connections end there)."""
    rows = _current(state)[src]
    return sum(int(r.get("scur") or 0) for r in rows if r["pxname"] in CLIENT_FRONTENDS and r["svname"] == "FRONTEND")


def stalled_after(state: LabState, src: str, baseline: int, timeout: float) -> int:
    """How many client sessions a finished wrk run left open beyond `baseline` after up to `timeout` seconds.

    wrk has exited, so the kernel has closed every one of its sockets; a session the proxy still holds means
    the close never reached it. Idle sessions cost the next runs nothing (HAProxy drops them at its client
    timeout), so they are reported as a fault of the run that left them, not fatal.
    """
    deadline = time.monotonic() + timeout
    while True:
        extra = client_sessions(state, src) - baseline
        if extra <= 0 or time.monotonic() >= deadline:
            return max(0, extra)
        time.sleep(0.1)


def shut_fallback_sessions(state: LabState, path: ProxyPath) -> None:
    """Cut every session of the path's raw-TCP fallback backends.

    A connection whose original destination was lost is forwarded by `server orig 0.0.0.0` to the address
    it was accepted on — the proxy's own capture listener — where it is again a connection without an
    original destination: a chain of self-connections that grows until HAProxy's maxconn. Left alone, it
    would slow down every mode measured after the faulty run, so the bench cuts it via the admin socket.
    """
    for pod in state.pods:
        for backend in sorted(path.fallback_sections.get(pod.name, ())):
            answer = haproxy.command(podproc.proxy_socket(state, pod), f"shutdown sessions server {backend}/orig")
            if answer.strip():  # success is an empty answer; anything else is HAProxy's error text
                raise CaptureNotVerified(f"pod {pod.name}: cannot cut the sessions of {backend}: {answer.strip()}")


def misrouted(path: ProxyPath, moved: dict) -> int:
    """Captured connections whose original destination the proxy could not learn: sessions that reached the
    path's capture listener but its raw-TCP fallback backend, plus connections a capture listener refused
    (`dcon`: a sidecar that guards against forwarding to its own port rejects them instead)."""
    to_fallback = sum(
        counts.get("stot", 0)
        for pod, sections in moved.items()
        for section, counts in sections.items()
        if section.endswith("/BACKEND") and section.split("/")[0] in path.fallback_sections.get(pod, frozenset())
    )
    refused = sum(
        moved.get(pod, {}).get(f"{listener}/FRONTEND", {}).get("dcon", 0)
        for pod, listener in path.listeners.items() if path.fallback_sections.get(pod)
    )
    return to_fallback + refused


def require(problems: list[str], what: str, moved: dict) -> None:
    if problems:
        raise CaptureNotVerified(f"{what}: " + "; ".join(problems) + f" (counter deltas: {moved})")
