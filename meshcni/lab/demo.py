"""`meshcni lab demo`: bring a lab up, send real traffic between its pods, show the evidence, tear it down.

Every exchange is judged on facts the client observed, never assumed: which pod's nginx answered (the body
names it), which proxies handled it (the `x-meshcni-proxy` headers, one per proxy hop), and for bulk
transfers the size and SHA-256 of what came back against the lab payload. With capture on, a plain request
to a pod IP must show the source pod's outbound and the destination pod's inbound proxy; without capture it
must show none. The sidecars' session totals and the datapath's counters are printed alongside. The renderers
for `up`, `status`, `down` and `demo` live here too, so the CLI has one place that turns dicts into text.
"""

from __future__ import annotations

import contextlib
import threading
import time

from meshcni.lab import haproxy, traffic
from meshcni.lab import lab as lab_core
from meshcni.lab.payload import digest, payload
from meshcni.lab.state import LAB_NAMESPACE, LabError, LabState, PodState

BULK_BYTES = 1 << 20


def run(opts: lab_core.LabOptions, keep: bool = False) -> dict:
    state = lab_core.up(opts)
    try:
        data = exercise(state)
    except BaseException:
        if not keep:
            lab_core.down(state.name, state.state_dir)
        raise
    data["kept"] = keep
    if not keep:
        data["down"] = lab_core.down(state.name, state.state_dir).to_dict()
    return data


def exercise(state: LabState) -> dict:
    """The demo's traffic and evidence on an existing lab (also what the tests call)."""
    if len(state.pods) < 2:
        raise LabError("the demo needs at least 2 pods (--pods 2)")
    a, b = state.pods[0], state.pods[1]
    # With eBPF through the agent, `meshcni events` watches the first request, and only it.
    watched = state.use_agent and state.capture and state.agent_mode == "ebpf"
    with _EventLog(state) if watched else contextlib.nullcontext() as log:
        checks = [_http(state, a, b, b.ip, 80, "/", via=_captured_path(state, a, b))]
        events = log.settle() if log else []
    if log:
        checks.append(_first_request_events(events, a, b))
    checks += [
        _http(state, b, a, a.ip, 80, "/", via=_captured_path(state, b, a)),
        _http(
            state, a, b, "127.0.0.1", haproxy.EXPLICIT_HTTP_OUT, "/", via=[f"{b.name}-explicit-in", f"{a.name}-explicit-out"]
        ),
        _bulk_get(state, a, b),
        _echo(state, a, b, b.ip, haproxy.ECHO_PORT),
    ]
    if state.hold_listeners:
        checks.append(_hot_upgrades(state, a, b))
    stats = traffic.proxy_stats(state)
    counters = traffic.capture_counters(state)
    return {
        "agent_pods": _agent_pods(state),
        "lab": lab_core.status(state),
        "capture": state.capture,
        "checks": checks,
        "proxy_stats": stats,
        "capture_counters": counters,
        "ok": all(c["ok"] for c in checks),
    }


def _agent_pods(state: LabState) -> list[dict] | None:
    """What `meshcni pods list` says: the pods the lab's agent enrolled through the CNI chain."""
    if not state.use_agent:
        return None
    from meshcni.agent.client import AgentClient
    from meshcni.lab import agent as lab_agent

    with AgentClient(str(lab_agent.paths(state)["socket"])) as client:
        return client.list_pods()


def _captured_path(state: LabState, src: PodState, dst: PodState) -> list[str]:
    # Response headers are added on the way back: the destination's inbound proxy first, then the source's
    # outbound proxy.
    return [f"{dst.name}-inbound", f"{src.name}-outbound"] if state.capture else []


