"""Expiring keys and tokens with real OpenSSH clients: refused once expired (and told why only
to whoever holds the key), warned about in their last days, listed with their expiry."""

from __future__ import annotations

import json
import shutil
import sqlite3
from datetime import timedelta

import pytest

from gateway import times
from tests.helpers import (
    Client,
    http,
    http_base,
    keygen,
    keygen_fingerprint,
    run,
    unique,
)

HELP = "https://paas.example/account/keys"


@pytest.fixture(scope="module")
def gw(module_gateways):
    return module_gateways(name="expiry", ssh={"help_url": HELP})


@pytest.fixture
def dev(gw, tmp_path) -> Client:
    return gw.user("dev", tmp_path)


def set_expiry(gw, table: str, name: str, when) -> None:
    """Move an expiry into the past or near future: what time would do, without waiting."""
    with sqlite3.connect(gw.config.storage.database) as db:
        db.execute(f"UPDATE {table} SET expires_at = ? WHERE name = ?", (times.text(when), name))  # noqa: S608


def audit(admin, user: str) -> list[dict]:
    return json.loads(admin.ok("audit", "--json", "--user", user))


def test_expiry_is_set_listed_and_checked(dev, admin, tmp_path):
    key = keygen(tmp_path / "ci")
    out = admin.ok("key", "add", dev.name, "ci", f"{key}.pub", "--expires", "2w")
    assert ", expires 20" in out
    listing = admin.ok("key", "list", dev.name)
    assert listing.splitlines()[0].split()[-2:] == ["EXPIRES", "REACHES"]
    ci_line = next(line for line in listing.splitlines() if line.startswith("ci "))
    laptop_line = next(line for line in listing.splitlines() if line.startswith("laptop "))
    assert ci_line.split()[-4].startswith("20") and " never " in laptop_line
    [record] = [
        k for k in json.loads(admin.ok("key", "list", dev.name, "--json")) if k["name"] == "ci"
    ]
    left = times.parse(record["expires_at"]) - times.now()
    assert timedelta(days=13) < left <= timedelta(days=14)
    for bad, message in [
        ("yesterday", "an expiry is a duration"),
        ("2020-01-01", "is not in the future"),
        ("0d", "is not in the future"),
        ("99y", "an expiry is a duration"),
        ("2099-01-01", "more than 3650 days away"),
    ]:
        keygen(tmp_path / f"bad-{bad}")
        code, _, err = admin(
            "key", "add", dev.name, "bad", f"{tmp_path}/bad-{bad}.pub", "--expires", bad
        )
        assert code == 2 and message in err and err.count("\n") == 1, err
    assert "bad " not in admin.ok("key", "list", dev.name)
    # The same over SSH.
    keygen(tmp_path / "third")
    result = dev.ssh(
        "keys",
        "add",
        "third",
        "--expires",
        "2027-01-31",
        input=(tmp_path / "third.pub").read_text(),
    )
    assert result.returncode == 0 and ", expires 2027-01-31T00:00:00Z" in result.stdout
    refused = dev.ssh(
        "keys", "add", "fourth", "--expires", "soon", input=(tmp_path / "third.pub").read_text()
    )
    assert refused.stderr.startswith("error: an expiry is a duration")


def test_an_expired_key_is_refused_and_told_why_to_its_holder(gw, dev, admin):
    set_expiry(gw, "ssh_keys", "laptop", times.now() - timedelta(days=1))
    result = dev.ssh("whoami")
    assert result.returncode == 255
    fingerprint = keygen_fingerprint(dev.key.with_suffix(".pub"))
    assert f'the SSH key "laptop" of {dev.name} ({fingerprint}) expired on ' in result.stderr
    assert f"it no longer logs in.\nAdd your public key (the .pub file) at {HELP}." in result.stderr
    assert "Permission denied (publickey)" in result.stderr
    [refusal] = [e for e in audit(admin, dev.name) if e["event"] == "auth_refused"]
    assert refusal["detail"]["reason"] == "key expired" and refusal["fingerprint"] == fingerprint
    listing = admin.ok("key", "list", dev.name)
    assert "(expired)" in listing


def test_an_expired_key_in_an_agent_does_not_block_the_next_key(gw, dev, admin, tmp_path):
    """Refused like an unknown key, so the client goes on to its next one (and still hears
    why the first one was refused)."""
    fresh = keygen(tmp_path / "fresh")
    admin.ok("key", "add", dev.name, "fresh", f"{fresh}.pub")
    set_expiry(gw, "ssh_keys", "laptop", times.now() - timedelta(minutes=1))
    both = [*dev.ssh_base[:5], "-i", str(fresh), *dev.ssh_base[5:]]
    assert both[3:7] == ["-i", str(dev.key), "-i", str(fresh)]
    result = run([*both, "-T", "git@127.0.0.1", "whoami"], env=dev.env)
    assert result.returncode == 0
    assert result.stdout.splitlines()[1].startswith("key: fresh ")
    assert '"laptop"' in result.stderr and "expired on" in result.stderr


