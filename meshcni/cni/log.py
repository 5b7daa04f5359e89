"""The plugin's logger: stderr and, when configured, an append-only log file; never stdout.

Stdout belongs to the CNI result, so nothing here can reach it. A tiny writer rather than the logging
module: the plugin logs a handful of lines per exec and every millisecond of import counts on ADD.
"""

from __future__ import annotations

import os
import sys
import time
from typing import TextIO

_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}


class PluginLog:
    def __init__(self, stderr: TextIO | None = None, stderr_level: str = "warning"):
        self._stderr = stderr if stderr is not None else sys.stderr
        self._stderr_level = _LEVELS[stderr_level]
        self._file_path = ""
        self._file_level = _LEVELS["info"]
        self.context = ""

    def to_file(self, path: str, level: str) -> None:
        """Also append to `path` (created 0600 with its directory); failing to open it is only a warning."""
        if not path:
            return
        try:
            os.makedirs(os.path.dirname(path) or "/", exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            os.close(fd)
        except OSError as exc:
            self.warning(f"cannot open logFile {path}: {exc.strerror}")
            return
        self._file_path = path
        self._file_level = _LEVELS[level]

    def debug(self, msg: str) -> None:
        self._emit(10, "debug", msg)

    def info(self, msg: str) -> None:
        self._emit(20, "info", msg)

    def warning(self, msg: str) -> None:
        self._emit(30, "warning", msg)

    def error(self, msg: str) -> None:
        self._emit(40, "error", msg)

    def _emit(self, level: int, name: str, msg: str) -> None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
        line = f"{stamp} meshcni-cni[{os.getpid()}] {name}: {self.context}{msg}\n"
        if level >= self._stderr_level:
            try:
                self._stderr.write(line)
                self._stderr.flush()
            except (OSError, ValueError):
                pass  # a closed stderr must not turn a good result into a failure
        if self._file_path and level >= self._file_level:
            try:
                with open(self._file_path, "a", encoding="utf-8") as f:
                    f.write(line)
            except OSError:
                pass
