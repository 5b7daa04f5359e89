"""Every pinned map of the datapath, described and decoded, for `meshcni maps` (what bpftool shows, with
meshcni's own types and the reason each map exists).

`describe` gives each map's kernel type, sizes, capacity and how full it is: hash-like maps and SOCKHASH
count their keys, the listener SOCKMAP counts its occupied slots, the ring buffer reports unread bytes;
arrays have every slot by definition, and socket storage lives on the sockets and cannot be listed from
user space, so those report no count. `entries` decodes one map's entries with the layouts of
meshcni/datapath/layout.py into plain values (addresses as text, structures as dicts, per-CPU counters
summed), at most `limit` of them. Only maps of this datapath's pin directory are read, and nothing is
changed.
"""

from __future__ import annotations

import ctypes
import errno
import os
from dataclasses import dataclass
from pathlib import Path

from meshcni.datapath import layout as L
from meshcni.sys import bpf, ringbuf
from meshcni.sys.errors import BpfError

TYPE_NAMES = {1: "hash", 2: "array", 6: "percpu_array", 9: "lru_hash", 11: "lpm_trie", 15: "sockmap",
              18: "sockhash", 24: "sk_storage", 27: "ringbuf"}


@dataclass(frozen=True)
class MapSpec:
    name: str
    key_type: object  # ctypes type, None where user space cannot list the map
    value_type: object
    purpose: str


SPECS = (
    MapSpec("mcni_pods_v1", L.U64, L.U32, "netns cookie of an enrolled pod -> its slot (what enrolled means)"),
    MapSpec("mcni_pod_config_v1", L.U32, L.Pod, "slot -> the pod's capture settings"),
    MapSpec("mcni_pod_ips_v1", L.Ip, L.U32, "pod IP -> slot (sk_lookup finds the pod by destination)"),
    MapSpec("mcni_ports_v1", L.PortKey, L.U8, "per-pod port policy: excluded/included, by direction"),
    MapSpec("mcni_cidrs_v1", L.CidrKey, L.U8, "per-pod address range policy (longest prefix match)"),
    MapSpec("mcni_sock_origdst_v1", L.U64, L.OrigDst,
            "socket cookie of a captured connect() -> original destination, until the connect is sent"),
    MapSpec("mcni_pair_origdst_v1", L.Tuple, L.OrigDst,
            "4-tuple of a captured connection -> original destination, until the proxy's socket is established"),
    MapSpec("mcni_accepted_origdst_v1", None, None,
            "socket storage: the proxy's accepted socket's original destination (SO_ORIGINAL_DST)"),
    MapSpec("mcni_socks_v1", L.Tuple, None, "SOCKHASH: established local sockets that sk_msg splices"),
    MapSpec("mcni_proxy_listener_v1", None, None,
            "socket storage: the proxy's inbound listener, cloned onto every socket it accepts"),
    MapSpec("mcni_stays_on_tcp_v1", None, None, "socket storage: sockets never to splice"),
    MapSpec("mcni_listeners_v1", L.U32, L.U64, "SOCKMAP: slot * 2 + (1 for IPv6) -> the proxy's inbound listener"),
    MapSpec("mcni_counters_v1", L.U32, None, "slot -> per-CPU counters"),
    MapSpec("mcni_events_ctl_v1", L.U32, L.U64, "connection events: [0] on while watched, [1] dropped on a full ring"),
    MapSpec("mcni_events_v1", None, None, "ring buffer of connection events (meshcni events)"),
)
BY_NAME = {spec.name: spec for spec in SPECS}
POD_FLAGS = {"capture_outbound": L.F_CAPTURE_OUTBOUND, "capture_inbound": L.F_CAPTURE_INBOUND,
             "inbound_all_ports": L.F_INBOUND_ALL_PORTS, "outbound_all_cidrs": L.F_OUTBOUND_ALL_CIDRS,
             "splice": L.F_SPLICE, "splice_app": L.F_SPLICE_APP, "keys_counted": L.F_KEYS_COUNTED}


def describe(pin_dir: str | Path) -> list[dict]:
    """One dict per map: name, type, key/value size, max_entries, entries (None: not countable), purpose."""
    out = []
    for spec in SPECS:
        path = Path(pin_dir) / spec.name
        try:
            fd = bpf.obj_get(str(path))
        except BpfError as exc:
            if exc.errno != errno.ENOENT:
                raise
            out.append({"name": spec.name, "type": "", "key_size": 0, "value_size": 0, "max_entries": 0,
                        "entries": None, "purpose": spec.purpose, "pinned": False})
            continue
        try:
            info = bpf.map_info(fd)
            kind = TYPE_NAMES.get(info.type, f"type-{info.type}")
            out.append({"name": spec.name, "type": kind, "key_size": info.key_size, "value_size": info.value_size,
                        "max_entries": info.max_entries, "entries": _count(fd, spec, kind, info.max_entries),
                        "purpose": spec.purpose, "pinned": True})
        finally:
            os.close(fd)
    return out


