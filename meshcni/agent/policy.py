"""Where a pod's annotations come from: the API server in Kubernetes, a local policy file off it.

The agent never parses annotations itself; it asks a `PolicySource` for a pod's annotations and hands them
to `PodConfig.from_annotations`. `LocalPolicyFile` is the off-Kubernetes source the lab writes: a JSON
document with node-wide defaults, per-namespace and per-pod annotations, merged in that order (the most
specific wins, as an annotation on a pod overrides a namespace label in Istio). The file is re-read when
its mtime changes, and every pod whose merged annotations changed is reported to `on_change`, so editing
the file toggles a pod's mode live the way editing a pod's annotation does in a cluster.

    {"defaults": {"meshcni.io/mode": "ebpf"},
     "namespaces": {"lab": {"traffic.sidecar.istio.io/excludeInboundPorts": "9000"}},
     "pods": {"lab/lab-pod-0": {"meshcni.io/mode": "iptables"}}}
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Callable, Mapping, Protocol

OnChange = Callable[[str, str, dict[str, str]], None]


class PolicyError(ValueError):
    """The policy file cannot be read or does not have the documented shape; the message says where."""


class PolicySource(Protocol):
    def annotations(self, namespace: str, name: str) -> dict[str, str] | None:
        """The pod's annotations; None when the source does not know the pod."""

    def start(self) -> None: ...

    def close(self) -> None: ...


class NoPolicy:
    """No source configured: every pod gets the node defaults."""

    def annotations(self, namespace: str, name: str) -> dict[str, str] | None:
        return {}

    def start(self) -> None:
        pass

    def close(self) -> None:
        pass


class LocalPolicyFile:
    """The lab's and plain hosts' policy: a JSON file, re-read when it changes (see the module docstring)."""

    def __init__(self, path: str | os.PathLike, on_change: OnChange | None = None):
        self.path = Path(path)
        self.on_change = on_change
        self._lock = threading.Lock()
        self._mtime: int | None = None
        self._doc: dict = {"defaults": {}, "namespaces": {}, "pods": {}}
        self._known: dict[tuple[str, str], dict[str, str]] = {}  # pods asked about, with what they got

    def start(self) -> None:
        self.refresh()

    def close(self) -> None:
        pass

    def annotations(self, namespace: str, name: str) -> dict[str, str] | None:
        try:
            self.refresh()  # one stat(): an ADD right after an edit must see the edit
        except PolicyError:
            pass  # the last good policy stays in force; the agent's loop logs the error
        with self._lock:
            merged = self._merge(namespace, name)
            self._known[(namespace, name)] = merged
            return merged

    def forget(self, namespace: str, name: str) -> None:
        with self._lock:
            self._known.pop((namespace, name), None)

    def refresh(self) -> list[tuple[str, str]]:
        """Re-read the file if it changed; returns the pods whose annotations changed (and reports them).

        A file that vanished means "no policy" (defaults only); a file that does not parse keeps the last
        good policy in force and raises, so a half-written edit never flips pods' modes.
        """
        try:
            mtime = self.path.stat().st_mtime_ns
        except FileNotFoundError:
            mtime = None
        if mtime == self._mtime:
            return []
        doc = _read(self.path) if mtime is not None else {"defaults": {}, "namespaces": {}, "pods": {}}
        changed = []
        with self._lock:
            self._doc, self._mtime = doc, mtime
            for (ns, name), before in list(self._known.items()):
                after = self._merge(ns, name)
                if after != before:
                    self._known[(ns, name)] = after
                    changed.append((ns, name, after))
        for ns, name, after in changed:
            if self.on_change:
                self.on_change(ns, name, after)
        return [(ns, name) for ns, name, _ in changed]

    def _merge(self, namespace: str, name: str) -> dict[str, str]:
        merged = dict(self._doc["defaults"])
        merged.update(self._doc["namespaces"].get(namespace, {}))
        merged.update(self._doc["pods"].get(f"{namespace}/{name}", {}))
        return merged


def _read(path: Path) -> dict:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyError(f"cannot read policy file {path}: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise PolicyError(f"policy file {path} is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise PolicyError(f"policy file {path}: the top level must be an object")
    unknown = set(raw) - {"defaults", "namespaces", "pods"}
    if unknown:
        raise PolicyError(f"policy file {path}: unknown key(s) {', '.join(sorted(unknown))}")
    doc = {"defaults": _annotations(path, "defaults", raw.get("defaults", {}))}
    for section in ("namespaces", "pods"):
        entries = raw.get(section, {})
        if not isinstance(entries, dict):
            raise PolicyError(f"policy file {path}: {section!r} must be an object")
        doc[section] = {str(k): _annotations(path, f"{section}.{k}", v) for k, v in entries.items()}
    return doc


def _annotations(path: Path, where: str, value) -> dict[str, str]:
    if not isinstance(value, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise PolicyError(f"policy file {path}: {where} must map annotation names to string values")
    return dict(value)


def write_policy(path: str | os.PathLike, doc: Mapping) -> None:
    """Write a policy document atomically (what the lab and `meshcni mode` tooling use)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)
