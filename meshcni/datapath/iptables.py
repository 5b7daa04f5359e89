"""The iptables interceptor: Istio's own nat rules (istio-iptables, REDIRECT mode) in each pod's netns.

The rule set, chain names and rule order follow istio-iptables so a real Istio sidecar works unchanged:
PREROUTING → ISTIO_INBOUND → ISTIO_IN_REDIRECT (REDIRECT to 15006) for inbound, OUTPUT → ISTIO_OUTPUT →
ISTIO_REDIRECT (REDIRECT to 15001) for outbound, with the proxy recognised by its uid/gid owner match.
Each rule is written in the canonical spelling `iptables-save` prints (`-s` before `-o`, the implicit
`-m tcp`), so `verify` can compare live rules with rendered ones as text and a rendered document is also a
valid restore input. DNS capture, TPROXY and interface exclusions, which meshcni does not offer, are left
out. `capture` applies one `iptables-restore --noflush` transaction that (re)declares our four chains —
which empties them if they exist — drops any earlier jumps into them and appends the rules, so capturing
twice changes nothing; `release` deletes exactly our jumps and chains and leaves every other rule alone.

Conntrack, which REDIRECT depends on, needs care when a pod switches live between this backend and eBPF.
A netns's conntrack only tracks while some rule in it needs conntrack, and Istio's REDIRECT rules are the
only such rules a pod has, so removing them (a switch to eBPF) silently stops tracking: the entries of the
connections open at that moment are frozen — an ESTABLISHED one for five days — and a later connection of
the same 4-tuple (ports come round again within seconds under connection-per-request load, and the app's
and the proxy's connections to one destination share them) matches the frozen entry when iptables
captures again, so its SYN never reaches the nat rules: it bypasses the proxy, or inherits another
connection's REDIRECT. Redirected connections still open also lose their translation the moment tracking
stops. So capture also adds MESHCNI_CONNTRACK, a chain nothing jumps to whose one rule matches on
conntrack state and so keeps tracking on after the rules go. `release` drops it as soon as no connection
the rules redirected is still open (until then `drop_conntrack_hold` retries; a pod in eBPF mode should not
pay conntrack's per-packet cost for longer) and empties the netns's conntrack table the moment tracking
stops, so no entry is left frozen. Before tracking starts, capture also sets the netns's
`nf_conntrack_tcp_loose` to 0: connections made under eBPF before tracking began must not be adopted
mid-stream, because the nat rules apply to the first packet conntrack sees of a connection (a REDIRECT of
an established connection's segment only earns a reset), and an entry adopted from the pod's own ACK faces
the wrong way, so the next SYN of that 4-tuple is invalid to conntrack and passes untranslated.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from meshcni.config import INBOUND_PASSTHROUGH_SRC, Mode, PodConfig
from meshcni.datapath.directions import BOTH, Direction
from meshcni.datapath.interceptor import PodNet
from meshcni.sys import iptables as ipt
from meshcni.sys.errors import NamespaceNotFound, SysError
from meshcni.sys.iptables import Backend, Family, Table
from meshcni.sys.netns import check_netns, run_in_netns

TABLE = "nat"
INBOUND = "ISTIO_INBOUND"
REDIRECT = "ISTIO_REDIRECT"
IN_REDIRECT = "ISTIO_IN_REDIRECT"
OUTPUT = "ISTIO_OUTPUT"
# Declaration order of istio-iptables.
OUR_CHAINS = (INBOUND, REDIRECT, IN_REDIRECT, OUTPUT)
# Keeps the pod netns's conntrack tracking in every mode once iptables has captured it (module docstring).
CONNTRACK_CHAIN = "MESHCNI_CONNTRACK"
# The match is what takes the netns's conntrack reference; the rule is never reached (no jump to its chain).
CONNTRACK_HOLD_SPEC = "-m conntrack --ctstate INVALID -j RETURN"
# Istio's HBONE port: always the first RETURN of ISTIO_INBOUND, and never sent back inbound from the proxy.
TUNNEL_PORT = 15008


@dataclass(frozen=True)
class _ConntrackHold:
    """What a pod netns's conntrack hold is now: absent (no `holding` family), owned by a live iptables
    capture of the pod, still needed by an open redirected connection, or free to go."""

    live: dict = field(default_factory=dict)  # family -> the nat table as saved, when there is a hold
    holding: tuple = ()  # the families whose nat table has the hold chain
    owned: bool = False
    needed: bool = False
    tells_connections_apart: bool = False  # conntrack-tools answered (else the hold waited for an empty table)


@dataclass(frozen=True)
class FamilyAddresses:
    """The per-family constants istio-iptables substitutes into otherwise identical rules."""

    loopback: str  # the host loopback the proxy and localhost-aware apps use; never captured
    passthrough: str  # source of the proxy's inbound passthrough connections to the app


ADDRESSES = {
    Family.IPV4: FamilyAddresses(loopback="127.0.0.1/32", passthrough=f"{INBOUND_PASSTHROUGH_SRC}/32"),
    # IPv6 loopback is a single /128, so Istio adds ::6 to lo for the passthrough source.
    Family.IPV6: FamilyAddresses(loopback="::1/128", passthrough="::6/128"),
}
IPV6_PASSTHROUGH_ADDRESS = "::6/128"


@dataclass(frozen=True)
class Rule:
    """One rule: its chain and the rest of the line, as iptables-save prints it."""

    chain: str
    spec: str

    def line(self, verb: str = "-A") -> str:
        return f"{verb} {self.chain} {self.spec}"


def _spec(
    *,
    src: str | None = None,
    dst: str | None = None,
    not_dst: bool = False,
    out: str | None = None,
    tcp: bool = False,
    dport: int | None = None,
    not_dport: bool = False,
    uid: int | None = None,
    gid: int | None = None,
    not_owner: bool = False,
    jump: str,
    redirect_to: int | None = None,
) -> str:
    """Assemble a rule in iptables-save's canonical order: addresses, interfaces, protocol, matches, target."""
    parts: list[str] = []
    if src:
        parts += ["-s", src]
    if dst:
        parts += (["!"] if not_dst else []) + ["-d", dst]
    if out:
        parts += ["-o", out]
    if tcp:
        parts += ["-p", "tcp"]
    if dport is not None:
        # `--dport` needs `-p tcp`; iptables-save names the implicit tcp match module.
        parts += ["-m", "tcp"] + (["!"] if not_dport else []) + ["--dport", str(dport)]
    if uid is not None or gid is not None:
        neg = ["!"] if not_owner else []
        parts += ["-m", "owner"] + neg + (["--uid-owner", str(uid)] if uid is not None else ["--gid-owner", str(gid)])
    parts += ["-j", jump]
    if redirect_to is not None:
        parts += ["--to-ports", str(redirect_to)]
    return " ".join(parts)


