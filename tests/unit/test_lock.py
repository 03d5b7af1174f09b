"""The dependency locks: complete, hashed, consistent with pyproject.toml, and installed."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
LOCKS = ROOT / "requirements"
_PIN = re.compile(r"^([A-Za-z0-9_.-]+)==([^\s;\\]+)\s*(?:;\s*([^\\]+?))?\s*\\?$")


def pins(lock: str) -> dict[tuple[str, str | None], tuple[str, int]]:
    """(name, marker) -> (version, number of hashes), from a `uv pip compile` lock."""
    found: dict[tuple[str, str | None], tuple[str, int]] = {}
    current: tuple[str, str | None] | None = None
    for line in (LOCKS / lock).read_text().splitlines():
        if match := _PIN.match(line):
            name, version, marker = match.groups()
            current = (canonicalize_name(name), marker)
            found[current] = (version, 0)
        elif line.strip().startswith("--hash=sha256:") and current is not None:
            version, hashes = found[current]
            found[current] = (version, hashes + 1)
        elif line.strip() and not line.lstrip().startswith("#"):
            pytest.fail(f"{lock}: unexpected line {line!r}")
    return found


def applies(marker: str | None) -> bool:
    return marker is None or Marker(marker).evaluate()


@pytest.mark.parametrize("lock", ["runtime.lock", "test.lock"])
def test_every_pin_is_exact_and_hashed(lock):
    entries = pins(lock)
    assert entries
    assert all(hashes > 0 for _, hashes in entries.values())


def test_runtime_lock_is_the_test_locks_versions():
    test = pins("test.lock")
    for key, (version, _) in pins("runtime.lock").items():
        assert test[key][0] == version, key


def test_the_locks_satisfy_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {"runtime.lock": project["dependencies"]}
    wanted["test.lock"] = project["dependencies"] + [
        r for r in project["optional-dependencies"]["test"] if not r.startswith("git-gateway")
    ]
    for lock, requirements in wanted.items():
        entries = pins(lock)
        for text in requirements:
            requirement = Requirement(text)
            name = canonicalize_name(requirement.name)
            versions = [v for (n, m), (v, _) in entries.items() if n == name and applies(m)]
            assert versions, f"{lock} lacks {name}"
            assert all(requirement.specifier.contains(v) for v in versions), (lock, text)


def test_what_is_installed_is_the_lock():
    """A drifted environment (an unlocked `pip install`) is told here, before it misleads."""
    for (name, marker), (version, _) in pins("test.lock").items():
        if applies(marker):
            assert metadata.version(name) == version, (
                f"{name} {metadata.version(name)} is installed, the lock says {version}: "
                "reinstall with the README's test command"
            )
