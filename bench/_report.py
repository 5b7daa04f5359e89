"""Turn the throughput bench's per-round runs into medians, ratios, target verdicts and a markdown table.

Rounds are the unit of noise: each (profile, mode) gets one figure per round, and the summary is the median
across rounds (with the range beside it, so a reader sees how stable the figure is). Ratios are taken
between medians. The targets are the ones the issues set; they are reported as met or not met, never used
to change what is measured. Beside each verdict is a 90% interval for the ratio, from resampling whole rounds
(both modes of a round together: they ran back to back, under the same load on the host): a ratio whose interval
straddles the bound is within this machine's noise of it, and the report says so instead of letting a
single median decide. Runs that recorded the machine's CPU also get requests per busy CPU-second, and each
req/s target is checked a second time on that figure: on a VM whose hypervisor steals a varying share of the
CPU, it is what a mode costs, where req/s also measures how much was stolen during its run.
"""

from __future__ import annotations

import random
import statistics

PROFILES = {"keep-alive": False, "close": True}  # profile -> wrk sends "Connection: close"
PROFILE_TITLES = {"keep-alive": "keep-alive", "close": "connection-per-request"}

# (profile, numerator, denominator, metric, minimum ratio): rps ratios must reach the minimum; for p99 the
# ratio is ebpf/iptables latency and must not exceed 1.0 ("no worse").
TARGETS = (
    ("keep-alive", "ebpf", "explicit", "rps", 0.97),
    ("close", "ebpf", "explicit", "rps", 0.97),
    ("keep-alive", "ebpf", "explicit-routed", "rps", 0.97),
    ("close", "ebpf", "explicit-routed", "rps", 0.97),
    ("keep-alive", "ebpf", "iptables", "rps", 1.0),
    ("close", "ebpf", "iptables", "rps", 1.15),
    ("keep-alive", "ebpf", "iptables", "p99", 1.0),
    ("close", "ebpf", "iptables", "p99", 1.0),
)


def summarize(runs: list[dict]) -> dict[str, dict[str, dict]]:
    """profile -> mode -> medians over rounds of req/s, p50 and p99 (ms), with ranges and error totals."""
    grouped: dict[tuple[str, str], list[dict]] = {}
    for run in runs:
        grouped.setdefault((run["profile"], run["mode"]), []).append(run)
    out: dict[str, dict[str, dict]] = {}
    for (profile, mode), rs in grouped.items():
        rps = [r["wrk"]["rps"] for r in rs]
        p50 = [r["wrk"]["latency_us"]["percentiles"]["50"] / 1000 for r in rs]
        p99 = [r["wrk"]["latency_us"]["percentiles"]["99"] / 1000 for r in rs]
        per_cpu = [r["cpu"]["requests_per_busy_cpu_s"] for r in rs if r.get("cpu")]
        cpu_figures = {}
        if per_cpu and len(per_cpu) == len(rs):
            cpu_figures = {
                "req_per_cpu_s_median": round(statistics.median(per_cpu), 1),
                "busy_share_median": round(statistics.median(r["cpu"]["busy_share"] for r in rs), 3),
                "steal_share_median": round(statistics.median(r["cpu"]["steal_share"] for r in rs), 3),
                "steal_share_max": round(max(r["cpu"]["steal_share"] for r in rs), 3),
            }
        out.setdefault(profile, {})[mode] = {
            "rounds": len(rs),
            "rps_median": round(statistics.median(rps), 1),
            "rps_min": round(min(rps), 1),
            "rps_max": round(max(rps), 1),
            "p50_ms_median": round(statistics.median(p50), 3),
            "p99_ms_median": round(statistics.median(p99), 3),
            "p99_ms_max": round(max(p99), 3),
            "requests_total": sum(r["wrk"]["requests"] for r in rs),
            "socket_errors_total": sum(r["faults"]["socket_errors"] for r in rs),
            "non_2xx_total": sum(r["faults"]["non_2xx"] for r in rs),
            "misrouted_sessions_total": sum(r["faults"]["misrouted_sessions"] for r in rs),
            "stalled_sessions_total": sum(r["faults"]["stalled_sessions"] for r in rs),
            **cpu_figures,
        }
    return out


