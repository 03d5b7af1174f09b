"""Command-line front end: `git-gateway serve` and the operator's user/key/app commands."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TextIO

from . import __version__, completion, config, control, dbtools, logs, names, tables, times, umask
from .domain.accounts import MAX_KEY_TEXT
from .domain.facade import Domain
from .domain.shapes import (
    app_dict,
    audit_dict,
    deploy_dict,
    deploy_record_dict,
    key_dict,
    member_dict,
    token_dict,
    user_dict,
)
from .errors import ConfigError, GatewayError, UsageError
from .git import gitbin
from .models import SSHKey
from .ssh import certs
from .tables import expiry_text, shown
from .textsafe import TerminalStream, terminal_safe

log = logging.getLogger("gateway.cli")

# The actor recorded in the audit trail for changes made with this CLI.
EXPIRES_HELP = (
    "when it stops working: a duration (90d, 12h, 4w), a date (2027-01-31: from 00:00 UTC) "
    "or an ISO 8601 time; default: never"
)
OPERATOR = "operator"


# -- output helpers --


def _table(rows: list[list[str]], headers: list[str], out: TextIO) -> None:
    out.write(tables.render(rows, headers))


def _json(data: Any, out: TextIO) -> None:
    out.write(json.dumps(data, indent=2) + "\n")


# -- command implementations: each gets the parsed args, the config and an output stream --


async def _with_domain(cfg: config.Config, action: Callable[[Domain], Awaitable[Any]]) -> Any:
    async with Domain.open(cfg) as domain:
        return await action(domain)


async def user_add(args: argparse.Namespace, cfg: config.Config, out: TextIO) -> int:
    async def act(domain: Domain) -> int:
        user = await domain.accounts.create_user(args.name, actor=OPERATOR)
        out.write(f"created user {user.name}\n")
        return 0

    return await _with_domain(cfg, act)


async def user_list(args: argparse.Namespace, cfg: config.Config, out: TextIO) -> int:
    async def act(domain: Domain) -> int:
        users = await domain.accounts.list_users()
        if args.json:
            _json([user_dict(u) for u in users], out)
        else:
            rows = [
                [u.user.name, str(u.keys), str(u.apps), shown(u.user.created_at)] for u in users
            ]
            _table(rows, ["USER", "KEYS", "APPS OWNED", "CREATED"], out)
        return 0

    return await _with_domain(cfg, act)


async def user_remove(args: argparse.Namespace, cfg: config.Config, out: TextIO) -> int:
    async def act(domain: Domain) -> int:
        await domain.accounts.remove_user(args.name, actor=OPERATOR)
        out.write(f"removed user {args.name} with their keys and memberships\n")
        return 0

    return await _with_domain(cfg, act)


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

    return await _with_domain(cfg, act)


def _keys(keys: list[SSHKey], as_json: bool, out: TextIO) -> None:
    if as_json:
        _json([key_dict(k) for k in keys], out)
    else:
        _table(tables.key_rows(keys), tables.KEY_HEADERS, out)


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

    return await _with_domain(cfg, act)


async def deploy_key_list(args: argparse.Namespace, cfg: config.Config, out: TextIO) -> int:
    async def act(domain: Domain) -> int:
        _keys(await domain.accounts.list_deploy_keys(args.app), args.json, out)
        return 0

    return await _with_domain(cfg, act)


async def deploy_key_remove(args: argparse.Namespace, cfg: config.Config, out: TextIO) -> int:
    async def act(domain: Domain) -> int:
        key = await domain.accounts.remove_deploy_key(args.app, args.name, actor=OPERATOR)
        out.write(tables.key_removed(key))
        return 0

    return await _with_domain(cfg, act)


async def key_list(args: argparse.Namespace, cfg: config.Config, out: TextIO) -> int:
    async def act(domain: Domain) -> int:
        _keys(await domain.accounts.list_keys(args.user), args.json, out)
        return 0

    return await _with_domain(cfg, act)


async def key_remove(args: argparse.Namespace, cfg: config.Config, out: TextIO) -> int:
    async def act(domain: Domain) -> int:
        key = await domain.accounts.remove_key(args.user, args.name, actor=OPERATOR)
        out.write(tables.key_removed(key))
        return 0

    return await _with_domain(cfg, act)


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

    return await _with_domain(cfg, act)


async def app_create(args: argparse.Namespace, cfg: config.Config, out: TextIO) -> int:
    async def act(domain: Domain) -> int:
        app = await domain.apps.create_app(args.app, args.owner, args.branch, actor=OPERATOR)
        out.write(
            f"created app {app.name} (owner {app.owner_name}, deploy branch {app.deploy_branch})\n"
        )
        out.write(f"clone URL: {cfg.clone_url(app.name)}\n")
        return 0

    return await _with_domain(cfg, act)


async def app_list(args: argparse.Namespace, cfg: config.Config, out: TextIO) -> int:
    async def act(domain: Domain) -> int:
        apps = await domain.apps.list_apps()
        if args.json:
            _json([app_dict(a, cfg) for a in apps], out)
        else:
            rows = [
                [a.name, a.owner_name, a.deploy_branch, shown(a.created_at), cfg.clone_url(a.name)]
                for a in apps
            ]
            _table(rows, ["APP", "OWNER", "BRANCH", "CREATED", "CLONE URL"], out)
        return 0

    return await _with_domain(cfg, act)


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

    return await _with_domain(cfg, act)


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

    return await _with_domain(cfg, act)


async def app_revoke(args: argparse.Namespace, cfg: config.Config, out: TextIO) -> int:
    async def act(domain: Domain) -> int:
        role = await domain.apps.revoke(args.app, args.user, actor=OPERATOR)
        out.write(f"revoked {args.user}'s {role.label} access to {args.app}\n")
        return 0

    return await _with_domain(cfg, act)


async def app_members(args: argparse.Namespace, cfg: config.Config, out: TextIO) -> int:
    async def act(domain: Domain) -> int:
        members = await domain.apps.members(args.app)
        if args.json:
            _json([member_dict(m) for m in members], out)
        else:
            _table(
                [[m.user_name, m.role.label, shown(m.created_at)] for m in members],
                ["USER", "ROLE", "SINCE"],
                out,
            )
        return 0

    return await _with_domain(cfg, act)


async def token_create(args: argparse.Namespace, cfg: config.Config, out: TextIO) -> int:
    async def act(domain: Domain) -> int:
        token, secret = await domain.tokens.create_token(
            args.name, args.user, actor=OPERATOR, expires=args.expires
        )
        if args.json:
            _json({**token_dict(token), "token": secret}, out)
            return 0
        scope = f"personal token of {token.user_name}" if token.personal else "operator token"
        until = f", expiring {shown(token.expires_at)}" if token.expires_at else ""
        out.write(f"created {scope} '{token.name}'{until}; it is shown only this once:\n{secret}\n")
        return 0

    return await _with_domain(cfg, act)


async def token_list(args: argparse.Namespace, cfg: config.Config, out: TextIO) -> int:
    async def act(domain: Domain) -> int:
        tokens = await domain.tokens.list_tokens()
        now = times.now()
        if args.json:
            _json([token_dict(t) for t in tokens], out)
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
            _table(rows, ["NAME", "USER", "CREATED", "LAST USED", "EXPIRES"], out)
        return 0

    return await _with_domain(cfg, act)


async def token_remove(args: argparse.Namespace, cfg: config.Config, out: TextIO) -> int:
    async def act(domain: Domain) -> int:
        token = await domain.tokens.remove_token(args.name, actor=OPERATOR)
        out.write(f"removed token '{token.name}'\n")
        return 0

    return await _with_domain(cfg, act)


async def deploy_list(args: argparse.Namespace, cfg: config.Config, out: TextIO) -> int:
    async def act(domain: Domain) -> int:
        deploys = await domain.records.list_deploys(args.app, limit=args.limit)
        if args.json:
            _json([deploy_dict(d) for d in deploys], out)
        else:
            _table(tables.deploy_rows(deploys), tables.DEPLOY_HEADERS, out)
        return 0

    return await _with_domain(cfg, act)


async def deploy_show(args: argparse.Namespace, cfg: config.Config, out: TextIO) -> int:
    async def act(domain: Domain) -> int:
        record = await domain.records.deploy_record(args.id)
        deploy, deliveries = record.deploy, record.deliveries
        if args.json:
            _json(deploy_record_dict(deploy, deliveries), out)
            return 0
        # Subject, author and reason are the tenant's text: shown escaped, one line each.
        for key, value in deploy_dict(deploy).items():
            text = tables.one_line("" if value is None else str(value))
            out.write(f"{key + ':':<17}{text}\n")
        for d in deliveries:
            result = d.status_code if d.status_code is not None else tables.one_line(d.error)
            out.write(
                f"webhook attempt {d.attempt}: {result} in {d.duration_ms} ms "
                f"at {shown(d.created_at)}\n"
            )
        return 0

    return await _with_domain(cfg, act)


def deploy_logs(args: argparse.Namespace, cfg: config.Config, out: TextIO) -> int:
    deploy = asyncio.run(_with_domain(cfg, lambda d: d.records.get_deploy(args.id)))
    # The log is the deploy's own output: its control sequences are shown, never obeyed.
    if args.follow and not deploy.status.finished:
        stream = TerminalStream()
        try:
            code = 1
            for reply in control.request(
                cfg.storage.control_socket, {"op": "follow", "deploy": args.id}
            ):
                if "out" in reply:
                    out.write(stream.feed(reply["out"]))
                    out.flush()
                if "exit" in reply:
                    code = int(reply["exit"])
            out.write(stream.flush())
            return code
        except control.NotRunning:
            # No gateway here: another node may run it; follow it in the registry.
            return asyncio.run(_with_domain(cfg, lambda d: _follow_stored(cfg, d, args.id, out)))
    out.write(
        terminal_safe(asyncio.run(_with_domain(cfg, lambda d: d.records.deploy_log(deploy.id))))
    )
    if not deploy.status.finished:
        out.write(f"deploy #{deploy.id} is {deploy.status.value}\n")
    if args.follow:
        return 0 if deploy.status.ok else 1
    return 0


def deploy_cancel(args: argparse.Namespace, cfg: config.Config, out: TextIO) -> int:
    try:
        code = 1
        message = {"op": "cancel", "deploy": args.id, "by": OPERATOR}
        for reply in control.request(cfg.storage.control_socket, message, timeout=120):
            if "out" in reply:
                out.write(terminal_safe(reply["out"]))
            if "exit" in reply:
                code = int(reply["exit"])
    except control.NotRunning:
        pass
    else:
        return code  # the running gateway cancelled it, and audited who asked

    from .deploys import cancel_offline

    async def offline(domain: Domain) -> int:
        deploy = await cancel_offline(domain.store, args.id, actor=OPERATOR)
        if deploy.status.finished:
            out.write(f"deploy #{deploy.id}: cancelled (no gateway runs here)\n")
        else:
            out.write(f"deploy #{deploy.id}: cancel asked of {deploy.runner}, which runs it\n")
        return 0

    return asyncio.run(_with_domain(cfg, offline))


async def _follow_stored(cfg: config.Config, domain: Domain, deploy_id: int, out: TextIO) -> int:
    """Stream a deploy's log from the registry to its end, polling (no gateway runs here to
    announce new output). Following is gateway.deploys' business: its watcher is given the
    facade's store, as DeployService is by the app."""
    from .deploys.queue import Wakeups
    from .deploys.watch import watch

    stream = TerminalStream()

    async def say(text: str) -> None:
        out.write(stream.feed(text))
        out.flush()

    final = await watch(
        domain.store, Wakeups(), deploy_id, say, asyncio.Event(), until_done=True, poll=lambda: 0.5
    )
    out.write(stream.flush())
    if final is None:  # pragma: no cover - until_done waits for the end
        return 1
    from .deploys.messages import final_line

    out.write(final_line(cfg, final, final.elapsed))
    return 0 if final.status.ok else 1


