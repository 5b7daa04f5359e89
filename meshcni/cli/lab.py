"""`meshcni lab up|down|status|demo`: the lab's command line.

Commands gather plain dicts and hand them to one renderer (`_emit`), which prints either a short human view
or JSON (`-o json`). In JSON mode even an error is a JSON object on stdout with a non-zero exit, so scripts
never have to parse prose; in human mode an error is one line on stderr, never a traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable

import click

from meshcni.lab import demo as lab_demo
from meshcni.lab import lab as lab_core
from meshcni.lab.state import LabError
from meshcni.sys.errors import SysError

_OUTPUT = click.option("-o", "--output", type=click.Choice(["human", "json"]), default="human", show_default=True)
_NAME = click.option("--name", default="lab", show_default=True, help="Lab name (a-z, 0-9, '-').")
_STATE_DIR = click.option(
    "--state-dir", type=click.Path(path_type=Path), default=None, help="State directory [/var/run/meshcni/lab/<name>]."
)


def _up_options(f: Callable) -> Callable:
    options = [
        click.option("--pods", type=int, default=2, show_default=True, help="Number of pods."),
        click.option(
            "--capture/--no-capture", default=True, show_default=True, help="Capture pod traffic with the eBPF datapath."
        ),
        click.option(
            "--agent/--no-agent", default=True, show_default=True,
            help="Enrol pods through the lab's own agent and the meshcni CNI plugin (else straight into the datapath).",
        ),
        click.option("--mode", "agent_mode", type=click.Choice(["ebpf", "iptables", "off"]), default="ebpf",
                     show_default=True, help="The lab agent's node mode."),
        click.option("--hold-listeners/--no-hold-listeners", default=False, show_default=True,
                     help="The agent creates and holds each sidecar's listeners and HAProxy fetches them with "
                          "`meshcni proxy-exec` (what `meshcni proxy upgrade` needs)."),
        click.option(
            "--proxy-http-ports",
            default="80,8080",
            show_default=True,
            help="Destination ports the captured listeners handle as HTTP (others stay byte-exact TCP); '' for none.",
        ),
        click.option(
            "--cni-path", default="/usr/lib/cni", show_default=True, help="Colon-separated CNI plugin directories."
        ),
        click.option(
            "--chain-plugin",
            "chain_plugins",
            multiple=True,
            help="Plugin appended to the chain: a type (e.g. meshcni) or a JSON object. Repeatable.",
        ),
        click.option("--ready-timeout", type=float, default=15.0, show_default=True, help="Seconds a process may take to listen."),
    ]
    for opt in reversed(options):
        f = opt(f)
    return f


def _options(name, state_dir, pods, capture, agent, agent_mode, hold_listeners, proxy_http_ports, cni_path,
             chain_plugins, ready_timeout):
    return lab_core.LabOptions(
        name=name,
        pods=pods,
        state_dir=state_dir,
        capture=capture,
        agent=agent,
        agent_mode=agent_mode,
        hold_listeners=hold_listeners,
        proxy_http_ports=_ports(proxy_http_ports),
        cni_path=tuple(p for p in cni_path.split(":") if p),
        chain_plugins=tuple(_plugin(p) for p in chain_plugins),
        ready_timeout=ready_timeout,
    )


def _ports(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise LabError(f"--proxy-http-ports: {text!r} is not a comma-separated list of ports") from None


def _plugin(text: str) -> dict:
    text = text.strip()
    if not text.startswith("{"):
        return {"type": text}
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise LabError(f"--chain-plugin: not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise LabError("--chain-plugin: the JSON must be an object")
    return value


def _guarded(output: str, action: Callable[[], dict], render: Callable[[dict], str]) -> None:
    """Run `action`; print its result through `render` (or JSON); turn domain errors into a clean exit 1."""
    try:
        data = action()
    except (LabError, SysError) as exc:
        if output == "json":
            click.echo(json.dumps({"error": str(exc)}))
        else:
            click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    _emit(output, data, render)
    if data.get("ok") is False:
        sys.exit(1)


def _emit(output: str, data: dict, render: Callable[[dict], str]) -> None:
    if output == "json":
        click.echo(json.dumps(data, indent=2, sort_keys=True))
    else:
        click.echo(render(data).rstrip("\n"))


@click.group()
def lab() -> None:
    """A node with pods on this machine: netns pods via the reference CNI plugins, HAProxy sidecars."""


@lab.command()
@_NAME
@_STATE_DIR
@_up_options
@_OUTPUT
def up(name, state_dir, output, **kw) -> None:
    """Create the lab's pods, start their apps and sidecars, and capture them."""

    def action() -> dict:
        state = lab_core.up(_options(name, state_dir, **kw))
        return lab_core.status(state)

    _guarded(output, action, lab_demo.render_status)


@lab.command()
@_NAME
@_STATE_DIR
@_OUTPUT
def down(name, state_dir, output) -> None:
    """Remove everything `up` created; safe to run twice or after a failed up."""
    _guarded(output, lambda: {"name": name, **lab_core.down(name, state_dir).to_dict()}, lab_demo.render_down)


@lab.command()
@_NAME
@_STATE_DIR
@_OUTPUT
def status(name, state_dir, output) -> None:
    """Show the lab's pods, their IPs and the health of their processes."""

    def action() -> dict:
        data = lab_core.status(lab_core.load(name, state_dir))
        data["ok"] = data["healthy"]
        return data

    _guarded(output, action, lab_demo.render_status)


@lab.command()
@_NAME
@_STATE_DIR
@_up_options
@click.option("--keep", is_flag=True, help="Leave the lab running afterwards.")
@_OUTPUT
def demo(name, state_dir, keep, output, **kw) -> None:
    """Bring the lab up, send HTTP between pods in both directions, print the evidence, tear down."""
    _guarded(output, lambda: lab_demo.run(_options(name, state_dir, **kw), keep=keep), lab_demo.render_demo)
