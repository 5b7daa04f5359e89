"""A tiny TCP server used by the datapath tests as a stand-in app or sidecar proxy inside a test netns.

Listeners are given as `name=host:port` (report mode) or `name=host:port:forward` (proxy mode).
Report mode writes one JSON line per connection describing what the kernel says about the socket (local
address, peer, the SO_ORIGINAL_DST answer or its errno) and then echoes what it receives until the peer
closes. Proxy mode forwards like a sidecar: to SO_ORIGINAL_DST when the kernel answers it (outbound), else to
its own local address from source 127.0.0.6 (inbound passthrough, Istio's convention).
"""

import json
import socket
import struct
import sys
import threading

SO_ORIGINAL_DST = 80


def original_dst(conn: socket.socket):
    try:
        raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    except OSError as exc:
        return {"errno": exc.errno}
    port, addr = struct.unpack_from("!2xH4s", raw)
    return {"ip": socket.inet_ntoa(addr), "port": port}


def serve(conn: socket.socket, name: str) -> None:
    with conn:
        info = {
            "server": name,
            "local": list(conn.getsockname()[:2]),
            "peer": list(conn.getpeername()[:2]),
            "original_dst": original_dst(conn),
        }
        conn.sendall(json.dumps(info).encode() + b"\n")
        while True:
            data = conn.recv(65536)
            if not data:
                return
            conn.sendall(data)


def bind(addr: str) -> socket.socket:
    host, port = addr.rsplit(":", 1)
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((host, int(port)))
    srv.listen(128)
    return srv


def pipe(src: socket.socket, dst: socket.socket) -> None:
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            dst.sendall(data)
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def forward(conn: socket.socket, name: str) -> None:
    orig = original_dst(conn)
    if "ip" in orig:
        target, source = (orig["ip"], orig["port"]), None
    else:
        target, source = conn.getsockname()[:2], ("127.0.0.6", 0)
    try:
        upstream = socket.create_connection(target, timeout=10, source_address=source)
    except OSError:
        conn.close()
        return
    # Timeouts make CPython poll and retry EAGAIN like an event-loop proxy does: a SOCKHASH socket's
    # tcp_bpf_recvmsg can return EAGAIN to a blocking reader (docs/architecture.md, "Splicing").
    conn.settimeout(60)
    upstream.settimeout(60)
    t = threading.Thread(target=pipe, args=(upstream, conn), daemon=True)
    t.start()
    pipe(conn, upstream)
    t.join()
    conn.close()
    upstream.close()


def accept_loop(srv: socket.socket, name: str, handler) -> None:
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=handler, args=(conn, name), daemon=True).start()


if __name__ == "__main__":
    # argv: name=host:port ...
    threads = []
    listeners = []
    for spec in sys.argv[1:]:
        name, addr = spec.split("=", 1)
        handler = serve
        if addr.endswith(":forward"):
            addr, handler = addr[: -len(":forward")], forward
        listeners.append((name, bind(addr), handler))
    for name, srv, handler in listeners:
        t = threading.Thread(target=accept_loop, args=(srv, name, handler), daemon=True)
        t.start()
        threads.append(t)
    print("ready", flush=True)
    for t in threads:
        t.join()
