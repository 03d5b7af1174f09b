"""One tenant's concurrency does not slow the others: many followers of one deploy share one
log reader, and a user's connections and fetches are capped per node."""

from __future__ import annotations

import asyncio
import statistics
import time
from pathlib import Path

import pytest

from tests.helpers import (
    DEPLOY_PYTHON,
    PIPELINE,
    TIMEOUT,
    Admin,
    Client,
    ServeProcess,
    ServerThread,
    ssh_connect,
    write_config,
)

FOLLOWERS = 300
PER_CONNECTION = 10  # [limits] max_sessions_per_connection's default: 30 connections


async def _whoami_ms(client: Client) -> float:
    """One `ssh ... whoami` from a fresh connection, as a tenant types it: wall time in ms."""
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        *client.ssh_base,
        "-T",
        "git@127.0.0.1",
        "whoami",
        env=client.env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), TIMEOUT)
    elapsed = (time.monotonic() - started) * 1000
    assert proc.returncode == 0, err.decode()
    assert client.name in out.decode()
    return elapsed


async def _median_whoami(client: Client, runs: int = 7) -> float:
    return statistics.median([await _whoami_ms(client) for _ in range(runs)])


async def _drain_follower(process, received: list[int], index: int) -> None:  # type: ignore[no-untyped-def]
    while chunk := await process.stdout.read(65536):
        received[index] += len(chunk)


