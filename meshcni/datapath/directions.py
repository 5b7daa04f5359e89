"""The two directions of a pod's traffic a backend can capture, so one pod can be split between two backends.

On a kernel that lacks one eBPF feature the agent captures outbound and inbound with different backends (for
example connect-time eBPF outbound and iptables inbound when sk_lookup is missing). Both interceptors take a
set of `Direction`s; the default `BOTH` keeps their whole-pod behaviour unchanged.
"""

from __future__ import annotations

import enum
from typing import Iterable


class Direction(str, enum.Enum):
    """Which side of a pod's connections a backend captures."""

    OUTBOUND = "outbound"  # connections the pod's app opens
    INBOUND = "inbound"  # connections other pods open to the pod


BOTH: frozenset[Direction] = frozenset(Direction)
NONE: frozenset[Direction] = frozenset()


def directions(values: Iterable[Direction | str]) -> frozenset[Direction]:
    """A frozen set of directions from enum members or their names; an unknown name is a ValueError."""
    out = set()
    for v in values:
        try:
            out.add(Direction(v))
        except ValueError:
            raise ValueError(f"{v!r} is not a direction (outbound, inbound)") from None
    return frozenset(out)
