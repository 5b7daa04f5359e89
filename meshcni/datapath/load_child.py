"""Load the eBPF datapath in a short-lived child process, so the long-lived agent never maps LLVM.

bcc compiles with an in-process clang/LLVM that stays mapped for the life of the process (well over
100 MB of RSS). The agent only needs the pinned result, so it runs `python -m meshcni.datapath.load_child`
and then opens the datapath from its pins. The child prints one JSON line: {"ok": true} or
{"ok": false, "error": msg, "errno": n, "kind": "FeatureMissing"|"BpfError"|...}, so the agent can
re-raise the same domain error with the same message.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from meshcni.sys.errors import BpfError, FeatureMissing, SysError

TIMEOUT = 300.0


def load_in_child(pin_dir: str, cgroup: str | None) -> None:
    """Run the loader in a child; raises the child's domain error on failure."""
    argv = [sys.executable, "-m", "meshcni.datapath.load_child", "--pin-dir", str(pin_dir)]
    if cgroup:
        argv += ["--cgroup", str(cgroup)]
    try:
        cp = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        raise BpfError(f"loading the datapath took longer than {TIMEOUT:g}s") from None
    try:
        reply = json.loads(cp.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise BpfError(f"the datapath loader exited with {cp.returncode}: {cp.stderr.strip()[-800:]}") from None
    if reply.get("ok"):
        return
    kind = {"FeatureMissing": FeatureMissing}.get(reply.get("kind"), BpfError)
    raise kind(reply.get("error", "unknown error"), reply.get("errno"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pin-dir", required=True)
    ap.add_argument("--cgroup", default=None)
    args = ap.parse_args()
    from meshcni.datapath.ebpf import EbpfDatapath

    try:
        EbpfDatapath.load(args.pin_dir, cgroup=args.cgroup).close()
    except SysError as exc:
        print(json.dumps({"ok": False, "error": str(exc), "errno": getattr(exc, "errno", None),
                          "kind": type(exc).__name__}))
        return 1
    print(json.dumps({"ok": True}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
