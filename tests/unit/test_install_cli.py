"""`meshcni install-cni` as a user runs it: flags, exit codes, clean stdout, and SIGTERM of a watching process.

The plugin installed is a small fake executable script created in tmp (the real bundle is built elsewhere).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from meshcni.cli.main import main

CONFLIST = b'{"cniVersion": "1.0.0", "name": "net",\n "plugins": [{"type": "bridge"}, {"type": "portmap"}]}'


@pytest.fixture
def node(tmp_path: Path) -> Path:
    (tmp_path / "net.d").mkdir()
    (tmp_path / "net.d" / "10-net.conflist").write_bytes(CONFLIST)
    plugin = tmp_path / "fake-meshcni"
    plugin.write_text("#!/bin/sh\necho fake\n")
    plugin.chmod(0o755)
    return tmp_path


def flags(node: Path, *extra: str) -> list[str]:
    return ["install-cni", "--conf-dir", str(node / "net.d"), "--bin-dir", str(node / "bin"),
            "--state-dir", str(node / "state"), *extra]


def invoke(args: list[str]):
    return CliRunner().invoke(main, args, catch_exceptions=False)


def test_install_once_then_uninstall_with_clean_stdout(node: Path) -> None:
    result = invoke(flags(node, "--plugin-source", str(node / "fake-meshcni"), "--no-watch",
                          "--failure-policy", "closed", "--agent-socket", "/run/meshcni.sock",
                          "--plugin-log-level", "debug"))
    assert result.exit_code == 0, result.stderr
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert lines and all(line.startswith("ts=") and " level=" in line and " msg=" in line for line in lines)
    doc = json.loads((node / "net.d" / "10-net.conflist").read_bytes())
    assert doc["plugins"][-1] == {"type": "meshcni", "agentSocket": "/run/meshcni.sock",
                                  "failurePolicy": "closed", "logLevel": "debug"}
    result = invoke(flags(node, "--uninstall"))
    assert result.exit_code == 0, result.stderr
    assert result.stdout == ""
    assert (node / "net.d" / "10-net.conflist").read_bytes() == CONFLIST
    assert not (node / "bin" / "meshcni").exists()


@pytest.mark.parametrize("extra,code,message", [
    ([], 2, "--plugin-source is required"),
    (["--plugin-source", "PLUGIN", "--failure-policy", "sometimes"], 2, "'sometimes' is not one of"),
    (["--plugin-source", "PLUGIN", "--conf-name", "../etc/x.conflist"], 2, "must be a file name"),
    (["--plugin-source", "PLUGIN", "--conf-name", "net.yaml"], 2, "must be a file name"),
    (["--plugin-source", "/nonexistent/meshcni", "--no-watch"], 1, "plugin source /nonexistent/meshcni does not exist"),
    (["--plugin-source", "PLUGIN", "--no-watch", "--conf-name", "99-missing.conflist"], 1,
     "no valid CNI network config"),
])
def test_bad_input_gives_a_clear_message_and_nonzero_exit(node: Path, extra: list[str], code: int,
                                                         message: str) -> None:
    args = [a.replace("PLUGIN", str(node / "fake-meshcni")) for a in extra]
    result = invoke(flags(node, *args))
    assert result.exit_code == code
    assert message in result.stderr
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    assert (node / "net.d" / "10-net.conflist").read_bytes() == CONFLIST


def test_sigterm_of_a_watching_process_uninstalls(node: Path) -> None:
    primary = node / "net.d" / "10-net.conflist"
    code = "import sys; from meshcni.cli.main import main; main(sys.argv[1:], prog_name='meshcni')"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *flags(node, "--plugin-source", str(node / "fake-meshcni"))],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=Path(__file__).resolve().parents[2])
    try:
        deadline = time.monotonic() + 30
        while b'"meshcni"' not in primary.read_bytes():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the watching process never inserted the entry"
            time.sleep(0.02)
        assert (node / "bin" / "meshcni").exists()
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stderr.decode()
    assert stdout == b""
    assert b"meshcni uninstalled" in stderr
    assert primary.read_bytes() == CONFLIST
    assert not os.path.lexists(node / "bin" / "meshcni")
    assert os.listdir(node / "bin") == []
