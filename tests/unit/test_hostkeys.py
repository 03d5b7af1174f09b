"""Host keys on a directory several nodes share: generated once, never half-read."""

from __future__ import annotations

import subprocess
import sys


def test_regression_nodes_starting_together_share_one_key_pair(tmp_path):
    """Eight processes start on an empty shared directory at once: each ends up with the
    same two keys (no node reads a half-written key, none overwrites another's)."""
    program = (
        "import sys; from pathlib import Path; from gateway.ssh import hostkeys; "
        "keys = hostkeys.load_or_create(Path(sys.argv[1])); "
        "print(' '.join(k.get_fingerprint('sha256') for k in keys))"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", program, str(tmp_path / "keys")],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(8)
    ]
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        outputs.append(out.strip())
    assert len(set(outputs)) == 1 and len(outputs[0].split()) == 2
    names = sorted(p.name for p in (tmp_path / "keys").iterdir())
    assert names == [
        "ssh_host_ed25519_key",
        "ssh_host_ed25519_key.pub",
        "ssh_host_rsa_key",
        "ssh_host_rsa_key.pub",
    ]  # no temporary file left behind
