"""Probe the kernel and load the eBPF datapath in a short-lived child, so the agent never maps LLVM.

bcc compiles with an in-process clang/LLVM that stays mapped for the life of the process (well over
100 MB of RSS), and the preflight's header probe compiles with bcc too. The agent only needs the
results, so it runs `python -m meshcni.datapath.load_child`, which probes (`meshcni doctor`'s probes,
with the agent's masks), plans capture per direction, loads and pins the datapath when the plan uses
eBPF for any direction, and prints one JSON line:
{"ok": bool, "features": {id: ok}, "plan": CapturePlan.to_dict(), "loaded": bool,
 "error": msg, "errno": n, "kind": "FeatureMissing"|"BpfError"|...}; the agent re-raises a load
failure as the same domain error with the same message.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from meshcni.sys.errors import BpfError, FeatureMissing, SysError

TIMEOUT = 300.0


def probe_and_load(pin_dir: str, cgroup: str | None, masked: tuple[str, ...] = ()) -> dict:
    """Run the child; returns its reply (features, plan, loaded) — the load error, if any, inside it."""
    argv = [sys.executable, "-m", "meshcni.datapath.load_child", "--pin-dir", str(pin_dir)]
    if cgroup:
        argv += ["--cgroup", str(cgroup)]
    for feature in masked:
        argv += ["--mask", feature]
    try:
        cp = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        raise BpfError(f"probing and loading the datapath took longer than {TIMEOUT:g}s") from None
    try:
        return json.loads(cp.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise BpfError(f"the datapath loader exited with {cp.returncode}: {cp.stderr.strip()[-800:]}") from None


def load_error(reply: dict) -> SysError:
    kind = {"FeatureMissing": FeatureMissing}.get(reply.get("kind"), BpfError)
    return kind(reply.get("error", "unknown error"), reply.get("errno"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pin-dir", required=True)
    ap.add_argument("--cgroup", default=None)
    ap.add_argument("--mask", action="append", default=[])
    args = ap.parse_args()
    from meshcni import preflight
    from meshcni.config import Mode

    try:
        report = preflight.probe(args.mask)
    except preflight.PreflightError as exc:
        print(json.dumps({"ok": False, "error": str(exc), "kind": "PreflightError"}))
        return 1
    plan = preflight.plan(report)
    reply = {"ok": True, "features": {r.feature: r.ok for r in report.results}, "plan": plan.to_dict(),
             "loaded": False}
    if Mode.EBPF in (plan.outbound, plan.inbound):
        from meshcni.datapath.ebpf import EbpfDatapath

        try:
            EbpfDatapath.load(args.pin_dir, cgroup=args.cgroup).close()
            reply["loaded"] = True
        except SysError as exc:
            reply.update(ok=False, error=str(exc), errno=getattr(exc, "errno", None), kind=type(exc).__name__)
    print(json.dumps(reply))
    return 0 if reply["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
