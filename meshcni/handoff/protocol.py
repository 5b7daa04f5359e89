"""The handoff wire format on the per-pod unix stream socket, shared by the server and `proxy-exec`.

One exchange per connection: the client sends `GET\n`; the server answers one line — either a JSON header
`{"names": [...], "pod": ..., "generation": N}` with the listening sockets attached to it as SCM_RIGHTS ancillary
data, in `names` order, or `ERR <reason>`. Identity is never claimed in the request: the server reads the
peer's uid/pid from the kernel (SO_PEERCRED), and the client checks the server's the same way.
"""

from __future__ import annotations

import json
import os
import socket
import struct

from meshcni.handoff.errors import HandoffError, HandoffRefused

REQUEST = b"GET\n"
MAX_LINE = 65536
MAX_FDS = 16
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def peer_cred(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process that connected (or accepted) the other end, as the kernel recorded it."""
    return _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))


def encode_header(names: list[str], pod: str, generation: int) -> bytes:
    return json.dumps({"names": names, "pod": pod, "generation": generation}).encode() + b"\n"


def encode_refusal(reason: str) -> bytes:
    return b"ERR " + reason.replace("\n", " ").encode() + b"\n"


def read_line_with_fds(sock: socket.socket) -> tuple[bytes, list[int]]:
    """One newline-terminated line and every fd that arrived with it. The caller owns the fds."""
    data = b""
    fds: list[int] = []
    try:
        while not data.endswith(b"\n"):
            chunk, got, flags, _addr = socket.recv_fds(sock, MAX_LINE, MAX_FDS)
            fds.extend(got)
            if flags & socket.MSG_CTRUNC:
                raise HandoffError(f"the handoff carried more than {MAX_FDS} descriptors")
            if not chunk:
                break
            data += chunk
            if len(data) > MAX_LINE:
                raise HandoffError("the handoff header is too long")
    except BaseException:
        close_fds(fds)
        raise
    return data, fds


def parse_answer(line: bytes, fds: list[int]) -> dict:
    """Check an answer from the server; returns the header with "fds" (name -> fd) added."""
    if line.startswith(b"ERR "):
        close_fds(fds)
        raise HandoffRefused(f"the handoff server refused: {line[4:].decode(errors='replace').strip()}")
    try:
        header = json.loads(line)
        names = header["names"]
        if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
            raise ValueError("names must be a list of non-empty strings")
    except (ValueError, KeyError, TypeError) as exc:
        close_fds(fds)
        raise HandoffError(f"unreadable handoff answer {line[:200]!r}: {exc}") from None
    if len(names) != len(fds):
        close_fds(fds)
        raise HandoffError(f"the handoff named {len(names)} listeners but carried {len(fds)} descriptors")
    header["fds"] = dict(zip(names, fds))
    return header


def close_fds(fds) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
