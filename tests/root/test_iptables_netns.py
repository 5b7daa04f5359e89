"""Root tests for meshcni.sys.netns, which the iptables interceptor and its tests stand on: `in_netns`
moves only the calling thread (threads it starts inside inherit it, as clone(2) does) and always moves it
back, a socket keeps the netns it was made in, and `run_in_netns` enters before dropping to the requested
uid/gid."""

from __future__ import annotations

import os
import subprocess
import threading
import uuid

import pytest

from meshcni.sys.errors import NamespaceNotFound
from meshcni.sys.netns import check_netns, in_netns, popen_in_netns, run_in_netns

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create network namespaces"),
]


def thread_netns() -> str:
    return os.readlink("/proc/thread-self/ns/net")


@pytest.fixture
def netns_path():
    name = f"mcni-ipt-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield f"/var/run/netns/{name}"
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def ns_inode(path: str) -> int:
    return os.stat(path).st_ino


def test_in_netns_moves_only_this_thread_and_restores_it(netns_path):
    home = thread_netns()
    ask, answered, seen_by_other = threading.Event(), threading.Event(), []

    def other_thread():
        ask.wait(10)
        seen_by_other.append(thread_netns())
        answered.set()

    worker = threading.Thread(target=other_thread)
    worker.start()  # already running before we switch
    with in_netns(netns_path):
        inside = os.stat("/proc/thread-self/ns/net").st_ino
        ask.set()
        answered.wait(10)
    worker.join()
    assert inside == ns_inode(netns_path)
    assert seen_by_other == [home]
    assert thread_netns() == home


def test_in_netns_restores_after_an_exception(netns_path):
    home = thread_netns()
    with pytest.raises(RuntimeError, match="boom"):
        with in_netns(netns_path):
            raise RuntimeError("boom")
    assert thread_netns() == home


def test_socket_made_inside_stays_in_the_netns(netns_path):
    # The fresh netns has lo down, so connecting to 127.0.0.1 fails there while it works here.
    import socket

    with in_netns(netns_path):
        sock = socket.socket()
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    with sock, server:
        with pytest.raises(OSError):
            sock.connect(("127.0.0.1", server.getsockname()[1]))


def test_run_in_netns_drops_privileges_after_entering(netns_path):
    def run(*argv):
        return run_in_netns(netns_path, list(argv), uid=1000, gid=1000, capture_output=True, text=True, check=True)

    assert run("id", "-u").stdout.strip() == "1000"
    assert run("id", "-G").stdout.strip() == "1000"  # supplementary groups dropped too
    assert run("stat", "-L", "-c", "%i", "/proc/self/ns/net").stdout.strip() == str(ns_inode(netns_path))
    script = "stat -L -c %i /proc/self/ns/net; exec sleep 30"
    proc = popen_in_netns(netns_path, ["sh", "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        # Once the program has printed, nsenter has entered; the pid is the program's (nsenter exec()s it).
        assert proc.stdout.readline().strip() == str(ns_inode(netns_path))
        assert ns_inode(f"/proc/{proc.pid}/ns/net") == ns_inode(netns_path)
    finally:
        proc.kill()
        proc.wait()


def test_deleted_netns_is_not_found(netns_path):
    check_netns(netns_path)
    subprocess.run(["ip", "netns", "del", os.path.basename(netns_path)], check=True)
    with pytest.raises(NamespaceNotFound):
        check_netns(netns_path)
    with pytest.raises(NamespaceNotFound):
        with in_netns(netns_path):
            pass
