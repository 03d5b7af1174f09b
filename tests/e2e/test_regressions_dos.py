"""Denial-of-service regressions: slowloris, auth-attempt and connection floods stay bounded
by the limits, and service comes back for legitimate users."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from pathlib import Path

import asyncssh

from tests.helpers import (
    TIMEOUT,
    Admin,
    Client,
    ServeProcess,
    banner,
    keygen,
    raw,
    settle,
    ssh_connect,
    unique,
    write_config,
)


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
    tight.call(tight.gateway.domain.access.flush_failures(everything=True))  # minute-end write
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


def vm_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def bare_open(conn: asyncssh.SSHClientConnection) -> asyncssh.SSHClientChannel | None:
    """Open a session channel and send nothing on it (no exec, shell or subsystem request):
    the channel if the server accepted it, None if it refused it."""
    loop = asyncio.get_running_loop()
    chan = asyncssh.SSHClientChannel(conn, loop, "strict", None, "strict", 2 * 1024 * 1024, 32768)
    try:
        await chan._open(b"session")
    except asyncssh.ChannelOpenError as exc:
        assert exc.code == asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED
        assert exc.reason == "too many sessions on this connection (limit 10)"
        return None
    return chan


async def flood_bare_channels(port: int, key: Path, pid: int, name: str, app: str) -> int:
    """With the connection's 10 sessions busy, open 20,000 more channels; return the
    server's RSS growth in KiB between the first 2,000 refused opens and the last."""
    async with ssh_connect(port, key) as conn:
        command = f"git-upload-pack '{app}.git'"
        busy = [await conn.create_process(command, encoding=None) for _ in range(10)]
        for process in busy:
            assert await asyncio.wait_for(process.stdout.read(4), TIMEOUT)
        refused, baseline = 0, 0
        for batch in range(20):
            results = await asyncio.gather(*(bare_open(conn) for _ in range(1000)))
            refused += results.count(None)
            if batch == 1:  # after the first 2,000: the process has warmed up
                baseline = vm_rss_kib(pid)
        assert refused == 20_000  # every open past the limit was refused
        grown = vm_rss_kib(pid) - baseline
        for process in busy:
            process.stdin.write(b"0000")
            process.stdin.write_eof()
            await asyncio.wait_for(process.wait(), TIMEOUT)
        # Channels that ask for nothing count too, and are closed after the timeout.
        idle = [await bare_open(conn) for _ in range(10)]
        assert all(chan is not None for chan in idle)
        assert await bare_open(conn) is None
        started = time.monotonic()
        await asyncio.wait_for(asyncio.gather(*(c.wait_closed() for c in idle)), TIMEOUT)
        assert time.monotonic() - started > 1  # closed by the timeout (3 s), not at once
        # Their slots are free again: a command runs on the same connection.
        result = await asyncio.wait_for(conn.run("info"), TIMEOUT)
        assert result.exit_status == 0 and f"Hi {name}!" in result.stdout
    return grown


def test_regression_bare_channel_flood_is_bounded(tmp_path):
    config = write_config(tmp_path / "gw", limits={"channel_request_timeout": 3})
    gateway = ServeProcess(config)
    try:
        admin = Admin(config)
        name, app = unique("flood"), unique("floodapp")
        key = keygen(tmp_path / "id")
        admin.ok("user", "add", name)
        admin.ok("key", "add", name, "k", f"{key}.pub")
        admin.ok("app", "create", app, "--owner", name)
        grown = asyncio.run(flood_bare_channels(gateway.port, key, gateway.proc.pid, name, app))
        assert grown < 4 * 1024, f"server RSS grew by {grown} KiB over 18,000 refused opens"
        # And a normal clone on a fresh connection works.
        client = Client(tmp_path / "home", key, gateway, name=name)
        client.git("clone", "-q", client.url(app), str(tmp_path / "clone"))
    finally:
        assert gateway.stop() == 0
    log = gateway.stderr
    assert log.count("reason=max_sessions_per_connection") == 1  # one line, not 20,000
    assert "channels_refused=20001 channels_timed_out=10" in log
