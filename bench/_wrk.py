"""One wrk run inside a lab pod, and its result as numbers rather than wrk's human-readable text.

wrk runs in the source pod's network namespace, inside the lab's cgroup (so the eBPF datapath, attached to
that cgroup, sees its connects) and as the app uid `nobody` — never 1337, which every capture mode
deliberately leaves alone as the proxy's own identity. A small Lua `done()` hook prints one JSON line with
the request count, the error counts and latency percentiles straight from wrk's HdrHistogram-like
statistics (microseconds), so nothing is scraped from the table wrk prints for humans. The Lua hook only
runs once at the end; no per-request Lua callback is installed, because wrk then takes a slower path.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from meshcni.lab import pod as podproc
from meshcni.lab.state import LabState, PodState
from meshcni.sys import proc

WRK_BIN = "wrk"
JSON_MARKER = "MESHCNI_WRK_JSON "
PERCENTILES = (50, 90, 99, 99.9)

# wrk calls done(summary, latency, requests) once, after all threads finished; latency values are in µs.
DONE_LUA = f"""
done = function(summary, latency, requests)
  local e = summary.errors
  local pct = {{}}
  for _, p in ipairs({{{", ".join(str(p) for p in PERCENTILES)}}}) do
    pct[#pct + 1] = string.format('"%s": %d', tostring(p), latency:percentile(p))
  end
  io.write(string.format(
    '{JSON_MARKER}{{"requests": %d, "duration_us": %d, "bytes": %d, ' ..
    '"errors": {{"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}}, ' ..
    '"latency_us": {{"min": %d, "mean": %.1f, "max": %d, "stdev": %.1f, "percentiles": {{%s}}}}}}\\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.min, latency.mean, latency.max, latency.stdev, table.concat(pct, ", ")))
end
"""


class WrkError(RuntimeError):
    """wrk could not run, or its output made no sense."""


@dataclass(frozen=True)
class WrkSpec:
    url: str
    duration_s: int  # wrk takes whole seconds (its time units are s, m and h)
    connections: int
    threads: int
    close_each: bool  # send "Connection: close": one TCP connection per request
    timeout_s: int = 2


@dataclass(frozen=True)
class WrkResult:
    requests: int
    duration_s: float
    bytes: int
    errors: dict[str, int]
    latency_us: dict  # min, mean, max, stdev and "percentiles" {"50": µs, ...}

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s > 0 else 0.0

    def percentile_ms(self, p: float) -> float:
        return self.latency_us["percentiles"][str(p)] / 1000.0

    @property
    def error_total(self) -> int:
        return sum(self.errors.values())

    def to_dict(self) -> dict:
        d = asdict(self)
        d["rps"] = round(self.rps, 1)
        return d


def find_wrk() -> str:
    path = shutil.which(WRK_BIN)
    if path is None:
        raise WrkError("wrk is not installed (Debian package wrk; scripts/setup.sh installs it)")
    return path


class LuaScript:
    """The done() hook as a file wrk (running as nobody) can read; removed on close."""

    def __init__(self) -> None:
        fd, path = tempfile.mkstemp(prefix="meshcni-wrk-", suffix=".lua")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(DONE_LUA)
        os.chmod(path, 0o644)
        self.path = Path(path)

    def close(self) -> None:
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> "LuaScript":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def argv(wrk: str, spec: WrkSpec, script: Path) -> list[str]:
    args = [
        wrk,
        "-t", str(spec.threads),
        "-c", str(spec.connections),
        "-d", f"{int(spec.duration_s)}s",
        "--timeout", f"{int(spec.timeout_s)}s",
        "-s", str(script),
    ]
    if spec.close_each:
        args += ["-H", "Connection: close"]
    return args + [spec.url]


def parse(stdout: str) -> WrkResult:
    for line in stdout.splitlines():
        if line.startswith(JSON_MARKER):
            try:
                d = json.loads(line[len(JSON_MARKER):])
            except ValueError as exc:
                raise WrkError(f"wrk's done() printed malformed JSON: {line!r}") from exc
            return WrkResult(
                requests=int(d["requests"]),
                duration_s=int(d["duration_us"]) / 1e6,
                bytes=int(d["bytes"]),
                errors={k: int(v) for k, v in d["errors"].items()},
                latency_us=d["latency_us"],
            )
    raise WrkError(f"wrk printed no result line: {stdout[-500:]!r}")


def run(state: LabState, src: PodState, spec: WrkSpec, script: Path, wrk: str) -> WrkResult:
    """Run wrk in `src` (its netns, the lab cgroup, uid nobody) and return its numbers."""
    if spec.connections < spec.threads:
        raise WrkError(f"wrk needs at least as many connections ({spec.connections}) as threads ({spec.threads})")
    cp = proc.run(
        argv(wrk, spec, script),
        netns=src.netns,
        cgroup=state.cgroup,
        uid=podproc.APP_UID,
        gid=podproc.APP_GID,
        cwd="/",
        timeout=spec.duration_s + spec.timeout_s + 30,
    )
    out = cp.stdout.decode(errors="replace")
    if cp.returncode != 0:
        err = cp.stderr.decode(errors="replace").strip()
        raise WrkError(f"wrk against {spec.url} exited with {cp.returncode}: {err[-500:] or out[-500:]}")
    return parse(out)