def entries(pin_dir: str | Path, name: str, limit: int = 100) -> tuple[list[dict], bool]:
    """The decoded entries of one map, at most `limit`; returns (entries, truncated)."""
    spec = BY_NAME.get(name)
    if spec is None:
        raise KeyError(f"no datapath map {name!r}; the maps are: {', '.join(BY_NAME)}")
    if spec.key_type is None:
        raise ValueError(f"{name} cannot be listed from user space ({spec.purpose})")
    fd = bpf.obj_get(str(Path(pin_dir) / name))
    try:
        rows = _decode(fd, spec, pin_dir)
    finally:
        os.close(fd)
    return rows[:limit], len(rows) > limit


# --- counting and decoding --------------------------------------------------------------------------------


def _count(fd: int, spec: MapSpec, kind: str, max_entries: int) -> int | None:
    if kind == "ringbuf":
        consumer, producer = ringbuf.positions(fd)
        return producer - consumer  # unread bytes
    if kind == "sockmap":
        return len(_listeners(fd, spec, max_entries))
    if spec.key_type is None or kind in ("array", "percpu_array"):
        return None
    return len(bpf.RawMap(fd, spec.name, spec.key_type, spec.value_type or L.U32, owns_fd=False).keys())


def _listeners(fd: int, spec: MapSpec, max_entries: int) -> list[dict]:
    """Occupied SOCKMAP slots; a lookup from user space answers the socket's cookie."""
    m = bpf.RawMap(fd, spec.name, L.U32, L.U64, owns_fd=False)
    found = []
    for index in range(max_entries):
        cookie = m.lookup(L.U32(index))
        if cookie is not None:
            found.append({"key": {"slot": index // 2, "family": 6 if index % 2 else 4},
                          "value": {"socket_cookie": cookie.value}})
    return found


def _decode(fd: int, spec: MapSpec, pin_dir: str | Path) -> list[dict]:
    if spec.name == "mcni_listeners_v1":
        return _listeners(fd, spec, bpf.map_info(fd).max_entries)
    if spec.name == "mcni_counters_v1":
        m = bpf.RawMap(fd, spec.name, L.U32, L.percpu_counters_type(), owns_fd=False)
        rows = []
        for key, per_cpu in m.items():
            totals = [sum(cpu.v[i] for cpu in per_cpu) for i in range(len(L.COUNTERS))]
            if any(totals):  # every slot exists in an array; show the ones that ever counted
                rows.append({"key": key.value, "value": dict(zip(L.COUNTERS, totals))})
        return rows
    if spec.value_type is None:  # SOCKHASH: its values (socket references) are not readable
        m = bpf.RawMap(fd, spec.name, spec.key_type, L.U32, owns_fd=False)
        return [{"key": plain(k), "value": None} for k in m.keys()]
    m = bpf.RawMap(fd, spec.name, spec.key_type, spec.value_type, owns_fd=False)
    rows = [{"key": plain(k), "value": plain(v)} for k, v in m.items()]
    if spec.name == "mcni_pod_config_v1":  # an array: only the slots of enrolled pods mean anything
        used = _enrolled_slots(pin_dir)
        rows = [r for r in rows if r["key"] in used]
        for r in rows:
            r["value"]["flag_names"] = [n for n, bit in POD_FLAGS.items() if r["value"]["flags"] & bit]
    return rows


def _enrolled_slots(pin_dir: str | Path) -> set[int]:
    pods = bpf.RawMap(bpf.obj_get(str(Path(pin_dir) / "mcni_pods_v1")), "mcni_pods_v1", L.U64, L.U32)
    try:
        return {slot.value for _, slot in pods.items()}
    finally:
        pods.close()


def plain(value):
    """A ctypes value as JSON-ready Python: addresses as text, structures as dicts, arrays as lists."""
    if isinstance(value, L.Ip):
        return str(value.address())
    if isinstance(value, ctypes.Structure):
        return {name: plain(getattr(value, name)) for name, *_ in value._fields_ if not name.startswith("_")}
    if isinstance(value, ctypes.Array):
        return [plain(x) for x in value]
    if isinstance(value, ctypes._SimpleCData):
        return value.value
    return value
