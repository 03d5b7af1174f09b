"""Branch names follow git's own rules, checked against the real `git check-ref-format`."""

from __future__ import annotations

import os
import subprocess
import unicodedata

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.errors import InvalidName
from gateway.names import MAX_BRANCH_BYTES, branch_name, branch_problem, ref_name


@pytest.fixture(scope="module")
def outside_repo(tmp_path_factory):
    """A directory outside any repository, so `--branch` cannot expand @{-N} from ours."""
    path = tmp_path_factory.mktemp("norepo")
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(path),
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CEILING_DIRECTORIES": str(path.parent),
    }
    return path, env


def git_accepts(name: str, where) -> bool:
    path, env = where
    result = subprocess.run(
        ["git", "check-ref-format", "--branch", name],
        cwd=path,
        env=env,
        capture_output=True,
        timeout=10,
        check=False,
    )
    return result.returncode == 0


# Names built from the characters the rules are about, plus any letters.
names = st.lists(
    st.one_of(
        st.sampled_from([*"ab/.-@{}~^:?*[\\ ,+_#!é日\t\x7f", ".lock", "..", "//", "@{", "HEAD"]),
        st.characters(blacklist_characters="\x00", blacklist_categories=("Cs", "Cn", "Co")),
    ),
    min_size=1,
    max_size=12,
).map("".join)


def has_extra_restriction(name: str) -> bool:
    """What we refuse on top of git: invisible and exotic-space characters, very long names."""
    return len(name.encode()) > MAX_BRANCH_BYTES or any(
        not c.isascii()
        and unicodedata.category(c) in {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp", "Zs"}
        for c in name
    )


@given(names)
@settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_branch_rules_match_git(outside_repo, name):
    ours = branch_problem(name) is None
    if has_extra_restriction(name):
        assert not ours
        return
    assert ours == git_accepts(name, outside_repo), (name, branch_problem(name))


@pytest.mark.parametrize(
    "name",
    ["main", "feature/a,b", "été", "日本", "release/v1.2+build", "a@b", "user/x_y-z", "@"],
)
def test_valid_names(name, outside_repo):
    assert branch_name(name) == name
    assert git_accepts(name, outside_repo)


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("", "empty"),
        ("-x", "starts with '-'"),
        ("HEAD", "reserved"),
        ("a..b", "'..'"),
        ("a b", "no spaces"),
        ("a:b", "no spaces"),
        ("a/", "slash"),
        ("a//b", "slash"),
        ("a.", "'.' at the end"),
        ("a/.b", "starting with '.'"),
        ("x.lock", ".lock"),
        ("x@{1}", "'@{'"),
        ("a\u202eb", "invisible"),
        ("a\u00a0b", "space"),
        ("x" * 256, "longer than 255 bytes"),
    ],
)
def test_invalid_names_get_one_clear_line(name, why):
    with pytest.raises(InvalidName) as caught:
        branch_name(name)
    message = str(caught.value)
    assert why in message and "\n" not in message
    assert message.startswith("invalid branch name '")


def test_full_ref_names():
    assert ref_name("refs/heads/feature/a,b") == "refs/heads/feature/a,b"
    assert ref_name("refs/tags/été") == "refs/tags/été"
    for bad in ("refs/heads/a..b", "heads/x", "refs/heads/x.lock", "refs/heads/a b"):
        with pytest.raises(InvalidName):
            ref_name(bad)
