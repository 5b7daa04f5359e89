"""Requests lost while both lab pods are switched live between eBPF and iptables, under load.

Two-pod lab with its own agent; a connection-per-request HTTP load runs from pod A to pod B's IP while
`meshcni mode set` (the agent's SetMode) flips both pods between ebpf and iptables `--toggles` times,
letting `--settle` seconds of load through after each flip. A request is *lost* when it fails, and
*half-captured* when it succeeded but was not served by both pods' proxies (A's outbound and B's inbound):
either is a capture gap. Prints both, failures by reason, which proxies served, and — for each lost or
half-captured request — when it started relative to the nearest switch, so a rare one can be explained;
writes bench/results/mode_toggle-*.json. The issue's target: 0 lost and 0 half-captured.

    .venv/bin/python bench/mode_toggle.py [--toggles 20] [--settle 0.5] [--order ab|ba]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from meshcni.agent.client import AgentClient  # noqa: E402
from meshcni.datapath.iptables import IptablesInterceptor  # noqa: E402
from meshcni.lab import agent as lab_agent  # noqa: E402
from meshcni.lab import lab as lab_core  # noqa: E402
from meshcni.lab import haproxy, traffic  # noqa: E402
from meshcni.lab import pod as podproc  # noqa: E402
from meshcni.lab.lab import pod_net  # noqa: E402


def toggle_under_load(state, toggles: int, settle: float, order: str = "ab") -> dict:
    """Flip both pods `toggles` times under load; returns the load report, the switch timeline and the verdict."""
    a, b = state.pods
    pods = (a, b) if order == "ab" else (b, a)
    full_path = f"{b.name}-inbound,{a.name}-outbound"
    events: list[dict] = []
    counters: dict[str, dict[str, int]] = {}  # pod -> eBPF counters summed over its eBPF periods
    held: list[dict[str, bool]] = []  # per eBPF period, at its end: pod -> conntrack hold still in place
    iptables = IptablesInterceptor()  # only reads the pods' tables, with the backend the agent detects too
    load = traffic.BackgroundLoad(state, a, b.ip, 80)
    try:
        time.sleep(settle)
        with AgentClient(str(lab_agent.paths(state)["socket"])) as client:
            for i in range(toggles):
                mode = "iptables" if i % 2 == 0 else "ebpf"
                if mode == "iptables":  # a pod's eBPF counters restart at each enrolment: add them up first
                    for pod in pods:
                        add_counters(counters, client, pod.name)
                for pod in pods:
                    started = time.time()
                    client.set_mode(mode, f"lab/{pod.name}")
                    events.append({"pod": pod.name, "mode": mode, "start": started, "end": time.time()})
                time.sleep(settle)
                if mode == "ebpf":  # did the pods stop conntrack once iptables' last redirected connection ended?
                    held.append({pod.name: iptables.conntrack_held(pod_net(pod)) for pod in pods})
            if toggles % 2 == 0:  # back in eBPF mode: add the last period
                for pod in pods:
                    add_counters(counters, client, pod.name)
        report = load.stop()
    finally:
        load.kill()
    # Pod a's sidecar retries a request whose upstream failed before answering (lab RETRIES): such a request
    # is not lost for the app, but each retry is a capture hiccup and is reported as one.
    retried = haproxy.retries(podproc.proxy_socket(state, a))
    half = {via: n for via, n in report["via"].items() if via != full_path}
    return {"report": report, "events": events, "full_path": full_path,
            "half_captured": sum(half.values()), "half_paths": half,
            "incidents": incidents(report, events, full_path), "counters": counters, "client_retries": retried,
            "conntrack_held_after_ebpf_periods": held}


def add_counters(total: dict, client: AgentClient, pod: str) -> None:
    for entry in client.counters(f"lab/{pod}"):
        mine = total.setdefault(pod, {})
        for name, value in entry["counters"].items():
            mine[name] = mine.get(name, 0) + value


def mode_at(events: list[dict], pod: str, t: float) -> str:
    """A pod's mode at wall time `t`: "ebpf", "iptables", or "ebpf>iptables" while a switch is under way."""
    mode = "ebpf"  # the lab's node default, before the first switch
    for e in events:
        if e["pod"] != pod or e["start"] > t:
            continue
        mode = e["mode"] if t >= e["end"] else f"{'ebpf' if e['mode'] == 'iptables' else 'iptables'}>{e['mode']}"
    return mode


def incidents(report: dict, events: list[dict], full_path: str) -> list[dict]:
    """Each sampled lost or half-captured request, with both pods' modes when it started and when it ended."""
    out = []
    pods = sorted({e["pod"] for e in events})
    for kind, samples in report.get("samples", {}).items():
        if kind == f"via {full_path}":
            continue
        for s in samples:
            end = s["t"] + s["seconds"]
            out.append({"kind": kind, **s,
                        "modes_at_start": {p: mode_at(events, p, s["t"]) for p in pods},
                        "modes_at_end": {p: mode_at(events, p, end) for p in pods}})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--toggles", type=int, default=20)
    ap.add_argument("--settle", type=float, default=0.5)
    ap.add_argument("--order", choices=("ab", "ba"), default="ab",
                    help="which pod switches first: ab = the client pod A, ba = the server pod B")
    args = ap.parse_args()
    name = f"bench-t{uuid.uuid4().hex[:5]}"
    try:
        state = lab_core.up(lab_core.LabOptions(name=name))
        run = toggle_under_load(state, args.toggles, args.settle, args.order)
    finally:
        lab_core.down(name)
    report = run["report"]
    total = report["ok"] + report["failed"]
    result = {"bench": "mode_toggle", "toggles": args.toggles, "settle": args.settle, "order": args.order,
              "requests": total, "failed": report["failed"], "half_captured": run["half_captured"],
              "errors": report["errors"], "via": report["via"], "incidents": run["incidents"],
              "counters": run["counters"], "client_retries": run["client_retries"],
              "conntrack_held_after_ebpf_periods": run["conntrack_held_after_ebpf_periods"],
              "kernel": os.uname().release}
    print("| live toggles (both pods) | requests | lost | half-captured | client retries | served by |\n"
          "|---|---|---|---|---|---|")
    print(f"| {args.toggles} | {total} | {report['failed']} | {run['half_captured']} | {run['client_retries']} | "
          + ", ".join(f"{k}: {v}" for k, v in sorted(report["via"].items())) + " |")
    if report["errors"]:
        print("errors:", json.dumps(report["errors"]))
    print("eBPF counters at the end:", json.dumps(run["counters"]))
    periods = run["conntrack_held_after_ebpf_periods"]
    still = sum(1 for period in periods for held in period.values() if held)
    print(f"conntrack hold still in place at the end of an eBPF period: {still} of "
          f"{sum(len(p) for p in periods)} pod-periods (dropped once no redirected connection is open)")
    for inc in run["incidents"]:
        print("incident:", json.dumps(inc))
    out = REPO / "bench" / "results" / f"mode_toggle-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
