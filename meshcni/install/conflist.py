"""CNI network config files: what is valid, which file is the primary, and where our entry goes.

The rules mirror what the runtimes enforce when they load a file (libcni's ConfListFromBytes / ConfFromBytes as
used by containerd and CRI-O): a `.conflist` needs a "name" and a non-empty "plugins" list of objects with a
"type"; a `.conf` or `.json` file is a single plugin object with a "type" (and, for us, a "name", because the
conflist we turn it into needs one). We never touch a file the runtime would reject, and we validate what we
render before anyone writes it. Everything here is pure over bytes, except `select_primary`, which lists and
reads one directory.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass, field, replace
from pathlib import Path

from meshcni.install.errors import InvalidConfig

# The extensions libcni's ConfFiles() loads, in the order the runtimes sort them (by file name).
CONFIG_SUFFIXES = (".conf", ".conflist", ".json")
PLUGIN_TYPE = "meshcni"


def is_config_name(name: str) -> bool:
    return name.endswith(CONFIG_SUFFIXES)


def _reject_constant(token: str) -> float:
    # NaN/Infinity are not JSON (RFC 8259 §6); Go's encoding/json, which the runtimes use, rejects them.
    raise ValueError(f"{token} is not valid JSON")


def _load_json(path: str, data: bytes) -> object:
    if not data.strip():
        raise InvalidConfig(path, "file is empty")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidConfig(path, f"not UTF-8 ({exc.reason} at byte {exc.start})") from None
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except ValueError as exc:
        raise InvalidConfig(path, f"not valid JSON ({exc})") from None


def _check_plugin(path: str, plugin: object, where: str) -> None:
    if not isinstance(plugin, dict):
        raise InvalidConfig(path, f"{where} is not a JSON object")
    kind = plugin.get("type")
    if not isinstance(kind, str) or not kind:
        raise InvalidConfig(path, f'{where} has no "type"')


def _check_header(path: str, doc: dict) -> None:
    name = doc.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidConfig(path, 'missing "name"')
    if "cniVersion" in doc and not isinstance(doc["cniVersion"], str):
        raise InvalidConfig(path, '"cniVersion" is not a string')


def parse(path: str | os.PathLike, data: bytes) -> dict:
    """Parse a network config file and return it in conflist form; raise InvalidConfig saying why not.

    A single-plugin file comes back wrapped as `{"cniVersion", "name", "plugins": [orig]}` (what libcni's
    ConfListFromConf builds), so callers handle one shape.
    """
    path = str(path)
    doc = _load_json(path, data)
    if not isinstance(doc, dict):
        raise InvalidConfig(path, "top level is not a JSON object")
    _check_header(path, doc)
    if path.endswith(".conflist"):
        plugins = doc.get("plugins")
        if not isinstance(plugins, list) or not plugins:
            raise InvalidConfig(path, 'missing or empty "plugins" list')
        for i, plugin in enumerate(plugins):
            _check_plugin(path, plugin, f"plugins[{i}]")
        if all(p["type"] == PLUGIN_TYPE for p in plugins):
            raise InvalidConfig(path, f'has no plugin other than "{PLUGIN_TYPE}", so it is not a primary network')
        return doc
    _check_plugin(path, doc, "the config")
    if doc["type"] == PLUGIN_TYPE:
        raise InvalidConfig(path, f'is a "{PLUGIN_TYPE}" config, not a primary network')
    return to_conflist(doc)


def to_conflist(single: dict) -> dict:
    """Wrap a single-plugin config as a conflist, keeping the plugin object exactly as it was."""
    doc: dict = {}
    if "cniVersion" in single:
        doc["cniVersion"] = single["cniVersion"]
    doc["name"] = single["name"]
    doc["plugins"] = [single]
    return doc


def entry_count(doc: dict) -> int:
    return sum(1 for p in doc["plugins"] if p.get("type") == PLUGIN_TYPE)


def has_entry_last_once(doc: dict, entry: dict) -> bool:
    return entry_count(doc) == 1 and doc["plugins"][-1] == entry


def with_entry(doc: dict, entry: dict) -> dict:
    """Return the conflist with `entry` as the last plugin and no other meshcni plugin anywhere."""
    plugins = [p for p in doc["plugins"] if p.get("type") != PLUGIN_TYPE]
    return {**doc, "plugins": plugins + [dict(entry)]}


def without_entry(doc: dict) -> dict:
    return {**doc, "plugins": [p for p in doc["plugins"] if p.get("type") != PLUGIN_TYPE]}


def render(path: str | os.PathLike, doc: dict) -> bytes:
    """Serialize a conflist and prove the bytes parse back to the same valid document before returning them."""
    data = (json.dumps(doc, indent=2, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")
    target = str(path)
    if not target.endswith(".conflist"):
        raise InvalidConfig(target, "meshcni only writes .conflist files")
    if parse(target, data) != doc:
        raise InvalidConfig(target, "rendered config does not round-trip")  # a bug in us, never written
    return data


def plugin_entry(agent_socket: str, failure_policy: str, log_level: str) -> dict:
    """Our plugin object: the keys the meshcni plugin reads from its stdin config."""
    return {"type": PLUGIN_TYPE, "agentSocket": agent_socket, "failurePolicy": failure_policy,
            "logLevel": log_level}


def conflist_path(path: Path) -> Path:
    """Where a converted single-plugin config goes: same stem, `.conflist`."""
    return path if path.suffix == ".conflist" else path.with_suffix(".conflist")


@dataclass(frozen=True)
class Primary:
    """The primary network config: `source` is the file the primary CNI wrote, `target` the conflist we edit."""

    source: Path
    target: Path
    data: bytes
    doc: dict
    mode: int
    # Invalid files that sort before this one and were passed over, with the reason (for the log).
    skipped: tuple[tuple[Path, str], ...] = field(default=(), compare=False)

    @property
    def converted(self) -> bool:
        return self.source != self.target


@dataclass(frozen=True)
class Refused:
    """The primary exists but is not valid; we leave it alone and say why."""

    path: Path
    reason: str


@dataclass(frozen=True)
class NoConfig:
    """No usable primary yet; `skipped` lists other files passed over and why."""

    skipped: tuple[tuple[Path, str], ...] = ()


class _Unconvertible(InvalidConfig):
    """A valid primary we cannot convert: the runtime does load it, so it is refused, never skipped."""


def _read_candidate(path: Path) -> tuple[bytes, int] | None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(st.st_mode):
        raise InvalidConfig(str(path), "not a regular file (meshcni only edits regular files, never symlinks)")
    try:
        with open(path, "rb") as f:
            return f.read(), stat.S_IMODE(st.st_mode)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise InvalidConfig(str(path), f"cannot read: {exc.strerror}") from None


def _evaluate(path: Path, managed_target: Path | None) -> Primary | None:
    """Read and validate one candidate; None if it vanished. Raises InvalidConfig."""
    got = _read_candidate(path)
    if got is None:
        return None
    data, mode = got
    doc = parse(path, data)
    target = conflist_path(path)
    if target != path and target.exists() and target != managed_target:
        raise _Unconvertible(str(path), f"converting it would overwrite {target.name}, which meshcni did not write")
    return Primary(source=path, target=target, data=data, doc=doc, mode=mode)


def select_primary(conf_dir: Path, conf_name: str | None = None,
                   managed_target: Path | None = None,
                   managed_source: Path | None = None) -> Primary | Refused | NoConfig:
    """Find the primary network config the runtime will load.

    With `conf_name`, that file (or the conflist we converted it into) is the primary. Otherwise it is the
    lexically first valid config file; invalid files before it are skipped and reported, except the file we
    currently manage: when that one turns invalid (its owner may be half-way through a rewrite) we refuse and
    wait rather than move our entry to some other network.
    """
    if conf_name is not None:
        path = conf_dir / conf_name
        candidates = [path]
        if managed_source == path and managed_target is not None and managed_target != path:
            candidates.append(managed_target)
        for candidate in candidates:
            try:
                primary = _evaluate(candidate, managed_target)
            except InvalidConfig as exc:
                return Refused(candidate, exc.reason)
            if primary is not None:
                return primary
        return NoConfig()

    try:
        names = sorted(n for n in os.listdir(conf_dir) if is_config_name(n))
    except FileNotFoundError:
        return NoConfig()
    skipped: list[tuple[Path, str]] = []
    for name in names:
        path = conf_dir / name
        if path.is_dir():
            continue
        try:
            primary = _evaluate(path, managed_target)
        except InvalidConfig as exc:
            if path in (managed_target, managed_source) or isinstance(exc, _Unconvertible):
                return Refused(path, exc.reason)
            skipped.append((path, exc.reason))
            continue
        if primary is not None:
            return replace(primary, skipped=tuple(skipped))
    return NoConfig(tuple(skipped))
