"""Parsing and validation of what the runtime hands the plugin: the CNI_* environment and the stdin config.

Each problem maps to the spec's error code: a missing or malformed CNI_* variable is 4, undecodable stdin
(too large, not JSON, not an object) is 6, a config key of the wrong type or value is 7, a cniVersion the
plugin does not speak is 1. The validated result is two small frozen records the plugin core consumes.
"""

from __future__ import annotations

import json
import re
from typing import Any, Mapping

from meshcni.cni import protocol, spec
from meshcni.cni.spec import CniError

MAX_STDIN_BYTES = 1 << 20
COMMANDS = ("ADD", "DEL", "CHECK", "VERSION", "STATUS", "GC")
FAILURE_POLICIES = ("closed", "open", "iptables")
FALLBACK_KEYS = ("excludeInboundPorts", "excludeOutboundPorts")
LOG_LEVELS = ("debug", "info", "warning", "error")

# Same rules as libcni's ValidateContainerID / ValidateInterfaceName; the container id also names the
# pending-enrolment file, so these rules are what keeps it inside pendingDir.
_CONTAINER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_IFNAME_MAX = 15  # IFNAMSIZ - 1


class Invocation:
    """The CNI_* environment of one exec."""

    # A plain slotted class rather than a dataclass: dataclasses pulls in inspect (~7 ms per exec).
    __slots__ = ("command", "container_id", "netns", "ifname", "cni_args", "path")

    def __init__(
        self,
        command: str,
        container_id: str = "",
        netns: str = "",
        ifname: str = "",
        cni_args: dict[str, str] | None = None,
        path: str = "",
    ):
        self.command = command
        self.container_id = container_id
        self.netns = netns
        self.ifname = ifname
        self.cni_args = dict(cni_args or {})
        self.path = path


class PluginConfig:
    """The validated network config; `raw` keeps every key so the agent sees the whole plugin config."""

    __slots__ = (
        "cni_version", "name", "agent_socket", "failure_policy", "pending_dir", "log_file", "log_level",
        "connect_timeout", "request_timeout", "prev_result", "valid_attachments", "raw",
        "fallback_exclude_inbound", "fallback_exclude_outbound",
    )

    def __init__(
        self,
        *,
        cni_version: str,
        raw: dict[str, Any],
        name: str = "",
        agent_socket: str = protocol.DEFAULT_SOCKET,
        failure_policy: str = "closed",
        pending_dir: str = protocol.DEFAULT_PENDING_DIR,
        log_file: str = "",
        log_level: str = "info",
        connect_timeout: float = 1.0,
        request_timeout: float = 10.0,
        prev_result: dict[str, Any] | None = None,  # normalised (internal layout), None when absent
        valid_attachments: list[tuple[str, str]] | None = None,
        fallback_exclude_inbound: tuple[int, ...] = (),
        fallback_exclude_outbound: tuple[int, ...] = (),
    ):
        self.cni_version = cni_version
        self.raw = raw
        self.name = name
        self.agent_socket = agent_socket
        self.failure_policy = failure_policy
        self.pending_dir = pending_dir
        self.log_file = log_file
        self.log_level = log_level
        self.connect_timeout = connect_timeout
        self.request_timeout = request_timeout
        self.prev_result = prev_result
        self.valid_attachments = valid_attachments
        # Ports the failurePolicy "iptables" capture leaves alone (config key iptablesFallback).
        self.fallback_exclude_inbound = fallback_exclude_inbound
        self.fallback_exclude_outbound = fallback_exclude_outbound

    def forwarded(self) -> dict[str, Any]:
        """The config the agent receives: everything but the (separately forwarded) previous result."""
        return {k: v for k, v in self.raw.items() if k not in ("prevResult", "cni.dev/valid-attachments")}


