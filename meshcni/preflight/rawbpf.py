"""Load hand-assembled BPF programs and create maps through libbpf, without bcc, for the kernel probes.

The probes must tell "the kernel lacks sk_lookup" apart from "bcc or the kernel headers are missing", so
they never compile C: each program is two to four instructions assembled here (`mov r0, 1; exit`, optionally
a helper call first), loaded with `bpf_prog_load` and the expected attach type the real datapath uses. The
verifier's log comes back in the error, which is what an operator needs when a probe fails. libbpf is
opened separately from `meshcni.sys.bpf` so that declaring these extra functions never touches the
argument types the datapath relies on.
"""

from __future__ import annotations

import ctypes
import os
import struct

from meshcni.sys import bpf
from meshcni.sys.errors import BpfError

# enum bpf_map_type
MAP_ARRAY = 2
MAP_SOCKHASH = 18

# enum bpf_func_id (include/uapi/linux/bpf.h, ___BPF_FUNC_MAPPER order)
FUNC_GET_NETNS_COOKIE = 122

_LOG_SIZE = 64 * 1024


class _ProgLoadOpts(ctypes.Structure):
    # struct bpf_prog_load_opts of libbpf 1.x up to log_buf; `sz` tells libbpf how much of it we know
    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("attempts", ctypes.c_int),
        ("expected_attach_type", ctypes.c_uint32),
        ("prog_btf_fd", ctypes.c_uint32),
        ("prog_flags", ctypes.c_uint32),
        ("prog_ifindex", ctypes.c_uint32),
        ("kern_version", ctypes.c_uint32),
        ("attach_btf_id", ctypes.c_uint32),
        ("attach_prog_fd", ctypes.c_uint32),
        ("attach_btf_obj_fd", ctypes.c_uint32),
        ("fd_array", ctypes.c_void_p),
        ("func_info", ctypes.c_void_p),
        ("func_info_cnt", ctypes.c_uint32),
        ("func_info_rec_size", ctypes.c_uint32),
        ("line_info", ctypes.c_void_p),
        ("line_info_cnt", ctypes.c_uint32),
        ("line_info_rec_size", ctypes.c_uint32),
        ("log_level", ctypes.c_uint32),
        ("log_size", ctypes.c_uint32),
        ("log_buf", ctypes.c_char_p),
    ]


def _lib() -> ctypes.CDLL:
    return bpf._lib()  # the one libbpf binding (meshcni/sys/bpf.py) declares these calls too


def _errno(rc: int) -> int:
    return -rc if rc < -1 else (ctypes.get_errno() or 1)


# --- a minimal assembler --------------------------------------------------------------------------


def insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    """One BPF instruction, for probes and tests that need more than the helpers below."""
    # struct bpf_insn: u8 code; u8 dst_reg:4, src_reg:4; s16 off; s32 imm (little endian on x86/arm64)
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


def mov_r0(imm: int) -> bytes:
    return insn(0xB7, dst=0, imm=imm)  # BPF_ALU64 | BPF_MOV | BPF_K


def call(helper: int) -> bytes:
    return insn(0x85, imm=helper)  # BPF_JMP | BPF_CALL; r1 still holds the context on entry


def exit_() -> bytes:
    return insn(0x95)  # BPF_JMP | BPF_EXIT


def returning(value: int, *, calling: int | None = None) -> bytes:
    """A program that optionally calls one helper with the context, then returns `value`."""
    return (call(calling) if calling is not None else b"") + mov_r0(value) + exit_()


# --- syscalls ------------------------------------------------------------------------------------------------


def prog_load(prog_type: int, insns: bytes, expected_attach_type: int = 0, name: str = "mcni_probe") -> int:
    """Load a program; returns its fd. A rejection raises BpfError with the verifier's last log lines."""
    log = ctypes.create_string_buffer(_LOG_SIZE)
    opts = _ProgLoadOpts(sz=ctypes.sizeof(_ProgLoadOpts), expected_attach_type=expected_attach_type,
                         log_level=0, log_size=_LOG_SIZE, log_buf=ctypes.cast(log, ctypes.c_char_p))
    # libbpf retries a failed load with log_level 1 when a buffer is given, so the log explains refusals.
    buf = ctypes.create_string_buffer(insns, len(insns))
    rc = _lib().bpf_prog_load(prog_type, name.encode()[:15], b"GPL", buf, len(insns) // 8, ctypes.byref(opts))
    if rc < 0:
        err = _errno(rc)
        # the log ends with statistics ("processed N insns ..."); the reason is the line before them
        lines = [line for line in log.value.decode(errors="replace").splitlines()
                 if line.strip() and not line.startswith(("processed ", "verification time"))]
        tail = lines[-2:]
        why = f" (verifier: {' / '.join(tail)})" if tail else ""
        raise BpfError(f"loading a program of type {prog_type}: {os.strerror(err)}{why}", err)
    return rc


def map_create(map_type: int, key_size: int, value_size: int, max_entries: int = 1,
               name: str = "mcni_probe") -> int:
    rc = _lib().bpf_map_create(map_type, name.encode()[:15], key_size, value_size, max_entries, None)
    if rc < 0:
        err = _errno(rc)
        raise BpfError(f"creating a map of type {map_type}: {os.strerror(err)}", err)
    return rc
