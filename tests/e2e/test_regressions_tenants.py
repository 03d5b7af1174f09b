"""Hostile tenants: a writer of one app, whose deploy runs the code they pushed, tries every
escape to the gateway's secrets and to other tenants' apps, deploys and pushes. Each attempt
was a real hole before deploys ran sandboxed and hooks were verified; each must stay denied.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

from gateway.deploys import cgroups, confine
from gateway.domain.deploylog import read_log
from tests.helpers import (
    DEPLOY_PYTHON,
    PIPELINE,
    Admin,
    Client,
    LiveProcess,
    ServeProcess,
    ServerThread,
    exchange_subdir,
    keygen,
    server_refs,
    write_config,
)

HOSTILE = Path(__file__).with_name("hostile_deploy.py")
VICTIM_SECRET = "DATABASE_URL=postgres://victim:hunter2@db/victim"


@pytest.fixture(scope="module")
def gw(module_gateways):
    return module_gateways(
        f'[apps.victim]\ncommand = ["{DEPLOY_PYTHON}", "{PIPELINE}"]\nmode = "detached"\n'
        + f'[apps.gated]\ncommand = ["{DEPLOY_PYTHON}", "{PIPELINE}"]\nmode = "gate"\n'
        + "[apps.airgapped]\nnetwork = false\n"
        + '[apps.inflate]\nmax_export_size = "8M"\n'
        + f'[apps.chatty]\ncommand = ["{DEPLOY_PYTHON}", "{PIPELINE}"]\nmax_output = "256K"\n'
        + f'[apps.doomed]\ncommand = ["{DEPLOY_PYTHON}", "{PIPELINE}"]\nmode = "detached"\n',
        name="tenants",
        deploy={"command": [DEPLOY_PYTHON, "hostile_deploy.py"], "timeout": 60},
    )


@pytest.fixture(scope="module")
def people(gw, admin, tmp_path_factory):
    """alice owns the victim apps; mallory owns the attacker's apps."""
    home = tmp_path_factory.mktemp("people")
    clients = {}
    for name in ("alice", "mallory"):
        key = keygen(home / f"{name}_id")
        admin.ok("user", "add", name)
        admin.ok("key", "add", name, "laptop", f"{key}.pub")
        clients[name] = Client(home / f"home-{name}", key, gw, name=name)
    for app, owner in (
        ("victim", "alice"),
        ("gated", "alice"),
        ("chatty", "alice"),
        ("attacker", "mallory"),
        ("airgapped", "mallory"),
        ("inflate", "mallory"),
        ("doomed", "mallory"),
    ):
        admin.ok("app", "create", app, "--owner", owner)
    return clients


def deploys(admin: Admin, app: str) -> list[dict]:
    return json.loads(admin.ok("deploy", "list", app, "--json"))


def running_job(gw: ServerThread, app: str):  # type: ignore[no-untyped-def]
    jobs = [j for j in gw.gateway.deploys.jobs.values() if j.deploy.app_name == app]
    return jobs[0] if jobs and jobs[0].started is not None else None


def wait_for_output(gw: ServerThread, deploy_id: int, text: str) -> None:
    """Until the deploy's stored log shows `text` (its runner stores output within ~0.1 s)."""

    async def shown() -> None:
        while text not in await read_log(gw.gateway.store, deploy_id):
            await gw.gateway.deploys.wakeups.wait(deploy_id, 0.5)

    gw.call(asyncio.wait_for(shown(), 60), 65)


def start_victim_deploy(gw, admin, alice, tmp_path) -> tuple[Path, int]:
    """alice's deploy of `victim` runs (blocked on a FIFO) and prints a secret."""
    shared = exchange_subdir("victim")
    fifo = shared / "gate.fifo"
    os.mkfifo(fifo)
    work = alice.new_repo(tmp_path / "victim", {"wait-fifo": str(fifo), "stderr": VICTIM_SECRET})
    alice.git("push", "-q", alice.url("victim"), "main", cwd=work)
    gw.wait_until(lambda: running_job(gw, "victim") is not None)
    job = running_job(gw, "victim")
    wait_for_output(gw, job.deploy.id, "waiting for the test")
    return fifo, job.deploy.id