def parse_invocation(env: Mapping[str, str]) -> Invocation:
    command = env.get("CNI_COMMAND", "")
    if not command:
        raise CniError(spec.ERR_INVALID_ENV, "CNI_COMMAND is not set")
    if command not in COMMANDS:
        raise CniError(spec.ERR_INVALID_ENV, f"unknown CNI_COMMAND {command!r}", f"expected one of {', '.join(COMMANDS)}")
    if command in ("VERSION", "STATUS", "GC"):
        return Invocation(command=command, path=env.get("CNI_PATH", ""))

    container_id = _required(env, "CNI_CONTAINERID")
    if not _CONTAINER_ID.match(container_id):
        raise CniError(spec.ERR_INVALID_ENV, "CNI_CONTAINERID has invalid characters", container_id)
    ifname = _required(env, "CNI_IFNAME")
    if len(ifname) > _IFNAME_MAX or ifname in (".", "..") or any(c in ifname for c in "/: \t\n\r\0"):
        raise CniError(spec.ERR_INVALID_ENV, f"CNI_IFNAME {ifname!r} is not a valid interface name")
    # DEL must work after the netns is gone, and runtimes then pass an empty CNI_NETNS.
    netns = env.get("CNI_NETNS", "") if command == "DEL" else _required(env, "CNI_NETNS")
    return Invocation(
        command=command,
        container_id=container_id,
        netns=netns,
        ifname=ifname,
        cni_args=parse_cni_args(env.get("CNI_ARGS", "")),
        path=env.get("CNI_PATH", ""),
    )


def parse_cni_args(text: str) -> dict[str, str]:
    """'K8S_POD_NAME=a;K8S_POD_NAMESPACE=b' → dict; unknown keys are kept (the agent may use them)."""
    args: dict[str, str] = {}
    for pair in text.split(";"):
        if not pair:
            continue
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CniError(spec.ERR_INVALID_ENV, f"CNI_ARGS has an invalid pair {pair!r}", "expected KEY=VALUE;...")
        args[key] = value
    return args


def read_stdin(stream: Any, limit: int = MAX_STDIN_BYTES) -> bytes:
    """Read at most `limit` bytes; more is a decode error rather than an unbounded allocation."""
    data = stream.read(limit + 1)
    if len(data) > limit:
        raise CniError(spec.ERR_DECODE, f"network config on stdin exceeds {limit} bytes")
    return data


def decode_config(data: bytes) -> dict[str, Any]:
    try:
        raw = json.loads(data)
    except UnicodeDecodeError:
        raise CniError(spec.ERR_DECODE, "network config on stdin is not UTF-8") from None
    except ValueError as exc:
        raise CniError(spec.ERR_DECODE, "network config on stdin is not valid JSON", str(exc)) from None
    if not isinstance(raw, dict):
        raise CniError(spec.ERR_DECODE, "network config on stdin must be a JSON object")
    return raw


def requested_version(raw: dict[str, Any]) -> str | None:
    """The cniVersion if it is a string, for echoing in error replies before full validation."""
    v = raw.get("cniVersion")
    return v if isinstance(v, str) else None


def parse_config(raw: dict[str, Any], command: str) -> PluginConfig:
    version = raw.get("cniVersion")
    if version is None:
        raise CniError(spec.ERR_INVALID_CONFIG, "network config has no cniVersion")
    if not isinstance(version, str):
        raise CniError(spec.ERR_INVALID_CONFIG, "cniVersion must be a string")
    spec.require_supported(version)

    name = _opt_str(raw, "name", "")
    _opt_str(raw, "type", "")
    agent_socket = _opt_abs_path(raw, "agentSocket", protocol.DEFAULT_SOCKET)
    pending_dir = _opt_abs_path(raw, "pendingDir", protocol.DEFAULT_PENDING_DIR)
    log_file = _opt_abs_path(raw, "logFile", "")
    log_level = _opt_choice(raw, "logLevel", "info", LOG_LEVELS)
    policy = raw.get("failurePolicy", "closed")
    if not isinstance(policy, str):
        raise CniError(spec.ERR_INVALID_CONFIG, "failurePolicy must be a string")
    if policy not in FAILURE_POLICIES:
        raise CniError(
            spec.ERR_INVALID_CONFIG, f"unknown failurePolicy {policy!r}", 'use "closed", "open" or "iptables"'
        )
    exclude_in, exclude_out = _fallback_exclusions(raw)
    connect_timeout = _opt_seconds(raw, "connectTimeoutSeconds", 1.0)
    request_timeout = _opt_seconds(raw, "requestTimeoutSeconds", 10.0)
    for key in ("runtimeConfig", "args"):
        if key in raw and not isinstance(raw[key], dict):
            raise CniError(spec.ERR_INVALID_CONFIG, f"{key} must be a JSON object")

    prev = raw.get("prevResult")
    prev_result = None if prev is None else spec.normalize_result(prev, "prevResult")
    valid = _valid_attachments(raw) if command == "GC" else None
    return PluginConfig(
        cni_version=version,
        name=name,
        agent_socket=agent_socket,
        failure_policy=policy,
        pending_dir=pending_dir,
        log_file=log_file,
        log_level=log_level,
        connect_timeout=connect_timeout,
        request_timeout=request_timeout,
        prev_result=prev_result,
        valid_attachments=valid,
        fallback_exclude_inbound=exclude_in,
        fallback_exclude_outbound=exclude_out,
        raw=raw,
    )