def _networks(nets, family: Family) -> list:
    return [n for n in nets if n.version == int(family)]


def _includes_loopback(config: PodConfig) -> bool:
    """Istio keeps app→self traffic on lo out of the proxy, unless the user included a loopback range."""
    return config.include_outbound_cidrs is not None and any(
        n.network_address.is_loopback for n in config.include_outbound_cidrs
    )


def chains_for(directions=BOTH) -> tuple[str, ...]:
    """Our chains a capture of `directions` uses, in declaration order.

    ISTIO_IN_REDIRECT belongs to both: inbound capture jumps to it, and outbound's ISTIO_OUTPUT sends the
    proxy's hairpin (proxy → its own pod IP over lo) back in through it.
    """
    used = {IN_REDIRECT}
    if Direction.INBOUND in directions:
        used.add(INBOUND)
    if Direction.OUTBOUND in directions:
        used |= {REDIRECT, OUTPUT}
    return tuple(chain for chain in OUR_CHAINS if chain in used)


def build_rules(config: PodConfig, family: Family | int, directions=BOTH) -> list[Rule]:
    """The rules istio-iptables appends, in its order; empty when the pod is not to be captured.

    `directions` limits the rules to inbound or outbound capture (the other direction then belongs to
    another backend); with both, the result is exactly istio-iptables'.
    """
    family = Family(family)
    inbound, outbound = Direction.INBOUND in directions, Direction.OUTBOUND in directions
    if config.mode is Mode.OFF or not (inbound or outbound):
        return []
    addr = ADDRESSES[family]
    excluded_in = set(config.effective_exclude_inbound_ports)
    rules = []
    if inbound:
        rules.append(Rule(INBOUND, _spec(tcp=True, dport=TUNNEL_PORT, jump="RETURN")))
    if outbound:
        rules.append(Rule(REDIRECT, _spec(tcp=True, jump="REDIRECT", redirect_to=config.outbound_port)))
    rules.append(Rule(IN_REDIRECT, _spec(tcp=True, jump="REDIRECT", redirect_to=config.inbound_port)))
    if inbound:
        rules += _inbound_rules(config, excluded_in)
    if outbound:
        rules += _outbound_rules(config, addr, family)
    return rules