async def audit_list(args: argparse.Namespace, cfg: config.Config, out: TextIO) -> int:
    async def act(domain: Domain) -> int:
        events = await domain.audit_trail(app=args.app, actor=args.user, limit=args.limit)
        if args.json:
            _json([audit_dict(e) for e in events], out)
            return 0
        rows = [
            [
                shown(e.at),
                e.event,
                e.actor or "-",
                e.app or "-",
                e.source or "-",
                e.fingerprint or "-",
                " ".join(f"{k}={v}" for k, v in json.loads(e.detail).items()),
            ]
            for e in events
        ]
        _table(rows, ["AT", "EVENT", "ACTOR", "APP", "SOURCE", "FINGERPRINT", "DETAIL"], out)
        return 0

    return await _with_domain(cfg, act)


def serve(args: argparse.Namespace, cfg: config.Config, out: TextIO) -> int:
    from . import workers

    if args.worker_of is not None:
        return _serve_worker(workers.WorkerRole.from_json(args.worker_of), cfg)
    count = args.workers if args.workers is not None else cfg.server.workers
    count = count or workers.cores()
    logs.setup(cfg.log.level, cfg.log.format)
    log.info(
        "event=starting version=%s config=%s workers=%d",
        __version__,
        cfg.source if cfg.source else "embedded-defaults",
        count,
    )
    if count > 1:
        return asyncio.run(workers.Supervisor(cfg, count, cfg.source).run())
    from .app import Gateway  # the SSH stack is only loaded for the server

    try:
        asyncio.run(Gateway(cfg).serve_forever())
    except OSError as exc:
        host, port = cfg.ssh.listen
        raise GatewayError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return 0


