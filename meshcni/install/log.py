"""One-line structured (logfmt) logs on stderr for install-cni.

stdout stays clean because the install container's output is read by humans and log shippers alike, and
`key=value` lines are both readable and parseable. Callers pass fields as keyword arguments:
`event(log, logging.INFO, "inserted meshcni entry", file=path)`.
"""

from __future__ import annotations

import logging
import sys
import time

LOGGER_NAME = "meshcni.install"


def logger() -> logging.Logger:
    return logging.getLogger(LOGGER_NAME)


def event(log: logging.Logger, level: int, msg: str, **fields: object) -> None:
    log.log(level, msg, extra={"fields": fields})


def _quote(value: object) -> str:
    text = str(value)
    if text and not any(c in text for c in ' "=\\\n\t'):
        return text
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t")
    return f'"{escaped}"'


class LogfmtFormatter(logging.Formatter):
    """`ts=... level=... logger=... msg="..." k=v ...` on one line, newlines escaped."""

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        parts = [f"ts={ts}", f"level={record.levelname.lower()}", f"logger={record.name}",
                 f"msg={_quote(record.getMessage())}"]
        for key, value in (getattr(record, "fields", None) or {}).items():
            parts.append(f"{key}={_quote(value)}")
        if record.exc_info:
            parts.append(f"exc={_quote(self.formatException(record.exc_info))}")
        return " ".join(parts)


class _CurrentStderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time of the record (it may be replaced, e.g. by click's test
    runner or a daemonizing wrapper), never to a stream captured once and closed since."""

    @property  # type: ignore[override]
    def stream(self):  # noqa: D401
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def configure_stderr(level: int = logging.INFO) -> None:
    """Send install-cni logs to stderr in logfmt; idempotent (a second call only changes the level)."""
    log = logger()
    log.setLevel(level)
    log.propagate = False
    if not any(getattr(h, "_meshcni_stderr", False) for h in log.handlers):
        handler = _CurrentStderrHandler()
        handler.setFormatter(LogfmtFormatter())
        handler._meshcni_stderr = True  # type: ignore[attr-defined]
        log.addHandler(handler)
