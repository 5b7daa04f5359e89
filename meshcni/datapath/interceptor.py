"""The one interface every capture backend implements, and the description of a pod they capture.

Modes are backends (eBPF, iptables) rather than `if mode ==` branches: the agent and the lab hold a mapping
from `Mode` to an `Interceptor` and call the same three verbs whatever the mode.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Protocol

from meshcni.config import Mode, PodConfig

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class PodNet:
    """A pod as the datapath sees it: a stable key, its network namespace, its addresses and its config."""

    key: str  # the container (sandbox) id, stable across agent restarts
    netns: str  # path of the pod's network namespace, e.g. /var/run/netns/x or /proc/<pid>/ns/net
    ips: tuple[IpAddress, ...] = ()
    config: PodConfig = field(default_factory=PodConfig)
    name: str = ""
    namespace: str = ""


class Interceptor(Protocol):
    """Capture a pod's traffic into its sidecar proxy, and release it again."""

    mode: Mode

    def capture(self, pod: PodNet) -> None:
        """Start capturing; calling it again for a captured pod changes nothing."""

    def release(self, pod: PodNet) -> None:
        """Stop capturing; a pod that is not captured, or whose netns is gone, is fine."""

    def verify(self, pod: PodNet) -> list[str]:
        """What is wrong with the pod's capture, as sentences; empty when it is fully in place."""
