"""Python mirrors of the structures and constants in bpf/include/meshcni.h.

The C header is the source of truth; every structure here has the same field order and sizes, and a unit
test compares the sizes with what the compiled programs' maps report (key_size/value_size), so a drifted
layout fails a test instead of corrupting a map.
"""

from __future__ import annotations

import ctypes
import ipaddress
from functools import lru_cache

MAP_VERSION = "v1"

# pod flags
F_CAPTURE_OUTBOUND = 1 << 0
F_CAPTURE_INBOUND = 1 << 1
F_INBOUND_ALL_PORTS = 1 << 2
F_OUTBOUND_ALL_CIDRS = 1 << 3
F_SPLICE = 1 << 4  # proxy<->proxy pairs
F_SPLICE_APP = 1 << 5  # with F_SPLICE: the app's own sockets too
F_KEYS_COUNTED = 1 << 31  # user space only: Pod.policy_keys and Pod.ip_keys are valid

DIR_INBOUND = 1
DIR_OUTBOUND = 2
POLICY_EXCLUDE = 1
POLICY_INCLUDE = 2

# enum mcni_counter, in order
COUNTERS = (
    "outbound_captured",
    "inbound_steered",
    "bypassed",
    "msgs_spliced",
    "bytes_spliced",
    "no_listener",
    "errors",
)


class Ip(ctypes.Structure):
    _fields_ = [("w", ctypes.c_uint8 * 16)]

    @classmethod
    def of(cls, addr: str | ipaddress.IPv4Address | ipaddress.IPv6Address) -> "Ip":
        a = ipaddress.ip_address(addr)
        if isinstance(a, ipaddress.IPv4Address):
            a = ipaddress.IPv6Address(b"\x00" * 10 + b"\xff\xff" + a.packed)
        ip = cls()
        ctypes.memmove(ip.w, a.packed, 16)
        return ip

    def address(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        a = ipaddress.IPv6Address(bytes(self.w))
        return a.ipv4_mapped or a


class Pod(ctypes.Structure):
    _fields_ = [
        ("slot", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("proxy_uid", ctypes.c_uint32),
        ("proxy_gid", ctypes.c_uint32),
        ("outbound_port", ctypes.c_uint16),
        ("inbound_port", ctypes.c_uint16),
        ("policy_keys", ctypes.c_uint16),
        ("ip_keys", ctypes.c_uint16),
    ]


class Tuple(ctypes.Structure):
    _fields_ = [
        ("netns", ctypes.c_uint64),
        ("local", Ip),
        ("remote", Ip),
        ("local_port", ctypes.c_uint16),
        ("remote_port", ctypes.c_uint16),
        ("_pad", ctypes.c_uint32),
    ]


class OrigDst(ctypes.Structure):
    _fields_ = [
        ("ip", Ip),
        ("port", ctypes.c_uint16),
        ("family", ctypes.c_uint16),
        ("slot", ctypes.c_uint32),
    ]


class PortKey(ctypes.Structure):
    _fields_ = [
        ("slot", ctypes.c_uint32),
        ("port", ctypes.c_uint16),
        ("dir", ctypes.c_uint8),
        ("_pad", ctypes.c_uint8),
    ]


CIDR_KEY_FIXED_BITS = 64  # CidrKey's slot and kind, matched exactly before the address prefix


class CidrKey(ctypes.Structure):
    _fields_ = [
        ("prefixlen", ctypes.c_uint32),
        ("slot", ctypes.c_uint32),
        ("kind", ctypes.c_uint32),
        ("ip", Ip),
    ]

    @classmethod
    def of(cls, slot: int, kind: int, net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> "CidrKey":
        # the trie matches slot and kind exactly (64 bits), then the address prefix; IPv4 is v4-mapped
        bits = net.prefixlen + (96 if net.version == 4 else 0)
        return cls(prefixlen=CIDR_KEY_FIXED_BITS + bits, slot=slot, kind=kind, ip=Ip.of(net.network_address))


# enum mcni_event_kind and enum mcni_event_reason, by value
EVENT_KINDS = {1: "outbound_captured", 2: "outbound_bypassed", 3: "inbound_steered", 4: "inbound_bypassed",
               5: "inbound_no_listener", 6: "error"}
EVENT_REASONS = {0: "", 1: "proxy", 2: "loopback", 3: "policy", 4: "capture_port"}
EV_CTL_ON = 0
EV_CTL_LOST = 1


class Event(ctypes.Structure):
    """struct mcni_event: one capture decision, as the ring buffer carries it."""

    _fields_ = [
        ("ts_ns", ctypes.c_uint64),
        ("slot", ctypes.c_uint32),
        ("pid", ctypes.c_uint32),
        ("uid", ctypes.c_uint32),
        ("kind", ctypes.c_uint8),
        ("reason", ctypes.c_uint8),
        ("family", ctypes.c_uint16),
        ("src", Ip),
        ("dst", Ip),
        ("sport", ctypes.c_uint16),
        ("dport", ctypes.c_uint16),
        ("_pad", ctypes.c_uint32),
        ("comm", ctypes.c_char * 16),
    ]


class Counters(ctypes.Structure):
    _fields_ = [("v", ctypes.c_uint64 * len(COUNTERS))]


@lru_cache(maxsize=1)
def possible_cpus() -> int:
    """Per-CPU maps hold one value per *possible* CPU (not online), as the kernel's cpu_possible_mask."""
    with open("/sys/devices/system/cpu/possible", encoding="ascii") as f:
        text = f.read().strip()
    count = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        count += (int(hi) if hi else int(lo)) - int(lo) + 1
    return count


def percpu_counters_type():
    return Counters * possible_cpus()


U32 = ctypes.c_uint32
U64 = ctypes.c_uint64
U8 = ctypes.c_uint8
