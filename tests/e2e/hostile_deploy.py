"""A hostile tenant's deploy script: it tries every escape from its deploy and records what
happened to each attempt. It reads its targets from `targets.json` in the pushed tree (paths
of the gateway's secrets and of another tenant's data, as an attacker would guess or learn
them) and writes its findings, as JSON, to the `report` path given there."""

import errno
import json
import os
import socket
import sys


def attempt(action):
    """'denied: <reason>' if the action failed, 'ALLOWED' (with what it got) if it worked."""
    try:
        result = action()
    except OSError as exc:
        return f"denied: {errno.errorcode.get(exc.errno, exc.errno)}"
    except Exception as exc:
        return f"denied: {type(exc).__name__}"
    return f"ALLOWED: {str(result)[:200]}"


def read(path):
    with open(path, "rb") as handle:
        return handle.read(64)


def write(path, data=b"#!/bin/sh\ntouch /tmp/pwned\n"):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o755)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    return "written"


def connect_unix(path, payload):
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(5)
    conn.connect(path)
    conn.sendall(json.dumps(payload).encode() + b"\n")
    return conn.recv(4096)


def connect_tcp(port):
    conn = socket.create_connection(("127.0.0.1", port), timeout=5)
    return conn.recv(64)


def listdir(path):
    return sorted(os.listdir(path))[:20]


def processes():
    """The pids this process can see (its own PID namespace only, if sandboxed)."""
    return sorted(int(name) for name in os.listdir("/proc") if name.isdigit())


def nested_namespace():
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(0x10000000) != 0:  # CLONE_NEWUSER
        raise OSError(ctypes.get_errno(), "unshare")
    return "new user namespace"


def no_new_privs():
    with open("/proc/self/status") as status:
        return [line.split()[1] for line in status if line.startswith("NoNewPrivs")]


def main():
    with open("targets.json") as handle:
        targets = json.load(handle)
    found = {}
    found["read registry"] = attempt(lambda: read(targets["database"]))
    found["read host key"] = attempt(lambda: read(targets["host_key"]))
    found["read config"] = attempt(lambda: read(targets["config"]))
    found["list repositories"] = attempt(lambda: listdir(targets["repos"]))
    found["plant hook in victim repo"] = attempt(
        lambda: write(os.path.join(targets["victim_repo"], "hooks", "post-update"))
    )
    found["read victim deploy log"] = attempt(lambda: read(targets["victim_log"]))
    found["list deploy logs"] = attempt(lambda: listdir(targets["log_dir"]))
    found["cancel victim deploy over the control socket"] = attempt(
        lambda: connect_unix(
            targets["control_socket"], {"op": "cancel", "deploy": targets["victim_deploy"]}
        )
    )
    found["follow victim deploy over the control socket"] = attempt(
        lambda: connect_unix(
            targets["control_socket"], {"op": "follow", "deploy": targets["victim_deploy"]}
        )
    )
    found["read gateway environ"] = attempt(lambda: read(f"/proc/{targets['gateway_pid']}/environ"))
    found["read gateway memory map"] = attempt(lambda: read(f"/proc/{targets['gateway_pid']}/maps"))
    found["list other builds"] = attempt(lambda: listdir(targets["build_dir"]))
    found["write /usr"] = attempt(lambda: write("/usr/pwned"))
    found["write /etc"] = attempt(lambda: write("/etc/pwned"))
    found["write /"] = attempt(lambda: write("/pwned"))
    found["write /dev"] = attempt(lambda: write("/dev/pwned"))
    found["write /var"] = attempt(lambda: write("/var/pwned"))
    found["read /etc/shadow"] = attempt(lambda: read("/etc/shadow"))
    found["nested user namespace"] = attempt(nested_namespace)
    # Facts, not attempts: what the sandbox looks like from inside.
    facts = {
        "pids": processes(),
        "fds": sorted(int(fd) for fd in os.listdir("/proc/self/fd")),
        "uid": os.getuid(),
        "cwd": os.getcwd(),
        "no_new_privs": no_new_privs(),
        "hostname": socket.gethostname(),
        "write /app": attempt(lambda: write("/app/ok")),
        "write /tmp": attempt(lambda: write("/tmp/ok")),
    }
    if "ssh_port" in targets:
        facts["connect gateway ssh"] = attempt(lambda: connect_tcp(targets["ssh_port"]))
    with open(targets["report"], "w") as out:
        json.dump({"attempts": found, "facts": facts}, out, indent=1)
    print("hostile deploy done", flush=True)


if __name__ == "__main__":
    sys.exit(main())
