"""git's services over an asyncssh channel, pkt-lines written by hand: ref advertisements,
a push through receive-pack (its pack made by `git pack-objects`), and refusals."""

from __future__ import annotations

import asyncio
from pathlib import Path

from tests.integration.conftest import TIMEOUT, LiveGateway
from tests.integration.gitwire import (
    DELIM,
    FLUSH,
    ZERO,
    commit_and_pack,
    pkt,
    push,
    read_pkts,
    server_refs,
    session,
)


async def test_upload_pack_v0_on_an_empty_repository_advertises_nothing(gw: LiveGateway):
    alice = await gw.user("alice")
    app = await gw.app(alice)
    conn, process = await session(gw, alice, f"git-upload-pack '{app}.git'")
    async with conn:
        assert await read_pkts(process.stdout) == []
        process.stdin.write(FLUSH)
        process.stdin.write_eof()
        await asyncio.wait_for(process.wait_closed(), TIMEOUT)
    assert process.exit_status == 0


async def test_ls_refs_v2_on_an_empty_repository_names_the_unborn_branch(gw: LiveGateway):
    alice = await gw.user("alice")
    app = await gw.app(alice)
    conn, process = await session(
        gw, alice, f"git-upload-pack '/{app}.git'", GIT_PROTOCOL="version=2"
    )
    async with conn:
        capabilities = await read_pkts(process.stdout)
        assert capabilities[0] == b"version 2\n"
        assert any(line.startswith(b"ls-refs") for line in capabilities)
        process.stdin.write(
            pkt("command=ls-refs\n") + DELIM + pkt("symrefs\n") + pkt("unborn\n") + FLUSH
        )
        assert await read_pkts(process.stdout) == [b"unborn HEAD symref-target:refs/heads/main\n"]
        process.stdin.write_eof()
        await asyncio.wait_for(process.wait_closed(), TIMEOUT)


async def test_a_push_through_receive_pack_moves_the_ref(gw: LiveGateway, tmp_path: Path):
    alice = await gw.user("alice")
    app = await gw.app(alice)
    sha, pack = await asyncio.to_thread(commit_and_pack, tmp_path / "work", {"README": "hi\n"})
    pushed = await push(gw, alice, app, sha, pack)
    assert pushed.report == [b"unpack ok\n", b"ok refs/heads/main\n"] and pushed.code == 0
    assert (await asyncio.to_thread(server_refs, gw.repo(app)))["refs/heads/main"] == sha
    # ...and a v2 ls-refs now lists it.
    conn, process = await session(
        gw, alice, f"git-upload-pack '{app}.git'", GIT_PROTOCOL="version=2"
    )
    async with conn:
        await read_pkts(process.stdout)
        process.stdin.write(pkt("command=ls-refs\n") + DELIM + pkt("symrefs\n") + FLUSH)
        refs = await read_pkts(process.stdout)
        process.stdin.write_eof()
        await asyncio.wait_for(process.wait_closed(), TIMEOUT)
    assert refs == [
        f"{sha} HEAD symref-target:refs/heads/main\n".encode(),
        f"{sha} refs/heads/main\n".encode(),
    ]


async def test_regression_a_reader_cannot_push(gw: LiveGateway, tmp_path: Path):
    owner, reader = await gw.user("owner"), await gw.user("reader")
    app = await gw.app(owner)
    await gw.admin("app", "grant", app, reader.name, "read")
    reply = await gw.run(reader, f"git-receive-pack '{app}.git'", stdin="0000")
    assert reply.code != 0 and reply.stdout == ""
    assert "read" in reply.stderr and reply.stderr.count("\n") == 1
    assert await asyncio.to_thread(server_refs, gw.repo(app)) == {}


async def test_regression_a_garbage_pack_is_refused_and_moves_nothing(
    gw: LiveGateway, tmp_path: Path
):
    alice = await gw.user("alice")
    app = await gw.app(alice)
    conn, process = await session(gw, alice, f"git-receive-pack '{app}.git'")
    async with conn:
        await read_pkts(process.stdout)
        process.stdin.write(pkt(f"{ZERO} {'1' * 40} refs/heads/main\0report-status\n") + FLUSH)
        process.stdin.write(b"PACK\x00\x00\x00\x02\x00\x00\x00\x01garbage")
        process.stdin.write_eof()
        report = await read_pkts(process.stdout)
        await asyncio.wait_for(process.wait_closed(), TIMEOUT)
    assert report[0].startswith(b"unpack ") and report[0] != b"unpack ok\n"
    assert await asyncio.to_thread(server_refs, gw.repo(app)) == {}


async def test_regression_an_oversized_git_protocol_is_declined_and_v0_served(gw: LiveGateway):
    alice = await gw.user("alice")
    app = await gw.app(alice)
    conn, process = await session(
        gw, alice, f"git-upload-pack '{app}.git'", GIT_PROTOCOL="version=2:" + "x" * 300
    )
    async with conn:
        assert await read_pkts(process.stdout) == []  # v0 on an empty repository
        process.stdin.write(FLUSH)
        process.stdin.write_eof()
        await asyncio.wait_for(process.wait_closed(), TIMEOUT)
    assert process.exit_status == 0


async def test_regression_other_environment_never_reaches_git(gw: LiveGateway, tmp_path: Path):
    """GIT_DIR, GIT_CONFIG_* and friends sent by the client would point git elsewhere, or
    give it a config naming a program: they are declined, and the app's repository served."""
    alice = await gw.user("alice")
    app = await gw.app(alice)
    hostile = {
        "GIT_DIR": str(tmp_path),
        "GIT_CONFIG_COUNT": "1",
        "GIT_CONFIG_KEY_0": "uploadpack.packObjectsHook",
        "GIT_CONFIG_VALUE_0": f"touch {tmp_path}/owned",
        "GIT_PROTOCOL": "version=2",
    }
    conn, process = await session(gw, alice, f"git-upload-pack '{app}.git'", **hostile)
    async with conn:
        capabilities = await read_pkts(process.stdout)
        assert capabilities[0] == b"version 2\n"
        process.stdin.write(
            pkt("command=ls-refs\n") + DELIM + pkt("symrefs\n") + pkt("unborn\n") + FLUSH
        )
        assert await read_pkts(process.stdout) == [b"unborn HEAD symref-target:refs/heads/main\n"]
        process.stdin.write_eof()
        await asyncio.wait_for(process.wait_closed(), TIMEOUT)
    assert not (tmp_path / "owned").exists()
