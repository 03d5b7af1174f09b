"""The git services: authorize, then run git's own upload-pack / receive-pack / upload-archive."""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Callable, Iterator

from ... import executors
from ...config import size_text
from ...deploys import PushSession
from ...domain.homes import HomeUnavailable, node_name
from ...errors import GatewayError
from ...git import bridge, gitbin, hooks
from ...git.repos import git_settings
from ...logs import q
from ...models import App, Home, Role
from ..forward import NOT_HOME, PeerUnreachable, Request
from ..limits import FETCHES, PUSHES, user_key
from .account import expiry_warning
from .base import Context, Invocation

log = logging.getLogger("gateway.git")

# SSH command -> (role needed, git subcommand, extra arguments)
SERVICES: dict[str, tuple[Role, str, tuple[str, ...]]] = {
    "git-upload-pack": (Role.READ, "upload-pack", ("--strict",)),
    "git-upload-archive": (Role.READ, "upload-archive", ()),
    "git-receive-pack": (Role.WRITE, "receive-pack", ()),
}


class RepositoryUnavailable(GatewayError):
    def __init__(self, app: str) -> None:
        super().__init__(f"repository '{app}' is temporarily unavailable; contact the operator")


def git_argv(ctx: Context, subcommand: str, extra: tuple[str, ...], path: str) -> list[str]:
    """argv for a git service: the repository settings passed with -c so that they always
    follow the current configuration, whatever is written in the repository itself; and
    hooks taken from the gateway's own directory, outside every repository, so that a hook
    written into a repository never runs, not even one planted during this very push."""
    argv = [ctx.git.path, "-c", f"core.hooksPath={ctx.repos.hooks_dir}"]
    settings = git_settings(ctx.repos.max_input_size)
    if subcommand == "upload-pack" and ctx.pack_cache is not None:
        settings += ctx.pack_cache.upload_pack_config()
    for key, value in settings:
        argv += ["-c", f"{key}={value}"]
    return [*argv, subcommand, *extra, path]


def pack_too_large(session: PushSession, outcome: bridge.Outcome, limit: int) -> bool:
    """Whether receive.maxInputSize stopped this push. receive-pack exits 0 all the same
    and tells git's `pack exceeds maximum allowed size` in band; but a pack that was unpacked
    always reaches pre-receive, and one that was refused never does, so: more bytes than the
    limit came in, and no pre-receive hook spoke."""
    return (
        not outcome.client_gone and outcome.bytes_in > limit and "pre-receive" not in session.spoken
    )


def too_large_line(limit: int) -> str:
    return (
        f"error: push refused: the pack is larger than this gateway's limit of "
        f"{size_text(limit)} per push ([git] max_input_size)"
    )


class TooManyAtOnce(GatewayError):
    """One user's fetches or pushes over their per-node cap (`kind`: FETCHES, PUSHES)."""

    def __init__(self, user: str, limit: int, what: str, kind: str) -> None:
        super().__init__(
            f"too many {what} for {user} (at most {limit} at once on this node; "
            f"[limits] max_{kind}_per_user): retry when one has finished"
        )


async def run(ctx: Context, inv: Invocation) -> int:
    needed, subcommand, _ = SERVICES[inv.command]
    app, role = await ctx.domain.access.authorize(ctx.identity, inv.app, needed)
    with _admitted(ctx, app, subcommand):
        return await _dispatch(ctx, inv, app, role)


@contextlib.contextmanager
def _admitted(ctx: Context, app: App, subcommand: str) -> Iterator[None]:
    """Hold one of the user's slots on this node while the block runs, or refuse.

    A clone or an archive is the costly read (pack-objects, compression): one user's many
    at once must not take the node's CPU from the others. A push costs more (index-pack,
    a quarantine of up to max_input_size on the repositories' disk, the pre-receive
    checks on the gateway's blocking threads): review 2 found 64 connections x 10
    sessions of one user let 640 run at once, so pushes have a cap of their own. Held where
    the client connected and again on the home node that runs git: users entering through
    several nodes still run no more than the cap on the home."""
    admission = ctx.admission
    if admission is None:
        yield
        return
    if subcommand == "receive-pack":
        kind, what, limit = PUSHES, "pushes", ctx.config.limits.max_pushes_per_user
    else:
        kind, what, limit = FETCHES, "fetches", ctx.config.limits.max_fetches_per_user
    key = user_key(ctx.identity)
    if not admission.hold(kind, key, limit):
        if ctx.metrics is not None:
            ctx.metrics.limit_rejections.labels(f"max_{kind}_per_user").inc()
        log.info(
            "event=refused conn=%s user=%s service=%s app=%s reason=max_%s_per_user limit=%d",
            ctx.conn_id,
            ctx.identity.user_name,
            subcommand,
            app.name,
            kind,
            limit,
        )
        raise TooManyAtOnce(ctx.identity.user_name, limit, what, kind)
    try:
        yield
    finally:
        admission.give_back(kind, key)


