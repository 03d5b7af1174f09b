"""The docs cannot rot: the README's commands and quickstart and the longer quickstart run as
written, with the output they show (tests/docs.py); links stay inside the repository or go to
public URLs."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pwd
import re
import shutil
import signal
import tempfile
from pathlib import Path

import pytest

from bench.postgres import SUPERUSER, PostgresServer
from gateway import config
from gateway.deploys.builddir import remove_tree
from tests.docs import Block, Walk, blocks, pattern
from tests.helpers import REPO_ROOT, LiveProcess, require_tools
from tests.pg import require_postgres

README = REPO_ROOT / "README.md"
DOCS = REPO_ROOT / "docs"
PAGES = [README, REPO_ROOT / "CHANGELOG.md", *sorted(DOCS.glob("*.md"))]
# The first start installs from the lock into a fresh venv: minutes on a cold pip cache.
INSTALL_TIMEOUT = 900

_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)|<(https?://[^>]+)>")
_HEADING = re.compile(r"^#{1,6} (.+)$", re.M)


def wait_reloaded(gateway, workers: int) -> None:  # type: ignore[no-untyped-def]
    """Every worker says `event=reloaded` (a SIGHUP to all of them, or to the supervisor)."""
    seen: set[str] = set()
    while len(seen) < workers:
        line = gateway.wait_for(r"event=reloaded").string
        found = re.search(r"worker=(\d+)", line)
        seen.add(found.group(1) if found else "0")


def readme_walk(walk: Walk) -> LiveProcess:
    """The README's first command (install and serve), then its quickstart; the gateway,
    still running."""
    [serve] = blocks(README, "serve-command")
    gateway = walk.start(serve)
    listening = gateway.wait_for(
        r"event=listening address=127\.0\.0\.1:(\d+)(?: workers=(\d+))?",
        timeout=INSTALL_TIMEOUT,
    )
    assert listening.group(1) == walk.ports["2222"]
    gateway.workers = int(listening.group(2) or 1)  # type: ignore[attr-defined]
    walk_blocks = blocks(README, "quickstart")
    assert len(walk_blocks) == 4
    for block in walk_blocks:
        walk.run(block)
        if "reload" in block.options:
            wait_reloaded(gateway, gateway.workers)  # type: ignore[attr-defined]
    copy = walk.home / "src" / "myapp-copy"
    assert (copy / "VERSION").read_text() == "1.0\n"
    return gateway


def remove_default_build_dir(walk: Walk) -> None:
    """The embedded defaults put a root gateway's builds outside the checkout."""
    storage = config.from_mapping({}).storage
    socket = walk.checkout / "var" / "gateway.sock"
    builds = config.default_build_dir(dataclasses.replace(storage, control_socket=socket))
    if not builds.is_relative_to(walk.checkout):
        remove_tree(builds)


