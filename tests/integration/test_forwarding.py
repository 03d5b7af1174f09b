"""Two in-process nodes on one registry and one repositories root, forwarding always: each
app's operations run on its home node, whichever node the client reached; the internal
listener lets in only the other nodes (their address, the shared host key)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import asyncssh
import pytest

from gateway.errors import AccessDenied
from gateway.models import Identity
from gateway.ssh.forward import PEER_USER, Request
from tests.integration.conftest import TIMEOUT, LiveGateway, StartGateway
from tests.integration.gitwire import (
    DELIM,
    FLUSH,
    commit_and_pack,
    pkt,
    push,
    read_pkts,
    session,
)


def cluster(name: str, **more: object) -> dict[str, object]:
    return {
        "node_name": name,
        "listen": "127.0.0.1:0",
        "peers": ["127.0.0.1/32"],
        "forward": "always",
        **more,
    }


async def two_nodes(
    start_gateway: StartGateway, **more: dict[str, object]
) -> tuple[LiveGateway, LiveGateway]:
    """Nodes A and B on one registry, repositories root and host keys; `more` for both."""
    a = await start_gateway(cluster=cluster("node-a"), **more)
    shared = a.gateway.config.storage
    b = await start_gateway(
        cluster=cluster("node-b"),
        storage={"database": str(shared.database), "repos": str(shared.repos)},
        ssh={"host_key_dir": str(a.home / "hostkeys")},
        **more,
    )
    return a, b


async def ls_refs(gw: LiveGateway, person, app: str) -> list[bytes]:
    conn, process = await session(
        gw, person, f"git-upload-pack '{app}.git'", GIT_PROTOCOL="version=2"
    )
    async with conn:
        await read_pkts(process.stdout)
        process.stdin.write(pkt("command=ls-refs\n") + DELIM + FLUSH)
        refs = await read_pkts(process.stdout)
        process.stdin.write_eof()
        await asyncio.wait_for(process.wait_closed(), TIMEOUT)
    assert process.exit_status == 0
    return refs


def to_peers(gw: LiveGateway, keys: list[asyncssh.SSHKey], **options: object) -> Any:
    """An SSH connection to the node's internal listener as a node would open it (user and
    address), logging in with `keys`."""
    host, port = gw.gateway.deploys.runner.lease.address.rsplit(":", 1)
    return asyncssh.connect(
        host,
        int(port),
        username=PEER_USER,
        client_keys=keys,
        known_hosts=None,
        agent_path=None,
        config=None,
        **options,
    )


async def test_operations_through_either_node_run_on_the_apps_home(
    start_gateway: StartGateway, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    a, b = await two_nodes(start_gateway)
    alice = await a.user("alice")
    app = await a.app(alice)  # created through node A's CLI: node A is its home
    home = await a.gateway.store.home_of((await a.gateway.store.get_app(app)).id)
    assert home is not None and home.name == "node-a" and home.address
    sha, pack = await asyncio.to_thread(commit_and_pack, tmp_path / "work", {"README": "hi\n"})
    caplog.set_level(logging.INFO)
    # A push through B runs on A (its hooks, its quarantine), its report comes back whole.
    pushed = await push(b, alice, app, sha, pack)
    assert pushed.report == [b"unpack ok\n", b"ok refs/heads/main\n"] and pushed.code == 0
    assert f"{sha} refs/heads/main\n".encode() in await ls_refs(b, alice, app)
    forwarded = [r.getMessage() for r in caplog.records if "event=git_forwarded" in r.getMessage()]
    assert len(forwarded) == 2 and all("home=node-a" in line for line in forwarded)
    served = [r.getMessage() for r in caplog.records if r.getMessage().startswith("event=git ")]
    assert len(served) == 2 and all("via=node-b" in line for line in served)
    # Through A itself: served there, nothing forwarded.
    caplog.clear()
    assert f"{sha} refs/heads/main\n".encode() in await ls_refs(a, alice, app)
    assert not [r for r in caplog.records if "git_forwarded" in r.getMessage()]


async def test_regression_forwarded_operations_are_authorized_again(
    start_gateway: StartGateway,
):
    """The home checks the user's rights itself: a user with no right on the app gets the
    same refusal through either node."""
    a, b = await two_nodes(start_gateway)
    alice, mallory = await a.user("alice"), await a.user("mallory")
    app = await a.app(alice)
    for node in (a, b):
        reply = await node.run(mallory, f"git-upload-pack '{app}.git'")
        assert reply.code != 0
        assert reply.stderr.splitlines() == [f"error: {AccessDenied(app)}"]


async def test_a_drained_home_moves_to_the_next_node_that_serves_the_app(
    start_gateway: StartGateway, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    a, b = await two_nodes(start_gateway)
    alice = await a.user("alice")
    app = await a.app(alice)
    app_id = (await a.gateway.store.get_app(app)).id
    sha, pack = await asyncio.to_thread(commit_and_pack, tmp_path / "work", {"README": "hi\n"})
    assert (await push(a, alice, app, sha, pack)).code == 0
    await a.gateway.close()
    assert await b.gateway.store.home_of(app_id) is None  # left with node A
    caplog.set_level(logging.INFO)
    assert f"{sha} refs/heads/main\n".encode() in await ls_refs(b, alice, app)
    home = await b.gateway.store.home_of(app_id)
    assert home is not None and home.name == "node-b"
    taken = [r.getMessage() for r in caplog.records if "event=home_taken" in r.getMessage()]
    assert taken == [f"event=home_taken app={app} node={b.gateway.deploys.node}"]


async def test_an_unreachable_home_is_one_line_and_changes_nothing(
    start_gateway: StartGateway, caplog: pytest.LogCaptureFixture
):
    a, b = await two_nodes(start_gateway)
    alice = await a.user("alice")
    app = await a.app(alice)
    store = a.gateway.store
    app_id = (await store.get_app(app)).id
    # A node that registered and went silent (killed): nothing listens where it said.
    await store.release_homes(a.gateway.deploys.node)
    await store.register_node("ghost-1", "ghost", 1, "127.0.0.1:9")
    assert (await store.claim_home(app_id, "ghost-1")).name == "ghost"
    reply = await b.run(alice, f"git-upload-pack '{app}.git'")
    assert reply.code != 0
    assert reply.stderr.splitlines() == [
        f"error: repository '{app}' is temporarily unavailable (its node is not answering): "
        "retry in a few seconds"
    ]
    assert "event=home_unreachable" in caplog.text and "home=ghost" in caplog.text


async def test_regression_the_internal_listener_refuses_a_tenants_key(
    start_gateway: StartGateway,
):
    a, _ = await two_nodes(start_gateway)
    alice = await a.user("alice")
    with pytest.raises(asyncssh.PermissionDenied):
        async with to_peers(a, [alice.key]):
            pass


async def test_regression_the_internal_listener_refuses_addresses_not_in_peers(
    start_gateway: StartGateway, prepared
):
    """Even with the nodes' own host key, a connection from outside [cluster] peers gets no
    login (it is cut before authentication)."""
    a = await start_gateway(cluster=cluster("node-a", peers=["192.0.2.0/24"]))
    with pytest.raises((asyncssh.Error, OSError)):
        async with to_peers(a, list(prepared.host_keys), login_timeout=TIMEOUT) as conn:
            await conn.run("x", check=False)


async def test_regression_a_peer_request_that_is_not_one_is_refused(
    start_gateway: StartGateway, prepared
):
    a, _ = await two_nodes(start_gateway)
    alice = await a.user("alice")
    app = await a.app(alice)
    async with to_peers(a, list(prepared.host_keys)) as conn:
        for command in ("git-upload-pack 'x.git'", "{}", '{"service": "rm -rf /"}'):
            result = await asyncio.wait_for(conn.run(command, check=False), TIMEOUT)
            assert result.exit_status == 1
            assert result.stderr == "error: not a forwarded operation\n"
        # Well-formed, but for a shell, or for a path outside the repositories.
        for service, name in (("sh", app), ("git-upload-pack", "../../etc")):
            text = forged(service, name)
            result = await asyncio.wait_for(conn.run(text, check=False), TIMEOUT)
            assert result.exit_status == 1
            assert result.stderr == "error: not a forwarded operation\n"


def forged(service: str, app: str) -> str:
    """A request as a node would send it, for any service and app name (unchecked here)."""
    identity = Identity(1, "alice", 1, "laptop", "SHA256:x")
    good = Request("git-upload-pack", "web", identity, None, "c", "p", "v").encode()
    return good.replace('"service":"git-upload-pack"', f'"service":"{service}"').replace(
        '"app":"web"', f'"app":"{app}"'
    )


async def test_a_network_filesystem_without_forwarding_is_logged_at_start(
    start_gateway: StartGateway,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
):
    """An operator who skips `check` still reads it in the log: every node would read its
    repositories through its own cache."""
    from gateway import fstype

    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(
        f"36 1 0:32 / {tmp_path} rw,relatime - fuse.sshfs gw@storage:/srv rw,user_id=0\n"
    )
    monkeypatch.setattr(fstype, "MOUNTINFO", mountinfo)
    caplog.set_level(logging.WARNING)
    await start_gateway()
    assert "event=network_filesystem_without_forwarding" in caplog.text
    assert "type=fuse.sshfs" in caplog.text


async def test_a_drain_keeps_serving_its_homes_for_cache_seconds_then_hands_them_over(
    start_gateway: StartGateway, caplog: pytest.LogCaptureFixture
):
    """Whatever node B's cache kept from before node A took the app has expired by the time
    B takes it: A serves B's forwarded operations until cache_seconds after its drain began."""
    a = await start_gateway(cluster=cluster("node-a", cache_seconds=1))
    shared = a.gateway.config.storage
    b = await start_gateway(
        cluster=cluster("node-b"),
        storage={"database": str(shared.database), "repos": str(shared.repos)},
        ssh={"host_key_dir": str(a.home / "hostkeys")},
    )
    alice = await a.user("alice")
    app = await a.app(alice)
    app_id = (await a.gateway.store.get_app(app)).id
    caplog.set_level(logging.INFO)
    a.gateway._begin_draining()
    closing = asyncio.ensure_future(a.gateway.close(drain=5))
    # Meanwhile B's operations still run on A, the home.
    assert await ls_refs(b, alice, app) == []
    home = await b.gateway.store.home_of(app_id)
    assert home is not None and home.name == "node-a"
    await asyncio.wait_for(closing, TIMEOUT)
    assert "event=homes_handover" in caplog.text
    assert await ls_refs(b, alice, app) == []
    home = await b.gateway.store.home_of(app_id)
    assert home is not None and home.name == "node-b"


