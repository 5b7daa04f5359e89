"""Pool the rounds of several throughput reports into one verdict per target.

One run of `throughput.py` cannot resolve a few percent on this machine: the hypervisor's steal moves a
run by 10–20% and a burst can halve it, so a 15-round interval is often wider than the margin it has to
decide. Rounds can be pooled across runs, though, if what is pooled is each round's *paired ratio* (the two
modes ran back to back in that round, under the same load) rather than the absolute figures, which drift by
up to half between hours. For each of the issues' targets (`_report.TARGETS`), and for the ceilings no
capture can pass (`explicit-routed`, the capture listeners' handling without capture, against `explicit` and
against `iptables`), this prints the median of the per-round ratios over every round of every report that
ran both modes, with a 90% interval from resampling those rounds, on req/s, on requests per busy CPU-second
and on p99.

    .venv/bin/python bench/pooled.py bench/results/throughput-A.json bench/results/throughput-B.json ...

Prints a markdown table; `--output F` also writes it as JSON. Reads reports only: it measures nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _report  # noqa: E402

# Not targets: the capture listeners' handling with no capture at all (`explicit-routed`) against `explicit`
# and against `iptables`. A capture that cost nothing would measure these, so they are the ceilings of any
# capture's ratio to `explicit` and to `iptables` with this sidecar.
CEILINGS = tuple((profile, "explicit-routed", den, "rps", None)
                 for den in ("explicit", "iptables") for profile in ("keep-alive", "close"))
LEVEL = 0.90


class PoolError(RuntimeError):
    """A file could not be read, or is not a throughput report."""


@dataclass(frozen=True)
class Pooled:
    profile: str
    num: str
    den: str
    metric: str  # rps | req_per_cpu_s | p99
    bound: float | None  # None: shown for reference, no target
    rounds: int
    reports: int
    median: float
    interval90: tuple[float, float] | None

    @property
    def higher_is_better(self) -> bool:
        return self.metric != "p99"

    def verdict(self) -> str:
        """met / within noise / not met by where the interval lies; '–' without a bound or an interval."""
        if self.bound is None or self.interval90 is None:
            return "–"
        return _report.clearly(self.interval90, self.bound, self.higher_is_better)


def load(paths: list[Path]) -> list[list[dict]]:
    """Each report's runs; refuses a file that is not a throughput report."""
    out = []
    for path in paths:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise PoolError(f"{path}: cannot read a JSON report ({exc})") from exc
        runs = data.get("runs") if isinstance(data, dict) else None
        if not isinstance(runs, list):
            raise PoolError(f"{path}: no 'runs' list; is it a bench/throughput.py report?")
        out.append(runs)
    return out


def paired_ratios(reports: list[list[dict]], profile: str, num: str, den: str, metric: str) -> tuple[list[float], int]:
    """num/den for every round (of every report) that ran both modes in `profile` and has the metric; and how
    many reports contributed."""
    ratios, used = [], 0
    for runs in reports:
        by_round: dict[int, dict[str, dict]] = {}
        for run in runs:
            if run.get("profile") == profile and run.get("mode") in (num, den):
                by_round.setdefault(run["round"], {})[run["mode"]] = run
        found = 0
        for pair in by_round.values():
            if num not in pair or den not in pair:
                continue
            if metric == "req_per_cpu_s" and not (pair[num].get("cpu") and pair[den].get("cpu")):
                continue
            d = _report.run_value(pair[den], metric)
            if d:
                ratios.append(_report.run_value(pair[num], metric) / d)
                found += 1
        used += bool(found)
    return ratios, used


def interval(ratios: list[float], level: float = LEVEL) -> tuple[float, float] | None:
    """A `level` interval for the median ratio by resampling rounds (fixed seed: the same reports always give
    the same interval); None with fewer than three rounds."""
    return _report.bootstrap_interval(ratios, statistics.median, level)


def pool(reports: list[list[dict]]) -> list[Pooled]:
    """Every target (and ceiling) the reports have rounds for, on each metric it is judged by."""
    out = []
    for profile, num, den, metric, bound in (*_report.TARGETS, *CEILINGS):
        for m in (metric, "req_per_cpu_s") if metric == "rps" else (metric,):
            ratios, used = paired_ratios(reports, profile, num, den, m)
            if not ratios:
                continue
            iv = interval(ratios)
            out.append(Pooled(profile, num, den, m, bound, len(ratios), used, round(statistics.median(ratios), 3),
                              (round(iv[0], 3), round(iv[1], 3)) if iv else None))
    return out


METRIC_TITLES = {"rps": "req/s", "req_per_cpu_s": "req per busy CPU-s", "p99": "p99 (lower is better)"}


def markdown(rows: list[Pooled]) -> str:
    lines = ["| profile | ratio | metric | bound | rounds (reports) | median of per-round ratios | 90% interval "
             "| verdict |",
             "|---|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        bound = "–" if r.bound is None else (f"≥ {r.bound:g}" if r.higher_is_better else f"≤ {r.bound:g}")
        iv = "–" if r.interval90 is None else f"{r.interval90[0]:.3f}–{r.interval90[1]:.3f}"
        lines.append(f"| {_report.PROFILE_TITLES[r.profile]} | {r.num}/{r.den} | {METRIC_TITLES[r.metric]} | {bound} | "
                     f"{r.rounds} ({r.reports}) | {r.median:.3f} | {iv} | {r.verdict()} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("reports", nargs="+", type=Path, help="bench/results/throughput-*.json files")
    p.add_argument("--output", type=Path, help="also write the pooled figures as JSON here")
    args = p.parse_args(argv)
    try:
        rows = pool(load(args.reports))
    except PoolError as exc:
        print(f"pooled: {exc}", file=sys.stderr)
        return 2
    if not rows:
        print("pooled: no round in these reports ran both modes of any target", file=sys.stderr)
        return 2
    print(markdown(rows))
    if args.output:
        args.output.write_text(json.dumps({"reports": [str(r) for r in args.reports],
                                           "pooled": [{**asdict(r), "verdict": r.verdict()} for r in rows]},
                                          indent=2) + "\n")
        print(f"\nwritten to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