def _inbound_rules(config: PodConfig, excluded_in: set[int]) -> list[Rule]:
    rules: list[Rule] = []
    # Inbound. An empty include list means "capture no inbound port": no PREROUTING jump at all.
    if config.include_inbound_ports is None:
        rules.append(Rule("PREROUTING", _spec(tcp=True, jump=INBOUND)))
        rules += [
            Rule(INBOUND, _spec(tcp=True, dport=port, jump="RETURN"))
            for port in sorted(excluded_in - {TUNNEL_PORT})
        ]
        rules.append(Rule(INBOUND, _spec(tcp=True, jump=IN_REDIRECT)))
    elif config.include_inbound_ports:
        rules.append(Rule("PREROUTING", _spec(tcp=True, jump=INBOUND)))
        # An exclusion wins over an inclusion of the same port (Istio would capture it): never capture the
        # proxy's own ports or a port the user explicitly asked us to leave alone.
        rules += [
            Rule(INBOUND, _spec(tcp=True, dport=port, jump=IN_REDIRECT))
            for port in config.include_inbound_ports
            if port not in excluded_in
        ]
    return rules


def _outbound_rules(config: PodConfig, addr: FamilyAddresses, family: Family) -> list[Rule]:
    rules = [Rule("OUTPUT", _spec(tcp=True, jump=OUTPUT))]
    # Port exclusions come first so that even the app→self-via-VIP rule below cannot capture them.
    rules += [Rule(OUTPUT, _spec(tcp=True, dport=port, jump="RETURN")) for port in config.exclude_outbound_ports]
    # The proxy's inbound passthrough (source 127.0.0.6 / ::6) to the app over lo.
    rules.append(Rule(OUTPUT, _spec(src=addr.passthrough, out="lo", jump="RETURN")))
    keep_app_to_self = not _includes_loopback(config)
    for owner in ({"uid": config.proxy_uid}, {"gid": config.proxy_gid}):
        # The proxy calling the pod's own (non-loopback) address on lo — app → proxy → service VIP that
        # resolves to this very pod — must enter the proxy again as inbound traffic.
        rules.append(
            Rule(
                OUTPUT,
                _spec(
                    dst=addr.loopback, not_dst=True, out="lo", tcp=True, dport=TUNNEL_PORT, not_dport=True,
                    jump=IN_REDIRECT, **owner,
                ),
            )
        )
        if keep_app_to_self:
            # The app calling itself by pod IP stays on lo and skips the proxy.
            rules.append(Rule(OUTPUT, _spec(out="lo", not_owner=True, jump="RETURN", **owner)))
        # Everything else the proxy sends leaves uncaptured (no redirect loop).
        rules.append(Rule(OUTPUT, _spec(jump="RETURN", **owner)))
    # Apps that explicitly talk to localhost (sidecar-aware apps, container-to-container).
    rules.append(Rule(OUTPUT, _spec(dst=addr.loopback, jump="RETURN")))
    rules += [
        Rule(OUTPUT, _spec(dst=str(net), jump="RETURN"))
        for net in _networks(config.exclude_outbound_cidrs, family)
    ]
    rules += [Rule(OUTPUT, _spec(tcp=True, dport=port, jump=REDIRECT)) for port in config.include_outbound_ports]
    if config.include_outbound_cidrs is None:
        rules.append(Rule(OUTPUT, _spec(jump=REDIRECT)))
    else:
        rules += [
            Rule(OUTPUT, _spec(dst=str(net), jump=REDIRECT))
            for net in _networks(config.include_outbound_cidrs, family)
        ]
    return rules


