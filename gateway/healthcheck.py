"""`python -m gateway.healthcheck`: exit 0 if this node's /readyz says ready (a HEALTHCHECK)."""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from typing import TextIO

from . import config
from .errors import ConfigError

# Under the container's --timeout (10 s): /readyz bounds its own checks to a few seconds.
TIMEOUT = 8.0

# A wildcard listen address is reached on the loopback of the same family.
LOOPBACK = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}  # noqa: S104 - mapped away


def probe_url(cfg: config.Config) -> str | None:
    """/readyz on the monitoring listener if there is one, else on the main HTTP listener."""
    listen = cfg.http.monitoring_listen or cfg.http.listen
    if listen is None:
        return None
    host, port = listen
    host = LOOPBACK.get(host, host)
    return f"http://[{host}]:{port}/readyz" if ":" in host else f"http://{host}:{port}/readyz"


def check(url: str, out: TextIO) -> int:
    """GET the probe; one line saying what it answered; 0 when ready."""
    # No proxy: HTTP(S)_PROXY set for webhooks must not route the probe elsewhere.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=TIMEOUT) as reply:
            out.write(f"ready ({url})\n")
            return 0 if reply.status == 200 else 1
    except urllib.error.HTTPError as exc:
        out.write(f"not ready ({url}): {_failed_checks(exc.read())}\n")
    except OSError as exc:
        out.write(f"no answer from {url}: {getattr(exc, 'reason', None) or exc}\n")
    return 1


def _failed_checks(body: bytes) -> str:
    try:
        checks = json.loads(body)["checks"]
        return ", ".join(f"{name}: {value}" for name, value in checks.items() if value != "ok")
    except (ValueError, KeyError, TypeError, AttributeError):
        return body[:200].decode("utf-8", "replace")


def main(out: TextIO = sys.stdout) -> int:
    try:
        url = probe_url(config.load())
    except ConfigError as exc:
        out.write(f"{exc}\n")
        return 1
    if url is None:
        out.write("[http] listen is empty: no readiness probe to ask\n")
        return 1
    return check(url, out)


if __name__ == "__main__":
    sys.exit(main())
