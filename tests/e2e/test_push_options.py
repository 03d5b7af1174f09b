"""Push options with real `git push -o`: skip, detach, attach, notes, and what is refused."""

from __future__ import annotations

import json
import os

import pytest

from tests.e2e.test_deploys import deploys, make_client, new_app
from tests.helpers import (
    DEPLOY_PYTHON,
    PIPELINE,
    Client,
    server_refs,
)

KNOWN = "known push options: deploy.skip, deploy.detach, deploy.attach, deploy.note=TEXT"


@pytest.fixture(scope="module")
def gw(module_gateways):
    return module_gateways(
        '[apps.optgate]\nmode = "gate"\n[apps.optdetached]\nmode = "detached"\n',
        name="options",
        deploy={"command": [DEPLOY_PYTHON, str(PIPELINE)], "timeout": 60},
    )


@pytest.fixture
def dev(gw, admin, tmp_path) -> Client:
    return make_client(gw, admin, tmp_path)


def remote_lines(stderr: str) -> list[str]:
    return [
        line.removeprefix("remote: ").rstrip()
        for line in stderr.splitlines()
        if line.startswith("remote:")
    ]


def test_skip_stores_the_refs_without_deploying(gw, admin, dev, tmp_path):
    app = new_app(admin, dev)
    work = dev.new_repo(tmp_path / "work")
    head = dev.git("rev-parse", "HEAD", cwd=work).stdout.strip()
    result = dev.git("push", "-o", "deploy.skip", dev.url(app), "main", cwd=work)
    assert remote_lines(result.stderr) == [
        f"main is now {head[:8]}, not deployed (deploy.skip); the next push without it deploys"
    ]
    assert server_refs(gw.repo(app))["refs/heads/main"] == head
    assert deploys(admin, app) == []
    events = json.loads(admin.ok("audit", "--app", app, "--json"))
    [event] = [e for e in events if e["event"] == "push"]
    assert event["detail"]["options"] == ["deploy.skip"]
    # The next push without it deploys.
    dev.commit(work, {"b.txt": "b\n"}, "second")
    dev.git("push", "-q", dev.url(app), "main", cwd=work)
    [record] = deploys(admin, app)
    assert record["status"] == "succeeded" and record["subject"] == "second"


def test_detach_returns_at_once_on_an_attached_app(gw, admin, dev, tmp_path, exchange):
    app = new_app(admin, dev)
    fifo = exchange / "gate.fifo"
    os.mkfifo(fifo)
    work = dev.new_repo(tmp_path / "work", {"wait-fifo": str(fifo)})
    # The pipeline blocks on the FIFO until the test opens it: the push returning first is
    # the proof that it did not wait.
    result = dev.git("push", "-o", "deploy.detach", dev.url(app), "main", cwd=work)
    [record] = deploys(admin, app)
    assert record["mode"] == "detached" and record["status"] in ("queued", "running")
    [line] = remote_lines(result.stderr)
    assert f"deploy #{record['id']} of {app} queued" in line and "the push is done" in line
    assert f"logs {app} {record['id']} --follow" in line
    with open(fifo, "w") as release:  # blocks until the pipeline reads: it is running
        release.write("go\n")
    follow = dev.ssh("logs", app, str(record["id"]), "--follow")
    assert follow.returncode == 0 and "released by the test" in follow.stdout


def test_attach_waits_on_a_detached_app(gw, admin, dev, tmp_path):
    app = new_app(admin, dev, "optdetached")
    work = dev.new_repo(tmp_path / "work")
    plain = dev.git("push", dev.url(app), "main", cwd=work)
    assert "the push is done" in plain.stderr
    dev.commit(work, {"b.txt": "b\n"}, "second")
    result = dev.git("push", "-o", "deploy.attach", dev.url(app), "main", cwd=work)
    assert "remote: deploying " in result.stderr and "succeeded in" in result.stderr
    assert [d["mode"] for d in deploys(admin, app)] == ["attached", "detached"]


