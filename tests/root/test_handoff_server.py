"""Root tests of the handoff: listeners made inside a real pod netns, and peers with another uid or netns.

The wrong-uid peer is a real child process that dropped to uid 1338 before connecting, so the refusal is
decided on the kernel's SO_PEERCRED, exactly as for a foreign process in production.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from meshcni.config import PodConfig
from meshcni.handoff.listeners import PodListeners
from meshcni.handoff.server import HandoffServer
from meshcni.sys import netns

pytestmark = pytest.mark.root
SO_NETNS_COOKIE = 71

_FETCH = (
    "import json, os, sys\n"
    "from meshcni.handoff import proxy_exec\n"
    "from meshcni.handoff.errors import HandoffError\n"
    "try:\n"
    "    h = proxy_exec.fetch(sys.argv[1])\n"
    "    print(json.dumps({'names': list(h.fds), 'inodes': [os.fstat(fd).st_ino for fd in h.fds.values()]}))\n"
    "except HandoffError as exc:\n"
    "    print(json.dumps({'error': str(exc)}))\n"
)


@pytest.fixture
def sockdir(tmp_path):
    os.chmod(tmp_path, 0o755)  # a uid-1338 child must reach the socket
    for parent in tmp_path.parents:
        if str(parent).startswith("/tmp/pytest-of"):
            os.chmod(parent, os.stat(parent).st_mode | 0o005)
    d = tmp_path / "run"
    d.mkdir(mode=0o755)
    return d


def _cookie(sock_or_path) -> int:
    if isinstance(sock_or_path, socket.socket):
        return int.from_bytes(sock_or_path.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8), "little")
    with netns.in_netns(sock_or_path):
        s = socket.socket()
    with s:
        return _cookie(s)


def _fetch_as(uid: int | None, path, ns: str | None = None) -> dict:
    argv = [sys.executable, "-c", _FETCH, str(path)]
    if ns is not None:
        argv = netns.nsenter_argv(ns, argv, uid=uid, gid=uid)
    cp = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd="/work/main",
                        user=uid if ns is None else None, group=uid if ns is None else None)
    assert cp.returncode == 0, cp.stderr
    return json.loads(cp.stdout)


def test_listeners_live_in_the_pod_netns_at_istio_addresses(bare_netns):
    with PodListeners.create(bare_netns, PodConfig(), pod="p", ipv6=True) as pl:
        assert pl.addresses() == {"outbound": ("127.0.0.1", 15001), "inbound": ("0.0.0.0", 15006),
                                  "inbound6": ("::", 15006)}
        socks = {n: socket.socket(fileno=os.dup(fd)) for n, fd in pl.fds().items()}
        try:
            assert {n: _cookie(s) for n, s in socks.items()} == dict.fromkeys(socks, _cookie(bare_netns))
            assert socks["inbound6"].getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
            assert socks["inbound"].getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) == 1
            assert socks["inbound"].getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 0
            # reachable inside the pod, where the host's 127.0.0.1:15001 is not
            with netns.in_netns(bare_netns):
                c = socket.create_connection(("127.0.0.1", 15001), timeout=5)
            with c:
                conn, _ = socks["outbound"].accept()
                conn.close()
            assert pl.queued() == {"outbound": 0, "inbound": 0, "inbound6": 0}
        finally:
            for s in socks.values():
                s.close()


def test_custom_ports_come_from_the_pod_config(bare_netns):
    with PodListeners.create(bare_netns, PodConfig(outbound_port=16001, inbound_port=16006)) as pl:
        assert pl.addresses() == {"outbound": ("127.0.0.1", 16001), "inbound": ("0.0.0.0", 16006)}
        assert list(pl.inbound_fds()) == [socket.AF_INET]


def test_a_busy_port_fails_cleanly_and_closes_what_was_opened(bare_netns):
    with netns.in_netns(bare_netns):
        squatter = socket.socket()
    with squatter:
        squatter.bind(("0.0.0.0", 15006))
        squatter.listen(1)
        before = sorted(os.listdir("/proc/self/fd"))
        with pytest.raises(Exception, match=r"cannot listen on 0.0.0.0:15006 for the inbound listener"):
            PodListeners.create(bare_netns, PodConfig())
        assert sorted(os.listdir("/proc/self/fd")) == before


def test_only_the_proxy_uid_in_the_pod_netns_receives(bare_netns, sockdir):
    events = []
    with PodListeners.create(bare_netns, PodConfig(), pod="p") as pl, \
            HandoffServer(sockdir / "h.sock", pl, 1337, on_event=lambda k, i: events.append((k, i)),
                          pod_netns=bare_netns) as srv:
        wrong_uid = _fetch_as(1338, sockdir / "h.sock", bare_netns)
        assert wrong_uid == {"error": "the handoff server refused: uid 1338 is not the pod's proxy uid 1337"}
        as_root = _fetch_as(None, sockdir / "h.sock", bare_netns)
        assert as_root == {"error": "the handoff server refused: uid 0 is not the pod's proxy uid 1337"}
        outside = _fetch_as(1337, sockdir / "h.sock")  # right uid, host netns
        assert outside["error"].startswith("the handoff server refused: pid ")
        assert outside["error"].endswith("is not in the pod's network namespace")
        ok = _fetch_as(1337, sockdir / "h.sock", bare_netns)
        assert ok == {"names": ["outbound", "inbound"], "inodes": [os.fstat(fd).st_ino for fd in pl.fds().values()]}
        assert srv.counters() == {"handoffs": 1, "refused": 3, "generation": 1}
    assert [(k, i.get("uid")) for k, i in events] == [("refused", 1338), ("refused", 0), ("refused", 1337),
                                                      ("handoff", 1337)]
    assert not (sockdir / "h.sock").exists()
