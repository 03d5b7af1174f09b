"""The Store contract (gateway/store/__init__.py), held by every backend alike: results,
domain errors, ordering, limits, cascades, id monotonicity, state transitions, retention."""

from __future__ import annotations

import asyncio
import contextlib
import json
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from gateway.errors import Conflict, KeyInUse, NotFound
from gateway.keys import parse_public_key
from gateway.models import (
    ApiToken,
    AuditEvent,
    Deploy,
    DeployStatus,
    NewDeploy,
    Role,
    WebhookDelivery,
)
from gateway.store import Store, UserSummary, WebSession
from gateway.times import parse as at
from tests.helpers import keygen


def is_stamp(moment: object) -> bool:
    """An aware UTC time to the second, as the registry keeps them."""
    return (
        isinstance(moment, datetime)
        and moment.utcoffset() == timedelta(0)
        and not moment.microsecond
    )


SHA = "a" * 40
T = at("2026-01-01T00:00:00Z")


def new_deploy(app_id: int, sha: str = SHA, pusher: str = "alice") -> NewDeploy:
    return NewDeploy(app_id, "refs/heads/main", "0" * 40, sha, pusher, "SHA256:x",
                     "subject", "author", "attached", "command")  # fmt: skip


async def app_with_owner(store: Store, app: str = "web", owner: str = "alice") -> int:
    with contextlib.suppress(Conflict):
        await store.create_user(owner)
    return (await store.create_app(app, owner, "main")).id


# -- users --


async def test_users(store: Store) -> None:
    alice = await store.create_user("alice")
    assert alice.id > 0 and alice.name == "alice" and is_stamp(alice.created_at)
    assert await store.get_user("alice") == alice
    with pytest.raises(Conflict, match=r"^user 'alice' already exists$"):
        await store.create_user("alice")
    with pytest.raises(NotFound, match=r"^no such user 'bob'$"):
        await store.get_user("bob")
    with pytest.raises(NotFound):
        await store.remove_user("bob")
    assert await store.remove_user("alice") == alice
    with pytest.raises(NotFound):
        await store.get_user("alice")
    assert await store.list_users() == []


async def test_users_are_listed_in_byte_order_with_their_counts(store: Store, pubkeys) -> None:
    for name in ("b", "a.b", "a_b", "ab", "a-b", "0"):
        await store.create_user(name)
    await store.add_key("ab", "k1", parse_public_key(pubkeys[0]))
    await store.add_key("ab", "k2", parse_public_key(pubkeys[1]))
    await store.create_app("x", "ab", "main")
    await store.create_app("y", "ab", "main")
    await store.create_app("z", "b", "main")
    await store.grant("x", "b", Role.READ)  # a membership is no owned app
    summaries = await store.list_users()
    assert [s.user.name for s in summaries] == ["0", "a-b", "a.b", "a_b", "ab", "b"]
    counts = {s.user.name: (s.keys, s.apps) for s in summaries}
    assert counts["ab"] == (2, 2) and counts["b"] == (0, 1) and counts["0"] == (0, 0)
    assert isinstance(summaries[0], UserSummary)
    assert summaries[4].user == await store.get_user("ab")


async def test_removing_a_user_takes_keys_memberships_tokens_and_sessions(
    store: Store, pubkeys
) -> None:
    await app_with_owner(store, "web", "alice")
    await store.create_app("api", "alice", "main")
    await store.create_user("bob")
    key = await store.add_key("bob", "laptop", parse_public_key(pubkeys[0]))
    await store.grant("web", "bob", Role.WRITE)
    token = await store.create_token("bob-web", "bob", "hash-bob")
    await store.create_web_session("s1", token.id, T, at("2026-01-02T00:00:00Z"), 5)
    with pytest.raises(Conflict, match=r"^user 'alice' owns apps \(api, web\): remove them"):
        await store.remove_user("alice")
    removed = await store.remove_user("bob")
    assert removed.name == "bob"
    assert await store.find_key(key.fingerprint) is None
    assert [m.user_name for m in await store.list_members("web")] == ["alice"]
    assert await store.token_by_hash("hash-bob") is None
    assert await store.web_session("s1") is None
    # The key can be registered again, on any account.
    await store.add_key("alice", "laptop", parse_public_key(pubkeys[0]))


# -- keys --


