"""`meshcni install-cni`: the DaemonSet install container's entrypoint, also usable by hand on a plain host.

It installs the plugin, chains `{"type": "meshcni"}` last in the primary CNI config and, with --watch (the
default), keeps it there until SIGTERM/SIGINT, then uninstalls. `--uninstall` only removes. Every flag also
reads a MESHCNI_* environment variable, which is how a DaemonSet sets them. Logs are logfmt lines on stderr;
stdout stays empty. Exit codes: 0 done, 1 install/uninstall failed (message on stderr), 2 bad usage.
"""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path

import click

from meshcni.install.errors import InstallError
from meshcni.install.installer import FAILURE_POLICIES, PLUGIN_LOG_LEVELS, WATCH_MODES, InstallOptions, Installer
from meshcni.install.log import configure_stderr

EXIT_FAILED = 1


def _dir_path() -> click.Path:
    return click.Path(file_okay=False, path_type=Path)


@click.command("install-cni")
@click.option("--conf-dir", type=_dir_path(), default=Path("/etc/cni/net.d"), show_default=True,
              envvar="MESHCNI_CONF_DIR", help="CNI network config dir holding the primary CNI's config.")
@click.option("--bin-dir", type=_dir_path(), default=Path("/opt/cni/bin"), show_default=True,
              envvar="MESHCNI_BIN_DIR", help="CNI plugin dir; the plugin is installed as <bin-dir>/meshcni.")
@click.option("--conf-name", default=None, envvar="MESHCNI_CONF_NAME",
              help="File name of the primary config (default: the lexically first valid one).")
@click.option("--plugin-source", type=click.Path(path_type=Path), default=None, envvar="MESHCNI_PLUGIN_SOURCE",
              help="Plugin to install: an executable, or a one-dir bundle holding an executable 'meshcni'.")
@click.option("--state-dir", type=_dir_path(), default=Path("/var/lib/meshcni/install"), show_default=True,
              envvar="MESHCNI_STATE_DIR", help="Where the install record and the original config bytes are kept.")
@click.option("--agent-socket", default="/var/run/meshcni/cni.sock", show_default=True,
              envvar="MESHCNI_AGENT_SOCKET", help="Agent socket the plugin talks to (written into our entry).")
@click.option("--failure-policy", type=click.Choice(FAILURE_POLICIES), default="closed", show_default=True,
              envvar="MESHCNI_FAILURE_POLICY",
              help="What the plugin does when the agent is down: fail the pod ADD (closed), let the pod start "
                   "uncaptured (open), or capture it with in-pod iptables rules (iptables).")
@click.option("--plugin-log-level", type=click.Choice(PLUGIN_LOG_LEVELS), default="info", show_default=True,
              envvar="MESHCNI_PLUGIN_LOG_LEVEL", help="logLevel written into our entry for the plugin.")
@click.option("--watch/--no-watch", default=True, show_default=True, envvar="MESHCNI_WATCH",
              help="Keep re-inserting the entry until SIGTERM/SIGINT (then uninstall), or install once and exit.")
@click.option("--watch-mode", type=click.Choice(WATCH_MODES), default="auto", show_default=True,
              envvar="MESHCNI_WATCH_MODE", help="inotify, polling, or inotify falling back to polling.")
@click.option("--uninstall", is_flag=True, help="Remove our entry, then our plugin files, and exit.")
@click.option("-v", "--verbose", is_flag=True, help="Debug logs.")
def install_cni(conf_dir: Path, bin_dir: Path, conf_name: str | None, plugin_source: Path | None,
                state_dir: Path, agent_socket: str, failure_policy: str, plugin_log_level: str, watch: bool,
                watch_mode: str, uninstall: bool, verbose: bool) -> None:
    """Install the meshcni CNI plugin and chain it after the primary CNI."""
    configure_stderr(logging.DEBUG if verbose else logging.INFO)
    if not uninstall and plugin_source is None:
        raise click.UsageError("--plugin-source is required (or set MESHCNI_PLUGIN_SOURCE)")
    try:
        options = InstallOptions(conf_dir=conf_dir.absolute(), bin_dir=bin_dir.absolute(),
                                 state_dir=state_dir.absolute(), conf_name=conf_name,
                                 plugin_source=plugin_source.absolute() if plugin_source else None,
                                 agent_socket=agent_socket, failure_policy=failure_policy,
                                 plugin_log_level=plugin_log_level, watch_mode=watch_mode)
    except InstallError as exc:
        raise click.UsageError(str(exc)) from None
    try:
        installer = Installer(options)
        if uninstall:
            installer.uninstall()
            return
        if watch:
            _stop_on_signals(installer)
        installer.run(watch=watch)
    except InstallError as exc:
        click.echo(f"meshcni install-cni: error: {exc}", err=True)
        sys.exit(EXIT_FAILED)
    except OSError as exc:
        click.echo(f"meshcni install-cni: error: {exc}", err=True)
        sys.exit(EXIT_FAILED)


def _stop_on_signals(installer: Installer) -> None:
    def handle(signum: int, _frame: object) -> None:
        installer.stop()  # only sets a flag and writes a byte: safe in a signal handler

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)


if __name__ == "__main__":
    install_cni()
