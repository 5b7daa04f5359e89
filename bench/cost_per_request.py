"""Where a connection-per-request HTTP request's CPU goes, per mode: whole-machine CPU per request from
/proc/stat, and for the eBPF mode each meshcni program's runs and run time per request.

It brings up its own two-pod lab, takes turns between the modes for `--rounds` rounds (each round an untimed
1 s warm-up, then a measured wrk run), and prints medians. Program run time comes from the kernel's own
accounting (`kernel.bpf_stats_enabled`, switched on for the run and off again, read with `bpftool prog show`);
the accounting itself adds a little to every program run, so those figures are an upper bound.

    .venv/bin/python bench/cost_per_request.py [--rounds 4] [--duration 6] [--modes explicit,explicit-routed,ebpf]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import _modes  # noqa: E402
import _wrk  # noqa: E402

from meshcni.lab import lab as lab_core  # noqa: E402
from meshcni.lab.lab import LabNames  # noqa: E402

STATS_SYSCTL = Path("/proc/sys/kernel/bpf_stats_enabled")


def cpu_seconds() -> dict[str, float]:
    """Machine-wide CPU time so far by kind (user includes nice; softirq is where TCP receive mostly runs)."""
    v = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    hz = os.sysconf("SC_CLK_TCK")
    return {"user": (v[0] + v[1]) / hz, "system": v[2] / hz, "softirq": (v[5] + v[6]) / hz}


def program_stats() -> dict[str, tuple[int, int]]:
    """meshcni programs loaded now: name -> (run time ns, run count), summed over instances."""
    out = subprocess.run(["bpftool", "prog", "show", "-j"], capture_output=True, text=True, check=True).stdout
    stats: dict[str, tuple[int, int]] = {}
    for p in json.loads(out):
        name = p.get("name", "")
        if name.startswith("mcni_"):
            ns, cnt = stats.get(name, (0, 0))
            stats[name] = (ns + p.get("run_time_ns", 0), cnt + p.get("run_cnt", 0))
    return stats


def one_run(b, mode, wrk: str, script: Path, duration: int) -> dict:
    mode.enter(b)
    try:
        spec = _wrk.WrkSpec(url=mode.url(b, "/"), duration_s=1, connections=32, threads=1, close_each=True)
        _wrk.run(b.state, b.src, spec, script, wrk)
        cpu0, progs0 = cpu_seconds(), program_stats()
        spec = _wrk.WrkSpec(url=mode.url(b, "/"), duration_s=duration, connections=32, threads=1, close_each=True)
        result = _wrk.run(b.state, b.src, spec, script, wrk)
        cpu1, progs1 = cpu_seconds(), program_stats()
    finally:
        mode.leave(b)
    n = max(result.requests, 1)
    progs = {name: {"runs_per_request": (cnt - progs0.get(name, (0, 0))[1]) / n,
                    "us_per_request": (ns - progs0.get(name, (0, 0))[0]) / n / 1000}
             for name, (ns, cnt) in progs1.items()}
    return {"rps": result.requests / duration,
            "cpu_us_per_request": {k: (cpu1[k] - cpu0[k]) / n * 1e6 for k in cpu1}, "programs": progs}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--duration", type=int, default=6, help="seconds per measured run")
    ap.add_argument("--modes", default="explicit,explicit-routed,ebpf")
    args = ap.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in modes if m not in _modes.MODES]
    if unknown:
        ap.error(f"unknown mode(s) {', '.join(unknown)}; choose from {', '.join(_modes.MODES)}")
    if os.geteuid() != 0:
        print("cost_per_request: needs root (network namespaces, BPF)", file=sys.stderr)
        return 2
    name = f"cost-{os.getpid()}"
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    before = STATS_SYSCTL.read_text().strip()
    state = lab_core.up(lab_core.LabOptions(name=name, pods=2, capture=False))
    try:
        STATS_SYSCTL.write_text("1")
        b = _modes.Bench(state=state, src=state.pods[0], dst=state.pods[1], pin_dir=str(LabNames(name).bpf_pin_dir))
        wrk = _wrk.find_wrk()
        with _wrk.LuaScript() as script:
            for rnd in range(args.rounds):
                for m in (modes if rnd % 2 == 0 else list(reversed(modes))):
                    runs[m].append(one_run(b, _modes.MODES[m](), wrk, script.path, args.duration))
                    print(f"round {rnd + 1} {m:16s} {runs[m][-1]['rps']:8,.0f} req/s", file=sys.stderr, flush=True)
    finally:
        STATS_SYSCTL.write_text(before)
        lab_core.down(name)
    med = statistics.median
    print("| mode | req/s | CPU µs/request (user / system / softirq) |\n|---|---:|---|")
    for m, rs in runs.items():
        cpu = {k: med(r["cpu_us_per_request"][k] for r in rs) for k in ("user", "system", "softirq")}
        print(f"| {m} | {med(r['rps'] for r in rs):,.0f} | {cpu['user']:.0f} / {cpu['system']:.0f} / "
              f"{cpu['softirq']:.0f} (total {sum(cpu.values()):.0f}) |")
    if "ebpf" in runs:
        print("\n| program | runs/request | µs/request (upper bound) |\n|---|---:|---:|")
        names = sorted({p for r in runs["ebpf"] for p in r["programs"]})
        for p in names:
            rows = [r["programs"][p] for r in runs["ebpf"] if p in r["programs"]]
            print(f"| {p} | {med(x['runs_per_request'] for x in rows):.2f} | "
                  f"{med(x['us_per_request'] for x in rows):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