def ratios(summary: dict) -> dict[str, dict[str, float]]:
    """Per profile: ebpf/explicit and ebpf/iptables for req/s, and ebpf/iptables for p50 and p99."""
    out: dict[str, dict[str, float]] = {}
    for profile, modes in summary.items():
        r = {}
        ebpf = modes.get("ebpf")
        if ebpf:
            for other in ("explicit", "explicit-routed", "iptables", "direct"):
                if other in modes and modes[other]["rps_median"]:
                    r[f"rps_ebpf_over_{other}"] = round(ebpf["rps_median"] / modes[other]["rps_median"], 3)
                if other in modes and ebpf.get("req_per_cpu_s_median") and modes[other].get("req_per_cpu_s_median"):
                    r[f"req_per_cpu_s_ebpf_over_{other}"] = round(
                        ebpf["req_per_cpu_s_median"] / modes[other]["req_per_cpu_s_median"], 3)
            if "iptables" in modes:
                for p in ("p50", "p99"):
                    base = modes["iptables"][f"{p}_ms_median"]
                    if base:
                        r[f"{p}_ebpf_over_iptables"] = round(ebpf[f"{p}_ms_median"] / base, 3)
        out[profile] = r
    return out


BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 1  # fixed, so the same runs always print the same interval


METRIC_MEDIANS = {"rps": "rps_median", "req_per_cpu_s": "req_per_cpu_s_median", "p99": "p99_ms_median"}


def run_value(run: dict, metric: str) -> float:
    """One run's figure for a metric: req/s, requests per busy CPU-second, or p99 in ms."""
    if metric == "req_per_cpu_s":
        return run["cpu"]["requests_per_busy_cpu_s"]
    wrk = run["wrk"]
    return wrk["rps"] if metric == "rps" else wrk["latency_us"]["percentiles"]["99"] / 1000


def bootstrap_interval(items: list, statistic, level: float = 0.90) -> tuple[float, float] | None:
    """A `level` interval for statistic(items), from resampling the items with replacement (a resample whose
    statistic is None is skipped); None with fewer than three items (too few to resample)."""
    if len(items) < 3:
        return None
    rng = random.Random(BOOTSTRAP_SEED)
    values = sorted(v for v in (statistic(rng.choices(items, k=len(items))) for _ in range(BOOTSTRAP_RESAMPLES))
                    if v is not None)
    tail = (1 - level) / 2
    return values[int(tail * (len(values) - 1))], values[int((1 - tail) * (len(values) - 1))]


def clearly(interval: tuple[float, float], bound: float, higher_is_better: bool) -> str:
    """Where an interval lies against a bound: wholly on the good side ("met"), wholly on the bad side
    ("not met"), or across it ("within noise")."""
    lo, hi = interval
    whole_ok, part_ok = (lo >= bound, hi >= bound) if higher_is_better else (hi <= bound, lo <= bound)
    return "met" if whole_ok else ("within noise" if part_ok else "not met")


def ratio_interval(runs: list[dict], profile: str, num: str, den: str, metric: str,
                   level: float = 0.90) -> tuple[float, float] | None:
    """A `level` interval for median(num)/median(den), by resampling rounds with replacement; None with fewer
    than three rounds that ran both modes (too few to resample)."""
    by_round: dict[int, dict[str, float]] = {}
    for run in runs:
        if run["profile"] == profile and run["mode"] in (num, den):
            by_round.setdefault(run["round"], {})[run["mode"]] = run_value(run, metric)
    pairs = [(r[num], r[den]) for r in by_round.values() if num in r and den in r]

    def ratio_of_medians(sample: list[tuple[float, float]]) -> float | None:
        den_median = statistics.median(d for _, d in sample)
        return statistics.median(n for n, _ in sample) / den_median if den_median else None

    return bootstrap_interval(pairs, ratio_of_medians, level)


