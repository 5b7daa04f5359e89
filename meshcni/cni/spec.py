"""CNI specification facts the plugin and the runtime helper share: versions, error codes, result conversion.

Everything version-dependent lives here. A result is normalised into one internal shape (the 1.1.0 layout)
whatever version it came in, and rendered back into exactly the fields the requested version defines:
0.3.x/0.4.0 results carry `"version": "4"|"6"` in every `ips` entry, 1.0.0+ do not; 1.1.0 added
`mtu`/`socketPath`/`pciID` on interfaces and `mtu`/`advmss`/`priority`/`table`/`scope` on routes, which are
dropped when rendering an older version. Errors are `CniError`s that print as the spec's error JSON.
Stdlib only (json, ipaddress): this module is imported on every plugin exec.
"""

from __future__ import annotations

import ipaddress
import json
from typing import Any

# Versions the meshcni plugin answers to. The result layouts of 0.3.0 and 0.3.1 are identical, so the runtime
# helper may also convert 0.3.0 results (Debian's reference plugins offer it), but the plugin does not claim it.
SUPPORTED_VERSIONS: tuple[str, ...] = ("0.3.1", "0.4.0", "1.0.0", "1.1.0")
CONVERTIBLE_VERSIONS: tuple[str, ...] = ("0.3.0",) + SUPPORTED_VERSIONS
LATEST = SUPPORTED_VERSIONS[-1]

# Well-known error codes (SPEC.md "Error" section); 100+ belong to the plugin.
ERR_INCOMPATIBLE_VERSION = 1
ERR_UNSUPPORTED_FIELD = 2
ERR_UNKNOWN_CONTAINER = 3
ERR_INVALID_ENV = 4
ERR_IO = 5
ERR_DECODE = 6
ERR_INVALID_CONFIG = 7
ERR_TRY_AGAIN = 11
ERR_STATUS_NOT_AVAILABLE = 50
ERR_STATUS_LIMITED = 51
# meshcni's own codes.
ERR_AGENT_FAILED = 100  # the agent answered but could not carry out the request
ERR_NOT_CAPTURED = 101  # CHECK: the pod is not (fully) captured
ERR_AGENT_PROTOCOL = 102  # the agent's reply does not follow meshcni.cni.protocol

_IFACE_FIELDS = {
    "0.3.0": ("name", "mac", "sandbox"),
    "0.3.1": ("name", "mac", "sandbox"),
    "0.4.0": ("name", "mac", "sandbox"),
    "1.0.0": ("name", "mac", "sandbox"),
    "1.1.0": ("name", "mac", "mtu", "sandbox", "socketPath", "pciID"),
}
_ROUTE_FIELDS = {
    "0.3.0": ("dst", "gw"),
    "0.3.1": ("dst", "gw"),
    "0.4.0": ("dst", "gw"),
    "1.0.0": ("dst", "gw"),
    "1.1.0": ("dst", "gw", "mtu", "advmss", "priority", "table", "scope"),
}
_DNS_FIELDS = ("nameservers", "domain", "search", "options")


class CniError(Exception):
    """A failure reported to the runtime as spec error JSON on stdout with a non-zero exit."""

    def __init__(self, code: int, msg: str, details: str = ""):
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details

    def to_json(self, cni_version: str = LATEST) -> dict[str, Any]:
        out: dict[str, Any] = {"cniVersion": cni_version, "code": self.code, "msg": self.msg}
        if self.details:
            out["details"] = self.details
        return out

    def __repr__(self) -> str:
        return f"CniError({self.code}, {self.msg!r}, {self.details!r})"


def parse_version(text: str) -> tuple[int, int, int]:
    """'1.0.0' → (1, 0, 0); raises ValueError on anything that is not three dot-separated integers."""
    parts = text.split(".")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        raise ValueError(f"not a CNI version: {text!r}")
    return int(parts[0]), int(parts[1]), int(parts[2])


def at_least(version: str, minimum: str) -> bool:
    return parse_version(version) >= parse_version(minimum)


def require_supported(version: str) -> None:
    """Raise the incompatible-version error unless the plugin speaks `version`."""
    if version not in SUPPORTED_VERSIONS:
        raise CniError(
            ERR_INCOMPATIBLE_VERSION,
            f"incompatible CNI version {version!r}",
            f"meshcni supports {', '.join(SUPPORTED_VERSIONS)}",
        )


def version_info(requested: str | None) -> dict[str, Any]:
    """The VERSION answer: echo the requested version when we speak it, else the latest we do."""
    chosen = requested if requested in SUPPORTED_VERSIONS else LATEST
    return {"cniVersion": chosen, "supportedVersions": list(SUPPORTED_VERSIONS)}


def highest_common(requested: str, offered: list[str]) -> str | None:
    """The highest version both a plugin offers and we can convert, not above `requested`."""
    best: str | None = None
    for v in offered:
        if v not in CONVERTIBLE_VERSIONS:
            continue
        if parse_version(v) > parse_version(requested):
            continue
        if best is None or parse_version(v) > parse_version(best):
            best = v
    return best


# ---------------------------------------------------------------------------------------------- results


