"""Host-side resources the lab creates outside the CNI plugins: named netns, the bridge link, ip_forward.

Named network namespaces are made with iproute2 (`ip netns add`), exactly as a runtime's sandbox would exist
before CNI ADD; the bridge link is created by the bridge plugin but never deleted by it, so `down` removes it.
With `isGateway` the bridge plugin turns on the host's `net.ipv4.ip_forward`; the lab remembers the value it
found and puts it back when the last lab bridge is gone, so a lab leaves the host as it found it.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from meshcni.lab.state import NETNS_DIR, LabError

IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")
LAB_BRIDGE_PREFIX = "mcnilab"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise LabError(f"`ip {' '.join(args)}` failed: {proc.stderr.strip() or proc.returncode}")
    return proc


def netns_path(name: str) -> str:
    return str(NETNS_DIR / name)


def netns_exists(name: str) -> bool:
    return name in netns_names()


def netns_names() -> list[str]:
    proc = _ip("-j", "netns", "list", check=False)
    if proc.returncode != 0 or not proc.stdout.strip():
        return []
    return [entry["name"] for entry in json.loads(proc.stdout)]


def netns_add(name: str) -> str:
    _ip("netns", "add", name)
    return netns_path(name)


def netns_delete(name: str) -> bool:
    """Delete a named netns; False if it did not exist."""
    if not netns_exists(name):
        # A stale bind-mount placeholder (ip netns add interrupted) still blocks a later add: remove it.
        Path(netns_path(name)).unlink(missing_ok=True)
        return False
    _ip("netns", "delete", name)
    return True


def link_exists(name: str) -> bool:
    return _ip("link", "show", "dev", name, check=False).returncode == 0


def link_delete(name: str) -> bool:
    if not link_exists(name):
        return False
    _ip("link", "delete", "dev", name)
    return True


def link_names() -> list[str]:
    proc = _ip("-j", "link", "show", check=False)
    if proc.returncode != 0:
        return []
    return [link["ifname"] for link in json.loads(proc.stdout)]


def lab_bridges() -> list[str]:
    return [n for n in link_names() if n.startswith(LAB_BRIDGE_PREFIX)]


def routes_v4() -> list[str]:
    proc = _ip("-j", "-4", "route", "show", "table", "all", check=False)
    if proc.returncode != 0:
        return []
    return [r.get("dst", "") for r in json.loads(proc.stdout)]


def read_ip_forward() -> str:
    return IP_FORWARD.read_text(encoding="ascii").strip()


def restore_ip_forward(value: str | None) -> bool:
    """Put ip_forward back to `value` unless another lab bridge still needs it; True if it was written."""
    if value is None or lab_bridges() or read_ip_forward() == value:
        return False
    IP_FORWARD.write_text(value, encoding="ascii")
    return True
