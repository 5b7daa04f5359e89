"""HTTP throughput and latency between two lab pods: direct, through the proxies explicitly, and captured by
the eBPF datapath or by Istio's iptables rules — measured with wrk, interleaved, every run's path verified.

A throwaway lab (two pods by default, created without capture) is brought up; then, for R rounds, each mode
in turn is switched on, warmed up, measured with wrk for both profiles — keep-alive and
connection-per-request (`Connection: close`) — and switched off again. The mode order rotates each round and
the profile order alternates, so machine noise and ordering effects fall on every mode alike; the report is
the median across rounds. Around every measured run the proxies' counters (and the datapath's, in eBPF mode)
prove the traffic took exactly the claimed path; if it did not, the bench stops with an error rather than
report a figure for the wrong path. The bpf/ sources are copied once at start, so an edit made while the
bench runs cannot change what later rounds compile; the git commit and a hash of those sources are recorded.

    .venv/bin/python bench/throughput.py            # full run, ~6 minutes on 2 cores
    .venv/bin/python bench/throughput.py --quick    # ~1 minute, for a quick look

Prints a markdown table and writes bench/results/throughput-<UTC timestamp>.json (or --output).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO))

import _cpu  # noqa: E402
import _report  # noqa: E402
from _evidence import (  # noqa: E402
    CaptureNotVerified, check_proxies, client_sessions, delta, fallback_sessions, misrouted, proxy_counters, require,
    shut_fallback_sessions, stalled_after,
)
import _wrk  # noqa: E402
from meshcni.lab import lab as lab_core  # noqa: E402
from meshcni.lab.state import LabError, LabNames  # noqa: E402
from meshcni.sys.errors import SysError  # noqa: E402

MODE_ORDER = ["direct", "explicit", "explicit-routed", "ebpf", "iptables"]
# Not run by default; --modes takes them to compare eBPF with itself in one run (its figures, no targets).
OPTIONAL_MODES = ["ebpf-nosplice"]
KNOWN_MODES = MODE_ORDER[:4] + OPTIONAL_MODES + MODE_ORDER[4:]  # the canonical order of --modes
FULL = {"rounds": 5, "duration": 8, "warmup": 1}
QUICK = {"rounds": 2, "duration": 3, "warmup": 1}
BPF_DIR_ENV = "MESHCNI_BPF_DIR"
# A few failed answers are a fault to report with the figure; more than this and the figure measures errors.
MAX_NON_2XX_SHARE = 0.01
DRAIN_TIMEOUT_S = 3.0  # how long the proxy may take to see wrk's connections closed after it exits


class BenchError(RuntimeError):
    """The bench could not run as asked (bad options, missing tools, not root)."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help=f"short run: {QUICK['rounds']} rounds of {QUICK['duration']}s (about a minute)")
    p.add_argument("--rounds", type=int, help=f"rounds over all modes (default {FULL['rounds']})")
    p.add_argument("--duration", type=int, help=f"whole seconds per measured wrk run (default {FULL['duration']})")
    p.add_argument("--warmup", type=int, help=f"whole seconds of untimed keep-alive load after a mode is switched on "
                                              f"(default {FULL['warmup']}; 0 disables)")
    p.add_argument("--connections", type=int, default=32, help="wrk connections (default 32)")
    p.add_argument("--threads", type=int, default=1,
                   help="wrk threads (default 1: on 2 cores the proxies and nginx need the other)")
    p.add_argument("--pods", type=int, default=2,
                   help="lab pods (default 2); traffic flows from the first to the second, captured modes capture all")
    p.add_argument("--modes", default=",".join(MODE_ORDER),
                   help=f"comma-separated subset of {','.join(KNOWN_MODES)} (default: all but "
                        f"{','.join(OPTIONAL_MODES)}, eBPF without proxy<->proxy splicing)")
    p.add_argument("--profiles", default=",".join(_report.PROFILES),
                   help="comma-separated subset of keep-alive,close (close = one connection per request)")
    p.add_argument("--path", default="/", help="HTTP path requested from nginx (default /, a ~40-byte answer; "
                                              "/bytes/65536 for 64 KiB)")
    p.add_argument("--splice", choices=("on", "off"), default="on",
                   help="eBPF mode: sk_msg splicing of proxy<->proxy pairs (default on, the datapath's default)")
    p.add_argument("--output", type=Path, help="JSON report path (default bench/results/throughput-<UTC time>.json)")
    p.add_argument("--name", default=f"bench-{os.getpid()}", help="lab name (default bench-<pid>)")
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.modes = _pick(args.modes, KNOWN_MODES, "--modes")
    args.profiles = _pick(args.profiles, list(_report.PROFILES), "--profiles")
    if args.rounds < 1 or args.duration <= 0 or args.warmup < 0:
        raise BenchError("--rounds must be ≥ 1, --duration > 0 and --warmup ≥ 0")
    if args.pods < 2:
        raise BenchError("--pods must be at least 2 (traffic flows between two pods)")
    if args.threads < 1 or args.connections < args.threads:
        raise BenchError("--threads must be ≥ 1 and --connections ≥ --threads")
    return args


