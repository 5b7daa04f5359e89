"""The lab's CNI network: the conflist it hands the reference plugins, and the pod IP read from a result.

The chain is the one a simple node runs: `bridge` (with `host-local` IPAM) then `loopback`. The bridge is a
gateway (so pods get an address on it and a default route) but `ipMasq` is false, so the plugin never writes
an iptables rule in the host namespace. host-local keeps its allocations in the lab's state directory, so
one lab never sees another's leases and `down` leaves no file behind. Chained plugins (the meshcni plugin)
go after the primary ones: `build_conflist(..., extra=[{"type": "meshcni", ...}])` is the whole change.
Plugins are executed by the shared runtime helper `meshcni.cni.runtime` (ADD in order with prevResult, DEL in
reverse with the cached result, which it keeps under the lab's state dir).
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any, Iterable, Mapping

from meshcni.cni.runtime import Attachment, CniRuntime, PluginFailed, PluginNotFound, RuntimeConfigError
from meshcni.lab.state import LabError

CNI_VERSION = "1.0.0"  # the newest version Debian 12's containernetworking-plugins 1.1.1 speak
REFERENCE_PLUGIN_DIR = "/usr/lib/cni"
DEFAULT_IFNAME = "eth0"


def bridge_plugin(bridge: str, subnet: str, ipam_data_dir: str | Path) -> dict[str, Any]:
    net = ipaddress.ip_network(subnet)
    return {
        "type": "bridge",
        "bridge": bridge,
        "isGateway": True,
        # ipMasq would add a POSTROUTING rule to the host's nat table; lab traffic never leaves the node.
        "ipMasq": False,
        # Hairpin lets a pod reach its own IP through the bridge (a pod calling itself via its address).
        "hairpinMode": True,
        "ipam": {
            "type": "host-local",
            "ranges": [[{"subnet": str(net), "gateway": str(net.network_address + 1)}]],
            "routes": [{"dst": "0.0.0.0/0"}],
            "dataDir": str(ipam_data_dir),
        },
    }


def loopback_plugin() -> dict[str, Any]:
    return {"type": "loopback"}


def build_conflist(
    name: str,
    bridge: str,
    subnet: str,
    ipam_data_dir: str | Path,
    extra: Iterable[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """The lab network as a CNI network configuration list; `extra` plugins are chained after the primary ones."""
    plugins = [bridge_plugin(bridge, subnet, ipam_data_dir), loopback_plugin()]
    plugins.extend(dict(p) for p in extra)
    return {"cniVersion": CNI_VERSION, "name": name, "plugins": plugins}


def runtime(cni_path: Iterable[str], state_dir: str | Path) -> CniRuntime:
    return CniRuntime(bin_dirs=list(cni_path), cache_dir=str(Path(state_dir) / "cni" / "cache"))


def attachment(container_id: str, netns: str, ifname: str, pod_name: str, namespace: str) -> Attachment:
    # The kubelet's CNI_ARGS, so chained plugins (meshcni) can find the pod the way they would on a node.
    return Attachment(
        container_id=container_id,
        netns=netns,
        ifname=ifname,
        args={"K8S_POD_NAMESPACE": namespace, "K8S_POD_NAME": pod_name, "K8S_POD_INFRA_CONTAINER_ID": container_id},
    )


def add(rt: CniRuntime, conflist: Mapping[str, Any], att: Attachment) -> dict[str, Any]:
    try:
        return rt.add(dict(conflist), att)
    except (PluginFailed, RuntimeConfigError) as exc:
        raise LabError(f"CNI ADD for {att.container_id}: {exc}") from exc


def delete(rt: CniRuntime, conflist: Mapping[str, Any], att: Attachment) -> list[str]:
    """DEL through the chain; returns notes. A plugin whose binary does not exist cannot have created
    anything, so it is left out of the DEL (with a note) — that is what lets a lab whose ADD failed on a
    missing chained plugin roll back cleanly."""
    notes = []
    present = []
    for plugin in conflist["plugins"]:
        try:
            rt.find(plugin["type"])
            present.append(plugin)
        except PluginNotFound as exc:
            notes.append(f"CNI DEL skipped {plugin['type']!r}: {exc}")
    if not present:
        return notes
    try:
        rt.delete({**conflist, "plugins": present}, att)
    except (PluginFailed, RuntimeConfigError) as exc:
        raise LabError(f"CNI DEL for {att.container_id}: {exc}") from exc
    return notes


def pod_address(result: Mapping[str, Any], ifname: str = DEFAULT_IFNAME) -> tuple[str, str | None]:
    """(IPv4 address, MAC) of the pod's interface from a final ADD result.

    An `ips` entry points at its interface by index into `interfaces`; only an address on the pod-side
    interface (one with a `sandbox`) named `ifname` counts, not the bridge's own gateway address.
    """
    interfaces = result.get("interfaces") or []
    for ip in result.get("ips") or []:
        idx = ip.get("interface")
        iface = interfaces[idx] if isinstance(idx, int) and 0 <= idx < len(interfaces) else None
        if iface is None or iface.get("name") != ifname or not iface.get("sandbox"):
            continue
        addr = ipaddress.ip_interface(ip["address"])
        if addr.version == 4:
            return str(addr.ip), iface.get("mac")
    raise LabError(f"the CNI result has no IPv4 address on {ifname}: {result}")
