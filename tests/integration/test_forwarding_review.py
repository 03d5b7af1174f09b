"""Review of issue 22's forwarding: what a tenant or a failing node could do through the
internal listener and the entry node's forwarder (each failed before its fix; the
docstrings say what they found)."""

from __future__ import annotations

import asyncio
import logging
import socket
from pathlib import Path

import pytest

from gateway.models import Identity
from gateway.ssh import forward
from gateway.ssh.forward import Request
from tests.integration.conftest import TIMEOUT, StartGateway
from tests.integration.gitwire import FLUSH, commit_and_pack, pkt, push, read_pkts, session
from tests.integration.test_forwarding import to_peers, two_nodes


async def test_regression_the_per_user_fetch_cap_holds_on_the_home_whatever_the_entry(
    start_gateway: StartGateway,
):
    """max_fetches_per_user=1: one clone through A (the home) and one through B both run
    git on A. The cap is held on each entry node only, so a user with K entry nodes runs
    K x max_fetches_per_user pack-objects on the one home (gateway/ssh/commands/git.py run:
    admission on the entry; serve_forwarded: none)."""
    a, b = await two_nodes(start_gateway, limits={"max_fetches_per_user": 1})
    alice = await a.user("alice")
    app = await a.app(alice)
    first, held = await session(a, alice, f"git-upload-pack '{app}.git'", GIT_PROTOCOL="version=2")
    second, other = await session(
        b, alice, f"git-upload-pack '{app}.git'", GIT_PROTOCOL="version=2"
    )
    async with first, second:
        assert await read_pkts(held.stdout)  # git upload-pack runs on A for this user
        head = await asyncio.wait_for(other.stdout.read(4), TIMEOUT)
        stderr = await asyncio.wait_for(other.stderr.read(), 2) if not head else b""
        # The second is refused: A already runs one of alice's fetches.
        assert head == b"", "a second upload-pack of alice runs on the home (cap 1)"
        assert b"too many fetches" in stderr


async def test_regression_a_hung_home_does_not_queue_operations_behind_each_other(
    start_gateway: StartGateway, monkeypatch: pytest.MonkeyPatch
):
    """A home that accepts TCP but never speaks SSH (stopped process, full accept queue):
    Forwarder._connection holds the address's lock through each connect attempt, so the
    n-th waiting operation fails only after n x CONNECT_TIMEOUT (100 users: 500 s each
    holding a session and a per-user slot)."""
    monkeypatch.setattr(forward, "CONNECT_TIMEOUT", 1.0)
    a, b = await two_nodes(start_gateway)
    alice = await a.user("alice")
    app = await a.app(alice)
    store = a.gateway.store
    app_id = (await store.get_app(app)).id
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(64)  # never accepted: the kernel completes the handshake, nobody answers
    try:
        await store.release_homes(a.gateway.deploys.node)
        await store.register_node("hung-1", "hung", 1, f"127.0.0.1:{hung.getsockname()[1]}")
        assert (await store.claim_home(app_id, "hung-1")).name == "hung"
        loop = asyncio.get_running_loop()
        started = loop.time()

        async def one() -> float:
            reply = await b.run(alice, f"git-upload-pack '{app}.git'")
            assert "temporarily unavailable" in reply.stderr
            return loop.time() - started

        took = await asyncio.wait_for(asyncio.gather(*(one() for _ in range(4))), 30)
    finally:
        hung.close()
    # Each should fail after about one CONNECT_TIMEOUT, not after four in a row.
    assert max(took) < 2.5, f"failures after {sorted(round(t, 1) for t in took)} s"