async def test_one_key_one_account(store: Store, pubkeys) -> None:
    await store.create_user("alice")
    await store.create_user("bob")
    key = parse_public_key(pubkeys[0])
    record = await store.add_key("alice", "laptop", key)
    alice = await store.get_user("alice")
    assert (record.user_id, record.user_name, record.name) == (alice.id, "alice", "laptop")
    assert (record.algorithm, record.bits, record.public_key, record.comment) == (
        key.algorithm,
        key.bits,
        key.openssh,
        key.comment,
    )
    assert (record.fingerprint, record.fingerprint_md5) == (key.fingerprint, key.fingerprint_md5)
    assert is_stamp(record.created_at) and record.last_used_at is None
    with pytest.raises(KeyInUse) as err:
        await store.add_key("bob", "laptop", key)
    assert str(err.value) == "this SSH key is already used by another account"
    with pytest.raises(Conflict, match="under the name 'laptop'"):
        await store.add_key("alice", "desktop", key)
    with pytest.raises(Conflict, match=r"^user 'alice' already has a key named 'laptop'$"):
        await store.add_key("alice", "laptop", parse_public_key(pubkeys[1]))
    with pytest.raises(NotFound):
        await store.add_key("nobody", "laptop", parse_public_key(pubkeys[1]))
    await store.add_key("alice", "Desktop", parse_public_key(pubkeys[1]))
    await store.add_key("alice", "a.key", parse_public_key(pubkeys[2]))
    assert [k.name for k in await store.list_keys("alice")] == ["Desktop", "a.key", "laptop"]
    assert await store.list_keys("bob") == []
    with pytest.raises(NotFound):
        await store.list_keys("nobody")
    found = await store.find_key(key.fingerprint)
    assert found == record
    await store.touch_key(found.id, at("2026-01-01T00:00:07Z"))
    assert (await store.find_key(key.fingerprint)).last_used_at == at("2026-01-01T00:00:07Z")
    assert await store.find_key("SHA256:nothing") is None
    assert (await store.remove_key("alice", "laptop")).fingerprint == key.fingerprint
    assert await store.find_key(key.fingerprint) is None
    with pytest.raises(NotFound, match=r"^user 'alice' has no key named 'laptop'$"):
        await store.remove_key("alice", "laptop")
    with pytest.raises(NotFound):
        await store.remove_key("nobody", "laptop")
    # Removed from one account, the key may go to another.
    assert (await store.add_key("bob", "laptop", key)).user_name == "bob"


async def test_key_limit_holds_under_concurrent_adds(store: Store, tmp_path) -> None:
    """Counted under a lock on the owner: concurrent adds cannot pass the limit (PostgreSQL
    runs them on several connections at once)."""
    from gateway.errors import KeyLimitReached

    await store.create_user("carol")
    texts = [Path(f"{keygen(tmp_path / f'c{i}')}.pub").read_text() for i in range(6)]
    results = await asyncio.gather(
        *(
            store.add_key("carol", f"k{i}", parse_public_key(t), limit=3)
            for i, t in enumerate(texts)
        ),
        return_exceptions=True,
    )
    assert sum(not isinstance(r, BaseException) for r in results) == 3
    assert all(isinstance(r, KeyLimitReached) for r in results if isinstance(r, BaseException))
    assert len(await store.list_keys("carol")) == 3


async def test_deploy_keys_and_scoped_keys(store: Store, pubkeys, tmp_path) -> None:
    await store.create_user("dora")
    await store.create_app("web", "dora", "main")
    await store.create_app("api", "dora", "main")
    deploy = await store.add_deploy_key("web", "ci", parse_public_key(pubkeys[0]), "read")
    assert (deploy.user_id, deploy.app_name, deploy.access, deploy.scope) == (
        None,
        "web",
        "read",
        None,
    )
    assert (await store.find_key(deploy.fingerprint)).app_id == deploy.app_id
    with pytest.raises(KeyInUse):
        await store.add_key("dora", "laptop", parse_public_key(pubkeys[0]))
    with pytest.raises(KeyInUse):
        await store.add_deploy_key("api", "ci", parse_public_key(pubkeys[0]), "write")
    scoped = await store.add_key(
        "dora", "ro", parse_public_key(pubkeys[1]), access="read", scope=["web", "api"]
    )
    assert (scoped.access, scoped.scope) == ("read", ("api", "web"))
    await store.remove_app("web")
    assert await store.find_key(deploy.fingerprint) is None  # gone with its app
    assert (await store.find_key(scoped.fingerprint)).scope == ("api",)
    await store.remove_app("api")
    assert (await store.find_key(scoped.fingerprint)).scope == ()  # reaches nothing, not all
    assert [k.name for k in await store.list_keys("dora")] == ["ro"]


