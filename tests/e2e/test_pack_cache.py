"""The pack-objects cache, through real git and a real gateway: shared runs, cached answers,
bad entries, request shapes, a full disk, and clones exactly as git alone makes them."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.helpers import (
    TIMEOUT,
    Client,
    GatewayFactory,
    LiveProcess,
    ServerThread,
    http,
    http_base,
    keygen,
    unique,
)

REAL_GIT = shutil.which("git") or "/usr/bin/git"

# The gateway's git for this module: the real one, except that each pack-objects run is
# counted, and while `gate` exists (a FIFO) a run sends half its pack, then waits for the
# test to write to the FIFO before it sends the rest.
WRAPPER = """#!/usr/bin/python3
import os, signal, subprocess, sys
REAL, LOG, GATE = {real!r}, {log!r}, {gate!r}
if "pack-objects" in sys.argv[1:4]:
    with open(LOG, "a") as f:
        f.write("%d\\n" % os.getpid())
    if os.path.exists(GATE):
        signal.alarm(120)
        out = subprocess.run([REAL] + sys.argv[1:], stdout=subprocess.PIPE, timeout=120).stdout
        half = len(out) // 2
        os.write(1, out[:half])
        with open(GATE) as gate:
            gate.read()
        view = memoryview(out)[half:]
        while view:
            view = view[os.write(1, view):]
        sys.exit(0)
