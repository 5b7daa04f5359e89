"""`meshcni proxy-exec`: fetch the pod's listeners from the agent and exec the proxy with them.

The sidecar's entry point runs `meshcni proxy-exec --socket PATH -- haproxy -f ...`. It connects to the
pod's handoff socket, checks that the server is root (or ourselves) by SO_PEERCRED — so a socket someone
else put at that path cannot feed the proxy foreign descriptors — receives the listeners, moves them to fd 3,
4, ... in the order the server named them and execs the command in place (same pid). The proxy finds them the
systemd way (LISTEN_FDS, LISTEN_FDNAMES colon-separated, LISTEN_PID = its own pid, which is ours since we
exec) and by name in MESHCNI_FD_<NAME>, which an HAProxy config uses as `bind fd@"${MESHCNI_FD_INBOUND}"`.
With `env_only` the descriptors stay at the numbers they arrived on and only MESHCNI_FD_* is set (LISTEN_FDS
would be a lie about where they are).
"""

from __future__ import annotations

import fcntl
import os
import socket
import sys
from dataclasses import dataclass
from typing import Mapping, Sequence

from meshcni.handoff import protocol
from meshcni.handoff.errors import HandoffError

SD_LISTEN_FDS_START = 3  # sd_listen_fds(3): passed descriptors start here
CONNECT_TIMEOUT = 5.0
# The launcher's own module: it loads only click and this package, so a hot upgrade's next proxy starts fast.
LAUNCHER_MODULE = "meshcni.cli.proxy_exec"


def launcher_argv(handoff_socket: str, command: Sequence[str]) -> list[str]:
    """How the agent and the lab start a sidecar on its held listeners: `proxy-exec` under this interpreter
    (the `meshcni` script may not be on PATH), then `command` in its place."""
    return [sys.executable, "-m", LAUNCHER_MODULE, "--socket", str(handoff_socket), "--", *command]


@dataclass
class Handoff:
    pod: str
    generation: int
    fds: dict[str, int]  # name -> fd, in the server's order


def fetch(socket_path: str, timeout: float = CONNECT_TIMEOUT) -> Handoff:
    """Connect, ask, check and receive; raises HandoffError (HandoffRefused when refused)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        try:
            s.connect(socket_path)
        except FileNotFoundError:
            raise HandoffError(f"no handoff socket at {socket_path} (is the meshcni agent running?)") from None
        except OSError as exc:
            raise HandoffError(f"cannot connect to the handoff socket {socket_path}: {exc.strerror}") from None
        _pid, uid, _gid = protocol.peer_cred(s)
        if uid not in (0, os.geteuid()):
            raise HandoffError(f"the handoff socket {socket_path} is served by uid {uid}, not by root; not trusting it")
        try:
            s.sendall(protocol.REQUEST)
            line, fds = protocol.read_line_with_fds(s)
        except OSError as exc:
            raise HandoffError(f"handoff over {socket_path} failed: {exc.strerror or exc}") from None
    finally:
        s.close()
    if not line:
        raise HandoffError(f"the handoff server at {socket_path} closed the connection without an answer")
    header = protocol.parse_answer(line, fds)
    return Handoff(pod=str(header.get("pod", "")), generation=int(header.get("generation", 0)), fds=header["fds"])


def env_name(name: str) -> str:
    return "MESHCNI_FD_" + "".join(c if c.isalnum() else "_" for c in name).upper()


def build_env(base: Mapping[str, str], placed: Mapping[str, int], pid: int, systemd: bool = True) -> dict[str, str]:
    """The proxy's environment: `base` plus MESHCNI_FD_* and (if `systemd`) LISTEN_FDS/LISTEN_FDNAMES/LISTEN_PID.

    `placed` is name -> fd in handoff order; for the systemd variables they must be 3, 4, ... consecutively.
    """
    env = {k: v for k, v in base.items() if k not in ("LISTEN_FDS", "LISTEN_FDNAMES", "LISTEN_PID")}
    for name, fd in placed.items():
        env[env_name(name)] = str(fd)
    if systemd:
        fds = list(placed.values())
        if fds != list(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + len(fds))):
            raise HandoffError(f"LISTEN_FDS needs descriptors 3.. in order, got {fds}")
        names = list(placed)
        for n in names:
            if ":" in n:
                raise HandoffError(f"listener name {n!r} cannot appear in LISTEN_FDNAMES (it contains ':')")
        env["LISTEN_FDS"] = str(len(fds))
        env["LISTEN_FDNAMES"] = ":".join(names)
        env["LISTEN_PID"] = str(pid)
    return env


def place(fds: Mapping[str, int]) -> dict[str, int]:
    """Move the received fds to 3, 4, ... (in order), inheritable; returns name -> new fd.

    Everything is first duplicated above the target range, so a received fd that already sits at, say, 4
    is never overwritten before it has been moved.
    """
    count = len(fds)
    floor = SD_LISTEN_FDS_START + count
    parked = {}
    for name, fd in fds.items():
        parked[name] = _dup_above(fd, floor)
        os.close(fd)
    placed = {}
    for i, (name, fd) in enumerate(parked.items()):
        target = SD_LISTEN_FDS_START + i
        os.dup2(fd, target, inheritable=True)
        os.close(fd)
        placed[name] = target
    return placed


def _dup_above(fd: int, floor: int) -> int:
    return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, floor)


def exec_proxy(handoff: Handoff, argv: Sequence[str], env_only: bool = False) -> None:
    """Replace this process with `argv`, the listeners in place; returns only by raising HandoffError."""
    if not argv:
        raise HandoffError("no proxy command given (usage: meshcni proxy-exec --socket PATH -- CMD ARGS...)")
    if env_only:
        placed = dict(handoff.fds)
        for fd in placed.values():
            os.set_inheritable(fd, True)
    else:
        placed = place(handoff.fds)
    env = build_env(os.environ, placed, os.getpid(), systemd=not env_only)
    try:
        os.execvpe(argv[0], list(argv), env)
    except OSError as exc:
        raise HandoffError(f"cannot run {argv[0]}: {exc.strerror}") from None
