"""Denial-of-service regressions: slowloris, auth-attempt and connection floods stay bounded
by the limits, and service comes back for legitimate users."""

from __future__ import annotations

import json
import subprocess
import time

from tests.helpers import TIMEOUT, Admin, banner, keygen, raw, settle


def test_unauthenticated_flood_is_closed_before_the_banner(tight, tight_user):
    held = [raw(tight) for _ in range(3)]
    try:
        assert all(banner(s).startswith(b"SSH-2.0-git-gateway") for s in held)
        refused = raw(tight)
        assert banner(refused) == b""  # closed before any banner, as OpenSSH past MaxStartups
        refused.close()
        result = tight_user.ssh()
        assert result.returncode == 255
        assert "Connection closed" in result.stderr or "reset" in result.stderr
        # Slowloris: the held connections are dropped at the login grace time (2 s).
        started = time.monotonic()
        assert all(s.recv(4096) == b"" for s in held)
        assert time.monotonic() - started < 10
    finally:
        for s in held:
            s.close()
    settle(tight)
    assert tight_user.ssh().returncode == 0  # and service is back


def test_auth_attempt_flood(tight, tight_user, tmp_path):
    keys = [keygen(tmp_path / f"flood{i}") for i in range(6)]
    identities = [a for key in keys for a in ("-i", str(key))]
    base = [*tight_user.ssh_base[:3], *tight_user.ssh_base[5:]]
    flood = [
        subprocess.Popen(
            [*base, *identities, "-T", "git@127.0.0.1"],
            env=tight_user.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(12)
    ]
    outcomes = [proc.communicate(timeout=TIMEOUT) for proc in flood]
    assert all(proc.returncode == 255 for proc in flood)
    # Each was cut at the attempt limit (or refused at the login cap while others were busy).
    for _, err in outcomes:
        assert b"Too many authentication failures" in err or b"closed" in err or b"reset" in err
    settle(tight)
    assert tight_user.ssh().returncode == 0
    events = json.loads(Admin(tight.config_path).ok("audit", "--json", "--limit", "500"))
    reasons = {e["detail"].get("reason") for e in events if e["event"] == "auth_failed"}
    assert "too many authentication attempts" in reasons


def test_connection_flood_is_bounded(tight, tight_user):
    flood = []
    try:
        for _ in range(200):
            flood.append(raw(tight))
        greeted = sum(1 for sock in flood if banner(sock))
        assert greeted <= 3  # max_unauthenticated; the rest were closed before the banner
        assert tight.gateway.admission.total <= 8
    finally:
        for sock in flood:
            sock.close()
    settle(tight)
    started = time.monotonic()
    assert tight_user.ssh().returncode == 0
    assert time.monotonic() - started < 30