os.execv(REAL, [REAL] + sys.argv[1:])
"""


class Cached:
    """A gateway whose git is the counting wrapper, with its own users and apps."""

    def __init__(
        self, gateways: GatewayFactory, directory: Path, **overrides: dict[str, object]
    ) -> None:
        self.gateways = gateways
        self.dir = directory
        self.log = directory / "pack-objects.log"
        self.gate = directory / "gate"
        wrapper = directory / "git-wrapper"
        directory.mkdir(parents=True, exist_ok=True)
        wrapper.write_text(WRAPPER.format(real=REAL_GIT, log=str(self.log), gate=str(self.gate)))
        wrapper.chmod(0o755)
        git = {"binary": str(wrapper), "pack_cache": True, **overrides.pop("git", {})}
        self.server = gateways(name="packcache", git=git, **overrides)
        self.admin = self.server.admin
        self.cache = self.server.config.git.pack_cache_dir

    def user(self, tmp: Path) -> Client:
        name = unique("pc")
        key = keygen(tmp / f"{name}_id")
        self.admin.ok("user", "add", name)
        self.admin.ok("key", "add", name, "k", f"{key}.pub")
        return Client(tmp / f"home-{name}", key, self.server, name=name)

    def app(self, owner: Client) -> str:
        name = unique("pcapp")
        self.admin.ok("app", "create", name, "--owner", owner.name)
        return name

    def runs(self) -> int:
        return len(self.log.read_text().splitlines()) if self.log.exists() else 0

    def count(self, result: str) -> float:
        return self.server.gateway.metrics.pack_cache.labels(result)._value.get()

    def wait_reports(self, total: int) -> None:
        """Each hook run reports once; wait until `total` reports have arrived."""
        self.server.wait_until(
            lambda: sum(self.count(r) for r in ("hit", "shared", "miss", "bypass")) >= total
        )

    def reports(self) -> float:
        return sum(self.count(r) for r in ("hit", "shared", "miss", "bypass"))

    def entries(self) -> list[Path]:
        return sorted((self.cache / "entries").iterdir())

    def stop(self) -> None:
        self.gateways.stop(self.server)


@pytest.fixture(scope="module")
def cached(module_gateways, tmp_path_factory):
    return Cached(module_gateways, tmp_path_factory.mktemp("packcache"))


def push_content(client: Client, app: str, tmp: Path, files: int = 60, size: int = 40_000) -> Path:
    """A repository with incompressible files (a pack of a few MB, many objects), pushed."""
    rng = random.Random(app)  # noqa: S311 - test content, not a secret
    contents = {f"f{i:03d}.bin": rng.randbytes(size).hex()[:size] for i in range(files)}
    work = client.new_repo(tmp / f"work-{app}", contents)
    client.commit(work, {"second": "two\n"}, "second")
    client.git("push", "-q", client.url(app), "main", cwd=work)
    return work


def clone(client: Client, app: str, target: Path, *args: str) -> Path:
    client.git("clone", "-q", "--no-checkout", *args, client.url(app), str(target))
    return target


def objects(repo: Path) -> list[str]:
    out = subprocess.run(
        ["git", "cat-file", "--batch-all-objects", "--batch-check"],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=True,
    ).stdout
    return sorted(out.splitlines())


def refs(repo: Path) -> str:
    return subprocess.run(
        ["git", "for-each-ref", "--format=%(objectname) %(refname)"],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=True,
    ).stdout


def strict_fsck(repo: Path) -> None:
    result = subprocess.run(
        ["git", "fsck", "--strict", "--full"], cwd=repo, capture_output=True, timeout=TIMEOUT
    )
    assert result.returncode == 0, result.stderr


def same_as_git_alone(server: ServerThread, app: str, clone_dir: Path, tmp: Path) -> None:
    """The clone holds what plain git (file://, no gateway, no cache) gives, and is sound."""
    reference = tmp / unique("reference")
    subprocess.run(
        ["git", "clone", "-q", "--bare", f"file://{server.repo(app)}", str(reference)],
        timeout=TIMEOUT,
        check=True,
        capture_output=True,
    )
    strict_fsck(clone_dir)
    assert objects(clone_dir) == objects(reference)
    remote = {
        line.split()[1].replace("refs/remotes/origin/", "refs/heads/"): line.split()[0]
        for line in refs(clone_dir).splitlines()
        if "HEAD" not in line
    }
    assert remote == {line.split()[1]: line.split()[0] for line in refs(reference).splitlines()}


def test_two_concurrent_identical_clones_run_one_pack_objects(cached, tmp_path):
    owner = cached.user(tmp_path)
    app = cached.app(owner)
    push_content(owner, app, tmp_path)
    runs, reports = cached.runs(), cached.reports()
    os.mkfifo(cached.gate)
    first = second = None
    try:
        argv = ["git", "clone", "--progress", "--no-checkout", owner.url(app)]
        first = LiveProcess([*argv, str(tmp_path / "one")], env=owner.env)
        first.wait_for(r"Receiving objects: ")  # half the pack is out; its run waits
        second = LiveProcess([*argv, str(tmp_path / "two")], env=owner.env)
        # The follower streams the leader's output while that run is still going.
        second.wait_for(r"Receiving objects: ")
        with open(cached.gate, "w") as gate:
            gate.write("go")
        assert first.finish() == 0, first.stderr
        assert second.finish() == 0, second.stderr
    finally:
        os.unlink(cached.gate)
        for proc in (first, second):
            if proc is not None and proc.proc.poll() is None:
                proc.kill()
    cached.wait_reports(reports + 2)
    assert cached.runs() == runs + 1
    assert cached.count("shared") >= 1
    for name in ("one", "two"):
        same_as_git_alone(cached.server, app, tmp_path / name, tmp_path)
    # Asked for twice: kept, and the third clone runs no pack-objects at all.
    hits = cached.count("hit")
    same_as_git_alone(cached.server, app, clone(owner, app, tmp_path / "three"), tmp_path)
    cached.wait_reports(reports + 3)
    assert cached.runs() == runs + 1
    assert cached.count("hit") == hits + 1


def test_answer_is_cached_on_its_second_request(cached, tmp_path):
    owner = cached.user(tmp_path)
    app = cached.app(owner)
    push_content(owner, app, tmp_path, files=5)
    runs, reports = cached.runs(), cached.reports()
    entries = len(cached.entries())
    clone(owner, app, tmp_path / "a")
    cached.wait_reports(reports + 1)
    assert len(cached.entries()) == entries  # once: not written (most are never asked again)
    clone(owner, app, tmp_path / "b")
    cached.wait_reports(reports + 2)
    assert len(cached.entries()) == entries + 1
    metric = cached.server.gateway.metrics
    served = metric.pack_cache_served._value.get()
    clone(owner, app, tmp_path / "c")
    cached.wait_reports(reports + 3)
    assert cached.runs() == runs + 2
    assert metric.pack_cache_served._value.get() > served
    assert metric.pack_cache_written._value.get() > 0
    for name in "abc":
        same_as_git_alone(cached.server, app, tmp_path / name, tmp_path)
    scraped = http("GET", http_base(cached.server) + "/metrics").body.decode()
    for name in (
        'gateway_pack_cache_requests_total{result="hit"}',
        'gateway_pack_cache_requests_total{result="miss"}',
        "gateway_pack_cache_served_bytes_total",
        "gateway_pack_cache_written_bytes_total",
    ):
        assert name in scraped


def cached_entry(cached: Cached, owner: Client, app: str, tmp: Path) -> Path:
    """Clone twice so the answer is kept; return its entry."""
    before = set(cached.entries())
    reports = cached.reports()
    clone(owner, app, tmp / unique("warm"))
    clone(owner, app, tmp / unique("warm"))
    cached.wait_reports(reports + 2)
    (entry,) = set(cached.entries()) - before
    return entry


@pytest.mark.parametrize("damage", ["flipped", "truncated", "trailer_only"])
def test_damaged_entry_is_never_served(cached, tmp_path, caplog, damage):
    owner = cached.user(tmp_path)
    app = cached.app(owner)
    push_content(owner, app, tmp_path, files=8)
    entry = cached_entry(cached, owner, app, tmp_path)
    data = bytearray(entry.read_bytes())
    if damage == "flipped":
        data[len(data) // 2] ^= 0x40
    elif damage == "truncated":
        data = data[: len(data) // 2]
    else:
        data = data[-88:]
    entry.write_bytes(bytes(data))
    runs, reports = cached.runs(), cached.reports()
    same_as_git_alone(cached.server, app, clone(owner, app, tmp_path / "after"), tmp_path)
    cached.wait_reports(reports + 1)
    assert cached.runs() == runs + 1  # git made the pack again
    assert "event=pack_cache_bad_entry" in caplog.text
    assert entry.name in caplog.text


def test_filters_and_depths_never_share_an_entry(cached, tmp_path):
    owner = cached.user(tmp_path)
    app = cached.app(owner)
    work = push_content(owner, app, tmp_path, files=6)
    for i in range(3):
        owner.commit(work, {f"more{i}": f"{i}\n"}, f"more {i}")
    owner.git("push", "-q", owner.url(app), "main", cwd=work)
    shapes = {
        "full": (),
        "depth1": ("--depth", "1"),
        "depth2": ("--depth", "2"),
        "blobless": ("--filter=blob:none",),
        "treeless": ("--filter=tree:0",),
    }
    before = set(cached.entries())
    for name, args in shapes.items():
        for round_ in ("a", "b", "c"):  # the third is served from the cache
            clone(owner, app, tmp_path / f"{name}-{round_}", *args)
    assert len(set(cached.entries()) - before) == len(shapes)
    for round_ in ("a", "c"):
        assert commits(tmp_path / f"depth1-{round_}") == 1
        assert commits(tmp_path / f"depth2-{round_}") == 2
        assert commits(tmp_path / f"full-{round_}") == 5
        assert missing_objects(tmp_path / f"blobless-{round_}") > 0
        assert missing_objects(tmp_path / f"full-{round_}") == 0
        same_as_git_alone(cached.server, app, tmp_path / f"full-{round_}", tmp_path)


def commits(repo: Path) -> int:
    out = subprocess.run(
        ["git", "rev-list", "--count", "HEAD"],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=True,
    )
    return int(out.stdout)


def missing_objects(repo: Path) -> int:
    out = subprocess.run(
        ["git", "rev-list", "--objects", "--all", "--missing=print"],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=True,
        env={**os.environ, "GIT_NO_LAZY_FETCH": "1"},
    )
    return sum(1 for line in out.stdout.splitlines() if line.startswith("?"))


def test_cache_on_a_full_disk_degrades_to_no_cache(gateway_factory, tmp_path, caplog):
    mount = tmp_path / "small"
    mount.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)],
        capture_output=True,
        timeout=TIMEOUT,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {result.stderr.decode().strip()}")
    gateway = None
    try:
        gateway = Cached(
            gateway_factory, tmp_path / "gw", git={"pack_cache_dir": str(mount / "cache")}
        )
        with contextlib.suppress(OSError), open(mount / "filler", "wb") as filler:
            while True:
                filler.write(b"\0" * 65536)
                filler.flush()
        owner = gateway.user(tmp_path)
        app = gateway.app(owner)
        push_content(owner, app, tmp_path, files=20)
        for name in ("a", "b", "c"):
            same_as_git_alone(gateway.server, app, clone(owner, app, tmp_path / name), tmp_path)
        gateway.wait_reports(3)
        assert gateway.runs() == 3
        assert gateway.entries() == []
        assert "event=pack_cache_write_failed" in caplog.text
    finally:
        if gateway is not None:
            gateway.stop()
        subprocess.run(["umount", str(mount)], timeout=TIMEOUT, check=False)


def test_cache_off_runs_plain_upload_pack(gateway_factory, tmp_path):
    gateway = Cached(gateway_factory, tmp_path / "gw", git={"pack_cache": False})
    owner = gateway.user(tmp_path)
    app = gateway.app(owner)
    push_content(owner, app, tmp_path, files=3)
    for name in ("a", "b"):
        same_as_git_alone(gateway.server, app, clone(owner, app, tmp_path / name), tmp_path)
    assert gateway.runs() == 0  # upload-pack ran its own pack-objects, not the hook
    assert gateway.reports() == 0
    assert not gateway.cache.exists()
