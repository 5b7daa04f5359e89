"""iptables as a system tool: pick the node's backend, dump a table and apply a transaction inside a netns.

Only `iptables-save` / `iptables-restore` are used, never rule-at-a-time `iptables -A`: a restore input is one
transaction (one nf_tables batch, or one table replacement in legacy), so a pod is never seen half-captured.
The backend (nft or legacy) must match what the node already uses, otherwise two rule sets coexist and the
kernel evaluates both; like Istio and the Kubernetes iptables-wrapper we look at the host's rules (read-only)
and choose the backend that holds more of them, with an explicit override for nodes where that guess is wrong.
`iptables-save` output is parsed here so the rest of meshcni works on a `Table`, not on tool text.
"""

from __future__ import annotations

import enum
import functools
import os
import re
import subprocess
from dataclasses import dataclass, field

from meshcni.sys.errors import SysError
from meshcni.sys.netns import in_netns, run_in_netns

BACKEND_ENV = "MESHCNI_IPTABLES_BACKEND"
# Chains kubelet (1.24+) creates so that tools can tell which backend the node uses; the strongest signal.
KUBE_HINT_CHAINS = ("KUBE-IPTABLES-HINT", "KUBE-KUBELET-CANARY")
# iptables-legacy serialises writers with this file lock (shared by every netns); wait for it, do not fail.
LOCK_WAIT_SECONDS = 10
TOOL_TIMEOUT_SECONDS = 30


class IptablesError(SysError):
    """An iptables tool is missing or rejected its input; the message carries the tool's own explanation."""


class Backend(str, enum.Enum):
    """Which kernel interface the iptables tools program."""

    NFT = "nft"
    LEGACY = "legacy"


class Family(enum.IntEnum):
    """IP version of a rule set; iptables and ip6tables keep separate tables."""

    IPV4 = 4
    IPV6 = 6

    @property
    def label(self) -> str:
        return "IPv4" if self is Family.IPV4 else "IPv6"

    @property
    def conntrack_name(self) -> str:
        """The family as conntrack-tools' `-f` spells it."""
        return "ipv4" if self is Family.IPV4 else "ipv6"


def tool(backend: Backend, family: Family, verb: str) -> str:
    """The Debian executable for a verb: `tool(NFT, IPV6, "restore")` → `ip6tables-nft-restore`."""
    prefix = "iptables" if family is Family.IPV4 else "ip6tables"
    return f"{prefix}-{Backend(backend).value}-{verb}"


def family_available(family: Family) -> bool:
    """IPv4 always; IPv6 unless the kernel runs without it (ipv6.disable=1), when ip6tables cannot work."""
    return family is Family.IPV4 or os.path.exists("/proc/sys/net/ipv6")


# --- backend detection -----------------------------------------------------------------------------------


def detect_backend(override: Backend | str | None = None) -> Backend:
    """The backend to program pods with: `override`, else $MESHCNI_IPTABLES_BACKEND, else the host's.

    The host is only read. Call this from the host network namespace (the agent runs there).
    """
    choice = override or os.environ.get(BACKEND_ENV, "").strip()
    if choice:
        try:
            return Backend(str(choice).lower())
        except ValueError:
            raise IptablesError(f"iptables backend {choice!r} is not one of nft, legacy") from None
    return _host_backend()


@functools.lru_cache(maxsize=1)
def _host_backend() -> Backend:
    dumps = {backend: _host_dump(backend) for backend in Backend}
    if all(text is None for text in dumps.values()):
        raise IptablesError("neither iptables-nft-save nor iptables-legacy-save can run; install iptables")
    for backend in (Backend.NFT, Backend.LEGACY):
        if dumps[backend] and any(f":{hint} " in dumps[backend] for hint in KUBE_HINT_CHAINS):
            return backend
    return choose_backend(count_rules(dumps[Backend.NFT] or ""), count_rules(dumps[Backend.LEGACY] or ""))


def choose_backend(nft_rules: int, legacy_rules: int) -> Backend:
    """More rules in legacy than in nft means the node's components write legacy; otherwise nft.

    Ties (typically an empty host) go to nft, the default of Debian 12 and of current distributions.
    """
    return Backend.LEGACY if legacy_rules > nft_rules else Backend.NFT


def count_rules(save_output: str) -> int:
    return sum(1 for line in save_output.splitlines() if line.startswith("-A "))


