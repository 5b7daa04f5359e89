"""The eBPF datapath on the real kernel: two pods (network namespaces joined by a veth pair) with a stand-in
sidecar proxy and app each, all processes inside a private cgroup v2 the programs are attached to.

Nothing here touches the host's traffic: the programs see only the test cgroup, membership is by netns
cookie, and every fixture detaches, unpins, kills and deletes what it made even when a test fails.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from meshcni.config import PodConfig
from meshcni.datapath import layout as L
from meshcni.datapath import loader
from meshcni.datapath.ebpf import EbpfDatapath
from meshcni.datapath.interceptor import PodNet
from meshcni.sys import bpf, cgroup, proc
from meshcni.sys.errors import BpfError, FeatureMissing, NamespaceNotFound

pytestmark = pytest.mark.root

HERE = Path(__file__).resolve().parent
SERVER = str(HERE / "probe_server.py")
CLIENT = str(HERE / "probe_client.py")
APP_UID = 1000
PROXY_UID = 1337
MiB = 1 << 20


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


@pytest.fixture(scope="module")
def node():
    """A private cgroup and bpffs directory with the datapath loaded into them."""
    tag = uuid.uuid4().hex[:8]
    cg = cgroup.ensure(cgroup.unified_root() / f"meshcni-test-{tag}")
    pin_dir = Path(f"/sys/fs/bpf/meshcni-test-{tag}")
    dp = None
    try:
        dp = EbpfDatapath.load(pin_dir, cgroup=cg)
        yield {"dp": dp, "cgroup": cg, "pin_dir": pin_dir}
    finally:
        if dp is not None:
            dp.unload()
        for pid in cgroup.pids(cg):
            proc.stop(proc.ref(pid), grace=1)
        cgroup.remove(cg)
    assert not pin_dir.exists(), "the datapath left pins behind"
    assert not cg.exists()


class Pods:
    """Two netns pods, A and B, on one /24 joined by a veth pair, with their processes."""

    def __init__(self, node):
        self.node = node
        self.tag = uuid.uuid4().hex[:6]
        n = int(self.tag[:2], 16)
        self.ns = {p: f"mcni-dp-{self.tag}-{p}" for p in "ab"}
        self.ip = {"a": f"10.241.{n}.1", "b": f"10.241.{n}.2"}
        self.procs: list[subprocess.Popen] = []
        for p in "ab":
            sh("ip", "netns", "add", self.ns[p])
            sh("ip", "-n", self.ns[p], "link", "set", "lo", "up")
        sh("ip", "link", "add", f"mcv{self.tag}a", "netns", self.ns["a"], "type", "veth",
           "peer", "name", f"mcv{self.tag}b", "netns", self.ns["b"])
        for p in "ab":
            sh("ip", "-n", self.ns[p], "addr", "add", f"{self.ip[p]}/24", "dev", f"mcv{self.tag}{p}")
            sh("ip", "-n", self.ns[p], "link", "set", f"mcv{self.tag}{p}", "up")

    def path(self, p: str) -> str:
        return f"/var/run/netns/{self.ns[p]}"

    def podnet(self, p: str, config: PodConfig | None = None) -> PodNet:
        return PodNet(key=f"{self.tag}-{p}", netns=self.path(p), ips=(ipaddress.ip_address(self.ip[p]),),
                      config=config or PodConfig(), name=p, namespace="test")

    def start(self, p: str, uid: int, *listeners: str) -> None:
        child = proc.spawn([sys.executable, SERVER, *listeners], netns=self.path(p), cgroup=self.node["cgroup"],
                           uid=uid, gid=uid, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.procs.append(child)
        assert child.stdout.readline().strip() == b"ready"

    def sidecar(self, p: str, forward: bool) -> None:
        mode = ":forward" if forward else ""
        self.start(p, PROXY_UID, f"outbound=127.0.0.1:15001{mode}", f"inbound=0.0.0.0:15006{mode}")

    def app(self, p: str) -> None:
        self.start(p, APP_UID, "app8080=0.0.0.0:8080", "app15021=0.0.0.0:15021")

    def connect(self, p: str, host: str, port: int, size: int = 0, uid: int = APP_UID, netns: bool = True) -> dict:
        done = proc.run([sys.executable, CLIENT, host, str(port), str(size)],
                        netns=self.path(p) if netns else None, cgroup=self.node["cgroup"], uid=uid, gid=uid)
        result = json.loads(done.stdout)
        assert "error" not in result, result
        return result

    def close(self) -> None:
        for child in self.procs:
            proc.stop(child, grace=1)
        for p in "ab":
            subprocess.run(["ip", "netns", "del", self.ns[p]], capture_output=True)


@pytest.fixture
def pods(node):
    dp: EbpfDatapath = node["dp"]
    before = {name: dp.map_entries(name) for name in ("mcni_pods_v1", "mcni_pod_ips_v1", "mcni_ports_v1")}
    made = Pods(node)
    try:
        yield made
    finally:
        for p in "ab":
            dp.release(made.podnet(p))
        made.close()
    after = {name: dp.map_entries(name) for name in before}
    assert after == before, "a test leaked map entries"
    assert not list(node["pin_dir"].glob("links/sk_lookup-netns-*")), "an sk_lookup link outlived its pod"


def test_outbound_connect_lands_in_the_proxy_with_the_original_destination(node, pods):
    pods.sidecar("a", forward=False)
    pods.app("b")
    pod_a = pods.podnet("a")
    node["dp"].capture(pod_a)

    got = pods.connect("a", pods.ip["b"], 8080, size=1000)

    assert got["server"]["server"] == "outbound"
    assert got["server"]["local"] == ["127.0.0.1", 15001]
    assert got["server"]["original_dst"] == {"ip": pods.ip["b"], "port": 8080}
    assert got["client_peer"] == ["127.0.0.1", 15001]
    assert got["intact"] and got["received"] == 1000
    assert node["dp"].counters(pod_a)["outbound_captured"] == 1


def test_inbound_syn_is_steered_to_the_proxy_listener_keeping_the_original_destination(node, pods):
    pods.sidecar("b", forward=False)
    pods.app("b")
    pod_b = pods.podnet("b")
    node["dp"].capture(pod_b)

    got = pods.connect("a", pods.ip["b"], 8080)
    assert got["server"]["server"] == "inbound"
    assert got["server"]["local"] == [pods.ip["b"], 8080]  # not rewritten: the local address IS the destination
    assert got["server"]["peer"][0] == pods.ip["a"]

    excluded = pods.connect("a", pods.ip["b"], 15021)  # Istio's health port is never captured
    assert excluded["server"]["server"] == "app15021"
    counters = node["dp"].counters(pod_b)
    assert counters["inbound_steered"] == 1
    assert counters["bypassed"] == 1


def test_pod_to_pod_through_both_proxies_carries_a_mebibyte_each_way_intact(node, pods):
    for p in "ab":
        pods.sidecar(p, forward=True)
        pods.app(p)
    pod_a, pod_b = pods.podnet("a"), pods.podnet("b")
    node["dp"].capture(pod_a)
    node["dp"].capture(pod_b)

    got = pods.connect("a", pods.ip["b"], 8080, size=MiB)

    assert got["server"]["server"] == "app8080"
    assert got["server"]["local"] == [pods.ip["b"], 8080]
    assert got["server"]["peer"][0] == "127.0.0.6"  # B's proxy passed it through
    assert got["client_peer"] == ["127.0.0.1", 15001]
    assert (got["intact"], got["received"]) == (True, MiB), got
    a, b = node["dp"].counters(pod_a), node["dp"].counters(pod_b)
    assert a["outbound_captured"] == 1 and b["inbound_steered"] == 1
    # proxy-to-proxy splicing is on by default: the mebibyte each way between the two proxies went
    # socket to socket (the app's own sockets never do without meshcni.io/splice-app)
    assert a["bytes_spliced"] >= MiB and b["bytes_spliced"] >= MiB
    assert a["errors"] == 0 and b["errors"] == 0


def test_the_proxy_and_excluded_destinations_bypass(node, pods):
    pods.sidecar("a", forward=False)
    pods.app("b")
    dp = node["dp"]
    pod_a = pods.podnet("a", PodConfig(exclude_outbound_ports=(15021,),
                                       exclude_outbound_cidrs=(ipaddress.ip_network(f"{pods.ip['b']}/32"),),
                                       include_outbound_ports=(8080,)))
    dp.capture(pod_a)

    as_proxy = pods.connect("a", pods.ip["b"], 8080, uid=PROXY_UID)
    assert as_proxy["server"]["server"] == "app8080"  # uid 1337 is never captured
    by_port = pods.connect("a", pods.ip["b"], 15021)
    assert by_port["server"]["server"] == "app15021"
    # 8080 is an included port: captured even though B's address is in an excluded range (Istio's order)
    included = pods.connect("a", pods.ip["b"], 8080)
    assert included["server"]["server"] == "outbound"
    counters = dp.counters(pod_a)
    assert counters["outbound_captured"] == 1
    assert counters["bypassed"] == 2

    dp.capture(pods.podnet("a", PodConfig(exclude_outbound_cidrs=(ipaddress.ip_network(f"{pods.ip['b']}/32"),))))
    by_cidr = pods.connect("a", pods.ip["b"], 8080)
    assert by_cidr["server"]["server"] == "app8080"


def test_unenrolled_namespaces_and_the_host_are_untouched(node, pods):
    pods.sidecar("a", forward=False)
    pods.app("b")
    dp = node["dp"]
    pod_a = pods.podnet("a")
    dp.capture(pod_a)
    origdst_before = dp.map_entries("mcni_pair_origdst_v1")

    # B is not enrolled: its own connect() to a non-loopback address goes straight through
    from_b = pods.connect("b", pods.ip["b"], 8080)
    assert from_b["server"]["server"] == "app8080"
    assert from_b["client_peer"] == [pods.ip["b"], 8080]

    # a host process inside the very cgroup the programs are attached to is not captured either
    host_server = proc.spawn([sys.executable, SERVER, "host=127.0.0.1:0"], stdout=subprocess.PIPE)
    try:
        assert host_server.stdout.readline().strip() == b"ready"
        port = _listening_port(host_server.pid)
        from_host = pods.connect("a", "127.0.0.1", port, netns=False)
        assert from_host["server"]["server"] == "host"
        assert from_host["client_peer"] == ["127.0.0.1", port]
    finally:
        proc.stop(host_server, grace=1)
    assert dp.counters(pod_a)["outbound_captured"] == 0
    assert dp.map_entries("mcni_pair_origdst_v1") == origdst_before


def test_release_restores_direct_behaviour(node, pods):
    pods.sidecar("a", forward=False)
    pods.sidecar("b", forward=False)
    pods.app("b")
    dp = node["dp"]
    pod_a, pod_b = pods.podnet("a"), pods.podnet("b")
    dp.capture(pod_a)
    dp.capture(pod_b)
    assert pods.connect("a", pods.ip["b"], 8080)["server"]["server"] == "outbound"

    assert dp.release(pod_a) and dp.release(pod_b)
    direct = pods.connect("a", pods.ip["b"], 8080)
    assert direct["server"]["server"] == "app8080"
    assert direct["client_peer"] == [pods.ip["b"], 8080]
    assert dp.release(pod_a) is False  # releasing twice is fine


def test_double_enrol_is_a_no_op_and_a_missing_netns_is_refused_cleanly(node, pods):
    pods.sidecar("a", forward=False)
    dp = node["dp"]
    pod_a = pods.podnet("a")
    slot = dp.capture(pod_a)
    entries = {n: dp.map_entries(n) for n in ("mcni_pods_v1", "mcni_pod_ips_v1", "mcni_ports_v1")}
    links = sorted(p.name for p in node["pin_dir"].glob("links/*"))

    assert dp.capture(pod_a) == slot
    assert {n: dp.map_entries(n) for n in entries} == entries
    assert sorted(p.name for p in node["pin_dir"].glob("links/*")) == links
    assert dp.verify(pod_a) == []

    ghost = PodNet(key="ghost", netns="/var/run/netns/mcni-does-not-exist", ips=(ipaddress.ip_address("10.9.9.9"),))
    with pytest.raises(NamespaceNotFound):
        dp.capture(ghost)
    not_a_netns = PodNet(key="file", netns=SERVER, ips=(ipaddress.ip_address("10.9.9.8"),))
    with pytest.raises(NamespaceNotFound):
        dp.capture(not_a_netns)
    assert {n: dp.map_entries(n) for n in entries} == entries


def _keys_of(dp: EbpfDatapath, slot: int) -> dict[str, set]:
    """Every key a slot owns in the maps all pods share."""
    return {
        "ports": {(k.port, k.dir, v.value) for k, v in dp.maps["mcni_ports_v1"].items() if k.slot == slot},
        "cidrs": {(k.kind, k.prefixlen, str(k.ip.address())) for k in dp.maps["mcni_cidrs_v1"].keys()
                  if k.slot == slot},
        "ips": {str(k.address()) for k, v in dp.maps["mcni_pod_ips_v1"].items() if v.value == slot},
    }


@pytest.fixture
def scans(monkeypatch) -> list[str]:
    """Names of the maps swept with delete_where (a scan of every pod's entries), in order."""
    seen: list[str] = []
    sweep = bpf.RawMap.delete_where

    def spy(self, match):
        seen.append(self.name)
        return sweep(self, match)

    monkeypatch.setattr(bpf.RawMap, "delete_where", spy)
    return seen


POLICY = PodConfig(exclude_inbound_ports=(9090,), include_inbound_ports=(8080, 9090), exclude_outbound_ports=(5432,),
                   include_outbound_ports=(80,), exclude_outbound_cidrs=(ipaddress.ip_network("10.96.0.0/12"),
                                                                         ipaddress.ip_network("fd00::/8")))


def test_a_release_deletes_exactly_the_pods_keys_without_scanning_the_shared_maps(node, pods, scans):
    dp = node["dp"]
    pods.sidecar("a", forward=False)
    pod_a = pods.podnet("a", POLICY)
    slot_b = dp.capture(pods.podnet("b", PodConfig(exclude_outbound_ports=(6379,))))
    keys_b = _keys_of(dp, slot_b)
    slot_a = dp.capture(pod_a)
    keys_a = _keys_of(dp, slot_a)
    assert (9090, L.DIR_INBOUND, L.POLICY_EXCLUDE) in keys_a["ports"]  # the exclusion of 9090 won
    assert (9090, L.DIR_INBOUND, L.POLICY_INCLUDE) not in keys_a["ports"]
    assert len(keys_a["cidrs"]) == 2 and keys_a["ips"] == {pods.ip["a"]}
    counted = dp.maps["mcni_pod_config_v1"].lookup(L.U32(slot_a))
    assert counted.flags & L.F_KEYS_COUNTED
    assert (counted.policy_keys, counted.ip_keys) == (len(keys_a["ports"]) + len(keys_a["cidrs"]), 1)
    assert dp.verify(pod_a) == []
    assert scans == []  # a fresh slot has nothing to clear

    assert dp.release(pod_a)
    assert scans == []
    assert _keys_of(dp, slot_a) == {"ports": set(), "cidrs": set(), "ips": set()}
    assert _keys_of(dp, slot_b) == keys_b  # the neighbour's policy is untouched
    assert dp.maps["mcni_pod_config_v1"].lookup(L.U32(slot_a)).outbound_port == 0  # the slot is free again


def test_a_release_that_cannot_account_for_every_key_scans_and_still_removes_them_all(node, pods, scans):
    dp = node["dp"]
    slot = dp.capture(pods.podnet("a", POLICY))
    assert dp.release(pods.podnet("a"))  # another config than the captured one: its keys do not add up
    assert set(scans) == {"mcni_ports_v1", "mcni_cidrs_v1", "mcni_pod_ips_v1"}
    assert _keys_of(dp, slot) == {"ports": set(), "cidrs": set(), "ips": set()}

    scans.clear()
    slot = dp.capture(pods.podnet("a", POLICY))
    older = dp.maps["mcni_pod_config_v1"].lookup(L.U32(slot))  # as an older meshcni wrote it: no counts
    older.flags &= ~L.F_KEYS_COUNTED
    older.policy_keys = older.ip_keys = 0
    dp.maps["mcni_pod_config_v1"].update(L.U32(slot), older)
    assert dp.release(pods.podnet("a", POLICY))
    assert set(scans) == {"mcni_ports_v1", "mcni_cidrs_v1", "mcni_pod_ips_v1"}
    assert _keys_of(dp, slot) == {"ports": set(), "cidrs": set(), "ips": set()}


def test_a_recapture_rewrites_in_place_and_clears_only_what_the_new_config_dropped(node, pods, scans):
    dp = node["dp"]
    pods.sidecar("a", forward=False)
    wide = PodConfig(exclude_outbound_ports=(5432,), exclude_outbound_cidrs=(ipaddress.ip_network("10.0.0.0/8"),))
    extra_ip = ipaddress.ip_address(pods.ip["a"].rsplit(".", 1)[0] + ".77")
    pod = pods.podnet("a", wide)
    slot = dp.capture(pod)
    before = _keys_of(dp, slot)

    assert dp.capture(pod) == slot  # the same config again: nothing stale, nothing scanned
    assert scans == [] and _keys_of(dp, slot) == before and dp.verify(pod) == []

    # a narrower CIDR that the old one covers, the ports unchanged: a trie lookup of the new key finds the
    # old /8, which must not pass for the new entry (the key count alone would not tell)
    narrow = PodConfig(exclude_outbound_ports=(5432,), exclude_outbound_cidrs=(ipaddress.ip_network("10.0.0.0/16"),))
    pod = pods.podnet("a", narrow)
    assert dp.capture(pod) == slot
    after = _keys_of(dp, slot)
    assert after["ports"] == before["ports"]
    assert after["cidrs"] == {(L.POLICY_EXCLUDE, L.CIDR_KEY_FIXED_BITS + 96 + 16, "10.0.0.0")}
    assert dp.verify(pod) == []

    narrow = PodConfig(exclude_outbound_cidrs=narrow.exclude_outbound_cidrs)  # and a port dropped
    pod = pods.podnet("a", narrow)
    assert dp.capture(pod) == slot
    assert _keys_of(dp, slot)["ports"] == before["ports"] - {(5432, L.DIR_OUTBOUND, L.POLICY_EXCLUDE)}
    assert dp.verify(pod) == []

    two_ips = PodNet(key=pod.key, netns=pod.netns, ips=(*pod.ips, extra_ip), config=narrow)
    dp.capture(two_ips)
    assert _keys_of(dp, slot)["ips"] == {pods.ip["a"], str(extra_ip)}
    scans.clear()
    dp.capture(pod)  # the pod lost an IP: that IP no longer names its slot
    assert scans == ["mcni_pod_ips_v1"]
    assert _keys_of(dp, slot)["ips"] == {pods.ip["a"]}
    assert dp.verify(pod) == []
    assert dp.release(pod)
    assert _keys_of(dp, slot) == {"ports": set(), "cidrs": set(), "ips": set()}


def test_proxies_that_listen_after_enrolment_have_their_accepted_ends_spliced(node, pods):
    """Pods enrolled before their proxies listen: sockops registers each listener and marks it, and the socket
    B's proxy accepts inherits the mark (test_pod_to_pod_through_both_proxies_… has the path where the listener
    exists first and is registered and marked from user space)."""
    dp = node["dp"]
    pod_a, pod_b = pods.podnet("a"), pods.podnet("b")
    dp.capture(pod_a)
    dp.capture(pod_b)
    for p in "ab":
        pods.sidecar(p, forward=True)
        pods.app(p)

    got = pods.connect("a", pods.ip["b"], 8080, size=MiB)

    assert (got["server"]["server"], got["intact"], got["received"]) == ("app8080", True, MiB), got
    a, b = dp.counters(pod_a), dp.counters(pod_b)
    assert a["bytes_spliced"] >= MiB and b["bytes_spliced"] >= MiB  # B's accepted end was in the SOCKHASH
    assert a["errors"] == 0 and b["errors"] == 0


def test_a_spliced_socket_whose_peer_is_not_spliced_stays_on_tcp_and_loses_no_byte(node, pods):
    """A's app socket enters the SOCKHASH (splice-app) but B's accepted socket never does: every redirect fails,
    the first message leaves the mark in the socket's own storage, and the stream stays on TCP intact."""
    dp = node["dp"]
    pods.app("b")
    dp.capture(pods.podnet("a", PodConfig(exclude_outbound_ports=(8080,), splice_app=True)))
    dp.capture(pods.podnet("b", PodConfig(exclude_inbound_ports=(8080,))))  # B's app socket: never spliced
    done = proc.run([sys.executable, str(HERE / "stay_on_tcp_probe.py"), pods.ip["b"], "8080", str(node["pin_dir"])],
                    netns=pods.path("a"), cgroup=node["cgroup"])
    assert json.loads(done.stdout) == {"marked_before": False, "marked_after": True, "intact": True}
    assert dp.counters(pods.podnet("a"))["msgs_spliced"] == 0
    assert dp.counters(pods.podnet("a"))["errors"] == 0


def test_a_load_removes_the_pins_of_retired_maps(node):
    retired = node["pin_dir"] / loader.RETIRED_MAPS[0]
    stand_in = bpf.obj_get(str(node["pin_dir"] / "mcni_pods_v1"))  # any map will do as an older load's pin
    try:
        bpf.obj_pin(stand_in, str(retired))
    finally:
        os.close(stand_in)
    again = EbpfDatapath.load(node["pin_dir"], cgroup=node["cgroup"])
    again.close()
    assert not retired.exists()
    assert (node["pin_dir"] / "mcni_pods_v1").exists()


def test_a_program_the_kernel_refuses_is_named_and_a_fresh_load_leaves_no_pin(node, monkeypatch):
    """bcc pins every map before any program is loaded; a refused program must take all of them along."""
    refused = loader.Hook("bogus", "mcni_no_such_program", bpf.PROG_SK_LOOKUP, bpf.ATTACH_SK_LOOKUP, "netns",
                          "a program this build does not have")
    monkeypatch.setattr(loader, "HOOKS", loader.HOOKS + (refused,))
    pin_dir = Path(f"/sys/fs/bpf/meshcni-test-refused-{uuid.uuid4().hex[:8]}")
    try:
        with pytest.raises(FeatureMissing, match="bogus program: it needs a program this build does not have"):
            EbpfDatapath.load(pin_dir, cgroup=node["cgroup"])
        assert not pin_dir.exists()
    finally:
        if pin_dir.exists():
            shutil.rmtree(pin_dir)


def test_the_proxys_listen_registers_its_inbound_listener_in_the_kernel(node, pods):
    """No agent runs here: an entry in the pod's SOCKMAP slot can only come from the sockops program."""
    dp = node["dp"]
    pods.app("b")
    pod_b = pods.podnet("b")
    slot = dp.capture(pod_b)  # nothing listens on 15006 yet
    registered = lambda: dp.maps["mcni_listeners_v1"].lookup(L.U32(slot * 2)) is not None  # noqa: E731
    assert not registered()

    pods.start("b", APP_UID, "squatter=0.0.0.0:15006")  # the app may not claim the pod's inbound traffic
    assert not registered()
    proc.stop(pods.procs.pop(), grace=1)

    pods.start("b", PROXY_UID, "elsewhere=0.0.0.0:15007")  # the proxy, on another port
    assert not registered()
    pods.sidecar("b", forward=False)
    assert registered()
    assert pods.connect("a", pods.ip["b"], 8080)["server"]["server"] == "inbound"

    proc.stop(pods.procs.pop(), grace=1)  # the proxy goes: the kernel drops its socket from the map
    assert not registered()
    assert pods.connect("a", pods.ip["b"], 8080)["server"]["server"] == "app8080"
    pods.sidecar("b", forward=False)  # its successor is registered by its own listen()
    assert registered()
    assert pods.connect("a", pods.ip["b"], 8080)["server"]["server"] == "inbound"
    assert dp.counters(pod_b)["errors"] == 0


def test_a_load_that_fails_to_compile_leaves_nothing_behind(tmp_path, monkeypatch):
    broken = tmp_path / "bpf"
    shutil.copytree(loader.BPF_DIR, broken)
    (broken / "sockops.c").write_text((broken / "sockops.c").read_text() + "\nthis is not C;\n")
    monkeypatch.setattr(loader, "BPF_DIR", broken)
    tag = uuid.uuid4().hex[:8]
    cg = cgroup.ensure(cgroup.unified_root() / f"meshcni-test-{tag}")
    pin_dir = Path(f"/sys/fs/bpf/meshcni-test-{tag}")
    fds_before = len(os.listdir("/proc/self/fd"))
    try:
        with pytest.raises(BpfError, match="compiling"):
            EbpfDatapath.load(pin_dir, cgroup=cg)
        assert not pin_dir.exists()
        assert len(os.listdir("/proc/self/fd")) == fds_before  # the cgroup's fd is closed too
    finally:
        cgroup.remove(cg)
        shutil.rmtree(pin_dir, ignore_errors=True)  # only if the load under test left it


def test_loading_twice_never_duplicates_an_attachment(node):
    def attached() -> list[str]:
        out = subprocess.run(["bpftool", "-j", "cgroup", "show", str(node["cgroup"])], check=True,
                             capture_output=True, text=True).stdout
        return sorted(f"{p['attach_type']}:{p['name']}" for p in json.loads(out or "[]"))

    first = attached()
    assert len(first) == 4  # connect4, connect6, sockops, getsockopt
    again = EbpfDatapath.load(node["pin_dir"], cgroup=node["cgroup"])
    try:
        assert attached() == first
        assert again.enrolled() == node["dp"].enrolled()
    finally:
        again.close()


def _listening_port(pid: int) -> int:
    """The port a probe server bound to port 0 listens on (it prints "ready" only after listen())."""
    import psutil

    (conn,) = [c for c in psutil.Process(pid).net_connections("tcp") if c.status == psutil.CONN_LISTEN]
    return conn.laddr.port


def test_original_destination_survives_an_app_that_closed_before_the_proxy_accepted(node, pods):
    """A busy proxy accepts a connection after its app already sent and closed (a client that gave up, or
    wrk exiting): the proxy must still learn where the connection was going, or it forwards it to itself.
    The app's socket is gone entirely by then (FIN_WAIT2 orphans become timewait socks at once)."""
    acceptor = proc.spawn([sys.executable, str(HERE / "late_acceptor.py"), "127.0.0.1", "15001"],
                          netns=pods.path("a"), cgroup=node["cgroup"], uid=PROXY_UID, gid=PROXY_UID,
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    pods.procs.append(acceptor)
    assert acceptor.stdout.readline().strip() == b"ready"
    node["dp"].capture(pods.podnet("a"))
    records_before = node["dp"].map_entries("mcni_pair_origdst_v1")
    count = 20
    script = ("import socket,sys\n"
              "for i in range(int(sys.argv[2])):\n"
              "    s = socket.create_connection((sys.argv[1], 8080 + i), timeout=10)\n"
              "    s.sendall(b'hello'); s.close()\n")
    done = proc.run([sys.executable, "-c", script, pods.ip["b"], str(count)], netns=pods.path("a"),
                    cgroup=node["cgroup"], uid=APP_UID, gid=APP_UID)
    assert done.returncode == 0, done.stderr
    # The proxy's kernel side ACKs the app's FIN late (delayed ACK in CLOSE_WAIT); wait until every app socket
    # has left FIN_WAIT1, i.e. is a timewait sock and the app's full socket is closed.
    _wait_until(lambda: not _app_sockets_in(pods.ns["a"], "fin-wait-1"), "the app's FINs were never acknowledged")

    acceptor.stdin.write(f"accept {count}\n".encode())
    acceptor.stdin.flush()
    got = json.loads(acceptor.stdout.readline())
    assert [c["original_dst"] for c in got] == [{"ip": pods.ip["b"], "port": 8080 + i} for i in range(count)]
    assert node["dp"].counters(pods.podnet("a"))["outbound_captured"] == count
    # every record moved on into its accepted socket's storage: none is left under a tuple
    assert node["dp"].map_entries("mcni_pair_origdst_v1") == records_before


def _app_sockets_in(netns_name: str, state: str) -> list[str]:
    out = subprocess.run(["ip", "netns", "exec", netns_name, "ss", "-Htn", "state", state],
                         capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if line.strip()]


def _wait_until(ready, what: str, timeout: float = 10.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise AssertionError(what)
        time.sleep(0.05)


# --- neighbours: other BPF users on the same cgroup hooks ---------------------------------------------------


def _socket_lb(service: str, backend: str) -> int:
    """A stand-in for another CNI's socket load balancer (Cilium's socket LB does this at connect()): a
    cgroup/connect4 program, not meshcni's, that turns `service` into `backend` and allows every connect."""
    from meshcni.preflight import rawbpf

    def u32(ip: str) -> int:  # user_ip4 as a little-endian load sees it, as the s32 an instruction carries
        v = int.from_bytes(ipaddress.ip_address(ip).packed, "little")
        return v - (1 << 32) if v >= 1 << 31 else v

    user_ip4 = 4  # offsetof(struct bpf_sock_addr, user_ip4)
    insns = (rawbpf.insn(0x61, dst=2, src=1, off=user_ip4)            # w2 = ctx->user_ip4
             + rawbpf.insn(0x56, dst=2, off=2, imm=u32(service))     # if w2 != service: skip the rewrite
             + rawbpf.insn(0xB4, dst=3, imm=u32(backend))            # w3 = backend
             + rawbpf.insn(0x63, dst=1, src=3, off=user_ip4)         # ctx->user_ip4 = w3
             + rawbpf.mov_r0(1) + rawbpf.exit_())
    return rawbpf.prog_load(bpf.PROG_CGROUP_SOCK_ADDR, insns, bpf.ATTACH_CGROUP_INET4_CONNECT, name="other_sock_lb")


def _bpftool_effective(cg: Path) -> list[tuple[str, int]]:
    out = subprocess.run(["bpftool", "-j", "cgroup", "show", str(cg), "effective"], check=True,
                         capture_output=True, text=True).stdout
    return [(p["attach_type"], p["id"]) for p in json.loads(out or "[]")]


def test_another_programs_connect_rewrite_ahead_of_meshcni_is_what_gets_captured_and_listed(node, pods):
    from meshcni.cli import doctor
    from meshcni.datapath import hooks

    service = "10.96.0.10"  # a cluster service address, unroutable in the pods
    lb_cgroup = cgroup.ensure(node["cgroup"] / "socket-lb")  # its own programs run before its parent's
    prog = link = cg_fd = None
    try:
        prog = _socket_lb(service, pods.ip["b"])
        cg_fd = cgroup.open_dir(lb_cgroup)
        link = bpf.link_create(prog, cg_fd, bpf.ATTACH_CGROUP_INET4_CONNECT, "the stand-in socket LB")
        lb_id = bpf.prog_info(prog).id
        pods.sidecar("a", forward=False)
        pods.app("b")
        node["dp"].capture(pods.podnet("a"))

        listed = hooks.on_cgroup(lb_cgroup, node["pin_dir"])
        connect4 = [(p.position, p.prog_id, p.ours) for p in listed if p.hook == "connect4"]
        assert connect4[0] == (1, lb_id, False) and [ours for _, _, ours in connect4[1:]] == [True]
        assert all(p.ours for p in listed if p.hook != "connect4") and len(listed) == 5
        assert hooks.ahead_of_meshcni(listed) == {"connect4": [listed[0]]}
        # the kernel's own account (bpftool) of what runs, in the same order
        assert [(h, i) for h, i in _bpftool_effective(lb_cgroup) if h == "cgroup_inet4_connect"] == \
            [("cgroup_inet4_connect", pid) for _, pid, _ in connect4]
        seen = doctor.hook_programs(str(lb_cgroup), str(node["pin_dir"]))
        assert seen["ahead_of_meshcni"] == {"connect4": [lb_id]} and "error" not in seen
        assert "run before meshcni's connect4" in "\n".join(doctor.render_hooks(seen))

        # a process of the LB's cgroup: the LB rewrites first, meshcni captures the backend
        done = proc.run([sys.executable, CLIENT, service, "8080", "100"], netns=pods.path("a"), cgroup=lb_cgroup,
                        uid=APP_UID, gid=APP_UID)
        got = json.loads(done.stdout)
        assert got["server"]["server"] == "outbound" and got["intact"], got
        assert got["server"]["original_dst"] == {"ip": pods.ip["b"], "port": 8080}
        # a process outside it: nothing rewrites the service address, meshcni captures it as dialled
        got = pods.connect("a", service, 8080, size=100)
        assert got["server"]["server"] == "outbound"
        assert got["server"]["original_dst"] == {"ip": service, "port": 8080}
        assert node["dp"].counters(pods.podnet("a"))["outbound_captured"] == 2
    finally:
        if link is not None:
            os.close(link)  # an unpinned link detaches with its last fd
        for fd in (prog, cg_fd):
            if fd is not None:
                os.close(fd)
        cgroup.remove(lb_cgroup)
    assert not lb_cgroup.exists()


def test_an_unload_detaches_only_meshcnis_programs(tmp_path):
    from meshcni.datapath import hooks
    from meshcni.preflight import rawbpf

    tag = uuid.uuid4().hex[:8]
    cg = cgroup.ensure(cgroup.unified_root() / f"meshcni-test-{tag}")
    pin_dir = Path(f"/sys/fs/bpf/meshcni-test-{tag}")
    other = link = cg_fd = dp = None
    try:
        cg_fd = cgroup.open_dir(cg)
        other = rawbpf.prog_load(bpf.PROG_CGROUP_SOCK_ADDR, rawbpf.returning(1), bpf.ATTACH_CGROUP_INET4_CONNECT,
                                 name="other_first")
        link = bpf.link_create(other, cg_fd, bpf.ATTACH_CGROUP_INET4_CONNECT, "another user's program")
        other_id = bpf.prog_info(other).id
        dp = EbpfDatapath.load(pin_dir, cgroup=cg)
        listed = [(p.hook, p.prog_id, p.ours) for p in hooks.on_cgroup(cg, pin_dir)]
        # one cgroup's programs run in attach order: the other user's first, as on a node where it came first
        assert listed[0] == ("connect4", other_id, False)
        assert sum(1 for _, _, ours in listed if ours) == 4
        dp.unload()
        dp = None
        assert [(p.hook, p.prog_id, p.ours) for p in hooks.on_cgroup(cg, pin_dir)] == [("connect4", other_id, False)]
    finally:
        if dp is not None:
            dp.unload()
        for fd in (link, other, cg_fd):
            if fd is not None:
                os.close(fd)
        cgroup.remove(cg)
    assert not pin_dir.exists() and not cg.exists()


def test_another_sk_lookup_program_ahead_of_meshcnis_in_a_pod_netns_is_listed_and_left_alone(node, pods):
    """Another user's sk_lookup program attached to pod B's netns before B is enrolled runs first. One that
    assigns nothing leaves the SYN to meshcni; the listing (and doctor) name it as running ahead, and B's release
    detaches only meshcni's program."""
    from meshcni.cli import doctor
    from meshcni.datapath import hooks
    from meshcni.preflight import rawbpf

    prog = link = ns_fd = None
    try:
        prog = rawbpf.prog_load(bpf.PROG_SK_LOOKUP, rawbpf.returning(1), bpf.ATTACH_SK_LOOKUP, name="other_lookup")
        ns_fd = os.open(pods.path("b"), os.O_RDONLY)
        link = bpf.link_create(prog, ns_fd, bpf.ATTACH_SK_LOOKUP, "another user's sk_lookup program")
        other_id = bpf.prog_info(prog).id
        pods.sidecar("b", forward=False)
        pods.app("b")
        pod_b = pods.podnet("b")
        node["dp"].capture(pod_b)

        listed = hooks.on_netns(pods.path("b"), node["pin_dir"])
        assert [(p.position, p.prog_id, p.ours) for p in listed][0] == (1, other_id, False)
        assert [p.ours for p in listed[1:]] == [True]
        assert hooks.ahead_of_meshcni(listed) == {"sk_lookup": [listed[0]]}
        seen = doctor.netns_programs(pods.path("b"), str(node["pin_dir"]))
        assert seen["ahead_of_meshcni"] == {"sk_lookup": [other_id]} and "error" not in seen
        assert "run before meshcni's sk_lookup" in "\n".join(doctor.render_netns_hooks(seen))

        got = pods.connect("a", pods.ip["b"], 8080)  # the other program assigned nothing: meshcni steers
        assert got["server"]["server"] == "inbound"
        assert node["dp"].counters(pod_b)["inbound_steered"] == 1

        node["dp"].release(pod_b)
        assert [(p.prog_id, p.ours) for p in hooks.on_netns(pods.path("b"), node["pin_dir"])] == [(other_id, False)]
    finally:
        for fd in (link, prog, ns_fd):
            if fd is not None:
                os.close(fd)
