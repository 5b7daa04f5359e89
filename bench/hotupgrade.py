"""Failed requests across proxy restarts under a connection-per-request load: meshcni's agent-held listeners
against a naive restart and HAProxy's own master-worker reload.

Each scenario is a fresh two-pod lab run by its own agent (meshcni.handoff.rig): pod a's app runs
`meshcni.handoff.load` (a new TCP connection per GET, 2 threads) to pod b's app port, through a's outbound
sidecar and b's inbound sidecar (eBPF capture both ways), and pod b's HAProxy is replaced N times:
- meshcni-graceful: `meshcni proxy upgrade lab/b` (the agent's UpgradeProxy): a new HAProxy through
  proxy-exec on the agent's sockets, the old one SIGUSR1 (soft stop)
- meshcni-sigkill: `meshcni proxy upgrade --kill`: SIGKILL, start again; the held listeners never close
- naive-restart: HAProxy binding its own listeners, SIGKILL and start again; the new listener registers
  itself in the SOCKMAP at listen() (bpf/sockops.c), so what fails is what arrives while no proxy exists
- haproxy-master-worker: `haproxy -W` binding its own listeners, reloaded by SIGUSR2 to the master; the new
  worker's listener registers itself the same way
A request counts as failed if the app gets no complete 200 from pod b's nginx through b's proxy. Pod a's
proxy retries a request whose upstream connection failed or closed before any answer (Istio's default retry
policy does the same); how often it did is reported as `client retries`.
Run as root: `.venv/bin/python bench/hotupgrade.py [--graceful 100 --kills 20 --naive 20 --reloads 20]`.
Writes bench/results/hotupgrade.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from meshcni.handoff.rig import HotUpgradeRig  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "hotupgrade.json"


def scenario(name: str, rig_kwargs: dict, count: int, step, pause: float = 0.0) -> dict:
    short = "".join(w[0] for w in name.split("-"))  # lab names are at most 32 characters
    with HotUpgradeRig(f"bench-hu-{os.getpid() % 100000}-{short}", **rig_kwargs) as rig:
        load = rig.start_load(concurrency=2)
        started = time.monotonic()
        details = []
        try:
            for _ in range(count):
                details.append(step(rig))
                time.sleep(pause)
        finally:
            report = load.stop()
        seconds = time.monotonic() - started
        counters = rig.counters()
        retries = rig.client_retries()
    return {"scenario": name, "restarts": count, "seconds": round(seconds, 2), "requests": report["requests"],
            "failed": report["failed"], "failures": report["failures"], "client_retries": retries,
            "accepted_killed": sum(d.get("in_flight_lost", 0) for d in details),
            "queued_peak_sum": sum(d.get("queued", 0) for d in details),
            "max_restart_seconds": round(max((d.get("seconds", 0) for d in details), default=0), 3),
            "sk_lookup_no_listener": counters.get("no_listener")}


def graceful_step(rig):
    return rig.upgrade("graceful")


def sigkill_step(rig):
    return rig.upgrade("crash")


def naive_step(rig):
    return rig.naive_restart()


def reload_step(rig):
    return rig.master_worker_reload()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--graceful", type=int, default=100)
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--naive", type=int, default=20)
    ap.add_argument("--reloads", type=int, default=20)
    ap.add_argument("--pause", type=float, default=1.0, help="seconds of load between two restarts")
    args = ap.parse_args()
    # One second of load between restarts in every scenario, so each restart meets a full stream of new
    # connections: what an operator restarting a proxy by hand would see at best.
    rows = [
        scenario("meshcni-graceful", {}, args.graceful, graceful_step, pause=args.pause),
        scenario("meshcni-sigkill", {}, args.kills, sigkill_step, pause=args.pause),
        scenario("naive-restart", {"proxy": "own"}, args.naive, naive_step, pause=args.pause),
        scenario("haproxy-master-worker", {"proxy": "own", "master_worker": True}, args.reloads, reload_step,
                 pause=args.pause),
    ]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"kernel": os.uname().release, "load": "1 TCP connection per GET, 2 threads, app -> a sidecar -> b sidecar -> app",
                                   "results": rows}, indent=2) + "\n")
    print(f"{'scenario':24} {'restarts':>8} {'requests':>9} {'failed':>7} {'refused':>8} {'reset':>6} "
          f"{'unproxied':>9} {'client retries':>14} {'accepted, killed':>16} {'max restart s':>13}")
    for r in rows:
        f = r["failures"]
        print(f"{r['scenario']:24} {r['restarts']:>8} {r['requests']:>9} {r['failed']:>7} {f['refused']:>8} "
              f"{f['reset']:>6} {f['unproxied']:>9} {r['client_retries']:>14} {r['accepted_killed']:>16} "
              f"{r['max_restart_seconds']:>13.3f}")
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
