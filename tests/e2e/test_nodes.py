"""Two gateway nodes on one registry, one repositories root and one host key directory, as
behind a TCP balancer: what one node writes the other serves at once, clients see one host
key whichever node answers, and git's lock files decide racing pushes across nodes. Twice:
two single-process nodes on one SQLite file, and two nodes of two workers each on one
PostgreSQL registry (the cluster's setup, see test_cluster.py for the balancer)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.helpers import (
    Admin,
    Client,
    ServeProcess,
    fsck,
    http,
    keygen,
    race_one_round,
    server_refs,
    write_config,
)


def node_config(shared: Path, name: str, database: str, forwarded: bool = False) -> Path:
    """One node's config: its own ports and control socket, everything else shared; with
    `forwarded`, each repository served by its home node (the other forwards to it)."""
    cluster: dict[str, object] = {"node_timeout": 4, "node_name": f"node-{name}"}
    if forwarded:
        # One local disk: no cache to wait out on a stop.
        cluster.update(
            listen="127.0.0.1:0", peers=["127.0.0.1/32"], forward="always", cache_seconds=0
        )
    return write_config(
        shared / name,
        storage={
            "database": database,
            "repos": str(shared / "repos"),
            "control_socket": str(shared / name / "gw.sock"),
        },
        ssh={"host_key_dir": str(shared / "hostkeys")},
        cluster=cluster,
    )


# Forwarded: the internal listener bound by each node's supervisor and shared by its workers.
@pytest.fixture(scope="module", params=["sqlite", "postgresql", "forwarded"])
def nodes(request, tmp_path_factory):
    shared = tmp_path_factory.mktemp("cluster")
    if request.param == "sqlite":
        database, args = str(shared / "gw.db"), ()
    else:
        database = request.getfixturevalue("postgres").create_database()
        args = ("--workers", "2")
    forwarded = request.param == "forwarded"
    started = []
    try:
        for name in ("a", "b"):
            config = node_config(shared, name, database, forwarded)
            started.append(ServeProcess(config, args=args))
        yield started
    finally:
        for node in started:
            if node.proc.poll() is None:
                assert node.stop() == 0


def http_port(node: ServeProcess) -> int:
    return int(re.search(r"event=http_listening address=127\.0\.0\.1:(\d+)", node.stderr).group(1))


def fingerprints(node: ServeProcess) -> set[str]:
    """The host keys the node (each of its workers) announced."""
    return {
        line.split("fingerprint=")[1].split()[0] for line in node.lines if "event=host_key " in line
    }


def test_one_host_key_whichever_node_answers(nodes):
    a, b = nodes
    assert fingerprints(a) == fingerprints(b) and len(fingerprints(a)) == 2


def test_push_on_one_node_clone_on_the_other(nodes, tmp_path):
    a, b = nodes
    admin = Admin(a.config_path)
    key = admin.enroll("nina", tmp_path, "shared")
    on_a = Client(tmp_path / "home-a", key, a, name="nina")
    on_b = Client(tmp_path / "home-b", key, b, name="nina")  # known_hosts from the shared keys
    work = on_a.new_repo(tmp_path / "work", {"README": "pushed through A\n"})
    on_a.git("push", "-q", on_a.url("shared"), "main", cwd=work)
    on_b.git("clone", "-q", on_b.url("shared"), str(tmp_path / "clone"))
    assert (tmp_path / "clone" / "README").read_text() == "pushed through A\n"
    if "forward" in a.config_path.read_text():
        # Created through A's configuration: A is the home, B forwarded the clone there.
        line = b.wait_for("event=git_forwarded service=upload-pack app=shared").string
        assert "home=node-a" in line


def test_key_added_through_one_node_works_on_the_other_and_removal_too(nodes, tmp_path):
    a, b = nodes
    admin = Admin(a.config_path)
    admin.enroll("omar", tmp_path, "omarapp")
    token = admin.ok("token", "create", "ops-omar").split()[-1]
    key = keygen(tmp_path / "second")
    added = http(
        "POST",
        f"http://127.0.0.1:{http_port(a)}/api/v1/users/omar/keys",
        token,
        {"name": "second", "key": (tmp_path / "second.pub").read_text()},
    )
    assert added.status == 201, added.body
    on_b = Client(tmp_path / "home-b", key, b, name="omar")
    assert on_b.git("ls-remote", on_b.url("omarapp")).returncode == 0
    removed = http(
        "DELETE", f"http://127.0.0.1:{http_port(b)}/api/v1/users/omar/keys/second", token
    )
    assert removed.status == 204, removed.body
    on_a = Client(tmp_path / "home-a", key, a, name="omar")
    refused = on_a.git("ls-remote", on_a.url("omarapp"), check=False)
    assert refused.returncode != 0 and "Permission denied" in refused.stderr


def test_racing_pushes_through_both_nodes_one_winner_per_round(nodes, tmp_path):
    """Two pushers, one through each node, race on one branch: git's ref locks on the
    shared repositories root make exactly one win each round, with no lost update."""
    a, b = nodes
    admin = Admin(a.config_path)
    key = admin.enroll("race", tmp_path, "raced")
    pushers = []
    for name, node in (("a", a), ("b", b)):
        client = Client(tmp_path / f"home-{name}", key, node, name="race")
        pushers.append((client, tmp_path / f"copy-{name}"))
    first, first_copy = pushers[0]
    first.new_repo(first_copy)
    first.git("push", "-q", first.url("raced"), "main", cwd=first_copy)
    second, second_copy = pushers[1]
    second.git("clone", "-q", second.url("raced"), str(second_copy))
    repo = Path(a.config.storage.repos) / "raced.git"
    for round_number in range(4):
        winner = race_one_round(pushers, "raced", round_number)
        assert server_refs(repo)["refs/heads/main"] == winner  # no lost update
        fsck(repo)
    events = json.loads(admin.ok("audit", "--app", "raced", "--json"))
    assert sum(1 for e in events if e["event"] == "push") == 5  # the first push + 4 winners
