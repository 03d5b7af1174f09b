"""Operator logs: key=value text lines or JSON lines on stderr."""

from __future__ import annotations

import json
import logging
import re
import sys
import time
import warnings

_PAIR = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S*)')


def _unquote(value: str) -> str:
    if value.startswith('"'):
        try:
            return str(json.loads(value))
        except ValueError:
            return value.strip('"')
    return value


class JSONFormatter(logging.Formatter):
    """One JSON object per line; key=value pairs in the message become fields."""

    def __init__(self, worker: int | None = None) -> None:
        super().__init__()
        self.worker = worker

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        entry: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        if self.worker is not None:
            entry["worker"] = self.worker
        entry["msg"] = message
        entry.update({k: _unquote(v) for k, v in _PAIR.findall(message) if k not in entry})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, separators=(",", ":"))


def _log_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: object = None,
    line: str | None = None,
) -> None:
    logging.getLogger("gateway.warnings").warning(
        "event=python_warning category=%s where=%s message=%s",
        category.__name__,
        q(f"{filename}:{lineno}"),
        q(str(message)),
    )


def capture_warnings() -> None:
    """Python warnings become one log line each (JSON in JSON mode), never free text on
    stderr: the known noise of dependencies is filtered where it is raised (gateway/__init__)."""
    warnings.showwarning = _log_warning


def setup(level: str = "info", fmt: str = "text", worker: int | None = None) -> None:
    """Log to stderr; a worker of `serve --workers N` tags each line with its number."""
    capture_warnings()
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JSONFormatter(worker))
    else:
        tag = f"worker={worker} " if worker is not None else ""
        formatter = logging.Formatter(
            f"%(asctime)s.%(msecs)03dZ %(levelname)s %(name)s {tag}%(message)s",
            "%Y-%m-%dT%H:%M:%S",
        )
        formatter.converter = time.gmtime
        handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # asyncssh logs every packet-level step at INFO; keep its warnings only.
    logging.getLogger("asyncssh").setLevel(logging.WARNING)


_BARE = re.compile(r"[A-Za-z0-9_.:/@+,-]+")


def q(value: object) -> str:
    """Render a log value so that key=value lines stay parseable whatever the client sent."""
    text = "-" if value is None else str(value)
    return text if _BARE.fullmatch(text) else json.dumps(text)


# Repetitive warnings (accept errors, refused connections, timeouts): at most one line per
# key and interval.
LOG_INTERVAL = 60.0


class Throttle:
    """Lets one log line per key through per `interval` seconds; the next one that passes
    learns how many were held back meanwhile."""

    def __init__(self, interval: float = LOG_INTERVAL) -> None:
        self.interval = interval
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def allow(self, key: str) -> int | None:
        """None if this line must be held back, else how many were held back before it."""
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self._held[key] = self._held.get(key, 0) + 1
            return None
        self._last[key] = now
        return self._held.pop(key, 0)
