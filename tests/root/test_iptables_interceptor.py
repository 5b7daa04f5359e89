"""Root tests for the iptables interceptor: real rules, real connections, in throwaway network namespaces.

Each test builds a "pod" netns joined by a veth pair to a "peer" netns (10.240.N.2 ↔ 10.240.N.1, plus an
IPv6 pair), captures the pod with `IptablesInterceptor`, and checks where real TCP connections land:
listeners made inside the namespaces answer with their own name, and the proxy listeners record the
SO_ORIGINAL_DST the kernel kept for the redirected connection. Clients run as a chosen uid/gid through
`nsenter --setuid`, because the rules tell the proxy (1337) from the app by socket owner. The host's own
iptables are snapshotted before the module and compared after it.
"""

from __future__ import annotations

import ipaddress
import os
import random
import re
import socket
import struct
import subprocess
import threading
import uuid
from dataclasses import dataclass, field, replace

import pytest

from meshcni.config import Mode, PodConfig
from meshcni.datapath.interceptor import PodNet
from meshcni.datapath.iptables import IptablesInterceptor
from meshcni.sys.errors import NamespaceNotFound
from meshcni.sys import iptables as ipt
from meshcni.sys.iptables import parse_save
from meshcni.sys.netns import in_netns, run_in_netns

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create network namespaces"),
]

APP_UID = 1000
PROXY_UID = 1337
SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h; the IPv6 twin IP6T_SO_ORIGINAL_DST has the same number
BACKENDS = ["nft", "legacy"]

CLIENT = r"""
import socket, sys
family = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
s = socket.socket(family, socket.SOCK_STREAM)
s.settimeout(5)
if len(sys.argv) > 4:
    s.bind((sys.argv[4], 0))
try:
    s.connect((sys.argv[1], int(sys.argv[2])))
    s.sendall(sys.argv[3].encode() + b"\n")
    print(s.makefile().readline().strip())
except OSError as exc:
    print("ERR:%s" % (exc.strerror or type(exc).__name__))
"""


# --- host safety --------------------------------------------------------------------------------------------

HOST_SAVE_TOOLS = ["iptables-nft-save", "ip6tables-nft-save", "iptables-legacy-save", "ip6tables-legacy-save"]


def normalized(save_output: str) -> str:
    """iptables-save text without its timestamped comments and packet counters."""
    lines = [line for line in save_output.splitlines() if line and not line.startswith("#")]
    return "\n".join(re.sub(r"\[\d+:\d+\]", "[0:0]", line) for line in lines)


def host_snapshot() -> dict[str, str]:
    # No `-t`: naming a table would make legacy instantiate it in the host namespace.
    return {t: normalized(subprocess.run([t], capture_output=True, text=True).stdout) for t in HOST_SAVE_TOOLS}


@pytest.fixture(scope="module", autouse=True)
def host_iptables_unchanged():
    before = host_snapshot()
    yield
    assert host_snapshot() == before, "the host's iptables changed during the iptables root tests"


# --- topology ---------------------------------------------------------------------------------------------


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, text=True)


@dataclass
class Topology:
    pod: str
    peer: str
    pod_ip: str
    peer_ip: str
    pod_ip6: str
    peer_ip6: str

    def podnet(self, config: PodConfig, ipv6: bool = True) -> PodNet:
        ips = [ipaddress.ip_address(self.pod_ip)] + ([ipaddress.ip_address(self.pod_ip6)] if ipv6 else [])
        return PodNet(key=os.path.basename(self.pod), netns=self.pod, ips=tuple(ips), config=config)


