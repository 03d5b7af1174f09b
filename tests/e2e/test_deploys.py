"""Push-to-deploy with real `git push`: streaming, modes, queueing, timeouts, cancel, webhooks."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.helpers import (
    DEPLOY_PYTHON,
    PIPELINE,
    Admin,
    Client,
    LiveProcess,
    ServeProcess,
    fsck,
    keygen,
    registered_user,
    run,
    server_refs,
    unique,
    write_config,
)

SECRET = "s3cret-for-tests"


class Receiver:
    """A webhook receiver on 127.0.0.1: records requests; answers from a per-path script."""

    def __init__(self) -> None:
        self.requests: list[dict[str, object]] = []
        self.answers: dict[str, list[int]] = {}
        self.received = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with receiver.received:
                    receiver.requests.append(
                        {"path": self.path, "headers": dict(self.headers), "body": body}
                    )
                    script = receiver.answers.get(self.path, [])
                    code = script.pop(0) if script else 200
                    receiver.received.notify_all()
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def wait_for(self, path: str, count: int) -> list[dict[str, object]]:
        with self.received:
            assert self.received.wait_for(
                lambda: len([r for r in self.requests if r["path"] == path]) >= count, timeout=60
            )
            return [r for r in self.requests if r["path"] == path]


@pytest.fixture(scope="module")
def receiver():
    r = Receiver()
    yield r
    r.server.shutdown()


@pytest.fixture(scope="module")
def gw(module_gateways, receiver):
    # Per-app overrides for the apps these tests create.
    return module_gateways(
        '[apps.gated]\nmode = "gate"\n'
        + '[apps.detached]\nmode = "detached"\n'
        + '[apps.queued]\nmode = "detached"\n'
        + "[apps.slow]\ntimeout = 2\n"
        + f'[apps.hooked]\nwebhook_url = "{receiver.url("/hook")}"\nwebhook_secret = "{SECRET}"\n'
        + "[apps.command]\ncommand = []\n"
        + '[apps.fromtree]\ncommand = ["./deploy"]\n'
        + '[apps.linkout]\ncommand = ["./deploy"]\n'
        + f'[apps.accepted]\nwebhook_url = "{receiver.url("/accepted")}"\n'
        + f'webhook_secret = "{SECRET}"\n',
        name="deploys",
        deploy={
            "command": [DEPLOY_PYTHON, str(PIPELINE)],
            "timeout": 60,
            "log_limit": "16K",
            "webhook_backoff": 0.05,
            "webhook_attempts": 3,
        },
        http={"listen": "127.0.0.1:0"},
        cluster={"node_name": "deploys-node"},
    )


def make_client(gw, admin, tmp_path, prefix="dev") -> Client:
    return registered_user(gw, admin, tmp_path, prefix)


@pytest.fixture
def dev(gw, tmp_path) -> Client:
    return gw.user("dev", tmp_path)


def new_app(admin: Admin, owner: Client, name: str | None = None, branch: str = "main") -> str:
    name = name or unique("web")
    admin.ok("app", "create", name, "--owner", owner.name, "--branch", branch)
    return name


def deploys(admin: Admin, app: str) -> list[dict[str, object]]:
    return json.loads(admin.ok("deploy", "list", app, "--json"))


def wait_for_condition(predicate, what: str, timeout: float = 30) -> None:
    """Poll a condition outside the server (here: the kernel's process table)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.05)


def deploy_processes(app: str, deploy_id: int) -> list[int]:
    """Host pids of live processes that belong to a deploy (found by the environment every
    deploy process inherits: the sandbox's own pids mean nothing out here)."""
    marks = (f"GATEWAY_APP={app}".encode(), f"GATEWAY_DEPLOY_ID={deploy_id}".encode())
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if all(mark in env for mark in marks) and alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    """True if the process runs (a zombie waiting to be reaped by init is dead)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def push(client: Client, work: Path, app: str, *refspecs: str) -> LiveProcess:
    return LiveProcess(
        ["git", "push", client.url(app), *(refspecs or ("main",))], env=client.env, cwd=work
    )


def test_attached_deploy_streams_live(gw, admin, dev, tmp_path, exchange):
    app = new_app(admin, dev)
    fifo = exchange / "gate.fifo"
    os.mkfifo(fifo)
    work = dev.new_repo(tmp_path / "work", {"wait-fifo": str(fifo), "app.txt": "v1\n"})
    pushing = push(dev, work, app)
    pushing.wait_for(r"remote: deploy #\d+ of .* started\. Ctrl-C stops watching")
    pushing.wait_for(r"remote: deploying ")
    pushing.wait_for(r"remote: waiting for the test")
    # The pipeline is blocked until the pusher has seen its line: that is liveness.
    assert pushing.proc.poll() is None
    with open(fifo, "w") as release:
        release.write("go\n")
    assert pushing.finish() == 0, pushing.stderr
    out = pushing.stderr
    assert "remote: released by the test" in out
    assert out.index("waiting for the test") < out.index("released by the test")
    assert "succeeded in" in out and f"logs {app} " in out
    [record] = deploys(admin, app)
    assert record["status"] == "succeeded" and record["exit_code"] == 0
    assert record["pusher"] == dev.name and record["subject"] == "first"
    assert record["key_fingerprint"].startswith("SHA256:")
    assert record["old_sha"] == "0" * 40 and record["mode"] == "attached"
    fsck(gw.repo(app))


def test_failed_deploy_fails_the_push_but_keeps_the_refs(gw, admin, dev, tmp_path):
    app = new_app(admin, dev)
    work = dev.new_repo(tmp_path / "work", {"exit": "3", "stderr": "build error on stderr"})
    head = dev.git("rev-parse", "HEAD", cwd=work).stdout.strip()
    result = dev.git("push", dev.url(app), "main", cwd=work, check=False)
    assert result.returncode == 1
    assert "remote: build error on stderr" in result.stderr
    assert "FAILED (exit code 3)" in result.stderr and "The push itself is stored" in result.stderr
    assert server_refs(gw.repo(app))["refs/heads/main"] == head
    [record] = deploys(admin, app)
    assert (record["status"], record["exit_code"]) == ("failed", 3)
    fsck(gw.repo(app))


def test_timeout_kills_the_process_group(gw, admin, dev, tmp_path, exchange):
    app = new_app(admin, dev, "slow")
    pids = exchange / "pids"
    work = dev.new_repo(tmp_path / "work", {"hang": str(pids)})
    result = dev.git("push", dev.url(app), "main", cwd=work, check=False)
    assert result.returncode == 1
    assert "TIMED OUT (timed out after 2.0s; killed)" in result.stderr
    [record] = deploys(admin, app)
    assert record["status"] == "timed_out"
    assert len(pids.read_text().split()) == 2  # the pipeline and its child were running...
    assert deploy_processes(app, record["id"]) == []  # ...and are gone


def test_other_branch_is_stored_not_deployed(gw, admin, dev, tmp_path):
    app = new_app(admin, dev)
    work = dev.new_repo(tmp_path / "work")
    result = dev.git("push", dev.url(app), "main:feature", "main:topic", cwd=work)
    lines = [line for line in result.stderr.splitlines() if line.startswith("remote:")]
    assert len(lines) == 1
    assert "'feature', 'topic' stored, not deployed" in lines[0]
    assert "git push <remote> HEAD:main" in lines[0]
    assert deploys(admin, app) == []
    assert "refs/heads/feature" in server_refs(gw.repo(app))
    # Deleting the deploy branch deploys nothing either.
    dev.git("push", "-q", dev.url(app), "main", cwd=work)
    assert len(deploys(admin, app)) == 1
    result = dev.git("push", dev.url(app), ":main", cwd=work)
    assert "nothing deployed" in result.stderr
    assert len(deploys(admin, app)) == 1


def test_deploy_branch_per_app(gw, admin, dev, tmp_path):
    app = new_app(admin, dev, branch="production")
    work = dev.new_repo(tmp_path / "work")
    result = dev.git("push", dev.url(app), "main", cwd=work)
    assert "HEAD:production" in result.stderr
    dev.git("push", "-q", dev.url(app), "main:production", cwd=work)
    assert deploys(admin, app)[0]["ref"] == "refs/heads/production"


def test_command_env_and_export(gw, admin, dev, tmp_path, exchange):
    app = new_app(admin, dev)
    dump = exchange / "env.json"
    work = dev.new_repo(tmp_path / "work", {"env-dump": str(dump), "src/main.py": "print()\n"})
    (work / "run.sh").write_text("#!/bin/sh\n")
    (work / "run.sh").chmod(0o755)
    os.symlink("src/main.py", work / "link")
    dev.commit(work, {}, "with exec bit and symlink")
    dev.env["GIT_SSH_COMMAND"] += " -o SetEnv=FOO=from-client"
    dev.git("push", "-q", dev.url(app), "main", cwd=work)
    seen = json.loads(dump.read_text())
    env = seen["env"]
    [record] = deploys(admin, app)
    assert {k for k in env if k.startswith("GATEWAY_")} == {
        "GATEWAY_APP",
        "GATEWAY_REF",
        "GATEWAY_OLD_SHA",
        "GATEWAY_NEW_SHA",
        "GATEWAY_USER",
        "GATEWAY_KEY_FINGERPRINT",
        "GATEWAY_DEPLOY_ID",
        "GATEWAY_DEPLOY_NOTE",
    }
    assert env["GATEWAY_APP"] == app and env["GATEWAY_REF"] == "refs/heads/main"
    assert env["GATEWAY_NEW_SHA"] == record["new_sha"]
    assert env["GATEWAY_DEPLOY_ID"] == str(record["id"])
    assert env["GATEWAY_USER"] == dev.name
    assert "FOO" not in env and not any(k.startswith("GIT_") for k in env)
    # Nothing of the gateway's: no hook token, control socket or repository path.
    text = json.dumps(env)
    for secret in ("HOOK", str(gw.config.storage.control_socket), str(gw.repos)):
        assert secret not in text
    assert seen["cwd"] == env["HOME"] == "/app"
    assert seen["files"] == {"env-dump": "file", "link": "link", "run.sh": "exec", "src": "exec"}
    assert list(gw.config.deploy.build_dir.iterdir()) == []  # the export is removed afterwards


def test_gate_mode_rejects_with_refs_unchanged(gw, admin, dev, tmp_path):
    app = new_app(admin, dev, "gated")
    work = dev.new_repo(tmp_path / "work", {"app.txt": "good\n"})
    good = dev.git("rev-parse", "HEAD", cwd=work).stdout.strip()
    result = dev.git("push", dev.url(app), "main", cwd=work)
    assert "gate mode" in result.stderr and "succeeded" in result.stderr
    assert server_refs(gw.repo(app))["refs/heads/main"] == good
    bad = dev.commit(work, {"exit": "1"}, "broken")
    result = dev.git("push", dev.url(app), "main", cwd=work, check=False)
    assert result.returncode != 0
    assert "[remote rejected] main -> main (pre-receive hook declined)" in result.stderr
    assert "push rejected, main unchanged" in result.stderr
    assert server_refs(gw.repo(app))["refs/heads/main"] == good
    missing = run(["git", "cat-file", "-e", bad], cwd=gw.repo(app))
    assert missing.returncode != 0  # the pushed objects never left quarantine
    statuses = [d["status"] for d in deploys(admin, app)]
    assert statuses == ["failed", "succeeded"]
    fsck(gw.repo(app))


def test_detached_then_follow(gw, admin, dev, tmp_path, exchange):
    app = new_app(admin, dev, "detached")
    fifo = exchange / "gate.fifo"
    os.mkfifo(fifo)
    work = dev.new_repo(tmp_path / "work", {"wait-fifo": str(fifo)})
    result = dev.git("push", dev.url(app), "main", cwd=work)  # returns while the deploy waits
    assert "queued" in result.stderr and "the push is done" in result.stderr
    [record] = deploys(admin, app)
    assert record["status"] in ("queued", "running")
    following = LiveProcess(
        [*dev.ssh_base, "-T", "git@127.0.0.1", "logs", app, str(record["id"]), "--follow"],
        env=dev.env,
    )
    with open(fifo, "w") as release:
        release.write("go\n")
    assert following.finish() == 0
    text = "".join(following.stdout)
    assert "waiting for the test" in text and "released by the test" in text and "done" in text
    assert "succeeded" in text
    # A failing deploy: --follow exits non-zero.
    dev.commit(work, {"exit": "2", "wait-fifo": ""}, "fails")
    (work / "wait-fifo").unlink()
    dev.commit(work, {}, "no fifo")
    dev.git("push", "-q", dev.url(app), "main", cwd=work)
    latest = deploys(admin, app)[0]
    follow = dev.ssh("logs", app, "--follow")
    assert follow.returncode == 1, follow
    assert f"deploy #{latest['id']} FAILED (exit code 2)" in follow.stdout


def test_queue_and_supersede(gw, admin, dev, tmp_path, exchange):
    app = new_app(admin, dev, "queued")
    fifo = exchange / "gate.fifo"
    os.mkfifo(fifo)
    work = dev.new_repo(tmp_path / "work", {"wait-fifo": str(fifo)})
    dev.git("push", "-q", dev.url(app), "main", cwd=work)
    first = deploys(admin, app)[0]
    (work / "wait-fifo").unlink()
    for n in (2, 3):
        dev.commit(work, {"n": f"{n}\n"}, f"push {n}")
        dev.git("push", "-q", dev.url(app), "main", cwd=work)
    third, second, again_first = deploys(admin, app)
    assert again_first["id"] == first["id"]
    assert second["status"] == "cancelled" and second["superseded_by"] == third["id"]
    assert f"superseded by #{third['id']}" in second["reason"]
    assert third["status"] == "queued"
    # The operator sees it wait (gateway_deploys_queued, gateway_deploy_queue_oldest_seconds).
    metrics = gw.gateway.metrics
    gw.wait_until(lambda: metrics.deploys_queued._value.get() >= 1)
    gw.wait_until(lambda: metrics.deploy_queue_oldest._value.get() > 0)
    with open(fifo, "w") as release:
        release.write("go\n")
    follow = dev.ssh("logs", app, str(third["id"]), "--follow")
    assert follow.returncode == 0, follow
    statuses = {d["id"]: d["status"] for d in deploys(admin, app)}
    assert statuses == {
        first["id"]: "succeeded",
        second["id"]: "cancelled",
        third["id"]: "succeeded",
    }


def test_apps_deploy_in_parallel(gw, admin, dev, tmp_path, exchange):
    fifos, pushes = [], []
    for index in range(2):
        app = new_app(admin, dev)
        fifo = exchange / f"gate{index}.fifo"
        os.mkfifo(fifo)
        fifos.append(fifo)
        work = dev.new_repo(tmp_path / f"work{index}", {"wait-fifo": str(fifo)})
        pushes.append(push(dev, work, app))
    for pushing in pushes:  # both pipelines run at the same time
        pushing.wait_for(r"remote: waiting for the test")
    for fifo in fifos:
        with open(fifo, "w") as release:
            release.write("go\n")
    assert all(p.finish() == 0 for p in pushes)


def test_ctrl_c_leaves_the_deploy_running(gw, admin, dev, tmp_path, exchange):
    app = new_app(admin, dev)
    fifo = exchange / "gate.fifo"
    os.mkfifo(fifo)
    work = dev.new_repo(tmp_path / "work", {"wait-fifo": str(fifo)})
    pushing = push(dev, work, app)
    pushing.wait_for(r"remote: waiting for the test")
    pushing.kill()  # the pusher's Ctrl-C: the client process dies
    [record] = deploys(admin, app)
    assert record["status"] == "running"
    with open(fifo, "w") as release:
        release.write("go\n")
    follow = dev.ssh("logs", app, str(record["id"]), "--follow")
    assert follow.returncode == 0 and "released by the test" in follow.stdout
    assert deploys(admin, app)[0]["status"] == "succeeded"
    assert "refs/heads/main" in server_refs(gw.repo(app))
    fsck(gw.repo(app))


def test_cancel_over_ssh_needs_write(gw, admin, dev, tmp_path, exchange):
    app = new_app(admin, dev)
    fifo = exchange / "gate.fifo"
    os.mkfifo(fifo)
    work = dev.new_repo(tmp_path / "work", {"wait-fifo": str(fifo)})
    pushing = push(dev, work, app)
    pushing.wait_for(r"remote: waiting for the test")
    deploy_id = deploys(admin, app)[0]["id"]
    reader = make_client(gw, admin, tmp_path, "reader")
    admin.ok("app", "grant", app, reader.name, "read")
    denied = reader.ssh("cancel", str(deploy_id))
    assert denied.returncode == 1
    assert denied.stderr == f"error: deploy #{deploy_id} not found or access denied\n"
    listing = reader.ssh("deploys", app)
    assert (
        listing.returncode == 0
        and f"#{deploy_id}" in listing.stdout
        and "running" in listing.stdout
    )
    stranger = make_client(gw, admin, tmp_path, "stranger")
    assert stranger.ssh("deploys", app).stderr.endswith("not found or access denied\n")
    cancelled = dev.ssh("cancel", str(deploy_id))
    assert cancelled.returncode == 0 and "cancelled" in cancelled.stdout
    assert pushing.finish() == 1
    assert f"cancelled by {dev.name}" in pushing.stderr
    record = deploys(admin, app)[0]
    assert (record["status"], record["reason"]) == ("cancelled", f"cancelled by {dev.name}")
    assert dev.ssh("cancel", str(deploy_id)).stderr.startswith("error: deploy")


def test_logs_and_cli_views(gw, admin, dev, tmp_path):
    app = new_app(admin, dev)
    work = dev.new_repo(tmp_path / "work", {"spam": "400"})  # ~36 KB of output, 16K kept
    dev.git("push", "-q", dev.url(app), "main", cwd=work)
    record = deploys(admin, app)[0]
    code, text, _ = admin("deploy", "logs", str(record["id"]))
    assert code == 0
    assert (
        "bytes of earlier output cut" in text
        and "line 000399" in text
        and "line 000000" not in text
    )
    assert len(text.encode()) < 20 * 1024
    assert "succeeded" in text.splitlines()[-1]
    over_ssh = dev.ssh("logs", app)
    assert over_ssh.returncode == 0 and "line 000399" in over_ssh.stdout
    shown = json.loads(admin.ok("deploy", "show", str(record["id"]), "--json"))
    assert shown["status"] == "succeeded" and shown["webhook_deliveries"] == []
    # The runner is named after [cluster] node_name (not the host name), then its process.
    assert re.fullmatch(rf"deploys-node-{os.getpid()}-[0-9a-f]{{8}}", shown["runner"])
    assert f"runner:          {shown['runner']}\n" in admin.ok("deploy", "show", str(record["id"]))
    code, _, err = admin("deploy", "cancel", str(record["id"]))
    assert code == 1 and "already ended" in err
    code, _, err = admin("deploy", "show", "999999")
    assert code == 1 and "no deploy #999999" in err


def delivered(gw, result: str) -> float:
    counter = gw.gateway.metrics.webhook_deliveries.labels(result)
    return counter._value.get()


def test_webhook_signed_delivery_with_retries(gw, admin, dev, receiver, tmp_path):
    app = new_app(admin, dev, "hooked")
    receiver.answers["/hook"] = [500, 503, 200]
    before = delivered(gw, "5xx"), delivered(gw, "2xx")
    work = dev.new_repo(tmp_path / "work")
    result = dev.git("push", dev.url(app), "main", cwd=work)
    assert "webhook attempt 1/3: HTTP 500" in result.stderr
    assert "webhook attempt 3/3: HTTP 200" in result.stderr
    calls = receiver.wait_for("/hook", 3)
    body = calls[-1]["body"]
    headers = calls[-1]["headers"]
    expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    assert headers["X-Gateway-Signature-256"] == expected
    payload = json.loads(body)
    [record] = deploys(admin, app)
    assert payload["app"] == app and payload["deploy_id"] == record["id"]
    assert payload["ref"] == "refs/heads/main" and payload["after"] == record["new_sha"]
    assert payload["before"] == "0" * 40 and payload["pusher"]["name"] == dev.name
    assert payload["clone_url"].endswith(f"/{app}.git")
    assert [c["id"] for c in payload["commits"]] == [record["new_sha"]]
    assert record["status"] == "succeeded" and record["pipeline"] == "webhook"
    shown = json.loads(admin.ok("deploy", "show", str(record["id"]), "--json"))
    attempts = [(d["attempt"], d["status_code"]) for d in shown["webhook_deliveries"]]
    assert attempts == [(1, 500), (2, 503), (3, 200)]
    # And counted for the operator (gateway_webhook_deliveries_total{result}).
    assert (delivered(gw, "5xx") - before[0], delivered(gw, "2xx") - before[1]) == (2, 1)


def test_webhook_receiver_reports_status(gw, admin, dev, receiver, tmp_path):
    app = new_app(admin, dev, "accepted")
    receiver.answers["/accepted"] = [202]
    work = dev.new_repo(tmp_path / "work")
    pushing = push(dev, work, app)
    [call] = receiver.wait_for("/accepted", 1)
    payload = json.loads(call["body"])
    url, token = payload["status_url"], payload["status_token"]

    def report(body: dict[str, object], bearer: str) -> int:
        request = urllib.request.Request(
            url,
            data=json.dumps(body).encode(),
            method="POST",
            headers={"Authorization": f"Bearer {bearer}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status
        except urllib.error.HTTPError as err:
            return err.code

    assert report({"status": "succeeded"}, "wrong-token") == 401
    pushing.wait_for(r"waiting for the receiver's status report")
    assert report({"log": "building on the receiver"}, token) == 200
    pushing.wait_for(r"remote: building on the receiver")
    # An exit code the registry cannot hold was a database error (a 500): now refused.
    assert report({"status": "failed", "exit_code": 2**40}, token) == 400
    assert report({"status": "failed", "exit_code": 7}, token) == 200
    assert pushing.finish() == 1
    assert "reported failed by the receiver" in pushing.stderr
    record = deploys(admin, app)[0]
    assert (record["status"], record["exit_code"]) == ("failed", 7)
    assert report({"status": "succeeded"}, token) == 409  # it already ended


def test_no_pipeline_configured(gw, admin, dev, tmp_path):
    app = new_app(admin, dev, "command")
    work = dev.new_repo(tmp_path / "work")
    result = dev.git("push", dev.url(app), "main", cwd=work)
    assert "no deploy pipeline is configured" in result.stderr
    assert deploys(admin, app) == []


def test_a_deploy_program_missing_from_the_tree_is_named(gw, admin, dev, tmp_path):
    """`./deploy` missing or not executable: one line naming it, the branch and the commit,
    instead of bwrap's `execvp ./deploy: No such file or directory`."""
    app = new_app(admin, dev, "fromtree")
    work = dev.new_repo(tmp_path / "work")

    def pushed() -> tuple[str, str]:
        head = dev.git("rev-parse", "HEAD", cwd=work).stdout.strip()[:8]
        result = dev.git("push", dev.url(app), "main", cwd=work, check=False)
        return head, "\n".join(line.rstrip() for line in result.stderr.splitlines()) + "\n"

    where = "in the pushed tree of branch 'main'"
    head, out = pushed()
    assert (
        f"remote: deploy command './deploy' not found {where} ({head}): add it, or change "
        f"[apps.{app}] command\n"
    ) in out
    assert "execvp" not in out and "FAILED (./deploy not found in the pushed tree)" in out
    dev.commit(work, {"deploy": "#!/bin/sh\necho deployed from the tree\n"}, "not executable")
    head, out = pushed()
    assert (
        f"remote: deploy command './deploy' is not executable {where} ({head}): "
        "run `git update-index --chmod=+x deploy`, commit and push again\n"
    ) in out
    dev.git("update-index", "--chmod=+x", "deploy", cwd=work)
    dev.git("commit", "-q", "-m", "executable", cwd=work)
    result = dev.git("push", dev.url(app), "main", cwd=work)
    assert "remote: deployed from the tree" in result.stderr
    assert [d["status"] for d in deploys(admin, app)] == ["succeeded", "failed", "failed"]


def test_regression_a_deploy_link_out_of_the_tree_reveals_nothing(gw, admin, dev, tmp_path):
    """`deploy -> /etc/shadow` or `deploy -> ../../x`: the gateway does not look where the
    link points (a link to an existing host file and to nothing read the same); the sandbox,
    which has neither, refuses to run it."""
    app = new_app(admin, dev, "linkout")
    work = dev.new_repo(tmp_path / "work")
    answers = []
    for target in ("/etc/shadow", "/etc/no-such-file", "../../x", "../../../../../../etc/shadow"):
        (work / "deploy").unlink(missing_ok=True)
        (work / "deploy").symlink_to(target)
        dev.git("add", "deploy", cwd=work)
        dev.git("commit", "-q", "-m", "link", cwd=work)
        result = dev.git("push", dev.url(app), "main", cwd=work, check=False)
        assert result.returncode == 1
        lines = [line.rstrip() for line in result.stderr.splitlines()]
        lines = [line for line in lines if line.startswith("remote:") and "deploy #" not in line]
        lines = [line for line in lines if "Watch it" not in line]
        answers.append([re.sub(r"[0-9a-f]{7,40}", "SHA", line) for line in lines])
    assert "remote: bwrap: execvp ./deploy: No such file or directory" in answers[0]
    assert all(answer == answers[0] for answer in answers), answers
    assert not any("not found in the pushed tree" in line for line in answers[0])


def deep_commit(work: Path, depth: int) -> None:
    """Commit, on top of HEAD, `depth` directories `d` nested in one another with a file at
    the bottom, written as git objects (no such tree on the client's disk to clean up)."""
    from dulwich.objects import Blob, Commit, Tree
    from dulwich.repo import Repo

    repo = Repo(str(work))
    head = repo[repo.head()]
    blob = Blob.from_string(b"at the bottom\n")
    objects: list[Blob | Tree | Commit] = [blob]
    tree = Tree()
    tree.add(b"bottom", 0o100644, blob.id)
    objects.append(tree)
    for _ in range(depth):
        parent = Tree()
        parent.add(b"d", 0o040000, tree.id)
        objects.append(parent)
        tree = parent
    top = repo[head.tree]
    assert isinstance(top, Tree)
    top.add(b"d", 0o040000, tree.id)
    objects.append(top)
    commit = Commit()
    commit.tree, commit.parents = top.id, [head.id]
    commit.author = commit.committer = b"dev <dev@example.com>"
    commit.author_time = commit.commit_time = int(time.time())
    commit.author_timezone = commit.commit_timezone = 0
    commit.message = b"deep\n"
    objects.append(commit)
    for obj in objects:
        repo.object_store.add_object(obj)
    repo.refs[b"refs/heads/main"] = commit.id


def test_regression_a_deep_pushed_tree_leaves_nothing_in_build_dir(gw, admin, dev, tmp_path):
    """A tree 1100 directories deep (fsck, git archive and tar all take it): removing its
    export raised RecursionError, the deploy ended in `deploy error`, and the export stayed
    in build_dir for good, up to max_export_size per push."""
    app = new_app(admin, dev)
    work = dev.new_repo(tmp_path / "work")
    deep_commit(work, 1100)
    result = dev.git("push", dev.url(app), "main", cwd=work, check=False)
    assert "remote: done" in result.stderr, result.stderr
    assert "recursion" not in result.stderr
    assert [d["status"] for d in deploys(admin, app)] == ["succeeded"]
    build_dir = gw.config.deploy.build_dir
    assert not [p.name for p in build_dir.iterdir() if p.name.startswith("deploy-")]


def test_restart_marks_running_interrupted_and_runs_queued(tmp_path, exchange):
    config = write_config(
        tmp_path / "state",
        deploy={"command": [DEPLOY_PYTHON, str(PIPELINE)], "mode": "detached", "timeout": 60},
    )
    admin = Admin(config)
    first = ServeProcess(config)
    owner = "restarter"
    key = keygen(tmp_path / "id")
    admin.ok("user", "add", owner)
    admin.ok("key", "add", owner, "k", f"{key}.pub")
    admin.ok("app", "create", "web", "--owner", owner)
    client = Client(tmp_path / "home", key, first, name=owner)
    fifo = exchange / "gate.fifo"
    os.mkfifo(fifo)
    work = client.new_repo(tmp_path / "work", {"wait-fifo": str(fifo)})
    client.git("push", "-q", client.url("web"), "main", cwd=work)
    first.wait_for(r"event=deploy_started deploy=1 ")
    (work / "wait-fifo").unlink()
    client.commit(work, {"v": "2\n"}, "second")
    client.git("push", "-q", client.url("web"), "main", cwd=work)
    assert [d["status"] for d in deploys(admin, "web")] == ["queued", "running"]

    first.kill()  # SIGKILL: no chance to record anything
    # The sandbox dies with the gateway (bwrap --die-with-parent): no orphaned deploy.
    wait_for_condition(lambda: deploy_processes("web", 1) == [], "deploy #1's processes exit")

    second = ServeProcess(config)
    code, out, _ = admin("deploy", "logs", "2", "--follow")
    assert code == 0 and "done" in out
    by_id = {d["id"]: d for d in deploys(admin, "web")}
    assert by_id[1]["status"] == "interrupted"
    assert "the gateway running it stopped answering" in by_id[1]["reason"]
    assert by_id[2]["status"] == "succeeded"
    assert second.stop() == 0
