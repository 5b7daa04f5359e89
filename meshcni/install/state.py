"""The install record: what install-cni changed, so uninstall can undo exactly that and nothing else.

Kept under the state dir (default /var/lib/meshcni/install, a hostPath in the DaemonSet so it outlives the
container): `state.json` says which config file carries our entry, which file the primary CNI wrote, whether we
converted a .conf, the SHA-256 of the bytes we last wrote, and what we put in the bin dir; `primary.orig` holds
the primary CNI's own bytes from just before our last insertion. Uninstall restores those bytes verbatim only
if the file still holds exactly what we wrote; otherwise it removes just our entry.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from meshcni.install import fsops
from meshcni.install.errors import InstallError

STATE_FILE = "state.json"
BACKUP_FILE = "primary.orig"
FORMAT_VERSION = 1


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class ConfRecord:
    target: str            # the .conflist carrying our entry
    source: str            # the file the primary CNI wrote (== target unless we converted a .conf)
    written_sha256: str    # what we last wrote to `target`
    backup_is_pristine: bool  # primary.orig is the primary CNI's own version (no meshcni entry in it)
    source_mode: int

    @property
    def converted(self) -> bool:
        return self.source != self.target


@dataclass(frozen=True)
class BinaryRecord:
    entry: str                 # <bin-dir>/meshcni
    kind: str                  # "file" (a copied executable) or "bundle" (a symlink into bundle_dir)
    digest: str                # SHA-256 of the file, or of the bundle tree
    bundle_dir: str | None = None


@dataclass(frozen=True)
class InstallRecord:
    conf: ConfRecord | None = None
    binary: BinaryRecord | None = None


class StateStore:
    """Reads and writes the install record atomically; the directory is created 0700 on first write."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)

    def _ensure_dir(self) -> None:
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise InstallError(f"cannot create state dir {self.directory}: {exc.strerror}") from exc

    def load(self) -> InstallRecord:
        path = self.directory / STATE_FILE
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return InstallRecord()
        except (OSError, ValueError) as exc:
            raise InstallError(f"cannot read install record {path}: {exc}") from exc
        if raw.get("version") != FORMAT_VERSION:
            raise InstallError(f"install record {path} has unknown version {raw.get('version')!r}")
        try:
            conf = ConfRecord(**raw["conf"]) if raw.get("conf") else None
            binary = BinaryRecord(**raw["binary"]) if raw.get("binary") else None
        except TypeError as exc:
            raise InstallError(f"install record {path} is malformed: {exc}") from exc
        return InstallRecord(conf, binary)

    def load_or_quarantine(self) -> tuple[InstallRecord, str | None]:
        """Load the record; an unreadable one is renamed aside (kept for a human) and an empty record returned
        with the reason, so a damaged file cannot wedge a node's installer in a crash loop. Uninstall then
        falls back to removing our entry wherever it is found."""
        try:
            return self.load(), None
        except InstallError as exc:
            path = self.directory / STATE_FILE
            aside = path.with_name(f"{STATE_FILE}.unreadable-{os.getpid()}")
            try:
                os.replace(path, aside)
            except OSError as move_exc:
                raise InstallError(f"{exc}; and it cannot be moved aside: {move_exc.strerror}") from exc
            return InstallRecord(), f"{exc} (moved to {aside.name})"

    def save(self, record: InstallRecord) -> None:
        self._ensure_dir()
        doc = {"version": FORMAT_VERSION,
               "conf": asdict(record.conf) if record.conf else None,
               "binary": asdict(record.binary) if record.binary else None}
        data = (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()
        fsops.write_atomic(self.directory / STATE_FILE, data, 0o600)

    def save_backup(self, data: bytes) -> None:
        self._ensure_dir()
        fsops.write_atomic(self.directory / BACKUP_FILE, data, 0o600)

    def load_backup(self) -> bytes | None:
        try:
            return (self.directory / BACKUP_FILE).read_bytes()
        except FileNotFoundError:
            return None

    def clear(self) -> None:
        """Forget everything (after a complete uninstall); the state dir itself is left for the hostPath."""
        for name in (STATE_FILE, BACKUP_FILE):
            try:
                os.unlink(self.directory / name)
            except FileNotFoundError:
                pass