# -- apps and members --


async def test_apps(store: Store) -> None:
    await store.create_user("alice")
    app = await store.create_app("web", "alice", "prod")
    alice = await store.get_user("alice")
    assert (app.name, app.owner_id, app.owner_name, app.deploy_branch) == (
        "web",
        alice.id,
        "alice",
        "prod",
    )
    assert is_stamp(app.created_at)
    assert await store.get_app("web") == app
    assert await store.get_app("nope") is None
    with pytest.raises(Conflict, match=r"^app 'web' already exists$"):
        await store.create_app("web", "alice", "main")
    with pytest.raises(NotFound):
        await store.create_app("api", "nobody", "main")
    for name in ("b-x", "a", "b_x", "b0"):
        await store.create_app(name, "alice", "main")
    assert [a.name for a in await store.list_apps()] == ["a", "b-x", "b0", "b_x", "web"]
    assert await store.remove_app("web") == app
    assert await store.get_app("web") is None
    with pytest.raises(NotFound, match=r"^no such app 'web'$"):
        await store.remove_app("web")


async def test_roles_and_owner_rules(store: Store) -> None:
    for name in ("alice", "bob", "carol"):
        await store.create_user(name)
    app = await store.create_app("web", "alice", "main")
    alice, bob = [await store.get_user(n) for n in ("alice", "bob")]
    assert await store.role_on(app.id, alice.id) is Role.OWNER
    assert await store.role_on(app.id, bob.id) is None
    assert await store.role_on(app.id + 1000, alice.id) is None
    assert await store.grant("web", "bob", Role.READ) is None
    assert await store.grant("web", "bob", Role.WRITE) is Role.READ
    assert await store.grant("web", "bob", Role.WRITE) is Role.WRITE
    assert await store.role_on(app.id, bob.id) is Role.WRITE
    with pytest.raises(ValueError, match="not a grantable role"):
        await store.grant("web", "bob", Role.OWNER)
    with pytest.raises(Conflict, match="already has every right"):
        await store.grant("web", "alice", Role.READ)
    with pytest.raises(NotFound):
        await store.grant("nope", "bob", Role.READ)
    with pytest.raises(NotFound):
        await store.grant("web", "nobody", Role.READ)
    await store.grant("web", "carol", Role.ADMIN)
    members = await store.list_members("web")
    assert [(m.user_name, m.role) for m in members] == [
        ("alice", Role.OWNER),
        ("bob", Role.WRITE),
        ("carol", Role.ADMIN),
    ]
    assert members[0].created_at == app.created_at and is_stamp(members[1].created_at)
    with pytest.raises(NotFound):
        await store.list_members("nope")
    await store.create_app("api", "bob", "main")
    await store.create_app("zed", "carol", "main")
    await store.grant("zed", "bob", Role.READ)
    assert [(a.name, r) for a, r in await store.apps_for(bob.id)] == [
        ("api", Role.OWNER),
        ("web", Role.WRITE),
        ("zed", Role.READ),
    ]
    assert [a.name for a, _ in await store.apps_for(alice.id)] == ["web"]
    assert (await store.apps_for(alice.id))[0][0] == app
    with pytest.raises(Conflict, match="ownership is not revocable"):
        await store.revoke("web", "alice")
    assert await store.revoke("web", "bob") is Role.WRITE
    with pytest.raises(NotFound, match=r"^'bob' is not a member of app 'web'$"):
        await store.revoke("web", "bob")
    with pytest.raises(NotFound):
        await store.revoke("nope", "bob")
    with pytest.raises(Conflict):  # carol owns zed
        await store.remove_user("carol")
    await store.remove_app("zed")
    await store.remove_user("carol")  # memberships go with the user
    assert [m.user_name for m in await store.list_members("web")] == ["alice"]
    await store.grant("web", "bob", Role.READ)
    await store.remove_app("web")  # and with the app
    assert [a.name for a, _ in await store.apps_for(bob.id)] == ["api"]


async def test_concurrent_writers(store: Store) -> None:
    await asyncio.gather(*(store.create_user(f"user{i}") for i in range(30)))
    users = await store.list_users()
    assert len(users) == 30 and len({u.user.id for u in users}) == 30


