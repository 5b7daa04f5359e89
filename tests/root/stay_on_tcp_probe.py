"""Connects to host:port like probe_client, and reads its own socket's stay-on-TCP mark before and after sending.

Run inside a pod netns and the test cgroup, as root (the map lookup is a bpf(2) call): socket-storage maps
take the socket's fd as the key, so the mark sk_msg left on *this* socket can be read back. Prints one JSON
object: the mark before any byte was sent, after, and whether the echo came back byte for byte.
"""

import ctypes
import json
import socket
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from meshcni.sys import bpf  # noqa: E402


def main() -> None:
    host, port, pin_dir = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    marks = bpf.RawMap(bpf.obj_get(f"{pin_dir}/mcni_stays_on_tcp_v1"), "mcni_stays_on_tcp_v1", ctypes.c_int,
                       ctypes.c_uint8)
    payload = bytes(range(256)) * 64
    with socket.create_connection((host, port), timeout=10) as conn:
        f = conn.makefile("rb")
        f.readline()  # the server's JSON line
        before = marks.lookup(ctypes.c_int(conn.fileno())) is not None
        for i in range(0, len(payload), 4096):  # several messages: each after the first meets the mark
            conn.sendall(payload[i:i + 4096])
        after = marks.lookup(ctypes.c_int(conn.fileno())) is not None
        conn.shutdown(socket.SHUT_WR)
        echoed = f.read()
    marks.close()
    print(json.dumps({"marked_before": before, "marked_after": after, "intact": echoed == payload}))


if __name__ == "__main__":
    main()
