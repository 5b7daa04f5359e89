"""A captured lab for a module's tests: up once, down after, and proof that no BPF pin outlived it.

Shared by the root tests that need two captured pods (`test_lab_capture`, `test_splice`,
`test_origdst_stress`): skips without bcc, rolls back a half-built lab, and after `lab down` asserts the
lab's bpffs directory is gone, so a test module can never leave pinned programs behind.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import pytest

from meshcni.lab import lab as lab_core
from meshcni.lab.state import LabError

try:
    import bcc  # noqa: F401

    HAVE_BCC = True
except ImportError:
    HAVE_BCC = False


@contextmanager
def captured_lab(name: str, **options):
    """`with captured_lab(name) as state:` a captured lab for the block, removed after it."""
    if not HAVE_BCC:
        pytest.skip("bcc (python3-bpfcc) is not installed")
    try:
        state = lab_core.up(lab_core.LabOptions(name=name, capture=True, **options))
    except LabError:
        lab_core.down(name)
        raise
    try:
        yield state
    finally:
        pin_dir = state.bpf_pin_dir
        lab_core.down(name)
        assert not Path(pin_dir).exists(), f"{pin_dir} left behind"
