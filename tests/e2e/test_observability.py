"""Health and readiness probes, Prometheus metrics, and JSON logs tied by a connection id."""

from __future__ import annotations

import json
import re
from pathlib import Path

from tests.helpers import (
    DEPLOY_PYTHON,
    Admin,
    Client,
    ServeProcess,
    ServerThread,
    http,
    http_base,
    keygen,
    unique,
    write_config,
)


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one Prometheus sample, 0 if it is absent."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split(" ")[0]))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def metrics(server: ServerThread) -> str:
    reply = http("GET", http_base(server) + "/metrics")
    assert reply.status == 200
    assert reply.headers["Content-Type"].startswith("text/plain")
    return reply.body.decode()


def test_probes(server: ServerThread) -> None:
    base = http_base(server)
    assert http("GET", base + "/healthz").json() == {"status": "ok"}
    ready = http("GET", base + "/readyz")
    assert ready.status == 200
    assert ready.json() == {
        "status": "ready",
        "checks": {"ssh": "ok", "database": "ok", "repos": "ok"},
    }


def test_readyz_fails_when_ssh_stops_accepting(gateway_factory, tmp_path: Path) -> None:
    server = gateway_factory()
    server.call(server.gateway.listener.close())
    reply = http("GET", http_base(server) + "/readyz")
    assert reply.status == 503
    assert reply.json()["checks"]["ssh"] == "not accepting connections"
    assert http("GET", http_base(server) + "/healthz").status == 200


def test_metrics_count_connections_auth_git_and_limits(
    server: ServerThread, owner: Client, app: str, tmp_path: Path
) -> None:
    before = metrics(server)
    repo = owner.new_repo(tmp_path / "work")
    owner.git("push", "-q", owner.url(app), "main", cwd=repo, check=True)
    owner.git("clone", "-q", owner.url(app), str(tmp_path / "clone"), check=True)
    stranger = Client(tmp_path / "stranger", keygen(tmp_path / "nobody"), server)
    assert stranger.git("ls-remote", stranger.url(app), check=False).returncode != 0
    owner.ssh("nonsense")
    server.wait_until(lambda: server.gateway.admission.total == 0)
    after = metrics(server)

    def delta(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert delta("gateway_git_operations_total", verb="receive-pack", outcome="ok") == 1
    assert delta("gateway_git_operations_total", verb="upload-pack", outcome="ok") == 1
    assert delta("gateway_git_operation_duration_seconds_count", verb="upload-pack") == 1
    assert delta("gateway_git_bytes_total", direction="in", verb="receive-pack") > 100
    assert delta("gateway_git_bytes_total", direction="out", verb="upload-pack") > 100
    assert delta("gateway_auth_results_total", result="ok") == 3
    assert delta("gateway_auth_results_total", result="unknown_key") == 1
    assert delta("gateway_connections_total") == 4
    assert sample(after, "gateway_connections_open") == 0
    assert delta("gateway_ssh_commands_total", command="other", outcome="refused") == 1
    assert sample(after, "gateway_build_info", version="0.1.0") == 1
    assert "process_resident_memory_bytes" in after


def test_limit_rejections_are_counted(gateway_factory, tmp_path: Path) -> None:
    from tests.helpers import banner, raw

    server = gateway_factory(limits={"max_connections_per_address": 1})
    first = raw(server)
    server.wait_until(lambda: server.gateway.admission.total == 1)
    second = raw(server)
    assert banner(second) == b""
    first.close()
    second.close()
    text = metrics(server)
    assert sample(text, "gateway_limit_rejections_total", limit="max_connections_per_address") == 1


def test_deploy_metrics(gateway_factory, tmp_path: Path) -> None:
    command = [DEPLOY_PYTHON, "-c", "print('deployed')"]
    server = gateway_factory(deploy={"command": command})
    admin = Admin(server.config_path)
    user, app = unique("dm"), unique("dmapp")
    key = keygen(tmp_path / "key")
    admin.ok("user", "add", user)
    admin.ok("key", "add", user, "laptop", f"{key}.pub")
    admin.ok("app", "create", app, "--owner", user)
    client = Client(tmp_path / "home", key, server, name=user)
    repo = client.new_repo(tmp_path / "work")
    client.git("push", "-q", client.url(app), "main", cwd=repo, check=True)
    server.wait_until(lambda: not server.gateway.deploys.jobs)
    text = metrics(server)
    assert sample(text, "gateway_deploys_total", status="succeeded") == 1
    assert sample(text, "gateway_deploy_duration_seconds_count", status="succeeded") == 1
    assert sample(text, "gateway_deploys_running") == 0


def test_json_logs_tie_a_connection_together(tmp_path: Path) -> None:
    config = write_config(tmp_path, log={"format": "json"})
    admin = Admin(config)
    user, app = unique("jl"), unique("jlapp")
    key = keygen(tmp_path / "key")
    admin.ok("user", "add", user)
    admin.ok("key", "add", user, "laptop", f"{key}.pub")
    admin.ok("app", "create", app, "--owner", user)
    gateway = ServeProcess(config)
    try:
        client = Client(tmp_path / "home", key, gateway, name=user)  # type: ignore[arg-type]
        repo = client.new_repo(tmp_path / "work")
        client.git("push", "-q", client.url(app), "main", cwd=repo, check=True)
        gateway.wait_for(r'"event":"disconnect"')
    finally:
        assert gateway.stop() == 0
    entries = [json.loads(line) for line in gateway.stderr.splitlines() if line.startswith("{")]
    assert len(entries) == len([ln for ln in gateway.stderr.splitlines() if ln.strip()])
    git = next(e for e in entries if e.get("event") == "git")
    conn = git["conn"]
    mine = {e["event"]: e for e in entries if e.get("conn") == conn}
    assert {"connect", "auth_ok", "git", "disconnect"} <= set(mine)
    assert mine["auth_ok"]["user"] == user and mine["auth_ok"]["fp"].startswith("SHA256:")
    assert mine["git"]["app"] == app and mine["git"]["outcome"] == "ok"
    assert int(mine["git"]["bytes_in"]) > 0 and float(mine["git"]["duration"]) > 0
    summary = mine["disconnect"]
    assert summary["user"] == user and summary["outcome"] == "ok"
    assert int(summary["bytes_in"]) == int(mine["git"]["bytes_in"])
    assert summary["peer"].startswith("127.0.0.1:")
    for entry in entries:
        assert {"time", "level", "logger", "msg"} <= set(entry)
