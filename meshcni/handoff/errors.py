"""Domain errors of the listener handoff: what failed and for which pod or socket path."""

from __future__ import annotations

from meshcni.sys.errors import SysError


class HandoffError(SysError):
    """Listeners could not be created, served, fetched or placed; the message says which and why."""


class HandoffRefused(HandoffError):
    """The handoff server refused this peer (wrong uid, wrong network namespace, bad request)."""


class UpgradeError(HandoffError):
    """A proxy upgrade or restart did not complete (the new proxy never became ready, or the old never left)."""
