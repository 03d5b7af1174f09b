"""The CLI's argument parser: every command, its options and its help."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any, TextIO

from .. import __version__, completion, config, dbtools
from .accounts import (
    app_create,
    app_grant,
    app_list,
    app_members,
    app_remove,
    app_revoke,
    deploy_key_add,
    deploy_key_list,
    deploy_key_remove,
    key_add,
    key_list,
    key_move,
    key_remove,
    token_create,
    token_list,
    token_remove,
    user_add,
    user_list,
    user_remove,
)
from .common import EXPIRES_HELP
from .deploys import audit_list, deploy_cancel, deploy_list, deploy_logs, deploy_show
from .operate import check, config_show, serve, worker_count


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
        type=worker_count,
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


def require_key_source(args: argparse.Namespace) -> None:
    """`key add` and `app key add` read standard input only when told to (`-`): without it,
    a forgotten FILE would wait silently on a terminal, or on whatever stdin a script has."""
    key_parser = getattr(args, "key_parser", None)
    if key_parser is not None and args.file is None:
        key_parser.error("give the public key's FILE, or - to read it from standard input")


def _deploy_id(text: str) -> int:
    digits = text.removeprefix("#")
    if not (digits.isascii() and digits.isdigit()):
        raise argparse.ArgumentTypeError(f"invalid deploy id: {text!r}")
    return int(digits)


def print_completion(args: argparse.Namespace, cfg: object, out: TextIO) -> int:
    out.write(completion.script(build_parser(), args.shell))
    return 0