def targets(summary: dict, runs: list[dict] | None = None) -> list[dict]:
    """The issues' targets against the medians; with the runs, each gets its 90% interval and whether the
    interval clears the bound ("met"), misses it entirely ("not met") or straddles it ("within noise"). A req/s
    target is also checked on requests per busy CPU-second where both modes recorded it."""
    verdicts = []
    for profile, num, den, metric, bound in TARGETS:
        modes = summary.get(profile, {})
        if num not in modes or den not in modes:
            continue
        checks = [metric]
        if metric == "rps" and modes[num].get("req_per_cpu_s_median") and modes[den].get("req_per_cpu_s_median"):
            checks.append("req_per_cpu_s")
        for m in checks:
            key = METRIC_MEDIANS[m]
            value = modes[num][key] / modes[den][key]
            higher_is_better = m != "p99"
            met = value >= bound if higher_is_better else value <= bound
            if m == "rps":
                text = f"{num} req/s ≥ {bound:g}× {den} ({PROFILE_TITLES[profile]})"
            elif m == "req_per_cpu_s":
                text = f"{num} requests per busy CPU-second ≥ {bound:g}× {den} ({PROFILE_TITLES[profile]})"
            else:
                text = f"{num} p99 no worse than {den} ({PROFILE_TITLES[profile]})"
            verdict = {"target": text, "profile": profile, "metric": m, "ratio": round(value, 3), "bound": bound,
                       "met": met}
            interval = ratio_interval(runs, profile, num, den, m) if runs else None
            if interval:
                verdict["interval90"] = [round(interval[0], 3), round(interval[1], 3)]
                verdict["clearly"] = clearly(interval, bound, higher_is_better)
            verdicts.append(verdict)
    return verdicts


def _cpu_cells(s: dict) -> str:
    if "req_per_cpu_s_median" not in s:
        return "– | –"
    return (f"{s['req_per_cpu_s_median']:,.0f} | {s['busy_share_median']:.0%} / {s['steal_share_median']:.0%} "
            f"({s['steal_share_max']:.0%})")


def markdown(summary: dict, ratio: dict, verdicts: list[dict], mode_order: list[str]) -> str:
    lines = [
        "| profile | mode | req/s (median) | req/s range | p50 ms | p99 ms "
        "| faults: socket / non-2xx / misrouted / stalled | req per busy CPU-s | CPU busy / stolen (max) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for profile in PROFILES:
        for mode in mode_order:
            s = summary.get(profile, {}).get(mode)
            if s is None:
                continue
            lines.append(
                f"| {PROFILE_TITLES[profile]} | {mode} | {s['rps_median']:,.0f} | "
                f"{s['rps_min']:,.0f}–{s['rps_max']:,.0f} | {s['p50_ms_median']:.2f} | {s['p99_ms_median']:.2f} | "
                f"{s['socket_errors_total']} / {s['non_2xx_total']} / {s['misrouted_sessions_total']} / "
                f"{s['stalled_sessions_total']} | " + _cpu_cells(s) + " |"
            )
    ratio_rows = [(p, r) for p, r in ratio.items() if r]
    if ratio_rows:
        lines += ["", "| profile | ebpf/explicit req/s | ebpf/explicit-routed req/s | ebpf/iptables req/s | "
                      "ebpf/iptables p99 |", "|---|---:|---:|---:|---:|"]
        for profile in PROFILES:
            r = ratio.get(profile)
            if not r:
                continue
            cells = [r.get(k) for k in ("rps_ebpf_over_explicit", "rps_ebpf_over_explicit-routed",
                                         "rps_ebpf_over_iptables", "p99_ebpf_over_iptables")]
            lines.append(f"| {PROFILE_TITLES[profile]} | " + " | ".join("–" if c is None else f"{c:.2f}" for c in cells)
                         + " |")
    if verdicts:
        lines += ["", "| target | measured | 90% interval | met | clearly |", "|---|---:|---:|---|---|"]
        for v in verdicts:
            interval = "{:.3f}–{:.3f}".format(*v["interval90"]) if "interval90" in v else "–"
            lines.append(f"| {v['target']} | {v['ratio']:.3f} | {interval} | {'yes' if v['met'] else 'no'} | "
                         f"{v.get('clearly', '–')} |")
    return "\n".join(lines)
