"""A small run of the load test (bench/load.py) is part of the suite: everything succeeds."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tests.helpers import run

ROOT = Path(__file__).resolve().parents[2]


def test_small_load_run_all_succeed(tmp_path):
    report = tmp_path / "load.json"
    result = run(
        [
            sys.executable,
            "-m",
            "bench.load",
            "--duration",
            "3",
            "--clones",
            "3",
            "--pushers",
            "2",
            "--apps",
            "2",
            "--files",
            "50",
            "--json",
            str(report),
        ],
        cwd=ROOT,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    figures = json.loads(report.read_text())
    for kind in ("clone", "push"):
        assert figures[kind]["ok"] > 0 and figures[kind]["failed"] == 0
        assert figures[kind]["p50_s"] <= figures[kind]["p99_s"]
    assert figures["gateway_exit_code"] == 0
