"""From a probe report to a capture plan: which backend captures each direction, and what was given up.

Each direction uses eBPF when every feature its hooks need is present, else iptables when iptables works,
else nothing — and every step down is written into `degraded` as a sentence naming the missing features, so
`meshcni doctor`, the agent's `status` and its metrics all say the same thing. Requirements, and why:

- common to any eBPF capture: bpf(2), bpffs (everything is pinned), bcc and kernel headers (the programs
  are compiled at load time), and netns cookies (pods are enrolled by the cookie of their netns).
- outbound: cgroup v2 with connect4/6 (the capture itself), sockops (moves the original destination to the
  connection's tuple) and cgroup getsockopt (answers SO_ORIGINAL_DST for the proxy).
- inbound: sk_lookup (steers SYNs to the proxy's listener without rewriting packets).
- splicing of local socket pairs: SOCKHASH + sk_msg, and only on top of eBPF outbound, whose sockops fills it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from meshcni.config import Mode
from meshcni.datapath.directions import Direction
from meshcni.preflight.report import Report

COMMON_EBPF = ("bpf_syscall", "bpffs", "bcc", "kernel_headers", "netns_cookie")
OUTBOUND_EBPF = COMMON_EBPF + ("cgroup_v2", "cgroup_sock_addr", "sockops", "cgroup_getsockopt")
INBOUND_EBPF = COMMON_EBPF + ("sk_lookup",)
SPLICE = ("sk_msg_sockhash",)

EXIT_FULL = 0
EXIT_DEGRADED = 1
EXIT_NO_CAPTURE = 2


@dataclass(frozen=True)
class CapturePlan:
    outbound: Mode
    inbound: Mode
    splice: bool
    degraded: list[str] = field(default_factory=list)

    def mode_of(self, direction: Direction) -> Mode:
        return self.outbound if direction is Direction.OUTBOUND else self.inbound

    def directions(self, backend: Mode) -> frozenset[Direction]:
        """The directions the plan gives to `backend`."""
        return frozenset(d for d in Direction if self.mode_of(d) is backend)

    @property
    def full(self) -> bool:
        """Everything by eBPF, splicing available: nothing was given up."""
        return self.outbound is Mode.EBPF and self.inbound is Mode.EBPF and self.splice and not self.degraded

    @property
    def captures(self) -> bool:
        return self.outbound is not Mode.OFF or self.inbound is not Mode.OFF

    @property
    def exit_code(self) -> int:
        if self.full:
            return EXIT_FULL
        return EXIT_DEGRADED if self.captures else EXIT_NO_CAPTURE

    def to_dict(self) -> dict:
        return {"outbound": self.outbound.value, "inbound": self.inbound.value, "splice": self.splice,
                "full": self.full, "degraded": list(self.degraded)}


def _why(report: Report, features) -> list[str]:
    return [f"{f} ({report.result(f).detail})" for f in features if not report.ok(f)]


def _direction(report: Report, direction: Direction, needs: tuple[str, ...], degraded: list[str]) -> Mode:
    missing = _why(report, needs)
    if not missing:
        return Mode.EBPF
    because = f"eBPF needs {'; '.join(missing)}"
    if report.ok("iptables"):
        degraded.append(f"{direction.value} by iptables: {because}")
        return Mode.IPTABLES
    degraded.append(f"{direction.value} not captured: {because}, and iptables is unavailable "
                    f"({report.result('iptables').detail})")
    return Mode.OFF


def plan(report: Report) -> CapturePlan:
    degraded: list[str] = []
    outbound = _direction(report, Direction.OUTBOUND, OUTBOUND_EBPF, degraded)
    inbound = _direction(report, Direction.INBOUND, INBOUND_EBPF, degraded)
    splice = outbound is Mode.EBPF and not _why(report, SPLICE)
    if outbound is Mode.EBPF and not splice:
        degraded.append(f"no same-node splicing: it needs {'; '.join(_why(report, SPLICE))}")
    return CapturePlan(outbound=outbound, inbound=inbound, splice=splice, degraded=degraded)
