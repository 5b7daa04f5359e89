"""Fixtures every test tier shares: skipping root tests when not root, unique names, a bare netns, and a
leftover check.

The leftover check snapshots the `mcni-`-prefixed network namespaces when the session starts and fails the
session loudly if new ones are still there when it ends: a test that leaks a netns on this shared machine is
a bug even when its assertions passed. (Another test run going on at the same time on the same machine can
trip it too; the message names the namespaces so the owner is obvious from their prefix.)
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid

import pytest

# Before any test module imports grpc (test_agent_api does so first): the tests spawn children with a fork
# hook (meshcni.sys.proc.spawn) from a process holding gRPC channels, and with gRPC's fork support on, such a
# child can die before exec ("epoll_wait error: Bad file descriptor"). See meshcni/api/fork_safe.py.
from meshcni.api import fork_safe  # noqa: E402,F401

NETNS_PREFIX = "mcni-"


def pytest_collection_modifyitems(config, items):
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root (real kernel, netns, cgroup v2, BPF)")
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)


def mcni_netns() -> set[str]:
    """Names of network namespaces starting with `mcni-` (empty when `ip` is unavailable or not root)."""
    try:
        out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return set()
    return {line.split()[0] for line in out.splitlines() if line.startswith(NETNS_PREFIX)}


@pytest.fixture(scope="session", autouse=True)
def no_leftover_netns():
    before = mcni_netns()
    yield
    leaked = sorted(mcni_netns() - before)
    # A few seconds' grace: a concurrent run's fixture deletes its namespaces moments later, a leak stays.
    deadline = time.monotonic() + 5
    while leaked and time.monotonic() < deadline:
        time.sleep(0.25)
        leaked = sorted(mcni_netns() - before)
    if leaked:
        pytest.fail(
            f"tests left {len(leaked)} network namespace(s) behind: {', '.join(leaked)} "
            f"(remove with: ip netns del <name>)",
            pytrace=False,
        )


@pytest.fixture
def unique_id() -> str:
    """8 hex characters, for names that must not collide with a parallel or earlier run."""
    return uuid.uuid4().hex[:8]


@pytest.fixture
def bare_netns(unique_id) -> str:
    """Path of a fresh network namespace with only loopback up, deleted after the test (root tests)."""
    name = f"{NETNS_PREFIX}bare-{unique_id}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield f"/var/run/netns/{name}"
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)