async def test_regression_a_closed_home_leaves_no_forwarded_operation_running(
    start_gateway: StartGateway,
):
    """A push through B held open on A, then A closes with a short drain: A leaves (its
    homes with it, B may now claim the app) but PeerListener.close only stops accepting
    (asyncssh: "existing connections will remain open"), so the forwarded receive-pack keeps
    running on A, and B's cached connection to A stays open for new channels."""
    a, b = await two_nodes(start_gateway)
    alice = await a.user("alice")
    app = await a.app(alice)
    app_id = (await a.gateway.store.get_app(app)).id
    conn, process = await session(b, alice, f"git-receive-pack '{app}.git'")
    try:
        async with conn:
            await read_pkts(process.stdout)  # receive-pack runs on A
            assert a.gateway.peers is not None and a.gateway.peers.running
            await asyncio.wait_for(a.gateway.close(drain=0.5), TIMEOUT)
            assert await b.gateway.store.home_of(app_id) is None  # A left
            address = a.gateway.deploys.runner.lease.address
            cached = b.gateway.forwarder._connections.get(address)
            assert not a.gateway.peers.running, "a forwarded push still runs on a node that left"
            assert cached is None or cached.is_closed()
    finally:
        process.close()


async def test_regression_a_home_that_says_not_home_keeps_the_clients_input(
    start_gateway: StartGateway, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """upload-archive's client speaks first. When the home answers NOT_HOME (its home moved
    between the entry's lookup and its own check), _pump has already sent the client's
    arguments to it; _dispatch retries (bytes_out == 0) with the input gone, and the archive
    hangs until the idle timeout."""
    a, b = await two_nodes(start_gateway)
    alice = await a.user("alice")
    app = await a.app(alice)
    sha, pack = await asyncio.to_thread(commit_and_pack, tmp_path / "work", {"README": "hi\n"})
    assert (await push(a, alice, app, sha, pack)).code == 0
    homes = a.gateway.domain.homes
    real = homes.serves_here
    calls = []

    async def moved_once(app_):  # the race, made to happen: the first check says "not here"
        calls.append(app_.name)
        if len(calls) == 1:
            return False
        return await real(app_)

    monkeypatch.setattr(homes, "serves_here", moved_once)
    conn, process = await session(b, alice, f"git-upload-archive '{app}.git'")
    async with conn:
        process.stdin.write(pkt("argument main\n") + FLUSH)
        # ACK comes as soon as upload-archive has spawned its writer; the archive (side-band
        # 1) only once the writer has read the arguments.
        assert await asyncio.wait_for(read_pkts(process.stdout), TIMEOUT) == [b"ACK\n"]
        try:
            size = int(await asyncio.wait_for(process.stdout.readexactly(4), 5), 16)
            band = (await process.stdout.readexactly(size - 4))[:1]
        except TimeoutError:
            band = None
        process.close()
    assert len(calls) == 2
    assert band == b"\x01", "the retried archive lost the client's arguments: no archive"


async def test_regression_forwarded_request_fields_reach_no_log_line_unquoted(
    start_gateway: StartGateway, prepared, caplog: pytest.LogCaptureFixture
):
    """Request.decode checks conn, peer and via only for being strings; the home logs conn
    unquoted (event=git ... conn=%s, the bridge's label) and hands peer to the deploy
    session: a newline in either forges log lines (defence in depth: a peer holds the key)."""
    a, _ = await two_nodes(start_gateway)
    alice = await a.user("alice")
    app = await a.app(alice)
    user = await a.gateway.store.get_user(alice.name)
    keys = await a.gateway.store.list_keys(alice.name)
    identity = Identity(user.id, alice.name, keys[0].id, keys[0].name, alice.fingerprint)
    text = Request(
        "git-upload-pack", app, identity, None, "c1\nevent=forged user=root", "p\nx", "node-b"
    ).encode()
    caplog.set_level(logging.INFO)
    async with to_peers(a, list(prepared.host_keys)) as conn:
        result = await asyncio.wait_for(conn.run(text, check=False), TIMEOUT)
    forged = [r.getMessage() for r in caplog.records if "\n" in r.getMessage()]
    assert result.exit_status == 1 and result.stderr == "error: not a forwarded operation\n"
    assert not forged, forged
