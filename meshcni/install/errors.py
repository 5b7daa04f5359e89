"""Domain errors of install-cni; each message names the file or flag at fault and why, for a human to act on."""

from __future__ import annotations


class InstallError(RuntimeError):
    """install-cni cannot do what it was asked; the message says what and where."""


class InvalidConfig(InstallError):
    """A CNI network config file the runtime would reject (bad JSON, no type, no plugins, ...)."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class PluginSourceError(InstallError):
    """The plugin bundle to install is missing or is not an executable (or a directory holding one)."""


class FileVanished(InstallError):
    """A file we were updating was deleted under us; the next pass looks at the directory afresh."""
