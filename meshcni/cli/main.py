"""Entry point of the `meshcni` command: the top-level click group and the registration of every sub-command.

Each part of the product owns its sub-commands in its own module; this file only wires them together so
`meshcni --help` shows the whole product in one place.
"""

from __future__ import annotations

import click

from meshcni import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="meshcni")
def main() -> None:
    """meshcni: eBPF-accelerated traffic capture for service-mesh sidecars."""


def _register() -> None:
    from meshcni.cli import agent as agent_cli
    from meshcni.cli import doctor as doctor_cli
    from meshcni.cli import install as install_cli
    from meshcni.cli import lab as lab_cli
    from meshcni.cli import node as node_cli
    from meshcni.cli import proxy as proxy_cli
    from meshcni.cli import proxy_exec as proxy_exec_cli

    for command in (agent_cli.agent, install_cli.install_cni, lab_cli.lab, proxy_exec_cli.proxy_exec, proxy_cli.proxy,
                    doctor_cli.doctor, node_cli.status, node_cli.pods, node_cli.counters, node_cli.maps, node_cli.events,
                    node_cli.mode):
        main.add_command(command)


_register()
