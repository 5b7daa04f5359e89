"""Root tests of finding a self-binding proxy's listener in a real pod netns (meshcni.datapath.listeners).

The "proxy" is a real child process started inside the netns with `ip netns exec`, listening on IPv4 and
IPv6; the search must find its sockets by asking the netns's kernel (sock_diag) and take duplicates with pidfd_getfd. The
walk of /proc is counted, not timed: a netns where nothing listens on the port must cost no walk at all.
"""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path
import sys

import pytest

from meshcni.datapath import listeners
from meshcni.sys.errors import NamespaceNotFound

pytestmark = pytest.mark.root
PORT = 15006

_LISTENER = (
    "import socket, sys, time\n"
    "s4 = socket.socket(socket.AF_INET); s4.bind(('0.0.0.0', int(sys.argv[1]))); s4.listen()\n"
    "s6 = socket.socket(socket.AF_INET6); s6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)\n"
    "s6.bind(('::', int(sys.argv[1]))); s6.listen()\n"
    "print('ready', flush=True)\n"
    "time.sleep(300)\n"
)


@pytest.fixture
def proxy(bare_netns):
    proc = subprocess.Popen(["ip", "netns", "exec", Path(bare_netns).name, sys.executable, "-c", _LISTENER, str(PORT)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        yield proc
    finally:
        proc.kill()
        proc.wait()


def _close(fds: dict[int, int]) -> None:
    for fd in fds.values():
        os.close(fd)


def test_a_netns_where_nothing_listens_costs_no_walk_of_proc(bare_netns):
    index = listeners.ProcessIndex()
    assert listeners.take_listeners(bare_netns, PORT, index) == {}
    assert index.walks == 0


def test_the_proxys_listeners_are_found_and_duplicated(proxy, bare_netns):
    path = bare_netns  # the pod netns, as the agent names it
    inodes = listeners.listening_inodes(path, PORT)
    assert sorted(inodes.values()) == [socket.AF_INET, socket.AF_INET6]
    assert listeners.listening_inodes(path, PORT + 1) == {}

    index = listeners.ProcessIndex()
    fds = listeners.take_listeners(path, PORT, index)
    try:
        assert sorted(fds) == [socket.AF_INET, socket.AF_INET6]
        assert index.walks == 1
        for family, fd in fds.items():
            dup = socket.socket(fileno=os.dup(fd))
            try:
                assert dup.family == family
                assert dup.getsockname()[1] == PORT
                assert dup.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
                assert os.fstat(fd).st_ino in inodes  # the proxy's own socket, not a copy of its address
            finally:
                dup.close()
        # the index is shared: a second pod looked at in the same pass costs no second walk
        _close(listeners.take_listeners(path, PORT, index))
        assert index.walks == 1
    finally:
        _close(fds)


def test_the_search_runs_in_the_callers_thread_only(proxy, bare_netns):
    """Reading the pod's table moves this thread into the netns and back: our own netns is unchanged."""
    before = os.stat("/proc/thread-self/ns/net").st_ino
    listeners.listening_inodes(bare_netns, PORT)
    assert os.stat("/proc/thread-self/ns/net").st_ino == before


def test_a_missing_netns_is_named():
    with pytest.raises(NamespaceNotFound):
        listeners.listening_inodes("/var/run/netns/mcni-no-such-netns", PORT)