def hostile_push(gw, mallory, tmp_path, app: str, victim_deploy: int) -> dict:
    """mallory pushes the hostile deploy script to one of her apps; returns its findings."""
    cfg = gw.config
    report = exchange_subdir("report") / "report.json"
    targets = {
        "database": str(cfg.storage.database),
        "host_key": str(next(cfg.ssh.host_key_dir.glob("*key*"))),
        "config": str(gw.config_path),
        "repos": str(gw.repos),
        "victim_repo": str(gw.repo("victim")),
        "victim_log": str(cfg.deploy.log_dir / f"{victim_deploy}.log"),
        "log_dir": str(cfg.deploy.log_dir),
        "control_socket": str(cfg.storage.control_socket),
        "victim_deploy": victim_deploy,
        "gateway_pid": os.getpid(),
        "build_dir": str(cfg.deploy.build_dir),
        "report": str(report),
        "ssh_port": gw.port,
    }
    work = mallory.new_repo(
        tmp_path / app,
        {"hostile_deploy.py": HOSTILE.read_text(), "targets.json": json.dumps(targets)},
    )
    result = mallory.git("push", mallory.url(app), "main", cwd=work)
    assert "hostile deploy done" in result.stderr, result.stderr
    return json.loads(report.read_text())


def test_regression_hostile_deploy_reaches_nothing_of_the_gateway_or_other_tenants(
    gw, admin, people, tmp_path
):
    alice, mallory = people["alice"], people["mallory"]
    fifo, victim_deploy = start_victim_deploy(gw, admin, alice, tmp_path)
    findings = hostile_push(gw, mallory, tmp_path, "attacker", victim_deploy)
    allowed = {name: r for name, r in findings["attempts"].items() if not r.startswith("denied")}
    assert allowed == {}, f"escapes that worked: {allowed}"
    facts = findings["facts"]
    # Its own PID namespace: a handful of its own processes, not the gateway's.
    assert len(facts["pids"]) < 10 and max(facts["pids"]) < 100
    # Nothing inherited (3: the listing itself), but for the read-only lock file of the
    # cgroup gate where the deploy has a cgroup (confine.py).
    gate = {4} if isinstance(confine.delegation(), cgroups.Delegation) else set()
    assert set(facts["fds"]) <= {0, 1, 2, 3} | gate
    assert facts["no_new_privs"] == ["1"]
    assert facts["uid"] == (65534 if os.geteuid() == 0 else os.geteuid())
    assert facts["cwd"] == "/app" and facts["hostname"] == "deploy"
    assert facts["write /app"].startswith("ALLOWED") and facts["write /tmp"].startswith("ALLOWED")
    # network = "isolated" by default: the gateway's port on the host's loopback is out of reach
    assert facts["connect gateway ssh"].startswith("denied")

    # The victim's deploy was neither cancelled nor read; its repository holds no planted hook.
    assert not (gw.repo("victim") / "hooks" / "post-update").exists()
    attacker_log = admin.ok("deploy", "logs", str(deploys(admin, "attacker")[0]["id"]))
    assert VICTIM_SECRET not in attacker_log
    with open(fifo, "w") as release:
        release.write("go\n")
    gw.wait_until(lambda: running_job(gw, "victim") is None)
    assert deploys(admin, "victim")[0]["status"] == "succeeded"


def test_regression_network_false_cuts_the_network(gw, admin, people, tmp_path):
    findings = hostile_push(gw, people["mallory"], tmp_path, "airgapped", 0)
    assert findings["facts"]["connect gateway ssh"].startswith("denied")


def test_regression_inflating_push_is_cut_at_the_export_limit(gw, admin, people, tmp_path):
    """A 256 MiB blob of zeros is a ~256 KiB push; exporting it stops at the app's 8 MiB
    limit with a clear line, and the gateway never holds the blob in memory."""
    mallory = people["mallory"]
    work = mallory.new_repo(tmp_path / "inflate")
    blob = (
        subprocess.run(
            ["git", "hash-object", "-w", "--stdin"],
            input=b"\0" * (256 * 1024 * 1024),
            capture_output=True,
            cwd=work,
            env=mallory.env,
            timeout=120,
            check=True,
        )
        .stdout.decode()
        .strip()
    )
    mallory.git("update-index", "--add", "--cacheinfo", f"100644,{blob},zeros.bin", cwd=work)
    mallory.git("commit", "-q", "-m", "inflate", cwd=work)
    Path("/proc/self/clear_refs").write_text("5")  # reset this process's peak RSS
    before = _rss("VmRSS")
    result = mallory.git("push", mallory.url("inflate"), "main", cwd=work, check=False)
    peak = _rss("VmHWM")
    assert result.returncode == 1
    assert "larger than this app's export limit (8 MiB" in result.stderr
    [record] = deploys(admin, "inflate")
    assert record["status"] == "failed" and "export limit" in record["reason"]
    assert peak - before < 64 * 1024 * 1024, f"gateway grew by {(peak - before) >> 20} MiB"


