"""`meshcni proxy-exec -- CMD ...`: the sidecar's launcher that fetches the agent-held listeners and execs the proxy.

Errors (no agent socket, refused, bad answer, command not found) print one line on stderr and exit 1, so a
container runtime restarts the sidecar and its log says why. Run directly as `python -m meshcni.cli.proxy`
when the `meshcni` script is not on PATH (the upgrade flows do that, with the interpreter they run under).
"""

from __future__ import annotations

import sys

import click

from meshcni.handoff import proxy_exec as core
from meshcni.handoff.errors import HandoffError


@click.command("proxy-exec", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--socket", "socket_path", required=True, type=click.Path(dir_okay=False),
              help="The pod's handoff socket served by the meshcni agent.")
@click.option("--env-only", is_flag=True,
              help="Leave the descriptors where they arrive and set only MESHCNI_FD_<NAME> (no LISTEN_FDS).")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def proxy_exec(socket_path: str, env_only: bool, command: tuple[str, ...]) -> None:
    """Fetch the pod's listeners and exec COMMAND with them (fd 3.., LISTEN_FDS, MESHCNI_FD_*)."""
    try:
        handoff = core.fetch(socket_path)
        core.exec_proxy(handoff, command, env_only=env_only)
    except HandoffError as exc:
        click.echo(f"meshcni proxy-exec: {exc}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    proxy_exec(prog_name="meshcni proxy-exec")