async def test_a_failed_change_changes_nothing(store: Store, pubkeys) -> None:
    await store.create_user("alice")
    await store.create_user("bob")
    await store.add_key("alice", "k", parse_public_key(pubkeys[0]))
    before = await store.list_users()
    with pytest.raises(KeyInUse):
        await store.add_key("bob", "k", parse_public_key(pubkeys[0]))
    await store.create_app("web", "alice", "main")
    with pytest.raises(Conflict):
        await store.grant("web", "alice", Role.READ)
    assert await store.list_members("web") == (await store.list_members("web"))[:1]
    after = await store.list_users()
    assert [(s.user, s.keys) for s in after] == [(s.user, s.keys) for s in before]


# -- deploys --


async def test_deploy_records(store: Store) -> None:
    app_id = await app_with_owner(store)
    first = await store.create_deploy(new_deploy(app_id, "1" * 40))
    assert isinstance(first, Deploy)
    assert (first.app_id, first.app_name, first.new_sha, first.status) == (
        app_id,
        "web",
        "1" * 40,
        DeployStatus.QUEUED,
    )
    assert (first.ref, first.old_sha, first.pusher, first.key_fingerprint) == (
        "refs/heads/main",
        "0" * 40,
        "alice",
        "SHA256:x",
    )
    assert (first.subject, first.author, first.mode, first.pipeline) == (
        "subject",
        "author",
        "attached",
        "command",
    )
    assert (first.superseded_by, first.exit_code, first.reason) == (None, None, "")
    assert is_stamp(first.created_at) and first.started_at is first.finished_at is None
    assert await store.get_deploy(first.id) == first
    assert await store.get_deploy(first.id + 1000) is None
    others = [await store.create_deploy(new_deploy(app_id, str(i) * 40)) for i in range(2, 6)]
    ids = [first.id, *(d.id for d in others)]
    assert ids == sorted(ids) and len(set(ids)) == 5
    assert [d.id for d in await store.list_deploys("web")] == ids[::-1]
    assert [d.id for d in await store.list_deploys("web", limit=2)] == ids[:-3:-1]
    assert await store.app_deploy_ids("web") == ids
    with pytest.raises(NotFound):
        await store.list_deploys("nope")
    with pytest.raises(NotFound):
        await store.app_deploy_ids("nope")
    other = await app_with_owner(store, "api")
    assert await store.list_deploys("api") == [] and await store.app_deploy_ids("api") == []
    elsewhere = await store.create_deploy(new_deploy(other))
    assert await store.app_deploy_ids("web") == ids
    assert await store.existing_deploy_ids([*ids, elsewhere.id, 999_999]) == {*ids, elsewhere.id}
    assert await store.existing_deploy_ids([]) == set()
    many = list(range(1, 1300))  # more than one chunk of ids
    assert await store.existing_deploy_ids(many) == {*ids, elsewhere.id}


async def test_deploy_state_transitions(store: Store) -> None:
    app_id = await app_with_owner(store)
    a, b, c = [await store.create_deploy(new_deploy(app_id)) for _ in range(3)]
    assert [d.id for d in await store.deploys_in((DeployStatus.QUEUED,))] == [a.id, b.id, c.id]
    assert await store.start_deploy(a.id, at("2026-01-01T00:00:01Z")) is True
    assert await store.start_deploy(a.id, at("2026-01-01T00:00:02Z")) is False  # only from queued
    running = await store.get_deploy(a.id)
    assert running.status is DeployStatus.RUNNING and running.started_at == at(
        "2026-01-01T00:00:01Z"
    )
    assert await store.start_deploy(999_999, T) is False
    with pytest.raises(ValueError, match="not a final status"):
        await store.finish_deploy(a.id, DeployStatus.RUNNING, T)
    assert await store.finish_deploy(
        a.id, DeployStatus.FAILED, at("2026-01-01T00:00:09Z"), exit_code=3, reason="boom"
    )
    done = await store.get_deploy(a.id)
    assert (done.status, done.exit_code, done.reason, done.finished_at) == (
        DeployStatus.FAILED,
        3,
        "boom",
        at("2026-01-01T00:00:09Z"),
    )
    assert done.started_at == at("2026-01-01T00:00:01Z")
    # Final is final: neither a second finish nor a start changes it.
    assert not await store.finish_deploy(a.id, DeployStatus.SUCCEEDED, T)
    assert not await store.start_deploy(a.id, T)
    assert (await store.get_deploy(a.id)).status is DeployStatus.FAILED
    # A queued deploy may end without running (superseded, cancelled).
    assert await store.finish_deploy(
        b.id, DeployStatus.CANCELLED, T, reason=f"superseded by #{c.id}", superseded_by=c.id
    )
    cancelled = await store.get_deploy(b.id)
    assert cancelled.superseded_by == c.id and cancelled.started_at is None
    assert not await store.finish_deploy(999_999, DeployStatus.FAILED, T)
    assert [d.id for d in await store.deploys_in((DeployStatus.QUEUED,))] == [c.id]
    await store.start_deploy(c.id, T)
    both = (DeployStatus.RUNNING, DeployStatus.FAILED, DeployStatus.CANCELLED)
    assert [d.id for d in await store.deploys_in(both)] == [a.id, b.id, c.id]
    assert await store.deploys_in((DeployStatus.SUCCEEDED,)) == []
    for status in DeployStatus:
        if status.finished:
            fresh = await store.create_deploy(new_deploy(app_id))
            assert await store.finish_deploy(fresh.id, status, T)
            assert (await store.get_deploy(fresh.id)).status is status