def _http(state: LabState, src: PodState, dst: PodState, host: str, port: int, path: str, via: list[str]) -> dict:
    rep = traffic.request(state, src, host, port, path)
    answered = _field(rep.get("body") or "", "pod")
    proxies = traffic.proxy_headers(rep)
    problems = []
    if "error" in rep:
        problems.append(rep["error"])
    else:
        if rep["status"] != 200:
            problems.append(f"status {rep['status']}")
        if answered != dst.name:
            problems.append(f"answered by {answered!r}, expected {dst.name!r}")
        if proxies != via:
            problems.append(f"proxies {proxies or 'none'}, expected {via or 'none'}")
    return {
        "name": f"{src.name} -> {dst.name} GET http://{host}:{port}{path}",
        "from": src.name,
        "to": dst.name,
        "status": rep.get("status"),
        "answered_by": answered,
        "body": (rep.get("body") or "").strip(),
        "proxies": proxies,
        "expected_proxies": via,
        "problems": problems,
        "ok": not problems,
    }


class _EventLog:
    """`meshcni events` for the whole node while it is open: a watch through the lab's agent, read by a
    thread. Open only once the agent watches, so the decisions of a request made inside are all there; closed
    on leaving the `with` block, however it is left."""

    def __init__(self, state: LabState):
        from meshcni.agent.client import AgentClient  # grpc only for a demo with an agent
        from meshcni.lab import agent as lab_agent

        self._client = AgentClient(str(lab_agent.paths(state)["socket"]))
        self._stream = self._client.watch_events()
        self.events: list[dict] = []
        self._reader = threading.Thread(target=lambda: self.events.extend(self._stream), name="demo-events",
                                        daemon=True)
        self._reader.start()

    def settle(self) -> list[dict]:
        """The events so far, once none arrived for a moment (a decision is taken before its request returns;
        this only waits for the agent to pass it on)."""
        seen, quiet = -1, 0
        while quiet < 3:
            time.sleep(0.1)
            quiet, seen = (quiet + 1, seen) if len(self.events) == seen else (0, len(self.events))
        return list(self.events)

    def close(self) -> None:
        self._stream.cancel()
        self._reader.join(5)
        self._client.close()

    def __enter__(self) -> "_EventLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _first_request_events(events: list[dict], src: PodState, dst: PodState) -> dict:
    """What `meshcni events` showed for the first request: the app's connect captured in src, the SYN steered
    into dst's proxy, and the two sidecars' own connects bypassed as the proxy's."""
    want = [(src.name, "outbound_captured", ""), (src.name, "outbound_bypassed", "proxy"),
            (dst.name, "inbound_steered", ""), (dst.name, "outbound_bypassed", "proxy")]
    got = [(e["pod_name"], e["kind"], e["reason"]) for e in events]
    problems = [] if sorted(got) == sorted(want) else [f"decisions {got}, expected {want}"]
    captured = [e for e in events if e["kind"] == "outbound_captured"]
    if captured and (captured[0]["dst"], captured[0]["dport"]) != (dst.ip, 80):
        problems.append(f"captured to {captured[0]['dst']}:{captured[0]['dport']}, expected {dst.ip}:80")
    steered = [e for e in events if e["kind"] == "inbound_steered"]
    if steered and steered[0]["src"] != src.ip:
        problems.append(f"steered SYN from {steered[0]['src']}, expected {src.ip}")
    return {
        "name": f"meshcni events during {src.name} -> {dst.name} GET: {len(events)} capture decisions",
        "from": src.name,
        "to": dst.name,
        "events": events,
        "problems": problems,
        "ok": not problems,
    }


def _bulk_get(state: LabState, src: PodState, dst: PodState) -> dict:
    rep = traffic.request(state, src, dst.ip, 80, f"/bytes/{BULK_BYTES}")
    want = digest(payload(BULK_BYTES))
    problems = [rep["error"]] if "error" in rep else []
    if not problems and (rep["body_bytes"] != BULK_BYTES or rep["body_sha256"] != want):
        problems.append(f"got {rep['body_bytes']} bytes sha256 {rep['body_sha256'][:16]}…, expected {want[:16]}…")
    return {
        "name": f"{src.name} -> {dst.name} GET 1 MiB",
        "from": src.name,
        "to": dst.name,
        "status": rep.get("status"),
        "bytes": rep.get("body_bytes"),
        "proxies": traffic.proxy_headers(rep),
        "expected_proxies": _captured_path(state, src, dst),
        "problems": problems,
        "ok": not problems,
    }


