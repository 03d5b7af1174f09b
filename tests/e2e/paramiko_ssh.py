"""An `ssh` for git built on paramiko (run by Debian's python3 with its python3-paramiko).

git runs it as GIT_SSH_COMMAND with GIT_SSH_VARIANT=ssh:
    paramiko_ssh.py KEY KNOWN_HOSTS [-o SendEnv=GIT_PROTOCOL] [-p PORT] user@host COMMAND
It checks the host key against KNOWN_HOSTS (unknown or different: refused), runs COMMAND
and relays stdin, stdout, stderr and the exit status, so git's whole clone or push goes
through paramiko's transport.
"""

from __future__ import annotations

import os
import select
import sys
import threading

import paramiko


def parse(argv: list[str]) -> tuple[str, int, str, str]:
    """(user, port, host, command) from what git passes to an OpenSSH-like command."""
    port, rest = 22, list(argv)
    while rest and rest[0].startswith("-"):
        flag = rest.pop(0)
        if flag == "-p":
            port = int(rest.pop(0))
        elif flag == "-o":
            rest.pop(0)  # SendEnv=GIT_PROTOCOL: the variable is forwarded below anyway
    destination, command = rest[0], " ".join(rest[1:])
    user, _, host = destination.rpartition("@")
    return user or "git", port, host, command


def pump_stdin(channel: paramiko.Channel) -> None:
    while data := os.read(0, 65536):
        channel.sendall(data)
    channel.shutdown_write()


def main() -> int:
    key, known_hosts, *args = sys.argv[1:]
    user, port, host, command = parse(args)
    client = paramiko.SSHClient()
    client.load_host_keys(known_hosts)
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    client.connect(
        host,
        port,
        username=user,
        key_filename=key,
        look_for_keys=False,
        allow_agent=False,
        timeout=30,
    )
    transport = client.get_transport()
    assert transport is not None
    print(
        f"paramiko {paramiko.__version__}: cipher {transport.local_cipher} "
        f"mac {transport.local_mac}",
        file=sys.stderr,
    )
    channel = transport.open_session()
    if "GIT_PROTOCOL" in os.environ:
        channel.set_environment_variable("GIT_PROTOCOL", os.environ["GIT_PROTOCOL"])
    channel.exec_command(command)
    threading.Thread(target=pump_stdin, args=(channel,), daemon=True).start()
    while True:
        select.select([channel], [], [], 30)
        while channel.recv_stderr_ready():
            os.write(2, channel.recv_stderr(65536))
        while channel.recv_ready():
            data = channel.recv(65536)
            if not data:
                break
            os.write(1, data)
        if (
            channel.exit_status_ready()
            and not channel.recv_ready()
            and not channel.recv_stderr_ready()
        ):
            break
    status = channel.recv_exit_status()
    client.close()
    return status


if __name__ == "__main__":
    sys.exit(main())