def _pick(text: str, known: list[str], flag: str) -> list[str]:
    wanted = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [x for x in wanted if x not in known]
    if unknown or not wanted:
        raise BenchError(f"{flag}: unknown or empty {unknown or text!r}; choose from {','.join(known)}")
    return [x for x in known if x in wanted]  # canonical order, duplicates dropped


# ------------------------------------------------------------------------------------------- provenance


def snapshot_bpf_sources() -> tuple[Path, Path, str]:
    """Copy the bpf/ sources the loader would compile into a private directory; returns (original, copy,
    sha256 over every file's relative path and bytes)."""
    original = Path(os.environ.get(BPF_DIR_ENV, REPO / "bpf")).resolve()
    if not original.is_dir():
        raise BenchError(f"no BPF sources at {original}")
    copy = Path(tempfile.mkdtemp(prefix="meshcni-bench-bpf-"))
    shutil.copytree(original, copy, dirs_exist_ok=True)
    digest = hashlib.sha256()
    for f in sorted(p for p in copy.rglob("*") if p.is_file()):
        digest.update(str(f.relative_to(copy)).encode() + b"\0" + f.read_bytes())
    return original, copy, digest.hexdigest()


def _first_line(argv: list[str]) -> str:
    try:
        cp = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    text = (cp.stdout or cp.stderr).strip()
    return text.splitlines()[0] if text else "unknown"


def code_facts(bpf_original: Path, bpf_sha: str) -> dict:
    def git(*a: str) -> str:
        # Not stripped: porcelain lines start with a status column that may be a space.
        return subprocess.run(["git", "-C", str(REPO), *a], capture_output=True, text=True, timeout=10).stdout

    dirty = git("status", "--porcelain", "--", "bpf", "meshcni", "bench")
    return {
        "git_commit": git("rev-parse", "HEAD").strip(),
        # The figures measure the working tree, which may differ from the commit while others are editing.
        "uncommitted_changes": [ln[3:] for ln in dirty.splitlines() if not ln.endswith(".pyc")],
        "bpf_dir": str(bpf_original),
        "bpf_sources_sha256": bpf_sha,
    }


def host_facts(wrk: str) -> dict:
    return {
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "wrk": _first_line([wrk, "--version"]),
        "haproxy": _first_line(["haproxy", "-v"]),
        "loadavg_1m_before": os.getloadavg()[0],
    }


# ------------------------------------------------------------------------------------------------- run