async def _followers_load(key: Path, port: int, app: str, bob: Client) -> tuple[float, float]:
    """Bob's whoami (median ms) before, then while 300 `logs --follow` of Alice's chatty
    deploy stream; the followers are then let go by cancelling the deploy."""
    idle = await _median_whoami(bob)
    connections = [await ssh_connect(port, key) for _ in range(FOLLOWERS // PER_CONNECTION)]
    received = [0] * FOLLOWERS
    processes = []
    for conn in connections:
        for _ in range(PER_CONNECTION):
            processes.append(await conn.create_process(f"logs {app} 1 --follow"))
    readers = [
        asyncio.ensure_future(_drain_follower(p, received, i)) for i, p in enumerate(processes)
    ]
    try:
        deadline = time.monotonic() + 2 * TIMEOUT
        while min(received) < 4096:  # every follower streams the deploy's output
            assert time.monotonic() < deadline, f"{sum(1 for r in received if r < 4096)} waiting"
            await asyncio.sleep(0.2)
        # Each new follower first gets the log so far: measured once every follower is
        # past where the furthest one was, in the steady state of one chunk per flush.
        ahead = max(received)
        while min(received) <= ahead:
            assert time.monotonic() < deadline, "the followers do not catch up"
            await asyncio.sleep(0.2)
        before = list(received)
        loaded = await _median_whoami(bob)
        # The deploy chatters on, and every follower still gets its output (with 300 of
        # them, each gets it every 0.6 s: see fanout.WRITES_PER_SECOND).
        while any(after <= was for after, was in zip(received, before, strict=True)):
            assert time.monotonic() < deadline, "a follower no longer gets the output"
            await asyncio.sleep(0.2)
        async with ssh_connect(port, key) as spare:
            cancel = await asyncio.wait_for(spare.run("cancel 1"), TIMEOUT)
        assert cancel.exit_status == 0, cancel.stderr
        await asyncio.wait_for(asyncio.gather(*readers), TIMEOUT)
        codes = [await asyncio.wait_for(p.wait(), TIMEOUT) for p in processes]
        assert {c.exit_status for c in codes} == {1}  # the followed deploy was cancelled
    finally:
        for reader in readers:
            reader.cancel()
        for conn in connections:
            conn.close()
    return idle, loaded


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_regression_many_followers_of_one_deploy_leave_other_tenants_fast(tmp_path):
    """The hostile review's finding (issue 20): 300 `logs --follow` of one user's chatty
    deploy took another tenant's `whoami` from 37 ms to 2.2 s, as each follower read the
    registry on every flush (here: 33 ms to 5.9 s, and the node lost its deploy lease, its
    registry calls queued behind the followers'). With one reader per deploy, it stays within
    a small factor (measured: 73 ms to 137 ms)."""
    config = write_config(
        tmp_path / "gw",
        deploy={"command": [DEPLOY_PYTHON, str(PIPELINE)], "mode": "detached", "timeout": 300},
        cluster={"node_timeout": 15},  # the default lease, not the tests' quick 4 s
    )
    admin = Admin(config)
    alice_key = admin.enroll("alice", tmp_path, "chatty")
    bob_key = admin.enroll("bob", tmp_path)
    server = ServeProcess(config)
    try:
        alice = Client(tmp_path / "alice", alice_key, server, name="alice")
        bob = Client(tmp_path / "bob", bob_key, server, name="bob")
        work = alice.new_repo(tmp_path / "work", {"chatter": "240"})
        alice.git("push", "-q", alice.url("chatty"), "main", cwd=work)
        server.wait_for(r"event=deploy_started deploy=1 ")
        idle, loaded = asyncio.run(_followers_load(alice_key, server.port, "chatty", bob))
        ratio = loaded / idle
        print(
            f"\nwhoami with {FOLLOWERS} followers of another tenant's chatty deploy: "
            f"idle {idle:.0f} ms, loaded {loaded:.0f} ms, ratio {ratio:.2f}"
        )
        assert ratio < 4, f"idle {idle:.0f} ms, loaded {loaded:.0f} ms"
    except BaseException:
        server.kill()  # the chatty deploy may still run: no drain
        server.finish()
        noise = ("event=connect ", "event=auth_ok", "kind=auth_ok", "event=disconnect")
        print("".join(line for line in server.lines if not any(n in line for n in noise))[-6000:])
        raise
    assert server.stop() == 0
    assert "event=deploy_node_fenced" not in server.stderr  # the lease was renewed throughout


@pytest.fixture(scope="module")
def capped(module_gateways):  # type: ignore[no-untyped-def]
    """A gateway where one user may hold 2 connections and 1 fetch at once."""
    thread = module_gateways(
        name="capped", limits={"max_connections_per_user": 2, "max_fetches_per_user": 1}
    )
    keys = {
        name: thread.admin.enroll(name, thread.home, f"{name}-app") for name in ("hog", "other")
    }
    return thread, keys


def _held(server: ServerThread, kind: str) -> dict[tuple[str, str], int]:
    return {k: v for k, v in server.gateway.admission.held.items() if k[0] == kind}


async def test_regression_a_users_connections_are_capped_per_node(capped, caplog) -> None:
    server, keys = capped
    caplog.set_level("INFO", logger="gateway.server")
    first = await ssh_connect(server.port, keys["hog"])
    second = await ssh_connect(server.port, keys["hog"])
    try:
        # The third logs in (it holds the key), then each session it opens is told why.
        async with ssh_connect(server.port, keys["hog"]) as third:
            result = await asyncio.wait_for(third.run("whoami"), TIMEOUT)
            assert result.exit_status == 1
            assert result.stdout == ""
            assert result.stderr == (
                "error: too many connections for hog (at most 2 at once on this node; "
                "[limits] max_connections_per_user)\n"
            )
            git = await asyncio.wait_for(third.run("git-upload-pack 'hog-app.git'"), TIMEOUT)
            assert git.exit_status == 1 and "max_connections_per_user" in git.stderr
        assert "reason=max_connections_per_user limit=2" in caplog.text
        # Another user is not affected.
        async with ssh_connect(server.port, keys["other"]) as other:
            assert (await asyncio.wait_for(other.run("whoami"), TIMEOUT)).exit_status == 0
        # A connection that drops (no SSH disconnect) gives its slot back.
        first.abort()
        await asyncio.get_running_loop().run_in_executor(
            None,
            server.wait_until,
            lambda: sum(_held(server, "connections").values()) == 1,
        )
        async with ssh_connect(server.port, keys["hog"]) as again:
            result = await asyncio.wait_for(again.run("whoami"), TIMEOUT)
            assert result.exit_status == 0 and "hog" in result.stdout
    finally:
        first.close()
        second.close()
    await asyncio.get_running_loop().run_in_executor(
        None, server.wait_until, lambda: _held(server, "connections") == {}
    )


async def test_regression_a_users_fetches_are_capped_per_node(capped, caplog) -> None:
    server, keys = capped
    caplog.set_level("INFO", logger="gateway.git")
    async with ssh_connect(server.port, keys["hog"]) as conn:
        command = "git-upload-pack 'hog-app.git'"
        held = await conn.create_process(command, encoding=None)
        assert await asyncio.wait_for(held.stdout.read(4), TIMEOUT)  # it is being served
        refused = await asyncio.wait_for(conn.run(command, encoding=None), TIMEOUT)
        assert refused.exit_status == 1
        assert refused.stderr == (
            b"error: too many fetches for hog (at most 1 at once on this node; "
            b"[limits] max_fetches_per_user): retry when one has finished\n"
        )
        archive = await asyncio.wait_for(
            conn.run("git-upload-archive 'hog-app.git'", encoding=None), TIMEOUT
        )
        assert b"max_fetches_per_user" in archive.stderr  # archives count as fetches
        assert "reason=max_fetches_per_user limit=1" in caplog.text
        # Another user's clone is not affected, nor is a push of this one's.
        async with ssh_connect(server.port, keys["other"]) as other:
            fetch = await asyncio.wait_for(
                other.run("git-upload-pack 'other-app.git'", input=b"0000", encoding=None),
                TIMEOUT,
            )
            assert fetch.exit_status == 0
        push = await asyncio.wait_for(
            conn.run("git-receive-pack 'hog-app.git'", input=b"0000", encoding=None), TIMEOUT
        )
        assert push.exit_status == 0
        held.stdin.write(b"0000")
        held.stdin.write_eof()
        await asyncio.wait_for(held.wait(), TIMEOUT)
        # Its slot is free again.
        again = await asyncio.wait_for(conn.run(command, input=b"0000", encoding=None), TIMEOUT)
        assert again.exit_status == 0
    assert _held(server, "fetches") == {}