def test_regression_deploy_output_is_capped(gw, admin, people, tmp_path):
    alice = people["alice"]
    work = alice.new_repo(tmp_path / "chatty", {"spam": "100000"})  # ~9 MB of output
    result = alice.git("push", alice.url("chatty"), "main", cwd=work, check=False)
    assert result.returncode == 1
    assert "output limit exceeded (256 KiB, [deploy] max_output)" in result.stderr
    assert deploys(admin, "chatty")[0]["status"] == "failed"


def _rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(field)


def _token_of_push(app: str) -> tuple[int, str]:
    """What an attacker with the gateway's uid could read: the hook token in the
    environment of a running receive-pack (test processes run as that uid, or root)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = dict(
                item.split(b"=", 1)
                for item in (entry / "environ").read_bytes().split(b"\0")
                if b"=" in item
            )
        except OSError:
            continue
        if env.get(b"GATEWAY_APP") == app.encode() and b"GATEWAY_HOOK_TOKEN" in env:
            return int(entry.name), env[b"GATEWAY_HOOK_TOKEN"].decode()
    raise AssertionError(f"no receive-pack of {app} running")


def test_regression_stolen_hook_token_cannot_forge_a_push(gw, admin, people, tmp_path, caplog):
    """While alice's gated push waits in pre-receive, a process that read its receive-pack's
    token sends a post-receive claiming an old commit moved the deploy branch. It is not a
    hook of that receive-pack, so nothing is believed: no deploy, no audited push."""
    alice = people["alice"]
    shared = exchange_subdir("gated")
    fifo = shared / "gate.fifo"
    os.mkfifo(fifo)
    work = alice.new_repo(tmp_path / "gated", {"app.txt": "v1\n"})
    alice.git("push", "-q", alice.url("gated"), "main", cwd=work)
    old = alice.git("rev-parse", "HEAD", cwd=work).stdout.strip()
    alice.commit(work, {"wait-fifo": str(fifo)}, "v2 waits in the gate")
    new = alice.git("rev-parse", "HEAD", cwd=work).stdout.strip()
    push = LiveProcess(["git", "push", alice.url("gated"), "main"], env=alice.env, cwd=work)
    try:
        push.wait_for("waiting for the test")
        _, token = _token_of_push("gated")
        before = len(deploys(admin, "gated"))
        forged = {
            "hook": "post-receive",
            "token": token,
            "updates": [[new, old, "refs/heads/main"]],
        }
        with caplog.at_level(logging.WARNING, logger="gateway.deploys"):
            replies = _control(gw, forged)
        assert replies[-1] == {"exit": 0}
        assert "not known to the gateway" in replies[0]["out"]
        assert "reason=not_a_hook_of_this_push" in caplog.text
        assert len(deploys(admin, "gated")) == before
        audit = json.loads(admin.ok("audit", "--app", "gated", "--json"))
        forged_move = f"{new[:12]}..{old[:12]}"
        assert not any(forged_move in json.dumps(e["detail"]) for e in audit)
    finally:
        with open(fifo, "w") as release:
            release.write("go\n")
        assert push.finish() == 0
    assert server_refs(gw.repo("gated"))["refs/heads/main"] == new


def test_regression_hook_requests_from_other_users_are_refused(gw, people):
    """The control socket answers only its own user (SO_PEERCRED), even if its file mode is
    widened; nobody (as a sandboxed deploy would be under root) gets no answer at all."""
    if os.geteuid() != 0:
        pytest.skip("needs root to act as another user")
    path = gw.config.storage.control_socket
    state = path.parent
    mode = state.stat().st_mode & 0o777
    # An operator's mistakes, on purpose: the socket's directory and the socket opened up.
    # (pytest's own base directory is private: the other user walks in through a
    # directory descriptor handed to it.)
    os.chmod(state, 0o711)  # noqa: S103
    os.chmod(path, 0o666)  # noqa: S103
    directory = os.open(state, os.O_PATH | os.O_DIRECTORY)
    try:
        probe = (
            "import socket,sys\n"
            "c=socket.socket(socket.AF_UNIX);c.connect(sys.argv[1])\n"
            "try:\n"
            ' c.sendall(b\'{"op":"follow","deploy":1}\\n\');print(repr(c.recv(100)))\n'
            "except OSError:\n"
            " print('closed')\n"
        )
        argv = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        argv += [DEPLOY_PYTHON, "-c", probe, f"/proc/self/fd/{directory}/{path.name}"]
        result = subprocess.run(
            argv, capture_output=True, text=True, timeout=30, pass_fds=(directory,)
        )
        assert result.returncode == 0, result.stderr  # it connected...
        assert result.stdout.strip() in ("b''", "closed")  # ...and was answered nothing
    finally:
        os.close(directory)
        os.chmod(path, 0o600)
        os.chmod(state, mode)


def _control(gw: ServerThread, message: dict) -> list[dict]:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(30)
    conn.connect(str(gw.config.storage.control_socket))
    try:
        conn.sendall(json.dumps(message).encode() + b"\n")
        with conn.makefile("rb") as replies:
            return [json.loads(line) for line in replies]
    finally:
        conn.close()


def test_regression_removing_an_app_stops_its_deploys_first(gw, admin, people, tmp_path):
    """A removed app's running and queued deploys are cancelled before its logs go to the
    trash, so no deploy of a removed app runs on or writes on."""
    mallory = people["mallory"]
    fifo = exchange_subdir("doomed") / "gate.fifo"
    os.mkfifo(fifo)
    work = mallory.new_repo(tmp_path / "doomed", {"wait-fifo": str(fifo)})
    mallory.git("push", "-q", mallory.url("doomed"), "main", cwd=work)
    gw.wait_until(lambda: running_job(gw, "doomed") is not None)
    running = running_job(gw, "doomed")
    wait_for_output(gw, running.deploy.id, "waiting for the test")
    mallory.commit(work, {"v": "2"}, "queued behind")
    mallory.git("push", "-q", mallory.url("doomed"), "main", cwd=work)
    out = admin.ok("app", "remove", "doomed")
    assert "2 deploy(s) of doomed cancelled" in out and "removed app doomed" in out
    assert not [j for j in gw.gateway.deploys.jobs.values() if j.deploy.app_name == "doomed"]
    assert running.done.result().status.value == "cancelled"
    assert "app removed" in running.done.result().reason


def _process_memory(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(field)


@pytest.mark.slow
def test_regression_stalled_watcher_keeps_memory_flat_and_never_holds_up_a_drain(
    tmp_path, exchange
):
    """A deploy prints 300 MiB while a `logs --follow` watcher reads nothing: the gateway's
    memory stays flat (the watcher's buffer is bounded, the log keeps its tail), and once
    the deploy is over, SIGTERM stops the gateway at once although that watcher still does
    not read."""
    config = write_config(
        tmp_path / "state",
        deploy={"command": [DEPLOY_PYTHON, str(PIPELINE)], "mode": "detached", "timeout": 120},
        limits={"drain_timeout": 60},
    )
    key = Admin(config).enroll("loud", tmp_path, "loud")
    server = ServeProcess(config)
    watcher = None
    try:
        client = Client(tmp_path / "home", key, server, name="loud")
        fifo = exchange / "gate.fifo"
        os.mkfifo(fifo)
        # 3.5 million lines of 88 bytes: 300 MiB, printed once the watcher is attached.
        files = {"wait-fifo": str(fifo), "spam": "3500000"}
        work = client.new_repo(tmp_path / "work", files)
        client.git("push", "-q", client.url("loud"), "main", cwd=work)
        server.wait_for(r"event=deploy_started deploy=1 ")
        baseline = _process_memory(server.proc.pid, "VmRSS")
        Path(f"/proc/{server.proc.pid}/clear_refs").write_text("5")  # reset its peak
        # The watcher: its stdout is a pipe nobody reads, so it stops taking data.
        watcher = subprocess.Popen(
            [*client.ssh_base, "-T", "git@127.0.0.1", "logs", "loud", "1", "--follow"],
            env=client.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        server.wait_for(r"event=process_started|event=auth_ok .*user=loud")
        with open(fifo, "w") as release:
            release.write("go\n")
        server.wait_for(r"event=deploy_finished deploy=1 app=loud status=succeeded")
        peak = _process_memory(server.proc.pid, "VmHWM")
        assert peak - baseline < 100 * 1024 * 1024, f"grew {(peak - baseline) >> 20} MiB"
        assert watcher.poll() is None  # still connected, still not reading
        started = time.monotonic()
        assert server.stop() == 0
        assert time.monotonic() - started < 20  # not drain_timeout (60 s)
        # Whether the watcher stalled depends on how much of the flood was stored (a log is
        # paced to ~640 KB/s) against the SSH window and socket buffers; dropping a stalled
        # watcher is proved in tests/unit/test_watch.py.
    except BaseException:
        print("".join(server.lines)[-6000:])
        raise
    finally:
        if watcher is not None:
            watcher.kill()
            watcher.wait(30)
        if server.proc.poll() is None:
            server.kill()