def _document(rules: list[Rule], preamble: list[str] = (), chains: tuple[str, ...] = OUR_CHAINS) -> str:
    lines = [f"*{TABLE}"]
    lines += [f":{chain} - [0:0]" for chain in chains]
    lines += preamble
    lines += [rule.line() for rule in rules]
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def render_rules(config: PodConfig, family: Family | int, directions=BOTH) -> str:
    """The iptables-restore document that captures a pod in an empty netns ("" when nothing is captured)."""
    rules = build_rules(config, family, directions)
    return _document(rules, chains=chains_for(directions)) if rules else ""


def capture_document(config: PodConfig, family: Family | int, live: Table, directions=BOTH) -> str:
    """The one transaction that makes `live` carry exactly our rules, whatever of ours it already has.

    Declaring our chains empties existing ones; jumps into them from other chains are deleted first (with
    the exact spelling iptables-save gave us) and the rendered ones appended, so nothing is duplicated.
    Chains of a direction this capture no longer covers are flushed and deleted in the same transaction.
    """
    rules = build_rules(config, family, directions)
    if not rules:
        return release_document(live) or ""
    chains = chains_for(directions)
    deletions = [Rule(chain, spec).line("-D") for chain, spec in live.jumps_to(OUR_CHAINS)]
    stale = [chain for chain in OUR_CHAINS if chain in live.chains and chain not in chains]
    # Flush all stale chains before deleting any: ISTIO_OUTPUT references ISTIO_REDIRECT.
    deletions += [f"-F {chain}" for chain in stale] + [f"-X {chain}" for chain in stale]
    return _document(rules, deletions, chains)


def release_document(live: Table) -> str | None:
    """The transaction that removes our jumps and chains from `live`; None when none of ours is there."""
    ours = [chain for chain in OUR_CHAINS if chain in live.chains]
    jumps = live.jumps_to(OUR_CHAINS)
    if not ours and not jumps:
        return None
    lines = [f"*{TABLE}"]
    lines += [Rule(chain, spec).line("-D") for chain, spec in jumps]
    # Flush all before deleting any: ISTIO_INBOUND and ISTIO_OUTPUT still reference ISTIO_IN_REDIRECT.
    lines += [f"-F {chain}" for chain in ours]
    lines += [f"-X {chain}" for chain in ours]
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def conntrack_hold_document(live: Table) -> str | None:
    """The transaction that adds the conntrack hold chain to `live`; None when it is already there as it must be."""
    if live.chain_rules(CONNTRACK_CHAIN) == [CONNTRACK_HOLD_SPEC]:
        return None
    return _document([Rule(CONNTRACK_CHAIN, CONNTRACK_HOLD_SPEC)], chains=(CONNTRACK_CHAIN,))


def conntrack_release_document(live: Table) -> str | None:
    """The transaction that removes the conntrack hold chain; None when `live` has none."""
    if CONNTRACK_CHAIN not in live.chains:
        return None
    return f"*{TABLE}\n-F {CONNTRACK_CHAIN}\n-X {CONNTRACK_CHAIN}\nCOMMIT\n"


