"""The domain facade on a real registry file: each operation, the audit event it records
itself, and its refusals (one AccessDenied for a missing and a forbidden app, KeyInUse,
expiry)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest

from gateway import times
from gateway.config import from_mapping
from gateway.domain.access import KeyExpired, KeyRevoked
from gateway.domain.facade import Domain
from gateway.domain.tokens import TokenExpired, hash_token
from gateway.errors import AccessDenied, KeyInUse, NotFound, UsageError
from gateway.keys import parse_public_key
from gateway.models import CertInfo, Identity, Role
from tests.helpers import keygen

NOT_FOUND = "repository '{}' not found or access denied"


@pytest.fixture(scope="module")
def pubkeys(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    d = tmp_path_factory.mktemp("facadekeys")
    return [Path(f"{keygen(d / f'k{i}', 'ed25519')}.pub").read_text() for i in range(4)]


@pytest.fixture
async def domain(tmp_path: Path) -> AsyncIterator[Domain]:
    cfg = from_mapping(
        {
            "storage": {"database": str(tmp_path / "gw.db"), "repos": str(tmp_path / "repos")},
        }
    )
    async with Domain.open(cfg) as opened:
        opened.repos.ensure_root()
        yield opened


async def events(domain: Domain, kind: str) -> list[dict[str, object]]:
    """The audit rows of one kind, newest first, with their detail decoded."""
    return [
        {**dataclasses.asdict(e), "detail": json.loads(e.detail)}
        for e in await domain.audit_trail(limit=1000)
        if e.event == kind
    ]


async def member(domain: Domain, pubkeys: list[str]) -> Identity:
    """bob, with a key, reading alice's app `web`; his identity."""
    await domain.accounts.create_user("alice", actor="op")
    await domain.accounts.create_user("bob", actor="op")
    await domain.apps.create_app("web", "alice", actor="op")
    await domain.apps.create_app("secret", "alice", actor="op")
    await domain.apps.grant("web", "bob", "read", actor="op")
    key = await domain.accounts.add_key("bob", "laptop", pubkeys[0], actor="op")
    identity = await domain.access.identify(key.fingerprint)
    assert identity is not None
    return identity


# -- accounts --


async def test_users_and_keys_are_audited_with_their_actor(domain: Domain, pubkeys) -> None:
    await domain.accounts.create_user("alice", actor="op")
    key = await domain.accounts.add_key(
        "alice", "laptop", pubkeys[0], actor="alice", expires="30d", read_only=True
    )
    [added] = await events(domain, "key_added")
    assert added["actor"] == "alice" and added["fingerprint"] == key.fingerprint
    assert added["detail"]["key"] == "laptop" and added["detail"]["access"] == "read"
    assert "expires_at" in added["detail"]
    summary = await domain.accounts.user_summary("alice")
    assert (summary.user.name, summary.keys, summary.apps) == ("alice", 1, 0)
    await domain.accounts.remove_key("alice", "laptop", actor="op")
    [removed] = await events(domain, "key_removed")
    assert removed["detail"] == {"user": "alice", "key": "laptop"}
    await domain.accounts.remove_user("alice", actor="op")
    assert [e["detail"] for e in await events(domain, "user_removed")] == [{"user": "alice"}]
    assert [e["actor"] for e in await events(domain, "user_added")] == ["op"]


async def test_a_key_belongs_to_one_account_only(domain: Domain, pubkeys) -> None:
    await domain.accounts.create_user("alice", actor="op")
    await domain.accounts.create_user("mallory", actor="op")
    await domain.accounts.add_key("alice", "laptop", pubkeys[0], actor="op")
    with pytest.raises(KeyInUse):
        await domain.accounts.add_key("mallory", "stolen", pubkeys[0], actor="mallory")
    assert await domain.accounts.list_keys("mallory") == []
    assert len(await events(domain, "key_added")) == 1


async def test_no_key_outlives_what_added_it(domain: Domain, pubkeys) -> None:
    await domain.accounts.create_user("alice", actor="op")
    soon = times.now() + timedelta(days=1)
    for expires in (None, "90d"):
        with pytest.raises(UsageError, match="must expire no later"):
            await domain.accounts.add_key(
                "alice", "k", pubkeys[0], actor="alice", expires=expires, not_after=soon
            )
    with pytest.raises(UsageError):
        await domain.accounts.add_key("alice", "k", pubkeys[0], actor="alice", expires="never?")
    assert await domain.accounts.list_keys("alice") == []
    assert await events(domain, "key_added") == []


async def test_regression_a_scoped_key_names_no_app_it_cannot_reach(
    domain: Domain, pubkeys
) -> None:
    """Limiting a key to another tenant's app, or to a missing one: the same refusal."""
    await member(domain, pubkeys)
    answers = set()
    for app in ("secret", "no-such-app"):
        with pytest.raises(NotFound) as err:
            await domain.accounts.add_key("bob", "ci", pubkeys[1], actor="bob", apps=[app])
        answers.add(str(err.value).replace(app, "APP"))
    assert answers == {"app 'APP' not found or not reachable by bob"}


# -- apps and deploy records --


