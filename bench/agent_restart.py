"""Requests lost across `kill -9` of the agent under connection-per-request load in the lab.

Brings up a two-pod lab (its own agent; pods enrolled through the CNI chain), runs a connection-per-request
HTTP load from pod A to pod B's IP (captured outbound into A's proxy, steered inbound into B's), and kills
the agent with SIGKILL `--kills` times, starting a fresh one each time and waiting for it to serve again.
Prints requests made, failed (by reason) and the restart times, and writes bench/results/agent_restart-*.json.
The issue's target: 0 requests lost.

    .venv/bin/python bench/agent_restart.py [--kills 5]
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

from meshcni.lab import agent as lab_agent  # noqa: E402
from meshcni.lab import lab as lab_core  # noqa: E402
from meshcni.lab import traffic  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=5)
    ap.add_argument("--settle", type=float, default=2.0, help="seconds of load between restarts")
    args = ap.parse_args()
    name = f"bench-r{uuid.uuid4().hex[:5]}"
    restarts = []
    try:
        state = lab_core.up(lab_core.LabOptions(name=name))
        a, b = state.pods
        load = traffic.BackgroundLoad(state, a, b.ip, 80)
        try:
            time.sleep(args.settle)
            for _ in range(args.kills):
                started = time.monotonic()
                lab_agent.restart(state, kill=True)
                restarts.append(round(time.monotonic() - started, 2))
                time.sleep(args.settle)
            report = load.stop()
        finally:
            load.kill()
    finally:
        lab_core.down(name)
    result = {"bench": "agent_restart", "kills": args.kills, "requests": report["ok"] + report["failed"],
              "failed": report["failed"], "errors": report["errors"], "via": report["via"],
              "restart_seconds": restarts, "kernel": os.uname().release}
    print("| agent kill -9 | requests | failed | agent back serving (s) |\n|---|---|---|---|")
    print(f"| {args.kills} | {result['requests']} | {result['failed']} | "
          f"{min(restarts)}–{max(restarts)} |")
    if report["errors"]:
        print("errors:", json.dumps(report["errors"]))
    out = REPO / "bench" / "results" / f"agent_restart-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0 if result["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
