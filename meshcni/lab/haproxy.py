"""The pod's sidecar: an HAProxy 2.6 configuration with Istio's listeners, and a reader for its stats socket.

Listeners (all in the pod's netns; HAProxy runs as uid/gid 1337):
- `outbound` on 127.0.0.1:15001 — where capture sends the app's outgoing connections. `server orig 0.0.0.0`
  connects to the connection's destination, which HAProxy (built with TPROXY) reads with
  getsockopt(SO_ORIGINAL_DST) and falls back to getsockname; the eBPF datapath answers that getsockopt.
- `inbound` on 0.0.0.0:15006 — where capture steers incoming connections; the accepted socket's local address
  is the original destination, and the proxy connects to it from 127.0.0.6 so it is not captured again.
- `explicit_*` on 15101/15106 (HTTP) and 15102/15107 (TCP) — for benchmarks without capture: the app
  targets its own proxy, which forwards to the peer pod's proxy, which forwards to the local app.
- `routed_*` on 15103/15108 — the same explicit path, handled exactly like a captured connection (TCP mode,
  HTTP backend chosen by destination port, app reached from 127.0.0.6): the floor of the capture mechanism.
Both captured listeners accept in TCP mode and switch to an HTTP backend for the app ports, so HTTP gets an
`x-meshcni-proxy: <pod>-<direction>` response header as evidence while any other port stays a byte-exact
TCP stream; like HTTP listeners they let the answer carry the ACK of a request (`SMART_ACCEPT`). `show stat`
on the admin socket is parsed into rows; `stot` is a frontend's session total.
"""

from __future__ import annotations

import csv
import io
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from meshcni.config import INBOUND_PASSTHROUGH_SRC, INBOUND_PORT, OUTBOUND_PORT
from meshcni.lab.state import LabError

HAPROXY_BIN = "/usr/sbin/haproxy"
PROXY_HEADER = "x-meshcni-proxy"
EXPLICIT_HTTP_OUT = 15101
EXPLICIT_HTTP_IN = 15106
EXPLICIT_TCP_OUT = 15102
EXPLICIT_TCP_IN = 15107
# explicit listeners that handle a connection the way the capture listeners do (see `routed_out` below)
EXPLICIT_ROUTED_OUT = 15103
EXPLICIT_ROUTED_IN = 15108
EXPLICIT_PORTS = (EXPLICIT_HTTP_OUT, EXPLICIT_HTTP_IN, EXPLICIT_TCP_OUT, EXPLICIT_TCP_IN, EXPLICIT_ROUTED_OUT,
                  EXPLICIT_ROUTED_IN)
LISTEN_PORTS = (OUTBOUND_PORT, INBOUND_PORT) + EXPLICIT_PORTS
ECHO_PORT = 9000


@dataclass(frozen=True)
class ProxySpec:
    pod: str
    peer_ip: str  # the pod the explicit listeners forward to
    http_ports: tuple[int, ...]  # destination ports handled as HTTP (header added); others stay raw TCP
    socket_path: Path
    app_http_port: int = 80
    # True: the captured listeners are the agent-held sockets handed over by `meshcni proxy-exec`
    # (`bind fd@"${MESHCNI_FD_*}"`); False: HAProxy binds 15001/15006 itself.
    listen_fds: bool = False


# What a mesh's client-side proxy does for idempotent requests (Envoy's retry_on reset/connect-failure): a
# request whose upstream connection failed or closed before any byte of answer is sent again on a new
# connection. That is what makes a SIGKILLed server-side proxy invisible to the app: the connections the
# killed proxy had accepted die with it, the retry waits in the agent-held listener for the next one.
RETRIES = "    retries 3\n    retry-on conn-failure empty-response\n"

# HAProxy delays the kernel's ACK of a client's first bytes only in HTTP mode, where the answer will carry it.
# The capture listeners must take any protocol, so they run in TCP mode and would ack every captured request
# with an empty segment of its own (two more segments per connection than the HTTP listeners). Asking for it
# explicitly is safe for any protocol: a server-speaks-first one has nothing to ack, and a slow answer gets its
# ACK from the kernel's delayed-ACK timer, as in HTTP mode.
SMART_ACCEPT = "option tcp-smart-accept"


