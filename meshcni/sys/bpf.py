"""bpf(2) through libbpf: pinning, links, and map element access on raw file descriptors.

bcc compiles and loads the programs, but everything that must outlive the loading process (pins, bpf_links)
and everything the agent does on maps it re-opened from bpffs goes through these few libbpf calls. libbpf
returns -errno (1.0 semantics), which becomes a `BpfError` naming the operation and its target. Only EEXIST
on create and ENOENT on delete are ever tolerated, and only where the caller asks for it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno as errno_mod
import os
from functools import lru_cache

from meshcni.sys.errors import BpfError

# enum bpf_attach_type (include/uapi/linux/bpf.h)
ATTACH_CGROUP_SOCK_OPS = 3
ATTACH_SK_MSG_VERDICT = 7
ATTACH_CGROUP_INET4_CONNECT = 10
ATTACH_CGROUP_INET6_CONNECT = 11
ATTACH_CGROUP_GETSOCKOPT = 21
ATTACH_SK_LOOKUP = 36

# enum bpf_prog_type
PROG_SOCK_OPS = 13
PROG_SK_MSG = 16
PROG_CGROUP_SOCK_ADDR = 18
PROG_CGROUP_SOCKOPT = 25
PROG_SK_LOOKUP = 30

MAP_RINGBUF = 27  # BPF_MAP_TYPE_RINGBUF

BPF_ANY = 0
BPF_NOEXIST = 1
BPF_EXIST = 2

BPF_F_QUERY_EFFECTIVE = 1 << 0
_QUERY_MAX = 64  # the kernel's limit of programs per cgroup hook (BPF_CGROUP_MAX_PROGS)


class _ProgInfo(ctypes.Structure):
    # the head of struct bpf_prog_info; the kernel fills only what fits in the size we pass
    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("tag", ctypes.c_uint8 * 8),
        ("jited_prog_len", ctypes.c_uint32),
        ("xlated_prog_len", ctypes.c_uint32),
        ("jited_prog_insns", ctypes.c_uint64),
        ("xlated_prog_insns", ctypes.c_uint64),
        ("load_time", ctypes.c_uint64),
        ("created_by_uid", ctypes.c_uint32),
        ("nr_map_ids", ctypes.c_uint32),
        ("map_ids", ctypes.c_uint64),
        ("name", ctypes.c_char * 16),
    ]


class _LinkInfo(ctypes.Structure):
    # the head of struct bpf_link_info
    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32), ("prog_id", ctypes.c_uint32)]


class _MapInfo(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("name", ctypes.c_char * 16),
    ]


@lru_cache(maxsize=1)
def _lib() -> ctypes.CDLL:
    name = ctypes.util.find_library("bpf") or "libbpf.so.1"
    try:
        lib = ctypes.CDLL(name, use_errno=True)
    except OSError as exc:
        raise BpfError(f"cannot load libbpf ({name}): {exc}; install libbpf1") from exc
    vp, c_int, c_uint = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint
    for fn, args in {
        "bpf_obj_pin": [c_int, ctypes.c_char_p],
        "bpf_obj_get": [ctypes.c_char_p],
        "bpf_link_create": [c_int, c_int, c_uint, vp],
        "bpf_link_update": [c_int, c_int, vp],
        "bpf_link_detach": [c_int],
        "bpf_map_lookup_elem": [c_int, vp, vp],
        "bpf_map_update_elem": [c_int, vp, vp, ctypes.c_uint64],
        "bpf_map_delete_elem": [c_int, vp],
        "bpf_map_get_next_key": [c_int, vp, vp],
        "bpf_map_lookup_batch": [c_int, vp, vp, vp, vp, ctypes.POINTER(ctypes.c_uint32), vp],
        "bpf_obj_get_info_by_fd": [c_int, vp, ctypes.POINTER(ctypes.c_uint32)],
        "bpf_prog_get_fd_by_id": [c_uint],
        "bpf_prog_query": [c_int, c_uint, ctypes.c_uint32, vp, vp, ctypes.POINTER(ctypes.c_uint32)],
        # the preflight's tiny probe programs and maps (meshcni/preflight/rawbpf.py)
        "bpf_prog_load": [c_int, ctypes.c_char_p, ctypes.c_char_p, vp, ctypes.c_size_t, vp],
        "bpf_map_create": [c_int, ctypes.c_char_p, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_uint32, vp],
    }.items():
        f = getattr(lib, fn)
        f.argtypes = args
        f.restype = c_int
    return lib


def _check(rc: int, what: str) -> int:
    if rc < 0:
        err = -rc if rc != -1 else (ctypes.get_errno() or errno_mod.EPERM)
        raise BpfError(f"{what}: {os.strerror(err)}", err)
    return rc


def obj_pin(fd: int, path: str) -> None:
    _check(_lib().bpf_obj_pin(fd, os.fsencode(path)), f"pin to {path}")


def obj_get(path: str) -> int:
    """Open a pinned object; raises BpfError with errno ENOENT when nothing is pinned there."""
    return _check(_lib().bpf_obj_get(os.fsencode(path)), f"open pinned {path}")


def link_create(prog_fd: int, target_fd: int, attach_type: int, what: str) -> int:
    return _check(_lib().bpf_link_create(prog_fd, target_fd, attach_type, None), f"attach {what}")


def link_update(link_fd: int, prog_fd: int, what: str) -> None:
    """Atomically replace the program behind a link: no window without a program attached."""
    _check(_lib().bpf_link_update(link_fd, prog_fd, None), f"update link {what}")


def link_detach(link_fd: int, what: str) -> None:
    try:
        _check(_lib().bpf_link_detach(link_fd), f"detach {what}")
    except BpfError as exc:
        if exc.errno not in (errno_mod.ENOLINK, errno_mod.ENOENT):
            raise


def prog_info(fd: int) -> _ProgInfo:
    info = _ProgInfo()
    size = ctypes.c_uint32(ctypes.sizeof(info))
    _check(_lib().bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)), "program info")
    return info


def prog_tag(fd: int) -> str:
    return bytes(prog_info(fd).tag).hex()


def link_prog_id(fd: int) -> int:
    info = _LinkInfo()
    size = ctypes.c_uint32(ctypes.sizeof(info))
    _check(_lib().bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)), "link info")
    return info.prog_id


def prog_fd_by_id(prog_id: int) -> int:
    return _check(_lib().bpf_prog_get_fd_by_id(prog_id), f"open program id {prog_id}")


def prog_query(target_fd: int, attach_type: int, what: str, effective: bool = True) -> list[int]:
    """Ids of the programs attached at a hook of a cgroup (or netns) fd. With `effective`, those of its ancestors
    too, in the order the kernel runs them (the cgroup's own first, then each parent's, in attach order)."""
    ids = (ctypes.c_uint32 * _QUERY_MAX)()
    count = ctypes.c_uint32(_QUERY_MAX)
    flags = BPF_F_QUERY_EFFECTIVE if effective else 0
    _check(_lib().bpf_prog_query(target_fd, attach_type, flags, None, ids, ctypes.byref(count)), f"query {what}")
    return list(ids[: count.value])


def map_info(fd: int) -> _MapInfo:
    info = _MapInfo()
    size = ctypes.c_uint32(ctypes.sizeof(info))
    _check(_lib().bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)), "map info")
    return info


_BATCH = 256  # entries per BPF_MAP_LOOKUP_BATCH call
_ENOTSUPP = 524  # the kernel-internal "not supported" some map types answer batch calls with


class RawMap:
    """Element access on a map fd with ctypes keys and values (value may be a per-CPU array type)."""

    def __init__(self, fd: int, name: str, key_type, value_type, owns_fd: bool = True):
        self.fd, self.name = fd, name
        self.key_type, self.value_type = key_type, value_type
        self._owns_fd = owns_fd

    def lookup(self, key):
        value = self.value_type()
        rc = _lib().bpf_map_lookup_elem(self.fd, ctypes.byref(key), ctypes.byref(value))
        if rc == -errno_mod.ENOENT:
            return None
        _check(rc, f"lookup in {self.name}")
        return value

    def update(self, key, value, flags: int = BPF_ANY) -> None:
        _check(
            _lib().bpf_map_update_elem(self.fd, ctypes.byref(key), ctypes.byref(value), flags),
            f"update {self.name}",
        )

    def delete(self, key, missing_ok: bool = True) -> bool:
        rc = _lib().bpf_map_delete_elem(self.fd, ctypes.byref(key))
        if rc == -errno_mod.ENOENT and missing_ok:
            return False
        _check(rc, f"delete from {self.name}")
        return True

    def keys(self) -> list:
        # without values: a SOCKHASH/SOCKMAP with a 4-byte value cannot be read from user space (ENOSPC)
        return [self.key_type.from_buffer_copy(k) for k, _ in self._raw_entries(with_values=False)]

    def items(self) -> list:
        """Every (key, value): a few BPF_MAP_LOOKUP_BATCH calls where the map type has them (hash and array
        maps), otherwise one lookup per key."""
        return [(self.key_type.from_buffer_copy(k), self.value_type.from_buffer_copy(v))
                for k, v in self._raw_entries()]

    def delete_where(self, match) -> int:
        """Delete every entry for which `match(key_bytes, value_bytes)` is true; returns how many.

        The scan reads raw bytes, batch by batch, and builds no ctypes object per entry: sweeping a map that
        all pods share (a pod's release) then costs a few syscalls and feeds the garbage collector nothing
        (thousands of short-lived ctypes objects per release had the agent running full collections).
        """
        doomed = [k for k, v in self._raw_entries() if match(k, v)]
        deleted = 0
        key = ctypes.create_string_buffer(ctypes.sizeof(self.key_type))
        for raw in doomed:
            ctypes.memmove(key, raw, len(raw))
            rc = _lib().bpf_map_delete_elem(self.fd, key)
            if rc == -errno_mod.ENOENT:
                continue  # gone meanwhile
            _check(rc, f"delete from {self.name}")
            deleted += 1
        return deleted

    def _raw_entries(self, with_values: bool = True):
        """(key bytes, value bytes) of every entry: batch lookups, or key by key where the type has none
        (there, `with_values=False` skips the per-key lookup and yields empty values)."""
        ksz, vsz = ctypes.sizeof(self.key_type), ctypes.sizeof(self.value_type)
        keys = ctypes.create_string_buffer(ksz * _BATCH)
        values = ctypes.create_string_buffer(vsz * _BATCH)
        token_in, token_out = ctypes.create_string_buffer(max(ksz, 8)), ctypes.create_string_buffer(max(ksz, 8))
        first = True
        while True:
            count = ctypes.c_uint32(_BATCH)
            rc = _lib().bpf_map_lookup_batch(self.fd, None if first else token_in, token_out, keys, values,
                                             ctypes.byref(count), None)
            err = -rc if rc != -1 else ctypes.get_errno()
            if rc < 0 and err != errno_mod.ENOENT:
                if first and err in (errno_mod.EINVAL, errno_mod.EOPNOTSUPP, _ENOTSUPP):
                    yield from self._raw_entries_one_by_one(with_values)
                    return
                _check(rc, f"iterate {self.name}")
            n = count.value
            kraw, vraw = keys.raw[: n * ksz], values.raw[: n * vsz]
            for i in range(n):
                yield kraw[i * ksz:(i + 1) * ksz], vraw[i * vsz:(i + 1) * vsz]
            if rc < 0:  # ENOENT: that was the last batch
                return
            ctypes.memmove(token_in, token_out, len(token_in))
            first = False

    def _raw_entries_one_by_one(self, with_values: bool):
        ksz = ctypes.sizeof(self.key_type)
        prev, nxt = ctypes.create_string_buffer(ksz), ctypes.create_string_buffer(ksz)
        value = self.value_type()
        first = True
        while True:
            rc = _lib().bpf_map_get_next_key(self.fd, None if first else prev, nxt)
            if rc == -errno_mod.ENOENT:
                return
            _check(rc, f"iterate {self.name}")
            first = False
            ctypes.memmove(prev, nxt, ksz)
            if not with_values:
                yield nxt.raw, b""
                continue
            rc = _lib().bpf_map_lookup_elem(self.fd, nxt, ctypes.byref(value))
            if rc == -errno_mod.ENOENT:
                continue  # deleted between the two calls
            _check(rc, f"lookup in {self.name}")
            yield nxt.raw, bytes(value)

    def close(self) -> None:
        if self._owns_fd and self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