def measure(args, bench, modes: dict, wrk: str, script: Path, log) -> tuple[list[dict], list[dict]]:
    """All rounds; returns (runs, per-round facts of each mode's switch-on)."""
    runs: list[dict] = []
    facts: list[dict] = []
    for rnd in range(1, args.rounds + 1):
        k = (rnd - 1) % len(args.modes)
        order = args.modes[k:] + args.modes[:k]  # rotate: every mode takes every position over the rounds
        profiles = args.profiles if rnd % 2 else list(reversed(args.profiles))
        for name in order:
            mode = modes[name]
            try:
                fact = {"round": rnd, "mode": name, **mode.enter(bench)}
                facts.append(fact)
                if args.warmup > 0:
                    baseline = client_sessions(bench.state, bench.src.name)
                    _wrk.run(bench.state, bench.src, _spec(args, mode.url(bench, args.path), args.warmup, False),
                             script, wrk)
                    fact["warmup_stalled_sessions"] = stalled_after(bench.state, bench.src.name, baseline,
                                                                    DRAIN_TIMEOUT_S)
                for profile in profiles:
                    run = measure_one(args, bench, mode, profile, f"round {rnd}, mode {name}, {profile}", wrk, script)
                    runs.append({"round": rnd, **run})
                    w, f = run["wrk"], run["faults"]
                    log(f"round {rnd}/{args.rounds}  {name:8s} {profile:10s} {w['rps']:10,.0f} req/s  "
                        f"p50 {w['latency_us']['percentiles']['50'] / 1000:6.2f} ms  "
                        f"p99 {w['latency_us']['percentiles']['99'] / 1000:6.2f} ms  "
                        f"faults {f['socket_errors']}/{f['non_2xx']}/{f['misrouted_sessions']}/{f['stalled_sessions']}  "
                        f"path verified")
            finally:
                mode.leave(bench)
    return runs, facts


def measure_one(args, bench, mode, profile: str, what: str, wrk: str, script: Path) -> dict:
    """One measured wrk run with the counters read around it; raises unless the path is proven."""
    close = _report.PROFILES[profile]
    spec = _spec(args, mode.url(bench, args.path), args.duration, close)
    looping = fallback_sessions(bench.state)
    if looping:
        raise CaptureNotVerified(f"{what}: the proxies' raw-TCP backends hold sessions from earlier traffic, the "
                                 f"run would not measure this mode alone: {looping}")
    baseline = client_sessions(bench.state, bench.src.name)
    before_p, before_m = proxy_counters(bench.state), mode.counters(bench)
    cpu_before = _cpu.cpu_times()
    result = _wrk.run(bench.state, bench.src, spec, script, wrk)
    cpu = _cpu.cpu_times() - cpu_before
    after_p, after_m = proxy_counters(bench.state), mode.counters(bench)
    evidence = {"proxies": delta(before_p, after_p), "mechanism": delta(before_m, after_m)}
    if result.requests == 0:
        raise _wrk.WrkError(f"{what}: wrk completed no request ({result.errors})")
    non_2xx = result.errors.get("status", 0)
    if non_2xx > MAX_NON_2XX_SHARE * result.requests:
        raise _wrk.WrkError(f"{what}: {non_2xx} of {result.requests} responses were not 2xx/3xx, the path is "
                            f"broken (counter deltas: {evidence})")
    # At most one request per connection is in flight when wrk stops (no pipelining); the margin of twice
    # that only has to tell wrk's own traffic from another client's.
    slack = 2 * args.connections + result.error_total
    path = mode.proxy_path(bench)
    problems = check_proxies(path, evidence["proxies"], result.requests, slack)
    problems += mode.check(bench, evidence["mechanism"], result, close, args.connections)
    require(problems, what, evidence)
    lost = misrouted(path, evidence["proxies"])
    if lost:
        shut_fallback_sessions(bench.state, path)  # or their self-connection chains slow down later runs
    stalled = stalled_after(bench.state, bench.src.name, baseline, DRAIN_TIMEOUT_S)
    return {
        "mode": mode.name, "profile": profile, "url": spec.url, "wrk": result.to_dict(), "verified": True,
        "cpu": cpu_facts(cpu, result.requests),
        "faults": {"socket_errors": result.error_total - non_2xx, "non_2xx": non_2xx, "misrouted_sessions": lost,
                   "stalled_sessions": stalled},
        "evidence": evidence,
    }


def cpu_facts(cpu: _cpu.CpuTimes, requests: int) -> dict:
    """The machine's CPU during one run: how busy the guest kept the CPU it was given (near 1: the mode was
    CPU-bound), the share the hypervisor stole, and requests per busy CPU-second (the run's cost, whatever
    the steal)."""
    wall = cpu.busy + cpu.idle + cpu.steal
    given = cpu.busy + cpu.idle
    return {"busy_s": round(cpu.busy, 2), "idle_s": round(cpu.idle, 2), "steal_s": round(cpu.steal, 2),
            "busy_share": round(cpu.busy / given, 3) if given else 0.0,
            "steal_share": round(cpu.steal / wall, 3) if wall else 0.0,
            "requests_per_busy_cpu_s": round(requests / cpu.busy, 1) if cpu.busy else 0.0}