def render(spec: ProxySpec) -> str:
    def route(direction: str) -> str:
        # dst_port is the original destination port (SO_ORIGINAL_DST / local address), known at accept time,
        # so the switch to HTTP needs no inspect-delay and never stalls a server-speaks-first protocol.
        if not spec.http_ports:
            return ""
        ports = " ".join(str(p) for p in spec.http_ports)
        return f"    use_backend {direction}_http if {{ dst_port {ports} }}\n"

    if spec.listen_fds:
        # HAProxy 2.4+ expands "${VAR}" in quoted words and has .if/.endif blocks for the optional v6 one.
        outbound_bind = 'bind fd@"${MESHCNI_FD_OUTBOUND}"'
        inbound_bind = ('bind fd@"${MESHCNI_FD_INBOUND}"\n.if defined(MESHCNI_FD_INBOUND6)\n'
                        '    bind fd@"${MESHCNI_FD_INBOUND6}"\n.endif')
    else:
        outbound_bind = f"bind 127.0.0.1:{OUTBOUND_PORT}"
        inbound_bind = f"bind 0.0.0.0:{INBOUND_PORT}"

    return f"""# Written by meshcni lab for pod {spec.pod}. Runs as uid/gid 1337 (Istio's proxy identity).
global
    maxconn 4096
    stats socket {spec.socket_path} mode 600 level admin

defaults
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-request 30s

frontend outbound
    {outbound_bind}
    mode tcp
    {SMART_ACCEPT}
    # A destination equal to this listener's own port means the original destination is unknown (or an app
    # dialled the capture port itself): forwarding would connect the proxy to itself, again and again.
    tcp-request connection reject if {{ dst_port {OUTBOUND_PORT} }}
{route('outbound')}    default_backend outbound_tcp

backend outbound_http
    mode http
{RETRIES}    http-response add-header {PROXY_HEADER} {spec.pod}-outbound
    server orig 0.0.0.0

backend outbound_tcp
    mode tcp
    server orig 0.0.0.0

frontend inbound
    {inbound_bind}
    mode tcp
    {SMART_ACCEPT}
    # a connection addressed to the inbound capture port itself would be forwarded back to this listener
    tcp-request connection reject if {{ dst_port {INBOUND_PORT} }}
{route('inbound')}    default_backend inbound_tcp

backend inbound_http
    mode http
    http-response add-header {PROXY_HEADER} {spec.pod}-inbound
    server orig 0.0.0.0 source {INBOUND_PASSTHROUGH_SRC}

backend inbound_tcp
    mode tcp
    server orig 0.0.0.0 source {INBOUND_PASSTHROUGH_SRC}

frontend explicit_http_out
    bind 0.0.0.0:{EXPLICIT_HTTP_OUT}
    mode http
    http-response add-header {PROXY_HEADER} {spec.pod}-explicit-out
    default_backend explicit_http_out

backend explicit_http_out
    mode http
{RETRIES}    server peer {spec.peer_ip}:{EXPLICIT_HTTP_IN}

frontend explicit_http_in
    bind 0.0.0.0:{EXPLICIT_HTTP_IN}
    mode http
    http-response add-header {PROXY_HEADER} {spec.pod}-explicit-in
    default_backend explicit_http_in

backend explicit_http_in
    mode http
    server app 127.0.0.1:{spec.app_http_port}

# The same two hops with the capture listeners' own handling, for an app that dials the sidecar itself: TCP
# mode, the same reject rule, the HTTP backend picked by destination port (HAProxy's TCP-to-HTTP upgrade), the
# server side reached at the pod IP from {INBOUND_PASSTHROUGH_SRC}. Only how the connection reaches the
# listener and how its destination is learnt differ, so the bench can tell the capture mechanism's cost from
# what a port-routing proxy costs over a plain HTTP listener.
frontend routed_out
    bind 0.0.0.0:{EXPLICIT_ROUTED_OUT}
    mode tcp
    {SMART_ACCEPT}
    tcp-request connection reject if {{ dst_port {OUTBOUND_PORT} }}
    use_backend routed_out_http if {{ dst_port {EXPLICIT_ROUTED_OUT} }}
    default_backend routed_out_http

backend routed_out_http
    mode http
{RETRIES}    http-response add-header {PROXY_HEADER} {spec.pod}-routed-out
    server peer {spec.peer_ip}:{EXPLICIT_ROUTED_IN}

frontend routed_in
    bind 0.0.0.0:{EXPLICIT_ROUTED_IN}
    mode tcp
    {SMART_ACCEPT}
    tcp-request connection reject if {{ dst_port {INBOUND_PORT} }}
    use_backend routed_in_http if {{ dst_port {EXPLICIT_ROUTED_IN} }}
    default_backend routed_in_http

backend routed_in_http
    mode http
    http-response add-header {PROXY_HEADER} {spec.pod}-routed-in
    server app 0.0.0.0:{spec.app_http_port} source {INBOUND_PASSTHROUGH_SRC}

frontend explicit_tcp_out
    bind 0.0.0.0:{EXPLICIT_TCP_OUT}
    mode tcp
    default_backend explicit_tcp_out

backend explicit_tcp_out
    mode tcp
    server peer {spec.peer_ip}:{EXPLICIT_TCP_IN}

frontend explicit_tcp_in
    bind 0.0.0.0:{EXPLICIT_TCP_IN}
    mode tcp
    default_backend explicit_tcp_in

backend explicit_tcp_in
    mode tcp
    server app 127.0.0.1:{ECHO_PORT}
"""