async def test_apps_and_members_are_audited(domain: Domain) -> None:
    await domain.accounts.create_user("alice", actor="op")
    await domain.accounts.create_user("bob", actor="op")
    app = await domain.apps.create_app("web", "alice", actor="op")
    assert domain.repos.exists("web") and app.deploy_branch == "main"
    grant = await domain.apps.grant("web", "bob", "write", actor="alice")
    assert (grant.role, grant.previous) == (Role.WRITE, None)
    assert (await domain.apps.grant("web", "bob", "read", actor="alice")).previous is Role.WRITE
    assert await domain.apps.revoke("web", "bob", actor="alice") is Role.READ
    granted = await events(domain, "member_granted")
    assert [e["detail"]["previous"] for e in granted] == ["write", None]
    assert [e["app"] for e in await events(domain, "member_revoked")] == ["web"]
    with pytest.raises(UsageError):
        await domain.apps.grant("web", "bob", "god", actor="alice")
    removed = await domain.apps.remove_app("web", actor="op")
    assert removed.trashed is not None and not domain.repos.exists("web")
    [event] = await events(domain, "app_removed")
    assert event["detail"]["trash"] == str(removed.trashed)
    with pytest.raises(NotFound):
        await domain.apps.get_app("web")


async def test_deploy_records_refuse_what_does_not_exist(domain: Domain) -> None:
    await domain.accounts.create_user("alice", actor="op")
    await domain.apps.create_app("web", "alice", actor="op")
    assert await domain.records.list_deploys("web") == []
    with pytest.raises(UsageError, match="between 1 and 1000"):
        await domain.records.list_deploys("web", limit=0)
    with pytest.raises(NotFound, match="no such app"):
        await domain.records.list_deploys("nope")
    with pytest.raises(NotFound, match="no deploy #7"):
        await domain.records.deploy_log(7)


# -- access: identify, authorize, recheck, and what logins leave in the audit trail --


async def test_regression_a_missing_and_a_forbidden_app_get_one_refusal(
    domain: Domain, pubkeys
) -> None:
    bob = await member(domain, pubkeys)
    app, role = await domain.access.authorize(bob, "web", Role.READ)
    assert (app.name, role) == ("web", Role.READ)
    for name in ("secret", "no-such-app", "../etc"):
        with pytest.raises(AccessDenied) as err:
            await domain.access.authorize(bob, name, Role.READ)
        assert str(err.value) == NOT_FOUND.format(name)
    with pytest.raises(AccessDenied, match="pushing needs the write role"):
        await domain.access.authorize(bob, "web", Role.WRITE)
    assert [(a.name, r) for a, r in await domain.access.reachable(bob)] == [("web", Role.READ)]


async def test_regression_a_deploy_key_learns_nothing_of_other_tenants_apps(
    domain: Domain, pubkeys
) -> None:
    await member(domain, pubkeys)
    key = await domain.accounts.add_deploy_key("web", "ci", pubkeys[2], actor="op")
    [event] = await events(domain, "deploy_key_added")
    assert event["app"] == "web" and event["detail"]["access"] == "read"
    ci = await domain.access.identify(key.fingerprint)
    assert ci is not None and ci.user_name == "deploy:web/ci"
    assert (await domain.access.authorize(ci, "web", Role.READ))[1] is Role.READ
    answers = set()
    for name in ("secret", "no-such-app"):
        with pytest.raises(AccessDenied) as err:
            await domain.access.authorize(ci, name, Role.READ)
        answers.add(str(err.value).replace(name, "APP"))
    assert answers == {
        "repository 'APP' not found or access denied: "
        "this is a deploy key of web, it reaches only that app"
    }
    assert await domain.access.reachable(ci) == []


async def test_an_unknown_key_is_nobody(domain: Domain) -> None:
    assert await domain.access.identify("SHA256:" + "A" * 43) is None


async def test_recheck_ends_a_removed_or_expired_key(domain: Domain, pubkeys) -> None:
    bob = await member(domain, pubkeys)
    assert (await domain.access.recheck(bob)).key_id == bob.key_id
    await domain.accounts.remove_key("bob", "laptop", actor="bob")
    with pytest.raises(KeyRevoked):
        await domain.access.recheck(bob)
    past = times.now() - timedelta(minutes=1)
    key = await domain.store.add_key("bob", "old", parse_public_key(pubkeys[1]), past)
    old = await domain.access.identify(key.fingerprint)
    assert old is not None and old.expired(times.now())
    with pytest.raises(KeyExpired):
        await domain.access.recheck(old)


async def test_recheck_ends_a_certificate_whose_account_went(domain: Domain, pubkeys) -> None:
    bob = await member(domain, pubkeys)
    cert = CertInfo("bob@laptop", 7, "SHA256:ca", bob.fingerprint, 2.0**64 - 1, "bob")
    identity = Identity(bob.user_id, "bob", 0, "bob@laptop", bob.fingerprint, certificate=cert)
    assert await domain.access.recheck(identity) is identity
    await domain.accounts.remove_user("bob", actor="op")
    with pytest.raises(KeyRevoked):
        await domain.access.recheck(identity)