def _host_dump(backend: Backend) -> str | None:
    # No `-t`: asking legacy for a named table would instantiate that table in the host namespace. Without
    # it the tools only list tables that already exist, so detection never changes the host.
    text = []
    for family in Family:
        try:
            proc = subprocess.run(
                [tool(backend, family, "save")], capture_output=True, text=True, timeout=TOOL_TIMEOUT_SECONDS
            )
        except (FileNotFoundError, subprocess.TimeoutExpired):
            if family is Family.IPV4:
                return None
            continue
        if proc.returncode == 0:
            text.append(proc.stdout)
        elif family is Family.IPV4:
            return None
    return "".join(text)


# --- conntrack settings of a netns ------------------------------------------------------------------------

# Per network namespace since Linux 4.x; present once nf_conntrack is loaded (a rule that needs it loads it).
CONNTRACK_TCP_LOOSE = "/proc/sys/net/netfilter/nf_conntrack_tcp_loose"
CONNTRACK_COUNT = "/proc/sys/net/netfilter/nf_conntrack_count"


def conntrack_count(netns: str) -> int:
    """How many conntrack entries the netns holds (0 when nf_conntrack is not even loaded)."""
    with in_netns(netns):
        try:
            with open(CONNTRACK_COUNT, encoding="ascii") as f:
                return int(f.read().strip() or 0)
        except FileNotFoundError:
            return 0


def conntrack_tcp_loose(netns: str) -> bool | None:
    """Whether conntrack in the netns adopts TCP connections it first sees mid-stream (None: not loaded)."""
    with in_netns(netns):  # /proc/sys/net shows the opening thread's namespace
        try:
            with open(CONNTRACK_TCP_LOOSE, encoding="ascii") as f:
                return f.read().strip() != "0"
        except FileNotFoundError:
            return None


def set_conntrack_tcp_loose(netns: str, loose: bool) -> None:
    with in_netns(netns):
        try:
            with open(CONNTRACK_TCP_LOOSE, "w", encoding="ascii") as f:
                f.write("1" if loose else "0")
        except OSError as exc:
            raise IptablesError(f"cannot set {CONNTRACK_TCP_LOOSE} in {netns}: {exc.strerror or exc}") from exc


# TCP states of a connection still carrying data; TIME_WAIT and CLOSE entries only remember one that ended.
_OPEN_TCP_STATES = frozenset({"SYN_SENT", "SYN_RECV", "ESTABLISHED", "FIN_WAIT", "CLOSE_WAIT", "LAST_ACK",
                              "SYN_SENT2"})


def conntrack_redirected_open(netns: str) -> int | None:
    """How many TCP connections conntrack in the netns destination-translated (REDIRECT) that are still open;
    None when it cannot tell (conntrack-tools missing). Asks the kernel with `conntrack -L --dst-nat`."""
    total = 0
    for family in filter(family_available, Family):
        try:
            proc = run_in_netns(netns, ["conntrack", "-L", "-f", family.conntrack_name, "-p", "tcp", "--dst-nat"],
                                capture_output=True, text=True, timeout=TOOL_TIMEOUT_SECONDS)
        except (FileNotFoundError, subprocess.TimeoutExpired):
            return None
        if proc.returncode != 0:
            return None
        # One entry per line: "tcp 6 <timeout> <STATE> src=... dst=... ...".
        states = (line.split()[3:4] for line in proc.stdout.splitlines())
        total += sum(1 for state in states if state and state[0] in _OPEN_TCP_STATES)
    return total


def conntrack_flush(netns: str) -> None:
    """Delete every conntrack entry of the netns (each family the kernel runs)."""
    for family in filter(family_available, Family):
        try:
            proc = run_in_netns(netns, ["conntrack", "-F", "-f", family.conntrack_name],
                                capture_output=True, text=True, timeout=TOOL_TIMEOUT_SECONDS)
        except FileNotFoundError:
            raise IptablesError("conntrack (conntrack-tools) is not installed") from None
        except subprocess.TimeoutExpired:
            raise IptablesError(f"conntrack -F in {netns} did not finish within {TOOL_TIMEOUT_SECONDS}s") from None
        if proc.returncode != 0:
            raise IptablesError(f"conntrack -F -f {family.conntrack_name} in {netns} failed: "
                                f"{proc.stderr.strip() or proc.returncode}")


# --- reading and writing a table in a netns ----------------------------------------------------------------


