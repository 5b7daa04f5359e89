"""The agent's gRPC API against a real agent on the real kernel: every RPC, bad requests, concurrency,
restart re-adoption, metrics and the CLI — asserting on the pinned BPF maps, not only on replies."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import grpc
import pytest

pytestmark = pytest.mark.root

bcc = pytest.importorskip("bcc")

from meshcni.agent.client import AgentCallError  # noqa: E402
from meshcni.agent.registry import JOURNAL, read_journal  # noqa: E402
from meshcni.datapath.ebpf import EbpfDatapath  # noqa: E402
from tests.root.agent_env import AgentEnv  # noqa: E402

MAP_NAMES = ("mcni_pods_v1", "mcni_pod_ips_v1", "mcni_ports_v1", "mcni_cidrs_v1")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    import uuid

    e = AgentEnv(tmp_path_factory.mktemp("agent"), uuid.uuid4().hex[:6])
    try:
        e.policy.write_text(json.dumps({"pods": {"ns/excl": {
            "traffic.sidecar.istio.io/excludeOutboundPorts": "5432,6379",
            "traffic.sidecar.istio.io/excludeOutboundIPRanges": "10.96.0.0/12"}}}))
        e.start()
        yield e
    finally:
        e.close()


def maps_snapshot(env: AgentEnv) -> dict[str, int]:
    dp = EbpfDatapath.open(env.pin_dir)
    try:
        return {name: dp.map_entries(name) for name in MAP_NAMES}
    finally:
        dp.close()


def registry_on_disk(env: AgentEnv) -> dict:
    """The pods a restarted agent would re-adopt: the registry journal as the agent left it on disk."""
    records, _, problems = read_journal(env.state_dir / JOURNAL)
    assert problems == []
    return records


def test_status_reports_a_loaded_datapath(env):
    with env.client() as c:
        s = c.status()
    assert s["datapath_loaded"] is True
    assert s["node_mode"] == "ebpf"
    assert s["features"]["sk_lookup"] is True and s["features"]["cgroup_sock_addr"] is True
    assert s["degraded"] == []
    assert s["attached_programs"] >= 5  # connect4/6, sockops, sk_msg, getsockopt (plus sk_lookup per pod)


def test_add_get_check_counters_del(env):
    ns = env.make_netns(1)
    try:
        with env.client() as c:
            pod = c.add_pod(container_id="c-one", netns=ns, ifname="eth0", ips=["10.250.0.2/24", "fd00::2/64"],
                            pod_name="excl", pod_namespace="ns", pod_uid="u-1")
            assert pod["mode"] == "ebpf" and pod["captured"] and pod["slot"] >= 0
            assert pod["ips"] == ["10.250.0.2", "fd00::2"]
            assert pod["config"]["exclude_outbound_ports"] == [5432, 6379]  # from the policy file
            assert pod["config"]["exclude_outbound_cidrs"] == ["10.96.0.0/12"]
            # the same ADD again (a runtime retry) changes nothing
            again = c.add_pod(container_id="c-one", netns=ns, ifname="eth0", ips=["10.250.0.2/24", "fd00::2/64"],
                              pod_name="excl", pod_namespace="ns")
            assert again["slot"] == pod["slot"]
            assert c.get_pod("ns/excl")["container_id"] == "c-one"
            assert c.get_pod("excl")["container_id"] == "c-one"
            check = c.check_pod(container_id="c-one", netns=ns)
            # no proxy runs in a bare netns, so the only thing missing is its inbound listener
            assert check["problems"] == ["no inbound proxy listener is registered"]
            counters = c.counters("c-one")[0]["counters"]
            assert set(counters) >= {"outbound_captured", "inbound_steered", "bypassed", "errors"}
            dp = EbpfDatapath.open(env.pin_dir)
            try:
                slot = dp.enrolled()
                assert pod["slot"] in slot.values()
                ports = [k for k in dp.maps["mcni_ports_v1"].keys() if k.slot == pod["slot"]]
                assert {k.port for k in ports} >= {5432, 6379}
            finally:
                dp.close()
            c.del_pod(container_id="c-one", netns=ns, ifname="eth0")
            assert c.list_pods() == []
            c.del_pod(container_id="c-one", netns=ns, ifname="eth0")  # DEL twice is fine
            with pytest.raises(AgentCallError) as info:
                c.get_pod("c-one")
            assert info.value.code == grpc.StatusCode.NOT_FOUND
    finally:
        env.delete_netns(ns)
    assert maps_snapshot(env) == {name: 0 for name in MAP_NAMES}


@pytest.mark.parametrize("fields,code", [
    (dict(container_id="", netns="NS"), grpc.StatusCode.INVALID_ARGUMENT),
    (dict(container_id="../etc", netns="NS"), grpc.StatusCode.INVALID_ARGUMENT),
    (dict(container_id="x y", netns="NS"), grpc.StatusCode.INVALID_ARGUMENT),
    (dict(container_id="c-bad"), grpc.StatusCode.INVALID_ARGUMENT),
    (dict(container_id="c-bad", netns="relative/path"), grpc.StatusCode.INVALID_ARGUMENT),
    (dict(container_id="c-bad", netns="/var/run/netns/../netns/x"), grpc.StatusCode.INVALID_ARGUMENT),
    (dict(container_id="c-bad", netns="/var/run/netns/mcni-does-not-exist"), grpc.StatusCode.NOT_FOUND),
    (dict(container_id="c-bad", netns="/etc/hostname"), grpc.StatusCode.NOT_FOUND),
    (dict(container_id="c-bad", netns="NS", ips=["10.0.0.300"]), grpc.StatusCode.INVALID_ARGUMENT),
    (dict(container_id="c-bad", netns="NS", ips=["not-an-ip"]), grpc.StatusCode.INVALID_ARGUMENT),
    (dict(container_id="c-bad", netns="NS", ifname="an-interface-name-too-long"), grpc.StatusCode.INVALID_ARGUMENT),
])
def test_bad_requests_change_nothing(env, fields, code):
    ns = env.make_netns(2)
    try:
        before = maps_snapshot(env)
        fields = {k: (ns if v == "NS" else v) for k, v in fields.items()}
        with env.client() as c:
            with pytest.raises(AgentCallError) as info:
                c.add_pod(**fields)
            assert info.value.code == code, info.value.message
            assert c.list_pods() == []
        assert maps_snapshot(env) == before
        assert registry_on_disk(env) == {}
    finally:
        env.delete_netns(ns)


def test_malformed_annotation_is_refused_with_its_name(env):
    ns = env.make_netns(3)
    env.policy.write_text(json.dumps({"pods": {"ns/broken": {"traffic.sidecar.istio.io/excludeOutboundPorts": "80,x"}}}))
    try:
        with env.client() as c:
            with pytest.raises(AgentCallError) as info:
                c.add_pod(container_id="c-broken", netns=ns, pod_name="broken", pod_namespace="ns")
            assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
            assert "excludeOutboundPorts" in info.value.message
            assert c.list_pods() == []
    finally:
        env.policy.write_text("{}")
        env.delete_netns(ns)


def test_100_concurrent_adds_and_dels_leave_registry_and_maps_consistent(env):
    namespaces = [env.make_netns(100 + i) for i in range(20)]
    errors: list[str] = []

    def worker(i: int) -> None:
        # 5 rounds per pod, interleaved with the other threads: add, add again, del, add (kept when i is even)
        with env.client() as c:
            try:
                for _ in range(2):
                    c.add_pod(container_id=f"cc-{i}", netns=namespaces[i], ips=[f"10.251.0.{i + 2}"])
                    c.del_pod(container_id=f"cc-{i}", netns=namespaces[i])
                if i % 2 == 0:
                    c.add_pod(container_id=f"cc-{i}", netns=namespaces[i], ips=[f"10.251.0.{i + 2}"])
            except AgentCallError as exc:
                errors.append(f"{i}: {exc.message}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(20)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert errors == []
        with env.client() as c:
            listed = {p["container_id"]: p for p in c.list_pods()}
        assert set(listed) == {f"cc-{i}" for i in range(0, 20, 2)}
        dp = EbpfDatapath.open(env.pin_dir)
        try:
            enrolled = dp.enrolled()
            assert sorted(enrolled.values()) == sorted(p["slot"] for p in listed.values())  # no leaked slot
            assert dp.map_entries("mcni_pod_ips_v1") == 10
            assert set(registry_on_disk(env)) == set(listed)
            links = [p.name for p in dp.pins.links.iterdir() if p.name.startswith("sk_lookup-netns-")]
            assert len(links) == 10
        finally:
            dp.close()
    finally:
        with env.client() as c:
            for i in range(20):
                c.del_pod(container_id=f"cc-{i}", netns=namespaces[i])
        for ns in namespaces:
            env.delete_netns(ns)
    assert maps_snapshot(env) == {name: 0 for name in MAP_NAMES}


def test_gc_keeps_only_valid_attachments(env):
    namespaces = [env.make_netns(200 + i) for i in range(3)]
    try:
        with env.client() as c:
            for i, ns in enumerate(namespaces):
                c.add_pod(container_id=f"gc-{i}", netns=ns, ips=[f"10.252.0.{i + 2}"])
            removed = c.gc([("gc-1", "eth0")])
            assert sorted(r["container_id"] for r in removed) == ["gc-0", "gc-2"]
            assert [p["container_id"] for p in c.list_pods()] == ["gc-1"]
            c.del_pod(container_id="gc-1")
    finally:
        for ns in namespaces:
            env.delete_netns(ns)


def test_a_proxy_that_starts_late_is_registered_while_other_pods_wait(env):
    """A pod enrolled before its proxy listens is registered once the proxy binds 15006, even while more pods
    than one tick searches (SEARCH_PER_TICK) wait for a proxy that never comes."""
    from meshcni.agent.core import SEARCH_PER_TICK
    from meshcni.datapath import layout as L

    waiting = [env.make_netns(300 + i) for i in range(SEARCH_PER_TICK + 4)]
    late = env.make_netns(399)
    proxy = None
    try:
        with env.client() as c:
            for i, ns in enumerate(waiting):
                c.add_pod(container_id=f"wait-{i}", netns=ns, ips=[f"10.253.0.{i + 2}"])
            pod = c.add_pod(container_id="late", netns=late, ips=["10.253.1.2"])
            assert c.check_pod(container_id="late", netns=late)["problems"] == [
                "no inbound proxy listener is registered"]
            proxy = subprocess.Popen(["nsenter", f"--net={late}", sys.executable, "-c",
                                      "import socket, time\n"
                                      "s = socket.socket(); s.bind(('0.0.0.0', 15006)); s.listen(8)\n"
                                      "time.sleep(600)"])
            deadline = 600  # polls of 0.1 s: a bound for a broken agent, not a latency figure
            while c.get_pod("late")["listener"] != "registered" and deadline:
                threading.Event().wait(0.1)
                deadline -= 1
            assert c.get_pod("late")["listener"] == "registered"
            assert c.check_pod(container_id="late", netns=late)["problems"] == []
            dp = EbpfDatapath.open(env.pin_dir)
            try:
                assert dp.maps["mcni_listeners_v1"].lookup(L.U32(pod["slot"] * 2)) is not None
            finally:
                dp.close()
            assert all(p["listener"] != "registered" for p in c.list_pods() if p["container_id"] != "late")
            for i in range(len(waiting)):
                c.del_pod(container_id=f"wait-{i}")
            c.del_pod(container_id="late")
    finally:
        if proxy is not None:
            proxy.kill()
            proxy.wait()
        for ns in waiting + [late]:
            env.delete_netns(ns)


def test_restart_readopts_pods_and_drops_those_whose_netns_is_gone(env):
    keep, gone = env.make_netns(300), env.make_netns(301)
    try:
        with env.client() as c:
            kept = c.add_pod(container_id="r-keep", netns=keep, ips=["10.253.0.2"])
            c.add_pod(container_id="r-gone", netns=gone, ips=["10.253.0.3"])
        before_links = sorted(p.name for p in (env.pin_dir / "links").iterdir())
        env.stop(9)  # kill -9: no chance to clean up anything
        env.delete_netns(gone)
        env.start()
        with env.client() as c:
            pods = c.list_pods()
            assert [p["container_id"] for p in pods] == ["r-keep"]
            assert pods[0]["slot"] == kept["slot"]
            status = c.status()
        after_links = sorted(p.name for p in (env.pin_dir / "links").iterdir())
        # the released pod's sk_lookup link is gone, nothing was duplicated
        assert after_links == [n for n in before_links if n in after_links] and len(after_links) == len(before_links) - 1
        assert status["attached_programs"] == len(after_links)
        out = subprocess.run(["bpftool", "cgroup", "show", str(env.cgroup), "-j"], capture_output=True, text=True)
        attached = json.loads(out.stdout)
        # each cgroup hook exactly once after two loads (sk_msg is attached to the SOCKHASH, not the cgroup)
        assert sorted(a["name"] for a in attached) == ["mcni_connect4", "mcni_connect6", "mcni_getsockopt",
                                                       "mcni_sockops"]
    finally:
        with env.client() as c:
            c.del_pod(container_id="r-keep")
        env.delete_netns(keep)


def test_metrics_are_prometheus_text_with_per_pod_counters(env):
    from prometheus_client.parser import text_string_to_metric_families

    ns = env.make_netns(400)
    try:
        with env.client() as c:
            c.add_pod(container_id="m-1", netns=ns, ips=["10.254.0.2"], pod_name="web", pod_namespace="shop")
        text = urllib.request.urlopen(f"http://127.0.0.1:{env.metrics_port}/metrics", timeout=10).read().decode()
        families = {f.name: f for f in text_string_to_metric_families(text)}
        captured = families["meshcni_connections_captured"]
        labels = {(s.labels["pod"], s.labels["namespace"], s.labels["direction"], s.labels["mode"])
                  for s in captured.samples if s.name.endswith("_total")}
        assert ("web", "shop", "outbound", "ebpf") in labels and ("web", "shop", "inbound", "ebpf") in labels
        assert families["meshcni_datapath_loaded"].samples[0].value == 1
        pods = {s.labels["mode"]: s.value for s in families["meshcni_pods"].samples}
        assert pods == {"ebpf": 1}
        assert families["meshcni_agent_build_info"].samples[0].labels["version"]
        health = urllib.request.urlopen(f"http://127.0.0.1:{env.metrics_port}/healthz", timeout=10)
        assert health.status == 200
    finally:
        with env.client() as c:
            c.del_pod(container_id="m-1")
        env.delete_netns(ns)


def test_cli_json_output_parses_back(env):
    ns = env.make_netns(500)
    cli = [sys.executable, "-m", "meshcni"]
    sock = ["--socket", str(env.socket)]
    try:
        with env.client() as c:
            c.add_pod(container_id="cli-1", netns=ns, ips=["10.254.1.2"], pod_name="api", pod_namespace="prod")

        def run(*args: str) -> tuple[int, object]:
            cp = subprocess.run([*cli, *args, "-o", "json", *sock], capture_output=True, text=True, timeout=60)
            return cp.returncode, json.loads(cp.stdout)

        rc, status = run("status")
        assert rc == 0 and status["enrolled"] == 1
        rc, pods = run("pods", "list")
        assert rc == 0 and [p["pod_name"] for p in pods] == ["api"]
        rc, pod = run("pods", "show", "prod/api")
        assert rc == 0 and pod["container_id"] == "cli-1" and "outbound_captured" in pod["counters"]
        rc, counters = run("counters", "api")
        assert rc == 0 and counters[0]["mode"] == "ebpf"
        rc, err = run("pods", "show", "nope")
        assert rc == 1 and err["error"]["kind"] == "not_found"
        rc, changed = run("mode", "set", "api", "iptables")
        assert rc == 0 and changed["changed"][0]["mode"] == "iptables"
        rc, changed = run("mode", "set", "api", "default")
        assert rc == 0 and changed["changed"][0]["mode"] == "ebpf"
        cp = subprocess.run([*cli, "status", "-o", "json", "--socket", str(env.tmp / "absent.sock")],
                            capture_output=True, text=True, timeout=60)
        assert cp.returncode == 3 and json.loads(cp.stdout)["error"]["kind"] == "agent_not_running"
        table = subprocess.run([*cli, "pods", "list", *sock], capture_output=True, text=True, timeout=60).stdout
        assert table.splitlines()[0].split()[:3] == ["POD", "CONTAINER", "MODE"] and "prod/api" in table
    finally:
        with env.client() as c:
            c.del_pod(container_id="cli-1")
        env.delete_netns(ns)


def test_a_masked_kernel_feature_degrades_to_a_hybrid_capture(tmp_path):
    """sk_lookup "missing": the agent says so, and captures inbound with Istio's rules, outbound with eBPF."""
    import uuid


    e = AgentEnv(tmp_path, uuid.uuid4().hex[:6])
    try:
        e.start("--mask-feature", "sk_lookup")
        ns = e.make_netns(1)
        with e.client() as c:
            status = c.status()
            assert status["features"]["sk_lookup"] is False
            assert any("sk_lookup" in d for d in status["degraded"])
            pod = c.add_pod(container_id="h-1", netns=ns, ips=["10.249.0.2"])
            assert pod["mode"] == "ebpf" and pod["slot"] >= 0
        rules = subprocess.run(["ip", "netns", "exec", Path(ns).name, "iptables-save", "-t", "nat"],
                               capture_output=True, text=True, check=True).stdout
        assert ":ISTIO_INBOUND" in rules and ":ISTIO_OUTPUT" not in rules  # inbound only, by iptables
        dp = EbpfDatapath.open(e.pin_dir)
        try:
            assert pod["slot"] in dp.enrolled().values()  # outbound by eBPF
            assert not any(p.name.startswith("sk_lookup-netns-") for p in dp.pins.links.iterdir())
        finally:
            dp.close()
        with e.client() as c:
            c.del_pod(container_id="h-1")
        rules = subprocess.run(["ip", "netns", "exec", Path(ns).name, "iptables-save", "-t", "nat"],
                               capture_output=True, text=True, check=True).stdout
        assert "ISTIO" not in rules
    finally:
        e.close()