def _echo(state: LabState, src: PodState, dst: PodState, host: str, port: int) -> dict:
    # Raw TCP carries no header to name the proxies, so the sidecars' session totals are the evidence.
    before = traffic.proxy_stats(state)
    rep = traffic.echo(state, src, host, port, BULK_BYTES)
    after = traffic.proxy_stats(state)
    hops = {
        f"{src.name}-outbound": _delta(before, after, src.name, "outbound"),
        f"{dst.name}-inbound": _delta(before, after, dst.name, "inbound"),
    }
    want = 1 if state.capture else 0
    problems = [rep["error"]] if "error" in rep else []
    if not problems and (rep["received_bytes"] != BULK_BYTES or rep["received_sha256"] != rep["sent_sha256"]):
        same = rep["received_sha256"] == rep["sent_sha256"]
        problems.append(f"echoed {rep['received_bytes']} bytes, digest {'matches' if same else 'differs'}")
    for hop, n in hops.items():
        if n != want:
            problems.append(f"{hop} proxy took {n} sessions, expected {want}")
    return {
        "name": f"{src.name} -> {dst.name} TCP echo 1 MiB to {host}:{port}",
        "from": src.name,
        "to": dst.name,
        "bytes": rep.get("received_bytes"),
        "proxies": [hop for hop, n in hops.items() if n],
        "expected_proxies": [hop for hop in hops] if state.capture else [],
        "problems": problems,
        "ok": not problems,
    }


def _hot_upgrades(state: LabState, src: PodState, dst: PodState, graceful: int = 3, kills: int = 2) -> dict:
    """Replace dst's sidecar through the agent (`meshcni proxy upgrade`) under a connection-per-request load
    from src: every request must still be answered by dst through both proxies."""
    from meshcni.agent.client import AgentClient
    from meshcni.lab import agent as lab_agent
    from meshcni.lab import pod as podproc
    from meshcni.sys import proc

    load = traffic.BackgroundLoad(state, src, dst.ip, 80)
    replies, problems = [], []
    try:
        with AgentClient(str(lab_agent.paths(state)["socket"])) as client:
            time.sleep(0.5)
            for kind in ["graceful"] * graceful + ["crash"] * kills:
                replies.append(client.upgrade_proxy(f"{LAB_NAMESPACE}/{dst.name}", kind,
                                                    ready_socket=str(podproc.proxy_socket(state, dst))))
                time.sleep(0.5)
        report = load.stop()
    finally:
        load.kill()
    if replies:  # the lab's record of the sidecar follows the generation now serving
        dst.processes["haproxy"] = proc.ref(replies[-1]["new_pid"])
        state.save()
    want = ",".join(_captured_path(state, src, dst))
    if report["failed"]:
        problems.append(f"{report['failed']} of {report['ok'] + report['failed']} requests failed: {report['errors']}")
    stray = {k: v for k, v in report["via"].items() if k != want}
    if stray:
        problems.append(f"requests not through both proxies: {stray}")
    return {
        "name": f"{src.name} -> {dst.name} load while {dst.name}'s proxy is replaced {graceful}x gracefully "
                f"and {kills}x by SIGKILL (meshcni proxy upgrade)",
        "from": src.name,
        "to": dst.name,
        "requests": report["ok"] + report["failed"],
        "failed": report["failed"],
        "upgrades": [f"{r['kind']} {r['old_pid']}->{r['new_pid']}" for r in replies],
        "proxies": want.split(",") if report["ok"] else [],
        "problems": problems,
        "ok": not problems,
    }


def _delta(before: dict, after: dict, pod: str, frontend: str) -> int | None:
    try:
        return after[pod]["frontends"][frontend] - before[pod]["frontends"][frontend]
    except KeyError:
        return None  # a stats socket that did not answer: reported as a mismatch


def _field(body: str, key: str) -> str | None:
    for part in body.split():
        k, _, v = part.partition("=")
        if k == key:
            return v
    return None


# ---------------------------------------------------------------------------------------------- renderers


