"""Keys page sessions on a real registry file: expiry, idle expiry, caps, revocation; the
pre-sign-in token; origins."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gateway import times
from gateway.config import from_mapping
from gateway.domain.facade import Domain
from gateway.domain.tokens import IDLE, LIFETIME, MAX_PER_TOKEN
from gateway.http import sessions as sessions_module
from gateway.http.sessions import Sessions, origin_of
from gateway.store import open_store


@pytest.fixture
async def store(tmp_path: Path):
    s = await open_store(tmp_path / "gw.db")
    yield s
    await s.close()


def over(store, tmp_path: Path) -> Sessions:  # type: ignore[no-untyped-def]
    """Sessions as the keys page has them: over the domain facade on this registry."""
    return Sessions(Domain(from_mapping({"storage": {"repos": str(tmp_path)}}), store), "")


async def personal(store, name: str = "alice"):  # type: ignore[no-untyped-def]
    await store.create_user(name)
    return await store.create_token(f"{name}-web", name, f"hash-of-{name}")


async def test_a_session_lives_until_signout(store, tmp_path) -> None:  # type: ignore[no-untyped-def]
    sessions = over(store, tmp_path)
    token = await personal(store)
    session_id = await sessions.open(token)
    found = await sessions.find(session_id)
    assert found is not None and found.id == token.id
    assert await sessions.find(session_id + "x") is None
    await sessions.close(session_id)
    assert await sessions.find(session_id) is None


async def test_expired_and_idle_sessions_end(store, monkeypatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    sessions = over(store, tmp_path)
    token = await personal(store)
    session_id = await sessions.open(token)
    real = times.now()

    class Later:
        offset = timedelta(0)

        @classmethod
        def now(cls) -> datetime:
            return real + cls.offset

    monkeypatch.setattr(times, "now", Later.now)
    Later.offset = IDLE - timedelta(minutes=5)
    assert await sessions.find(session_id) is not None  # active: last seen moves on
    Later.offset += IDLE - timedelta(minutes=5)
    assert await sessions.find(session_id) is not None
    Later.offset = LIFETIME + timedelta(seconds=1)  # however active, the end is the end
    assert await sessions.find(session_id) is None
    other = await sessions.open(token)
    Later.offset += IDLE + timedelta(seconds=1)  # never used again: idle expiry
    assert await sessions.find(other) is None


async def test_signins_are_capped_and_pruned(store, tmp_path) -> None:  # type: ignore[no-untyped-def]
    sessions = over(store, tmp_path)
    token = await personal(store)
    ids = [await sessions.open(token) for _ in range(MAX_PER_TOKEN + 5)]
    assert [await sessions.find(i) is not None for i in ids[:5]] == [False] * 5
    assert all([await sessions.find(i) is not None for i in ids[5:]])
    future = datetime.now(UTC) + LIFETIME + timedelta(seconds=1)
    assert await store.prune_web_sessions(future, future - IDLE) == MAX_PER_TOKEN


async def test_revoking_the_token_or_removing_the_user_ends_sessions(store, tmp_path) -> None:  # type: ignore[no-untyped-def]
    sessions = over(store, tmp_path)
    token = await personal(store, "alice")
    first = await sessions.open(token)
    await store.remove_token(token.name)
    assert await sessions.find(first) is None
    bob = await personal(store, "bob")
    second = await sessions.open(bob)
    await store.remove_user("bob")
    assert await sessions.find(second) is None


def test_presignin_token() -> None:
    sessions = Sessions(None, "")  # type: ignore[arg-type]
    cookie, field = sessions.new_presignin()
    assert sessions.check_presignin(cookie, field)
    other_cookie, other_field = sessions.new_presignin()
    assert not sessions.check_presignin(cookie, other_field)
    assert not sessions.check_presignin(other_cookie, field)
    assert not sessions.check_presignin(cookie, "")
    # Another process (another secret) does not accept it.
    assert not Sessions(None, "").check_presignin(cookie, field)  # type: ignore[arg-type]
    # An old form is refused even with its own cookie.
    random_part = cookie.rsplit(".", 1)[0]
    old = f"{random_part}.{int(time.time()) - sessions_module.PRESIGNIN_SECONDS - 1}"
    assert not sessions.check_presignin(old, sessions._mac("signin", old))


@pytest.mark.parametrize(
    ("url", "origin"),
    [
        ("http://127.0.0.1:8080", "http://127.0.0.1:8080"),
        ("HTTPS://Gateway.Example.com:443/base/", "https://gateway.example.com"),
        ("http://gw.example:80", "http://gw.example"),
        ("https://gw.example:8443/x?y", "https://gw.example:8443"),
        ("http://[::1]:8080", "http://[::1]:8080"),
        ("http://bad host:port", "invalid:"),
    ],
)
def test_origin_of(url: str, origin: str) -> None:
    assert origin_of(url) == origin
