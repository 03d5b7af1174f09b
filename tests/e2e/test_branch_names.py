"""Any branch name git accepts can be pushed, listed and used as a deploy branch; names git
refuses get one clear line."""

from __future__ import annotations

import json

import pytest

from tests.helpers import run, server_refs, unique

ODD_BRANCHES = ["feature/a,b", "été", "日本"]


def test_regression_any_valid_branch_name_can_be_pushed(owner, app, server, tmp_path):
    work = owner.new_repo(tmp_path / "work")
    for branch in ODD_BRANCHES:
        owner.git("branch", branch, cwd=work)
    result = owner.git("push", owner.url(app), "main", *ODD_BRANCHES, cwd=work, check=False)
    assert result.returncode == 0, result.stderr
    refs = server_refs(server.repo(app))
    listed = owner.git("ls-remote", owner.url(app)).stdout
    for branch in ODD_BRANCHES:
        assert f"refs/heads/{branch}" in refs
        assert f"refs/heads/{branch}" in listed


@pytest.mark.parametrize("branch", ODD_BRANCHES)
def test_regression_app_deploy_branch_may_be_any_valid_name(admin, owner, server, branch):
    name = unique("branchapp")
    out = admin.ok("app", "create", name, "--owner", owner.name, "--branch", branch)
    assert f"deploy branch {branch}" in out
    head = run(["git", "symbolic-ref", "HEAD"], cwd=server.repo(name), check=True).stdout
    assert head.strip() == f"refs/heads/{branch}"
    apps = {a["name"]: a for a in json.loads(admin.ok("app", "list", "--json"))}
    assert apps[name]["deploy_branch"] == branch


@pytest.mark.parametrize(
    ("branch", "why"),
    [
        ("a..b", "no '..'"),
        ("-rf", "starts with '-'"),
        ("x.lock", ".lock"),
        ("a\u202eb", "invisible"),
    ],
)
def test_invalid_deploy_branch_is_refused_with_one_line(admin, owner, server, branch, why):
    name = unique("badbranch")
    code, out, err = admin("app", "create", name, "--owner", owner.name, f"--branch={branch}")
    assert code == 1 and out == ""
    assert err.startswith("error: invalid branch name '") and why in err
    assert err.count("\n") == 1
    assert not server.repo(name).exists()
    assert name not in admin.ok("app", "list")
