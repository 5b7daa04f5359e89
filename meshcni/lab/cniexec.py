"""Execute a CNI network configuration list the way a container runtime does (SPEC 1.0: "Execution").

ADD runs the plugins in order, each receiving its own entry (plus the list's `name` and `cniVersion`) on stdin
and the previous plugin's result as `prevResult`; the last result is the attachment's result. DEL runs them
in reverse order, each receiving the cached ADD result as `prevResult`, and must tolerate resources that are
already gone. The environment carries CNI_COMMAND, CNI_CONTAINERID, CNI_NETNS, CNI_IFNAME, CNI_ARGS and
CNI_PATH. A plugin failure is its error JSON on stdout plus a non-zero exit, surfaced here as `CniExecError`.

This is the lab's own minimal runtime, written because meshcni.cni.runtime did not exist yet when the lab was
built; `meshcni.lab.lab` reaches it only through `add`/`delete`, so swapping in the shared runtime is local.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any, Mapping, Sequence

from meshcni.lab.state import LabError

PLUGIN_TIMEOUT = 60.0


class CniExecError(LabError):
    """A CNI plugin failed; carries the spec error code and message it printed."""

    def __init__(self, plugin: str, command: str, code: int | None, msg: str, details: str = ""):
        text = f"CNI {command} failed in plugin {plugin!r}"
        text += f" (code {code}): {msg}" if code is not None else f": {msg}"
        if details:
            text += f" ({details})"
        super().__init__(text)
        self.plugin = plugin
        self.code = code
        self.msg = msg


def add(
    conflist: Mapping[str, Any],
    *,
    container_id: str,
    netns: str,
    ifname: str,
    cni_path: Sequence[str],
    cni_args: str = "",
) -> dict[str, Any]:
    """Run ADD through the whole chain and return the final result."""
    prev: dict[str, Any] | None = None
    for plugin in conflist["plugins"]:
        out = _exec(conflist, plugin, "ADD", container_id, netns, ifname, cni_path, cni_args, prev)
        if out is None:
            raise CniExecError(plugin["type"], "ADD", None, "printed no result")
        prev = out
    return prev or {}


def delete(
    conflist: Mapping[str, Any],
    *,
    container_id: str,
    netns: str,
    ifname: str,
    cni_path: Sequence[str],
    cni_args: str = "",
    cached_result: Mapping[str, Any] | None = None,
) -> list[str]:
    """Run DEL through the chain in reverse. Every plugin runs even if an earlier one fails (so host-local
    still releases the IP when the bridge plugin trips over a half-removed veth); the first error is raised.

    A plugin whose binary does not exist cannot have created anything, so it is skipped with a note (returned)
    rather than failing the DEL: that is what lets a lab whose ADD failed on a missing plugin roll back.
    """
    notes: list[str] = []
    first_error: CniExecError | None = None
    for plugin in reversed(conflist["plugins"]):
        if _lookup(plugin["type"], cni_path) is None:
            notes.append(f"CNI DEL skipped plugin {plugin['type']!r}: not found in {os.pathsep.join(cni_path)}")
            continue
        try:
            _exec(conflist, plugin, "DEL", container_id, netns, ifname, cni_path, cni_args, cached_result)
        except CniExecError as exc:
            first_error = first_error or exc
    if first_error is not None:
        raise first_error
    return notes


def _exec(
    conflist: Mapping[str, Any],
    plugin: Mapping[str, Any],
    command: str,
    container_id: str,
    netns: str,
    ifname: str,
    cni_path: Sequence[str],
    cni_args: str,
    prev: Mapping[str, Any] | None,
) -> dict[str, Any] | None:
    ptype = plugin["type"]
    binary = _find(ptype, cni_path)
    conf = dict(plugin)
    conf["name"] = conflist["name"]
    conf["cniVersion"] = conflist["cniVersion"]
    if prev is not None:
        conf["prevResult"] = prev
    env = {
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": container_id,
        "CNI_NETNS": netns,
        "CNI_IFNAME": ifname,
        "CNI_ARGS": cni_args,
        "CNI_PATH": os.pathsep.join(cni_path),
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
    }
    try:
        proc = subprocess.run(
            [str(binary)],
            input=json.dumps(conf).encode(),
            env=env,
            capture_output=True,
            timeout=PLUGIN_TIMEOUT,
        )
    except subprocess.TimeoutExpired:
        raise CniExecError(ptype, command, None, f"did not finish within {PLUGIN_TIMEOUT:g}s") from None
    stdout = proc.stdout.decode(errors="replace").strip()
    if proc.returncode != 0:
        try:
            err = json.loads(stdout)
            raise CniExecError(ptype, command, err.get("code"), err.get("msg", ""), err.get("details", ""))
        except (ValueError, AttributeError):
            msg = stdout or proc.stderr.decode(errors="replace").strip() or f"exit status {proc.returncode}"
            raise CniExecError(ptype, command, None, msg) from None
    if command != "ADD" or not stdout:
        return None
    try:
        return json.loads(stdout)
    except ValueError:
        raise CniExecError(ptype, command, None, f"printed a result that is not JSON: {stdout[:200]!r}") from None


def _lookup(ptype: str, cni_path: Sequence[str]) -> Path | None:
    for d in cni_path:
        candidate = Path(d) / ptype
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def _find(ptype: str, cni_path: Sequence[str]) -> Path:
    found = _lookup(ptype, cni_path)
    if found is not None:
        return found
    raise CniExecError(ptype, "exec", None, f"plugin not found in CNI_PATH {os.pathsep.join(cni_path)}")
