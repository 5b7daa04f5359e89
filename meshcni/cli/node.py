"""The node debugging verbs that ask the running agent: `status`, `pods list|show`, `counters`, `maps`,
`events`, `mode`.

Each verb builds a plain dict/list from the agent's gRPC API and hands it to `emit`, which prints a table
or JSON (`-o json`). JSON output is always one valid document, errors included (`{"error": {...}}`), and
the exit code says what happened: 0 ok, 1 the agent refused the request, 3 the agent is not running.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
from typing import Callable

import click

from meshcni.agent.client import DEFAULT_SOCKET, AgentCallError, AgentClient, AgentNotRunning

EXIT_REFUSED = 1
EXIT_NOT_RUNNING = 3

_OUTPUT = click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table", show_default=True)
_SOCKET = click.option("--socket", "socket_path", default=DEFAULT_SOCKET, show_default=True,
                       envvar="MESHCNI_AGENT_SOCKET", help="The agent's API socket.")


def _run(output: str, socket_path: str, call: Callable[[AgentClient], object], render: Callable[[object], str]):
    try:
        with AgentClient(socket_path) as client:
            result = call(client)
    except AgentNotRunning as exc:
        _fail(output, "agent_not_running", str(exc), EXIT_NOT_RUNNING)
    except AgentCallError as exc:
        _fail(output, exc.code.name.lower(), exc.message, EXIT_REFUSED)
    if output == "json":
        click.echo(json.dumps(result, indent=2, sort_keys=True))
    else:
        click.echo(render(result))


def _fail(output: str, kind: str, message: str, code: int):
    if output == "json":
        click.echo(json.dumps({"error": {"kind": kind, "message": message}}, indent=2))
    else:
        click.echo(f"meshcni: {message}", err=True)
    sys.exit(code)


def table(headers: list[str], rows: list[list]) -> str:
    cells = [[str(h).upper() for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


def _pod_name(p: dict) -> str:
    return f"{p['pod_namespace']}/{p['pod_name']}" if p.get("pod_name") else p["container_id"][:12]


# --- status ----------------------------------------------------------------------------------------------


@click.command("status")
@_OUTPUT
@_SOCKET
def status(output, socket_path):
    """The agent's state: datapath, node mode, enrolled pods, degraded features."""

    def render(s: dict) -> str:
        started = dt.datetime.fromtimestamp(s["started_at"]).isoformat(timespec="seconds")
        by_mode = ", ".join(f"{m} {n}" for m, n in sorted(s["pods_by_mode"].items())) or "none"
        lines = [
            f"agent        meshcni {s['version']}, running since {started}",
            f"datapath     {'loaded' if s['datapath_loaded'] else 'NOT loaded'} ({s['pin_dir']}, cgroup {s['cgroup']}, "
            f"{s['attached_programs']} attachments)",
            f"node mode    {s['node_mode']}",
            f"pods         {s['enrolled']} enrolled ({by_mode})",
            "features     " + (", ".join(f"{k} {'ok' if v else 'MISSING'}" for k, v in sorted(s["features"].items()))
                               or "not probed"),
        ]
        lines += [f"degraded     {d}" for d in s["degraded"]]
        return "\n".join(lines)

    _run(output, socket_path, lambda c: c.status(), render)


# --- pods ----------------------------------------------------------------------------------------------------


@click.group("pods")
def pods():
    """Pods enrolled on this node."""


@pods.command("list")
@_OUTPUT
@_SOCKET
def pods_list(output, socket_path):
    """Every enrolled pod with its mode and capture state."""

    def render(items: list) -> str:
        rows = [[_pod_name(p), p["container_id"][:12], p["mode"], p["mode_source"],
                 "yes" if p["captured"] else "no", p["slot"] if p["slot"] >= 0 else "-", p["listener"],
                 ",".join(p["ips"])] for p in items]
        return table(["pod", "container", "mode", "source", "captured", "slot", "listener", "ips"], rows)

    _run(output, socket_path, lambda c: c.list_pods(), render)


@pods.command("show")
@click.argument("pod")
@_OUTPUT
@_SOCKET
def pods_show(pod, output, socket_path):
    """One pod in full: identity, netns, mode, its config and counters."""

    def call(c: AgentClient) -> dict:
        p = c.get_pod(pod)
        p["counters"] = c.counters(p["container_id"])[0]["counters"]
        return p

    def render(p: dict) -> str:
        lines = [f"{k:<14}{p[k]}" for k in ("container_id", "pod_name", "pod_namespace", "pod_uid", "netns",
                                             "ifname", "mode", "mode_source", "captured", "slot", "listener")]
        lines.append(f"{'ips':<14}{', '.join(p['ips'])}")
        lines.append("config")
        lines += [f"  {k:<26}{v}" for k, v in sorted(p["config"].items())]
        lines.append("counters" + ("" if p["counters"] else "      (none: not in eBPF mode)"))
        lines += [f"  {k:<26}{v}" for k, v in sorted(p["counters"].items())]
        return "\n".join(lines)

    _run(output, socket_path, call, render)


# --- counters ------------------------------------------------------------------------------------------------