async def _dispatch(ctx: Context, inv: Invocation, app: App, role: Role) -> int:
    """Serve here, or on the app's home node when that is another (gateway.ssh.forward)."""
    _, subcommand, extra = SERVICES[inv.command]
    homes = ctx.domain.homes
    # A home that turns out not to be one any more (it drained) is looked up again.
    for _ in range(3):
        route = await homes.route(app)
        if route.home is None:
            return await _serve(ctx, app, role, subcommand, extra)
        code = await _forward(ctx, inv, app, route.home)
        if code is not None:
            return code
    raise HomeUnavailable(app.name)


async def serve_forwarded(
    ctx: Context, inv: Invocation, via: str, serving: Callable[[], None]
) -> int | None:
    """An operation another node forwarded here (gateway.ssh.peers): authorized again against
    the registry and this node's caps, run if this node is the app's home (`serving` is
    called first: the entry node then sends the client's input); None if it is not (the
    entry node looks again)."""
    needed, subcommand, extra = SERVICES[inv.command]
    app, role = await ctx.domain.access.authorize(ctx.identity, inv.app, needed)
    if not await ctx.domain.homes.serves_here(app):
        log.info("event=not_home app=%s via=%s conn=%s", app.name, q(via), ctx.conn_id)
        return None
    with _admitted(ctx, app, subcommand):
        serving()
        return await _serve(ctx, app, role, subcommand, extra, via=via)


async def _forward(ctx: Context, inv: Invocation, app: App, home: Home) -> int | None:
    """Run the operation on `home` with this session's streams; its exit status, or None if
    that node is not the home any more."""
    if ctx.forwarder is None or home.address is None:
        log.error("event=home_unreachable app=%s home=%s reason=no_address", app.name, home.name)
        raise HomeUnavailable(app.name)
    request = Request(
        service=inv.command,
        app=app.name,
        identity=ctx.identity,
        protocol=ctx.client_protocol,
        conn=ctx.conn_id,
        peer=ctx.peer,
        via=node_name(ctx.config),
    )
    started = time.monotonic()
    try:
        outcome = await ctx.forwarder.run(home.address, request, ctx.channel)
    except PeerUnreachable:
        if ctx.metrics is not None:
            ctx.metrics.forwarded(inv.command.removeprefix("git-"), "unreachable")
        log.warning(
            "event=home_unreachable app=%s home=%s address=%s conn=%s",
            app.name,
            home.name,
            home.address,
            ctx.conn_id,
        )
        raise HomeUnavailable(app.name) from None
    if outcome.returncode == NOT_HOME and outcome.bytes_out == 0:
        return None
    lost = outcome.returncode < 0 and not outcome.client_gone
    log.info(
        "event=git_forwarded service=%s app=%s user=%s home=%s rc=%d bytes_in=%d bytes_out=%d "
        "client_gone=%s duration=%.3f conn=%s",
        inv.command.removeprefix("git-"),
        app.name,
        ctx.identity.user_name,
        home.name,
        outcome.returncode,
        outcome.bytes_in,
        outcome.bytes_out,
        outcome.client_gone,
        time.monotonic() - started,
        ctx.conn_id,
    )
    ctx.stats.bytes_in += outcome.bytes_in
    ctx.stats.bytes_out += outcome.bytes_out
    if lost:
        result = "home_lost"
    elif outcome.client_gone:
        result = "client_gone"
    else:
        result = "ok" if outcome.returncode == 0 else "error"
    if ctx.metrics is not None:
        ctx.metrics.forwarded(inv.command.removeprefix("git-"), result)
    if lost:
        ctx.stats.outcome = "home_lost"
        with contextlib.suppress(*bridge.CLIENT_GONE):
            ctx.channel.stderr.write(
                f"error: the node serving '{app.name}' stopped answering during this "
                "operation: retry (a push either went through whole or not at all)\n".encode()
            )
        return 1
    if outcome.client_gone:
        ctx.stats.outcome = "client_gone"
    elif outcome.returncode != 0:
        ctx.stats.outcome = "error"
    return outcome.returncode if outcome.returncode >= 0 else 1


