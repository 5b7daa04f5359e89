"""Domain errors raised by the system layer; each message says what was attempted and on what."""

from __future__ import annotations


class SysError(RuntimeError):
    """A system operation failed; the message names the operation and its target."""


class NamespaceNotFound(SysError):
    """A network-namespace path does not exist or is not a network namespace."""


class CgroupError(SysError):
    """A cgroup v2 directory is missing, not cgroup v2, or cannot be changed."""


class BpfError(SysError):
    """A bpf(2) operation failed."""

    def __init__(self, message: str, errno: int | None = None):
        super().__init__(message)
        self.errno = errno


class FeatureMissing(BpfError):
    """The running kernel lacks something the datapath needs; the message names the feature."""