@dataclass
class Table:
    """One table of an iptables-save dump: chains in dump order with their policy ("-" for user chains),
    and each chain's rules as the text after `-A <chain> `, in evaluation order."""

    name: str
    chains: dict[str, str] = field(default_factory=dict)
    rules: dict[str, list[str]] = field(default_factory=dict)

    def chain_rules(self, chain: str) -> list[str]:
        return self.rules.get(chain, [])

    def jumps_to(self, targets) -> list[tuple[str, str]]:
        """(chain, rule) for every rule outside `targets` whose verdict is a jump or goto into one of them."""
        targets = set(targets)
        found = []
        for chain, specs in self.rules.items():
            if chain in targets:
                continue
            for spec in specs:
                if rule_target(spec) in targets:
                    found.append((chain, spec))
        return found


_TARGET = re.compile(r"(?:^|\s)-[jg]\s+(\S+)")


def rule_target(spec: str) -> str | None:
    """The `-j`/`-g` target of a rule spec (the last one: module options never use -j/-g)."""
    matches = _TARGET.findall(spec)
    return matches[-1] if matches else None


def parse_save(text: str, table: str) -> Table:
    """The named table from iptables-save output; an empty Table when the dump does not contain it."""
    result = Table(table)
    current = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("*"):
            current = line[1:].strip()
            continue
        if current != table:
            continue
        if line == "COMMIT":
            current = None
        elif line.startswith(":"):
            name, policy = (line[1:].split() + ["-"])[:2]
            result.chains[name] = policy
            result.rules.setdefault(name, [])
        elif line.startswith("-A "):
            _, chain, *rest = line.split(" ", 2)
            result.rules.setdefault(chain, []).append(rest[0] if rest else "")
    return result


def save(netns: str, family: Family, backend: Backend, table: str = "nat") -> Table:
    """Dump one table of the netns (counters not included)."""
    proc = _run(netns, [tool(backend, family, "save"), "-t", table], stdin=None)
    return parse_save(proc.stdout, table)


_COUNTED_RULE = re.compile(r"^\[(\d+):(\d+)\]\s+-A\s+(\S+)\s+(.*)$")


def parse_rule_counters(text: str, table: str) -> list[tuple[str, str, int, int]]:
    """(chain, rule spec, packets, bytes) of every rule of `table` in `iptables-save -c` output, in order."""
    rules = []
    current = None
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("*"):
            current = line[1:].strip()
        elif line == "COMMIT":
            current = None
        elif current == table:
            m = _COUNTED_RULE.match(line)
            if m:
                rules.append((m.group(3), m.group(4), int(m.group(1)), int(m.group(2))))
    return rules


def rule_counters(netns: str, family: Family, backend: Backend, table: str = "nat") -> list[tuple[str, str, int, int]]:
    """The packet and byte counters of every rule of one table in the netns (see `parse_rule_counters`)."""
    proc = _run(netns, [tool(backend, family, "save"), "-c", "-t", table], stdin=None)
    return parse_rule_counters(proc.stdout, table)


def restore(netns: str, family: Family, backend: Backend, document: str) -> None:
    """Apply an iptables-restore document in the netns as one transaction, keeping every other rule.

    With --noflush only what the document names changes; a `:CHAIN - [0:0]` line for an existing user chain
    empties it (both backends), which is what makes re-applying a rendered rule set idempotent.
    """
    argv = [tool(backend, family, "restore"), "--noflush", f"--wait={LOCK_WAIT_SECONDS}"]
    _run(netns, argv, stdin=document)


def _run(netns: str, argv: list[str], stdin: str | None) -> subprocess.CompletedProcess:
    try:
        proc = run_in_netns(
            netns, argv, input=stdin, capture_output=True, text=True, timeout=TOOL_TIMEOUT_SECONDS
        )
    except FileNotFoundError:
        raise IptablesError(f"{argv[0]} (or nsenter) is not installed") from None
    except subprocess.TimeoutExpired:
        raise IptablesError(f"{argv[0]} in {netns} did not finish within {TOOL_TIMEOUT_SECONDS}s") from None
    if proc.returncode == 127:
        raise IptablesError(f"{argv[0]} is not installed")
    if proc.returncode != 0:
        raise IptablesError(f"{argv[0]} in {netns} failed: {_explain(proc.stderr, stdin)}")
    return proc


def _explain(stderr: str, document: str | None) -> str:
    """The tool's first error line, plus the offending input line when restore names one."""
    lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith("Try `")]
    message = lines[0].strip() if lines else "no error message"
    found = re.search(r"line:?\s*(\d+)", stderr)
    if document and found:
        number = int(found.group(1))
        source = document.splitlines()
        if 1 <= number <= len(source):
            message += f" (input line {number}: {source[number - 1]!r})"
    return message