async def _serve(
    ctx: Context,
    app: App,
    role: Role,
    subcommand: str,
    extra: tuple[str, ...],
    via: str | None = None,
) -> int:
    # A drain keeps the home of an app with an operation running here, until it ends.
    try:
        with ctx.domain.homes.busy(app.id):
            return await _run_git(ctx, app, role, subcommand, extra, via)
    finally:
        with contextlib.suppress(GatewayError):
            await ctx.domain.homes.finished(app.id)


async def _run_git(
    ctx: Context, app: App, role: Role, subcommand: str, extra: tuple[str, ...], via: str | None
) -> int:
    path = ctx.repos.path_for(app.name)
    try:
        # Whatever was written into the repository since the last operation (a hook, a
        # config key naming a program, alternates...) is removed before git reads it.
        await executors.run(ctx.repos.enforce, app.name)
    except OSError as exc:
        log.error(
            "event=repo_enforce_failed app=%s path=%s error=%s conn=%s",
            app.name,
            path,
            q(exc),
            ctx.conn_id,
        )
        raise RepositoryUnavailable(app.name) from None
    if not ctx.repos.exists(app.name):
        log.error("event=repo_missing app=%s path=%s conn=%s", app.name, path, ctx.conn_id)
        raise RepositoryUnavailable(app.name)
    warning = expiry_warning(ctx)
    if warning:
        # On stderr, which git clients print as they get it: the pusher sees it in time.
        ctx.channel.stderr.write(f"{warning}\n".encode())
    env = gitbin.environment(
        ctx.repos.root,
        ctx.client_protocol,
        GATEWAY_APP=app.name,
        GATEWAY_USER=ctx.identity.user_name,
        GATEWAY_KEY_FINGERPRINT=ctx.identity.fingerprint,
    )
    if subcommand == "upload-pack" and ctx.pack_cache is not None:
        env.update(ctx.pack_cache.environment())
    started = time.monotonic()
    session: PushSession | None = None
    on_spawn = None
    if subcommand == "receive-pack":
        # The hooks of this push reach the deploy service with this session's token; the
        # identity stays on the server side, bound to the verified key.
        session = await ctx.deploys.open_session(ctx.identity, app, ctx.conn_id, ctx.peer)
        env[hooks.SOCKET_ENV] = str(ctx.config.storage.control_socket)
        env[hooks.TOKEN_ENV] = session.token
        # Only this receive-pack's own hooks may present the session's token.
        on_spawn = functools.partial(ctx.deploys.pushes.bind, session)
    try:
        outcome = await bridge.run(
            git_argv(ctx, subcommand, extra, str(path)),
            env,
            ctx.channel,
            cwd=path,
            finish_on_hangup=session is not None,
            hangup=session.detached if session is not None else None,
            idle_timeout=ctx.config.limits.idle_timeout,
            label=f"service={subcommand} app={app.name} user={ctx.identity.user_name} "
            f"conn={ctx.conn_id}",
            started=on_spawn,
        )
    finally:
        if session is not None:
            ctx.deploys.close_session(session)
    if session is not None and pack_too_large(session, outcome, ctx.repos.max_input_size):
        with contextlib.suppress(*bridge.CLIENT_GONE):
            ctx.channel.stderr.write(f"{too_large_line(ctx.repos.max_input_size)}\n".encode())
    failed_deploy = session is not None and session.failed
    if outcome.idle:
        result = "idle_timeout"
    elif outcome.client_gone:
        result = "client_gone"
    elif outcome.returncode != 0:
        result = "error"
    else:
        result = "deploy_failed" if failed_deploy else "ok"
    duration = time.monotonic() - started
    log.info(
        "event=git service=%s app=%s user=%s fp=%s role=%s protocol=%s rc=%d bytes_in=%d "
        "bytes_out=%d client_gone=%s duration=%.3f outcome=%s conn=%s%s",
        subcommand,
        app.name,
        ctx.identity.user_name,
        ctx.identity.fingerprint,
        role.label,
        ctx.client_protocol or "v0",
        outcome.returncode,
        outcome.bytes_in,
        outcome.bytes_out,
        outcome.client_gone,
        duration,
        result,
        ctx.conn_id,
        "" if via is None else f" via={q(via)}",
    )
    ctx.stats.bytes_in += outcome.bytes_in
    ctx.stats.bytes_out += outcome.bytes_out
    ctx.stats.outcome = result
    if ctx.metrics is not None:
        ctx.metrics.git_done(subcommand, result, duration, outcome.bytes_in, outcome.bytes_out)
    if outcome.idle:
        return 1
    if outcome.returncode != 0:
        return outcome.returncode if outcome.returncode > 0 else 1
    # The refs are stored, but an attached deploy failed: a non-zero exit makes `git push`
    # fail too, so a broken deploy never looks green in a terminal or a CI job.
    return 1 if failed_deploy else 0