def _spec(args, url: str, duration: int, close: bool) -> _wrk.WrkSpec:
    return _wrk.WrkSpec(url=url, duration_s=duration, connections=args.connections, threads=args.threads,
                        close_each=close)


def _down(name: str, log) -> None:
    """Tear the lab down; a failure is reported but must not hide the error that brought us here."""
    failing = sys.exc_info()[1] is not None
    try:
        lab_core.down(name)
    except LabError as exc:
        if not failing:
            raise
        log(f"throughput: tearing down lab {name} failed too: {exc} (retry with `meshcni lab down --name {name}`)")


def _raise_on_sigterm(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def run(args, log=lambda msg: print(msg, file=sys.stderr, flush=True)) -> dict:
    if os.geteuid() != 0:
        raise BenchError("the throughput bench needs root (network namespaces, iptables, BPF)")
    wrk = _wrk.find_wrk()
    bpf_original, bpf_copy, bpf_sha = snapshot_bpf_sources()
    os.environ[BPF_DIR_ENV] = str(bpf_copy)
    try:
        # Imported only now: the loader reads MESHCNI_BPF_DIR when it is first imported.
        import _modes
        from meshcni.datapath import loader

        if loader.BPF_DIR != bpf_copy:
            raise BenchError(f"the BPF loader was imported before the sources were snapshotted ({loader.BPF_DIR})")
        started = datetime.now(timezone.utc)
        report = {
            "benchmark": "throughput",
            "what": "HTTP req/s and latency from pod A to nginx in pod B (wrk), per capture mode, median over "
                    "interleaved rounds",
            "when": started.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "command": args.command_line,
            "config": {k: getattr(args, k) for k in ("rounds", "duration", "warmup", "connections", "threads",
                                                     "pods", "modes", "profiles", "path", "splice")},
            "code": code_facts(bpf_original, bpf_sha),
            "host": host_facts(wrk),
        }
        log(f"lab {args.name}: {args.pods} pods, modes {','.join(args.modes)}, profiles {','.join(args.profiles)}, "
            f"{args.rounds} round(s) × {args.duration}s per run")
        state = lab_core.up(lab_core.LabOptions(name=args.name, pods=args.pods, capture=False))
        try:
            bench = _modes.Bench(state=state, src=state.pods[0], dst=state.pods[1],
                                 pin_dir=str(LabNames(args.name).bpf_pin_dir), splice=args.splice == "on")
            report["lab"] = {"name": state.name, "subnet": state.subnet,
                             "src": {"pod": bench.src.name, "ip": bench.src.ip},
                             "dst": {"pod": bench.dst.name, "ip": bench.dst.ip}}
            modes = {name: _modes.MODES[name]() for name in args.modes}
            with _wrk.LuaScript() as script:
                runs, facts = measure(args, bench, modes, wrk, script.path, log)
        finally:
            _down(args.name, log)
    finally:
        shutil.rmtree(bpf_copy, ignore_errors=True)
    summary = _report.summarize(runs)
    ratio = _report.ratios(summary)
    verdicts = _report.targets(summary, runs)
    report.update({
        "finished": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "capture_verified": all(r["verified"] for r in runs) and bool(runs),
        "summary": summary,
        "ratios": ratio,
        "targets": verdicts,
        "table_markdown": _report.markdown(summary, ratio, verdicts, args.modes),
        "mode_facts": facts,
        "runs": runs,
    })
    report["host"]["loadavg_1m_after"] = os.getloadavg()[0]
    return report


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _raise_on_sigterm)  # so the lab is torn down on `kill` as on Ctrl-C
    try:
        args = parse_args(argv)
        args.command_line = " ".join(["bench/throughput.py", *(sys.argv[1:] if argv is None else argv)])
        report = run(args)
    except (BenchError, CaptureNotVerified, _wrk.WrkError, LabError, SysError, OSError) as exc:
        print(f"throughput: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("throughput: interrupted; the lab was torn down", file=sys.stderr)
        return 130
    out = args.output or REPO / "bench" / "results" / f"throughput-{report['when'].replace('-', '').replace(':', '')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(report["table_markdown"])
    print(f"\nwritten to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