@pytest.mark.slow
def test_readme_two_commands_and_quickstart_then_the_longer_walk(tmp_path: Path) -> None:
    walk = Walk(tmp_path)
    try:
        gateway = readme_walk(walk)
        first = True
        for block in blocks(DOCS / "quickstart.md"):
            walk.run(block, cwd=walk.checkout if first else None)
            first = False
            if "reload" in block.options:
                wait_reloaded(gateway, gateway.workers)  # type: ignore[attr-defined]
        walk.close()
        assert "Traceback" not in "".join(gateway.lines)
    finally:
        walk.close()
        remove_default_build_dir(walk)


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="the walk above already runs as a normal user")
def test_readme_quickstart_as_a_normal_user() -> None:
    """The tests run as root in CI; the Quickstart must work as it is for anyone else too
    (deploys then run as the gateway's own user, its builds in var/builds)."""
    base = Path(tempfile.mkdtemp(prefix="gateway-docs-"))  # reachable by nobody
    base.chmod(0o755)
    nobody = pwd.getpwnam("nobody")
    walk = Walk(base, user=(nobody.pw_uid, nobody.pw_gid))
    try:
        gateway = readme_walk(walk)
        assert (walk.checkout / "var" / "builds").is_dir()
        walk.close()
        assert "Traceback" not in "".join(gateway.lines)
    finally:
        walk.close()
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.slow
def test_the_cluster_recipe_on_one_host(tmp_path: Path) -> None:
    """docs/cluster.md's recipe as written: PostgreSQL role and database, two nodes, HAProxy,
    a push and a clone through it, a node stopped while the other serves."""
    require_tools()
    server = PostgresServer(require_postgres()).start()
    walk = Walk(tmp_path, ports=("2223", "2224", "8081", "8082"), values={"5432": str(server.port)})
    walk.shim(
        "sudo",
        '[ "$1" = -u ] && [ "$2" = postgres ] || { echo "sudo: only -u postgres" >&2; exit 64; }\n'
        f"shift 2\nexport PGHOST=127.0.0.1 PGPORT={server.port} PGUSER={SUPERUSER} "
        'PGDATABASE=postgres\nexec "$@"\n',
    )
    gateway_install = blocks(README, "serve-command")[0]
    install = gateway_install.text.replace(" && .venv/bin/git-gateway serve", "")
    try:
        walk.run(Block("README.md", install), cwd=walk.checkout)
        first = True
        for block in blocks(DOCS / "cluster.md"):
            if "background" not in block.options:
                walk.run(block, cwd=walk.checkout if first else None)
                first = False
                continue
            walk.start(block).wait_for(r"event=listening address=127\.0\.0\.1:\d+")
    finally:
        walk.close()
        pidfile = walk.checkout / "cluster" / "haproxy.pid"
        if pidfile.exists():  # the recipe stops it; a failed run must not leave it behind
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pidfile.read_text().split()[0]), signal.SIGTERM)
        server.remove()


def test_the_readme_test_command_is_what_ci_runs() -> None:
    [command] = blocks(README, "test-command")
    assert command.text.strip().endswith("&& .venv/bin/python -m pytest")
    assert "requirements/test.lock" in command.text and "--require-hashes" in command.text
    ci = (REPO_ROOT / ".ci" / "run").read_text()
    assert "<!-- test-command -->" in ci  # .ci/run takes the command from the README


def test_readme_fits_on_a_few_screens() -> None:
    assert len(README.read_text().splitlines()) <= 250


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_links_stay_in_the_repository_or_go_to_public_urls(page: Path) -> None:
    text = page.read_text()
    assert "../shared" not in text, "../shared is not part of a clone"
    for match in _LINK.finditer(text):
        target = match.group(1) or match.group(2)
        if target.startswith(("http://", "https://")):
            host = re.sub(r"^https?://([^/:]+).*$", r"\1", target)
            assert host not in ("localhost", "127.0.0.1", "::1"), (page.name, target)
            assert "." in host, (page.name, target)
            continue
        assert not target.startswith(("/", "file:")), (page.name, target)
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        assert resolved.is_relative_to(REPO_ROOT) and resolved.exists(), (page.name, target)
        if anchor and resolved.suffix == ".md":
            anchors = {_slug(h) for h in _HEADING.findall(resolved.read_text())}
            assert anchor in anchors, (page.name, target)


@pytest.mark.parametrize(
    ("shown", "printed", "matches"),
    [
        ("deploy #1 succeeded in 0.1s.", "deploy #12 succeeded in 3.25s.", True),
        ('Hi ... "laptop" (SHA256:...).', 'Hi alice! You are x "laptop" (SHA256:a).', True),
        ("deploying version 1.0", "deploying version 1.0 extra", False),
    ],
)  # fmt: skip
def test_shown_output_matches_printed_lines(shown: str, printed: str, matches: bool) -> None:
    assert bool(pattern(shown).fullmatch(printed)) is matches
