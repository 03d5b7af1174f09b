"""`git-gateway completion bash|zsh`: the scripts complete commands, subcommands and options
in a real bash (and load in a real zsh)."""

from __future__ import annotations

import io
import shlex
import shutil

import pytest

from gateway import cli
from tests.helpers import run


def completion(shell: str) -> str:
    out = io.StringIO()
    assert cli.main(["completion", shell], out=out) == 0
    return out.getvalue()


def complete(script: str, *words: str) -> list[str]:
    """What bash offers after `git-gateway WORDS...` (the last word is being typed)."""
    quoted = " ".join(shlex.quote(w) for w in ["git-gateway", *words])
    program = (
        f"{script}\nCOMP_WORDS=({quoted})\nCOMP_CWORD={len(words)}\n"
        '_git_gateway; printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    result = run(["bash", "--norc", "--noprofile", "-c", program])
    assert result.returncode == 0, result.stderr
    return [w for w in result.stdout.splitlines() if w]


def test_bash_completes_commands_subcommands_values_and_options():
    script = completion("bash")
    assert "serve" in complete(script, "")
    assert complete(script, "se") == ["serve"]
    assert complete(script, "app", "") == [
        "create", "grant", "key", "list", "members", "remove", "revoke"
    ]  # fmt: skip
    assert complete(script, "app", "key", "") == ["add", "list", "remove"]
    assert complete(script, "--config", "x.toml", "user", "l") == ["list"]
    assert complete(script, "key", "add", "--re") == ["--read-only"]
    assert complete(script, "completion", "") == ["bash", "zsh"]
    assert complete(script, "serve", "--w") == ["--workers"]


def test_completion_needs_no_configuration(tmp_path):
    """It runs from a shell's rc file: a broken or absent config must not break the shell."""
    broken = tmp_path / "broken.toml"
    broken.write_text("[nope\n")
    out = io.StringIO()
    assert cli.main(["--config", str(broken), "completion", "bash"], out=out) == 0
    assert out.getvalue().endswith("complete -o default -F _git_gateway git-gateway\n")


def test_unknown_shell_is_a_usage_error(capsys):
    assert cli.main(["completion", "fish"]) == 2
    assert "invalid choice: 'fish'" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("zsh") is None, reason="zsh is not installed")
def test_zsh_loads_the_script_and_registers_the_completion(tmp_path):
    script = tmp_path / "_git_gateway"
    script.write_text(completion("zsh"))
    program = f"autoload -U compinit && compinit -u -D; source {script}"
    result = run(
        ["zsh", "-f", "-c", f"{program}; print -r -- $_comps[git-gateway]"],
        env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "_bash_complete -o default -F _git_gateway"
