"""`python -m gateway serve` as a real process: start log, host keys, restart, stop, errors."""

from __future__ import annotations

import os
import re
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import Admin, ServeProcess, keygen, keygen_fingerprint, run, write_config


def ssh_welcome(port: int, key: Path, known_hosts: Path) -> subprocess.CompletedProcess[str]:
    return run(
        [
            "ssh",
            "-F",
            "/dev/null",
            "-i",
            str(key),
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            "IdentityAgent=none",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            f"UserKnownHostsFile={known_hosts}",
            "-p",
            str(port),
            "-T",
            "git@127.0.0.1",
        ],
        env={"PATH": os.environ["PATH"], "HOME": str(known_hosts.parent)},
    )


def test_start_log_host_keys_restart_and_sigterm(tmp_path):
    config = write_config(tmp_path)
    admin = Admin(config)
    key = keygen(tmp_path / "alice_id")
    admin.ok("user", "add", "alice")
    admin.ok("key", "add", "alice", "laptop", f"{key}.pub")

    first = ServeProcess(config)
    port = first.port
    assert port > 0
    key_dir = tmp_path / "hostkeys"
    pubs = sorted(key_dir.glob("*.pub"))
    assert [p.name for p in pubs] == ["ssh_host_ed25519_key.pub", "ssh_host_rsa_key.pub"]
    logged = re.findall(r"fingerprint=(SHA256:\S+)", "".join(first.lines))
    assert sorted(logged) == sorted(keygen_fingerprint(p) for p in pubs)
    for private in key_dir.glob("ssh_host_*_key"):
        assert stat.S_IMODE(private.stat().st_mode) == 0o600

    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(
        "".join(f"[127.0.0.1]:{port} {' '.join(p.read_text().split()[:2])}\n" for p in pubs)
    )
    result = ssh_welcome(port, key, known_hosts)
    assert result.returncode == 0 and result.stdout.startswith("Hi alice!"), result.stderr
    assert first.stop() == 0
    assert any("event=stopped" in line for line in first.lines)

    # Restart: the same host keys, so clients' known_hosts stay valid.
    second = ServeProcess(config)
    port = second.port
    assert sorted(re.findall(r"fingerprint=(SHA256:\S+)", "".join(second.lines))) == sorted(logged)
    known_hosts.write_text(
        "".join(f"[127.0.0.1]:{port} {' '.join(p.read_text().split()[:2])}\n" for p in pubs)
    )
    assert ssh_welcome(port, key, known_hosts).returncode == 0
    assert second.stop() == 0


def serve_once(config: Path) -> subprocess.CompletedProcess[str]:
    return run([sys.executable, "-m", "gateway", "--config", str(config), "serve"])


def test_missing_git_is_reported_at_start(tmp_path):
    result = serve_once(write_config(tmp_path, git={"binary": str(tmp_path / "no" / "git")}))
    assert result.returncode == 2
    assert "error: git not found" in result.stderr and "git >= 2.30 is required" in result.stderr
    assert "Traceback" not in result.stderr


def test_old_git_is_reported_at_start(tmp_path):
    fake = tmp_path / "old-git"
    fake.write_text(f"#!{sys.executable}\nprint('git version 2.20.1')\n")
    fake.chmod(0o755)
    result = serve_once(write_config(tmp_path, git={"binary": str(fake)}))
    assert result.returncode == 2
    assert "git 2.20.1" in result.stderr and "too old" in result.stderr


def test_bad_config_exits_2_naming_the_key(tmp_path):
    config = write_config(tmp_path, ssh={"listen": "nowhere"})
    result = serve_once(config)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: config: [ssh] listen: invalid address 'nowhere': expected HOST:PORT"
    )


def test_port_in_use_is_one_clear_line(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = serve_once(write_config(tmp_path, ssh={"listen": f"127.0.0.1:{port}"}))
    assert result.returncode == 1
    assert f"error: cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("fmt", ["json"])
def test_json_logs(tmp_path, fmt):
    import json

    config = write_config(tmp_path, log={"format": fmt})
    proc = ServeProcess(config)
    assert proc.stop() == 0
    records = [json.loads(line) for line in proc.lines]
    # One event, one address field (it once read "event=listening listening on ...").
    [listening] = [r for r in records if r.get("event") == "listening"]
    assert re.fullmatch(r"event=listening address=127\.0\.0\.1:\d+", listening["msg"])
    assert listening["address"].startswith("127.0.0.1:")