def test_note_is_recorded_listed_and_given_to_the_pipeline(gw, admin, dev, tmp_path, exchange):
    app = new_app(admin, dev)
    dump = exchange / "env.json"
    work = dev.new_repo(tmp_path / "work", {"env-dump": str(dump)})
    note = "release 42: ünïcode, \"quotes\" & 'more'"
    dev.git("push", "-q", "-o", f"deploy.note={note}", dev.url(app), "main", cwd=work)
    [record] = deploys(admin, app)
    assert record["note"] == note
    assert json.loads(dump.read_text())["env"]["GATEWAY_DEPLOY_NOTE"] == note
    listing = dev.ssh("deploys", app).stdout
    assert "NOTE" in listing.splitlines()[0] and note in listing
    assert note in admin.ok("deploy", "list", app)
    # A push without a note records none.
    dev.commit(work, {"b.txt": "b\n"}, "second")
    dev.git("push", "-q", dev.url(app), "main", cwd=work)
    assert [d["note"] for d in deploys(admin, app)] == [None, note]


def test_gate_mode_refuses_skip_and_detach_but_accepts_attach(gw, admin, dev, tmp_path):
    app = new_app(admin, dev, "optgate")
    work = dev.new_repo(tmp_path / "work")
    for option in ("deploy.skip", "deploy.detach"):
        result = dev.git("push", "-o", option, dev.url(app), "main", cwd=work, check=False)
        assert result.returncode != 0
        assert remote_lines(result.stderr) == [
            f"push refused: {option} is not available for {app}: it deploys in gate mode, "
            "main moves only after a successful deploy"
        ]
        assert "refs/heads/main" not in server_refs(gw.repo(app))
    result = dev.git(
        "push", "-o", "deploy.attach", "-o", "deploy.note=gated", dev.url(app), "main", cwd=work
    )
    assert "gate mode" in result.stderr and "succeeded" in result.stderr
    [record] = deploys(admin, app)
    assert record["mode"] == "gate" and record["note"] == "gated"
    # Outside the deploy branch, gate mode has nothing to enforce.
    dev.git("push", "-q", "-o", "deploy.skip", dev.url(app), "main:topic", cwd=work)
    assert "refs/heads/topic" in server_refs(gw.repo(app))


HOSTILE = {
    "unknown": (["ci.skip"], f"unknown push option 'ci.skip'; {KNOWN}"),
    "unknown_with_escape": (["\x1b[2Jwipe"], f"unknown push option '?[2Jwipe'; {KNOWN}"),
    "note_with_escape": (
        ["deploy.note=ok\x1b]0;owned\x07"],
        "deploy.note may hold printable characters only, on one line",
    ),
    "note_with_bidi_override": (
        ["deploy.note=abc\u202edcba"],
        "deploy.note may hold printable characters only, on one line",
    ),
    "note_too_long": (
        ["deploy.note=" + "x" * 201],
        "deploy.note is 201 characters long; at most 200",
    ),
    "option_too_long": (
        ["deploy.note=" + "x" * 10_000],
        "push option too long: deploy.note=xxxxxxxxxxxxxxxxxxxxxxxxxxxx...",
    ),
    "empty_note": (
        ["deploy.note="],
        "deploy.note needs a text: -o deploy.note='what this deploy is'",
    ),
    "note_twice": (["deploy.note=a", "deploy.note=b"], "deploy.note given twice"),
    "flag_with_value": (["deploy.skip=yes"], "deploy.skip takes no value: -o deploy.skip"),
    "attach_and_detach": (
        ["deploy.attach", "deploy.detach"],
        "deploy.detach and deploy.attach contradict each other: give one",
    ),
    "skip_and_note": (
        ["deploy.skip", "deploy.note=x"],
        "deploy.skip deploys nothing: it cannot go with other deploy options",
    ),
    "too_many": (["deploy.attach"] * 100, f"too many push options (at most 16); {KNOWN}"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_regression_bad_push_options_refuse_the_push_before_any_ref_moves(
    gw, admin, dev, tmp_path, case
):
    options, message = HOSTILE[case]
    app = new_app(admin, dev)
    work = dev.new_repo(tmp_path / "work")
    first = dev.git("rev-parse", "HEAD", cwd=work).stdout.strip()
    dev.git("push", "-q", dev.url(app), "main", cwd=work)
    dev.commit(work, {"b.txt": "b\n"}, "second")
    args = [arg for option in options for arg in ("-o", option)]
    result = dev.git("push", *args, dev.url(app), "main", "main:other", cwd=work, check=False)
    assert result.returncode != 0
    assert remote_lines(result.stderr) == [f"push refused: {message}"]
    assert "pre-receive hook declined" in result.stderr
    assert server_refs(gw.repo(app)) == {"refs/heads/main": first}
    assert len(deploys(admin, app)) == 1
    assert "Traceback" not in result.stderr
