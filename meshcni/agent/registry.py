"""The agent's registry of enrolled pods, persisted as an append-only journal so a restart can re-adopt them.

Every change is one JSON line appended to `<state_dir>/pods.jsonl` with a single write(2) on a file kept
open: the record as it now is, or a tombstone `{"container_id": ..., "deleted": true}`. Replaying the lines
in order gives the registry; a torn last line (the agent died inside a write) is the only partial state,
and it is dropped. When the journal holds several times more lines than live pods it is compacted: the
live records are written to a temporary file that atomically replaces the journal. A change therefore
costs one write into the page cache, whatever the number of pods, where the earlier file per pod cost an
inode created and one freed per change: on ext4 that made an AddPod's cost follow the filesystem's
journal (2-4x slower after a burst of pod churn, measured). Nothing is fsync'd: the registry only has to
outlive the agent process, which the page cache does; after a node crash every netns and pinned map is
gone and the records describe nothing (the restarted agent drops records whose netns no longer exists).

A record is written with `phase: "adding"` *before* the datapath is touched and `"captured"` after, so on
restart an agent that died in between knows exactly which enrolments may be half-done and redoes or undoes
them. A line that does not parse is never silently lost: the journal is kept aside as
`pods.jsonl.corrupt` and the line reported. Records of the earlier layout (`pods/<id>.json`) are read
once and folded into the journal.
"""

from __future__ import annotations

import errno
import json
import os
import re
import threading
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

from meshcni.sys.errors import SysError

# Container ids are runtime-generated hex or lab names; anything else could escape the directory.
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
JOURNAL = "pods.jsonl"
LEGACY_DIR = "pods"
# Compact when the journal has this many times more lines than live records (plus a floor, so a node with
# a handful of pods does not rewrite its journal every few changes): the rewrite is amortised O(1).
COMPACT_RATIO = 8
COMPACT_FLOOR = 256


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
        # Shallow on purpose (dataclasses.asdict deep-copies): callers serialise it at once or copy it.
        return {f.name: getattr(self, f.name) for f in _FIELDS}

    @classmethod
    def from_dict(cls, data: dict) -> "PodRecord":
        return cls(**{k: v for k, v in data.items() if k in _NAMES})


_FIELDS = fields(PodRecord)
_NAMES = frozenset(f.name for f in _FIELDS)


def read_journal(path: Path) -> tuple[dict[str, PodRecord], int, list[str]]:
    """Replay a journal: (live records, lines read, problems). Reads only; a missing file is empty."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return {}, 0, []
    records: dict[str, PodRecord] = {}
    problems = []
    lines = data.split(b"\n")
    torn = lines.pop()  # what follows the last newline: empty, or a write that died half-way
    if torn:
        problems.append(f"{path.name}: dropped a torn last line ({len(torn)} bytes)")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            cid = entry["container_id"]
            if entry.get("deleted"):
                records.pop(cid, None)
            else:
                records[cid] = PodRecord.from_dict(entry)
        except (ValueError, TypeError, KeyError) as exc:
            problems.append(f"{path.name} line {number}: {exc}")
    return records, len(lines), problems


class Registry:
    """Thread-safe map container id -> PodRecord, journalled to disk on every change."""

    def __init__(self, state_dir: str | os.PathLike):
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path = self.state_dir / JOURNAL
        self._lock = threading.Lock()
        self._pods: dict[str, PodRecord] = {}
        self._fd: int | None = None
        self._lines = 0  # lines in the journal file now
        self.skipped: list[str] = []  # what load could not read, for a human (the bytes are kept aside)

    # --- start-up ---------------------------------------------------------------------------------------

    def load(self) -> list[PodRecord]:
        """Read the journal (and records of the earlier file-per-pod layout), then compact it."""
        with self._lock:
            pods, _, problems = read_journal(self.path)
            if any("torn" not in p for p in problems):
                corrupt = self.path.with_name(self.path.name + ".corrupt")
                os.replace(self.path, corrupt)  # kept for a human; the compaction below writes a clean one
            legacy = self._read_legacy(pods)
            self.skipped = problems + legacy
            self._pods = pods
            self._compact_locked()
            self._remove_legacy()
            return list(pods.values())

    def _read_legacy(self, pods: dict[str, PodRecord]) -> list[str]:
        problems = []
        directory = self.state_dir / LEGACY_DIR
        for path in sorted(directory.glob("*.json")) if directory.is_dir() else ():
            try:
                record = PodRecord.from_dict(json.loads(path.read_text(encoding="utf-8")))
                if record.container_id != path.stem:
                    raise ValueError(f"file names {path.stem} but holds {record.container_id}")
            except (OSError, ValueError, TypeError) as exc:
                path.rename(path.with_suffix(".corrupt"))
                problems.append(f"{LEGACY_DIR}/{path.name}: {exc}")
                continue
            pods.setdefault(record.container_id, record)  # the journal is newer
        return problems

    def _remove_legacy(self) -> None:
        directory = self.state_dir / LEGACY_DIR
        if not directory.is_dir():
            return
        for path in directory.glob("*.json"):
            path.unlink(missing_ok=True)  # folded into the journal, which is on disk by now
        for tmp in directory.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)
        try:
            directory.rmdir()
        except OSError:
            pass  # *.corrupt files stay for a human

    # --- reads --------------------------------------------------------------------------------------------

    def get(self, container_id: str) -> PodRecord | None:
        with self._lock:
            return self._pods.get(container_id)

    def all(self) -> list[PodRecord]:
        with self._lock:
            return list(self._pods.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._pods)

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

    # --- changes ------------------------------------------------------------------------------------------

    def put(self, record: PodRecord) -> None:
        line = json.dumps(record.to_dict(), sort_keys=True, separators=(",", ":"))
        with self._lock:
            self._append_locked(line, record.container_id)
            self._pods[record.container_id] = record
            self._maybe_compact_locked()

    def remove(self, container_id: str) -> None:
        with self._lock:
            if container_id not in self._pods:
                return
            self._append_locked(json.dumps({"container_id": container_id, "deleted": True}), container_id)
            self._pods.pop(container_id, None)
            self._maybe_compact_locked()

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    # --- the journal ----------------------------------------------------------------------------------------

    def _append_locked(self, line: str, container_id: str) -> None:
        data = (line + "\n").encode()
        try:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            end = os.lseek(self._fd, 0, os.SEEK_END)
            written = os.write(self._fd, data)
            if written != len(data):
                # A full disk: cut the partial line off, so the next change does not glue onto it.
                os.ftruncate(self._fd, end)
                raise OSError(errno.ENOSPC, f"short write ({written} of {len(data)} bytes)")
        except OSError as exc:
            raise SysError(f"cannot persist pod {container_id} in {self.path}: {exc}") from exc
        self._lines += 1

    def _maybe_compact_locked(self) -> None:
        if self._lines > COMPACT_FLOOR + COMPACT_RATIO * len(self._pods):
            self._compact_locked()

    def _compact_locked(self) -> None:
        """Replace the journal by one line per live record (temporary file, rename: never torn)."""
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        data = "".join(json.dumps(r.to_dict(), sort_keys=True, separators=(",", ":")) + "\n"
                       for r in self._pods.values()).encode()
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise SysError(f"cannot compact the pod registry {self.path}: {exc}") from exc
        if self._fd is not None:
            os.close(self._fd)  # it points at the replaced file
            self._fd = None
        self._lines = len(self._pods)
