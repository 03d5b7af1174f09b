"""The operator's users, keys, deploy keys, apps, members and API tokens."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from typing import TextIO

from .. import config, control, names, tables, times
from ..domain.accounts import MAX_KEY_TEXT
from ..domain.facade import Domain
from ..domain.shapes import (
    app_dict,
    key_dict,
    member_dict,
    token_dict,
    user_dict,
)
from ..errors import UsageError
from ..models import SSHKey
from ..tables import expiry_text, shown
from .common import OPERATOR, as_shown, json_out, table_out, with_domain


async def user_add(args: argparse.Namespace, cfg: config.Config, out: TextIO) -> int:
    async def act(domain: Domain) -> int:
        user = await domain.accounts.create_user(args.name, actor=OPERATOR)
        out.write(f"created user {user.name}\n")
        return 0

    return await with_domain(cfg, act)


async def user_list(args: argparse.Namespace, cfg: config.Config, out: TextIO) -> int:
    async def act(domain: Domain) -> int:
        users = await domain.accounts.list_users()
        if args.json:
            json_out([user_dict(u) for u in users], out)
        else:
            rows = [
                [u.user.name, str(u.keys), str(u.apps), shown(u.user.created_at)] for u in users
            ]
            table_out(rows, ["USER", "KEYS", "APPS OWNED", "CREATED"], out)
        return 0

    return await with_domain(cfg, act)


async def user_remove(args: argparse.Namespace, cfg: config.Config, out: TextIO) -> int:
    async def act(domain: Domain) -> int:
        await domain.accounts.remove_user(args.name, actor=OPERATOR)
        out.write(f"removed user {args.name} with their keys and memberships\n")
        return 0

    return await with_domain(cfg, act)


def _read_key_input(source: str) -> str:
    if source == "-":
        return sys.stdin.read(MAX_KEY_TEXT)
    try:
        with open(source, encoding="utf-8", errors="replace") as handle:
            return handle.read(MAX_KEY_TEXT)
    except OSError as exc:
        raise UsageError(f"cannot read {source}: {exc.strerror}") from None


async def key_add(args: argparse.Namespace, cfg: config.Config, out: TextIO) -> int:
    # Names are checked before the key is read, so a typo does not eat stdin.
    names.user_name(args.user)
    names.key_name(args.name)
    text = _read_key_input(args.file)

    async def act(domain: Domain) -> int:
        record = await domain.accounts.add_key(
            args.user,
            args.name,
            text,
            actor=OPERATOR,
            expires=args.expires,
            read_only=args.read_only,
            apps=args.apps,
        )
        out.write(tables.key_added(record))
        return 0

    return await with_domain(cfg, act)


def _keys(keys: list[SSHKey], as_json: bool, out: TextIO) -> None:
    if as_json:
        json_out([key_dict(k) for k in keys], out)
    else:
        table_out(tables.key_rows(keys), tables.KEY_HEADERS, out)


async def deploy_key_add(args: argparse.Namespace, cfg: config.Config, out: TextIO) -> int:
    names.app_name(args.app)
    names.key_name(args.name)
    text = _read_key_input(args.file)

    async def act(domain: Domain) -> int:
        record = await domain.accounts.add_deploy_key(
            args.app, args.name, text, actor=OPERATOR, write=args.write, expires=args.expires
        )
        out.write(tables.key_added(record))
        return 0

    return await with_domain(cfg, act)


async def deploy_key_list(args: argparse.Namespace, cfg: config.Config, out: TextIO) -> int:
    async def act(domain: Domain) -> int:
        _keys(await domain.accounts.list_deploy_keys(args.app), args.json, out)
        return 0

    return await with_domain(cfg, act)


async def deploy_key_remove(args: argparse.Namespace, cfg: config.Config, out: TextIO) -> int:
    async def act(domain: Domain) -> int:
        key = await domain.accounts.remove_deploy_key(args.app, args.name, actor=OPERATOR)
        out.write(tables.key_removed(key))
        return 0

    return await with_domain(cfg, act)


async def key_list(args: argparse.Namespace, cfg: config.Config, out: TextIO) -> int:
    async def act(domain: Domain) -> int:
        _keys(await domain.accounts.list_keys(args.user), args.json, out)
        return 0

    return await with_domain(cfg, act)


async def key_remove(args: argparse.Namespace, cfg: config.Config, out: TextIO) -> int:
    async def act(domain: Domain) -> int:
        key = await domain.accounts.remove_key(args.user, args.name, actor=OPERATOR)
        out.write(tables.key_removed(key))
        return 0

    return await with_domain(cfg, act)


async def key_move(args: argparse.Namespace, cfg: config.Config, out: TextIO) -> int:
    async def act(domain: Domain) -> int:
        key = await domain.accounts.move_key(
            args.user, args.name, args.to, args.new_name, actor=OPERATOR
        )
        out.write(
            f"moved key '{args.name}' ({key.fingerprint}) from {args.user} to "
            f"{key.user_name} as '{key.name}'\n"
        )
        return 0

    return await with_domain(cfg, act)


async def app_create(args: argparse.Namespace, cfg: config.Config, out: TextIO) -> int:
    shown_as = as_shown(cfg)

    async def act(domain: Domain) -> int:
        app = await domain.apps.create_app(args.app, args.owner, args.branch, actor=OPERATOR)
        out.write(
            f"created app {app.name} (owner {app.owner_name}, deploy branch {app.deploy_branch})\n"
        )
        out.write(f"clone URL: {shown_as.clone_url(app.name)}\n")
        return 0

    return await with_domain(cfg, act)


async def app_list(args: argparse.Namespace, cfg: config.Config, out: TextIO) -> int:
    shown_as = as_shown(cfg)

    async def act(domain: Domain) -> int:
        apps = await domain.apps.list_apps()
        if args.json:
            json_out([app_dict(a, shown_as) for a in apps], out)
        else:
            rows = [
                [
                    a.name,
                    a.owner_name,
                    a.deploy_branch,
                    shown(a.created_at),
                    shown_as.clone_url(a.name),
                ]
                for a in apps
            ]
            table_out(rows, ["APP", "OWNER", "BRANCH", "CREATED", "CLONE URL"], out)
        return 0

    return await with_domain(cfg, act)


async def app_remove(args: argparse.Namespace, cfg: config.Config, out: TextIO) -> int:
    async def act(domain: Domain) -> int:
        await domain.apps.get_app(args.app)  # unknown apps are refused before anything is stopped
        # The running gateway first stops the app's deploys, so none writes on after its
        # logs are archived with the repository.
        with contextlib.suppress(control.NotRunning):
            message = {"op": "cancel_app", "app": args.app, "by": "operator (app removed)"}
            for reply in await asyncio.to_thread(
                list, control.request(cfg.storage.control_socket, message, timeout=120)
            ):
                out.write(reply.get("out", ""))
        removed = await domain.apps.remove_app(args.app, actor=OPERATOR)
        out.write(f"removed app {removed.app.name}\n")
        if removed.trashed is not None:
            out.write(
                f"repository moved to {removed.trashed} "
                "(move it back and re-create the app to restore)\n"
            )
        return 0

    return await with_domain(cfg, act)


async def app_grant(args: argparse.Namespace, cfg: config.Config, out: TextIO) -> int:
    async def act(domain: Domain) -> int:
        grant = await domain.apps.grant(args.app, args.user, args.role, actor=OPERATOR)
        role, previous = grant.role, grant.previous
        if previous is None:
            out.write(f"granted {role.label} on {args.app} to {args.user}\n")
        elif previous is role:
            out.write(f"{args.user} already has {role.label} on {args.app}\n")
        else:
            out.write(
                f"changed {args.user}'s role on {args.app}: {previous.label} -> {role.label}\n"
            )
        return 0

    return await with_domain(cfg, act)


async def app_revoke(args: argparse.Namespace, cfg: config.Config, out: TextIO) -> int:
    async def act(domain: Domain) -> int:
        role = await domain.apps.revoke(args.app, args.user, actor=OPERATOR)
        out.write(f"revoked {args.user}'s {role.label} access to {args.app}\n")
        return 0

    return await with_domain(cfg, act)


async def app_members(args: argparse.Namespace, cfg: config.Config, out: TextIO) -> int:
    async def act(domain: Domain) -> int:
        members = await domain.apps.members(args.app)
        if args.json:
            json_out([member_dict(m) for m in members], out)
        else:
            table_out(
                [[m.user_name, m.role.label, shown(m.created_at)] for m in members],
                ["USER", "ROLE", "SINCE"],
                out,
            )
        return 0

    return await with_domain(cfg, act)


async def token_create(args: argparse.Namespace, cfg: config.Config, out: TextIO) -> int:
    async def act(domain: Domain) -> int:
        token, secret = await domain.tokens.create_token(
            args.name, args.user, actor=OPERATOR, expires=args.expires
        )
        if args.json:
            json_out({**token_dict(token), "token": secret}, out)
            return 0
        scope = f"personal token of {token.user_name}" if token.personal else "operator token"
        until = f", expiring {shown(token.expires_at)}" if token.expires_at else ""
        out.write(f"created {scope} '{token.name}'{until}; it is shown only this once:\n{secret}\n")
        return 0

    return await with_domain(cfg, act)


async def token_list(args: argparse.Namespace, cfg: config.Config, out: TextIO) -> int:
    async def act(domain: Domain) -> int:
        tokens = await domain.tokens.list_tokens()
        now = times.now()
        if args.json:
            json_out([token_dict(t) for t in tokens], out)
        else:
            rows = [
                [
                    t.name,
                    t.user_name or "(operator)",
                    shown(t.created_at),
                    shown(t.last_used_at, "never"),
                    expiry_text(t.expires_at, now),
                ]
                for t in tokens
            ]
            table_out(rows, ["NAME", "USER", "CREATED", "LAST USED", "EXPIRES"], out)
        return 0

    return await with_domain(cfg, act)


async def token_remove(args: argparse.Namespace, cfg: config.Config, out: TextIO) -> int:
    async def act(domain: Domain) -> int:
        token = await domain.tokens.remove_token(args.name, actor=OPERATOR)
        out.write(f"removed token '{token.name}'\n")
        return 0

    return await with_domain(cfg, act)
