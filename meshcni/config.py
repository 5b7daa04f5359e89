"""Per-pod capture configuration: one immutable value both interceptors (eBPF and iptables) render from.

A `PodConfig` is built from a pod's annotations with Istio's meaning (`traffic.sidecar.istio.io/*`,
`sidecar.istio.io/inject`) plus our own `meshcni.io/mode`, on top of node defaults. Parsing is strict: a
malformed port or CIDR raises `ConfigError` naming the annotation, because silently dropping an exclusion
would capture traffic the user asked us to leave alone.
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass, field, replace
from typing import Mapping

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

PROXY_UID = 1337
PROXY_GID = 1337
OUTBOUND_PORT = 15001
INBOUND_PORT = 15006
# Istio's inbound passthrough: the proxy connects to the app from this source so it is never re-captured.
INBOUND_PASSTHROUGH_SRC = "127.0.0.6"
# Istio ports that are never captured inbound: HBONE, merged metrics, health, Envoy Prometheus.
ALWAYS_EXCLUDED_INBOUND = (15008, 15020, 15021, 15090)

ANN_MODE = "meshcni.io/mode"
# "true": the app's own sockets may be spliced with sk_msg too (safe only for apps that retry EAGAIN).
ANN_SPLICE_APP = "meshcni.io/splice-app"
# "agent": the agent creates and holds the proxy's listeners and hands them over (hot upgrades lose nothing);
# "proxy": the proxy binds its own and the agent adopts them.
ANN_LISTENERS = "meshcni.io/listeners"
ANN_INJECT = "sidecar.istio.io/inject"
ANN_PREFIX = "traffic.sidecar.istio.io/"
ANN_INCLUDE_INBOUND_PORTS = ANN_PREFIX + "includeInboundPorts"
ANN_EXCLUDE_INBOUND_PORTS = ANN_PREFIX + "excludeInboundPorts"
ANN_INCLUDE_OUTBOUND_PORTS = ANN_PREFIX + "includeOutboundPorts"
ANN_EXCLUDE_OUTBOUND_PORTS = ANN_PREFIX + "excludeOutboundPorts"
ANN_INCLUDE_OUTBOUND_CIDRS = ANN_PREFIX + "includeOutboundIPRanges"
ANN_EXCLUDE_OUTBOUND_CIDRS = ANN_PREFIX + "excludeOutboundIPRanges"


class ConfigError(ValueError):
    """An annotation or setting that cannot be understood; the message names it."""


class Mode(str, enum.Enum):
    """How a pod's traffic is captured."""

    EBPF = "ebpf"
    IPTABLES = "iptables"
    OFF = "off"


