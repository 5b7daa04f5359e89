"""Pending enrolments: pods that passed ADD while the agent was unreachable — uncaptured (failurePolicy open)
or captured by the plugin's own iptables rules (failurePolicy iptables, marked `"fallback": "iptables"`).

One JSON file per container, `<dir>/<container_id>.json`, holding the add request the agent would have
received plus why and when it was recorded. Files are written to a temporary name and renamed, so the
agent (which replays and deletes them when it comes back) never reads a half-written record. Container ids
are validated by `conf.parse_invocation` (no "/" or leading "."), which keeps every file inside the dir.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any


class PendingStore:
    def __init__(self, directory: str):
        self.directory = directory

    def path_for(self, container_id: str) -> str:
        return os.path.join(self.directory, container_id + ".json")

    def record(self, request: dict[str, Any], reason: str) -> str:
        """Write the record atomically and return its path; raises OSError when it cannot."""
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        final = self.path_for(request["container_id"])
        tmp = f"{final}.tmp.{os.getpid()}"
        body = dict(request, reason=reason, recorded_at=time.time())
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                json.dump(body, out)
                out.flush()
                os.fsync(out.fileno())
            os.rename(tmp, final)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        return final

    def forget(self, container_id: str) -> bool:
        """Remove the record; True when there was one."""
        try:
            os.unlink(self.path_for(container_id))
            return True
        except FileNotFoundError:
            return False

    def container_ids(self) -> list[str]:
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        return sorted(n[: -len(".json")] for n in names if n.endswith(".json"))

    def load(self, container_id: str) -> dict[str, Any]:
        with open(self.path_for(container_id), encoding="utf-8") as f:
            return json.load(f)
