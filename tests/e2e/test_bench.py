"""The benchmark keeps working: a --quick run on tiny data produces every figure."""

from __future__ import annotations

import json
import sys
from pathlib import Path

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
        [sys.executable, "-m", "bench", "--quick", "--profile", "tiny", "--json", str(out)],
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
    assert results["auth_cost"]["many/few"] > 0
    assert results["memory"]["kib_per_connection"] is not None
    assert results["gateway_exit_code"] == {"code": 0}
    assert "clone_bare" in result.stdout  # the human table
    # The cipher each SSH target negotiated is reported: it is the transport's main cost.
    negotiated = report["negotiated"]
    assert negotiated["file"] is None
    for target in ("openssh", "gateway"):
        assert set(negotiated[target]) == {"kex", "cipher", "mac"}, negotiated
        assert " " not in negotiated[target]["kex"], negotiated
        assert negotiated[target]["cipher"] in result.stdout
    assert negotiated["gateway"]["cipher"] == "chacha20-poly1305@openssh.com"  # OpenSSH's pick
