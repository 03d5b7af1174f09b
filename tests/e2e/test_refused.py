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

from gateway.ssh import explain
from tests.helpers import (
    TIMEOUT,
    Client,
    keygen,
    keygen_fingerprint,
    run,
    unique,
)

HELP = "https://paas.example/keys"


@pytest.fixture(scope="module")
def gw(module_gateways):
    return module_gateways(name="refused", ssh={"help_url": HELP})


@pytest.fixture
def dev(gw, tmp_path) -> Client:
    return gw.user("dev", tmp_path)


@contextlib.contextmanager
def agent(tmp_path: Path, keys: list[Path]) -> Iterator[str]:
    """A real ssh-agent holding `keys`, in that order (the order it offers them in)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
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


def agent_ssh_command(client: Client, sock: str) -> str:
    """GIT_SSH_COMMAND for git offering the agent's keys, as via_agent's ssh does."""
    known_hosts = next(a for a in client.ssh_base if a.startswith("UserKnownHostsFile="))
    return (
        f"ssh -F /dev/null -o IdentityAgent={sock} -o IdentityFile=/nonexistent/key "
        f"-o BatchMode=yes -o StrictHostKeyChecking=yes -o {known_hosts}"
    )


def test_successful_git_commands_do_not_repeat_the_unregistered_keys(gw, admin, dev, tmp_path):
    """An agent offering an unregistered key first: once a login got past it, git commands
    from that address print nothing about it; the welcome still lists it; a failed login
    makes the gateway explain everything again (from the next attempt: a key is refused
    before the client says whether it has another one)."""
    app = unique("quiet")
    admin.ok("app", "create", app, "--owner", dev.name)
    other = keygen(tmp_path / "other")
    fingerprint = keygen_fingerprint(other.with_suffix(".pub"))
    unregistered = f"the key {fingerprint} (ssh-ed25519) is not registered here."
    with agent(tmp_path, [other, dev.key]) as sock:
        env = {**dev.env, "GIT_SSH_COMMAND": agent_ssh_command(dev, sock)}
        first = run(["git", "ls-remote", dev.url(app)], env=env)
        # Whether this login will succeed is not known when the key is refused: said once.
        assert first.returncode == 0 and unregistered in first.stderr
        for _ in range(2):
            again = run(["git", "ls-remote", dev.url(app)], env=env)
            assert again.returncode == 0 and again.stderr == ""
        welcome = via_agent(dev, sock)
        assert f"not registered here: {fingerprint}." in welcome.stdout
        assert "not registered" not in welcome.stderr
    # A failed login from this address (only the unregistered key): at the latest from the
    # next attempt on, explained in full...
    with agent(tmp_path / "alone", [other]) as sock:
        assert via_agent(dev, sock).returncode == 255
        failed = via_agent(dev, sock)
    assert failed.returncode == 255 and unregistered in failed.stderr
    assert f"Add your public key (the .pub file) at {HELP}" in failed.stderr
    # ...and the next login with both keys is told about it once more.
    with agent(tmp_path / "both", [other, dev.key]) as sock:
        env = {**dev.env, "GIT_SSH_COMMAND": agent_ssh_command(dev, sock)}
        assert unregistered in run(["git", "ls-remote", dev.url(app)], env=env).stderr


def test_regression_quiet_keys_are_remembered_per_source_address():
    """Another address offering the same public key is told as usual: nobody learns from the
    silence that the key's holder logs in here."""
    clock = [1000.0]
    explainer = explain.Explainer("", "git", lambda: "ssh git@host")
    explainer.clock = lambda: clock[0]
    explainer.logged_in_after("192.0.2.1", ["SHA256:a"])
    explainer.logged_in_after("2001:db8::1", ["SHA256:b"])
    assert explainer.quiet("192.0.2.1", "SHA256:a")
    assert explainer.quiet("::ffff:192.0.2.1", "SHA256:a")
    assert explainer.quiet("2001:db8::2", "SHA256:b")  # the same /64: one host
    assert not explainer.quiet("192.0.2.2", "SHA256:a")
    assert not explainer.quiet("2001:db8:0:1::1", "SHA256:b")
    assert not explainer.quiet("192.0.2.1", "SHA256:b")
    told = explain.Told(explainer, "192.0.2.9")
    assert told.lines_for_unknown_key("SHA256:a", "ssh-ed25519")  # another address: told
    quiet = explain.Told(explainer, "192.0.2.1")
    assert quiet.lines_for_unknown_key("SHA256:a", "ssh-ed25519") == []
    assert quiet.unknown == ["SHA256:a"]  # the welcome still lists it
    clock[0] += explain.QUIET_SECONDS + 1
    assert not explainer.quiet("192.0.2.1", "SHA256:a")
    explainer.logged_in_after("192.0.2.1", ["SHA256:a"])
    explainer.login_failed("192.0.2.1")
    assert not explainer.quiet("192.0.2.1", "SHA256:a")


