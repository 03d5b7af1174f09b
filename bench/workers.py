"""`python -m bench --workers N`: concurrent clone throughput with 1 and with N workers.

The same gateway (same repository, registry and settings) is started with `[server]
workers = 1`, then N, taking turns at each repetition; each round runs as many concurrent
bare clones as asked (`--clones`, default 4 per worker of the larger side) and reports the
clones per second (median of the repetitions) and the ratio N / 1.
"""

from __future__ import annotations

import getpass
import re
import statistics
import subprocess
import time
from pathlib import Path

from . import repogen
from .servers import TIMEOUT, Gateway, cpu_seconds, run

LIMITS = (
    "[limits]\nmax_connections = 5000\nmax_connections_per_address = 5000\n"
    "max_unauthenticated = 500\nuser_ops_per_minute = 100000\n"
    "max_connections_per_user = 5000\nmax_fetches_per_user = 5000\nmax_pushes_per_user = 5000\n"
)


def gateway_pids(gateway: Gateway) -> list[int]:
    """The gateway's Python processes: the supervisor and its workers, or the one process."""
    log = (gateway.state / "gateway.log").read_text(errors="replace")
    match = re.search(r"event=workers_ready .*pids=([\d,]+)", log)
    return [int(p) for p in match.group(1).split(",")] if match else [gateway.pid]


def clone_round(
    port: int, count: int, work: Path, env: dict[str, str], pids: list[int]
) -> tuple[float, int, float]:
    """`count` bare clones at once: (seconds for all of them, failures, the busiest
    gateway process's CPU use in cores: near 1.0 means it was the bottleneck)."""
    before = [cpu_seconds(pid)[0] for pid in pids]
    started = time.perf_counter()
    procs = [
        subprocess.Popen(
            [
                "git",
                "clone",
                "-q",
                "--bare",
                f"ssh://git@127.0.0.1:{port}/bench.git",
                str(work / f"c{i}"),
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for i in range(count)
    ]
    failures = sum(1 for p in procs if p.wait(TIMEOUT) != 0)
    seconds = time.perf_counter() - started
    busiest = max(cpu_seconds(pid)[0] - b for pid, b in zip(pids, before, strict=True))
    run(["rm", "-rf", *(str(work / f"c{i}") for i in range(count))])
    return seconds, failures, busiest / seconds


def raw_round(
    port: int, count: int, request: bytes, env: dict[str, str], pids: list[int]
) -> tuple[float, int, float]:
    """`count` raw pack streams at once (a scripted upload-pack request, the pack thrown
    away: no index-pack on the client, so the transport is what is measured)."""
    before = [cpu_seconds(pid)[0] for pid in pids]
    started = time.perf_counter()
    ssh = [*env["GIT_SSH_COMMAND"].split(), "-p", str(port), "git@127.0.0.1"]
    procs = [
        subprocess.Popen(
            [*ssh, "git-upload-pack 'bench.git'"],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(count)
    ]
    for proc in procs:
        proc.stdin.write(request)  # type: ignore[union-attr]
        proc.stdin.close()  # type: ignore[union-attr]
    failures = sum(1 for p in procs if p.wait(TIMEOUT) != 0)
    seconds = time.perf_counter() - started
    busiest = max(cpu_seconds(pid)[0] - b for pid, b in zip(pids, before, strict=True))
    return seconds, failures, busiest / seconds


def pack_request(repo: Path) -> bytes:
    def pkt(text: str) -> bytes:
        return f"{len(text) + 4:04x}".encode() + text.encode()

    wants = sorted(set(run(["git", "for-each-ref", "--format=%(objectname)"], cwd=repo).split()))
    request = pkt(f"want {wants[0]} side-band-64k ofs-delta no-progress\n")
    return request + b"".join(pkt(f"want {w}\n") for w in wants[1:]) + b"0000" + pkt("done\n")


def measure(root: Path, profile: str, workers: int, clones: int, reps: int) -> dict[str, object]:
    key = root / "id_ed25519"
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)])
    pubkey = Path(f"{key}.pub").read_text()
    generated = root / "generated.git"
    repogen.generate(generated, repogen.PROFILES[profile])
    sides = {1: Gateway(root / "one", LIMITS, workers=1)}
    sides[workers] = Gateway(root / "many", LIMITS, workers=workers)
    for gateway in sides.values():
        gateway.cli("user", "add", "bench")
        gateway.cli("key", "add", "bench", "k", "-", stdin=pubkey)
        gateway.cli("app", "create", "bench", "--owner", "bench")
        repo = gateway.repos / "bench.git"
        run(["git", "fetch", "-q", str(generated), "+refs/heads/*:refs/heads/*"], cwd=repo)
        run(["git", "repack", "-adq"], cwd=repo)
    known = root / "known_hosts"
    try:
        for gateway in sides.values():
            gateway.start()
        known.write_text(
            "".join(f"[127.0.0.1]:{g.port} {k}\n" for g in sides.values() for k in g.host_keys())
        )
        ssh = (
            f"ssh -F /dev/null -i {key} -o IdentitiesOnly=yes -o IdentityAgent=none "
            f"-o BatchMode=yes -o StrictHostKeyChecking=yes -o UserKnownHostsFile={known}"
        )
        env = {
            "PATH": "/usr/bin:/bin",
            "HOME": str(root),
            "GIT_SSH_COMMAND": ssh,
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_CONFIG_GLOBAL": "/dev/null",
            "LC_ALL": "C",
        }
        work = root / "work"
        work.mkdir()
        pids = {n: gateway_pids(g) for n, g in sides.items()}
        clone_round(sides[1].port, 2, work, env, pids[1])  # warm the page cache
        seconds: dict[int, list[float]] = {n: [] for n in sides}
        busiest: dict[int, list[float]] = {n: [] for n in sides}
        raw: dict[int, list[float]] = {n: [] for n in sides}
        raw_busiest: dict[int, list[float]] = {n: [] for n in sides}
        request = pack_request(sides[1].repos / "bench.git")
        failures = {n: 0 for n in sides}
        for rep in range(reps):
            order = sorted(sides) if rep % 2 == 0 else sorted(sides, reverse=True)
            for n in order:
                took, failed, busy = clone_round(sides[n].port, clones, work, env, pids[n])
                seconds[n].append(took)
                busiest[n].append(busy)
                took, failed, busy = raw_round(sides[n].port, clones, request, env, pids[n])
                raw[n].append(took)
                raw_busiest[n].append(busy)
                failures[n] += failed
                failures[n] += failed
    finally:
        codes = {n: g.stop() for n, g in sides.items()}
    # SQLite shared by several processes: no write may have failed on its lock.
    locked = {
        str(n): (g.state / "gateway.log").read_text(errors="replace").count("database is locked")
        for n, g in sides.items()
    }
    rate = {n: clones / statistics.median(s) for n, s in seconds.items()}
    pack = repogen.pack_size(sides[1].repos / "bench.git")
    raw_rate = {n: clones * pack / statistics.median(s) / 1e6 for n, s in raw.items()}
    return {
        "workers": workers,
        "clones": clones,
        "reps": reps,
        "profile": profile,
        "pack_bytes": repogen.pack_size(generated),
        "seconds": {str(n): [round(s, 3) for s in v] for n, v in seconds.items()},
        "clones_per_s": {str(n): round(r, 2) for n, r in rate.items()},
        "ratio": round(rate[workers] / rate[1], 2),
        "raw_pack_mb_per_s": {str(n): round(r, 1) for n, r in raw_rate.items()},
        "raw_pack_ratio": round(raw_rate[workers] / raw_rate[1], 2),
        "raw_pack_busiest_process_cores": {
            str(n): round(statistics.median(v), 2) for n, v in raw_busiest.items()
        },
        "failures": {str(n): f for n, f in failures.items()},
        "busiest_process_cores": {
            str(n): round(statistics.median(v), 2) for n, v in busiest.items()
        },
        "database_locked": locked,
        "exit_codes": {str(n): c for n, c in codes.items()},
        "user": getpass.getuser(),
    }


