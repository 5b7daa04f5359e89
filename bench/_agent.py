"""A real `meshcni agent` with private paths and N bare network namespaces, for benchmarks.

It is the root tests' harness (tests/root/agent_env.py `AgentEnv`) wrapped as a context manager, so
benchmarks and tests start, and clean up after, an agent in exactly the same way.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.root.agent_env import AgentEnv  # noqa: E402


@contextmanager
def private_agent(netns_count: int = 0) -> Iterator[tuple[AgentEnv, list[str]]]:
    """Yields the running agent and the paths of `netns_count` fresh namespaces; removes everything after."""
    tmp = Path(tempfile.mkdtemp(prefix="mcni-bench-agent-"))
    env = AgentEnv(tmp, uuid.uuid4().hex[:6])
    try:
        namespaces = [env.make_netns(i) for i in range(netns_count)]
        env.start("--metrics-address", "", "--log-level", "warning")
        yield env, namespaces
    finally:
        env.close()
        shutil.rmtree(tmp, ignore_errors=True)