def render_status(d: dict) -> str:
    lines = [
        f"lab {d['name']}: {d['phase']}{'' if d['healthy'] else ' (UNHEALTHY)'}  subnet {d['subnet']}  "
        f"bridge {d['bridge']}{'' if d['bridge_present'] else ' (missing)'}  capture {'on' if d['capture'] else 'off'}",
        f"  state {d['state_dir']}  cgroup {d['cgroup']}",
    ]
    if d.get("agent_socket"):
        lines.append(f"  agent {d['agent_socket']}  (meshcni status|pods|counters|maps|events --socket ...)")
    for p in d["pods"]:
        procs = "  ".join(f"{n}:{v['pid']}{'' if v['alive'] else '(dead)'}" for n, v in p["processes"].items())
        flags = [] if p["netns_present"] else ["netns missing"]
        if p["captured"]:
            flags.append(f"captured ({p['capture_mode']})" if p.get("capture_mode") else "captured")
        lines.append(f"  pod {p['name']:<3} {p['ip'] or '-':<15} {procs}  {' '.join(flags)}".rstrip())
        lines += [f"      capture problem: {x}" for x in p.get("capture_problems", [])]
    return "\n".join(lines)


def render_down(d: dict) -> str:
    if not d["removed"] and not d["errors"]:
        return f"lab {d['name']}: nothing to remove"
    lines = [f"lab {d['name']}: removed {len(d['removed'])} resources"]
    lines += [f"  - {x}" for x in d["removed"]]
    lines += [f"  note: {x}" for x in d["notes"]]
    lines += [f"  ERROR: {x}" for x in d["errors"]]
    return "\n".join(lines)


def render_demo(d: dict) -> str:
    lines = [render_status(d["lab"]), "", "traffic (from inside the pods, uid 65534, in the lab cgroup):"]
    for c in d["checks"]:
        mark = "ok  " if c["ok"] else "FAIL"
        lines.append(f"  [{mark}] {c['name']}")
        if "body" in c:
            lines.append(f"         answer: {c['body']}")
        if "bytes" in c:
            lines.append(f"         bytes:  {c['bytes']}")
        if "events" in c:
            from meshcni.cli.node import render_event

            lines += [f"         {render_event(e)}" for e in c["events"]]
        if "requests" in c:
            lines.append(f"         requests: {c['requests']}, failed: {c['failed']}; upgrades: "
                         f"{', '.join(c['upgrades'])}")
        if "proxies" in c:
            lines.append(f"         proxies: {', '.join(c['proxies']) or 'none'}")
        for p in c["problems"]:
            lines.append(f"         problem: {p}")
    lines.append("")
    lines.append("HAProxy sessions per frontend (show stat, stot):")
    for pod, st in d["proxy_stats"].items():
        if "error" in st:
            lines.append(f"  {pod}: {st['error']}")
            continue
        used = {k: v for k, v in st["frontends"].items() if v}
        lines.append(f"  {pod}: " + (", ".join(f"{k}={v}" for k, v in used.items()) or "no sessions"))
    if d.get("agent_pods"):
        lines.append("")
        lines.append("pods enrolled by the lab's agent through the CNI chain (meshcni pods list):")
        for p in d["agent_pods"]:
            lines.append(f"  {p['pod_namespace']}/{p['pod_name']}: mode {p['mode']} ({p['mode_source']}), "
                         f"slot {p['slot']}, listener {p['listener']}, ips {', '.join(p['ips'])}")
    if d["capture_counters"] is not None:
        lines.append("")
        lines.append("capture counters (meshcni counters):")
        for pod, cs in d["capture_counters"].items():
            used = {k: v for k, v in cs.items() if v}
            lines.append(f"  {pod}: " + (", ".join(f"{k}={v}" for k, v in used.items()) or "all zero"))
    lines.append("")
    if d.get("down"):
        lines.append(render_down({"name": d["lab"]["name"], **d["down"]}))
    elif d.get("kept"):
        lines.append(f"lab kept; remove it with: meshcni lab down --name {d['lab']['name']}")
    lines.append("RESULT: " + ("all checks passed" if d["ok"] else "SOME CHECKS FAILED"))
    return "\n".join(lines)
