"""The SSH command parser: allowed forms, path forms, and everything it must refuse."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.errors import AccessDenied, GatewayError, UnknownCommand
from gateway.ssh.commands import COMMANDS, HANDLERS, KNOWN_COMMANDS, parse

KEYS_USAGE = (
    "usage: keys | keys add NAME [--expires WHEN] [--read-only] [--app APP]... < KEY.pub"
    " | keys remove NAME"
)


@pytest.mark.parametrize(
    ("line", "command", "app"),
    [
        ("git-upload-pack 'myapp.git'", "git-upload-pack", "myapp"),
        ("git-upload-pack '/myapp.git'", "git-upload-pack", "myapp"),
        ("git-upload-pack '~/myapp.git'", "git-upload-pack", "myapp"),
        ("git-upload-pack myapp", "git-upload-pack", "myapp"),
        ("git-upload-pack 'myapp.git/'", "git-upload-pack", "myapp"),
        ("git-receive-pack 'my-app_2.git'", "git-receive-pack", "my-app_2"),
        ("git-upload-archive '/0app.git'", "git-upload-archive", "0app"),
        ("git upload-pack 'myapp.git'", "git-upload-pack", "myapp"),
        ("git receive-pack '/myapp.git'", "git-receive-pack", "myapp"),
    ],
)
def test_git_commands(line, command, app):
    inv = parse(line)
    assert inv.command == command
    assert inv.app == app


@pytest.mark.parametrize("line", [None, "", "   ", "info"])
def test_empty_command_is_info(line):
    assert parse(line).command == "info"


@pytest.mark.parametrize(
    "path",
    [
        "../x",
        "../../etc/passwd",
        "/etc/passwd",
        "x;id",
        "$(id)",
        "`id`",
        "my app",
        "'quoted'",
        'a"b',
        "MyApp",
        "-app",
        "_app",
        ".git",
        "app/../other",
        "a" * 64,
        "app\n",
        "app.git.git",
        "~root/app.git",
        "//app.git",
    ],
)
def test_bad_paths_look_like_missing_apps(path):
    quoted = "'" + path.replace("'", "'\\''") + "'"
    with pytest.raises(AccessDenied) as err:
        parse(f"git-upload-pack {quoted}")
    assert "not found or access denied" in str(err.value)


@pytest.mark.parametrize(
    "line",
    [
        "ls",
        "sh -c id",
        "bash",
        "scp -t /tmp",
        "git-upload-pack",
        "git-upload-pack a.git b.git",
        "git-upload-pack 'unterminated",
        "git status",
        "git-shell -c 'git-upload-pack app.git'",
        "rm -rf /",
        "git-upload-pack app\x00.git",
        "x" * 5000,
    ],
)
def test_other_commands_refused(line):
    with pytest.raises(UnknownCommand) as err:
        parse(line)
    assert err.value.exit_code == 128
    assert "\n" not in str(err.value)


def test_unknown_command_is_escaped():
    with pytest.raises(UnknownCommand) as err:
        parse("\x1b[2Jevil")
    assert "\x1b" not in str(err.value)


@given(st.text(max_size=300))
def test_parser_never_crashes_and_never_escapes(line):
    try:
        inv = parse(line)
    except GatewayError as exc:
        assert "\n" not in str(exc)
        return
    syntax = COMMANDS.get(inv.command)
    if syntax is None or syntax.takes_app:
        name = inv.app
        assert name and "/" not in name and "." not in name and ".." not in name
        assert name[0].isalnum() and name.isascii()


@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=80))
def test_any_path_is_either_a_valid_name_or_denied(path):
    quoted = "'" + path.replace("'", "'\\''") + "'"
    try:
        inv = parse(f"git-receive-pack {quoted}")
    except GatewayError:
        return
    assert inv.app.replace("-", "").replace("_", "").isalnum()
    assert inv.app == inv.app.lower()


@pytest.mark.parametrize(
    ("line", "command", "args"),
    [
        ("whoami", "whoami", ()),
        ("help", "help", ()),
        ("keys", "keys", ("list",)),
        ("keys list", "keys", ("list",)),
        ("keys add laptop", "keys", ("add", "laptop", "", "")),
        ("keys add laptop --expires 90d", "keys", ("add", "laptop", "90d", "")),
        ("keys add laptop --expires=2027-01-31", "keys", ("add", "laptop", "2027-01-31", "")),
        (
            "keys add ci --read-only --app web --app=api",
            "keys",
            ("add", "ci", "", "read-only", "web", "api"),
        ),
        ("keys remove 'old key'", "keys", ("remove", "old key", "", "")),
        ("deploys web", "deploys", ("web",)),
        ("logs web 3 -f", "logs", ("web", "3", "follow")),
        ("cancel #12", "cancel", ("12",)),
    ],
)
def test_account_and_deploy_commands(line, command, args):
    inv = parse(line)
    assert (inv.command, inv.args) == (command, args)


@pytest.mark.parametrize(
    ("line", "usage"),
    [
        ("whoami --all", "usage: whoami"),
        ("help me", "usage: help"),
        (
            "keys add",
            KEYS_USAGE,
        ),
        (
            "keys add a --expires",
            KEYS_USAGE,
        ),
        (
            "keys delete a",
            KEYS_USAGE,
        ),
        ("logs", "usage: logs APP [ID] [--follow]"),
        ("cancel", "usage: cancel ID"),
    ],
)
def test_usage_lines_come_from_the_command_table(line, usage):
    with pytest.raises(UnknownCommand) as err:
        parse(line)
    assert str(err.value) == usage


def test_every_command_has_a_handler_and_help():
    """The table drives parsing, `help` and metric labels: each entry is served."""
    assert set(HANDLERS) == set(KNOWN_COMMANDS)
    for syntax in COMMANDS.values():
        assert syntax.forms[0].split()[0] == syntax.name and syntax.summary


def test_unknown_command_names_the_commands():
    with pytest.raises(UnknownCommand) as err:
        parse("shell")
    assert str(err.value) == (
        "unknown command 'shell': this server serves git (clone, fetch, push, archive --remote) "
        "and: info, whoami, keys, deploys, logs, cancel, help ('help' describes them)"
    )