def normalize_result(raw: Any, what: str = "prevResult") -> dict[str, Any]:
    """Validate a result of any convertible version and return it in the internal (1.1.0-shaped) layout.

    The layout is recognised from the content rather than trusted from a `cniVersion` key, because runtimes
    disagree on whether prevResult carries one; an `ips` entry's `version`, when present, must agree with
    its address family.
    """
    if not isinstance(raw, dict):
        raise CniError(ERR_INVALID_CONFIG, f"{what} must be a JSON object")
    declared = raw.get("cniVersion")
    if declared is not None and not isinstance(declared, str):
        raise CniError(ERR_INVALID_CONFIG, f"{what}.cniVersion must be a string")
    if isinstance(declared, str) and declared and declared.startswith(("0.1.", "0.2.")):
        raise CniError(ERR_INCOMPATIBLE_VERSION, f"{what} has version {declared}, which meshcni cannot convert")

    interfaces = _list_of_objects(raw, "interfaces", what)
    out_ifaces = []
    for i, iface in enumerate(interfaces):
        name = iface.get("name")
        if not isinstance(name, str) or not name:
            raise CniError(ERR_INVALID_CONFIG, f"{what}.interfaces[{i}].name must be a non-empty string")
        out_ifaces.append({k: iface[k] for k in _IFACE_FIELDS["1.1.0"] if k in iface})

    out_ips = []
    for i, ip in enumerate(_list_of_objects(raw, "ips", what)):
        address = ip.get("address")
        if not isinstance(address, str):
            raise CniError(ERR_INVALID_CONFIG, f"{what}.ips[{i}].address must be a string")
        try:
            family = ipaddress.ip_interface(address).version
        except ValueError:
            raise CniError(ERR_INVALID_CONFIG, f"{what}.ips[{i}].address {address!r} is not an IP/prefix") from None
        if "version" in ip and ip["version"] != str(family):
            raise CniError(
                ERR_INVALID_CONFIG,
                f"{what}.ips[{i}].version {ip['version']!r} does not match address {address}",
            )
        entry: dict[str, Any] = {"address": address}
        if "gateway" in ip:
            if not isinstance(ip["gateway"], str):
                raise CniError(ERR_INVALID_CONFIG, f"{what}.ips[{i}].gateway must be a string")
            entry["gateway"] = ip["gateway"]
        if "interface" in ip:
            index = ip["interface"]
            if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(out_ifaces):
                raise CniError(
                    ERR_INVALID_CONFIG,
                    f"{what}.ips[{i}].interface must index {what}.interfaces (0..{len(out_ifaces) - 1})",
                )
            entry["interface"] = index
        out_ips.append(entry)

    out_routes = []
    for i, route in enumerate(_list_of_objects(raw, "routes", what)):
        if not isinstance(route.get("dst"), str):
            raise CniError(ERR_INVALID_CONFIG, f"{what}.routes[{i}].dst must be a string")
        out_routes.append({k: route[k] for k in _ROUTE_FIELDS["1.1.0"] if k in route})

    result: dict[str, Any] = {"interfaces": out_ifaces, "ips": out_ips, "routes": out_routes}
    dns = raw.get("dns")
    if dns is not None:
        if not isinstance(dns, dict):
            raise CniError(ERR_INVALID_CONFIG, f"{what}.dns must be a JSON object")
        result["dns"] = {k: dns[k] for k in _DNS_FIELDS if k in dns}
    return result


def render_result(result: dict[str, Any], version: str) -> dict[str, Any]:
    """Render a normalised result in exactly the layout of `version` (fields unknown to it are dropped)."""
    if version not in CONVERTIBLE_VERSIONS:
        raise CniError(ERR_INCOMPATIBLE_VERSION, f"cannot render a result as CNI version {version!r}")
    legacy = not at_least(version, "1.0.0")
    out: dict[str, Any] = {"cniVersion": version}
    ifaces = [{k: it[k] for k in _IFACE_FIELDS[version] if k in it} for it in result.get("interfaces", [])]
    if ifaces:
        out["interfaces"] = ifaces
    ips = []
    for ip in result.get("ips", []):
        entry: dict[str, Any] = {}
        if legacy:
            # 0.3.x/0.4.0 require the family in every entry; 1.0.0 removed the field.
            entry["version"] = str(ipaddress.ip_interface(ip["address"]).version)
        entry.update({k: ip[k] for k in ("interface", "address", "gateway") if k in ip})
        ips.append(entry)
    if ips:
        out["ips"] = ips
    routes = [{k: r[k] for k in _ROUTE_FIELDS[version] if k in r} for r in result.get("routes", [])]
    if routes:
        out["routes"] = routes
    # dns is a required key of 0.3.x/0.4.0 results (often empty); 1.0.0+ omit it when empty.
    dns = result.get("dns") or {}
    if dns or legacy:
        out["dns"] = dict(dns)
    return out


def convert_result(raw: Any, version: str, what: str = "result") -> dict[str, Any]:
    """Any convertible result → the layout of `version`."""
    return render_result(normalize_result(raw, what), version)


def result_ips(result: dict[str, Any]) -> list[str]:
    """The CIDR addresses of a normalised result, in order."""
    return [ip["address"] for ip in result.get("ips", [])]


def dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), sort_keys=False)


def _list_of_objects(raw: dict[str, Any], key: str, what: str) -> list[dict[str, Any]]:
    value = raw.get(key)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(x, dict) for x in value):
        raise CniError(ERR_INVALID_CONFIG, f"{what}.{key} must be a list of JSON objects")
    return value