def test_the_agent_warns_of_another_connect_program_that_runs_before_its_own(tmp_path):
    """Another BPF user attached to the agent's cgroup first: the agent still loads and serves, and its log names
    the program that decides what meshcni captures (the order `meshcni doctor` lists)."""
    import os
    import uuid

    from meshcni.preflight import rawbpf
    from meshcni.sys import bpf
    from meshcni.sys import cgroup as cgroups

    e = AgentEnv(tmp_path, uuid.uuid4().hex[:6])
    prog = link = cg_fd = None
    try:
        cg_fd = cgroups.open_dir(e.cgroup)
        prog = rawbpf.prog_load(bpf.PROG_CGROUP_SOCK_ADDR, rawbpf.returning(1), bpf.ATTACH_CGROUP_INET4_CONNECT,
                                name="other_sock_lb")
        link = bpf.link_create(prog, cg_fd, bpf.ATTACH_CGROUP_INET4_CONNECT, "another user's connect4 program")
        e.start()
        with e.client() as c:
            assert c.status()["datapath_loaded"] is True
        log = e.log.read_text()
        assert f"connect4: other_sock_lb (id {bpf.prog_info(prog).id}) run(s) before meshcni's program" in log
        assert "connect6:" not in log and "sockops:" not in log
    finally:
        e.stop()
        for fd in (link, prog, cg_fd):
            if fd is not None:
                os.close(fd)
        e.close()