async def test_status_tokens_and_webhook_deliveries(store: Store) -> None:
    app_id = await app_with_owner(store)
    deploy = await store.create_deploy(new_deploy(app_id))
    assert await store.status_token_hash(deploy.id) is None
    assert await store.status_token_hash(999_999) is None
    await store.set_status_token(deploy.id, "h" * 64)
    assert await store.status_token_hash(deploy.id) == "h" * 64
    deliveries = [
        WebhookDelivery(deploy.id, 2, "http://x/", 202, "", 8, at("2026-01-01T00:00:02Z")),
        WebhookDelivery(deploy.id, 1, "http://x/", None, "refused", 12, T),
    ]
    for delivery in deliveries:
        await store.add_webhook_delivery(delivery)
    assert await store.webhook_deliveries(deploy.id) == deliveries[::-1]
    assert await store.webhook_deliveries(999_999) == []
    await store.remove_app("web")  # deploys and their deliveries go with the app
    assert await store.get_deploy(deploy.id) is None
    assert await store.webhook_deliveries(deploy.id) == []


async def test_prune_deploys(store: Store) -> None:
    web = await app_with_owner(store, "web")
    api = await app_with_owner(store, "api")
    old, new = at("2026-01-01T00:00:00Z"), at("2026-03-01T00:00:00Z")
    made = {}
    for app_id, name in ((web, "w"), (api, "a")):
        for i in range(4):
            deploy = await store.create_deploy(new_deploy(app_id))
            await store.finish_deploy(deploy.id, DeployStatus.SUCCEEDED, old)
            made[f"{name}{i}"] = deploy.id
    recent = await store.create_deploy(new_deploy(web))
    await store.finish_deploy(recent.id, DeployStatus.FAILED, new)
    queued = await store.create_deploy(new_deploy(web))  # never pruned while open
    running = await store.create_deploy(new_deploy(api))
    await store.start_deploy(running.id, old)
    # w1 was superseded by w2, which is pruned: the link goes, the reason text stays.
    kept = await store.create_deploy(new_deploy(web))
    await store.finish_deploy(kept.id, DeployStatus.CANCELLED, new, superseded_by=made["w2"],
                              reason="superseded")  # fmt: skip
    await store.add_webhook_delivery(WebhookDelivery(made["w0"], 1, "http://x/", 200, "", 1, old))
    cutoff = at("2026-02-01T00:00:00Z")
    # keep_last 2 per app: web keeps kept and recent (newest finished), api keeps a3, a2.
    first = await store.prune_deploys(cutoff, 2, limit=3)
    assert first == [made["w0"], made["w1"], made["w2"]]
    second = await store.prune_deploys(cutoff, 2, limit=100)
    assert second == [made["w3"], made["a0"], made["a1"]]
    assert await store.prune_deploys(cutoff, 2) == []
    left = await store.existing_deploy_ids(list(range(1, 100)))
    assert left == {made["a2"], made["a3"], recent.id, queued.id, running.id, kept.id}
    survivor = await store.get_deploy(kept.id)
    assert survivor.superseded_by is None and survivor.reason == "superseded"
    assert await store.webhook_deliveries(made["w0"]) == []
    # keep_last 0 and a later cutoff: every finished deploy before it goes, open ones stay.
    gone = await store.prune_deploys("2026-12-01T00:00:00Z", 0)
    assert sorted(gone) == gone and set(gone) == {made["a2"], made["a3"], recent.id, kept.id}
    assert await store.existing_deploy_ids(list(range(1, 100))) == {queued.id, running.id}