def argv(conf: Path) -> list[str]:
    # -db: stay in the foreground, so the lab owns the process (no pid file, no daemon double fork).
    return [HAPROXY_BIN, "-db", "-f", str(conf)]


def check_argv(conf: Path) -> list[str]:
    return [HAPROXY_BIN, "-c", "-q", "-f", str(conf)]


# ------------------------------------------------------------------------------------------- stats socket


def command(socket_path: str | Path, cmd: str, timeout: float = 5.0) -> str:
    """Send one command to the admin socket and return its whole answer."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(socket_path))
            s.sendall(cmd.encode() + b"\n")
            chunks = []
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
    except OSError as exc:
        raise LabError(f"HAProxy stats socket {socket_path}: {exc.strerror or exc}") from exc
    return b"".join(chunks).decode("utf-8", errors="replace")


def parse_show_stat(text: str) -> list[dict[str, str]]:
    """Rows of `show stat` CSV as dicts keyed by the header names (`pxname`, `svname`, `stot`, ...)."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines or not lines[0].startswith("# "):
        raise LabError(f"unexpected `show stat` output: {text[:200]!r}")
    header = lines[0][2:]
    reader = csv.DictReader(io.StringIO("\n".join([header] + lines[1:])))
    return [{k: v for k, v in row.items() if k} for row in reader]


def frontend_sessions(rows: Iterable[dict[str, str]]) -> dict[str, int]:
    """Cumulative sessions (`stot`) per frontend."""
    return {r["pxname"]: int(r["stot"] or 0) for r in rows if r.get("svname") == "FRONTEND"}


def backend_sessions(rows: Iterable[dict[str, str]]) -> dict[str, int]:
    return {r["pxname"]: int(r["stot"] or 0) for r in rows if r.get("svname") == "BACKEND"}


def retries(socket_path: str | Path) -> int:
    """Requests this proxy sent again after its upstream failed (`wretr` summed over backends; see RETRIES)."""
    rows = parse_show_stat(command(socket_path, "show stat"))
    return sum(int(r.get("wretr") or 0) for r in rows if r.get("svname") == "BACKEND")


def stats(socket_path: str | Path) -> dict[str, dict[str, int]]:
    rows = parse_show_stat(command(socket_path, "show stat"))
    return {"frontends": frontend_sessions(rows), "backends": backend_sessions(rows)}
