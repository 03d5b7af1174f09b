"""'Why was I refused?': authentication banners with real OpenSSH clients and a real ssh-agent
holding several keys."""

from __future__ import annotations

import contextlib
import os
import re
import select
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway import explain
from tests.helpers import (
    TIMEOUT,
    Admin,
    Client,
    ServerThread,
    keygen,
    keygen_fingerprint,
    registered_user,
    run,
    write_config,
)

HELP = "https://paas.example/keys"


def start(directory: Path) -> ServerThread:
    return ServerThread(write_config(directory, ssh={"help_url": HELP})).start()


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    thread = start(tmp_path_factory.mktemp("refused"))
    yield thread
    thread.stop()


@pytest.fixture(scope="module")
def admin(gw) -> Admin:
    return Admin(gw.config_path)


@pytest.fixture
def dev(gw, admin, tmp_path) -> Client:
    return registered_user(gw, admin, tmp_path, "dev")


@contextlib.contextmanager
def agent(tmp_path: Path, keys: list[Path]) -> Iterator[str]:
    """A real ssh-agent holding `keys`, in that order (the order it offers them in)."""
    sock = tmp_path / "agent.sock"
    proc = subprocess.Popen(["ssh-agent", "-D", "-a", str(sock)], stdout=subprocess.PIPE)
    try:
        # In the foreground, ssh-agent prints its environment lines once it listens.
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], TIMEOUT)
        assert ready and proc.stdout.readline().startswith(b"SSH_AUTH_SOCK="), "no ssh-agent"
        for key in keys:
            run(
                ["ssh-add", "-q", str(key)],
                env={**os.environ, "SSH_AUTH_SOCK": str(sock)},
                check=True,
            )
        yield str(sock)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def via_agent(client: Client, sock: str, *args: str) -> subprocess.CompletedProcess[str]:
    """ssh offering the agent's keys only (no -i, and no default key files)."""
    known_hosts = next(a for a in client.ssh_base if a.startswith("UserKnownHostsFile="))
    argv = ["ssh", "-F", "/dev/null", "-o", f"IdentityAgent={sock}"]
    argv += ["-o", "IdentityFile=/nonexistent/key", "-o", "BatchMode=yes"]
    argv += ["-o", "StrictHostKeyChecking=yes", "-o", known_hosts, "-p", str(client.server.port)]
    return run([*argv, "-T", "git@127.0.0.1", *args], env=client.env)


def test_an_unknown_key_is_named_with_where_keys_are_added(gw, tmp_path):
    stranger_key = keygen(tmp_path / "unregistered")
    stranger = Client(tmp_path / "home", stranger_key, gw)
    result = stranger.ssh("whoami")
    assert result.returncode == 255
    fingerprint = keygen_fingerprint(stranger_key.with_suffix(".pub"))
    assert (
        f"git-gateway: the key {fingerprint} (ssh-ed25519) is not registered here." in result.stderr
    )
    assert (
        f"Add your public key (the .pub file) at {HELP}; `ssh-keygen -lf KEY.pub`" in result.stderr
    )
    assert result.stderr.rstrip().endswith("Permission denied (publickey).")


def test_a_multi_key_agent_logs_in_with_the_registered_key_and_is_told_which(dev, tmp_path):
    others = [keygen(tmp_path / f"other{i}") for i in range(2)]
    with agent(tmp_path, [*others, dev.key]) as sock:
        result = via_agent(dev, sock)
    assert result.returncode == 0, result.stderr
    fingerprints = [keygen_fingerprint(k.with_suffix(".pub")) for k in others]
    assert 'authenticated with key "laptop"' in result.stdout
    assert (
        f"Your client offered 2 other keys first, not registered here: {', '.join(fingerprints)}."
        in result.stdout
    )
    for fingerprint in fingerprints:  # and each refusal was explained as it happened
        assert f"the key {fingerprint} (ssh-ed25519) is not registered here." in result.stderr


def test_the_wrong_user_name_is_explained(dev, tmp_path):
    result = run([*dev.ssh_base, "-T", "root@127.0.0.1", "whoami"], env=dev.env)
    assert result.returncode == 255
    login = f"ssh -p {dev.server.port} git@127.0.0.1"
    assert f'git-gateway: log in as "git" ({login}), not as another user.' in result.stderr


def test_too_many_keys_in_an_agent_are_explained(dev, tmp_path):
    keys = [keygen(tmp_path / f"k{i}") for i in range(13)]
    with agent(tmp_path, keys) as sock:
        result = via_agent(dev, sock)
    assert result.returncode == 255
    assert (
        "git-gateway: your client offered more than 12 keys. Pick the registered one"
        in result.stderr
    )


def test_regression_a_registered_public_key_without_its_private_key_reveals_nothing(
    gw, dev, tmp_path
):
    public_only = tmp_path / "stolen.pub"
    public_only.write_text(dev.key.with_suffix(".pub").read_text())
    stranger = Client(tmp_path / "home-stranger", public_only, gw)
    result = stranger.ssh("whoami")
    assert result.returncode == 255
    assert dev.name not in result.stderr and "laptop" not in result.stderr
    assert "not registered" not in result.stderr  # it is registered: no lie, and no detail


def test_regression_banners_are_rate_limited_per_source_address(tmp_path):
    """A client cannot make the gateway write banners without bound: past the budget per
    source address it gets OpenSSH's plain answer."""
    server = start(tmp_path / "gw")
    try:
        stranger = Client(tmp_path / "home", keygen(tmp_path / "unregistered"), server)
        per_connection = 2  # the key's line and, once per connection, where keys are added
        budget = explain.LINES_PER_MINUTE // per_connection
        told = []
        for _ in range(budget + 10):
            result = stranger.ssh("whoami")
            assert result.returncode == 255
            told.append("is not registered here" in result.stderr)
            if len(told) > 2 and not any(told[-2:]):
                break
        # The budget refills at one line a second: a few more connections while this runs.
        assert budget <= told.index(False) <= budget + 5
        assert told[-2:] == [False, False]
    finally:
        server.stop()


def test_regression_banner_text_is_terminal_safe():
    told = explain.Told(explain.Explainer("", "git", lambda: "ssh git@host"), "192.0.2.1")
    text = told.take(told.lines_for_unknown_key("SHA256:\x1b]0;x\x07", "ssh-ed25519"))
    assert text is not None  # the server escapes it (terminal_safe) before sending
    from gateway.textsafe import terminal_safe

    assert "\x1b" not in terminal_safe(text) and re.search(r"\\x1b", terminal_safe(text))


def test_regression_a_failing_explanation_never_fails_the_login(gw, dev, tmp_path):
    """Banners are a courtesy: an error while building one (here, forced) must leave the
    authentication as it would have been (the unknown key refused, the next one accepted)."""
    explainer = gw.gateway.explainer

    def broken() -> str:
        raise RuntimeError("forced by the test")

    explainer.where_keys_are_added, saved = broken, explainer.where_keys_are_added
    try:
        other = keygen(tmp_path / "other")
        with agent(tmp_path, [other, dev.key]) as sock:
            result = via_agent(dev, sock)
        assert result.returncode == 0, result.stderr
        assert 'authenticated with key "laptop"' in result.stdout
    finally:
        explainer.where_keys_are_added = saved
