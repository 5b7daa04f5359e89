"""A small CNI runtime: executes plugins the way the spec tells a runtime to (libcni's job in containerd).

Used by the root tests and the lab to drive real chains (loopback; bridge + host-local → meshcni) without
a kubelet. For a network configuration list it runs ADD in order, feeding each plugin the previous
plugin's result as `prevResult`, and caches the final result; CHECK and DEL feed every plugin that cached
result, DEL in reverse order and tolerant of a missing cache; STATUS asks each plugin in order; GC hands
each plugin `cni.dev/valid-attachments` and drops cached results of attachments no longer valid.
Like libcni, CHECK needs a list version >= 0.4.0, and STATUS/GC are no-ops below 1.1.0.

One deliberate addition to libcni: plugins that predate the list's version (Debian 12 ships the reference
plugins 1.1.1, which speak up to 1.0.0) are run at the highest version both sides know, with prevResult
converted down and their result converted back up, and are skipped for verbs their version lacks
(CHECK < 0.4.0, STATUS/GC < 1.1.0). Every other plugin — meshcni in particular — receives the list's
version unchanged.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass, field
from typing import Any, Sequence

from meshcni.cni import spec


class RuntimeConfigError(Exception):
    """Base for failures of the runtime helper itself (bad conflist, missing plugin)."""


class PluginNotFound(RuntimeConfigError):
    pass


class PluginFailed(Exception):
    """A plugin exited non-zero; carries its CNI error (code/msg/details) and its stderr."""

    def __init__(self, plugin: str, command: str, code: int | None, msg: str, details: str = "", stderr: str = ""):
        super().__init__(f"{plugin} {command} failed: code {code}: {msg}" + (f" ({details})" if details else ""))
        self.plugin = plugin
        self.command = command
        self.code = code
        self.msg = msg
        self.details = details
        self.stderr = stderr


@dataclass(frozen=True)
class Attachment:
    """What the runtime knows about one container on one network: CNI_CONTAINERID/NETNS/IFNAME/ARGS."""

    container_id: str
    netns: str
    ifname: str = "eth0"
    args: dict[str, str] = field(default_factory=dict)

    def cni_args(self) -> str:
        # Like containerd and the kubelet: Go plugins reject keys they do not know unless IgnoreUnknown=1.
        pairs = {"IgnoreUnknown": "1", **self.args} if self.args else {}
        return ";".join(f"{k}={v}" for k, v in pairs.items())


class CniRuntime:
    def __init__(
        self,
        bin_dirs: Sequence[str],
        cache_dir: str,
        exec_prefix: Sequence[str] = (),
        timeout: float = 60.0,
    ):
        """`exec_prefix` runs every plugin under a wrapper, e.g. ["nsenter", "--net=/run/netns/node"] to treat
        that namespace as the node (so bridges, routes and sysctls land there, not on the real host)."""
        self.bin_dirs = list(bin_dirs)
        self.cache_dir = cache_dir
        self.exec_prefix = list(exec_prefix)
        self.timeout = timeout
        self._versions: dict[str, list[str]] = {}

    # -------------------------------------------------------------------------------------- list verbs

    def add(self, netconf: dict[str, Any], att: Attachment) -> dict[str, Any]:
        """ADD the whole list; returns the final result in the list's version and caches it."""
        version, plugins = self._plugins(netconf)
        prev: dict[str, Any] | None = None
        for plugin in plugins:
            out = self._exec(netconf, plugin, "ADD", version, att, prev)
            if out is None:
                raise PluginFailed(plugin["type"], "ADD", None, "plugin printed no result")
            prev = out
        assert prev is not None
        self._store(netconf, att, prev)
        return prev

    def check(self, netconf: dict[str, Any], att: Attachment) -> None:
        version, plugins = self._plugins(netconf)
        if not spec.at_least(version, "0.4.0"):
            raise RuntimeConfigError(f"configuration version {version} does not support CHECK")
        if netconf.get("disableCheck") is True:
            return
        cached = self.cached_result(netconf, att)
        if cached is None:
            raise RuntimeConfigError(f"no cached result for {att.container_id}/{att.ifname}; was it added?")
        for plugin in plugins:
            self._exec(netconf, plugin, "CHECK", version, att, cached)

    def delete(self, netconf: dict[str, Any], att: Attachment) -> None:
        version, plugins = self._plugins(netconf)
        cached = self.cached_result(netconf, att)
        for plugin in reversed(plugins):
            self._exec(netconf, plugin, "DEL", version, att, cached)
        self._forget(netconf, att)

    def status(self, netconf: dict[str, Any]) -> None:
        version, plugins = self._plugins(netconf)
        if not spec.at_least(version, "1.1.0"):
            return
        for plugin in plugins:
            self._exec(netconf, plugin, "STATUS", version, None, None)

    def gc(self, netconf: dict[str, Any], valid: Sequence[Attachment]) -> None:
        version, plugins = self._plugins(netconf)
        if not spec.at_least(version, "1.1.0"):
            return
        if netconf.get("disableGC") is True:
            return
        attachments = [{"containerID": a.container_id, "ifname": a.ifname} for a in valid]
        errors: list[PluginFailed] = []
        for plugin in plugins:
            try:
                self._exec(netconf, plugin, "GC", version, None, None, extra={"cni.dev/valid-attachments": attachments})
            except PluginFailed as exc:
                errors.append(exc)  # spec: keep collecting garbage with the other plugins
        keep = {self._cache_name(netconf, a) for a in valid}
        for name in self._cached_names(netconf):
            if name not in keep:
                os.unlink(os.path.join(self.cache_dir, name))
        if errors:
            raise errors[0]

    def version(self, plugin_type: str) -> list[str]:
        """The plugin's supportedVersions (asked once, then remembered)."""
        path = self.find(plugin_type)
        if path not in self._versions:
            reply = self._run(path, {"CNI_COMMAND": "VERSION"}, {"cniVersion": spec.LATEST}, plugin_type, "VERSION")
            offered = (reply or {}).get("supportedVersions")
            if not isinstance(offered, list):
                raise PluginFailed(plugin_type, "VERSION", None, "VERSION reply has no supportedVersions")
            self._versions[path] = [v for v in offered if isinstance(v, str)]
        return self._versions[path]

    def find(self, plugin_type: str) -> str:
        if "/" in plugin_type or plugin_type in ("", ".", ".."):
            raise PluginNotFound(f"invalid plugin type {plugin_type!r}")
        for d in self.bin_dirs:
            candidate = os.path.join(d, plugin_type)
            if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
                return candidate
        raise PluginNotFound(f"failed to find plugin {plugin_type!r} in {':'.join(self.bin_dirs)}")

    # ------------------------------------------------------------------------------------------ cache

    def cached_result(self, netconf: dict[str, Any], att: Attachment) -> dict[str, Any] | None:
        try:
            with open(os.path.join(self.cache_dir, self._cache_name(netconf, att)), encoding="utf-8") as f:
                return json.load(f)["result"]
        except FileNotFoundError:
            return None

    def _store(self, netconf: dict[str, Any], att: Attachment, result: dict[str, Any]) -> None:
        os.makedirs(self.cache_dir, exist_ok=True)
        entry = {
            "kind": "cniCacheV1",
            "containerId": att.container_id,
            "ifName": att.ifname,
            "networkName": netconf["name"],
            "cniArgs": att.args,
            "result": result,
        }
        path = os.path.join(self.cache_dir, self._cache_name(netconf, att))
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            json.dump(entry, f)
        os.rename(path + ".tmp", path)

    def _forget(self, netconf: dict[str, Any], att: Attachment) -> None:
        try:
            os.unlink(os.path.join(self.cache_dir, self._cache_name(netconf, att)))
        except FileNotFoundError:
            pass

    def _cached_names(self, netconf: dict[str, Any]) -> list[str]:
        prefix = f"{netconf['name']}-"
        try:
            return [n for n in os.listdir(self.cache_dir) if n.startswith(prefix) and not n.endswith(".tmp")]
        except FileNotFoundError:
            return []

    @staticmethod
    def _cache_name(netconf: dict[str, Any], att: Attachment) -> str:
        return f"{netconf['name']}-{att.container_id}-{att.ifname}"

    # ------------------------------------------------------------------------------------------- exec

    def _plugins(self, netconf: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
        """Accept a conflist or a single network config (a list of one plugin)."""
        version = netconf.get("cniVersion")
        name = netconf.get("name")
        if not isinstance(version, str) or not isinstance(name, str) or not name:
            raise RuntimeConfigError("network config needs string cniVersion and name")
        if "plugins" in netconf:
            plugins = netconf["plugins"]
            if not isinstance(plugins, list) or not plugins or not all(isinstance(p, dict) for p in plugins):
                raise RuntimeConfigError("plugins must be a non-empty list of objects")
        else:
            plugins = [netconf]
        for p in plugins:
            if not isinstance(p.get("type"), str):
                raise RuntimeConfigError("every plugin needs a string type")
        return version, plugins

    def _exec(
        self,
        netconf: dict[str, Any],
        plugin: dict[str, Any],
        command: str,
        version: str,
        att: Attachment | None,
        prev: dict[str, Any] | None,
        extra: dict[str, Any] | None = None,
    ) -> dict[str, Any] | None:
        ptype = plugin["type"]
        run_version = self._version_for(ptype, version)
        minimum = {"CHECK": "0.4.0", "STATUS": "1.1.0", "GC": "1.1.0"}.get(command)
        if minimum and not spec.at_least(run_version, minimum):
            return None  # the plugin's newest version predates this verb: it has nothing to do
        conf = {k: v for k, v in plugin.items() if k not in ("cniVersion", "name", "prevResult")}
        conf["cniVersion"] = run_version
        conf["name"] = netconf["name"]
        if prev is not None:
            conf["prevResult"] = spec.convert_result(prev, run_version, "prevResult")
        if extra:
            conf.update(extra)
        env = {"CNI_COMMAND": command, "CNI_PATH": ":".join(self.bin_dirs)}
        if att is not None:
            env.update(
                CNI_CONTAINERID=att.container_id, CNI_NETNS=att.netns, CNI_IFNAME=att.ifname, CNI_ARGS=att.cni_args()
            )
        out = self._run(self.find(ptype), env, conf, ptype, command)
        if command != "ADD" or out is None:
            return None
        return spec.convert_result(out, version, f"{ptype} result")

    def _version_for(self, ptype: str, version: str) -> str:
        offered = self.version(ptype)
        if version in offered:
            return version
        chosen = spec.highest_common(version, offered)
        if chosen is None:
            raise PluginFailed(ptype, "VERSION", spec.ERR_INCOMPATIBLE_VERSION, f"no common version with {version}")
        return chosen

    def _run(
        self, path: str, env: dict[str, str], conf: dict[str, Any], ptype: str, command: str
    ) -> dict[str, Any] | None:
        full_env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), **env}
        try:
            proc = subprocess.run(
                [*self.exec_prefix, path],
                input=json.dumps(conf).encode(),
                env=full_env,
                capture_output=True,
                timeout=self.timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise PluginFailed(ptype, command, None, f"no answer within {self.timeout:g}s") from None
        stdout = proc.stdout.decode(errors="replace").strip()
        stderr = proc.stderr.decode(errors="replace")
        parsed: Any = None
        if stdout:
            try:
                parsed = json.loads(stdout)
            except ValueError:
                raise PluginFailed(ptype, command, None, f"non-JSON output: {stdout[:200]!r}", stderr=stderr) from None
        if proc.returncode != 0:
            if isinstance(parsed, dict) and "code" in parsed:
                raise PluginFailed(
                    ptype, command, parsed.get("code"), str(parsed.get("msg", "")), str(parsed.get("details", "")), stderr
                )
            raise PluginFailed(ptype, command, None, f"exit status {proc.returncode}", stderr=stderr)
        return parsed if isinstance(parsed, dict) else None
