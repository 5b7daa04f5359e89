"""Connection events from the eBPF datapath: one per capture decision, while someone watches.

The connect hooks and sk_lookup write a `struct mcni_event` to the pinned ring buffer `mcni_events_v1` for
each decision they take (captured, bypassed and why, steered, no listener, error), but only while
`mcni_events_ctl_v1[0]` is set: with nobody watching, a decision costs one array lookup more. `EventTap` is
the ring's single reader: opening it drains what an earlier reader left and turns events on, closing it
turns them off. Events the kernel could not write because the ring was full are counted in
`mcni_events_ctl_v1[1]`, never silently lost. Times are CLOCK_MONOTONIC nanoseconds, as the kernel stamps
them; `wall_clock_ns` converts.
"""

from __future__ import annotations

import ctypes
import os
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from meshcni.datapath import layout as L
from meshcni.sys import bpf
from meshcni.sys.ringbuf import RingBuffer

CTL_MAP = "mcni_events_ctl_v1"
RING_MAP = "mcni_events_v1"


@dataclass(frozen=True)
class ConnectionEvent:
    time_ns: int  # CLOCK_MONOTONIC
    slot: int
    kind: str  # layout.EVENT_KINDS
    reason: str  # layout.EVENT_REASONS; "" unless bypassed
    family: int  # 4 or 6
    src: str  # inbound: the peer; outbound: "" (the socket is not bound yet at connect())
    sport: int
    dst: str  # the original destination
    dport: int
    pid: int  # outbound: the connecting process; inbound: 0
    uid: int
    comm: str

    @classmethod
    def decode(cls, raw: bytes) -> "ConnectionEvent":
        if len(raw) != ctypes.sizeof(L.Event):  # the C and Python layouts drifted apart
            raise ValueError(f"a connection event is {ctypes.sizeof(L.Event)} bytes, got {len(raw)}")
        e = L.Event.from_buffer_copy(raw)
        src = e.src.address()
        return cls(
            time_ns=e.ts_ns, slot=e.slot, kind=L.EVENT_KINDS.get(e.kind, f"kind-{e.kind}"),
            reason=L.EVENT_REASONS.get(e.reason, f"reason-{e.reason}"),
            family=6 if e.family == socket.AF_INET6 else 4,
            src="" if src.is_unspecified else str(src), sport=e.sport, dst=str(e.dst.address()), dport=e.dport,
            pid=e.pid, uid=e.uid, comm=e.comm.decode("utf-8", errors="replace"),
        )

    def to_dict(self) -> dict:
        return asdict(self)


def wall_clock_ns(monotonic_ns: int) -> int:
    """A CLOCK_MONOTONIC stamp as Unix time, by the clocks' offset now."""
    return monotonic_ns + time.time_ns() - time.monotonic_ns()


class EventTap:
    """The single reader of a datapath's event ring, given its pin directory; events are on while open."""

    def __init__(self, pin_dir: str | Path):
        pin_dir = Path(pin_dir)
        self._ctl = _open_ctl(pin_dir)
        try:
            self._ring_fd = bpf.obj_get(str(pin_dir / RING_MAP))
            try:
                self._ring = RingBuffer(self._ring_fd)
            except BaseException:
                os.close(self._ring_fd)
                raise
        except BaseException:
            self._ctl.close()
            raise
        self._ring.read()  # what an earlier reader left is stale
        _set_on(self._ctl, True)

    def read(self, timeout: float = 0.0, limit: int = 0) -> list[ConnectionEvent]:
        """Events written since the last read, waiting up to `timeout` seconds for the first one."""
        return [ConnectionEvent.decode(raw) for raw in self._ring.poll(timeout, limit)]

    def lost(self) -> int:
        """Events dropped so far because the ring was full (since the datapath was loaded)."""
        return int(self._ctl.lookup(L.U32(L.EV_CTL_LOST)).value)

    def close(self) -> None:
        try:
            _set_on(self._ctl, False)
        finally:
            self._ring.close()
            os.close(self._ring_fd)
            self._ctl.close()

    def __enter__(self) -> "EventTap":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def switch_off(pin_dir: str | Path) -> None:
    """Turn events off without reading them: what a starting agent does, since a reader that died (with the
    agent it ran in) left them on, to fill a ring nobody reads."""
    ctl = _open_ctl(Path(pin_dir))
    try:
        _set_on(ctl, False)
    finally:
        ctl.close()


def _open_ctl(pin_dir: Path) -> bpf.RawMap:
    return bpf.RawMap(bpf.obj_get(str(pin_dir / CTL_MAP)), CTL_MAP, L.U32, L.U64)


def _set_on(ctl: bpf.RawMap, on: bool) -> None:
    ctl.update(L.U32(L.EV_CTL_ON), L.U64(1 if on else 0))