def _serve_worker(role: Any, cfg: config.Config) -> int:
    """One of `serve --workers N`'s processes, started by the supervisor (gateway.workers)."""
    role.die_with_parent()
    logs.setup(cfg.log.level, cfg.log.format, worker=role.index)
    from .app import Gateway

    asyncio.run(Gateway(cfg, worker=role).serve_forever())
    return 0


def _worker_count(text: str) -> int:
    if not text.isdigit() or not 0 <= int(text) <= config.MAX_WORKERS:
        raise argparse.ArgumentTypeError(
            f"expected a whole number from 0 (one per CPU core) to {config.MAX_WORKERS}"
        )
    return int(text)


def config_show(args: argparse.Namespace, cfg: config.Config, out: TextIO) -> int:
    out.write(config.render(cfg) + "\n")
    return 0


def check(args: argparse.Namespace, cfg: config.Config, out: TextIO) -> int:
    # A test sandbox per configured command pipeline; which deploy limits this host enforces.
    from .deploys import confine, sandbox

    git = gitbin.locate(cfg.git.binary)
    try:
        cas = certs.load_cas(cfg.ssh.trusted_user_ca_keys)
        certs.Revocations(cfg.ssh.revoked_certificates)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"[ssh] certificates: {exc}") from None
    warnings = asyncio.run(sandbox.check(cfg))
    for warning in warnings:
        out.write(f"warning: {warning}\n")
    built = [label for label, box in sandbox.sandboxes(cfg).items() if box.enabled]
    sandboxed = f"; deploy sandbox ok for {', '.join(built)}" if built else ""
    trusted = f"; {len(cas)} trusted user CA key(s)" if cas else ""
    out.write(
        f"config ok ({cfg.source or 'embedded defaults'}); git {git.version_text} at {git.path}"
        f"{sandboxed}{trusted}\n"
    )
    sizes = [box.limits.build_size for box in sandbox.sandboxes(cfg).values() if box.enabled]
    for line in confine.report(sizes):
        out.write(f"{line}\n")
    # Read only: `check` may run beside an older gateway on the same registry (see probe).
    out.write(f"{asyncio.run(dbtools.probe(cfg))}\n")
    return 0