async def test_reserve_deploy_ids(store: Store) -> None:
    app_id = await app_with_owner(store)
    await store.reserve_deploy_ids(41)  # before any deploy
    assert (await store.create_deploy(new_deploy(app_id))).id == 42
    await store.reserve_deploy_ids(10)  # never lowers it
    await store.reserve_deploy_ids(42)
    assert (await store.create_deploy(new_deploy(app_id))).id == 43
    await store.reserve_deploy_ids(99)
    assert (await store.create_deploy(new_deploy(app_id))).id == 100


# -- audit trail --


async def test_audit_trail(store: Store) -> None:
    events = [
        AuditEvent(
            "login",
            actor="alice",
            fingerprint="SHA256:a",
            source="10.0.0.1",
            at=at("2026-01-01T00:00:01Z"),
        ),
        AuditEvent("push", actor="alice", app="web", detail='{"updates": 1}', at=T),
        AuditEvent("key_added", actor="operator", detail=json.dumps({"user": "alice"})),
        AuditEvent(
            "member_granted",
            actor="operator",
            app="web",
            detail=json.dumps({"role": "read", "user": "bob"}),
        ),
        AuditEvent("push", actor="bob", app="api"),
    ]
    for event in events:
        await store.add_audit(event)
    listed = await store.list_audit()
    # Newest first by recording order, whatever their times say.
    assert [e.event for e in listed] == [e.event for e in events[::-1]]
    ids = [e.id for e in listed]
    assert ids == sorted(ids, reverse=True) and len(set(ids)) == 5
    login = listed[-1]
    assert (login.actor, login.fingerprint, login.source, login.app, login.detail, login.at) == (
        "alice",
        "SHA256:a",
        "10.0.0.1",
        "",
        "{}",
        at("2026-01-01T00:00:01Z"),
    )
    assert is_stamp(listed[0].at)  # no time given: now
    assert listed[3].detail == '{"updates": 1}'
    assert [e.event for e in await store.list_audit(app="web")] == ["member_granted", "push"]
    # A user's events: theirs, and those about their account.
    assert [e.event for e in await store.list_audit(actor="alice")] == [
        "key_added",
        "push",
        "login",
    ]
    assert [e.event for e in await store.list_audit(actor="bob")] == ["push", "member_granted"]
    assert [e.event for e in await store.list_audit(app="web", actor="bob")] == ["member_granted"]
    assert [e.event for e in await store.list_audit(limit=2)] == ["push", "member_granted"]
    assert await store.list_audit(actor="nobody") == []


async def test_prune_audit(store: Store) -> None:
    for day in (5, 1, 3, 2, 4):
        await store.add_audit(AuditEvent(f"day{day}", at=f"2026-01-0{day}T00:00:00Z"))
    # Oldest first, up to the limit, strictly before the cutoff.
    assert await store.prune_audit("2026-01-04T00:00:00Z", limit=2) == 2
    assert {e.event for e in await store.list_audit()} == {"day3", "day4", "day5"}
    assert await store.prune_audit("2026-01-04T00:00:00Z") == 1
    assert await store.prune_audit("2026-01-04T00:00:00Z") == 0
    assert [e.event for e in await store.list_audit()] == ["day4", "day5"]


# -- API tokens and keys page sessions --


async def test_tokens(store: Store) -> None:
    await store.create_user("alice")
    operator = await store.create_token("ops", None, "hash-ops")
    assert isinstance(operator, ApiToken) and operator.id > 0
    assert (operator.name, operator.user_id, operator.user_name, operator.last_used_at) == (
        "ops",
        None,
        None,
        None,
    )
    assert not operator.personal and is_stamp(operator.created_at)
    personal = await store.create_token("alice-web", "alice", "hash-alice")
    assert personal.personal and personal.user_name == "alice"
    assert personal.user_id == (await store.get_user("alice")).id
    with pytest.raises(Conflict, match=r"^a token named 'ops' already exists$"):
        await store.create_token("ops", None, "hash-other")
    with pytest.raises(NotFound):
        await store.create_token("x", "nobody", "hash-x")
    assert [t.name for t in await store.list_tokens()] == ["alice-web", "ops"]
    assert await store.token_by_hash("hash-alice") == personal
    assert await store.token_by_hash("hash-none") is None
    await store.touch_token(operator.id, at("2026-01-01T00:00:05Z"))
    assert (await store.token_by_hash("hash-ops")).last_used_at == at("2026-01-01T00:00:05Z")
    assert (await store.remove_token("ops")).name == "ops"
    with pytest.raises(NotFound, match=r"^no token named 'ops'$"):
        await store.remove_token("ops")
    assert await store.token_by_hash("hash-ops") is None


