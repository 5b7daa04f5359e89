"""Capture each direction of a pod with the backend the preflight plan names: the degraded-mode interceptor.

On a kernel that lacks one eBPF feature the agent does not give up eBPF altogether: with sk_lookup missing,
outbound is still captured at connect() time while inbound falls back to Istio's PREROUTING rules, and
with the cgroup connect hooks missing it is the other way round. The two halves never overlap — the eBPF
flags and the iptables chains of a pod are both written for exactly the directions they own — and they
compose on the wire because each side's proxy learns the original destination the same way either way
(SO_ORIGINAL_DST: conntrack after REDIRECT, the getsockopt program after connect-time capture, the local
address after sk_lookup). A pod whose own mode is `iptables` or `off` is captured that way whatever the
plan says; the plan only splits pods that asked for eBPF.

`capture` leaves a pod fully captured or not at all: if the second backend fails, both are released.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from meshcni.config import Mode
from meshcni.datapath.directions import BOTH, NONE, Direction
from meshcni.datapath.interceptor import PodNet

if TYPE_CHECKING:  # the backends pull in bcc-free but heavy modules; only their types are needed here
    from meshcni.datapath.ebpf import EbpfDatapath
    from meshcni.datapath.iptables import IptablesInterceptor
    from meshcni.preflight.plan import CapturePlan


class HybridInterceptor:
    """An `Interceptor` that gives outbound and inbound to (possibly) different backends."""

    mode = Mode.EBPF  # it serves the pods that asked for eBPF, in whatever degraded form the node allows

    def __init__(self, ebpf: "EbpfDatapath | None", iptables: "IptablesInterceptor | None", plan: "CapturePlan"):
        """`ebpf` (an EbpfDatapath) or `iptables` (an IptablesInterceptor) may be None when the plan gives
        that backend no direction, e.g. no eBPF datapath can be loaded without bcc."""
        self.ebpf = ebpf
        self.iptables = iptables
        self.plan = plan
        for backend, impl in ((Mode.EBPF, ebpf), (Mode.IPTABLES, iptables)):
            if impl is None and plan.directions(backend):
                names = ", ".join(sorted(d.value for d in plan.directions(backend)))
                raise ValueError(f"the plan captures {names} by {backend.value}, "
                                 f"but no {backend.value} backend was given")

    def split(self, pod: PodNet) -> dict[Mode, frozenset[Direction]]:
        """Which directions each backend captures for this pod."""
        if pod.config.mode is Mode.OFF:
            return {Mode.EBPF: NONE, Mode.IPTABLES: NONE}
        if pod.config.mode is Mode.IPTABLES:
            return {Mode.EBPF: NONE, Mode.IPTABLES: BOTH}
        return {Mode.EBPF: self.plan.directions(Mode.EBPF), Mode.IPTABLES: self.plan.directions(Mode.IPTABLES)}

    def capture(self, pod: PodNet) -> None:
        split = self.split(pod)
        try:
            self._apply_ebpf(pod, split[Mode.EBPF])
            self._apply_iptables(pod, split[Mode.IPTABLES])
        except BaseException:
            self.release(pod)
            raise

    def release(self, pod: PodNet) -> None:
        if self.ebpf is not None:
            self.ebpf.release(pod)
        if self.iptables is not None:
            self.iptables.release(pod)

    def verify(self, pod: PodNet) -> list[str]:
        split = self.split(pod)
        problems: list[str] = []
        if self.ebpf is not None:
            if split[Mode.EBPF]:
                problems += self.ebpf.verify(_as(pod, Mode.EBPF), directions=split[Mode.EBPF])
            elif self.ebpf.slot_of(pod) is not None:
                problems.append("the pod is enrolled in the eBPF datapath although no direction is captured by eBPF")
        if self.iptables is not None:
            if split[Mode.IPTABLES]:
                problems += self.iptables.verify(_as(pod, Mode.IPTABLES), directions=split[Mode.IPTABLES])
            else:
                problems += self.iptables.verify(_as(pod, Mode.OFF))  # anything of ours is a leftover
        return problems

    def _apply_ebpf(self, pod: PodNet, directions: frozenset[Direction]) -> None:
        if self.ebpf is None:
            return
        if directions:
            self.ebpf.capture(_as(pod, Mode.EBPF), directions=directions)
        else:
            self.ebpf.release(pod)

    def _apply_iptables(self, pod: PodNet, directions: frozenset[Direction]) -> None:
        if self.iptables is None:
            return
        if directions:
            self.iptables.capture(_as(pod, Mode.IPTABLES), directions=directions)
        else:
            self.iptables.release(pod)


def _as(pod: PodNet, mode: Mode) -> PodNet:
    """The pod with its config's mode set to the backend capturing it (each backend renders from the mode)."""
    return pod if pod.config.mode is mode else replace(pod, config=pod.config.with_mode(mode))