def test_regression_a_stranger_with_only_the_public_key_learns_nothing(gw, dev, admin, tmp_path):
    """Public keys are public (forges publish them): offering one without its private key must
    not reveal the account, the key's name or that it expired, nor write to its audit trail."""
    set_expiry(gw, "ssh_keys", "laptop", times.now() - timedelta(days=1))
    public_only = tmp_path / "stranger" / "id_stolen"
    public_only.parent.mkdir()
    shutil.copy(dev.key.with_suffix(".pub"), public_only.with_suffix(".pub"))
    # `-i KEY.pub`: OpenSSH offers the public key, and would ask an agent to sign.
    stranger = Client(tmp_path / "home-stranger", public_only.with_suffix(".pub"), gw)
    result = stranger.ssh("whoami", options=("-T", "-v"))
    assert result.returncode == 255
    # The key was offered, and answered as any registered key is (OpenSSH then finds no
    # private key to sign with).
    assert "Server accepts key" in result.stderr
    result.stderr = "\n".join(
        line for line in result.stderr.splitlines() if not line.startswith("debug1:")
    )
    assert dev.name not in result.stderr and "laptop" not in result.stderr
    assert "expired" not in result.stderr
    assert not [e for e in audit(admin, dev.name) if e["event"] == "auth_refused"]


def test_a_key_in_its_last_days_is_warned_about(gw, dev, admin, tmp_path):
    set_expiry(gw, "ssh_keys", "laptop", times.now() + timedelta(days=3, hours=1))
    welcome = dev.ssh().stdout
    assert 'warning: your SSH key "laptop" expires ' in welcome and "(in 3 days)" in welcome
    assert "keys add NAME < KEY.pub" in welcome
    whoami = dev.ssh("whoami").stdout.splitlines()
    assert whoami[2].startswith("expires: 20") and whoami[3].startswith("warning: ")
    admin.ok("app", "create", f"{dev.name}-app", "--owner", dev.name)
    listed = dev.git("ls-remote", dev.url(f"{dev.name}-app"))
    assert 'warning: your SSH key "laptop" expires' in listed.stderr
    # A key with weeks left says nothing.
    set_expiry(gw, "ssh_keys", "laptop", times.now() + timedelta(days=30))
    assert "warning" not in dev.ssh().stdout


def test_regression_a_key_expiring_on_an_open_connection_stops_working(gw, dev, admin, tmp_path):
    from tests.e2e.test_multiplexing import control_master

    with control_master(dev, tmp_path / "ctl") as mux:
        assert mux.ssh("whoami").returncode == 0
        set_expiry(gw, "ssh_keys", "laptop", times.now() - timedelta(seconds=1))
        result = mux.ssh("whoami")
        assert result.returncode == 1
        assert result.stderr.startswith("error: access denied: this SSH key expired on ")
    denied = [e for e in audit(admin, dev.name) if e["event"] == "access_denied"]
    assert [e["detail"]["reason"] for e in denied] == ["key expired"]


def test_tokens_expire(gw, dev, admin):
    out = admin.ok("token", "create", f"{dev.name}-t", "--user", dev.name, "--expires", "1h")
    secret = out.strip().splitlines()[-1]
    assert ", expiring 20" in out
    base = http_base(gw)
    assert http("GET", f"{base}/api/v1/user", token=secret).status == 200
    set_expiry(gw, "api_tokens", f"{dev.name}-t", times.now() - timedelta(seconds=1))
    reply = http("GET", f"{base}/api/v1/user", token=secret)
    assert reply.status == 401
    assert reply.json()["error"]["message"].startswith("this token expired on ")
    assert "(expired)" in admin.ok("token", "list")


def test_api_takes_an_expiry(gw, dev, admin, tmp_path):
    out = admin.ok("token", "create", unique("op"))
    operator = out.strip().splitlines()[-1]
    keygen(tmp_path / "api")
    base = http_base(gw)
    body = {"name": "api", "key": (tmp_path / "api.pub").read_text(), "expires": "30d"}
    reply = http("POST", f"{base}/api/v1/users/{dev.name}/keys", token=operator, body=body)
    assert reply.status == 201 and reply.json()["expires_at"].startswith("20")
    bad = {**body, "name": "api2", "expires": "\x1b[31m"}
    reply = http("POST", f"{base}/api/v1/users/{dev.name}/keys", token=operator, body=bad)
    assert reply.status == 422 and "\x1b" not in reply.body.decode()


def test_regression_an_expiring_key_adds_no_key_that_outlives_it(gw, dev, admin, tmp_path):
    """Review finding: a contractor's key given a day added a key that never expires."""
    short = keygen(tmp_path / "short")
    admin.ok("key", "add", dev.name, "short", f"{short}.pub", "--expires", "1d")
    contractor = Client(tmp_path / "home-short", short, gw, name=dev.name)
    keygen(tmp_path / "forever")
    text = (tmp_path / "forever.pub").read_text()
    for args in (("keys", "add", "forever"), ("keys", "add", "forever", "--expires", "30d")):
        result = contractor.ssh(*args, input=text)
        assert result.returncode != 0
        assert "error: the key of this connection expires on " in result.stderr
        assert "a key it adds must expire no later" in result.stderr
    assert contractor.ssh("keys", "add", "ok", "--expires", "12h", input=text).returncode == 0