async def test_regression_the_internal_listener_caps_logins_in_progress(
    start_gateway: StartGateway, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    """Anyone past the address filter (a deploy on a node reaches its address) holds a
    login slot for at most login_timeout: a few at once, never the node's descriptors."""
    from gateway.ssh import peers

    monkeypatch.setattr(peers, "MAX_LOGGING_IN", 2)
    a, _ = await two_nodes(start_gateway)
    host, port = a.gateway.deploys.runner.lease.address.rsplit(":", 1)
    silent = []
    try:
        for _ in range(2):
            reader, writer = await asyncio.open_connection(host, int(port))
            assert (await asyncio.wait_for(reader.readline(), TIMEOUT)).startswith(b"SSH-2.0-")
            silent.append(writer)
        reader, writer = await asyncio.open_connection(host, int(port))
        silent.append(writer)
        assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""  # cut at once
        assert "reason=too_many_connections" in caplog.text
    finally:
        for writer in silent:
            writer.close()


async def test_regression_a_forwarded_operation_the_home_refuses_is_audited_there(
    start_gateway: StartGateway, prepared
):
    """Rights removed between the entry node's check and the home's: the home refuses with
    the same line as any node and records the refusal."""
    a, _ = await two_nodes(start_gateway)
    alice, mallory = await a.user("alice"), await a.user("mallory")
    app = await a.app(alice)
    store = a.gateway.store
    user = await store.get_user(mallory.name)
    key = (await store.list_keys(mallory.name))[0]
    identity = Identity(user.id, mallory.name, key.id, key.name, mallory.fingerprint)
    text = Request("git-upload-pack", app, identity, None, "c1", "192.0.2.9:4000", "b").encode()
    async with to_peers(a, list(prepared.host_keys)) as conn:
        result = await asyncio.wait_for(conn.run(text, check=False), TIMEOUT)
    assert result.exit_status != 0
    assert result.stderr == f"error: {AccessDenied(app)}\n"
    events = await store.list_audit(actor=mallory.name)
    assert [e.event for e in events if e.event == "access_denied"] == ["access_denied"]
