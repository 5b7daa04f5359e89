"""Proof of the path a benchmark run took: proxy counters before and after, and what they must show per mode.

A throughput figure is only worth something if the traffic really went where the mode says. Around every
measured wrk run we read each sidecar's `show stat` (and, when the eBPF datapath is loaded, its per-pod
counters) and check the deltas against the mode's expected path: every request wrk counted must appear in
the HTTP backend of each proxy on the path (at least as many, and at most as many more as there can be
requests in flight when wrk stops), and no other proxy section may have seen a single session or request.
The direct mode therefore proves that *no* proxy was involved, and the captured modes prove that *every*
request was captured — not merely some. A failed check raises, so a run can never silently measure the
wrong path.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from meshcni.lab import haproxy
from meshcni.lab import pod as podproc
from meshcni.lab.state import LabState

# Every counter of a `show stat` row that moves when traffic passes a proxy section.
MOVING_FIELDS = ("stot", "req_tot")


class CaptureNotVerified(RuntimeError):
    """The counters contradict the path the mode claims; the run's figures must not be reported."""


@dataclass(frozen=True)
class ProxyPath:
    """The proxy sections a mode's traffic must cross: per pod name, the HTTP backends carrying each request,
    and every section (frontend or backend name) that may legitimately move."""

    http_backends: dict[str, str] = field(default_factory=dict)
    allowed_sections: dict[str, frozenset[str]] = field(default_factory=dict)


def proxy_counters(state: LabState) -> dict[str, dict[str, dict[str, int]]]:
    """pod -> "pxname/svname" -> {stot, req_tot} for every sidecar in the lab."""
    out: dict[str, dict[str, dict[str, int]]] = {}
    for pod in state.pods:
        rows = haproxy.parse_show_stat(haproxy.command(podproc.proxy_socket(state, pod), "show stat"))
        out[pod.name] = {
            f"{r['pxname']}/{r['svname']}": {f: int(r.get(f) or 0) for f in MOVING_FIELDS} for r in rows
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
        allowed = path.allowed_sections.get(pod, frozenset())
        for section in sections:
            if section.split("/")[0] not in allowed:
                problems.append(f"pod {pod}: proxy section {section} saw traffic {sections[section]}, "
                                f"which this mode's path never crosses")
    for pod, backend in path.http_backends.items():
        seen = moved.get(pod, {}).get(f"{backend}/BACKEND", {}).get("req_tot", 0)
        if seen < requests:
            problems.append(f"pod {pod}: only {seen} of the {requests} requests wrk completed went through "
                            f"its proxy's {backend} backend (some bypassed the proxy)")
        elif seen > requests + slack:
            problems.append(f"pod {pod}: {backend} counted {seen} requests, more than the {requests} wrk "
                            f"completed plus {slack} in flight: another client is using this lab")
    return problems


def require(problems: list[str], what: str, moved: dict) -> None:
    if problems:
        raise CaptureNotVerified(f"{what}: " + "; ".join(problems) + f" (counter deltas: {moved})")
