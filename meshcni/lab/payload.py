"""The deterministic bytes the lab serves and sends, so a test can check a 1 MiB body byte for byte.

Block i (32 bytes) is sha256 of the counter i: no two blocks repeat, so a reordered, dropped or duplicated
chunk anywhere in a stream changes the digest, which a repeating pattern would not reveal.
"""

from __future__ import annotations

import hashlib

BLOCK = 32


def payload(n: int) -> bytes:
    """The first `n` bytes of the lab payload."""
    if n < 0:
        raise ValueError("payload size must be >= 0")
    blocks = (n + BLOCK - 1) // BLOCK
    return b"".join(hashlib.sha256(i.to_bytes(8, "big")).digest() for i in range(blocks))[:n]


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
