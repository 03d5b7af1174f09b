"""Load test: N concurrent clones and M pushers across several apps for a fixed time, against
a real gateway process on loopback. Reports successes, failures and latency percentiles.

    python -m bench.load --duration 60 --clones 16 --pushers 4 --apps 4 [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import servers
from .servers import Gateway

OP_TIMEOUT = 120.0


@dataclass
class Stats:
    ok: int = 0
    failed: int = 0
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, object]:
        lat = sorted(self.latencies)

        def pct(p: float) -> float | None:
            return round(lat[min(len(lat) - 1, int(p * len(lat)))], 3) if lat else None

        return {
            "ok": self.ok,
            "failed": self.failed,
            "p50_s": pct(0.50),
            "p99_s": pct(0.99),
            "max_s": round(lat[-1], 3) if lat else None,
            "mean_s": round(statistics.fmean(lat), 3) if lat else None,
            "errors": self.errors[:5],
        }


def run(argv: list[str], env: dict[str, str], cwd: Path | None = None) -> str:
    return servers.run(argv, env, cwd)


async def timed(argv: list[str], env: dict[str, str], cwd: Path | None, stats: Stats) -> bool:
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        *argv, env=env, cwd=cwd, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    try:
        _, err = await asyncio.wait_for(proc.communicate(), OP_TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        stats.failed += 1
        stats.errors.append(f"timeout: {' '.join(argv[:3])}")
        return False
    if proc.returncode == 0:
        stats.ok += 1
        stats.latencies.append(time.monotonic() - started)
        return True
    stats.failed += 1
    stats.errors.append(err.decode(errors="replace").strip().splitlines()[-1:][0] if err else "?")
    return False


async def clone_worker(
    apps: list[str], url, env, work: Path, deadline: float, stats: Stats, n: int
) -> None:
    i = 0
    while time.monotonic() < deadline:
        target = work / f"clone-{n}-{i}"
        await timed(
            ["git", "clone", "-q", url(apps[(n + i) % len(apps)]), str(target)], env, None, stats
        )
        shutil.rmtree(target, ignore_errors=True)
        i += 1


async def push_worker(
    app: str, url, env, work: Path, deadline: float, stats: Stats, n: int
) -> None:
    copy = work / f"push-{n}"
    await asyncio.to_thread(run, ["git", "clone", "-q", url(app), str(copy)], env)
    i = 0
    while time.monotonic() < deadline:
        (copy / f"file-{n}.txt").write_text(f"change {i}\n")
        await asyncio.to_thread(run, ["git", "add", "-A"], env, copy)
        await asyncio.to_thread(run, ["git", "commit", "-qm", f"load {n}.{i}"], env, copy)
        # Each pusher owns a branch: rejections would be races, not load failures.
        await timed(["git", "push", "-q", url(app), f"HEAD:refs/heads/load-{n}"], env, copy, stats)
        i += 1


def client_env(home: Path, key: Path, port: int, known_hosts: Path) -> dict[str, str]:
    ssh = (
        f"ssh -F /dev/null -i {key} -o IdentitiesOnly=yes -o IdentityAgent=none -o BatchMode=yes "
        f"-o StrictHostKeyChecking=yes -o UserKnownHostsFile={known_hosts} -p {port}"
    )
    return {
        "PATH": os.environ["PATH"],
        "HOME": str(home),
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": os.devnull,
        "GIT_AUTHOR_NAME": "load",
        "GIT_AUTHOR_EMAIL": "load@example.com",
        "GIT_COMMITTER_NAME": "load",
        "GIT_COMMITTER_EMAIL": "load@example.com",
        "GIT_SSH_COMMAND": ssh,
        "GIT_TERMINAL_PROMPT": "0",
    }


async def main_async(args: argparse.Namespace) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="gateway-load-") as tmp:
        root = Path(tmp)
        gateway = Gateway(root)
        key = root / "id_ed25519"
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], dict(os.environ))
        gateway.cli("user", "add", "load")
        gateway.cli("key", "add", "load", "k", f"{key}.pub")
        apps = [f"load{i}" for i in range(args.apps)]
        for app in apps:
            gateway.cli("app", "create", app, "--owner", "load")
        gateway.start()
        try:
            return await _load(args, root, gateway, key, apps)
        finally:
            gateway.stop()


async def _load(
    args: argparse.Namespace, root: Path, gateway: Gateway, key: Path, apps: list[str]
) -> dict[str, object]:
    known_hosts = root / "known_hosts"
    known_hosts.write_text(
        "".join(
            f"[127.0.0.1]:{gateway.port} {' '.join(p.read_text().split()[:2])}\n"
            for p in sorted((root / "hostkeys").glob("*.pub"))
        )
    )
    env = client_env(root, key, gateway.port, known_hosts)

    def url(app: str) -> str:
        return f"ssh://git@127.0.0.1:{gateway.port}/{app}.git"

    seed = root / "seed"
    run(["git", "init", "-q", "-b", "main", str(seed)], env)
    for i in range(args.files):
        (seed / f"src{i % 10}").mkdir(exist_ok=True)
        (seed / f"src{i % 10}" / f"f{i}.txt").write_text(f"file {i}\n" * 20)
    run(["git", "add", "-A"], env, seed)
    run(["git", "commit", "-qm", "seed"], env, seed)
    for app in apps:
        run(["git", "push", "-q", url(app), "main"], env, seed)

    clones, pushes = Stats(), Stats()
    started = time.monotonic()
    deadline = started + args.duration
    work = root / "work"
    work.mkdir()
    await asyncio.gather(
        *(clone_worker(apps, url, env, work, deadline, clones, n) for n in range(args.clones)),
        *(
            push_worker(apps[n % len(apps)], url, env, work, deadline, pushes, n)
            for n in range(args.pushers)
        ),
    )
    elapsed = time.monotonic() - started
    exit_code = gateway.stop()
    return {
        "duration_s": round(elapsed, 1),
        "clone_workers": args.clones,
        "push_workers": args.pushers,
        "apps": args.apps,
        "files_per_repo": args.files,
        "clone": {**clones.summary(), "per_s": round(clones.ok / elapsed, 2)},
        "push": {**pushes.summary(), "per_s": round(pushes.ok / elapsed, 2)},
        "gateway_exit_code": exit_code,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.load", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--duration", type=float, default=30, help="seconds of load (default 30)")
    parser.add_argument("--clones", type=int, default=8, help="concurrent clone workers")
    parser.add_argument("--pushers", type=int, default=2, help="concurrent push workers")
    parser.add_argument("--apps", type=int, default=3, help="apps the load is spread over")
    parser.add_argument("--files", type=int, default=200, help="files in each app's repository")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = parser.parse_args(argv)
    report = asyncio.run(main_async(args))
    for kind in ("clone", "push"):
        r = report[kind]
        print(
            f"{kind:<6} ok={r['ok']:<5} failed={r['failed']:<3} p50={r['p50_s']}s "  # type: ignore[index]
            f"p99={r['p99_s']}s max={r['max_s']}s rate={r['per_s']}/s"  # type: ignore[index]
        )
        for error in r["errors"]:  # type: ignore[index]
            print(f"       error: {error}")
    print(f"gateway exit code after SIGTERM: {report['gateway_exit_code']}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    failed = report["clone"]["failed"] + report["push"]["failed"]  # type: ignore[index]
    return 0 if failed == 0 and report["gateway_exit_code"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
