"""Listening TCP sockets of a network namespace, asked of the kernel over NETLINK_SOCK_DIAG (inet_diag).

Why not /proc/net/tcp: that file walks the kernel's *established* hash table too, which is sized for the
whole machine (hundreds of thousands of buckets on a node with memory) and shared by every namespace, so
one read costs milliseconds even in an empty pod. An inet_diag dump restricted to the LISTEN state walks
only the listening hash. The answer is about the namespace the netlink socket was *created* in, so callers
make it inside the pod's netns (`listening_in`).
"""

from __future__ import annotations

import os
import socket
import struct

from meshcni.sys import netns
from meshcni.sys.errors import SysError

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
TCP_LISTEN = 10

_NLMSGHDR = struct.Struct("=IHHII")
# inet_diag_req_v2: family, protocol, ext, pad, states; then inet_diag_sockid (48 bytes, zero: no filter)
_REQ = struct.Struct("=BBBxI48x")
# inet_diag_msg: family(u8) state(u8) timer(u8) retrans(u8), inet_diag_sockid (sport be16 at byte 4, ...,
# 48 bytes), expires rqueue wqueue uid inode (u32 each): the inode is at byte 4 + 48 + 16
_MSG_SPORT, _MSG_INODE = 4, 68


def _request(family: int, seq: int) -> bytes:
    body = _REQ.pack(family, socket.IPPROTO_TCP, 0, 1 << TCP_LISTEN)
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + body


def listening(sock: socket.socket, port: int | None = None) -> list[tuple[int, int, int]]:
    """(family, port, inode) of every TCP socket listening in `sock`'s netns, optionally on `port` only.

    `sock` is a NETLINK_SOCK_DIAG socket (see `open_socket`); it can be reused for several queries.
    """
    found = []
    for seq, family in enumerate((socket.AF_INET, socket.AF_INET6), start=1):
        sock.send(_request(family, seq))
        done = False
        while not done:
            data = sock.recv(65536)
            offset = 0
            while offset + _NLMSGHDR.size <= len(data):
                length, msg_type, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data, offset)
                if length < _NLMSGHDR.size:
                    raise SysError("sock_diag: malformed netlink message")
                body = offset + _NLMSGHDR.size
                if msg_type == NLMSG_DONE:
                    done = True
                    break
                if msg_type == NLMSG_ERROR:
                    err = -struct.unpack_from("=i", data, body)[0]
                    if err == 0:
                        done = True
                        break
                    raise SysError(f"sock_diag dump of listening sockets: {os.strerror(err)}")
                if msg_type == SOCK_DIAG_BY_FAMILY:
                    msg_family, state = data[body], data[body + 1]
                    sport = struct.unpack_from(">H", data, body + _MSG_SPORT)[0]
                    inode = struct.unpack_from("=I", data, body + _MSG_INODE)[0]
                    if state == TCP_LISTEN and (port is None or sport == port) and inode:
                        found.append((msg_family, sport, inode))
                offset += (length + 3) & ~3
    return found


def open_socket() -> socket.socket:
    """A NETLINK_SOCK_DIAG socket in the calling thread's current network namespace."""
    try:
        return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_SOCK_DIAG)
    except OSError as exc:
        raise SysError(f"cannot open a sock_diag netlink socket: {exc.strerror}") from exc


def listening_in(netns_path: str | os.PathLike, port: int | None = None) -> list[tuple[int, int, int]]:
    """`listening` for the netns at `netns_path` (a pod's, or /proc/<pid>/ns/net): the netlink socket is made
    with this thread inside it, which is what scopes the kernel's answer; the thread returns at once."""
    with netns.in_netns(netns_path):
        sock = open_socket()
    with sock:
        return listening(sock, port)
