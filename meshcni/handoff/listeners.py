"""The proxy's listening sockets of one pod, created by the agent inside the pod's network namespace.

A socket keeps the network namespace it was created in, so the agent enters the pod netns only for the
`socket()`/`bind()`/`listen()` calls and then holds the sockets from the host side for as long as the pod lives.
Addresses follow Istio: outbound on 127.0.0.1:15001 — both capture paths deliver there (the connect4 program
rewrites to 127.0.0.1, iptables REDIRECT in OUTPUT rewrites to 127.0.0.1), and a loopback-only listener cannot
be reached from outside the pod, so it is never an open relay (Envoy's 0.0.0.0:15001 needs an extra inbound
exclusion for that); inbound on 0.0.0.0:15006 — iptables REDIRECT in PREROUTING rewrites to the address of
the receiving interface, so the listener must accept any local address (sk_lookup would not care) — plus
[::]:15006 with IPV6_V6ONLY when the pod has IPv6, so the v4 socket keeps v4 and each family has its own
SOCKMAP slot. The backlog is large because during a proxy crash connections wait in it until the next proxy
accepts them; the kernel caps it at the pod netns's net.core.somaxconn. SO_REUSEADDR lets a listener be
re-created while TIME_WAIT connections of its port linger; SO_REUSEPORT is deliberately off, so no other
process in the pod can bind the same port and silently take a share of the connections.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
from dataclasses import dataclass

from meshcni.config import PodConfig
from meshcni.handoff.errors import HandoffError
from meshcni.sys import netns

OUTBOUND = "outbound"
INBOUND = "inbound"
INBOUND6 = "inbound6"
OUTBOUND_HOST = "127.0.0.1"
INBOUND_HOST = "0.0.0.0"
INBOUND6_HOST = "::"
# Asked for, not granted: listen(2) silently caps the backlog at the netns's net.core.somaxconn (4096 by default).
BACKLOG = 65535

# struct tcp_info (linux/tcp.h): 8 bytes of u8 fields, then u32 rto, ato, snd_mss, rcv_mss, unacked, sacked.
# For a LISTEN socket the kernel reports the accept queue's length in tcpi_unacked and its limit in tcpi_sacked.
_TCPI_UNACKED = struct.Struct("=I")
_TCPI_UNACKED_OFFSET = 24
_TCPI_SACKED_OFFSET = 28


@dataclass(frozen=True)
class ListenerSpec:
    name: str
    family: int
    host: str
    port: int


def specs_for(config: PodConfig, ipv6: bool = False, outbound_host: str = OUTBOUND_HOST) -> list[ListenerSpec]:
    """The listeners a pod's proxy needs, in the order they are handed over (that is LISTEN_FDNAMES order)."""
    specs = [
        ListenerSpec(OUTBOUND, socket.AF_INET, outbound_host, config.outbound_port),
        ListenerSpec(INBOUND, socket.AF_INET, INBOUND_HOST, config.inbound_port),
    ]
    if ipv6:
        specs.append(ListenerSpec(INBOUND6, socket.AF_INET6, INBOUND6_HOST, config.inbound_port))
    return specs


def accept_queue(sock: socket.socket | int) -> tuple[int, int]:
    """(connections waiting to be accepted, the accept queue's limit) of a listening TCP socket."""
    s = sock if isinstance(sock, socket.socket) else socket.socket(fileno=os.dup(sock))
    try:
        info = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    except OSError as exc:
        raise HandoffError(f"TCP_INFO on a listener: {exc.strerror}") from exc
    finally:
        if s is not sock:
            s.close()
    return (_TCPI_UNACKED.unpack_from(info, _TCPI_UNACKED_OFFSET)[0],
            _TCPI_UNACKED.unpack_from(info, _TCPI_SACKED_OFFSET)[0])


def _listen(spec: ListenerSpec, backlog: int) -> socket.socket:
    s = socket.socket(spec.family, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if spec.family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind((spec.host, spec.port))
        s.listen(backlog)
    except OSError as exc:
        s.close()
        addr = f"[{spec.host}]:{spec.port}" if spec.family == socket.AF_INET6 else f"{spec.host}:{spec.port}"
        raise HandoffError(f"cannot listen on {addr} for the {spec.name} listener: {exc.strerror}") from exc
    return s


class PodListeners:
    """Named listening sockets of one pod's proxy, held by the agent; close() when the pod goes away."""

    def __init__(self, pod: str, netns_path: str, sockets: dict[str, socket.socket]):
        self.pod = pod
        self.netns = netns_path
        self._sockets = dict(sockets)  # insertion order is the handoff order

    @classmethod
    def create(cls, netns_path: str, config: PodConfig, *, pod: str = "", ipv6: bool = False,
               outbound_host: str = OUTBOUND_HOST, backlog: int = BACKLOG) -> "PodListeners":
        """Listen inside the netns at `netns_path`; all or nothing (a failure closes what was opened)."""
        made: dict[str, socket.socket] = {}
        try:
            with netns.in_netns(netns_path):
                for spec in specs_for(config, ipv6, outbound_host):
                    made[spec.name] = _listen(spec, backlog)
        except BaseException:
            for s in made.values():
                s.close()
            raise
        return cls(pod or netns_path, netns_path, made)

    @classmethod
    def for_pod(cls, pod, **kwargs) -> "PodListeners":
        """Listeners for a `meshcni.datapath.interceptor.PodNet`: its config, and IPv6 iff it has a v6 address."""
        ipv6 = any(ipaddress.ip_address(ip).version == 6 for ip in pod.ips)
        return cls.create(pod.netns, pod.config, pod=pod.name or pod.key, ipv6=ipv6, **kwargs)

    @property
    def names(self) -> list[str]:
        return list(self._sockets)

    def fds(self) -> dict[str, int]:
        self._check_open()
        return {name: s.fileno() for name, s in self._sockets.items()}

    def inbound_fds(self) -> dict[int, int]:
        """{address family: fd} of the inbound listeners: what `EbpfDatapath.register_listener` takes."""
        self._check_open()
        return {s.family: s.fileno() for name, s in self._sockets.items() if name in (INBOUND, INBOUND6)}

    def queued(self) -> dict[str, int]:
        """Connections waiting in each listener's accept queue right now (none while a proxy keeps up)."""
        self._check_open()
        return {name: accept_queue(s)[0] for name, s in self._sockets.items()}

    def addresses(self) -> dict[str, tuple]:
        self._check_open()
        return {name: s.getsockname()[:2] for name, s in self._sockets.items()}

    def close(self) -> None:
        for s in self._sockets.values():
            s.close()
        self._sockets = {}

    @property
    def closed(self) -> bool:
        return not self._sockets

    def _check_open(self) -> None:
        if not self._sockets:
            raise HandoffError(f"the listeners of pod {self.pod} are closed")

    def __enter__(self) -> "PodListeners":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

