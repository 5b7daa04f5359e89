"""Where a capture mechanism's CPU goes, by kernel and user function: `perf record -a` around
connection-per-request runs of two modes in one lab, and the difference per request, function by function.

`cost_per_request.py` says how much CPU a request costs in each mode; this says what the difference is made
of, including what no program accounting sees: the sockmap's psock life cycle, map locks, the sockops calls
the kernel makes on every TCP socket, and what splicing saves in the TCP stack. The modes take turns for
`--rounds` rounds (each an untimed 1 s warm-up, then a measured wrk run with perf sampling every CPU at
`--frequency` Hz). A sample stands for 1/frequency s of one CPU, so a function's µs per request is its
samples / frequency / requests, with samples summed over the rounds; the idle loop is left out. Groups:
`user` is user space (the proxies, nginx, wrk). In the kernel, `capture` is every function that exists
only for BPF, sockmap or socket storage (programs, helpers, maps, psocks, tcp_bpf): the mechanism's own
work, except the locks it takes, which land in `kernel other` with the scheduler, memory and syscalls;
`network stack` (TCP, IP, devices, bridge, netfilter, socket layer) is where splicing saves.

    .venv/bin/python bench/capture_profile.py [--modes explicit-routed,ebpf] [--rounds 4] [--duration 5]

Needs `perf` (Debian's linux-perf, which scripts/setup.sh installs). On a shared VM one round is noise (hence four);
the user and `kernel other` rows move with the hypervisor, the `capture` row much less.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import _modes  # noqa: E402
import _wrk  # noqa: E402

from meshcni.lab import lab as lab_core  # noqa: E402
from meshcni.lab.lab import LabNames  # noqa: E402

RESULTS = REPO / "bench" / "results"
CONNECTIONS = 32

# `perf report -n --sort sym` lines: "    11.49%    1234  [k] tcp_v4_rcv" ([k] kernel, [.] user space)
_REPORT_LINE = re.compile(r"^\s*[\d.]+%\s+(\d+)\s+(\[[k.]\])\s+(\S.*?)\s*$")
GROUPS = (
    ("idle", re.compile(r"safe_halt|(^|_)idle|mwait")),
    # Kernel BPF plumbing that runs whether or not meshcni is loaded (inode storage freed with every inode,
    # the trampoline of other tools' tracing programs) is not the capture's.
    ("kernel other", re.compile(r"inode_storage|__bpf_prog_enter|__bpf_prog_exit|__bpf_trampoline")),
    ("capture", re.compile(r"bpf|psock|sock_hash|sock_map|sockmap|htab|bpf_lru|sk_storage|local_storage|"
                           r"sk_msg|sk_lookup|mcni_|rcu_work|nulls_elem")),
    ("network stack", re.compile(r"^(tcp_|__tcp_|inet_|__inet_|ip_|__ip_|ipv4_|skb_|__skb_|__alloc_skb|kfree_skb|"
                          r"veth_|br_|__dev_|dev_|netif_|__netif_|net_rx|process_backlog|nf_|__nf_|sk_|"
                          r"__sk_|sock_|__sock_|lock_sock|release_sock|loopback_)")),
)


class ProfileError(RuntimeError):
    pass


def parse_report(text: str) -> Counter:
    """Samples per function from `perf report -n --no-children --sort sym --stdio` output, keyed "[k] name"
    for the kernel's functions and "[.] name" for user space's."""
    samples: Counter = Counter()
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = _REPORT_LINE.match(line)
        if m:
            samples[f"{m.group(2)} {m.group(3)}"] += int(m.group(1))
    return samples


def group_of(function: str) -> str:
    """`user` for user space (the proxies, nginx, wrk, libc); kernel functions by GROUPS, else `kernel other`."""
    kind, _, name = function.partition(" ")
    if kind == "[.]":
        return "user"
    for group, pattern in GROUPS:
        if pattern.search(name):
            return group
    return "kernel other"


def per_request(samples: Counter, requests: int, frequency: int) -> dict[str, float]:
    """Function -> CPU µs per request."""
    if requests <= 0:
        raise ProfileError("a profiled run served no request")
    return {sym: n / frequency * 1e6 / requests for sym, n in samples.items()}


def summarize(us: dict[str, float]) -> dict[str, float]:
    """µs per request by group, and `busy` (everything but idle)."""
    out = {name: 0.0 for name, _ in GROUPS} | {"kernel other": 0.0, "user": 0.0}
    for sym, v in us.items():
        out[group_of(sym)] += v
    out["busy"] = sum(v for k, v in out.items() if k != "idle")
    return out


def difference(base: dict[str, float], other: dict[str, float], top: int) -> list[tuple[str, float, float]]:
    """(function, base µs, other µs) for the `top` functions whose cost changed most, biggest change first;
    idle is not a cost."""
    syms = [s for s in set(base) | set(other) if group_of(s) != "idle"]
    syms.sort(key=lambda s: -abs(other.get(s, 0.0) - base.get(s, 0.0)))
    return [(s, base.get(s, 0.0), other.get(s, 0.0)) for s in syms[:top]]


def profile_run(b, mode, wrk: str, script: Path, duration: int, frequency: int, workdir: Path) -> tuple[Counter, int]:
    """One measured run of `mode` under perf; returns (samples per function, requests)."""
    mode.enter(b)
    try:
        warm = _wrk.WrkSpec(url=mode.url(b, "/"), duration_s=1, connections=CONNECTIONS, threads=1, close_each=True)
        _wrk.run(b.state, b.src, warm, script, wrk)
        data = workdir / "perf.data"
        # perf samples for a little longer than wrk runs; the few samples outside wrk's window are the idle
        # machine's, which the idle group takes.
        perf = subprocess.Popen(["perf", "record", "-a", "-F", str(frequency), "-o", str(data), "--",
                                 "sleep", str(duration + 1)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            time.sleep(0.3)
            spec = _wrk.WrkSpec(url=mode.url(b, "/"), duration_s=duration, connections=CONNECTIONS, threads=1,
                                close_each=True)
            result = _wrk.run(b.state, b.src, spec, script, wrk)
        finally:
            _, err = perf.communicate(timeout=duration + 60)
        if perf.returncode != 0:
            raise ProfileError(f"perf record failed: {err.decode(errors='replace')[-400:]}")
        report = subprocess.run(["perf", "report", "-i", str(data), "-n", "--no-children", "--sort", "sym",
                                 "--percent-limit", "0", "--stdio"], capture_output=True, text=True, check=True)
        data.unlink()
    finally:
        mode.leave(b)
    return parse_report(report.stdout), result.requests


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modes", default="explicit-routed,ebpf", help="two modes: the base, then the one to explain")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--duration", type=int, default=5, help="seconds per measured run")
    ap.add_argument("--frequency", type=int, default=1999, help="perf samples per second per CPU")
    ap.add_argument("--top", type=int, default=25, help="functions to list")
    args = ap.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    if len(modes) != 2 or any(m not in _modes.MODES for m in modes):
        ap.error(f"--modes takes two of {', '.join(_modes.MODES)}")
    if os.geteuid() != 0:
        print("capture_profile: needs root (network namespaces, BPF, perf -a)", file=sys.stderr)
        return 2
    if shutil.which("perf") is None:
        print("capture_profile: needs perf (apt-get install linux-perf)", file=sys.stderr)
        return 2
    name = f"prof-{os.getpid()}"
    samples = {m: Counter() for m in modes}
    requests = {m: 0 for m in modes}
    state = lab_core.up(lab_core.LabOptions(name=name, pods=2, capture=False))
    try:
        b = _modes.Bench(state=state, src=state.pods[0], dst=state.pods[1], pin_dir=str(LabNames(name).bpf_pin_dir))
        wrk = _wrk.find_wrk()
        with _wrk.LuaScript() as script, tempfile.TemporaryDirectory(prefix="meshcni-perf-") as tmp:
            for rnd in range(args.rounds):
                for m in (modes if rnd % 2 == 0 else list(reversed(modes))):
                    got, n = profile_run(b, _modes.MODES[m](), wrk, script.path, args.duration, args.frequency,
                                         Path(tmp))
                    samples[m] += got
                    requests[m] += n
                    print(f"round {rnd + 1} {m:16s} {n / args.duration:8,.0f} req/s", file=sys.stderr, flush=True)
    finally:
        lab_core.down(name)

    base, other = modes
    us = {m: per_request(samples[m], requests[m], args.frequency) for m in modes}
    groups = {m: summarize(us[m]) for m in modes}
    print(f"| CPU µs per request | {base} | {other} | difference |\n|---|---:|---:|---:|")
    for g in ("busy", "capture", "network stack", "kernel other", "user"):
        print(f"| {g} | {groups[base][g]:.1f} | {groups[other][g]:.1f} | {groups[other][g] - groups[base][g]:+.1f} |")
    print(f"\n| function | group | {base} µs | {other} µs | difference |\n|---|---|---:|---:|---:|")
    rows = difference(us[base], us[other], args.top)
    for sym, a, c in rows:
        print(f"| `{sym}` | {group_of(sym)} | {a:.2f} | {c:.2f} | {c - a:+.2f} |")

    capture = sorted((s for s in us[other] if group_of(s) == "capture"), key=lambda s: -us[other][s])[:args.top]
    print(f"\n| {other}'s capture functions | µs per request |\n|---|---:|")
    for sym in capture:
        print(f"| `{sym}` | {us[other][sym]:.2f} |")

    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"capture_profile-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    out.write_text(json.dumps({
        "config": vars(args), "requests": requests, "groups_us_per_request": groups,
        "top": [{"function": s, "group": group_of(s), base: a, other: c} for s, a, c in rows],
        "capture": {s: us[other][s] for s in capture},
    }, indent=1) + "\n")
    print(f"\nwritten to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
