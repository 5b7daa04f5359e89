"""`meshcni doctor`: probe this node's kernel for every feature meshcni uses and print the capture plan.

The command gathers one dict (features, plan, verdict) and renders it as a table with a remedy under each
failure, or as JSON with `-o json`. The exit code is the verdict, for scripts and readiness checks:
0 = full eBPF capture, 1 = degraded (some direction falls back to iptables, or no splicing), 2 = nothing can
capture, 3 = the doctor itself could not run (an unknown feature to mask). In JSON mode even that error is a
JSON object on stdout; in table mode it is one line on stderr.
"""

from __future__ import annotations

import json
import sys

import click

from meshcni import preflight
from meshcni.preflight.features import FEATURE_IDS

EXIT_USAGE = 3
VERDICTS = {0: "full eBPF capture", 1: "degraded", 2: "nothing can capture"}


def gather(masked: tuple[str, ...]) -> dict:
    report = preflight.probe(masked)
    plan = preflight.plan(report)
    return {**report.to_dict(), "plan": plan.to_dict(), "exit_code": plan.exit_code,
            "verdict": VERDICTS[plan.exit_code]}


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
    lines.append(f"verdict: {data['verdict']} (exit {data['exit_code']})")
    return "\n".join(lines)


@click.command("doctor")
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table", show_default=True)
@click.option("--mask", "masks", multiple=True, metavar="FEATURE",
              help="Treat FEATURE as missing without probing it (repeatable or comma-separated; also "
                   f"${preflight.MASK_ENV}). Features: {', '.join(FEATURE_IDS)}.")
def doctor(output: str, masks: tuple[str, ...]) -> None:
    """Probe the kernel (BPF, cgroup v2, sockops, sk_msg, sk_lookup, BTF, bcc, iptables) and print the plan."""
    try:
        data = gather(masks)
    except preflight.PreflightError as exc:
        if output == "json":
            click.echo(json.dumps({"error": str(exc), "exit_code": EXIT_USAGE}))
        else:
            click.echo(f"meshcni doctor: {exc}", err=True)
        sys.exit(EXIT_USAGE)
    click.echo(json.dumps(data, indent=2) if output == "json" else render_table(data))
    sys.exit(data["exit_code"])