def test_regression_quiet_keys_take_bounded_memory():
    explainer = explain.Explainer("", "git", lambda: "ssh git@host")
    for i in range(explain.ADDRESSES_TRACKED + 50):
        explainer.logged_in_after(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", ["SHA256:x"])
    explainer.logged_in_after("192.0.2.1", [f"SHA256:{i}" for i in range(100)])
    assert len(explainer._quiet) == explain.ADDRESSES_TRACKED
    assert len(explainer._quiet["192.0.2.1"]) == explain.QUIET_KEYS_PER_ADDRESS
    assert explainer.quiet("192.0.2.1", "SHA256:99") and not explainer.quiet("10.0.0.0", "x")


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


def test_regression_banners_are_rate_limited_per_source_address(gateway_factory, tmp_path):
    """A client cannot make the gateway write banners without bound: past the budget per
    source address it gets OpenSSH's plain answer."""
    server = gateway_factory(ssh={"help_url": HELP})
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


@pytest.mark.xfail(
    strict=True,
    reason="a documented trade-off (docs/access.md, When a login is refused): from a shared "
    "source address, the missing banner tells a stranger holding only a user's public key "
    "that its holder logged in here in the last day",
)
def test_regression_a_stranger_on_the_same_address_learns_nothing_from_a_quiet_key(
    dev, admin, tmp_path
):
    """Behind one NAT, a balancer without the PROXY protocol or a shared IPv6 /64, everyone
    has the same source address. A user's public keys are public (github.com/NAME.keys): a
    stranger offers one of them, without its private half. An unregistered key is named in a
    banner, unless a login from that address got past it in the last day: the silence says
    that the key's holder uses this gateway (with another key), which the banners were
    designed never to tell."""
    app = unique("oracle")
    admin.ok("app", "create", app, "--owner", dev.name)
    personal = keygen(tmp_path / "personal")
    fingerprint = keygen_fingerprint(personal.with_suffix(".pub"))
    named = f"the key {fingerprint} (ssh-ed25519) is not registered here."
    # The stranger: the same source address, only the public half of the personal key.
    stranger_dir = tmp_path / "stranger"
    stranger_dir.mkdir()
    public_only = stranger_dir / "published"
    public_only.with_suffix(".pub").write_text(personal.with_suffix(".pub").read_text())
    stranger = Client(stranger_dir / "home", public_only.with_suffix(".pub"), dev.server)
    before = stranger.ssh("whoami")
    assert before.returncode == 255 and named in before.stderr  # the key is offered, named
    # The victim: an agent offering that personal key first, then the registered one.
    with agent(tmp_path / "victim", [personal, dev.key]) as sock:
        env = {**dev.env, "GIT_SSH_COMMAND": agent_ssh_command(dev, sock)}
        assert run(["git", "ls-remote", dev.url(app)], env=env).returncode == 0
    after = stranger.ssh("whoami")
    assert after.returncode == 255
    assert named in after.stderr  # fails: silence, so the victim logged in from here
