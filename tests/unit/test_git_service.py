"""ssh/commands/git.py's argument handling, without git: which service asks for which role,
the argv git runs with, the per-user caps around a service, and what a missing or unusable
repository answers."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from gateway import config as gwconfig
from gateway.domain.homes import HERE, Homes, HomeUnavailable, Route
from gateway.git.bridge import Outcome
from gateway.git.repos import git_settings
from gateway.models import Home, Identity, Role
from gateway.ssh.commands import Invocation, SessionStats
from gateway.ssh.commands import git as service
from gateway.ssh.forward import NOT_HOME, PeerUnreachable, Request
from gateway.ssh.limits import FETCHES, PUSHES, Admission, user_key
from tests.helpers import write_config

ALICE = Identity(1, "alice", 7, "laptop", "SHA256:alice")


async def _unset(identity: Identity, app: str, needed: Role) -> Any:
    raise AssertionError("this test does not authorize")


# The domain facade as the commands see it; a test sets the decision it needs.
# Homes off (no node): every operation is served here unless a test routes it elsewhere.
DOMAIN = SimpleNamespace(access=SimpleNamespace(authorize=_unset))
DOMAIN.homes = Homes(DOMAIN)  # type: ignore[arg-type]


def context(tmp_path: Path, admission: Admission | None = None, **limits: int) -> Any:
    config = gwconfig.load(write_config(tmp_path, limits=dict(limits)))
    return SimpleNamespace(
        identity=ALICE,
        config=config,
        domain=DOMAIN,
        git=SimpleNamespace(path="/usr/bin/git"),
        repos=SimpleNamespace(hooks_dir=tmp_path / "hooks", max_input_size=1234),
        pack_cache=None,
        admission=admission,
        metrics=None,
        conn_id="c0ffee00",
    )


@pytest.mark.parametrize(
    ("command", "role", "subcommand", "extra"),
    [
        ("git-upload-pack", Role.READ, "upload-pack", ("--strict",)),
        ("git-upload-archive", Role.READ, "upload-archive", ()),
        ("git-receive-pack", Role.WRITE, "receive-pack", ()),
    ],
)
async def test_each_service_asks_for_its_role_and_runs_its_git_subcommand(
    tmp_path, monkeypatch, command, role, subcommand, extra
):
    asked: list[tuple[str, Role]] = []
    served: list[tuple[str, tuple[str, ...]]] = []

    async def authorize(identity: Identity, app: str, needed: Role) -> Any:
        asked.append((app, needed))
        return SimpleNamespace(name=app), needed

    async def serve(ctx: Any, app: Any, granted: Role, sub: str, more: tuple[str, ...]) -> int:
        served.append((sub, more))
        return 0

    monkeypatch.setattr(DOMAIN.access, "authorize", authorize)
    monkeypatch.setattr(service, "_serve", serve)
    assert await service.run(context(tmp_path), Invocation(command, ("web",))) == 0
    assert asked == [("web", role)]
    assert served == [(subcommand, extra)]


def test_the_services_are_exactly_gits_three():
    assert set(service.SERVICES) == {"git-upload-pack", "git-upload-archive", "git-receive-pack"}
    # Only receive-pack writes; nothing else may ever ask for less than READ.
    assert {c for c, (role, _, _) in service.SERVICES.items() if role is Role.WRITE} == {
        "git-receive-pack"
    }


def test_git_argv_puts_the_gateways_settings_before_the_subcommand_and_the_path_last(tmp_path):
    ctx = context(tmp_path)
    argv = service.git_argv(ctx, "receive-pack", (), "/srv/repos/web.git")
    assert argv[:3] == ["/usr/bin/git", "-c", f"core.hooksPath={tmp_path / 'hooks'}"]
    assert argv[-2:] == ["receive-pack", "/srv/repos/web.git"]
    settings = argv[3:-2]
    assert settings[::2] == ["-c"] * (len(settings) // 2)
    assert settings[1::2] == [f"{k}={v}" for k, v in git_settings(1234)]
    assert "receive.maxInputSize=1234" in settings


def test_the_pack_cache_hook_is_given_to_upload_pack_only(tmp_path):
    ctx = context(tmp_path)
    ctx.pack_cache = SimpleNamespace(
        upload_pack_config=lambda: [("uploadpack.packObjectsHook", "/opt/hook")]
    )
    fetch = service.git_argv(ctx, "upload-pack", ("--strict",), "/r/web.git")
    assert "uploadpack.packObjectsHook=/opt/hook" in fetch
    assert fetch[-3:] == ["upload-pack", "--strict", "/r/web.git"]
    push = service.git_argv(ctx, "receive-pack", (), "/r/web.git")
    assert not any("packObjectsHook" in arg for arg in push)


@pytest.mark.parametrize(
    ("client_gone", "bytes_in", "spoken", "too_large"),
    [
        (False, 2000, set(), True),  # more than the limit came in and no hook ran
        (False, 2000, {"pre-receive"}, False),  # the pack was unpacked: not the limit
        (False, 1000, set(), False),  # within the limit
        (True, 2000, set(), False),  # the client left: nothing to tell it
    ],
)
def test_a_push_stopped_by_max_input_size_is_recognized(client_gone, bytes_in, spoken, too_large):
    outcome = Outcome(0, client_gone, bytes_in, 0)
    session = SimpleNamespace(spoken=spoken)
    assert service.pack_too_large(session, outcome, 1500) is too_large  # type: ignore[arg-type]


def test_the_too_large_line_names_the_limit_and_its_setting():
    line = service.too_large_line(8 * 1024 * 1024)
    assert line.startswith("error: push refused: the pack is larger than this gateway's limit")
    assert line.endswith("per push ([git] max_input_size)") and "\n" not in line


@pytest.mark.parametrize(
    ("command", "kind", "setting"),
    [
        ("git-receive-pack", PUSHES, "max_pushes_per_user"),
        ("git-upload-pack", FETCHES, "max_fetches_per_user"),
    ],
)
async def test_a_user_over_their_cap_is_refused_before_git_runs(
    tmp_path, monkeypatch, command, kind, setting
):
    ctx = context(tmp_path, **{setting: 1})
    ctx.admission = Admission(ctx.config.limits)
    served: list[str] = []

    async def authorize(identity: Identity, app: str, needed: Role) -> Any:
        return SimpleNamespace(name=app), needed

    async def serve(*args: Any) -> int:
        served.append(args[3])
        return 0

    monkeypatch.setattr(DOMAIN.access, "authorize", authorize)
    monkeypatch.setattr(service, "_serve", serve)
    assert ctx.admission.hold(kind, user_key(ALICE), 1)  # one already running
    with pytest.raises(service.TooManyAtOnce) as refused:
        await service.run(ctx, Invocation(command, ("web",)))
    assert f"(at most 1 at once on this node; [limits] {setting})" in str(refused.value)
    assert served == []
    ctx.admission.give_back(kind, user_key(ALICE))
    assert await service.run(ctx, Invocation(command, ("web",))) == 0
    # ...and the slot it held is given back, so the next one runs too.
    assert await service.run(ctx, Invocation(command, ("web",))) == 0


async def test_the_slot_is_given_back_when_the_service_fails(tmp_path, monkeypatch):
    ctx = context(tmp_path, max_pushes_per_user=1)
    ctx.admission = Admission(ctx.config.limits)

    async def authorize(identity: Identity, app: str, needed: Role) -> Any:
        return SimpleNamespace(name=app), needed

    async def broken(*args: Any) -> int:
        raise OSError("no space left")

    monkeypatch.setattr(DOMAIN.access, "authorize", authorize)
    monkeypatch.setattr(service, "_serve", broken)
    with pytest.raises(OSError):
        await service.run(ctx, Invocation("git-receive-pack", ("web",)))
    assert ctx.admission.hold(PUSHES, user_key(ALICE), 1)


@pytest.mark.parametrize("problem", ["enforce_fails", "missing"])
async def test_a_repository_that_cannot_be_used_is_unavailable_not_an_internal_error(
    tmp_path, problem
):
    def enforce(app: str) -> None:
        if problem == "enforce_fails":
            raise PermissionError("hooks directory is not ours")

    ctx = context(tmp_path)
    ctx.repos = SimpleNamespace(
        path_for=lambda app: tmp_path / f"{app}.git",
        enforce=enforce,
        exists=lambda app: False,
    )
    app = SimpleNamespace(name="web", id=1)
    with pytest.raises(service.RepositoryUnavailable) as err:
        await service._serve(ctx, app, Role.WRITE, "receive-pack", ())  # type: ignore[arg-type]
    assert str(err.value) == ("repository 'web' is temporarily unavailable; contact the operator")


class Channel:
    def __init__(self) -> None:
        self.stdin = self.stdout = None
        self.stderr = self
        self.written = b""

    def write(self, data: bytes) -> None:
        self.written += data


class Forwarder:
    """Answers each forwarded run with the next of `answers` (an Outcome or an exception)."""

    def __init__(self, *answers: Any) -> None:
        self.answers = list(answers)
        self.requests: list[tuple[str, Request]] = []

    async def run(self, address: str, request: Request, channel: Any) -> Outcome:
        self.requests.append((address, request))
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


ELSEWHERE = Route(Home("node-a-1-x", "node-a", "10.0.0.11:7422"))


def routed(tmp_path, monkeypatch, routes: list[Route], forwarder: Forwarder) -> Any:
    """A context whose app is routed as `routes` say, one per lookup, and served here as 7."""

    async def authorize(identity: Identity, app: str, needed: Role) -> Any:
        return SimpleNamespace(name=app, id=1), needed

    async def route(app: Any) -> Route:
        return routes.pop(0)

    async def serve(*args: Any, **kwargs: Any) -> int:
        return 7

    monkeypatch.setattr(DOMAIN.access, "authorize", authorize)
    monkeypatch.setattr(DOMAIN.homes, "route", route)
    monkeypatch.setattr(service, "_serve", serve)
    ctx = context(tmp_path)
    ctx.channel = Channel()
    ctx.forwarder = forwarder
    ctx.client_protocol = "version=2"
    ctx.peer = "192.0.2.7:50000"
    ctx.stats = SessionStats()
    return ctx


async def test_an_app_homed_elsewhere_is_forwarded_with_the_verified_identity(
    tmp_path, monkeypatch
):
    forwarder = Forwarder(Outcome(0, False, 10, 20))
    ctx = routed(tmp_path, monkeypatch, [ELSEWHERE], forwarder)
    assert await service.run(ctx, Invocation("git-receive-pack", ("web",))) == 0
    [(address, request)] = forwarder.requests
    assert address == "10.0.0.11:7422"
    assert (request.service, request.app, request.identity, request.protocol) == (
        "git-receive-pack",
        "web",
        ALICE,
        "version=2",
    )
    assert (request.conn, request.peer) == ("c0ffee00", "192.0.2.7:50000")
    assert Request.decode(request.encode()) == request
    assert (ctx.stats.bytes_in, ctx.stats.bytes_out) == (10, 20)


async def test_a_home_that_moved_meanwhile_is_looked_up_again(tmp_path, monkeypatch):
    forwarder = Forwarder(Outcome(NOT_HOME, False, 0, 0))
    ctx = routed(tmp_path, monkeypatch, [ELSEWHERE, HERE], forwarder)
    assert await service.run(ctx, Invocation("git-upload-pack", ("web",))) == 7
    assert len(forwarder.requests) == 1


async def test_a_home_that_keeps_moving_is_unavailable_after_three_looks(tmp_path, monkeypatch):
    forwarder = Forwarder(*[Outcome(NOT_HOME, False, 0, 0)] * 3)
    ctx = routed(tmp_path, monkeypatch, [ELSEWHERE] * 3, forwarder)
    with pytest.raises(HomeUnavailable):
        await service.run(ctx, Invocation("git-upload-pack", ("web",)))


async def test_an_unreachable_home_is_unavailable(tmp_path, monkeypatch):
    ctx = routed(tmp_path, monkeypatch, [ELSEWHERE], Forwarder(PeerUnreachable("x")))
    with pytest.raises(HomeUnavailable) as err:
        await service.run(ctx, Invocation("git-upload-pack", ("web",)))
    assert "temporarily unavailable" in str(err.value)


async def test_a_home_lost_mid_operation_says_so_once_and_fails(tmp_path, monkeypatch):
    ctx = routed(tmp_path, monkeypatch, [ELSEWHERE], Forwarder(Outcome(-1, False, 5, 5)))
    assert await service.run(ctx, Invocation("git-receive-pack", ("web",))) == 1
    assert ctx.channel.written.decode().count("\n") == 1
    assert "stopped answering" in ctx.channel.written.decode()
    assert ctx.stats.outcome == "home_lost"
