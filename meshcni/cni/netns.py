"""Validation of the CNI_NETNS path: absolute, no "..", existing, and really a network namespace.

A path can name a regular file, a directory or another namespace type (/proc/self/ns/mnt) and still
exist, so existence is not enough: the file is opened and asked for its namespace type with the nsfs ioctl
NS_GET_NSTYPE (Linux >= 4.11), which fails with ENOTTY on anything that is not a namespace file. The
open uses O_NONBLOCK so that a FIFO at the path cannot hang the plugin.
"""

from __future__ import annotations

import errno
import fcntl
import os

NS_GET_NSTYPE = 0xB703  # _IO(0xb7, 0x3), include/uapi/linux/nsfs.h
CLONE_NEWNET = 0x40000000


class NetnsInvalid(Exception):
    """The path is malformed or names something that is not a network namespace."""


class NetnsMissing(Exception):
    """Nothing exists at the path (the container is gone)."""


def check_path_shape(path: str) -> None:
    """Absolute and free of ".." components: a runtime never hands out anything else."""
    if not path.startswith("/"):
        raise NetnsInvalid(f"netns path {path!r} is not absolute")
    if ".." in path.split("/"):
        raise NetnsInvalid(f"netns path {path!r} contains '..'")
    if "\0" in path:
        raise NetnsInvalid("netns path contains a NUL byte")


def check_netns(path: str) -> None:
    """Raise NetnsInvalid / NetnsMissing unless `path` is a network namespace file."""
    check_path_shape(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    except FileNotFoundError:
        raise NetnsMissing(f"netns {path} does not exist") from None
    except NotADirectoryError:
        raise NetnsMissing(f"netns {path} does not exist (a parent is not a directory)") from None
    except OSError as exc:
        raise NetnsInvalid(f"cannot open netns {path}: {exc.strerror}") from None
    try:
        try:
            nstype = fcntl.ioctl(fd, NS_GET_NSTYPE)
        except OSError as exc:
            if exc.errno in (errno.ENOTTY, errno.EINVAL):
                raise NetnsInvalid(f"{path} is not a namespace file") from None
            raise NetnsInvalid(f"cannot query namespace type of {path}: {exc.strerror}") from None
    finally:
        os.close(fd)
    if nstype != CLONE_NEWNET:
        raise NetnsInvalid(f"{path} is a namespace but not a network namespace (type {nstype:#x})")
