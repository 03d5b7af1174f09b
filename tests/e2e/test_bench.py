"""The benchmark keeps working: a --quick run on tiny data produces every figure, and the
auth-cost workload runs on SQLite and PostgreSQL side by side."""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

from tests import pg
from tests.helpers import run

ROOT = Path(__file__).resolve().parents[2]
WORKLOADS = (
    "clone_bare",
    "clone_checkout",
    "raw_pack",
    "fetch_incremental",
    "push_initial",
    "push_one_commit",
    "ls_remote",
)


def test_quick_benchmark_on_tiny_data(tmp_path):
    out = tmp_path / "bench.json"
    result = run(
        [
            *(sys.executable, "-m", "bench", "--quick", "--profile", "tiny"),
            *("--json", str(out), "--markdown", str(tmp_path / "bench.md")),
        ],
        cwd=ROOT,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())
    results = report["results"]
    for name in WORKLOADS:
        figures = results[name]
        for target in ("file", "openssh", "gateway"):
            assert figures[target], (name, target)
        assert figures["gateway/openssh"] > 0 and figures["gateway/file"] > 0
    for name in ("concurrent_2", "concurrent_4"):
        assert results[name]["gateway/openssh"] > 0
        assert results[f"{name}_failures"] == {"file": 0, "openssh": 0, "gateway": 0}
    assert all(v > 0 for v in results["raw_pack_mb_per_s"].values())
    auth = results["auth_cost"]
    assert auth["sqlite"]["many/few"] > 0
    assert auth["sqlite"]["keys_registered"] == auth["keys_many"] == 1_000
    assert "postgresql" not in auth  # SQLite only unless asked: no PostgreSQL needed
    assert report["databases"] == ["sqlite"] and report["postgresql"] is None
    assert results["memory"]["kib_per_connection"] is not None
    assert results["gateway_exit_code"] == {"code": 0, "sqlite": 0}
    assert "clone_bare" in result.stdout  # the human table
    readme = (tmp_path / "bench.md").read_text()  # and the README's
    assert "| clone bare |" in readme
    assert "Auth cost: ls-remote p50 on sqlite" in readme and "postgresql" not in readme
    # The cipher each SSH target negotiated is reported: it is the transport's main cost.
    negotiated = report["negotiated"]
    assert negotiated["file"] is None
    for target in ("openssh", "gateway"):
        assert set(negotiated[target]) == {"kex", "cipher", "mac"}, negotiated
        assert " " not in negotiated[target]["kex"], negotiated
        assert negotiated[target]["cipher"] in result.stdout
    assert negotiated["gateway"]["cipher"] == "chacha20-poly1305@openssh.com"  # OpenSSH's pick


def test_auth_cost_on_sqlite_and_postgresql(tmp_path):
    pg.require_postgres()
    out = tmp_path / "bench.json"
    argv = ["--quick", "--profile", "tiny", "--only", "auth_cost", "--database", "both"]
    result = run(
        [sys.executable, "-m", "bench", *argv, "--keys", "200", "--json", str(out)],
        cwd=ROOT,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())
    auth = report["results"]["auth_cost"]
    assert (auth["keys_few"], auth["keys_many"]) == (10, 200)
    for backend in ("sqlite", "postgresql"):
        figures = auth[backend]
        for side in ("few", "many"):
            # Few keys are sampled before and after the crowd, many keys twice: same count.
            assert figures[side]["n"] == 10, (backend, side)
            assert 0 < figures[side]["p50"] <= figures[side]["p99"], (backend, side)
        assert figures["keys_registered"] == 200, backend  # what "many" was measured with
        assert figures["many/few"] > 0 and figures["seed_s"] > 0, backend
    assert set(auth["postgresql/sqlite"]) == {"few", "many"}
    assert report["results"]["gateway_exit_code"] == {"code": 0, "sqlite": 0, "postgresql": 0}
    # Side by side in the printed table, which names the PostgreSQL it ran.
    assert "sqlite" in result.stdout and "postgresql" in result.stdout
    assert "p50 / p99, 200 keys" in result.stdout
    assert report["postgresql"]["version"] in result.stdout
    # The benchmark stopped the PostgreSQL server it started.
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", report["postgresql"]["port"])) != 0


def test_workers_benchmark_on_tiny_data(tmp_path):
    """`python -m bench --workers 2`: clone throughput with 1 and 2 workers, no failures."""
    out = tmp_path / "workers.json"
    result = run(
        [sys.executable, "-m", "bench", "--workers", "2", "--profile", "tiny", "--json", str(out)],
        cwd=ROOT,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    figures = json.loads(out.read_text())
    assert figures["clones"] == 8
    assert set(figures["clones_per_s"]) == {"1", "2"}
    assert all(rate > 0 for rate in figures["clones_per_s"].values())
    assert figures["ratio"] > 0
    assert figures["failures"] == {"1": 0, "2": 0}
    assert figures["exit_codes"] == {"1": 0, "2": 0}
    assert figures["database_locked"] == {"1": 0, "2": 0}
    assert "2 workers / 1" in result.stdout
    assert all(rate > 0 for rate in figures["raw_pack_mb_per_s"].values())
