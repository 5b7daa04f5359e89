"""The agent's registry of enrolled pods, persisted one file per pod so an agent restart can re-adopt them.

Each pod is a small JSON file `<state_dir>/pods/<container_id>.json`, replaced atomically (temporary file,
rename), so a restarted agent never reads a torn record. It is deliberately not fsync'd: the registry only
has to outlive the agent process, and the page cache does that; what would outlive it only with an fsync is
a node crash, after which every pod's netns and every pinned map are gone and the records describe nothing
(the restarted agent drops records whose netns no longer exists). Four disk flushes per AddPod would buy
nothing but latency that follows the disk's mood. One file per pod keeps an AddPod's cost independent of
how many pods the node has. A record is written with `phase: "adding"` *before* the datapath is touched and
`"captured"` after, so on restart an agent that died in between knows exactly which enrolments may be
half-done and redoes or undoes them.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from meshcni.sys.errors import SysError

# Container ids are runtime-generated hex or lab names; anything else could escape the directory.
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")


def valid_container_id(container_id: str) -> bool:
    return bool(_SAFE_ID.match(container_id)) and ".." not in container_id


@dataclass
class PodRecord:
    container_id: str
    netns: str
    ifname: str = "eth0"
    pod_name: str = ""
    pod_namespace: str = ""
    pod_uid: str = ""
    ips: list[str] = field(default_factory=list)
    mode: str = "off"  # in force now
    mode_source: str = "node"  # node | annotation | override
    mode_override: str = ""  # set by `meshcni mode set POD`; empty: follow annotations and the node default
    config: dict = field(default_factory=dict)  # PodConfig.to_dict() in force
    phase: str = "adding"  # adding | captured
    listener: str = "none"  # registered | pending | none
    slot: int = -1  # datapath slot while in eBPF mode
    added_at: float = field(default_factory=time.time)

    @property
    def display_name(self) -> str:
        if self.pod_name:
            return f"{self.pod_namespace or 'default'}/{self.pod_name}"
        return self.container_id

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "PodRecord":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


class Registry:
    """Thread-safe map container id -> PodRecord, mirrored to disk on every change."""

    def __init__(self, state_dir: str | os.PathLike):
        self.dir = Path(state_dir) / "pods"
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock = threading.Lock()
        self._pods: dict[str, PodRecord] = {}
        self.skipped: list[str] = []  # unreadable files found at load, kept aside for a human

    def load(self) -> list[PodRecord]:
        """Read every record from disk (start-up); unreadable files are renamed *.corrupt, never deleted."""
        pods = {}
        for path in sorted(self.dir.glob("*.json")):
            try:
                record = PodRecord.from_dict(json.loads(path.read_text(encoding="utf-8")))
                if record.container_id != path.stem:
                    raise ValueError(f"file names {path.stem} but holds {record.container_id}")
            except (OSError, ValueError, TypeError) as exc:
                path.rename(path.with_suffix(".corrupt"))
                self.skipped.append(f"{path.name}: {exc}")
                continue
            pods[record.container_id] = record
        for tmp in self.dir.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)  # a write that died before its rename
        with self._lock:
            self._pods = pods
        return list(pods.values())

    def get(self, container_id: str) -> PodRecord | None:
        with self._lock:
            return self._pods.get(container_id)

    def all(self) -> list[PodRecord]:
        with self._lock:
            return list(self._pods.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._pods)

    def put(self, record: PodRecord) -> None:
        data = (json.dumps(record.to_dict(), sort_keys=True) + "\n").encode()
        path = self.dir / f"{record.container_id}.json"
        tmp = self.dir / f".{record.container_id}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise SysError(f"cannot persist pod {record.container_id} in {self.dir}: {exc}") from exc
        with self._lock:
            self._pods[record.container_id] = record

    def remove(self, container_id: str) -> None:
        try:
            (self.dir / f"{container_id}.json").unlink(missing_ok=True)
        except OSError as exc:
            raise SysError(f"cannot remove pod {container_id} from {self.dir}: {exc}") from exc
        with self._lock:
            self._pods.pop(container_id, None)

    def find(self, key: str) -> PodRecord | None:
        """By container id, by "namespace/name", or by a pod name that is unique on this node."""
        with self._lock:
            if key in self._pods:
                return self._pods[key]
            if "/" in key:
                ns, _, name = key.partition("/")
                hits = [p for p in self._pods.values() if p.pod_namespace == ns and p.pod_name == name]
            else:
                hits = [p for p in self._pods.values() if p.pod_name == key]
            return hits[0] if len(hits) == 1 else None

