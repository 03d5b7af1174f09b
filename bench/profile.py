"""`python -m bench.profile`: where the gateway's CPU goes in an ls-remote, a clone, a push.

The gateway is started as in the benchmark (one process, SQLite, the generated repository),
then each workload runs `--reps` times while `py-spy record` samples the gateway process (its
Python only: git's own processes are measured by the benchmark). The samples are grouped by
the first frame that names a known part (key exchange and signatures, the registry, spawning
git, the SSH packet path and its ciphers, the event loop), and printed as CPU milliseconds per
operation; `--out DIR` keeps the collapsed stacks (flame graph input) of each workload.
"""

from __future__ import annotations

import argparse
import collections
import getpass
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import repogen
from .servers import TIMEOUT, Gateway, cpu_seconds, run
from .workers import LIMITS

RATE = 500  # samples per second
INSTALL_HINT = "pip install py-spy (it reads the gateway's memory: run as root or its user)"

# (part, where, substrings): a sample goes to the first part whose substrings appear in its
# innermost frame ("leaf": time spent right there, mostly in the system call it makes) or in
# any frame of its stack ("any": everything under that call).
PARTS: list[tuple[str, str, tuple[str, ...]]] = [
    ("key exchange and signatures", "any", ("asyncssh/kex", "crypto/ed.py", "public_key.py")),
    ("SSH ciphers and MACs", "any", ("asyncssh/crypto/", "cryptography/", "encryption.py")),
    ("reading git's pipes (os.read)", "leaf", ("unix_events.py", "PipeReader.read")),
    ("socket reads and writes (TCP)", "leaf", ("selector_events.py",)),
    ("registry (key lookup, rights)", "any", ("aiosqlite", "sqlite3", "gateway/store")),
    ("spawning git", "any", ("subprocess.py", "_execute_child", "posix_spawn")),
    ("epoll (event loop waits)", "leaf", ("selectors.py",)),
    ("asyncssh: packets and channels", "any", ("asyncssh/",)),
    ("gateway's own code", "any", ("gateway/",)),
    ("asyncio: scheduling", "any", ("asyncio/",)),
]


def part_of(stack: str) -> str:
    frames = stack.split(";")
    for part, where, needles in PARTS:
        for frame in frames[-1:] if where == "leaf" else frames:
            if any(needle in frame for needle in needles):
                return part
    return "other (threads, logging, metrics)"


def summarize(collapsed: Path, operations: int) -> dict[str, float]:
    """CPU milliseconds per operation, by part, from py-spy's collapsed stacks."""
    counts: collections.Counter[str] = collections.Counter()
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            counts[part_of(stack)] += int(count)
    return {part: n * 1000 / RATE / operations for part, n in counts.most_common()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("--profile", choices=sorted(repogen.PROFILES), default="small")
    parser.add_argument("--reps", type=int, default=20, help="operations per workload")
    parser.add_argument("--out", type=Path, help="keep the collapsed stacks here")
    args = parser.parse_args(argv)
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(py_spy).exists():
        raise SystemExit(f"py-spy not found: {INSTALL_HINT}")
    with tempfile.TemporaryDirectory(prefix="gateway-profile-") as tmp:
        root = Path(tmp)
        out = args.out or root / "stacks"
        out.mkdir(parents=True, exist_ok=True)
        key = root / "id_ed25519"
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)])
        gateway = Gateway(root / "gateway", LIMITS)
        gateway.cli("user", "add", "bench")
        gateway.cli("key", "add", "bench", "k", "-", stdin=Path(f"{key}.pub").read_text())
        gateway.cli("app", "create", "bench", "--owner", "bench")
        gateway.cli("app", "create", "pushed", "--owner", "bench")
        source = root / "source.git"
        repogen.generate(source, repogen.PROFILES[args.profile])
        env = {
            "PATH": "/usr/bin:/bin",
            "HOME": str(root),
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_CONFIG_GLOBAL": "/dev/null",
        }
        repo = gateway.repos / "bench.git"
        run(["git", "fetch", "-q", str(source), "+refs/heads/*:refs/heads/*"], env, repo)
        run(["git", "repack", "-adq"], env, repo)
        gateway.start()
        try:
            known = root / "known_hosts"
            known.write_text(
                "".join(f"[127.0.0.1]:{gateway.port} {k}\n" for k in gateway.host_keys())
            )
            env["GIT_SSH_COMMAND"] = (
                f"ssh -F /dev/null -i {key} -o IdentitiesOnly=yes -o IdentityAgent=none"
                f" -o BatchMode=yes -o UserKnownHostsFile={known}"
            )
            url = f"ssh://git@127.0.0.1:{gateway.port}"
            user = getpass.getuser()
            print(f"profiling pid {gateway.pid} as {user}, {args.reps} of each", file=sys.stderr)

            def ls_remote(i: int) -> None:
                run(["git", "ls-remote", f"{url}/bench.git"], env)

            def clone(i: int) -> None:
                run(["git", "clone", "-q", "--bare", f"{url}/bench.git", str(root / "c")], env)
                shutil.rmtree(root / "c")

            def push(i: int) -> None:
                branch = f"refs/heads/p{i}"
                run(["git", "push", "-q", f"{url}/pushed.git", f"main:{branch}"], env, source)

            report: dict[str, dict[str, float]] = {}
            wall: dict[str, float] = {}
            cpu: dict[str, dict[str, float]] = {}
            for name, step in (("ls_remote", ls_remote), ("clone_bare", clone), ("push", push)):
                stacks = out / f"{name}.collapsed"
                spy = subprocess.Popen(
                    [
                        *(py_spy, "record", "-p", str(gateway.pid), "-r", str(RATE)),
                        *("-f", "raw", "-o", str(stacks), "--nonblocking"),
                    ],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
                if spy.stdout is None:  # pragma: no cover - PIPE requested
                    raise RuntimeError("no stdout pipe")
                try:
                    # py-spy says "Sampling process ..." once it is attached.
                    first = spy.stdout.readline()
                    if "Sampling" not in first:
                        raise SystemExit(f"py-spy did not attach: {first.strip()} ({INSTALL_HINT})")
                    before = cpu_seconds(gateway.pid), _client_cpu()
                    started = time.perf_counter()
                    for i in range(args.reps):
                        step(i)
                    wall[name] = (time.perf_counter() - started) / args.reps
                    (own, git), client = cpu_seconds(gateway.pid), _client_cpu()
                finally:
                    spy.send_signal(2)  # SIGINT: py-spy writes its file and exits
                    spy.communicate(timeout=TIMEOUT)
                cpu[name] = {
                    "gateway": (own - before[0][0]) / args.reps,
                    "git": (git - before[0][1]) / args.reps,
                    "client": (client - before[1]) / args.reps,
                }
                report[name] = summarize(stacks, args.reps)
        finally:
            gateway.stop()
    for name, parts in report.items():
        total = sum(parts.values())
        used = cpu[name]
        print(f"\n{name}, per operation: {wall[name] * 1000:.1f} ms wall (the client's),")
        print(
            f"  CPU: gateway {used['gateway'] * 1000:.1f} ms (py-spy sampled {total:.1f}),"
            f" its git processes {used['git'] * 1000:.1f} ms,"
            f" client (git + ssh) {used['client'] * 1000:.1f} ms; the gateway's samples:"
        )
        for part, ms in parts.items():
            print(f"    {part:34s} {ms:7.2f} ms  {ms / total:6.1%}")
    return 0


def _client_cpu() -> float:
    """CPU seconds of this process's finished children: the git clients and their ssh."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


if __name__ == "__main__":
    sys.exit(main())
