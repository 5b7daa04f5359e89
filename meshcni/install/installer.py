"""The installer: plugin into the bin dir, our entry last in the primary conflist, kept there, taken out cleanly.

Order is what keeps a node working (anchors: istio#20238, istio#36821, a dangling entry fails every pod ADD):
install copies the binary before inserting the entry; uninstall removes the entry before the binary, and keeps
the binary if the entry could not be removed. The watch loop re-inserts the entry whenever the primary CNI
rewrites its file (istio#60882) and counts each re-insertion in `Installer.reinsertions`. Every pass is
idempotent: a pass that finds the entry in place writes nothing.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, replace
from pathlib import Path

from meshcni.install import bundle, conflist, fsops
from meshcni.install.conflist import NoConfig, Primary, Refused
from meshcni.install.errors import FileVanished, InstallError, InvalidConfig
from meshcni.install.log import event, logger
from meshcni.install.state import BinaryRecord, ConfRecord, InstallRecord, StateStore, sha256
from meshcni.install.watch import Watcher, make_watcher

FAILURE_POLICIES = ("closed", "open", "iptables")
PLUGIN_LOG_LEVELS = ("debug", "info", "warning", "error")
WATCH_MODES = ("auto", "inotify", "poll")


@dataclass(frozen=True)
class InstallOptions:
    conf_dir: Path = Path("/etc/cni/net.d")
    bin_dir: Path = Path("/opt/cni/bin")
    state_dir: Path = Path("/var/lib/meshcni/install")
    plugin_source: Path | None = None
    conf_name: str | None = None
    # the plugin's HTTP endpoint on the agent (meshcni/cni/protocol.py), not the agent's gRPC socket
    agent_socket: str = "/var/run/meshcni/cni.sock"
    # "closed" until the plugin implements "iptables" (with the agent down it would capture the pod with
    # in-pod rules, so pod creation neither fails, merbridge#250, nor starts pods outside the mesh): today
    # the plugin rejects "iptables" as reserved, so defaulting to it would fail every pod ADD.
    failure_policy: str = "closed"
    plugin_log_level: str = "info"
    watch_mode: str = "auto"
    # A full pass even without events: covers events a filesystem never delivers. Cheap (one small dir).
    resync_seconds: float = 2.0

    def __post_init__(self) -> None:
        if self.failure_policy not in FAILURE_POLICIES:
            raise InstallError(f"failure policy {self.failure_policy!r} is not one of {', '.join(FAILURE_POLICIES)}")
        if self.plugin_log_level not in PLUGIN_LOG_LEVELS:
            raise InstallError(f"plugin log level {self.plugin_log_level!r} is not one of "
                               f"{', '.join(PLUGIN_LOG_LEVELS)}")
        if self.watch_mode not in WATCH_MODES:
            raise InstallError(f"watch mode {self.watch_mode!r} is not one of {', '.join(WATCH_MODES)}")
        if self.conf_name is not None and ("/" in self.conf_name or not conflist.is_config_name(self.conf_name)):
            raise InstallError(f"--conf-name {self.conf_name!r} must be a file name in the conf dir ending in "
                               f"{', '.join(conflist.CONFIG_SUFFIXES)}")
        if not self.agent_socket:
            raise InstallError("the agent socket path is empty")


class Installer:
    """Installs, watches and uninstalls; `reinsertions` counts repairs after the first insertion."""

    def __init__(self, options: InstallOptions, log: logging.Logger | None = None):
        self.options = options
        self.log = log or logger()
        self.reinsertions = 0
        self.errors = 0
        self._inserted_once = False
        self._store = StateStore(options.state_dir)
        self._record, problem = self._store.load_or_quarantine()
        if problem:
            event(self.log, logging.WARNING, "ignoring unreadable install record", reason=problem)
        self._entry = conflist.plugin_entry(options.agent_socket, options.failure_policy, options.plugin_log_level)
        self._stop = threading.Event()
        self._watcher: Watcher | None = None
        self._reported: set[tuple] = set()

    # -- logging ---------------------------------------------------------------------------------------------

    def _report(self, pass_notes: list[tuple[int, str, dict]]) -> None:
        """Log each waiting/refusal/skip condition once when it starts, not on every pass while it lasts."""
        keys = set()
        for level, msg, fields in pass_notes:
            key = (msg, tuple(sorted((k, str(v)) for k, v in fields.items())))
            keys.add(key)
            if key not in self._reported:
                event(self.log, level, msg, **fields)
        self._reported = keys

    # -- plugin binary ---------------------------------------------------------------------------------------

    def install_plugin(self) -> BinaryRecord:
        if self.options.plugin_source is None:
            raise InstallError("no plugin source given (--plugin-source)")
        record, changed = bundle.install(self.options.plugin_source, self.options.bin_dir)
        self._save(replace(self._record, binary=record))
        event(self.log, logging.INFO, "installed meshcni plugin" if changed else "meshcni plugin already installed",
              path=record.entry, kind=record.kind, digest=record.digest[:16])
        return record

    # -- the conflist ----------------------------------------------------------------------------------------

    def _save(self, record: InstallRecord, backup: bytes | None = None) -> None:
        if backup is not None:
            self._store.save_backup(backup)  # before the record that refers to it
        self._store.save(record)
        self._record = record

    def reconcile(self) -> str:
        """One pass: make the primary carry our entry last, exactly once. Returns what the pass found:
        "inserted", "unchanged", "waiting" (no valid config yet) or "refused" (the primary is invalid)."""
        for _attempt in range(3):
            try:
                return self._reconcile_once()
            except FileVanished:
                continue  # the file was replaced by delete+create: look at the directory again
        return "waiting"

    def _reconcile_once(self) -> str:
        conf = self._record.conf
        choice = conflist.select_primary(
            self.options.conf_dir, self.options.conf_name,
            Path(conf.target) if conf else None, Path(conf.source) if conf else None)
        notes: list[tuple[int, str, dict]] = []
        for path, reason in getattr(choice, "skipped", ()):
            notes.append((logging.WARNING, "skipping invalid CNI config", {"file": path, "reason": reason}))
        if isinstance(choice, NoConfig):
            notes.append((logging.INFO, "waiting for a valid CNI network config",
                          {"dir": self.options.conf_dir, "name": self.options.conf_name or "*"}))
            self._report(notes)
            return "waiting"
        if isinstance(choice, Refused):
            notes.append((logging.WARNING, "refusing to edit invalid CNI config; waiting for it to be fixed",
                          {"file": choice.path, "reason": choice.reason}))
            self._report(notes)
            return "refused"
        self._report(notes)
        if conf is not None and Path(conf.target) != choice.target:
            event(self.log, logging.INFO, "primary CNI config changed; moving the meshcni entry",
                  old=conf.target, new=choice.target)
            try:
                self._release(conf)
            except InvalidConfig as exc:
                # The old file is unreadable to the runtime too; when it is fixed the sweep of an uninstall
                # (or its owner) deals with it. Moving on beats leaving the new primary unchained.
                event(self.log, logging.WARNING, "could not take meshcni out of the previous config",
                      file=exc.path, reason=exc.reason)
            self._save(replace(self._record, conf=None))
        try:
            changed = self._insert_converted(choice) if choice.converted else self._insert(choice)
        except InvalidConfig as exc:
            self._report(notes + [(logging.WARNING, "refusing to edit invalid CNI config; waiting for it to be fixed",
                                   {"file": exc.path, "reason": exc.reason})])
            return "refused"
        if not changed:
            if not self._inserted_once:
                event(self.log, logging.INFO, "meshcni entry already in place", file=choice.target)
                self._inserted_once = True
            return "unchanged"
        if self._inserted_once:
            self.reinsertions += 1
            event(self.log, logging.WARNING, "re-inserted meshcni entry after the primary CNI rewrote its config",
                  file=choice.target, reinsertions=self.reinsertions)
        else:
            event(self.log, logging.INFO, "inserted meshcni entry as the last plugin", file=choice.target,
                  converted_from=choice.source.name if choice.converted else "-")
        self._inserted_once = True
        return "inserted"

    def _insert(self, primary: Primary) -> bool:
        target = primary.target

        def compute(current: bytes | None) -> bytes | None:
            if current is None:
                raise FileVanished(f"{target} disappeared")
            doc = conflist.parse(target, current)
            if conflist.has_entry_last_once(doc, self._entry):
                return None
            new = conflist.render(target, conflist.with_entry(doc, self._entry))
            conf = self._record.conf
            ours = conf if conf is not None and conf.target == str(target) else None
            # Which bytes uninstall may restore verbatim, and which file they belong to (a .conf we converted
            # stays recorded as the source while the conflist is still our conversion).
            source, source_mode = (ours.source, ours.source_mode) if ours else (str(target), primary.mode)
            if conflist.entry_count(doc) == 0:
                # The owner's own bytes (for a converted file: someone edited our conflist and dropped the
                # entry, so that edit is now the version to give back).
                backup, pristine, source, source_mode = current, True, str(target), primary.mode
            elif ours is not None and sha256(current) == ours.written_sha256:
                backup, pristine = None, ours.backup_is_pristine  # our own earlier write (e.g. other flags)
            else:
                backup, pristine = None, False  # someone else's file that already names meshcni
            record = ConfRecord(target=str(target), source=source, written_sha256=sha256(new),
                                backup_is_pristine=pristine, source_mode=source_mode)
            self._save(replace(self._record, conf=record), backup)
            return new

        return fsops.update_file(target, compute) is not None

    def _insert_converted(self, primary: Primary) -> bool:
        """A single-plugin .conf becomes `<stem>.conflist` with our entry, then the .conf is taken away so the
        runtime (which loads the lexically first file, and `x.conf` sorts before `x.conflist`) uses ours."""
        target = primary.target
        new = conflist.render(target, conflist.with_entry(primary.doc, self._entry))
        record = ConfRecord(target=str(target), source=str(primary.source), written_sha256=sha256(new),
                            backup_is_pristine=True, source_mode=primary.mode)
        self._save(replace(self._record, conf=record), primary.data)
        written = fsops.update_file(target, lambda current: None if current == new else new,
                                    create_mode=primary.mode)
        removed = fsops.remove_if_unchanged(primary.source, primary.data)
        if not removed:
            # Rewritten while we converted it: the next pass converts the new version.
            raise FileVanished(f"{primary.source} changed during conversion")
        return written is not None or removed

    # -- uninstall -------------------------------------------------------------------------------------------

    def _release(self, conf: ConfRecord) -> None:
        """Take our entry out of the file recorded in `conf`: restore the primary CNI's bytes verbatim when the
        file is exactly what we wrote, otherwise remove only our plugin object and keep everything else."""
        target, source = Path(conf.target), Path(conf.source)
        backup = self._store.load_backup() if conf.backup_is_pristine else None
        if conf.converted:
            current = fsops.snapshot(target).data
            if current is None:
                return
            if backup is not None and sha256(current) == conf.written_sha256:
                # Their .conf back first: it sorts before our .conflist, so the runtime never sees a moment
                # with neither file, nor one where ours is still preferred.
                fsops.update_file(source, lambda cur: backup if cur is None else None,
                                  create_mode=conf.source_mode)
                if fsops.remove_if_unchanged(target, current):
                    event(self.log, logging.INFO, "restored converted CNI config", file=source, removed=target)
                    return
            self._strip(target)
            return

        def compute(current: bytes | None) -> bytes | None:
            if current is None:
                return None
            if backup is not None and sha256(current) == conf.written_sha256:
                return backup
            return self._stripped(target, current)

        written = fsops.update_file(target, compute)
        if written is not None:
            how = "restored byte for byte" if written == backup else "removed meshcni entry, kept other changes"
            event(self.log, logging.INFO, how, file=target)

    @staticmethod
    def _stripped(target: Path, current: bytes) -> bytes | None:
        doc = conflist.parse(target, current)
        if conflist.entry_count(doc) == 0:
            return None
        return conflist.render(target, conflist.without_entry(doc))

    def _strip(self, target: Path) -> None:
        if fsops.update_file(target, lambda cur: None if cur is None else self._stripped(target, cur)):
            event(self.log, logging.INFO, "removed meshcni entry, kept other changes", file=target)

    def _sweep(self) -> None:
        """Remove meshcni entries from any other valid conflist in the conf dir (e.g. a lost install record)."""
        conf_dir = self.options.conf_dir
        if not conf_dir.is_dir():
            return
        for name in sorted(n for n in conf_dir.iterdir() if n.name.endswith(".conflist")):
            try:
                self._strip(name)
            except (InvalidConfig, FileVanished):
                continue  # gone, or not a valid conflist: the runtime cannot load it, and we do not edit it

    def uninstall(self) -> None:
        """Remove our entry, then our binary, then the install record. Raises InstallError (keeping the binary)
        if the entry could not be removed, so no entry is ever left pointing at a missing plugin."""
        conf = self._record.conf
        try:
            try:
                if conf is not None:
                    self._release(conf)
            except FileVanished:
                pass  # the file is gone, and our entry with it; the sweep still checks the rest
            self._sweep()
        except (InvalidConfig, OSError) as exc:
            raise InstallError(f"could not remove the meshcni entry ({exc}); the plugin binary was left in place "
                               f"so that the entry does not dangle") from exc
        self._save(replace(self._record, conf=None))
        binary = self._record.binary or self._binary_from_bin_dir()
        if binary is not None:
            for path in bundle.remove(binary):
                event(self.log, logging.INFO, "removed meshcni plugin file", path=path)
        self._store.clear()
        self._record = InstallRecord()
        event(self.log, logging.INFO, "meshcni uninstalled", conf_dir=self.options.conf_dir,
              bin_dir=self.options.bin_dir)

    def _binary_from_bin_dir(self) -> BinaryRecord | None:
        # Without a record we only remove a link into our own bundle dirs: a plain file could be anyone's.
        entry = self.options.bin_dir / bundle.ENTRY_NAME
        if entry.is_symlink():
            return BinaryRecord(str(entry), "bundle", "")
        return None

    # -- the long-running mode -------------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask `run` to finish (and uninstall); safe from a signal handler or another thread."""
        self._stop.set()
        if self._watcher is not None:
            self._watcher.wake()

    def run(self, watch: bool = True, uninstall_on_stop: bool = True) -> str:
        """Install; with `watch`, keep the entry in place until `stop()`, then uninstall. Returns the outcome
        of the last pass. Without `watch`, a missing or invalid primary raises InstallError."""
        self.install_plugin()
        if not watch:
            outcome = self.reconcile()
            if outcome == "waiting":
                raise InstallError(f"no valid CNI network config in {self.options.conf_dir} to chain meshcni to")
            if outcome == "refused":
                raise InstallError(f"the primary CNI config in {self.options.conf_dir} is invalid; not edited")
            return outcome
        self._watcher = make_watcher(self.options.conf_dir, self.options.watch_mode)
        event(self.log, logging.INFO, "watching CNI conf dir", dir=self.options.conf_dir,
              watcher=getattr(self._watcher, "kind", "?"))
        outcome = "waiting"
        try:
            # Watch first, then look: a rewrite between the two is seen by the next wait.
            while not self._stop.is_set():
                outcome = self._guarded_reconcile(outcome)
                self._watcher.wait(self.options.resync_seconds)
        finally:
            self._watcher.close()
            self._watcher = None
            if uninstall_on_stop:
                self.uninstall()
        return outcome

    def _guarded_reconcile(self, previous: str) -> str:
        try:
            return self.reconcile()
        except (InstallError, OSError) as exc:
            # A long-running repairer must outlive a transient fault (a full disk, a racing rm -rf of the
            # conf dir); the error is counted and logged, and the next event or resync tries again.
            self.errors += 1
            event(self.log, logging.ERROR, "install pass failed; will retry", error=exc, errors=self.errors)
            return previous
