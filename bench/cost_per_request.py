"""Where a connection-per-request HTTP request's CPU goes, per mode: whole-machine CPU per request from
/proc/stat, and for the eBPF mode each meshcni program's runs and run time per request.

It brings up its own two-pod lab, takes turns between the modes for `--rounds` rounds (each round an untimed
1 s warm-up, then a measured wrk run), and prints medians. Program run time comes from the kernel's own
accounting (`kernel.bpf_stats_enabled`, read with `bpftool prog show`) in one extra eBPF run after the rounds:
the accounting reads the clock twice around every program run, which on this VM has added from nothing
measurable to ~80 µs to an eBPF request's machine CPU, so it is off while the modes are compared and the
program figures are an upper bound.

    .venv/bin/python bench/cost_per_request.py [--rounds 4] [--duration 6] [--modes explicit,explicit-routed,ebpf]

`--modes` takes any of bench/_modes.py's, including `ebpf-nosplice` (eBPF without proxy <-> proxy splicing)
and `ebpf-splice-app` (eBPF with both pods' app-splicing opt-in, `meshcni.io/splice-app: "true"`).
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

import _cpu  # noqa: E402
import _modes  # noqa: E402
import _wrk  # noqa: E402

from meshcni.lab import lab as lab_core  # noqa: E402
from meshcni.lab.lab import LabNames  # noqa: E402

STATS_SYSCTL = Path("/proc/sys/kernel/bpf_stats_enabled")


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


def one_run(b, mode, wrk: str, script: Path, duration: int, *, program_stats_on: bool = False) -> dict:
    mode.enter(b)
    try:
        spec = _wrk.WrkSpec(url=mode.url(b, "/"), duration_s=1, connections=32, threads=1, close_each=True)
        _wrk.run(b.state, b.src, spec, script, wrk)
        if program_stats_on:
            STATS_SYSCTL.write_text("1")
        cpu0, progs0 = _cpu.cpu_times(), program_stats()
        spec = _wrk.WrkSpec(url=mode.url(b, "/"), duration_s=duration, connections=32, threads=1, close_each=True)
        result = _wrk.run(b.state, b.src, spec, script, wrk)
        cpu, progs1 = _cpu.cpu_times() - cpu0, program_stats()
    finally:
        if program_stats_on:
            STATS_SYSCTL.write_text("0")
        mode.leave(b)
    n = max(result.requests, 1)
    progs = {name: {"runs_per_request": (cnt - progs0.get(name, (0, 0))[1]) / n,
                    "us_per_request": (ns - progs0.get(name, (0, 0))[0]) / n / 1000}
             for name, (ns, cnt) in progs1.items()}
    return {"rps": result.requests / duration,
            "cpu_us_per_request": {k: getattr(cpu, k) / n * 1e6 for k in ("user", "system", "softirq")},
            "programs": progs}


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
    accounted: dict | None = None  # the extra eBPF run with the kernel's program accounting on
    before = STATS_SYSCTL.read_text().strip()
    if before != "0":
        print("cost_per_request: kernel.bpf_stats_enabled is on; it would inflate the eBPF mode's CPU",
              file=sys.stderr)
        return 2
    state = lab_core.up(lab_core.LabOptions(name=name, pods=2, capture=False))
    try:
        b = _modes.Bench(state=state, src=state.pods[0], dst=state.pods[1], pin_dir=str(LabNames(name).bpf_pin_dir))
        wrk = _wrk.find_wrk()
        with _wrk.LuaScript() as script:
            for rnd in range(args.rounds):
                for m in (modes if rnd % 2 == 0 else list(reversed(modes))):
                    runs[m].append(one_run(b, _modes.MODES[m](), wrk, script.path, args.duration))
                    print(f"round {rnd + 1} {m:16s} {runs[m][-1]['rps']:8,.0f} req/s", file=sys.stderr, flush=True)
            if "ebpf" in runs:
                accounted = one_run(b, _modes.MODES["ebpf"](), wrk, script.path, args.duration,
                                    program_stats_on=True)
    finally:
        STATS_SYSCTL.write_text(before)
        lab_core.down(name)
    med = statistics.median
    print("| mode | req/s | CPU µs/request (user / system / softirq) |\n|---|---:|---|")
    for m, rs in runs.items():
        cpu = {k: med(r["cpu_us_per_request"][k] for r in rs) for k in ("user", "system", "softirq")}
        print(f"| {m} | {med(r['rps'] for r in rs):,.0f} | {cpu['user']:.0f} / {cpu['system']:.0f} / "
              f"{cpu['softirq']:.0f} (total {sum(cpu.values()):.0f}) |")
    if accounted:
        cpu = accounted["cpu_us_per_request"]
        print(f"\nOne more eBPF run with the kernel's program accounting on: {accounted['rps']:,.0f} req/s, "
              f"CPU {sum(cpu.values()):.0f} µs/request.")
        print("\n| program | runs/request | µs/request (upper bound) |\n|---|---:|---:|")
        for p, x in sorted(accounted["programs"].items()):
            print(f"| {p} | {x['runs_per_request']:.2f} | {x['us_per_request']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
