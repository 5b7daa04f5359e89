"""Unit tests of the listener handoff without root: a real unix socket, real SCM_RIGHTS, real listening sockets.

The server is told the proxy uid is our own uid (or, to see a refusal, some other uid), so the whole exchange
runs as the test user; the setuid and netns cases are in tests/root/test_handoff_server.py.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from meshcni.handoff import protocol, proxy_exec
from meshcni.handoff.errors import HandoffError, HandoffRefused
from meshcni.handoff.listeners import PodListeners, accept_queue
from meshcni.handoff.server import HandoffServer


def _listener() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(64)
    return s


@pytest.fixture
def listeners():
    pl = PodListeners("pod-x", "/proc/self/ns/net", {"outbound": _listener(), "inbound": _listener()})
    yield pl
    pl.close()


@pytest.fixture
def sockdir(tmp_path):
    d = tmp_path / "run"
    d.mkdir(mode=0o755)
    return d


def _inode(fd: int) -> int:
    return os.fstat(fd).st_ino


def test_round_trip_hands_over_the_same_sockets_in_order(listeners, sockdir):
    events = []
    with HandoffServer(sockdir / "h.sock", listeners, os.geteuid(), on_event=lambda k, i: events.append((k, i))) as srv:
        first = proxy_exec.fetch(str(sockdir / "h.sock"))
        second = proxy_exec.fetch(str(sockdir / "h.sock"))
        try:
            assert list(first.fds) == ["outbound", "inbound"]
            assert first.pod == "pod-x"
            assert (first.generation, second.generation) == (1, 2)
            for name, fd in listeners.fds().items():
                assert _inode(first.fds[name]) == _inode(fd) == _inode(second.fds[name])
            # a connection to the agent's socket is accepted on the received descriptor: one socket, two fds
            port = listeners.addresses()["inbound"][1]
            with socket.create_connection(("127.0.0.1", port)):
                got = socket.socket(fileno=os.dup(first.fds["inbound"]))
                conn, _ = got.accept()
                conn.close()
                got.close()
        finally:
            protocol.close_fds(first.fds.values())
            protocol.close_fds(second.fds.values())
        assert srv.counters() == {"handoffs": 2, "refused": 0, "generation": 2}
    assert [k for k, _ in events] == ["handoff", "handoff"]
    assert events[0][1]["pid"] == os.getpid() and events[0][1]["names"] == ["outbound", "inbound"]
    assert not (sockdir / "h.sock").exists()


def test_wrong_uid_is_refused_counted_and_reported(listeners, sockdir):
    events = []
    other = os.geteuid() + 1
    before = sorted(os.listdir("/proc/self/fd"))
    with HandoffServer(sockdir / "h.sock", listeners, other, on_event=lambda k, i: events.append((k, i))) as srv:
        with pytest.raises(HandoffRefused, match=f"uid {os.geteuid()} is not the pod's proxy uid {other}"):
            proxy_exec.fetch(str(sockdir / "h.sock"))
    assert sorted(os.listdir("/proc/self/fd")) == before  # nothing received, nothing leaked on either side
    assert srv.counters() == {"handoffs": 0, "refused": 1, "generation": 0}
    assert events == [("refused", {"pod": "pod-x", "pid": os.getpid(), "uid": os.geteuid(), "gid": os.getegid(),
                                   "reason": f"uid {os.geteuid()} is not the pod's proxy uid {other}"})]


def test_unknown_request_is_refused(listeners, sockdir):
    with HandoffServer(sockdir / "h.sock", listeners, os.geteuid()) as srv:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(sockdir / "h.sock"))
            s.sendall(b"GIMME\n")
            line, fds = protocol.read_line_with_fds(s)
        assert fds == []
        assert line.startswith(b"ERR unknown request")
        assert srv.counters()["refused"] == 1


def test_peer_outside_the_pod_netns_is_refused(listeners, sockdir, tmp_path):
    # Any file that is not our network namespace stands for "another pod's netns" here.
    other_ns = tmp_path / "not-our-netns"
    other_ns.write_text("")
    with HandoffServer(sockdir / "h.sock", listeners, os.geteuid(), pod_netns=other_ns) as srv:
        with pytest.raises(HandoffRefused, match="is not in the pod's network namespace"):
            proxy_exec.fetch(str(sockdir / "h.sock"))
        assert srv.counters()["refused"] == 1
    with HandoffServer(sockdir / "h.sock", listeners, os.geteuid(), pod_netns="/proc/self/ns/net") as srv:
        h = proxy_exec.fetch(str(sockdir / "h.sock"))
        protocol.close_fds(h.fds.values())
        assert srv.counters()["handoffs"] == 1


def test_server_refuses_a_directory_others_can_write(listeners, tmp_path):
    d = tmp_path / "open"
    d.mkdir()
    os.chmod(d, 0o777)
    with pytest.raises(HandoffError, match="writable by no one else"):
        HandoffServer(d / "h.sock", listeners, os.geteuid())
    assert not (d / "h.sock").exists()


def test_closed_listeners_cannot_be_handed_over(sockdir):
    pl = PodListeners("p", "/proc/self/ns/net", {"inbound": _listener()})
    pl.close()
    with pytest.raises(HandoffError, match="closed"):
        pl.fds()


def test_accept_queue_counts_connections_waiting_for_accept():
    s = _listener()
    clients = [socket.create_connection(s.getsockname()) for _ in range(3)]
    try:
        queued, limit = accept_queue(s)
        assert (queued, limit) == (3, 64)
        conn, _ = s.accept()
        conn.close()
        assert accept_queue(s.fileno())[0] == 2
    finally:
        for c in clients:
            c.close()
        s.close()


def test_inbound_fds_are_keyed_by_family():
    v4 = _listener()
    v6 = socket.socket(socket.AF_INET6)
    v6.bind(("::1", 0))
    v6.listen(8)
    pl = PodListeners("p", "/proc/self/ns/net", {"outbound": _listener(), "inbound": v4, "inbound6": v6})
    try:
        assert pl.inbound_fds() == {socket.AF_INET: v4.fileno(), socket.AF_INET6: v6.fileno()}
        assert pl.names == ["outbound", "inbound", "inbound6"]
        assert pl.queued() == {"outbound": 0, "inbound": 0, "inbound6": 0}
    finally:
        pl.close()


# ------------------------------------------------------------------------------------------- proxy-exec


def test_build_env_sets_systemd_and_named_variables():
    env = proxy_exec.build_env({"PATH": "/bin", "LISTEN_FDS": "9", "LISTEN_FDNAMES": "x"},
                               {"outbound": 3, "inbound": 4, "inbound6": 5}, pid=4242)
    assert env == {
        "PATH": "/bin",
        "MESHCNI_FD_OUTBOUND": "3",
        "MESHCNI_FD_INBOUND": "4",
        "MESHCNI_FD_INBOUND6": "5",
        "LISTEN_FDS": "3",
        "LISTEN_FDNAMES": "outbound:inbound:inbound6",
        "LISTEN_PID": "4242",
    }


def test_build_env_env_only_leaves_out_listen_fds():
    env = proxy_exec.build_env({"LISTEN_PID": "1"}, {"inbound": 7}, pid=1, systemd=False)
    assert env == {"MESHCNI_FD_INBOUND": "7"}


def test_build_env_rejects_descriptors_not_at_3_in_order():
    with pytest.raises(HandoffError, match="needs descriptors 3"):
        proxy_exec.build_env({}, {"outbound": 4, "inbound": 3}, pid=1)


def test_env_name_makes_a_valid_variable():
    assert proxy_exec.env_name("inbound-v6.x") == "MESHCNI_FD_INBOUND_V6_X"


_REPORT = (
    "import json, os, sys\n"
    "print(json.dumps({'pid': os.getpid(), 'env': {k: v for k, v in os.environ.items()"
    " if k.startswith(('LISTEN_', 'MESHCNI_FD_'))},"
    " 'inodes': {n: os.fstat(n).st_ino for n in (3, 4)}}))\n"
)


def test_proxy_exec_places_fds_at_3_and_execs_in_place(listeners, sockdir):
    with HandoffServer(sockdir / "h.sock", listeners, os.geteuid()) as srv:
        cp = subprocess.run(proxy_exec.launcher_argv(str(sockdir / "h.sock"), [sys.executable, "-c", _REPORT]),
                            capture_output=True, text=True, timeout=60)
        assert cp.returncode == 0, cp.stderr
        rep = json.loads(cp.stdout)
        assert srv.counters()["handoffs"] == 1
    assert rep["env"] == {"MESHCNI_FD_OUTBOUND": "3", "MESHCNI_FD_INBOUND": "4", "LISTEN_FDS": "2",
                          "LISTEN_FDNAMES": "outbound:inbound", "LISTEN_PID": str(rep["pid"])}
    fds = listeners.fds()
    assert rep["inodes"] == {"3": _inode(fds["outbound"]), "4": _inode(fds["inbound"])}


def test_proxy_exec_without_agent_socket_exits_1_with_a_clear_message(tmp_path):
    cp = subprocess.run(proxy_exec.launcher_argv(str(tmp_path / "none.sock"), ["true"]),
                        capture_output=True, text=True, timeout=60)
    assert cp.returncode == 1
    assert cp.stderr.strip() == f"meshcni proxy-exec: no handoff socket at {tmp_path / 'none.sock'} (is the meshcni agent running?)"


def test_proxy_exec_refused_exits_1_and_never_runs_the_command(listeners, sockdir, tmp_path):
    marker = tmp_path / "ran"
    with HandoffServer(sockdir / "h.sock", listeners, os.geteuid() + 1):
        cp = subprocess.run(proxy_exec.launcher_argv(str(sockdir / "h.sock"), ["touch", str(marker)]),
                            capture_output=True, text=True, timeout=60)
    assert cp.returncode == 1
    assert "the handoff server refused: uid" in cp.stderr
    assert not marker.exists()


def test_proxy_exec_reports_a_missing_command(listeners, sockdir):
    with HandoffServer(sockdir / "h.sock", listeners, os.geteuid()):
        cp = subprocess.run(proxy_exec.launcher_argv(str(sockdir / "h.sock"), ["/nonexistent/proxy"]),
                            capture_output=True, text=True, timeout=60)
    assert cp.returncode == 1
    assert cp.stderr.strip() == "meshcni proxy-exec: cannot run /nonexistent/proxy: No such file or directory"


def test_the_launcher_loads_neither_grpc_nor_the_node_verbs():
    """proxy-exec is on every hot upgrade's critical path: its start-up must not pay for the agent client."""
    cp = subprocess.run([sys.executable, "-c", f"import runpy, sys; sys.argv = ['x', '--help']\n"
                         f"try:\n    runpy.run_module('{proxy_exec.LAUNCHER_MODULE}', run_name='__main__')\n"
                         f"except SystemExit:\n    pass\n"
                         f"heavy = ('grpc', 'meshcni.cli.node', 'meshcni.agent.client')\n"
                         f"print(sorted(m for m in heavy if m in sys.modules))"],
                        capture_output=True, text=True, timeout=60)
    assert cp.returncode == 0, cp.stderr
    assert "--socket" in cp.stdout and cp.stdout.strip().endswith("[]")


def test_answer_with_mismatched_fd_count_is_rejected_and_closed():
    r, w = os.pipe()
    with pytest.raises(HandoffError, match="named 2 listeners but carried 1"):
        protocol.parse_answer(protocol.encode_header(["a", "b"], "p", 1), [r])
    with pytest.raises(OSError):
        os.fstat(r)
    os.close(w)
