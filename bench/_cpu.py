"""The machine's CPU time from /proc/stat, split the way a bench on a shared VM needs it.

`busy` is what the guest's CPUs spent working (user, nice, system, irq, softirq); `steal` is what the
hypervisor gave to other guests while this one wanted to run; `idle` includes iowait. Requests per busy
CPU-second is what a mode costs, unaffected by how much the hypervisor happened to steal during its run, where
requests per wall-clock second are not (see "Reading the throughput figures" in bench/README.md).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path

PROC_STAT = Path("/proc/stat")


@dataclass(frozen=True)
class CpuTimes:
    user: float
    system: float
    softirq: float  # irq + softirq: where most of TCP receive runs
    idle: float
    steal: float

    @property
    def busy(self) -> float:
        return self.user + self.system + self.softirq

    def __sub__(self, other: CpuTimes) -> CpuTimes:
        return CpuTimes(*(getattr(self, f.name) - getattr(other, f.name) for f in fields(self)))


def cpu_times(stat: str | None = None) -> CpuTimes:
    """Seconds so far, summed over all CPUs (the aggregate "cpu" line of /proc/stat)."""
    text = PROC_STAT.read_text() if stat is None else stat
    fields = text.splitlines()[0].split()
    if fields[0] != "cpu":
        raise ValueError(f"unexpected first line of /proc/stat: {text.splitlines()[0]!r}")
    v = [int(x) for x in fields[1:]] + [0] * 8  # older kernels omit the trailing columns
    hz = os.sysconf("SC_CLK_TCK")
    # user nice system idle iowait irq softirq steal
    return CpuTimes(user=(v[0] + v[1]) / hz, system=v[2] / hz, softirq=(v[5] + v[6]) / hz,
                    idle=(v[3] + v[4]) / hz, steal=v[7] / hz)
