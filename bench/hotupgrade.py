"""Failed requests across proxy restarts under a connection-per-request load: meshcni's held listeners against
a naive restart and HAProxy's own master-worker reload.

Each scenario is a fresh two-pod lab (meshcni.handoff.rig): pod a runs `meshcni.handoff.load` (new TCP
connection per GET, 2 threads) against pod b's app port, captured inbound by the eBPF datapath into pod b's
HAProxy sidecar, which the scenario restarts N times:
- meshcni-graceful: new HAProxy via proxy-exec on the agent's sockets, old one SIGUSR1 (soft stop)
- meshcni-sigkill: SIGKILL, start again via proxy-exec (the agent's listeners never close)
- naive-restart: HAProxy binding its own listeners; SIGKILL, start again, then the agent re-registers the new
  listener in the SOCKMAP (pidfd_getfd) — until then SYNs find no proxy listener
- haproxy-master-worker: `haproxy -W`, reload by SIGUSR2 to the master (no explicit -x; the lab's
  stats socket has no `expose-fd listeners`), SOCKMAP re-registered after each reload
Run as root: `.venv/bin/python bench/hotupgrade.py [--graceful 100 --kills 20 --naive 20 --reloads 20]`.
Writes bench/results/hotupgrade.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from meshcni.handoff import upgrade  # noqa: E402
from meshcni.handoff.rig import HotUpgradeRig  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "hotupgrade.json"


def _wait_new_worker(stats_socket: str, old_worker: int | None, timeout: float = 15.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pid = upgrade.haproxy_pid(stats_socket)
        if pid is not None and pid != old_worker:
            return pid
        time.sleep(0.005)
    raise RuntimeError("HAProxy's new worker did not answer")


def scenario(name: str, rig_kwargs: dict, count: int, step) -> dict:
    short = "".join(w[0] for w in name.split("-"))  # lab names are at most 32 characters
    with HotUpgradeRig(f"bench-hu-{os.getpid() % 100000}-{short}", **rig_kwargs) as rig:
        load = rig.start_load(concurrency=2)
        started = time.monotonic()
        details = []
        try:
            for _ in range(count):
                details.append(step(rig))
        finally:
            report = load.stop()
        seconds = time.monotonic() - started
        counters = rig.dp.counters(rig.slot) if rig.dp else {}
    return {"scenario": name, "restarts": count, "seconds": round(seconds, 2), "requests": report["requests"],
            "failed": report["failed"], "failures": report["failures"],
            "in_flight_lost": sum(d.get("in_flight_lost", 0) for d in details),
            "queued_peak_sum": sum(d.get("queued", 0) for d in details),
            "max_restart_seconds": max((d.get("seconds", 0) for d in details), default=0),
            "sk_lookup_no_listener": counters.get("no_listener")}


def graceful_step(rig):
    r = upgrade.graceful(rig.launcher, rig.current, listeners=rig.listeners, stats=rig.stats)
    rig.current = r.new
    return r.to_dict()


def sigkill_step(rig):
    r = upgrade.crash_restart(rig.launcher, rig.current, listeners=rig.listeners, stats=rig.stats)
    rig.current = r.new
    return r.to_dict()


def naive_step(rig):
    started = time.monotonic()
    os.kill(rig.current.pid, signal.SIGKILL)
    rig.current.wait()
    rig.current = rig.launcher.start()
    upgrade.wait_ready(rig.launcher, rig.current, 15.0)
    rig.register_own_listener(rig.current.pid)
    return {"seconds": time.monotonic() - started}


def reload_step(rig):
    started = time.monotonic()
    old_worker = upgrade.haproxy_pid(rig.launcher.stats_socket)
    os.kill(rig.current.pid, signal.SIGUSR2)
    worker = _wait_new_worker(rig.launcher.stats_socket, old_worker)
    rig.register_own_listener(worker)
    if old_worker is not None:
        upgrade.wait_exit(old_worker, 30.0)  # the master ignores a reload while the former worker still runs
    return {"seconds": time.monotonic() - started}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--graceful", type=int, default=100)
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--naive", type=int, default=20)
    ap.add_argument("--reloads", type=int, default=20)
    args = ap.parse_args()
    rows = [
        scenario("meshcni-graceful", {}, args.graceful, graceful_step),
        scenario("meshcni-sigkill", {}, args.kills, sigkill_step),
        scenario("naive-restart", {"proxy": "own"}, args.naive, naive_step),
        scenario("haproxy-master-worker", {"proxy": "own", "master_worker": True}, args.reloads, reload_step),
    ]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"kernel": os.uname().release, "load": "1 TCP connection per GET, 2 threads",
                                   "results": rows}, indent=2) + "\n")
    print(f"{'scenario':24} {'restarts':>8} {'requests':>9} {'failed':>7} {'refused':>8} {'reset':>6} "
          f"{'unproxied':>9} {'in-flight killed':>16} {'max restart s':>13}")
    for r in rows:
        f = r["failures"]
        print(f"{r['scenario']:24} {r['restarts']:>8} {r['requests']:>9} {r['failed']:>7} {f['refused']:>8} "
              f"{f['reset']:>6} {f['unproxied']:>9} {r['in_flight_lost']:>16} {r['max_restart_seconds']:>13.3f}")
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