def _fallback_exclusions(raw: dict[str, Any]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """`iptablesFallback: {"excludeInboundPorts": [..], "excludeOutboundPorts": [..]}`, validated whatever
    the policy, so a typo is reported when the config is written and not on the day the agent is down."""
    value = raw.get("iptablesFallback", {})
    if not isinstance(value, dict):
        raise CniError(spec.ERR_INVALID_CONFIG, "iptablesFallback must be a JSON object")
    unknown = sorted(set(value) - set(FALLBACK_KEYS))
    if unknown:
        raise CniError(spec.ERR_INVALID_CONFIG, f"iptablesFallback has unknown key(s) {', '.join(unknown)}",
                       f"known: {', '.join(FALLBACK_KEYS)}")
    return tuple(_ports(value, key) for key in FALLBACK_KEYS)


def _ports(obj: dict[str, Any], key: str) -> tuple[int, ...]:
    value = obj.get(key, [])
    if not isinstance(value, list) or not all(
        isinstance(p, int) and not isinstance(p, bool) and 0 < p < 65536 for p in value
    ):
        raise CniError(spec.ERR_INVALID_CONFIG, f"iptablesFallback.{key} must be a list of ports (1-65535)",
                       json.dumps(value))
    return tuple(sorted(set(value)))


def _valid_attachments(raw: dict[str, Any]) -> list[tuple[str, str]]:
    value = raw.get("cni.dev/valid-attachments")
    if value is None:
        # Spec: GC without the key means "no attachment is valid"; be explicit rather than wipe by accident.
        raise CniError(spec.ERR_INVALID_CONFIG, "GC needs cni.dev/valid-attachments (an empty list clears all)")
    if not isinstance(value, list):
        raise CniError(spec.ERR_INVALID_CONFIG, "cni.dev/valid-attachments must be a list")
    out = []
    for i, item in enumerate(value):
        if not isinstance(item, dict) or not isinstance(item.get("containerID"), str) or not isinstance(
            item.get("ifname"), str
        ):
            raise CniError(
                spec.ERR_INVALID_CONFIG, f"cni.dev/valid-attachments[{i}] needs string containerID and ifname"
            )
        out.append((item["containerID"], item["ifname"]))
    return out


def _required(env: Mapping[str, str], key: str) -> str:
    value = env.get(key, "")
    if not value:
        raise CniError(spec.ERR_INVALID_ENV, f"{key} is not set")
    return value


def _opt_str(raw: dict[str, Any], key: str, default: str) -> str:
    value = raw.get(key, default)
    if not isinstance(value, str):
        raise CniError(spec.ERR_INVALID_CONFIG, f"{key} must be a string, not {type(value).__name__}")
    return value


def _opt_abs_path(raw: dict[str, Any], key: str, default: str) -> str:
    value = _opt_str(raw, key, default)
    if value and (not value.startswith("/") or ".." in value.split("/") or "\0" in value):
        raise CniError(spec.ERR_INVALID_CONFIG, f"{key} must be an absolute path without '..'", value)
    return value


def _opt_choice(raw: dict[str, Any], key: str, default: str, choices: tuple[str, ...]) -> str:
    value = _opt_str(raw, key, default)
    if value not in choices:
        raise CniError(spec.ERR_INVALID_CONFIG, f"{key} must be one of {', '.join(choices)}", value)
    return value


def _opt_seconds(raw: dict[str, Any], key: str, default: float) -> float:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CniError(spec.ERR_INVALID_CONFIG, f"{key} must be a number of seconds")
    if not 0 < value <= 300:
        raise CniError(spec.ERR_INVALID_CONFIG, f"{key} must be in (0, 300]", str(value))
    return float(value)