# -- argument parsing --


def print_completion(args: argparse.Namespace, cfg: object, out: TextIO) -> int:
    out.write(completion.script(build_parser(), args.shell))
    return 0


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        metavar="PATH",
        default=argparse.SUPPRESS,
        help=f"config file (default: ${config.CONFIG_ENV} or {config.DEFAULT_CONFIG_FILE})",
    )
    parser = argparse.ArgumentParser(
        prog="git-gateway",
        description="Git-over-SSH gateway for push-to-deploy platforms.",
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.set_defaults(needs_config=True)
    groups = parser.add_subparsers(dest="group", metavar="COMMAND", required=True)

    def add(
        sub: Any, name: str, func: Callable[..., Any], help_text: str
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text, parents=[common])
        p.set_defaults(func=func)
        return p

    p = add(groups, "serve", serve, "run the SSH server")
    p.add_argument(
        "--workers",
        type=_worker_count,
        metavar="N",
        help="processes accepting on the SSH port (default: [server] workers; 0 = one per "
        "CPU core)",
    )
    p.add_argument("--worker-of", help=argparse.SUPPRESS)  # set by the supervisor only
    add(groups, "check", check, "validate the configuration, the git runtime and the registry")
    p = add(groups, "completion", print_completion, "print the shell completion script")
    p.add_argument("shell", choices=completion.SHELLS)
    p.set_defaults(needs_config=False)
    p.epilog = (
        "bash: add `source <(git-gateway completion bash)` to ~/.bashrc; zsh: "
        "`source <(git-gateway completion zsh)` to ~/.zshrc"
    )
    cfg_group = groups.add_parser("config", help="show the configuration").add_subparsers(
        dest="action", metavar="ACTION", required=True
    )
    add(cfg_group, "show", config_show, "print the effective configuration")

    users = groups.add_parser("user", help="manage users").add_subparsers(
        dest="action", metavar="ACTION", required=True
    )
    add(users, "add", user_add, "create a user").add_argument("name")
    add(users, "list", user_list, "list users").add_argument("--json", action="store_true")
    add(users, "remove", user_remove, "remove a user, their keys and memberships").add_argument(
        "name"
    )

    keys = groups.add_parser("key", help="manage users' SSH keys").add_subparsers(
        dest="action", metavar="ACTION", required=True
    )
    p = add(keys, "add", key_add, "register an OpenSSH public key for a user")
    p.add_argument("user")
    p.add_argument("name", help="a name for this key, unique for the user (e.g. laptop)")
    _key_source(p)
    p.add_argument("--expires", metavar="WHEN", help=EXPIRES_HELP)
    p.add_argument("--read-only", action="store_true", help="it may clone and fetch, never push")
    p.add_argument(
        "--app",
        dest="apps",
        action="append",
        metavar="APP",
        help="it reaches only this app (repeat for several), within the user's roles",
    )
    p = add(keys, "list", key_list, "list a user's keys")
    p.add_argument("user")
    p.add_argument("--json", action="store_true")
    p = add(keys, "remove", key_remove, "remove one of a user's keys")
    p.add_argument("user")
    p.add_argument("name")
    p = add(keys, "move", key_move, "give one of a user's keys to another user (one transaction)")
    p.add_argument("user")
    p.add_argument("name")
    p.add_argument("--to", required=True, metavar="USER", help="the account that gets the key")
    p.add_argument("--name", dest="new_name", metavar="NAME", help="its name there (default: same)")

    apps = groups.add_parser("app", help="manage apps and their members").add_subparsers(
        dest="action", metavar="ACTION", required=True
    )
    p = add(apps, "create", app_create, "create an app and its bare repository")
    p.add_argument("app")
    p.add_argument("--owner", required=True, metavar="USER")
    p.add_argument("--branch", help="deploy branch and HEAD (default: [deploy] branch, main)")
    add(apps, "list", app_list, "list apps").add_argument("--json", action="store_true")
    add(
        apps, "remove", app_remove, "remove an app; its repository is moved to the trash"
    ).add_argument("app")
    p = add(apps, "grant", app_grant, "give a user a role on an app (again to change it)")
    p.add_argument("app")
    p.add_argument("user")
    p.add_argument("role", choices=["read", "write", "admin"])
    p = add(apps, "revoke", app_revoke, "remove a user's access to an app")
    p.add_argument("app")
    p.add_argument("user")
    p = add(apps, "members", app_members, "list who can reach an app")
    p.add_argument("app")
    p.add_argument("--json", action="store_true")
    app_keys = apps.add_parser(
        "key", help="an app's deploy keys: keys that reach this app only"
    ).add_subparsers(dest="key_action", metavar="ACTION", required=True)
    p = add(app_keys, "add", deploy_key_add, "register a deploy key (read-only by default)")
    p.add_argument("app")
    p.add_argument("name", help="a name for this key, unique for the app (e.g. ci)")
    _key_source(p)
    p.add_argument("--write", action="store_true", help="it may push too (default: read only)")
    p.add_argument("--expires", metavar="WHEN", help=EXPIRES_HELP)
    p = add(app_keys, "list", deploy_key_list, "list an app's deploy keys")
    p.add_argument("app")
    p.add_argument("--json", action="store_true")
    p = add(app_keys, "remove", deploy_key_remove, "remove one of an app's deploy keys")
    p.add_argument("app")
    p.add_argument("name")

    tokens = groups.add_parser("token", help="manage HTTP API tokens").add_subparsers(
        dest="action", metavar="ACTION", required=True
    )
    p = add(tokens, "create", token_create, "create an API token; its secret is shown once")
    p.add_argument("name", help="a unique name for the token (e.g. console)")
    p.add_argument(
        "--user",
        metavar="USER",
        help="a personal token acting as USER (their own keys, and the keys page); "
        "without it, an operator token for the whole API",
    )
    p.add_argument("--expires", metavar="WHEN", help=EXPIRES_HELP)
    p.add_argument("--json", action="store_true")
    add(tokens, "list", token_list, "list API tokens (never their secrets)").add_argument(
        "--json", action="store_true"
    )
    add(tokens, "remove", token_remove, "revoke an API token").add_argument("name")

    deploys = groups.add_parser("deploy", help="see and cancel deploys").add_subparsers(
        dest="action", metavar="ACTION", required=True
    )
    p = add(deploys, "list", deploy_list, "an app's recent deploys, newest first")
    p.add_argument("app")
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--json", action="store_true")
    p = add(deploys, "show", deploy_show, "one deploy's record and webhook deliveries")
    p.add_argument("id", type=_deploy_id)
    p.add_argument("--json", action="store_true")
    p = add(deploys, "logs", deploy_logs, "a deploy's log")
    p.add_argument("id", type=_deploy_id)
    p.add_argument(
        "--follow",
        "-f",
        action="store_true",
        help="stream until it ends; exit 1 unless it succeeded",
    )
    p = add(deploys, "cancel", deploy_cancel, "cancel a queued or running deploy")
    p.add_argument("id", type=_deploy_id)

    db = groups.add_parser("db", help="the registry database").add_subparsers(
        dest="action", metavar="ACTION", required=True
    )
    add(db, "migrate", dbtools.migrate, "apply pending schema migrations; print the version")
    p = add(
        db,
        "copy",
        dbtools.copy,
        "copy a SQLite registry into an empty PostgreSQL database (ids kept, checksummed)",
    )
    p.add_argument("--to", required=True, metavar="URL", help="postgresql://USER@HOST:PORT/DB")
    p.add_argument(
        "--from",
        dest="source",
        metavar="PATH",
        help="the SQLite file (default: [storage] database)",
    )

    p = add(groups, "audit", audit_list, "the audit trail: logins, refusals, changes, pushes")
    p.add_argument("--app", metavar="APP")
    p.add_argument("--user", metavar="USER", help="events whose actor is USER")
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--json", action="store_true")
    return parser


def _key_source(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "file", nargs="?", metavar="FILE", help="public key file, or - to read standard input"
    )
    p.set_defaults(key_parser=p)


def _require_key_source(args: argparse.Namespace) -> None:
    """`key add` and `app key add` read standard input only when told to (`-`): without it,
    a forgotten FILE would wait silently on a terminal, or on whatever stdin a script has."""
    key_parser = getattr(args, "key_parser", None)
    if key_parser is not None and args.file is None:
        key_parser.error("give the public key's FILE, or - to read it from standard input")


def _deploy_id(text: str) -> int:
    digits = text.removeprefix("#")
    if not digits.isdigit():
        raise argparse.ArgumentTypeError(f"invalid deploy id: {text!r}")
    return int(digits)


def main(
    argv: Sequence[str] | None = None, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    logs.capture_warnings()
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        _require_key_source(args)
    except SystemExit as exc:  # argparse: usage errors exit 2, --help/--version exit 0
        return int(exc.code or 0)
    # Whatever umask the gateway is started with, what it creates (the registry and its
    # -wal/-shm files, repositories, deploy logs, the control socket) is private. Restored
    # afterwards for callers that run commands in-process.
    previous = umask.make_private()
    try:
        # Commands that never read the configuration work even where it is broken.
        cfg = config.load(getattr(args, "config", None)) if args.needs_config else None
        result = args.func(args, cfg, out)
        if asyncio.iscoroutine(result):
            result = asyncio.run(result)
        return int(result)
    except GatewayError as exc:
        err.write(f"error: {terminal_safe(str(exc))}\n")
        return exc.exit_code
    except control.ControlError as exc:
        err.write(f"error: {terminal_safe(str(exc))}\n")
        return exc.code
    except KeyboardInterrupt:
        return 130
    finally:
        os.umask(previous)