@dataclass(frozen=True)
class PodConfig:
    """Everything an interceptor needs to capture one pod.

    `None` in an include field means "all" (Istio's `*`); an empty tuple means "none".
    """

    mode: Mode = Mode.EBPF
    proxy_uid: int = PROXY_UID
    proxy_gid: int = PROXY_GID
    outbound_port: int = OUTBOUND_PORT
    inbound_port: int = INBOUND_PORT
    include_inbound_ports: tuple[int, ...] | None = None
    exclude_inbound_ports: tuple[int, ...] = ()
    include_outbound_ports: tuple[int, ...] = ()
    exclude_outbound_ports: tuple[int, ...] = ()
    include_outbound_cidrs: tuple[IpNetwork, ...] | None = None
    exclude_outbound_cidrs: tuple[IpNetwork, ...] = ()
    # Splicing puts a socket under tcp_bpf_recvmsg, which can answer EAGAIN to a blocking reader on 6.18; only
    # the sidecar proxy's sockets are spliced unless the pod says its app copes (see docs/architecture.md).
    splice_app: bool = False
    # The agent holds the proxy's listening sockets and hands them to it (`meshcni proxy-exec`).
    hold_listeners: bool = False
    extra: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)

    @property
    def effective_exclude_inbound_ports(self) -> tuple[int, ...]:
        """User exclusions plus the ports the proxy itself owns, sorted and unique."""
        ports = set(self.exclude_inbound_ports) | set(ALWAYS_EXCLUDED_INBOUND)
        ports |= {self.outbound_port, self.inbound_port}
        return tuple(sorted(ports))

    def with_mode(self, mode: Mode | str) -> "PodConfig":
        return replace(self, mode=Mode(mode))

    def to_dict(self) -> dict:
        """A JSON-safe rendering (the agent's registry and `-o json` use it)."""

        def ports(v):
            return None if v is None else list(v)

        def cidrs(v):
            return None if v is None else [str(n) for n in v]

        return {
            "mode": self.mode.value,
            "proxy_uid": self.proxy_uid,
            "proxy_gid": self.proxy_gid,
            "outbound_port": self.outbound_port,
            "inbound_port": self.inbound_port,
            "include_inbound_ports": ports(self.include_inbound_ports),
            "exclude_inbound_ports": list(self.exclude_inbound_ports),
            "include_outbound_ports": list(self.include_outbound_ports),
            "exclude_outbound_ports": list(self.exclude_outbound_ports),
            "include_outbound_cidrs": cidrs(self.include_outbound_cidrs),
            "exclude_outbound_cidrs": [str(n) for n in self.exclude_outbound_cidrs],
            "splice_app": self.splice_app,
            "hold_listeners": self.hold_listeners,
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> "PodConfig":
        """Inverse of `to_dict`; validates like annotation parsing does."""
        try:
            incl_in = data.get("include_inbound_ports")
            incl_cidrs = data.get("include_outbound_cidrs")
            return cls(
                mode=Mode(data.get("mode", Mode.EBPF.value)),
                proxy_uid=_check_id("proxy_uid", data.get("proxy_uid", PROXY_UID)),
                proxy_gid=_check_id("proxy_gid", data.get("proxy_gid", PROXY_GID)),
                outbound_port=_check_port("outbound_port", data.get("outbound_port", OUTBOUND_PORT)),
                inbound_port=_check_port("inbound_port", data.get("inbound_port", INBOUND_PORT)),
                include_inbound_ports=None if incl_in is None else _ports("include_inbound_ports", incl_in),
                exclude_inbound_ports=_ports("exclude_inbound_ports", data.get("exclude_inbound_ports", [])),
                include_outbound_ports=_ports("include_outbound_ports", data.get("include_outbound_ports", [])),
                exclude_outbound_ports=_ports("exclude_outbound_ports", data.get("exclude_outbound_ports", [])),
                include_outbound_cidrs=None
                if incl_cidrs is None
                else _cidrs("include_outbound_cidrs", incl_cidrs),
                exclude_outbound_cidrs=_cidrs("exclude_outbound_cidrs", data.get("exclude_outbound_cidrs", [])),
                splice_app=_check_bool("splice_app", data.get("splice_app", False)),
                hold_listeners=_check_bool("hold_listeners", data.get("hold_listeners", False)),
            )
        except ValueError as exc:
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError(str(exc)) from exc

    @classmethod
    def from_annotations(cls, annotations: Mapping[str, str], defaults: "PodConfig | None" = None) -> "PodConfig":
        """Apply Istio/meshcni annotations over node defaults.

        `sidecar.istio.io/inject: "false"` means the pod has no sidecar, so nothing may be captured: mode off.
        """
        base = defaults or cls()
        changes: dict = {}
        if ANN_MODE in annotations:
            raw = annotations[ANN_MODE].strip().lower()
            try:
                changes["mode"] = Mode(raw)
            except ValueError:
                raise ConfigError(f"{ANN_MODE}: {raw!r} is not one of ebpf, iptables, off") from None
        if annotations.get(ANN_INJECT, "").strip().lower() == "false":
            changes["mode"] = Mode.OFF
        if ANN_INCLUDE_INBOUND_PORTS in annotations:
            changes["include_inbound_ports"] = _ports_or_all(
                ANN_INCLUDE_INBOUND_PORTS, annotations[ANN_INCLUDE_INBOUND_PORTS]
            )
        for ann, attr in (
            (ANN_EXCLUDE_INBOUND_PORTS, "exclude_inbound_ports"),
            (ANN_INCLUDE_OUTBOUND_PORTS, "include_outbound_ports"),
            (ANN_EXCLUDE_OUTBOUND_PORTS, "exclude_outbound_ports"),
        ):
            if ann in annotations:
                changes[attr] = _ports(ann, _split(annotations[ann]))
        if ANN_INCLUDE_OUTBOUND_CIDRS in annotations:
            raw = annotations[ANN_INCLUDE_OUTBOUND_CIDRS].strip()
            changes["include_outbound_cidrs"] = None if raw == "*" else _cidrs(ANN_INCLUDE_OUTBOUND_CIDRS, _split(raw))
        if ANN_EXCLUDE_OUTBOUND_CIDRS in annotations:
            changes["exclude_outbound_cidrs"] = _cidrs(
                ANN_EXCLUDE_OUTBOUND_CIDRS, _split(annotations[ANN_EXCLUDE_OUTBOUND_CIDRS])
            )
        if ANN_LISTENERS in annotations:
            raw = annotations[ANN_LISTENERS].strip().lower()
            if raw not in ("agent", "proxy"):
                raise ConfigError(f"{ANN_LISTENERS}: {raw!r} is not agent or proxy")
            changes["hold_listeners"] = raw == "agent"
        if ANN_SPLICE_APP in annotations:
            changes["splice_app"] = _bool(ANN_SPLICE_APP, annotations[ANN_SPLICE_APP])
        return replace(base, **changes)


def _split(raw: str) -> list[str]:
    return [part.strip() for part in raw.split(",") if part.strip()]


def _bool(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value not in ("true", "false"):
        raise ConfigError(f"{name}: {raw!r} is not true or false")
    return value == "true"


def _check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{name}: {value!r} is not true or false")
    return value


def _check_port(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ConfigError(f"{name}: {value!r} is not a port number")
    try:
        port = int(value)
    except ValueError:
        raise ConfigError(f"{name}: {value!r} is not a port number") from None
    if not 1 <= port <= 65535:
        raise ConfigError(f"{name}: {port} is outside 1-65535")
    return port


def _check_id(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**32 - 1:
        raise ConfigError(f"{name}: {value!r} is not a valid uid/gid")
    return value


def _ports(name: str, values) -> tuple[int, ...]:
    if isinstance(values, str):
        values = _split(values)
    return tuple(sorted({_check_port(name, v) for v in values}))


def _ports_or_all(name: str, raw: str) -> tuple[int, ...] | None:
    return None if raw.strip() == "*" else _ports(name, _split(raw))


def _cidrs(name: str, values) -> tuple[IpNetwork, ...]:
    if isinstance(values, str):
        values = _split(values)
    out = []
    for v in values:
        try:
            out.append(ipaddress.ip_network(str(v).strip(), strict=False))
        except ValueError:
            raise ConfigError(f"{name}: {v!r} is not an IP address or CIDR") from None
    return tuple(out)
