"""Root tests: pod b's real HAProxy sidecar is upgraded, SIGKILLed and replaced through the lab's agent
(`meshcni proxy upgrade`'s RPC) under a connection-per-request load from pod a's app, through a's sidecar,
and not one request fails, is refused or goes around b's proxy.

Every assertion is a count: requests the load generator saw succeed or fail by kind, handoffs and upgrades
the agent reports, datapath counters, descriptors in the agent's /proc entry. A SIGKILL destroys the
connections the killed proxy had accepted; the client-side proxy in pod a sends those requests again (what
a mesh's retry policy does), and they wait in the agent-held listener until the next proxy accepts them.
"""

from __future__ import annotations

import os
import sys
import urllib.request

import pytest

from meshcni.handoff.rig import HotUpgradeRig
from meshcni.lab import agent as lab_agent
from meshcni.lab import pod as podproc
from meshcni.sys import proc

pytestmark = pytest.mark.root


def _rig(kind: str, **kwargs):
    with HotUpgradeRig(f"t-hu-{kind}-{os.getpid() % 100000}", **kwargs) as rig:
        yield rig


@pytest.fixture(scope="module")
def held():
    yield from _rig("held")


@pytest.fixture(scope="module")
def own():
    yield from _rig("own", proxy="own")


@pytest.fixture(scope="module")
def held_iptables():
    yield from _rig("ipt", capture="iptables")


def _under_load(rig, steps):
    load = rig.start_load(concurrency=2)
    results = []
    try:
        for step in steps:
            results.append(step())
    finally:
        report = load.stop() if load.p.poll() is None else load.kill()
    return report, results


def _agent_fds(rig) -> int:
    return len(os.listdir(f"/proc/{lab_agent.process(rig.state).pid}/fd"))


def test_graceful_upgrades_lose_no_connection(held):
    before = held.proxy_status()
    report, results = _under_load(held, [lambda: held.upgrade("graceful")] * 20)
    assert report["failed"] == 0, report
    assert report["ok"] > 20
    assert all(r["old_exited"] for r in results)
    after = held.proxy_status()
    assert after["handoffs"] - before["handoffs"] == 20
    assert after["upgrades"]["graceful"] - before["upgrades"].get("graceful", 0) == 20
    assert after["proxy_pids"] == [results[-1]["new_pid"]]
    assert len({r["old_pid"] for r in results} | {r["new_pid"] for r in results}) == 21
    assert held.counters()["no_listener"] == 0  # the SOCKMAP always held the agent's listener


def test_sigkill_restarts_lose_no_request(held):
    before = held.proxy_status()["upgrades"]
    report, results = _under_load(held, [lambda: held.upgrade("crash")] * 5)
    assert report["failed"] == 0, report
    assert report["ok"] > 0
    after = held.proxy_status()["upgrades"]
    assert after["crash_restarts"] - before.get("crash_restarts", 0) == 5
    assert held.counters()["no_listener"] == 0
    # the connections the killed proxies held are reported, and pod a's proxy retried what died with them
    assert after["in_flight_lost"] - before.get("in_flight_lost", 0) == sum(r["in_flight_lost"] for r in results)


def test_a_wrong_uid_is_refused_and_counted(held):
    socket_path = lab_agent.handoff_socket(held.state, held.pod)
    before = held.proxy_status()["refused"]
    r = proc.run([sys.executable, "-m", "meshcni.cli.proxy_exec", "--socket", str(socket_path), "--",
                  "/bin/true"], netns=held.pod.netns, uid=podproc.APP_UID, gid=podproc.APP_GID, timeout=30)
    assert r.returncode == 1
    assert b"not the pod's proxy uid" in r.stderr
    assert held.proxy_status()["refused"] == before + 1
    # the same uid as the proxy, but from the other pod's netns: refused too
    r = proc.run([sys.executable, "-m", "meshcni.cli.proxy_exec", "--socket", str(socket_path), "--",
                  "/bin/true"], netns=held.client_pod.netns, uid=1337, gid=1337, timeout=30)
    assert r.returncode == 1 and b"network namespace" in r.stderr
    assert held.proxy_status()["refused"] == before + 2


def test_metrics_report_upgrades_and_handoffs(held):
    status = held.proxy_status()
    text = urllib.request.urlopen(f"http://{held.state.agent_metrics}/metrics", timeout=10).read().decode()
    labels = f'namespace="lab",pod="{held.pod.name}"'  # the exposition sorts label names
    assert f'meshcni_proxy_handoffs_total{{{labels}}} {float(status["handoffs"])}' in text
    assert f'meshcni_proxy_upgrades_total{{kind="graceful",{labels},result="ok"}} ' \
           f'{float(status["upgrades"]["graceful"])}' in text
    assert f'meshcni_proxy_handoffs_refused_total{{{labels}}} {float(status["refused"])}' in text
    assert f'meshcni_proxy_listeners_held{{{labels}}} 2.0' in text