def report(figures: dict[str, object]) -> str:
    rate: dict[str, float] = figures["clones_per_s"]  # type: ignore[assignment]
    seconds: dict[str, list[float]] = figures["seconds"]  # type: ignore[assignment]
    lines = [
        f"{figures['clones']} concurrent bare clones ({figures['profile']} profile, "
        f"{figures['reps']} repetitions, medians)"
    ]
    for n in rate:
        lines.append(
            f"  {n:>3} worker(s): {statistics.median(seconds[n]):.3f} s per round, "
            f"{rate[n]:.2f} clones/s, failures {figures['failures'][n]}, busiest gateway "  # type: ignore[index]
            f"process {figures['busiest_process_cores'][n]} cores"  # type: ignore[index]
        )
    lines.append(f"  {figures['workers']} workers / 1: {figures['ratio']}x the throughput")
    mbps: dict[str, float] = figures["raw_pack_mb_per_s"]  # type: ignore[assignment]
    cores: dict[str, float] = figures["raw_pack_busiest_process_cores"]  # type: ignore[assignment]
    lines.append(f"{figures['clones']} concurrent raw pack streams (no index-pack), medians")
    for n in mbps:
        lines.append(
            f"  {n:>3} worker(s): {mbps[n]} MB/s, busiest gateway process {cores[n]} cores"
        )
    lines.append(f"  {figures['workers']} workers / 1: {figures['raw_pack_ratio']}x")
    lines.append(f"  'database is locked' in the gateways' logs: {figures['database_locked']}")
    return "\n".join(lines)