async def test_web_sessions(store: Store) -> None:
    await store.create_user("alice")
    token = await store.create_token("alice-web", "alice", "hash-alice")
    other = await store.create_token("ops", None, "hash-ops")
    end = at("2026-01-02T00:00:00Z")
    for i in range(4):
        await store.create_web_session(f"s{i}", token.id, at(f"2026-01-01T00:00:0{i}Z"), end, 3)
    await store.create_web_session("o", other.id, T, end, 3)
    # The token's oldest session beyond the newest three ended; another token's stayed.
    assert await store.web_session("s0") is None
    session = await store.web_session("s1")
    assert isinstance(session, WebSession) and session.token == token
    assert (session.created_at, session.expires_at, session.last_seen_at) == (
        at("2026-01-01T00:00:01Z"),
        end,
        at("2026-01-01T00:00:01Z"),
    )
    assert (await store.web_session("o")).token == other
    await store.touch_web_session("s1", at("2026-01-01T06:00:00Z"))
    assert (await store.web_session("s1")).last_seen_at == at("2026-01-01T06:00:00Z")
    assert await store.remove_web_session("s2") is True
    assert await store.remove_web_session("s2") is False
    # Pruned: past their end (<= now) or idle since (<= idle_since).
    assert await store.prune_web_sessions("2026-01-01T12:00:00Z", at("2026-01-01T00:00:03Z")) == 2
    assert await store.web_session("s3") is None and await store.web_session("o") is None
    assert await store.web_session("s1") is not None
    assert await store.prune_web_sessions(end, at("2000-01-01T00:00:00Z")) == 1
    await store.create_web_session("s5", token.id, T, end, 3)
    await store.remove_token("alice-web")  # a revoked token ends its sessions
    assert await store.web_session("s5") is None


# -- ids --


async def test_regression_ids_are_never_reused_after_deleting_the_newest(backend, pubkeys) -> None:
    store = backend.store
    await store.create_user("alice")
    bob = await store.create_user("bob")
    await store.remove_user("bob")
    assert (await store.create_user("bob")).id > bob.id
    key = await store.add_key("alice", "k", parse_public_key(pubkeys[0]))
    await store.remove_key("alice", "k")
    assert (await store.add_key("alice", "k", parse_public_key(pubkeys[0]))).id > key.id
    web = await store.create_app("web", "alice", "main")
    deploy = await store.create_deploy(new_deploy(web.id))
    await store.remove_app("web")
    again = await store.create_app("web", "alice", "main")
    assert again.id > web.id
    assert (await store.create_deploy(new_deploy(again.id))).id > deploy.id
    token = await store.create_token("t", None, "hash1")
    await store.remove_token("t")
    assert (await store.create_token("t", None, "hash2")).id > token.id
    # Audit events are never deleted by the gateway; an operator pruning the newest by hand
    # does not bring its id back either.
    await store.add_audit(AuditEvent("one"))
    newest = (await store.list_audit(limit=1))[0]
    if backend.kind == "memory":  # its tables are its database
        del store._db.audit[newest.id]
    else:
        await backend.execute(f"DELETE FROM audit_events WHERE id = {newest.id}")  # noqa: S608
    await store.add_audit(AuditEvent("two"))
    assert (await store.list_audit(limit=1))[0].id > newest.id
    # ...and neither are the ids of pruned ones.
    await store.prune_audit("2100-01-01T00:00:00Z")
    await store.add_audit(AuditEvent("three"))
    assert (await store.list_audit(limit=1))[0].id > newest.id + 1


