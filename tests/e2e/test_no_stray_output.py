"""Nothing a user did not ask for reaches their terminal or the logs: the installed CLI, `serve
--log-format json` and an SSH welcome, with every Python warning turned into an error."""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import pytest

import gateway
from gateway import logs
from tests.e2e.test_serve import ssh_welcome
from tests.helpers import (
    DEPLOY_PYTHON,
    Admin,
    LiveProcess,
    keygen,
    require_sandbox,
    run,
    write_config,
)

# The console script pip installed beside this interpreter: what a user runs.
CLI = str(Path(sys.executable).with_name("git-gateway"))


def strict_env() -> dict[str, str]:
    """Every warning is an error, in the CLI and in whatever it starts (hooks, workers)."""
    return {**os.environ, "PYTHONWARNINGS": "error"}


def cli(config: Path, *args: str) -> tuple[int, str, str]:
    result = run([CLI, "--config", str(config), *args], env=strict_env())
    return result.returncode, result.stdout, result.stderr


def test_regression_cli_prints_only_what_was_asked_under_strict_warnings(tmp_path):
    """A cryptography release deprecated DSA and asyncssh's import printed ten warning lines
    before every command; with warnings as errors, any such line is now a failure here."""
    config = write_config(tmp_path)
    assert cli(config, "--version") == (0, f"git-gateway {gateway.__version__}\n", "")
    assert cli(config, "user", "add", "alice") == (0, "created user alice\n", "")
    code, out, err = cli(config, "user", "list", "--json")
    assert (code, err) == (0, "")
    assert [u["name"] for u in json.loads(out)] == ["alice"]
    code, out, err = cli(config, "check")
    assert (code, err) == (0, "")
    assert out.splitlines()[0].startswith("config ok")
    assert out.splitlines()[-1].startswith("registry ok (sqlite ")
    code, out, err = cli(config, "--help")
    assert (code, err) == (0, "")
    assert out.startswith("usage: git-gateway")


def test_regression_check_of_an_isolated_sandbox_leaves_no_stray_line(tmp_path):
    """check builds a test sandbox with its isolated network: its pasta is stopped and
    reaped before check's event loop closes (asyncio printed "Loop ... that handles pid N
    is closed" when it was not)."""
    require_sandbox()
    config = write_config(tmp_path, deploy={"command": [DEPLOY_PYTHON, "-c", "pass"]})
    code, out, err = cli(config, "check")
    assert (code, err) == (0, ""), out + err
    assert "deploy sandbox ok" in out
    known = ("config ok", "warning: ", "deploy limits: ", "registry ok")
    assert all(line.startswith(known) for line in out.splitlines()), out


def test_regression_serve_json_logs_and_ssh_welcome_stay_clean_under_strict_warnings(tmp_path):
    config = write_config(tmp_path, log={"format": "json"})
    Admin(config).ok("user", "add", "alice")
    key = keygen(tmp_path / "alice_id")
    Admin(config).ok("key", "add", "alice", "laptop", f"{key}.pub")
    proc = LiveProcess([CLI, "--config", str(config), "serve"], env=strict_env())
    try:
        port = int(proc.wait_for(r"event=listening address=127\.0\.0\.1:(\d+)").group(1))
        known_hosts = tmp_path / "known_hosts"
        lines = [
            f"[127.0.0.1]:{port} {p.read_text().strip()}"
            for p in sorted((tmp_path / "hostkeys").glob("*.pub"))
        ]
        known_hosts.write_text("\n".join(lines) + "\n")
        welcome = ssh_welcome(port, key, known_hosts)
        assert welcome.returncode == 0, welcome.stderr
        assert welcome.stderr == ""
        assert welcome.stdout.startswith('Hi alice! You are authenticated with key "laptop"')
    finally:
        proc.proc.send_signal(15)
        assert proc.finish() == 0
    for line in proc.lines:
        record = json.loads(line)  # every line of the log is one JSON object
        assert record["logger"] != "gateway.warnings", record
        assert "Warning" not in record["msg"], record


def test_a_warning_becomes_one_log_line_never_free_text(capsys, caplog):
    logs.capture_warnings()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = logs._log_warning
        warnings.warn("something\nspread over lines", UserWarning, stacklevel=1)
    assert capsys.readouterr().err == ""
    [record] = [r for r in caplog.records if r.name == "gateway.warnings"]
    assert record.getMessage().startswith("event=python_warning category=UserWarning where=")
    assert "\n" not in record.getMessage()


@pytest.mark.parametrize("category", [DeprecationWarning, UserWarning])
def test_only_asyncssh_deprecations_are_filtered(category):
    """The filter is at the source: the same warning raised from another module still shows."""

    def warn_from(module: str) -> None:
        # A frame whose module is `module`: the filter matches on the warning's module.
        code = compile("import warnings; warnings.warn(module, C)", f"{module}.py", "exec")
        exec(code, {"__name__": module, "module": module, "C": category})  # noqa: S102

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gateway.quiet_dependencies()
        warn_from("asyncssh.crypto.misc")
        warn_from("asyncssh")
        warn_from("other")
        warn_from("asyncsshx")
    assert [str(w.message) for w in caught] == ["other", "asyncsshx"]
