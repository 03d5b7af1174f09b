"""The pack cache's pure parts: which commands the hook runs, what the key covers, what an
entry must be, and how the directory is prepared."""

from __future__ import annotations

import asyncio
import hashlib
import os
import stat
from pathlib import Path

import pytest

from gateway import config, packcache, packhook

WANT = b"1585959f8eae2db54c150a273dec7b847b517c2d\n"


def test_hook_runs_only_pack_objects_with_the_gateways_git():
    argv = ["git", "pack-objects", "--revs", "--stdout"]
    assert packhook.pack_objects_argv(argv, "/usr/bin/git") == ["/usr/bin/git", *argv[1:]]
    shallow = ["git", "--shallow-file", "", "pack-objects", "--revs"]
    assert packhook.pack_objects_argv(shallow, "/g")[:4] == [
        "/g",
        "--shallow-file",
        "",
        "pack-objects",
    ]
    for bad in (
        ["sh", "pack-objects"],
        ["git", "upload-pack", "."],
        ["git", "--shallow-file", "/etc/x", "pack-objects"],
        ["git", "-c", "core.pager=x", "pack-objects"],
        [],
    ):
        with pytest.raises(ValueError):
            packhook.pack_objects_argv(bad, "/g")


def test_key_covers_repository_arguments_and_request_but_not_progress():
    base = packhook.request_key("/r/a.git", ["git", "pack-objects", "--revs"], WANT)
    assert base != packhook.request_key("/r/b.git", ["git", "pack-objects", "--revs"], WANT)
    filtered = ["git", "pack-objects", "--revs", "--filter=blob:none"]
    assert base != packhook.request_key("/r/a.git", filtered, WANT)
    assert base != packhook.request_key(
        "/r/a.git", ["git", "pack-objects", "--revs"], b"--shallow x\n" + WANT
    )
    progress = ["git", "pack-objects", "--revs", "--progress"]
    assert base == packhook.request_key("/r/a.git", progress, WANT)


def entry(key: str, pack: bytes) -> bytes:
    digest = hashlib.sha256(bytes.fromhex(key) + pack).digest()
    return pack + packhook.trailer(key, len(pack), digest)


def test_entry_must_match_its_key_length_and_checksum():
    key, other = "a" * 64, "b" * 64
    good = entry(key, b"PACK" + b"x" * 100)
    assert packhook.verify_bytes(good, key) == 104
    for bad, why in (
        (good, "another key"),
        (good[:50], "truncated"),
        (good[:60] + b"y" + good[61:], "checksum"),
        (good[:-1], "truncated"),
    ):
        with pytest.raises(ValueError, match=why):
            packhook.verify_bytes(bad, other if why == "another key" else key)


def test_prepare_makes_the_directory_private(tmp_path):
    directory = tmp_path / "cache"
    directory.mkdir(mode=0o755)
    directory.chmod(0o755)
    packcache.prepare(directory)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    for part in packhook.SUBDIRS:
        assert stat.S_IMODE((directory / part).stat().st_mode) == 0o700
    assert (directory / packhook.LOCK).is_file()


def test_prepare_refuses_a_symlink_or_a_foreign_directory(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(ValueError, match="not a directory"):
        packcache.prepare(link)
    if os.geteuid() == 0:
        foreign = tmp_path / "foreign"
        foreign.mkdir()
        os.chown(foreign, 65534, 65534)
        with pytest.raises(ValueError, match="uid 65534"):
            packcache.prepare(foreign)


def test_hook_path_with_shell_characters_leaves_the_cache_off(tmp_path):
    settings = config.from_mapping({"git": {"pack_cache_dir": str(tmp_path / "c")}}).git
    cache = packcache.PackCache(
        settings, "/usr/bin/git", Path("/srv/my repos/.hooks/x"), tmp_path / "s"
    )
    asyncio.run(cache.start(None))
    assert not cache.enabled
    assert cache.upload_pack_config() == [] and cache.environment() == {}


def test_default_directory_is_beside_the_control_socket(tmp_path):
    cfg = config.from_mapping({"storage": {"control_socket": str(tmp_path / "gw.sock")}})
    assert cfg.git.pack_cache_dir == tmp_path / "gw.sock.pack-cache"


def test_cache_dir_is_never_bound_into_a_deploy_sandbox(tmp_path):
    with pytest.raises(config.ConfigError, match="pack_cache_dir"):
        config.from_mapping(
            {
                "git": {"pack_cache_dir": str(tmp_path / "cache")},
                "deploy": {"sandbox_read_paths": [str(tmp_path)]},
            }
        )


def test_report_json_round_trips_hostile_text():
    """The hook writes its report without the json module; whatever a reason or key holds
    (quotes, backslashes, control characters, lone surrogates from a path), the gateway's
    json.loads reads back exactly what was sent."""
    import json

    message = {
        "result": "miss",
        "served": 0,
        "written": 12,
        "problems": [{"event": "pack_cache_write_failed", "reason": 'a"b\\c\n\x00\x1f\udcff é'}],
    }
    assert json.loads(packhook.to_json(message)) == message
    with pytest.raises(TypeError):
        packhook.to_json({"x": 1.5})


def test_hook_does_not_import_heavy_modules():
    """Start-up is the hook's cost on every fetch: it must not import json, subprocess,
    socket or contextlib (16 ms here), nor the gateway's other modules."""
    import subprocess
    import sys

    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import gateway.packhook;"
        "print(' '.join(sorted(sys.modules)))"
    )
    root = str(Path(packhook.__file__).parents[1])
    out = subprocess.run(
        [sys.executable, "-IS", "-c", code, root],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout.split()
    heavy = {"json", "subprocess", "socket", "contextlib", "asyncio", "signal", "logging"}
    assert not heavy & set(out)
    assert [m for m in out if m.startswith("gateway")] == ["gateway", "gateway.packhook"]


def test_child_restores_sigpipe_and_reports_exit_codes(tmp_path):
    """git under the hook dies of a closed pipe as under upload-pack (SIGPIPE at its
    default, not Python's ignore), and exit codes come back as subprocess reports them."""
    import sys

    # Python sets SIGPIPE to ignored in any Python child, so ask the kernel about grep.
    child = packhook.Child(["grep", "^SigIgn:", "/proc/self/status"], capture=True)
    child.close_stdin()
    ignored = int(os.read(child.stdout, 200).split()[1], 16)
    assert child.wait() == 0
    assert not ignored & (1 << (13 - 1))  # SIGPIPE is 13
    echo = packhook.Child(
        [sys.executable, "-c", "import sys; sys.stdout.write(sys.stdin.read())"], capture=True
    )
    echo.feed(b"hello")
    echo.close_stdin()
    assert os.read(echo.stdout, 100) == b"hello"
    assert echo.wait() == 0
    sleeper = packhook.Child([sys.executable, "-c", "import time; time.sleep(60)"], capture=False)
    sleeper.kill()
    assert sleeper.wait() == -9


def test_copy_range_sends_the_range_and_refuses_a_short_file(tmp_path):
    source = tmp_path / "entry"
    source.write_bytes(bytes(range(256)) * 5000)
    fd = os.open(source, os.O_RDONLY)
    read, write = os.pipe()
    try:
        packhook.copy_range(fd, 10, 1010, write)
        assert os.read(read, 5000) == (bytes(range(256)) * 5000)[10:1010]
        with pytest.raises(ValueError, match="truncated"):
            packhook.copy_range(fd, 1_279_000, 1_290_000, write)  # the file ends at 1,280,000
    finally:
        for each in (fd, read, write):
            os.close(each)