async def test_logins_and_refusals_are_audited(domain: Domain, pubkeys) -> None:
    bob = await member(domain, pubkeys)
    await domain.access.logged_in(bob, "127.0.0.1:5000")
    [ok] = await events(domain, "auth_ok")
    assert (ok["actor"], ok["source"], ok["detail"]) == ("bob", "127.0.0.1:5000", {"key": "laptop"})
    await domain.access.login_refused(bob, "127.0.0.1:5001", "expired")
    [refused] = await events(domain, "auth_refused")
    assert refused["detail"] == {"key": "laptop", "reason": "key expired"}
    with pytest.raises(AccessDenied) as err:
        await domain.access.authorize(bob, "secret", Role.WRITE)
    await domain.access.denied(bob, "127.0.0.1:5002", err.value, "git-receive-pack 'secret'")
    await domain.access.denied(bob, "127.0.0.1:5003", KeyExpired(None), "whoami")
    expired, denied = await events(domain, "access_denied")
    assert denied["app"] == "secret" and denied["detail"] == {
        "command": "git-receive-pack 'secret'"
    }
    assert expired["app"] == "" and expired["detail"]["reason"] == "key expired"


async def test_a_certificate_login_is_audited_with_its_certificate(domain: Domain, pubkeys) -> None:
    bob = await member(domain, pubkeys)
    cert = CertInfo("bob@laptop", 7, "SHA256:ca", bob.fingerprint, 2.0**64 - 1, "bob")
    identity = Identity(bob.user_id, "bob", 0, "bob@laptop", bob.fingerprint, certificate=cert)
    await domain.access.logged_in(identity, "-")
    [ok] = await events(domain, "auth_ok")
    assert ok["detail"] == {
        "certificate": "bob@laptop",
        "serial": 7,
        "principal": "bob",
        "ca": "SHA256:ca",
    }


async def test_failed_logins_are_counted_then_written_once(domain: Domain) -> None:
    for _ in range(3):
        domain.access.login_failed("10.0.0.9", "unknown_key", "unknown key", "SHA256:x", 1)
    assert await events(domain, "auth_failed") == []
    assert await domain.access.flush_failures(everything=True) == 1
    [failed] = await events(domain, "auth_failed")
    assert failed["source"] == "10.0.0.9" and failed["detail"]["count"] == 3


async def test_key_use_is_recorded_at_most_once_a_minute(domain: Domain, pubkeys, monkeypatch):
    bob = await member(domain, pubkeys)
    writes = []
    real = domain.store.touch_key

    async def touch(key_id: int, when) -> None:  # type: ignore[no-untyped-def]
        writes.append(key_id)
        await real(key_id, when)

    monkeypatch.setattr(domain.store, "touch_key", touch)
    for _ in range(3):
        await domain.access.record_key_use(bob)
    assert writes == [bob.key_id]
    [key] = await domain.accounts.list_keys("bob")
    assert key.last_used_at is not None


# -- tokens and keys page sessions --


async def test_tokens_are_audited_and_found_by_secret_only(domain: Domain) -> None:
    await domain.accounts.create_user("alice", actor="op")
    token, secret = await domain.tokens.create_token("laptop", "alice", actor="op")
    assert (await domain.tokens.authenticate(secret)) == token
    for wrong in ("", secret + "x", "ggw_" + "A" * 43, "x" * 500):
        assert await domain.tokens.authenticate(wrong) is None
    [created] = await events(domain, "token_created")
    assert created["detail"] == {"token": "laptop", "user": "alice"}
    await domain.tokens.remove_token("laptop", actor="op")
    assert await domain.tokens.authenticate(secret) is None
    [removed] = await events(domain, "token_removed")
    assert removed["detail"] == {"token": "laptop", "user": "alice"}


async def test_an_expired_token_is_told_so(domain: Domain) -> None:
    past = times.now() - timedelta(seconds=1)
    await domain.store.create_token("old", None, hash_token("ggw_old-secret"), past)
    with pytest.raises(TokenExpired, match="expired on"):
        await domain.tokens.authenticate("ggw_old-secret")


async def test_a_session_acts_with_its_token_until_closed(domain: Domain) -> None:
    await domain.accounts.create_user("alice", actor="op")
    token, _ = await domain.tokens.create_token("web", "alice", actor="op")
    session_id = await domain.tokens.open_session(token)
    found = await domain.tokens.session_token(session_id)
    assert found is not None and found.id == token.id
    assert await domain.tokens.session_token(session_id + "x") is None
    assert await domain.tokens.session_token("x" * 101) is None
    await domain.tokens.close_session(session_id)
    assert await domain.tokens.session_token(session_id) is None


async def test_the_audit_trail_filters_by_app_and_actor(domain: Domain) -> None:
    await domain.accounts.create_user("alice", actor="op")
    await domain.apps.create_app("web", "alice", actor="alice")
    assert [e.event for e in await domain.audit_trail(app="web")] == ["app_created"]
    assert [e.event for e in await domain.audit_trail(actor="op")] == ["user_added"]
    assert len(await domain.audit_trail(limit=1)) == 1