def diff_rules(config: PodConfig, family: Family | int, live: Table, directions=BOTH) -> list[str]:
    """What is wrong with `live` compared with the rendered rules, one sentence per problem."""
    family = Family(family)
    label = f"{family.label} {TABLE}"
    expected = build_rules(config, family, directions)
    problems: list[str] = []
    if not expected:
        for chain in OUR_CHAINS:
            if chain in live.chains:
                problems.append(f"{label}: chain {chain} exists although capture is off")
        for chain, spec in live.jumps_to(OUR_CHAINS):
            problems.append(f"{label}: unexpected rule '-A {chain} {spec}' (capture is off)")
        return problems

    want: dict[str, list[str]] = {}
    for rule in expected:
        want.setdefault(rule.chain, []).append(rule.spec)
    chains = chains_for(directions)
    for chain in OUR_CHAINS:
        if chain not in chains:
            if chain in live.chains:
                problems.append(f"{label}: chain {chain} exists although that direction is not captured by iptables")
            continue
        if chain not in live.chains:
            problems.append(f"{label}: chain {chain} is missing")
            continue
        problems += _compare_chain(label, chain, want.get(chain, []), live.chain_rules(chain))

    have_jumps: dict[str, list[str]] = {}
    for chain, spec in live.jumps_to(OUR_CHAINS):
        have_jumps.setdefault(chain, []).append(spec)
    for chain in sorted(set(have_jumps) | (set(want) - set(OUR_CHAINS))):
        problems += _compare_chain(label, chain, want.get(chain, []), have_jumps.get(chain, []))
    return problems


def _compare_chain(label: str, chain: str, want: list[str], have: list[str]) -> list[str]:
    if want == have:
        return []
    problems = [f"{label}: missing rule '-A {chain} {spec}'" for spec in want if spec not in have]
    problems += [f"{label}: unexpected rule '-A {chain} {spec}'" for spec in have if spec not in want]
    for spec in set(have):
        extra = have.count(spec) - want.count(spec)
        if spec in want and extra > 0:
            problems.append(f"{label}: rule '-A {chain} {spec}' is present {extra} extra time(s)")
    if not problems:
        problems.append(f"{label}: chain {chain} has the right rules in the wrong order")
    return problems


def wanted_families(pod: PodNet) -> list[Family]:
    """IPv4 always; IPv6 only when the pod has an IPv6 address.

    A pod without one cannot send or receive IPv6 except on ::1, which is never captured; skipping ip6tables
    then avoids failing pods on nodes booted with ipv6.disable=1.
    """
    families = [Family.IPV4]
    if any(isinstance(ip, ipaddress.IPv6Address) for ip in pod.ips):
        families.append(Family.IPV6)
    return families


