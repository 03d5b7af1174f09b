"""Regressions found by the hostile-tenant review of the restructure (issue 21): each test
pins a behaviour the layer packages, the facade, the SQL rewrite or the deploy seams changed."""

from __future__ import annotations

from gateway.ssh.commands import COMMANDS, parse


def test_regression_commands_keep_their_rate_and_app_flags():
    """Before the one-table move, `logs` took an app and was not counted against
    [limits] user_ops_per_minute (only `keys` and git's services were): the table's
    positional `True` for "takes an app" became `rated=True`, so following a deploy's log
    spent the user's git operations and the parser's app-name property no longer covered it."""
    assert {name for name, c in COMMANDS.items() if c.rated} == {"keys"}
    assert {name for name, c in COMMANDS.items() if c.takes_app} == {"deploys", "logs"}
    inv = parse("logs /shop.git 7 --follow")
    assert inv.app == "shop"
