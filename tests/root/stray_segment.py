"""Sends one bare TCP ACK from src:sport to dst:dport through a raw socket: a segment of no connection.

Run as root inside a pod's netns. It stands for a late ACK or FIN of a connection the peer already reset,
which the peer's kernel looks up, finds no socket for, and answers with a reset.
Usage: stray_segment.py SRC DST SPORT DPORT
"""

import socket
import struct
import sys


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def main() -> None:
    src, dst, sport, dport = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    ack_only, window = 0x10, 65535
    header = struct.pack("!HHIIBBHHH", sport, dport, 1, 1, 5 << 4, ack_only, window, 0, 0)
    pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, socket.IPPROTO_TCP, len(header))
    header = header[:16] + struct.pack("!H", _checksum(pseudo + header)) + header[18:]
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP) as raw:
        raw.sendto(header, (dst, 0))
    print("sent", flush=True)


if __name__ == "__main__":
    main()