@pytest.fixture
def topo():
    tag = uuid.uuid4().hex[:8]
    pod, peer = f"mcni-ipt-{tag}", f"mcni-ipt-{tag}-peer"
    n = random.randint(1, 254)
    t = Topology(
        pod=f"/var/run/netns/{pod}", peer=f"/var/run/netns/{peer}",
        pod_ip=f"10.240.{n}.2", peer_ip=f"10.240.{n}.1",
        pod_ip6=f"fd00:240:{n:x}::2", peer_ip6=f"fd00:240:{n:x}::1",
    )
    try:
        sh("ip", "netns", "add", pod)
        sh("ip", "netns", "add", peer)
        sh("ip", "-n", pod, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", peer)
        for name, ip, ip6 in ((pod, t.pod_ip, t.pod_ip6), (peer, t.peer_ip, t.peer_ip6)):
            sh("ip", "-n", name, "link", "set", "lo", "up")
            sh("ip", "-n", name, "addr", "add", f"{ip}/24", "dev", "eth0")
            sh("ip", "-n", name, "addr", "add", f"{ip6}/64", "dev", "eth0", "nodad")
            sh("ip", "-n", name, "link", "set", "eth0", "up")
        yield t
    finally:
        for name in (pod, peer):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


def iptables_config(**changes) -> PodConfig:
    return replace(PodConfig(mode=Mode.IPTABLES), **changes)


# --- listeners and clients --------------------------------------------------------------------------------


@dataclass
class Accepted:
    token: str
    local: tuple
    original_dst: tuple | None


@dataclass
class Listener:
    """A TCP listener created inside a netns that answers every connection with its own name."""

    netns: str
    name: str
    host: str
    port: int
    seen: list[Accepted] = field(default_factory=list)

    def __post_init__(self):
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        with in_netns(self.netns):
            self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((self.host, self.port))
        self.sock.listen(16)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # shut down
            with conn:
                conn.settimeout(5)
                token = conn.makefile().readline().strip()
                self.seen.append(Accepted(token, conn.getsockname()[:2], original_dst(conn)))
                conn.sendall(self.name.encode() + b"\n")

    def by_token(self, token: str) -> Accepted:
        (hit,) = [a for a in self.seen if a.token == token]
        return hit

    def close(self):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        except OSError:
            pass
        self.sock.close()
        self.thread.join(5)


def original_dst(conn: socket.socket) -> tuple | None:
    """The pre-NAT destination conntrack remembers for this connection (what Envoy/HAProxy ask for)."""
    try:
        if conn.family == socket.AF_INET:
            raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
            port, addr = struct.unpack("!2xH4s8x", raw)
            return socket.inet_ntop(socket.AF_INET, addr), port
        raw = conn.getsockopt(socket.IPPROTO_IPV6, SO_ORIGINAL_DST, 28)
        port, addr = struct.unpack("!2xH4x16s4x", raw)
        return socket.inet_ntop(socket.AF_INET6, addr), port
    except OSError:
        return None


@pytest.fixture
def listeners():
    made: list[Listener] = []

    def make(netns, name, host, port):
        listener = Listener(netns, name, host, port)
        made.append(listener)
        return listener

    yield make
    for listener in made:
        listener.close()


def connect_as(netns: str, uid: int, host: str, port: int, token: str, source: str | None = None) -> str:
    """Connect from a process running as uid:uid inside `netns`; the name of the listener that answered."""
    argv = ["/usr/bin/python3", "-I", "-c", CLIENT, host, str(port), token] + ([source] if source else [])
    proc = run_in_netns(netns, argv, uid=uid, gid=uid, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def connect_from(netns: str, host: str, port: int, token: str) -> str:
    """Connect from this test process with a socket made inside `netns`."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with in_netns(netns):
        sock = socket.socket(family, socket.SOCK_STREAM)
    with sock:
        sock.settimeout(5)
        sock.connect((host, port))
        sock.sendall(token.encode() + b"\n")
        return sock.makefile().readline().strip()


def netns_save(netns: str, tool: str) -> str:
    return normalized(run_in_netns(netns, [tool], capture_output=True, text=True, check=True).stdout)


# --- tests ------------------------------------------------------------------------------------------------

FOREIGN_V4 = """*nat
:KEEP_ME - [0:0]
-A PREROUTING -p udp -j RETURN
-A OUTPUT -d 192.0.2.0/24 -j RETURN
-A POSTROUTING -j KEEP_ME
-A KEEP_ME -o eth0 -j MASQUERADE
COMMIT
*filter
-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT
-A OUTPUT -d 198.51.100.0/24 -j DROP
COMMIT
"""
FOREIGN_V6 = """*nat
-A OUTPUT -d 2001:db8::/32 -j RETURN
COMMIT
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_capture_is_idempotent_and_release_restores_every_other_rule(topo, backend):
    for tool, text in ((f"iptables-{backend}-restore", FOREIGN_V4), (f"ip6tables-{backend}-restore", FOREIGN_V6)):
        run_in_netns(topo.pod, [tool, "--noflush"], input=text, text=True, check=True, capture_output=True)
    saves = [f"iptables-{backend}-save", f"ip6tables-{backend}-save"]
    before = [netns_save(topo.pod, tool) for tool in saves]
    assert "KEEP_ME" in before[0] and "2001:db8::/32" in before[1]

    interceptor = IptablesInterceptor(backend)
    pod = topo.podnet(iptables_config(exclude_outbound_ports=(22,)))
    interceptor.capture(pod)
    once = [netns_save(topo.pod, tool) for tool in saves]
    assert interceptor.verify(pod) == []
    interceptor.capture(pod)
    assert [netns_save(topo.pod, tool) for tool in saves] == once
    assert once[0].count("-j ISTIO_OUTPUT") == 1 and once[1].count("-j ISTIO_OUTPUT") == 1
    # Our jumps are appended after the rules already in the builtin chains.
    assert parse_save(once[0], "nat").rules["OUTPUT"] == ["-d 192.0.2.0/24 -j RETURN", "-p tcp -j ISTIO_OUTPUT"]

    interceptor.release(pod)
    assert [netns_save(topo.pod, tool) for tool in saves] == before
    interceptor.release(pod)  # releasing again is fine and changes nothing
    assert [netns_save(topo.pod, tool) for tool in saves] == before


def test_verify_names_a_tampered_rule_and_capture_repairs_it(topo):
    interceptor = IptablesInterceptor("nft")
    pod = topo.podnet(iptables_config(), ipv6=False)
    interceptor.capture(pod)
    run_in_netns(
        topo.pod,
        ["iptables-nft", "-t", "nat", "-D", "ISTIO_OUTPUT", "-m", "owner", "--uid-owner", "1337", "-j", "RETURN"],
        check=True,
    )
    run_in_netns(topo.pod, ["iptables-nft", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-j", "ISTIO_OUTPUT"], check=True)
    assert interceptor.verify(pod) == [
        "IPv4 nat: missing rule '-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN'",
        "IPv4 nat: rule '-A OUTPUT -p tcp -j ISTIO_OUTPUT' is present 1 extra time(s)",
    ]
    interceptor.capture(pod)
    assert interceptor.verify(pod) == []


def test_pod_without_ipv6_gets_no_ipv6_rules_and_off_means_none(topo):
    interceptor = IptablesInterceptor("nft")
    pod = topo.podnet(iptables_config())
    interceptor.capture(pod)
    assert "ISTIO_OUTPUT" in netns_save(topo.pod, "ip6tables-nft-save")
    v4_only = topo.podnet(iptables_config(), ipv6=False)
    interceptor.capture(v4_only)
    assert "ISTIO" not in netns_save(topo.pod, "ip6tables-nft-save")
    assert interceptor.verify(v4_only) == []
    off = topo.podnet(iptables_config(mode=Mode.OFF))
    interceptor.capture(off)
    assert "ISTIO" not in netns_save(topo.pod, "iptables-nft-save")
    assert interceptor.verify(off) == []
    assert interceptor.verify(pod)  # and the captured expectation now fails


def test_missing_netns(topo):
    interceptor = IptablesInterceptor("nft")
    gone = PodNet(key="gone", netns="/var/run/netns/mcni-ipt-never-created", config=iptables_config())
    with pytest.raises(NamespaceNotFound):
        interceptor.capture(gone)
    assert interceptor.release(gone) is True  # a pod whose netns is gone is released already, hold and all
    assert interceptor.verify(gone) == ["network namespace /var/run/netns/mcni-ipt-never-created does not exist"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_outbound_app_is_redirected_to_proxy_with_original_destination(topo, listeners, backend):
    proxy = listeners(topo.pod, "outbound-proxy", "127.0.0.1", 15001)
    peer = listeners(topo.peer, "peer", "0.0.0.0", 8080)
    assert connect_as(topo.pod, APP_UID, topo.peer_ip, 8080, "before") == "peer"  # sanity: path works

    IptablesInterceptor(backend).capture(topo.podnet(iptables_config()))

    assert connect_as(topo.pod, APP_UID, topo.peer_ip, 8080, "app") == "outbound-proxy"
    hit = proxy.by_token("app")
    assert hit.original_dst == (topo.peer_ip, 8080)
    assert hit.local == ("127.0.0.1", 15001)
    # (b) the proxy's own upstream connection is not captured again.
    assert connect_as(topo.pod, PROXY_UID, topo.peer_ip, 8080, "proxy") == "peer"
    assert [a.token for a in peer.seen] == ["before", "proxy"]
    assert [a.token for a in proxy.seen] == ["app"]


def test_outbound_ipv6_is_redirected_to_proxy(topo, listeners):
    proxy = listeners(topo.pod, "outbound-proxy-v6", "::1", 15001)
    listeners(topo.peer, "peer-v6", "::", 8080)
    IptablesInterceptor("nft").capture(topo.podnet(iptables_config()))
    assert connect_as(topo.pod, APP_UID, topo.peer_ip6, 8080, "app6") == "outbound-proxy-v6"
    assert proxy.by_token("app6").original_dst == (topo.peer_ip6, 8080)
    assert connect_as(topo.pod, PROXY_UID, topo.peer_ip6, 8080, "proxy6") == "peer-v6"


def test_inbound_is_redirected_except_excluded_ports(topo, listeners):
    inbound = listeners(topo.pod, "inbound-proxy", "0.0.0.0", 15006)
    app = listeners(topo.pod, "app", "0.0.0.0", 80)
    listeners(topo.pod, "health", "0.0.0.0", 15021)
    IptablesInterceptor("nft").capture(topo.podnet(iptables_config()))

    assert connect_from(topo.peer, topo.pod_ip, 80, "remote") == "inbound-proxy"
    hit = inbound.by_token("remote")
    assert hit.original_dst == (topo.pod_ip, 80)
    assert hit.local == (topo.pod_ip, 15006)
    assert connect_from(topo.peer, topo.pod_ip, 15021, "probe") == "health"
    assert app.seen == []


def test_loopback_cases_istio_handles(topo, listeners):
    listeners(topo.pod, "inbound-proxy", "0.0.0.0", 15006)
    app = listeners(topo.pod, "app", "0.0.0.0", 80)
    IptablesInterceptor("nft").capture(topo.podnet(iptables_config()))
    # The app calling itself by pod IP stays on lo and skips the proxy.
    assert connect_as(topo.pod, APP_UID, topo.pod_ip, 80, "self") == "app"
    # The proxy calling this pod's IP (a service VIP that resolved to the pod itself) re-enters inbound.
    assert connect_as(topo.pod, PROXY_UID, topo.pod_ip, 80, "vip-self") == "inbound-proxy"
    # The proxy's inbound passthrough from 127.0.0.6 reaches the app uncaptured.
    assert connect_as(topo.pod, PROXY_UID, topo.pod_ip, 80, "passthrough", source="127.0.0.6") == "app"
    # Sidecar-aware apps talking to localhost are never captured.
    assert connect_as(topo.pod, APP_UID, "127.0.0.1", 80, "localhost") == "app"
    assert [a.token for a in app.seen] == ["self", "passthrough", "localhost"]


def test_excluded_outbound_port_and_cidr_bypass_the_proxy(topo, listeners):
    proxy = listeners(topo.pod, "outbound-proxy", "127.0.0.1", 15001)
    listeners(topo.peer, "peer-8080", "0.0.0.0", 8080)
    listeners(topo.peer, "peer-9000", "0.0.0.0", 9000)
    interceptor = IptablesInterceptor("nft")

    pod = topo.podnet(iptables_config(exclude_outbound_ports=(9000,)))
    interceptor.capture(pod)
    assert connect_as(topo.pod, APP_UID, topo.peer_ip, 9000, "port-excluded") == "peer-9000"
    assert connect_as(topo.pod, APP_UID, topo.peer_ip, 8080, "port-captured") == "outbound-proxy"

    # Re-capturing with a new config replaces the rules in place.
    peer_net = ipaddress.ip_network(f"{topo.peer_ip}/32")
    pod = topo.podnet(iptables_config(exclude_outbound_cidrs=(peer_net,)))
    interceptor.capture(pod)
    assert interceptor.verify(pod) == []
    assert connect_as(topo.pod, APP_UID, topo.peer_ip, 8080, "cidr-excluded") == "peer-8080"
    assert connect_as(topo.pod, APP_UID, topo.peer_ip, 9000, "cidr-excluded-9000") == "peer-9000"

    # An include list that does not cover the peer leaves it alone; one that does captures it.
    pod = topo.podnet(iptables_config(include_outbound_cidrs=(ipaddress.ip_network("10.99.0.0/16"),)))
    interceptor.capture(pod)
    assert connect_as(topo.pod, APP_UID, topo.peer_ip, 8080, "not-included") == "peer-8080"
    peer_subnet = ipaddress.ip_network(f"{topo.peer_ip}/24", strict=False)
    pod = topo.podnet(iptables_config(include_outbound_cidrs=(peer_subnet,)))
    interceptor.capture(pod)
    assert connect_as(topo.pod, APP_UID, topo.peer_ip, 8080, "included") == "outbound-proxy"
    assert [a.token for a in proxy.seen] == ["port-captured", "included"]


def test_release_stops_redirecting(topo, listeners):
    listeners(topo.pod, "outbound-proxy", "127.0.0.1", 15001)
    listeners(topo.peer, "peer", "0.0.0.0", 8080)
    interceptor = IptablesInterceptor("nft")
    pod = topo.podnet(iptables_config())
    interceptor.capture(pod)
    assert connect_as(topo.pod, APP_UID, topo.peer_ip, 8080, "captured") == "outbound-proxy"
    interceptor.release(pod)
    assert connect_as(topo.pod, APP_UID, topo.peer_ip, 8080, "released") == "peer"


@pytest.mark.parametrize("backend", BACKENDS)
def test_counters_count_each_connection_the_rules_decided_once(topo, listeners, backend):
    """`counters` reads the rules' packet counts: the nat table sees a connection's first packet only, so
    each connection counts once however many packets it carries, under the eBPF datapath's names."""
    listeners(topo.pod, "outbound-proxy", "127.0.0.1", 15001)
    listeners(topo.pod, "outbound-proxy-v6", "::1", 15001)
    listeners(topo.pod, "inbound-proxy", "0.0.0.0", 15006)
    listeners(topo.peer, "peer", "::", 8080)  # dual-stack: the proxy's own IPv4 connection lands here too
    interceptor = IptablesInterceptor(backend)
    pod = topo.podnet(iptables_config())
    assert interceptor.counters(pod) == {"outbound_captured": 0, "inbound_steered": 0, "bypassed": 0}

    interceptor.capture(pod)
    assert interceptor.counters(pod) == {"outbound_captured": 0, "inbound_steered": 0, "bypassed": 0}
    assert connect_as(topo.pod, APP_UID, topo.peer_ip, 8080, "app-1") == "outbound-proxy"
    assert connect_as(topo.pod, APP_UID, topo.peer_ip, 8080, "app-2") == "outbound-proxy"
    assert connect_as(topo.pod, PROXY_UID, topo.peer_ip, 8080, "proxy") == "peer"  # the proxy's own: RETURN
    assert connect_as(topo.pod, APP_UID, topo.peer_ip6, 8080, "app-v6") == "outbound-proxy-v6"  # ip6tables' share
    assert connect_from(topo.peer, topo.pod_ip, 80, "remote") == "inbound-proxy"
    assert interceptor.counters(pod) == {"outbound_captured": 3, "inbound_steered": 1, "bypassed": 1}

    # The counts live in the rules: released, nothing counts; captured again, they start from zero.
    interceptor.release(pod)
    assert interceptor.counters(pod) == {"outbound_captured": 0, "inbound_steered": 0, "bypassed": 0}
    interceptor.capture(pod)
    assert interceptor.counters(pod) == {"outbound_captured": 0, "inbound_steered": 0, "bypassed": 0}
    interceptor.release(pod)


def test_backend_detection_only_reads_the_host(monkeypatch):
    monkeypatch.delenv(ipt.BACKEND_ENV, raising=False)
    before = host_snapshot()
    ipt._host_backend.cache_clear()
    try:
        detected = ipt.detect_backend()
    finally:
        ipt._host_backend.cache_clear()
    assert host_snapshot() == before
    nft = sum(ipt.count_rules(before[t]) for t in ("iptables-nft-save", "ip6tables-nft-save"))
    legacy = sum(ipt.count_rules(before[t]) for t in ("iptables-legacy-save", "ip6tables-legacy-save"))
    assert detected is ipt.choose_backend(nft, legacy)
    assert IptablesInterceptor().backend is detected