class IptablesInterceptor:
    """Capture pods with Istio's nat rules applied by iptables-restore inside each pod's netns."""

    mode = Mode.IPTABLES

    def __init__(self, backend: Backend | str | None = None):
        # Resolved on first use: detection runs two tools and must not slow down constructing the agent.
        self._requested = backend
        self._backend: Backend | None = None

    @property
    def backend(self) -> Backend:
        if self._backend is None:
            self._backend = ipt.detect_backend(self._requested)
        return self._backend

    def capture(self, pod: PodNet, directions=BOTH) -> None:
        """Capture `directions` of the pod (both by default); another backend may own the other one."""
        check_netns(pod.netns)
        wanted = wanted_families(pod)
        live = {family: ipt.save(pod.netns, family, self.backend, TABLE) for family in wanted}
        if directions and pod.config.mode is not Mode.OFF:
            self._hold_conntrack(pod, live)
        for family in Family:
            if family in wanted:
                if family is Family.IPV6:
                    self._add_ipv6_passthrough_address(pod)
                document = capture_document(pod.config, family, live[family], directions)
                if document:
                    ipt.restore(pod.netns, family, self.backend, document)
            elif ipt.family_available(family):
                # The pod lost its IPv6 address (or never had one): leave no stale IPv6 capture behind.
                self._release_family(pod, family)

    def release(self, pod: PodNet) -> bool:
        """Remove our chains and jumps, then the conntrack hold if no redirected connection is still open
        (see `drop_conntrack_hold`). Returns False when a connection keeps the hold, which a later
        `drop_conntrack_hold` must then drop; True when no hold is left."""
        try:
            check_netns(pod.netns)
        except NamespaceNotFound:
            return True  # the rules died with the namespace
        for family in Family:
            if ipt.family_available(family):
                self._release_family(pod, family)
        return self.drop_conntrack_hold(pod)

    def drop_conntrack_hold(self, pod: PodNet) -> bool:
        """Stop conntrack in a pod netns that iptables no longer captures; returns False only while an open
        redirected connection still needs the hold (True: gone, never there, or owned by a live capture).

        The hold must outlive the rules only while a connection they redirected is open (its translation
        lives in its conntrack entry). Once none is, the hold goes, and with it the per-packet conntrack and
        nat hooks a pod in eBPF mode would otherwise pay for as long as it keeps making connections. The
        netns's entries are flushed right after tracking stops, so none is left frozen for a later switch
        back to iptables to trip over. A pod still captured by iptables (either family, or one direction
        on a hybrid node) keeps its hold, which then belongs to that capture.
        Without conntrack-tools the open connections cannot be told apart, and the hold then waits until
        the netns has no conntrack entry at all.
        """
        hold = self._conntrack_hold(pod)
        if hold.needed:
            return False
        if hold.holding and not hold.owned:
            for family in hold.holding:
                document = conntrack_release_document(hold.live[family])
                if document:
                    ipt.restore(pod.netns, family, self.backend, document)
            if hold.tells_connections_apart:
                ipt.conntrack_flush(pod.netns)
        return True

    def conntrack_hold_needed(self, pod: PodNet) -> bool:
        """Whether an open connection the rules redirected still needs the pod's conntrack hold: the
        read-only half of `drop_conntrack_hold`, which the agent asks without holding up anything else
        (it lists the netns's conntrack table) and follows with the drop only when the answer is no."""
        return self._conntrack_hold(pod).needed

    def _conntrack_hold(self, pod: PodNet) -> _ConntrackHold:
        try:
            check_netns(pod.netns)
        except NamespaceNotFound:
            return _ConntrackHold()
        families = [family for family in Family if ipt.family_available(family)]
        live = {family: ipt.save(pod.netns, family, self.backend, TABLE) for family in families}
        holding = tuple(family for family in families if CONNTRACK_CHAIN in live[family].chains)
        if not holding:
            return _ConntrackHold()
        if any(set(OUR_CHAINS) & set(table.chains) for table in live.values()):
            return _ConntrackHold(live=live, holding=holding, owned=True)
        still_open = ipt.conntrack_redirected_open(pod.netns)
        if still_open is None:
            needed = ipt.conntrack_count(pod.netns) != 0
        else:
            needed = still_open > 0
        return _ConntrackHold(live=live, holding=holding, needed=needed,
                              tells_connections_apart=still_open is not None)

    def counters(self, pod: PodNet) -> dict[str, int]:
        """The pod's capture counters from its rules' own packet counts, named like the eBPF datapath's.

        The nat table sees only the first packet of each connection, so a rule's packet count is the number
        of connections it decided: REDIRECT in ISTIO_REDIRECT (outbound_captured) and ISTIO_IN_REDIRECT
        (inbound_steered), RETURN in ISTIO_OUTPUT and ISTIO_INBOUND (bypassed: the proxy's own connections,
        loopback, excluded ports and CIDRs). Summed over the pod's IP families. The counts live in the rules,
        so they start from zero whenever the pod enters iptables mode; a pod without our rules counts nothing.
        """
        totals = {"outbound_captured": 0, "inbound_steered": 0, "bypassed": 0}
        try:
            check_netns(pod.netns)
        except NamespaceNotFound:
            return totals
        for family in wanted_families(pod):  # capture writes no rules for a family the pod has no address in
            if not ipt.family_available(family):
                continue
            for chain, spec, packets, _bytes in ipt.rule_counters(pod.netns, family, self.backend, TABLE):
                target = ipt.rule_target(spec)
                if target == "REDIRECT" and chain == REDIRECT:
                    totals["outbound_captured"] += packets
                elif target == "REDIRECT" and chain == IN_REDIRECT:
                    totals["inbound_steered"] += packets
                elif target == "RETURN" and chain in (OUTPUT, INBOUND):
                    totals["bypassed"] += packets
        return totals

    def conntrack_held(self, pod: PodNet) -> bool:
        """Whether the pod netns still has the conntrack hold, in either family."""
        return any(CONNTRACK_CHAIN in ipt.save(pod.netns, family, self.backend, TABLE).chains
                   for family in Family if ipt.family_available(family))

    def verify(self, pod: PodNet, directions=BOTH) -> list[str]:
        try:
            check_netns(pod.netns)
        except NamespaceNotFound as exc:
            return [str(exc)]
        problems: list[str] = []
        wanted = wanted_families(pod)
        for family in Family:
            if not ipt.family_available(family):
                continue
            live = ipt.save(pod.netns, family, self.backend, TABLE)
            config = pod.config if family in wanted else pod.config.with_mode(Mode.OFF)
            problems += diff_rules(config, family, live, directions)
            if family in wanted and build_rules(config, family, directions) and conntrack_hold_document(live):
                problems.append(f"{family.label} {TABLE}: chain {CONNTRACK_CHAIN} (conntrack kept on across "
                                f"mode switches) is missing or altered")
        if directions and pod.config.mode is not Mode.OFF and ipt.conntrack_tcp_loose(pod.netns) is not False:
            problems.append("nf_conntrack_tcp_loose is not 0 in the pod netns: a switch from eBPF would "
                            "redirect connections conntrack adopts mid-stream")
        return problems

    def _hold_conntrack(self, pod: PodNet, live: dict[Family, Table]) -> None:
        """Keep conntrack tracking in the pod netns from now on, without adopting connections mid-stream.

        Runs before any REDIRECT rule exists, and sets the sysctl before the hold starts tracking: an
        adopted connection's entry can even face the wrong way (made from the pod's own ACK), and a later
        SYN of the same 4-tuple then counts as invalid and passes untranslated. The sysctl only exists once
        nf_conntrack is loaded, which on a node that never used conntrack is the hold's own doing: then it
        is set right after.
        """
        loose = ipt.conntrack_tcp_loose(pod.netns)
        if loose:
            ipt.set_conntrack_tcp_loose(pod.netns, False)
        for family, table in live.items():
            document = conntrack_hold_document(table)
            if document:
                ipt.restore(pod.netns, family, self.backend, document)
        if loose is None:
            ipt.set_conntrack_tcp_loose(pod.netns, False)

    def _release_family(self, pod: PodNet, family: Family) -> None:
        document = release_document(ipt.save(pod.netns, family, self.backend, TABLE))
        if document:
            ipt.restore(pod.netns, family, self.backend, document)

    @staticmethod
    def _add_ipv6_passthrough_address(pod: PodNet) -> None:
        """Put ::6 on lo like istio-iptables does: IPv6 loopback is one /128, so the proxy could not bind its
        passthrough source otherwise. `replace` makes it idempotent; release leaves it (it captures nothing)."""
        proc = run_in_netns(
            pod.netns,
            ["ip", "-6", "addr", "replace", IPV6_PASSTHROUGH_ADDRESS, "dev", "lo"],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            raise SysError(
                f"cannot add {IPV6_PASSTHROUGH_ADDRESS} to lo in {pod.netns}: {proc.stderr.strip()}"
            )