def test_agent_restart_reacquires_the_listeners(held):
    pid_before = held.proxy_status()["proxy_pids"]
    report, _ = _under_load(held, [lambda: lab_agent.restart(held.state, kill=True)])
    assert report["failed"] == 0, report
    status = held.proxy_status()
    assert status["reacquired"] is True
    assert status["proxy_pids"] == pid_before
    report, results = _under_load(held, [lambda: held.upgrade("graceful")] * 3)
    assert report["failed"] == 0, report
    assert held.proxy_status()["handoffs"] == 3  # the new agent's own count
    assert held.counters()["no_listener"] == 0


def test_agent_fds_do_not_leak_across_100_upgrades(held):
    # Asked first: this process's gRPC connection to the agent (one fd in the agent) opens on its first call.
    listening = [x["address"] for x in held.proxy_status()["listeners"]]
    before = _agent_fds(held)
    for _ in range(100):
        held.upgrade("graceful")
    assert _agent_fds(held) == before
    assert [x["address"] for x in held.proxy_status()["listeners"]] == listening
    report, _ = _under_load(held, [])
    assert report["failed"] == 0 and report["ok"] > 0


def test_adoption_moves_new_connections_to_the_new_proxys_listener(own):
    own.wait_listener_registered()
    steered = own.counters()["inbound_steered"]
    report, results = _under_load(own, [lambda: own.upgrade("adopt")] * 5)
    assert report["failed"] == 0, report
    assert all(r["old_exited"] for r in results)
    assert own.counters()["inbound_steered"] > steered
    assert own.counters()["no_listener"] == 0
    assert own.proxy_status()["held"] is False


def test_held_listeners_need_the_agent_to_hold_them(own):
    """A pod whose proxy binds its own listeners cannot be upgraded gracefully: refused, nothing changes."""
    from meshcni.agent.client import AgentCallError

    pid = own.current_pid()
    with pytest.raises(AgentCallError, match="only --adopt"):
        own.upgrade("graceful")
    assert own.current_pid() == pid


def test_iptables_mode_hands_over_the_same_listeners(held_iptables):
    rig = held_iptables
    steps = [lambda: rig.upgrade("graceful")] * 5 + [lambda: rig.upgrade("crash")] * 3
    report, results = _under_load(rig, steps)
    assert report["failed"] == 0, report
    status = rig.proxy_status()
    assert status["handoffs"] == 1 + 8
    assert status["upgrades"]["graceful"] == 5 and status["upgrades"]["crash_restarts"] == 3


# A blocking app in pod a streams 40 x 16 KiB through both proxies to pod b's echo server, pausing between
# chunks, and checks every byte that comes back.
_SLOW_ECHO = """
import hashlib, socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
print("connected", flush=True)
sent = got = 0
out, back = hashlib.sha256(), hashlib.sha256()
for i in range(40):
    chunk = hashlib.sha256(str(i).encode()).digest() * 512
    s.sendall(chunk)
    out.update(chunk)
    sent += len(chunk)
    while got < sent:
        data = s.recv(65536)
        if not data:
            raise SystemExit(f"eof after {got} of {sent} bytes")
        back.update(data)
        got += len(data)
    time.sleep(0.1)
s.close()
print(sent, got, out.hexdigest() == back.hexdigest(), flush=True)
"""


def test_a_spliced_connection_to_the_old_proxy_finishes_and_leaves_the_sockhash(held):
    import subprocess
    import time

    from meshcni.datapath.ebpf import EbpfDatapath
    from meshcni.lab import haproxy

    dp = EbpfDatapath.open(held.state.bpf_pin_dir)
    try:
        def entries() -> int:
            return dp.map_entries("mcni_socks_v1")

        baseline = entries()
        client = proc.spawn([sys.executable, "-c", _SLOW_ECHO, held.pod.ip, str(haproxy.ECHO_PORT)],
                            netns=held.client_pod.netns, cgroup=held.state.cgroup, uid=podproc.APP_UID,
                            gid=podproc.APP_GID, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd="/")
        try:
            assert client.stdout.readline().strip() == b"connected"
            deadline = time.monotonic() + 10
            while entries() < baseline + 2 and time.monotonic() < deadline:  # both proxies' ends, spliced
                time.sleep(0.02)
            during = entries()
            result = held.upgrade("graceful")  # returns once the old proxy drained, i.e. the stream ended
            out, err = client.communicate(timeout=60)
        finally:
            if client.poll() is None:
                client.kill()
                client.communicate()
        assert during >= baseline + 2
        assert client.returncode == 0, err
        sent, got, same = out.split()
        assert int(sent) == int(got) == 40 * 16384 and same == b"True"
        assert result["old_exited"] is True
        deadline = time.monotonic() + 10
        while entries() > baseline and time.monotonic() < deadline:
            time.sleep(0.05)
        assert entries() <= baseline  # the closed sockets left the map: back to the idle count
    finally:
        dp.close()
