"""The plugin's own capture for failurePolicy "iptables": Istio's nat rules written without the agent.

When the agent cannot be reached at ADD, the plugin applies the rules meshcni's iptables backend renders
(`IptablesInterceptor` over a `PodNet`) inside the pod's netns, so the pod starts captured instead of
blocked or bypassing the mesh; the agent later adopts it (make-before-break into the node's mode). The
plugin sees no annotations, so the pod gets the node defaults of `PodConfig` — proxy uid/gid 1337,
outbound 15001, inbound 15006, Istio's always-excluded inbound ports — plus the two exclusions the network
config may give under `iptablesFallback` (`excludeInboundPorts`, `excludeOutboundPorts`). The datapath
modules are imported only inside these methods: a normal ADD, which never falls back, does not pay for them.
A capture that fails is undone and the undo verified, so a failed ADD leaves no rule of ours behind.
"""

from __future__ import annotations

from typing import Protocol, Sequence


class FallbackError(Exception):
    """The fallback could not capture or release a pod; the message names the netns and the cause."""


class Fallback(Protocol):
    """What the plugin core needs for failurePolicy "iptables"; `IptablesFallback` is the real one."""

    def capture(self, container_id: str, netns: str, ips: Sequence[str], exclude_inbound: Sequence[int],
                exclude_outbound: Sequence[int]) -> None: ...

    def release(self, container_id: str, netns: str) -> None: ...


class IptablesFallback:
    """Capture and release a pod with meshcni's own iptables interceptor, from inside the plugin process."""

    def __init__(self, interceptor_factory=None):
        # The factory lets unit tests hand in a recording interceptor; the real one is built lazily.
        self._factory = interceptor_factory

    def _interceptor(self):
        if self._factory is not None:
            return self._factory()
        try:
            from meshcni.datapath.iptables import IptablesInterceptor
        except ImportError as exc:
            # A plugin bundle built without the datapath modules (scripts/build-plugin.sh excludes) cannot
            # fall back; say so instead of failing as an internal error.
            raise FallbackError(f"this meshcni plugin build has no iptables fallback: {exc}") from None
        return IptablesInterceptor()

    def capture(self, container_id: str, netns: str, ips: Sequence[str], exclude_inbound: Sequence[int] = (),
                exclude_outbound: Sequence[int] = ()) -> None:
        interceptor = self._interceptor()
        from meshcni.sys.errors import SysError

        pod = pod_net(container_id, netns, ips, exclude_inbound, exclude_outbound)
        try:
            interceptor.capture(pod)
        except (SysError, OSError) as exc:
            # One restore per address family is atomic, but IPv4 may have gone in before IPv6 failed.
            leftovers = _undo(interceptor, pod)
            tail = f"; undo left: {'; '.join(leftovers)}" if leftovers else "; nothing left behind"
            raise FallbackError(f"iptables capture in netns {netns} failed: {exc}{tail}") from None

    def release(self, container_id: str, netns: str) -> None:
        interceptor = self._interceptor()
        from meshcni.sys.errors import SysError

        try:
            interceptor.release(pod_net(container_id, netns, ()))
        except (SysError, OSError) as exc:
            raise FallbackError(f"cannot remove the fallback iptables rules in netns {netns}: {exc}") from None


def pod_net(container_id: str, netns: str, ips: Sequence[str], exclude_inbound: Sequence[int] = (),
            exclude_outbound: Sequence[int] = ()):
    """The `PodNet` the fallback captures: node defaults in iptables mode plus the config's exclusions."""
    import ipaddress

    from meshcni.config import Mode, PodConfig
    from meshcni.datapath.interceptor import PodNet

    config = PodConfig(mode=Mode.IPTABLES, exclude_inbound_ports=tuple(exclude_inbound),
                       exclude_outbound_ports=tuple(exclude_outbound))
    addresses = tuple(ipaddress.ip_interface(ip).ip for ip in ips)
    return PodNet(key=container_id, netns=netns, ips=addresses, config=config)


def _undo(interceptor, pod) -> list[str]:
    """Release what a failed capture may have written, then check that none of it survived."""
    from meshcni.config import Mode
    from meshcni.sys.errors import NamespaceNotFound, SysError

    try:
        interceptor.release(pod)
    except (SysError, OSError) as exc:
        return [f"release failed: {exc}"]
    try:
        problems = interceptor.verify(_replace_config(pod, pod.config.with_mode(Mode.OFF)))
    except NamespaceNotFound:
        return []  # the rules died with the namespace
    except (SysError, OSError) as exc:
        return [f"cannot verify the undo: {exc}"]
    return problems


def _replace_config(pod, config):
    from dataclasses import replace

    return replace(pod, config=config)