async def test_regression_values_are_never_statement_text(store: Store) -> None:
    """SQL backends spell each statement for their engine by formatting its text ({token},
    $n): values go as parameters, so names full of braces, dollars and quotes are stored
    and found as given, and nothing else happens."""
    name = "{bytes}$1'; DROP TABLE users; --{lock:k}"
    user = await store.create_user(name)
    assert await store.get_user(name) == user
    await store.create_app("{ids:$1}", name, "$2")
    app = await store.get_app("{ids:$1}")
    assert (app.owner_name, app.deploy_branch) == (name, "$2")
    about = json.dumps({"user": "{json:e.detail.user}"})
    await store.add_audit(AuditEvent("x", actor=name, app="{ids:$1}", detail=about))
    assert [e.detail for e in await store.list_audit(actor=name)] == [about]
    assert [e.actor for e in await store.list_audit(actor="{json:e.detail.user}")] == [name]
    assert [s.user.name for s in await store.list_users()] == [name]


# -- lifecycle --


async def test_ping_and_schema_version(store: Store) -> None:
    await store.ping()
    assert await store.schema_version() >= 1


# -- transactions --


async def test_a_transaction_commits_all_of_its_changes(store: Store, pubkeys) -> None:
    async with store.transaction():
        await store.create_user("alice")
        await store.add_key("alice", "k", parse_public_key(pubkeys[0]))
        app = await store.create_app("web", "alice", "main")
        # Inside, the task reads its own changes.
        assert (await store.get_app("web")) == app
        assert [s.keys for s in await store.list_users()] == [1]
    assert (await store.get_user("alice")).name == "alice"
    assert [a.name for a in await store.list_apps()] == ["web"]


async def test_a_transaction_that_raises_changes_nothing(store: Store, pubkeys) -> None:
    await store.create_user("bob")
    with pytest.raises(RuntimeError, match="repository creation failed"):
        async with store.transaction():
            await store.create_user("alice")
            await store.create_app("web", "alice", "main")
            await store.add_key("bob", "k", parse_public_key(pubkeys[0]))
            await store.add_audit(AuditEvent("app_created", app="web"))
            raise RuntimeError("repository creation failed")
    with pytest.raises(NotFound):
        await store.get_user("alice")
    assert await store.get_app("web") is None
    assert await store.list_keys("bob") == [] and await store.list_audit() == []
    assert (await store.create_user("carol")).id > (await store.get_user("bob")).id


async def test_a_caught_error_inside_a_transaction_undoes_only_its_step(store: Store) -> None:
    async with store.transaction():
        await store.create_user("alice")
        with pytest.raises(Conflict):
            await store.create_user("alice")  # one failed step, caught
        await store.create_app("web", "alice", "main")  # the transaction goes on
        with pytest.raises(ValueError, match="inner"):
            async with store.transaction():
                await store.create_user("bob")
                raise ValueError("inner")
        await store.create_user("carol")
    assert [s.user.name for s in await store.list_users()] == ["alice", "carol"]
    assert (await store.get_app("web")).owner_name == "alice"


async def test_transactions_of_concurrent_tasks_do_not_mix(store: Store) -> None:
    async def one(index: int, fail: bool) -> None:
        async with store.transaction():
            await store.create_user(f"user{index}")
            await store.create_app(f"app{index}", f"user{index}", "main")
            if fail:
                raise RuntimeError("no")

    results = await asyncio.gather(*(one(i, i % 3 == 0) for i in range(12)), return_exceptions=True)
    assert sum(isinstance(r, RuntimeError) for r in results) == 4
    users = {s.user.name for s in await store.list_users()}
    assert users == {f"user{i}" for i in range(12) if i % 3}
    assert {a.name for a in await store.list_apps()} == {f"app{i}" for i in range(12) if i % 3}


async def test_creating_an_app_with_its_repository_is_one_transaction(
    store: Store, tmp_path: Path
) -> None:
    from gateway import config
    from gateway.domain.registry import Registry

    cfg = config.from_mapping({"storage": {"repos": str(tmp_path / "repos")}})
    registry = Registry(cfg, store)
    await store.create_user("alice")

    def broken(app: str, branch: str) -> Path:
        raise OSError("disk full")

    real = registry.repos.create
    registry.repos.create = broken  # type: ignore[method-assign]
    with pytest.raises(OSError, match="disk full"):
        await registry.create_app("web", "alice", actor="operator")
    assert await store.get_app("web") is None and await store.list_audit() == []
    assert not registry.repos.path_for("web").exists()
    registry.repos.create = real  # type: ignore[method-assign]
    app = await registry.create_app("web", "alice", actor="operator")
    assert app.owner_name == "alice" and registry.repos.exists("web")
    assert [e.event for e in await store.list_audit()] == ["app_created"]