@click.command("counters")
@click.argument("pod", required=False, default="")
@_OUTPUT
@_SOCKET
def counters(pod, output, socket_path):
    """Capture counters per pod (eBPF maps summed over CPUs, or iptables rule counts), for one pod or all."""

    def render(items: list) -> str:
        names = sorted({k for p in items for k in p["counters"]})
        rows = [[_pod_name(p), p["mode"]] + [p["counters"].get(n, "-") for n in names] for p in items]
        return table(["pod", "mode"] + names, rows)

    _run(output, socket_path, lambda c: c.counters(pod), render)


# --- maps ------------------------------------------------------------------------------------------------------


@click.command("maps")
@click.argument("name", required=False, default="")
@click.option("--limit", type=click.IntRange(min=1), default=100, show_default=True,
              help="With NAME: at most this many entries.")
@_OUTPUT
@_SOCKET
def maps(name, limit, output, socket_path):
    """The datapath's pinned maps: kernel type, capacity, how full and what for; with NAME, that map's
    entries decoded (addresses as text, per-CPU counters summed)."""

    def render(d: dict) -> str:
        if name:
            lines = [json.dumps(e, sort_keys=True) for e in d["entries"]] or [f"{name}: no entries"]
            if d["truncated"]:
                lines.append(f"... more than {limit}; raise --limit to see them")
            return "\n".join(lines)
        rows = [[m["name"], m["type"] or "NOT PINNED",
                 "-" if m["entries"] is None else (f"{m['entries']} B unread" if m["type"] == "ringbuf"
                                                   else f"{m['entries']}/{m['max_entries']}"),
                 m["purpose"]] for m in d["maps"]]
        return f"pinned under {d['pin_dir']}\n" + table(["map", "type", "entries", "what for"], rows)

    _run(output, socket_path, lambda c: c.maps(name, limit), render)


# --- events ----------------------------------------------------------------------------------------------------


def render_event(e: dict) -> str:
    """One line per capture decision: time, pod, what happened, to where, and who asked."""
    when = dt.datetime.fromtimestamp(e["time_unix_ns"] / 1e9).strftime("%H:%M:%S.%f")
    pod = _pod_name(e) if e.get("container_id") else "(gone)"
    what = e["kind"] + (f" ({e['reason']})" if e.get("reason") else "")
    dst = f"[{e['dst']}]:{e['dport']}" if e["family"] == 6 else f"{e['dst']}:{e['dport']}"
    if e.get("src"):
        src = f"[{e['src']}]:{e['sport']}" if e["family"] == 6 else f"{e['src']}:{e['sport']}"
        path = f"{src} -> {dst}"
    else:
        path = f"-> {dst}"
    who = f"  pid {e['pid']} {e['comm']} uid {e['uid']}" if e.get("pid") else ""
    return f"{when}  {pod}  {what}  {path}{who}"


@click.command("events")
@click.argument("pod", required=False, default="")
@click.option("--count", type=click.IntRange(min=1), help="Stop after this many events.")
@click.option("--duration", type=click.FloatRange(min=0, min_open=True), help="Stop after this many seconds.")
@_OUTPUT
@_SOCKET
def events(pod, count, duration, output, socket_path):
    """Live capture decisions of the eBPF datapath, for one pod or all: each outbound connect() captured or
    bypassed (and why), each inbound SYN (or stray segment that found no socket) steered, bypassed or without a
    listener. `-o json` prints one JSON object per line. Runs until Ctrl-C, --count or --duration; the kernel
    writes events only while watched."""
    seen = 0
    try:
        with AgentClient(socket_path) as client:
            for event in client.watch_events(pod, duration=duration):
                click.echo(json.dumps(event, sort_keys=True) if output == "json" else render_event(event))
                seen += 1
                if count is not None and seen >= count:
                    break
    except AgentNotRunning as exc:
        _fail(output, "agent_not_running", str(exc), EXIT_NOT_RUNNING)
    except AgentCallError as exc:
        _fail(output, exc.code.name.lower(), exc.message, EXIT_REFUSED)
    except KeyboardInterrupt:
        pass


# --- mode ------------------------------------------------------------------------------------------------------


@click.group("mode")
def mode():
    """Switch capture between ebpf, iptables and off, live."""


@mode.command("set")
@click.argument("args", nargs=-1, required=True)
@_OUTPUT
@_SOCKET
def mode_set(args, output, socket_path):
    """`mode set [POD] ebpf|iptables|off`: one pod (an override), or the node default when POD is omitted.

    `mode set POD default` removes a pod's override so it follows its annotations and the node again.
    """
    if len(args) not in (1, 2):
        raise click.UsageError("expected `mode set [POD] ebpf|iptables|off`")
    key, new = (args[0], args[1]) if len(args) == 2 else ("", args[0])
    if new not in ("ebpf", "iptables", "off") and not (key and new == "default"):
        raise click.UsageError(f"{new!r} is not one of ebpf, iptables, off" + (", default" if key else ""))

    def render(r: dict) -> str:
        if not r["changed"]:
            return f"node mode {r['node_mode']}; no pod changed"
        rows = [[_pod_name(p), p["mode"], p["mode_source"]] for p in r["changed"]]
        return f"node mode {r['node_mode']}\n" + table(["pod", "mode", "source"], rows)

    _run(output, socket_path, lambda c: c.set_mode("" if new == "default" else new, key), render)
