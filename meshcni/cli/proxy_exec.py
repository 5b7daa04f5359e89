"""`meshcni proxy-exec` (and `meshcni proxy exec`): the sidecar's launcher, on its own so that starting it
loads no more than click and the handoff code.

It is on the critical path of every hot upgrade: from the moment the agent starts the next proxy until that
proxy accepts, the held listeners only queue. The node verbs beside it in `meshcni.cli.proxy` load the gRPC
client, which would more than double this start-up for nothing. The upgrade flows and the lab start it as
`python -m meshcni.cli.proxy_exec` (`meshcni.handoff.proxy_exec.launcher_argv`), with the interpreter they
run under. Errors print one line on stderr and exit 1, so a container runtime restarts the sidecar and its
log says why.
"""

from __future__ import annotations

import sys

import click

from meshcni.handoff import proxy_exec as core
from meshcni.handoff.errors import HandoffError

CONTEXT = {"help_option_names": ["-h", "--help"]}


def exec_command(name: str) -> click.Command:
    @click.command(name, context_settings=CONTEXT)
    @click.option("--socket", "socket_path", required=True, type=click.Path(dir_okay=False),
                  help="The pod's handoff socket served by the meshcni agent.")
    @click.option("--env-only", is_flag=True,
                  help="Leave the descriptors where they arrive and set only MESHCNI_FD_<NAME> (no LISTEN_FDS).")
    @click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
    def run(socket_path: str, env_only: bool, command: tuple[str, ...]) -> None:
        """Fetch the pod's listeners and exec COMMAND with them (fd 3.., LISTEN_FDS, MESHCNI_FD_*)."""
        try:
            handoff = core.fetch(socket_path)
            core.exec_proxy(handoff, command, env_only=env_only)
        except HandoffError as exc:
            click.echo(f"meshcni proxy-exec: {exc}", err=True)
            sys.exit(1)

    return run


proxy_exec = exec_command("proxy-exec")

if __name__ == "__main__":
    proxy_exec(prog_name="meshcni proxy-exec")
