"""`meshcni proxy exec|status|upgrade`: the sidecar's launcher and the hot-upgrade verbs.

`proxy exec` is `meshcni proxy-exec` (meshcni/cli/proxy_exec.py, kept in its own module so the sidecar's
start-up does not load the gRPC client these verbs need).

`status` and `upgrade` ask the node agent, like the other node verbs (`-o json`, exit 3 when the agent is
not running, 1 when it refuses): `upgrade POD [-- CMD ...]` starts the next proxy like the current one
(or with CMD) on the same sockets and drains the old one; `--kill` is the crash flow (SIGKILL, start again);
`--adopt` is for a proxy that binds its own listeners.
"""

from __future__ import annotations

import click

from meshcni.cli.node import _OUTPUT, _SOCKET, _run, table
from meshcni.cli.proxy_exec import CONTEXT as _CONTEXT
from meshcni.cli.proxy_exec import exec_command


@click.group("proxy", context_settings=_CONTEXT)
def proxy() -> None:
    """The pod's proxy: agent-held listeners, handoffs and hot upgrades."""


proxy.add_command(exec_command("exec"))


@proxy.command("status")
@click.argument("pod")
@_OUTPUT
@_SOCKET
def status(pod: str, output: str, socket_path: str) -> None:
    """Listeners the agent holds for POD, who holds them, handoffs and upgrades."""

    def render(s: dict) -> str:
        name = f"{s['pod_namespace']}/{s['pod_name']}" if s.get("pod_name") else s["container_id"][:12]
        if not s["held"]:
            return f"{name}: the proxy binds its own listeners (meshcni.io/listeners: proxy); nothing held"
        u = s["upgrades"]
        lines = [f"pod {name}", f"handoff socket  {s['socket']}",
                 f"proxy pids      {', '.join(str(p) for p in s['proxy_pids']) or '(none running)'}",
                 f"handoffs        {s['handoffs']} (generation {s['generation']}), refused {s['refused']}"
                 + (", re-acquired after an agent restart" if s["reacquired"] else ""),
                 f"upgrades        graceful {u.get('graceful', 0)}, crash restarts {u.get('crash_restarts', 0)}, "
                 f"failed {u.get('failed', 0)}; queued across handoffs {u.get('queued_connections', 0)}, "
                 f"in flight lost {u.get('in_flight_lost', 0)}", ""]
        lines.append(table(["listener", "address", "queued"],
                           [[x["name"], x["address"], x["queued"]] for x in s["listeners"]]))
        return "\n".join(lines)

    _run(output, socket_path, lambda c: c.proxy_status(pod), render)


@proxy.command("upgrade", context_settings={"ignore_unknown_options": False, **_CONTEXT})
@click.argument("pod")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@click.option("--kill", "kind", flag_value="crash", help="Crash flow: SIGKILL the proxy and start it again.")
@click.option("--adopt", "kind", flag_value="adopt",
              help="For a proxy binding its own listeners: swap the new one's listener into the SOCKMAP.")
@click.option("--graceful", "kind", flag_value="graceful", default=True, help="[default] Same sockets, old one drains.")
@click.option("--stop-signal", default="SIGUSR1", show_default=True,
              help="How the old proxy is told to stop accepting and drain (HAProxy: SIGUSR1).")
@click.option("--ready-socket", default="", help="HAProxy admin socket: ready when `show info` names the new pid.")
@click.option("--timeout", type=float, default=10.0, show_default=True, help="Seconds for the new proxy to serve.")
@_OUTPUT
@_SOCKET
def upgrade(pod, command, kind, stop_signal, ready_socket, timeout, output, socket_path) -> None:
    """Replace POD's proxy without losing a connection; COMMAND (after --) replaces its command line."""

    def render(r: dict) -> str:
        return (f"{r['kind']} upgrade of {pod}: pid {r['old_pid']} -> {r['new_pid']} in {r['seconds']:.3f}s; "
                f"old proxy {'exited' if r['old_exited'] else 'still draining'}; {r['queued']} connection(s) "
                f"queued meanwhile" + (f"; {r['in_flight_lost']} in flight died with it" if kind == "crash" else ""))

    _run(output, socket_path, lambda c: c.upgrade_proxy(pod, kind, list(command), stop_signal, ready_socket, timeout),
         render)

