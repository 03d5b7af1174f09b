"""What `check` and `serve` say when bwrap cannot build the deploy sandbox: one line, with
the fix for where it runs (a container runtime's defaults, or the host's namespaces)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from gateway.deploys import sandbox as sb
from gateway.deploys.network import Network


class FailedBwrap:
    """What spawn returns when bwrap exits at once with one error line."""

    returncode = 1
    pid = 0  # no sandbox process, so no pasta to wait for

    def __init__(self, line: str) -> None:
        self.line = line

    async def communicate(self) -> tuple[bytes, bytes]:
        return b"", f"{self.line}\n".encode()


def refusal(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, line: str) -> str:
    box = sb.Sandbox(
        "bubblewrap", (), (), Network("host"), None, sb.Limits(1, 1, 1, 1, 1, 1), "bwrap", "prlimit"
    )

    async def spawn(self: sb.Sandbox, argv: list[str], **kwargs: object) -> FailedBwrap:
        return FailedBwrap(line)

    monkeypatch.setattr(sb.Sandbox, "spawn", spawn)
    with pytest.raises(sb.SandboxError) as refused:
        asyncio.run(sb.probe(box, tmp_path / "builds"))
    message = str(refused.value)
    assert "\n" not in message
    assert not list((tmp_path / "builds").iterdir())  # the probe's directory is gone
    return message


@pytest.mark.parametrize(
    "line",
    [
        # podman's default seccomp profile: sethostname needs CAP_SYS_ADMIN
        "bwrap: Can't set hostname to deploy: Operation not permitted",
        # the runtime's masks over /proc (kcore, keys, sys...)
        "bwrap: Can't mount proc on /newroot/proc: Operation not permitted",
    ],
)
def test_container_defaults_name_the_runtime_flags(monkeypatch, tmp_path, line):
    message = refusal(monkeypatch, tmp_path, line)
    assert message.startswith(f"deploy sandbox cannot be built: {line}: in a container, ")
    assert "--security-opt seccomp=unconfined --security-opt unmask=/proc/*" in message
    assert "systempaths=unconfined" in message and "docs/container.md" in message
    assert message.endswith('or set [deploy] sandbox = "none" (single-tenant installations only)')


def test_no_user_namespaces_names_the_sysctls(monkeypatch, tmp_path):
    line = "bwrap: No permissions to create new namespace, likely because the kernel does not"
    message = refusal(monkeypatch, tmp_path, line)
    assert "sysctl user.max_user_namespaces" in message
    assert "in a container: the runtime flags in docs/container.md" in message
    assert "unmask=/proc/*" not in message
