"""Requests lost while both lab pods are switched live between eBPF and iptables, under load.

Two-pod lab with its own agent; a connection-per-request HTTP load runs from pod A to pod B's IP while
`meshcni mode set` (the agent's SetMode) flips both pods between ebpf and iptables `--toggles` times,
letting `--settle` seconds of load through after each flip. Prints requests, failures by reason, and
which proxies served them; writes bench/results/mode_toggle-*.json. The issue's target: 0 lost.

    .venv/bin/python bench/mode_toggle.py [--toggles 20]
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
from meshcni.lab import agent as lab_agent  # noqa: E402
from meshcni.lab import lab as lab_core  # noqa: E402
from meshcni.lab import traffic  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--toggles", type=int, default=20)
    ap.add_argument("--settle", type=float, default=0.5)
    args = ap.parse_args()
    name = f"bench-t{uuid.uuid4().hex[:5]}"
    try:
        state = lab_core.up(lab_core.LabOptions(name=name))
        a, b = state.pods
        load = traffic.BackgroundLoad(state, a, b.ip, 80)
        try:
            time.sleep(args.settle)
            with AgentClient(str(lab_agent.paths(state)["socket"])) as client:
                for i in range(args.toggles):
                    mode = "iptables" if i % 2 == 0 else "ebpf"
                    for pod in (a, b):
                        client.set_mode(mode, f"lab/{pod.name}")
                    time.sleep(args.settle)
            report = load.stop()
        finally:
            load.kill()
    finally:
        lab_core.down(name)
    total = report["ok"] + report["failed"]
    result = {"bench": "mode_toggle", "toggles": args.toggles, "requests": total, "failed": report["failed"],
              "errors": report["errors"], "via": report["via"], "kernel": os.uname().release}
    print("| live toggles (both pods) | requests | failed | served by |\n|---|---|---|---|")
    print(f"| {args.toggles} | {total} | {report['failed']} | "
          + ", ".join(f"{k}: {v}" for k, v in sorted(report["via"].items())) + " |")
    if report["errors"]:
        print("errors:", json.dumps(report["errors"]))
    out = REPO / "bench" / "results" / f"mode_toggle-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
