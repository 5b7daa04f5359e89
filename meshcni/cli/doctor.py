"""`meshcni doctor`: probe this node's kernel for every feature meshcni uses and print the capture plan.

The command gathers one dict (features, plan, verdict) and renders it as a table with a remedy under each
failure, or as JSON with `-o json`. It also lists every program on the cgroup hooks meshcni uses, in the
order the kernel runs them for sockets of `--cgroup`, and the sk_lookup programs of each `--netns`, meshcni's
own marked (`meshcni.datapath.hooks`): another BPF user's connect program that runs first decides what
meshcni captures, and another sk_lookup program that assigns first takes the pod's inbound connections. That
list informs; it never changes the verdict. The exit code is the verdict, for scripts and readiness checks:
0 = full eBPF capture, 1 = degraded (some direction falls back to iptables, or no splicing), 2 = nothing can
capture, 3 = the doctor itself could not run (an unknown feature to mask). In JSON mode even that error is a
JSON object on stdout; in table mode it is one line on stderr.
"""

from __future__ import annotations

import json
import sys

import click

from meshcni import preflight
from meshcni.datapath import hooks
from meshcni.datapath.ebpf import DEFAULT_PIN_DIR
from meshcni.preflight.features import FEATURE_IDS
from meshcni.sys import cgroup as cgroups
from meshcni.sys.errors import SysError

EXIT_USAGE = 3
VERDICTS = {0: "full eBPF capture", 1: "degraded", 2: "nothing can capture"}


def gather(masked: tuple[str, ...], cgroup: str | None = None, pin_dir: str = DEFAULT_PIN_DIR,
           netns: tuple[str, ...] = ()) -> dict:
    report = preflight.probe(masked)
    plan = preflight.plan(report)
    return {**report.to_dict(), "plan": plan.to_dict(), "hooks": hook_programs(cgroup, pin_dir),
            "netns_hooks": [netns_programs(path, pin_dir) for path in netns],
            "exit_code": plan.exit_code, "verdict": VERDICTS[plan.exit_code]}


def hook_programs(cgroup: str | None, pin_dir: str) -> dict:
    """The programs on meshcni's cgroup hooks for sockets of `cgroup` (the hierarchy's root by default, where
    the agent attaches), or why they could not be listed (no cgroup v2, no BPF)."""
    try:
        path = str(cgroup or cgroups.unified_root())
        programs = hooks.on_cgroup(path, pin_dir)
    except SysError as exc:
        return {"cgroup": cgroup, "pin_dir": pin_dir, "programs": [], "ahead_of_meshcni": {}, "error": str(exc)}
    return {"cgroup": path, "pin_dir": pin_dir, **_listing(programs)}


def netns_programs(netns: str, pin_dir: str) -> dict:
    """The sk_lookup programs of a pod's network namespace, or why they could not be listed."""
    try:
        programs = hooks.on_netns(netns, pin_dir)
    except SysError as exc:
        return {"netns": netns, "programs": [], "ahead_of_meshcni": {}, "error": str(exc)}
    return {"netns": netns, **_listing(programs)}


def _listing(programs: list[hooks.HookProgram]) -> dict:
    ahead = hooks.ahead_of_meshcni(programs)
    return {"programs": [p.to_dict() for p in programs],
            "ahead_of_meshcni": {hook: [p.prog_id for p in progs] for hook, progs in ahead.items()}}


def render_table(data: dict) -> str:
    width = max(len(f) for f in FEATURE_IDS)
    lines = [f"kernel {data['kernel']}", "", f"{'FEATURE':<{width}}  STATUS  DETAIL"]
    for f in data["features"]:
        status = "ok" if f["ok"] else "FAILED"
        lines.append(f"{f['feature']:<{width}}  {status:<6}  {f['detail']}")
        if not f["ok"]:
            lines.append(f"{'':<{width}}          remedy: {f['remedy']}")
    p = data["plan"]
    lines += ["", f"plan: outbound {p['outbound']}, inbound {p['inbound']}, "
                  f"splice {'available' if p['splice'] else 'unavailable'}"]
    lines += [f"  degraded: {reason}" for reason in p["degraded"]]
    lines += ["", *render_hooks(data["hooks"])]
    for ns in data["netns_hooks"]:
        lines += render_netns_hooks(ns)
    lines.append(f"verdict: {data['verdict']} (exit {data['exit_code']})")
    return "\n".join(lines)


_AHEAD = {
    "connect4": "a destination they rewrite (a socket load balancer's service address to a backend) is what "
                "meshcni captures and the proxy is told",
    "sk_lookup": "a socket they assign takes the pod's inbound connection before meshcni can steer it to the proxy",
}
_AHEAD["connect6"] = _AHEAD["connect4"]


def _row(name: str, progs: list[dict]) -> str:
    shown = ", ".join(f"{p['position']}. {p['name']} (id {p['prog_id']}{', meshcni' if p['ours'] else ''})"
                      for p in progs) or "none"
    return f"  {name:<10}  {shown}"


def _notes(h: dict) -> list[str]:
    return [f"  note: {len(ids)} other program(s) run before meshcni's {hook}: {_AHEAD[hook]}"
            for hook, ids in h["ahead_of_meshcni"].items()]


def render_hooks(h: dict) -> list[str]:
    if h.get("error"):
        return [f"programs on meshcni's cgroup hooks: not listed ({h['error']})"]
    lines = [f"programs on meshcni's cgroup hooks for {h['cgroup']}, in run order:"]
    for hook in hooks.CGROUP_HOOKS:
        lines.append(_row(hook.name, [p for p in h["programs"] if p["hook"] == hook.name]))
    return lines + _notes(h)


def render_netns_hooks(h: dict) -> list[str]:
    if h.get("error"):
        return [f"sk_lookup programs of {h['netns']}: not listed ({h['error']})"]
    return [f"sk_lookup programs of {h['netns']}, in run order:", _row("sk_lookup", h["programs"]), *_notes(h)]


@click.command("doctor")
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table", show_default=True)
@click.option("--mask", "masks", multiple=True, metavar="FEATURE",
              help="Treat FEATURE as missing without probing it (repeatable or comma-separated; also "
                   f"${preflight.MASK_ENV}). Features: {', '.join(FEATURE_IDS)}.")
@click.option("--cgroup", default=None, metavar="DIR",
              help="List the hook programs sockets of this cgroup v2 directory run (a pod's, say) "
                   "[the hierarchy's root, where the agent attaches].")
@click.option("--netns", "netns", multiple=True, metavar="PATH",
              help="Also list the sk_lookup programs of this network namespace (a pod's; repeatable).")
@click.option("--pin-dir", default=DEFAULT_PIN_DIR, show_default=True,
              help="The agent's bpffs directory, to tell meshcni's programs from others.")
def doctor(output: str, masks: tuple[str, ...], cgroup: str | None, netns: tuple[str, ...], pin_dir: str) -> None:
    """Probe the kernel (BPF, cgroup v2, sockops, sk_msg, sk_lookup, BTF, bcc, iptables), print the plan and
    the programs on meshcni's hooks (its cgroup's, and each --netns's sk_lookup)."""
    try:
        data = gather(masks, cgroup, pin_dir, netns)
    except preflight.PreflightError as exc:
        if output == "json":
            click.echo(json.dumps({"error": str(exc), "exit_code": EXIT_USAGE}))
        else:
            click.echo(f"meshcni doctor: {exc}", err=True)
        sys.exit(EXIT_USAGE)
    click.echo(json.dumps(data, indent=2) if output == "json" else render_table(data))
    sys.exit(data["exit_code"])
