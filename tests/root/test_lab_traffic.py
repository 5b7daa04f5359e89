"""Root tests: a 2-pod lab without capture carries real HTTP and TCP between pods, directly and via the
explicit proxy path, and its processes run where and as whom they must (netns, lab cgroup, uid 1337).

One lab serves the whole module (bringing it up takes a few seconds); every test reads stats as deltas so
the order of tests does not matter. The fixture tears the lab down even when a test fails.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from meshcni.cli.main import main as cli
from meshcni.lab import haproxy, traffic
from meshcni.lab import lab as lab_core
from meshcni.lab import pod as podproc
from meshcni.lab.payload import digest, payload
from meshcni.sys import proc

pytestmark = pytest.mark.root
MIB = 1 << 20


@pytest.fixture(scope="module")
def lab():
    name = f"t-traffic-{os.getpid() % 100000}"
    state = lab_core.up(lab_core.LabOptions(name=name, capture=False))
    try:
        yield state
    finally:
        lab_core.down(name)


def _stats(state, pod):
    return haproxy.stats(podproc.proxy_socket(state, pod))


def test_direct_http_both_directions_reaches_the_other_pods_nginx(lab):
    a, b = lab.pods
    for src, dst in ((a, b), (b, a)):
        rep = traffic.request(lab, src, dst.ip, 80, "/")
        assert rep["status"] == 200
        assert rep["body"] == f"pod={dst.name} ip={dst.ip} peer={src.ip}\n"
        # No capture: nothing but nginx touched the request.
        assert traffic.proxy_headers(rep) == []
        assert rep["local"][0] == src.ip


def test_second_app_port_and_own_ip_via_hairpin(lab):
    a, _ = lab.pods
    rep = traffic.request(lab, a, a.ip, 8080, "/")
    assert rep["status"] == 200
    assert rep["body"].startswith(f"pod={a.name} ")


def test_one_mib_get_post_and_tcp_echo_are_byte_exact(lab):
    a, b = lab.pods
    got = traffic.request(lab, a, b.ip, 80, f"/bytes/{MIB}")
    assert (got["status"], got["body_bytes"], got["body_sha256"]) == (200, MIB, digest(payload(MIB)))
    posted = traffic.request(lab, a, b.ip, 80, "/upload", method="POST", body_bytes=MIB)
    assert (posted["status"], posted["body"]) == (200, f"pod={b.name} received={MIB}\n")
    echoed = traffic.echo(lab, a, b.ip, haproxy.ECHO_PORT, MIB)
    assert echoed["received_bytes"] == MIB
    assert echoed["received_sha256"] == echoed["sent_sha256"] == digest(payload(MIB))


def test_explicit_http_path_goes_through_both_sidecars_and_shows_in_stats(lab):
    a, b = lab.pods
    before_a, before_b = _stats(lab, a), _stats(lab, b)
    n = 3
    for _ in range(n):
        rep = traffic.request(lab, a, "127.0.0.1", haproxy.EXPLICIT_HTTP_OUT, "/")
        assert rep["status"] == 200
        # B's inbound-explicit proxy delivered it from loopback, and both proxies added their header.
        assert rep["body"] == f"pod={b.name} ip={b.ip} peer=127.0.0.1\n"
        assert traffic.proxy_headers(rep) == [f"{b.name}-explicit-in", f"{a.name}-explicit-out"]
    after_a, after_b = _stats(lab, a), _stats(lab, b)
    assert after_a["frontends"]["explicit_http_out"] - before_a["frontends"]["explicit_http_out"] == n
    assert after_b["frontends"]["explicit_http_in"] - before_b["frontends"]["explicit_http_in"] == n
    # Nothing was captured, so the captured listeners saw nothing.
    assert after_a["frontends"]["outbound"] == after_b["frontends"]["inbound"] == 0


def test_explicit_tcp_path_is_byte_exact(lab):
    a, b = lab.pods
    before = _stats(lab, b)["frontends"]["explicit_tcp_in"]
    rep = traffic.echo(lab, a, "127.0.0.1", haproxy.EXPLICIT_TCP_OUT, MIB)
    assert rep["received_bytes"] == MIB and rep["received_sha256"] == rep["sent_sha256"]
    assert _stats(lab, b)["frontends"]["explicit_tcp_in"] - before == 1


def test_processes_run_in_their_pod_netns_in_the_lab_cgroup_as_the_right_uid(lab):
    in_cgroup = set(int(x) for x in (Path(lab.cgroup) / "cgroup.procs").read_text().split())
    for pod in lab.pods:
        netns_ino = os.stat(pod.netns).st_ino
        assert set(pod.processes) == {"nginx", "echo", "haproxy"}
        for name, ref in pod.processes.items():
            assert proc.is_alive(ref), f"{name} of pod {pod.name} died"
            assert ref.pid in in_cgroup
            assert os.stat(f"/proc/{ref.pid}/ns/net").st_ino == netns_ino
        uids = {name: _uids(ref.pid) for name, ref in pod.processes.items()}
        assert uids["haproxy"] == (1337, 1337)
        assert uids["echo"] == (podproc.APP_UID, podproc.APP_GID)
        assert uids["nginx"] == (0, 0)  # the master binds :80; its workers are nobody
        listening = proc.listening_ports(pod.processes["haproxy"].pid)
        assert set(haproxy.LISTEN_PORTS) | {80, 8080, haproxy.ECHO_PORT} <= listening


def test_status_from_a_fresh_cli_reports_pods_ips_and_health(lab):
    res = CliRunner().invoke(cli, ["lab", "status", "--name", lab.name, "-o", "json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["healthy"] is True and data["phase"] == "ready" and data["capture"] is False
    assert [(p["name"], p["ip"]) for p in data["pods"]] == [(p.name, p.ip) for p in lab.pods]
    assert all(v["alive"] for p in data["pods"] for v in p["processes"].values())
    human = CliRunner().invoke(cli, ["lab", "status", "--name", lab.name])
    assert human.exit_code == 0 and lab.pods[1].ip in human.output


def test_demo_checks_pass_on_the_running_lab(lab):
    from meshcni.lab import demo

    data = demo.exercise(lab)
    assert data["ok"], [c for c in data["checks"] if not c["ok"]]
    assert {c["name"].split()[0] + c["name"].split()[2] for c in data["checks"][:2]} == {"ab", "ba"}


def _uids(pid: int) -> tuple[int, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.split()
    return int(fields["Uid"][1]), int(fields["Gid"][1])  # effective ids
