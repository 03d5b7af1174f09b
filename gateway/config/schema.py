"""The settings table: one frozen dataclass per section, each key declared with `_setting`
(raw default, parser, description), and `Config`, the whole of them."""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .cluster import ClusterSettings
from .parse import (
    _algorithms,
    _argv,
    _bool,
    _branch,
    _choice,
    _count,
    _database,
    _days,
    _help_url,
    _http_url,
    _keep,
    _listen,
    _network,
    _networks,
    _nonempty,
    _optional_listen,
    _optional_path,
    _path,
    _paths,
    _principal_map,
    _public_address,
    _sandbox_user,
    _seconds,
    _seconds_int,
    _seconds_or_zero,
    _setting,
    _size,
    _ssh_user,
    _string,
    _workers,
)

DEFAULT_CONFIG_FILE = Path("config/gateway.toml")
CONFIG_ENV = "GATEWAY_CONFIG"
# Overrides [storage] database, so that a PostgreSQL password need not sit in a file.
DATABASE_ENV = "GATEWAY_DATABASE_URL"


@dataclass(frozen=True)
class ServerSettings:
    workers: int = _setting(
        0,
        _workers,
        "gateway processes accepting on the SSH port (0 = one per CPU core); `serve --workers N`"
        " overrides it; worker 0 also serves HTTP",
    )
    # A balancer learns that a node drains from its health checks only: closing the listener
    # before it has noticed would refuse the connections it still sends (issue 19).
    drain_accept_seconds: float = _setting(
        5,
        _seconds_or_zero,
        "on SIGTERM, seconds the SSH listener keeps accepting while /readyz answers 503, so"
        " that a balancer's health checks notice first (HAProxy's `inter 2s fall 2` takes up to"
        " 4 s); then the drain ([limits] drain_timeout) begins; 0 = close the listener at once",
    )


@dataclass(frozen=True)
class SSHSettings:
    listen: tuple[str, int] = _setting(
        "127.0.0.1:2222", _listen, "address the SSH server binds; port 0 picks a free port"
    )
    host_key_dir: Path = _setting(
        "config/host_keys", _path, "where host keys are generated on first start and reused"
    )
    user: str = _setting("git", _ssh_user, "the only SSH user name accepted")
    help_url: str = _setting(
        "", _help_url, "where users add keys, shown when a login is refused (http(s) URL)"
    )
    public_address: str = _setting(
        "", _public_address, "HOST[:PORT] shown in clone URLs; defaults to the listen address"
    )
    login_timeout: float = _setting(
        60, _seconds, "seconds an unauthenticated connection may take to log in"
    )
    keepalive_interval: float = _setting(
        30, _seconds, "seconds between keepalives to detect dead clients"
    )
    # Behind a TCP load balancer, the PROXY protocol header carries the client's address.
    # Only balancers in proxy_allowed are believed: anyone else could claim any address.
    proxy_protocol: str = _setting(
        "off",
        _choice("off", "optional", "required"),
        "PROXY protocol v1/v2 on the SSH listener: off | optional | required",
    )
    proxy_allowed: tuple[str, ...] = _setting(
        [],
        _networks,
        "balancer addresses (CIDR) whose PROXY headers are trusted; others are refused "
        "(required) or served without a header (optional)",
    )
    proxy_header_timeout: float = _setting(
        5, _seconds, "seconds a trusted balancer has to send the PROXY header"
    )
    # SSH user certificates (see gateway/ssh/certs.py and docs/access.md): off without CA keys.
    trusted_user_ca_keys: Path | None = _setting(
        "",
        _optional_path,
        "file of CA public keys (OpenSSH lines) whose user certificates log in; empty: off",
    )
    principals: dict[str, str] = _setting(
        {},
        _principal_map,
        "certificate principal -> user name; empty: a principal is taken as the user name",
    )
    revoked_certificates: Path | None = _setting(
        "",
        _optional_path,
        "file of revoked certificates (`serial N`, `key-id TEXT`, `key SHA256:...` lines), "
        "re-read when it changes",
    )
    # Crypto policy: modern algorithms only (no SHA-1 key exchange, signatures or MACs, no
    # CBC); asyncssh negotiates strict KEX (Terrapin) with every client that offers it.
    # Ciphers: every maintained client must get in, so we offer the three families they
    # share: AES-GCM, chacha20-poly1305 and AES-CTR. With AES-GCM alone, Dropbear (2022.83),
    # libssh2 before 1.11 (libgit2 tools on Debian 12), paramiko before 3.5 and OpenSSH
    # configs pinning chacha20 or AES-CTR had no cipher in common with us. The client's
    # preference picks, so default OpenSSH clients now use chacha20: measured, ~12% slower
    # clones and ~34% slower raw pack streams than AES-GCM in asyncssh, still ahead of
    # OpenSSH + git (docs/benchmark.md).
    # MACs (used with AES-CTR only): SHA-2 encrypt-then-MAC, and one encrypt-and-MAC SHA-2
    # MAC, hmac-sha2-256, because Dropbear 2022.83 and libssh2 1.10 have no ETM MACs and
    # AES-CTR is the only cipher libssh2 1.10 shares with us. SSH's encrypt-and-MAC with
    # CTR is the construction proven secure for RFC 4344, and Terrapin's prefix truncation
    # breaks it instead of exploiting it (after a dropped packet the MAC over the decrypted
    # plaintext fails). OpenSSH prefers the ETM MACs; PuTTY and paramiko 2.x list
    # hmac-sha2-256 first and take it. Non-ETM hmac-sha2-512 would serve no client that
    # lacks hmac-sha2-256. No UMAC: asyncssh has it only when libnettle loads, so a default
    # naming it stops the gateway on hosts without that library, and every client with
    # UMAC also has the SHA-2 ETM MACs.
    kex_algorithms: tuple[str, ...] = _setting(
        [
            "mlkem768x25519-sha256",
            "curve25519-sha256",
            "curve25519-sha256@libssh.org",
            "ecdh-sha2-nistp256",
            "ecdh-sha2-nistp384",
            "ecdh-sha2-nistp521",
            "diffie-hellman-group-exchange-sha256",
            "diffie-hellman-group16-sha512",
            "diffie-hellman-group18-sha512",
            "diffie-hellman-group14-sha256",
        ],
        _algorithms("kex"),
        "key exchange algorithms offered",
    )
    ciphers: tuple[str, ...] = _setting(
        [
            "aes128-gcm@openssh.com",
            "aes256-gcm@openssh.com",
            "chacha20-poly1305@openssh.com",
            "aes128-ctr",
            "aes192-ctr",
            "aes256-ctr",
        ],
        _algorithms("cipher"),
        "ciphers offered (the client's preference picks one)",
    )
    macs: tuple[str, ...] = _setting(
        [
            "hmac-sha2-256-etm@openssh.com",
            "hmac-sha2-512-etm@openssh.com",
            "hmac-sha2-256",
        ],
        _algorithms("mac"),
        "MACs offered with AES-CTR (AES-GCM and chacha20-poly1305 authenticate themselves)",
    )
    signature_algorithms: tuple[str, ...] = _setting(
        [
            "ssh-ed25519",
            "sk-ssh-ed25519@openssh.com",
            "ecdsa-sha2-nistp256",
            "ecdsa-sha2-nistp384",
            "ecdsa-sha2-nistp521",
            "sk-ecdsa-sha2-nistp256@openssh.com",
            "rsa-sha2-512",
            "rsa-sha2-256",
        ],
        _algorithms("public key"),
        "signature algorithms for host keys and user keys (no SHA-1 ssh-rsa, no DSA)",
    )


@dataclass(frozen=True)
class StorageSettings:
    repos: Path = _setting("repos", _path, "root directory of the apps' bare repositories")
    database: Path | str = _setting(
        "var/gateway.db",
        _database,
        f"the registry: a SQLite file, or a URL postgresql://USER@HOST:PORT/DB; ${DATABASE_ENV}"
        " overrides it",
    )
    control_socket: Path = _setting(
        "var/gateway.sock",
        _path,
        "Unix socket the repository hooks and the CLI reach the server on",
    )


@dataclass(frozen=True)
class GitSettings:
    binary: str = _setting("git", _nonempty, "git executable (name on PATH or absolute path)")
    max_input_size: int = _setting(
        "2G", _size, "largest pack a push may send (receive.maxInputSize)"
    )
    pack_cache: bool = _setting(
        True,
        _bool,
        "pack-objects cache: identical concurrent fetches share one pack-objects run, and an"
        " answer requested twice is kept on disk for the next ones",
    )
    pack_cache_dir: Path | None = _setting(
        "",
        _optional_path,
        "the node's pack cache directory, private (0700); empty = beside the control socket"
        " (`<control_socket>.pack-cache`)",
    )
    pack_cache_max_size: int = _setting(
        "1G",
        _size,
        "disk the pack cache may take, packs being sent included (even removed ones still"
        " read); the oldest cached packs go first, and a fetch that finds it full is answered"
        " uncached",
    )
    pack_cache_max_age: float = _setting(
        300, _seconds, "seconds a cached pack is served after it was written"
    )
    pack_cache_max_markers: int = _setting(
        10000,
        _count,
        "requests remembered (an empty file each) to keep an answer at its second request;"
        " the least recent go first",
    )


@dataclass(frozen=True)
class LogSettings:
    level: str = _setting("info", _choice("debug", "info", "warning", "error"), "log level")
    format: str = _setting("text", _choice("text", "json"), "text (key=value) or json lines")


@dataclass(frozen=True)
class LimitSettings:
    max_connections: int = _setting(1000, _count, "open connections in total")
    max_connections_per_address: int = _setting(
        200, _count, "open connections from one source address (CI fan-out behind NAT)"
    )
    max_unauthenticated: int = _setting(
        100, _count, "connections still logging in (like OpenSSH MaxStartups)"
    )
    max_sessions_per_connection: int = _setting(
        10, _count, "session channels open at once on one connection, counted from the open"
    )
    channel_request_timeout: float = _setting(
        10,
        _seconds,
        "seconds a newly opened session channel has to ask for a command before it is closed",
    )
    max_auth_attempts: int = _setting(
        12, _count, "public keys a connection may offer, probes included"
    )
    idle_timeout: float = _setting(
        600, _seconds, "seconds a git transfer may go without a byte either way"
    )
    user_ops_per_minute: int = _setting(
        600, _count, "git operations per user per minute (bursts up to that many)"
    )
    max_keys_per_user: int = _setting(
        100, _count, "SSH keys one account may register (CLI, API, keys page and SSH alike)"
    )
    drain_timeout: float = _setting(
        60,
        _seconds,
        "on SIGTERM, once the SSH listener is closed, seconds to let running operations and"
        " deploys finish",
    )
    max_commit_size: int = _setting(
        "1M",
        _size,
        "largest commit or tag object (message and headers) a push may bring; receive's "
        "max_input_size bounds the compressed pack only, which a repeated message beats 1000:1",
    )
    max_connections_per_user: int = _setting(
        64,
        _count,
        "authenticated connections of one account (or one deploy key) open at once on this"
        " node, every worker counted; a ControlMaster's sessions are one connection",
    )
    max_fetches_per_user: int = _setting(
        64,
        _count,
        "git upload-pack and upload-archive processes (clones, fetches, archives) one account"
        " or deploy key runs at once on this node, every worker counted",
    )
    max_pushes_per_user: int = _setting(
        16,
        _count,
        "git receive-pack processes (pushes) one account or deploy key runs at once on this"
        " node, every worker counted",
    )


DEPLOY_MODES = ("attached", "detached", "gate")


@dataclass(frozen=True)
class DeploySettings:
    branch: str = _setting("main", _branch, "deploy branch of new apps (app create --branch)")
    command: tuple[str, ...] = _setting(
        [], _argv, "deploy command as an argument list, run without a shell"
    )
    webhook_url: str = _setting("", _http_url, "deploy webhook: JSON POSTed on each deploy")
    webhook_secret: str = _setting("", _string, "HMAC-SHA256 key signing webhook bodies")
    mode: str = _setting("attached", _choice(*DEPLOY_MODES), "attached, detached or gate")
    timeout: float = _setting(600, _seconds, "seconds before a deploy is killed (timed_out)")
    max_parallel: int = _setting(
        4, _count, "deploys running at once on this machine (its node_name), across all apps"
    )
    log_limit: int = _setting("1M", _size, "deploy log kept per deploy (the tail is kept)")
    log_dir: Path = _setting(
        "var/deploys",
        _path,
        "where earlier versions wrote deploy log files; imported into the registry at start",
    )
    webhook_timeout: float = _setting(10, _seconds, "seconds per webhook delivery attempt")
    webhook_attempts: int = _setting(4, _count, "webhook delivery attempts (retries back off)")
    webhook_backoff: float = _setting(
        1, _seconds, "seconds before the first webhook retry; doubles each time (max 60)"
    )
    # The sandbox every deploy command runs in (docs/deploys.md, "What a deploy can see and touch").
    sandbox: str = _setting(
        "bubblewrap",
        _choice("bubblewrap", "none"),
        'bubblewrap: deploy commands run in a bubblewrap sandbox; "none": as the gateway '
        "itself, with everything it can reach (single-tenant installations only)",
    )
    sandbox_read_paths: tuple[Path, ...] = _setting(
        [],
        _paths,
        "extra host paths bound read-only into the sandbox at the same place (a toolchain "
        "outside /usr, the operator's deploy program and its interpreter)",
    )
    sandbox_write_paths: tuple[Path, ...] = _setting(
        [], _paths, "extra host paths bound writable into the sandbox (e.g. a shared build cache)"
    )
    network: str = _setting(
        "isolated",
        _network,
        '"isolated": their own network namespace, outbound TCP and UDP through pasta, none of '
        'the host\'s loopback or unix sockets; "none": loopback only; "host": the host\'s '
        "network (its loopback too); true and false, from earlier versions, mean isolated "
        "and none",
    )
    sandbox_user: str = _setting(
        "",
        _sandbox_user,
        "user (name or uid) deploy commands run as when the gateway runs as root (required "
        "then); otherwise they run as the gateway's own user",
    )
    build_dir: Path | None = _setting(
        "",
        _optional_path,
        "where each deploy's export directory is created (then removed); empty: var/builds, "
        "or, for a gateway running as root, /var/lib/git-gateway-builds/HASH (one per control "
        "socket), which the sandbox user can reach wherever the gateway's own files are",
    )
    max_export_size: int = _setting(
        "1G", _size, "largest tree a deploy exports (the tar stream of the pushed commit)"
    )
    max_output: int = _setting(
        "1G", _size, "output a deploy may print before it is stopped (the log keeps its tail)"
    )
    max_cpu_seconds: int = _setting(
        900, _seconds_int, "CPU seconds each process of a deploy may use (RLIMIT_CPU)"
    )
    max_memory: int = _setting(
        "2G",
        _size,
        "memory each process of a deploy may allocate (RLIMIT_DATA); where cgroup v2 is "
        "delegated, also the whole deploy's memory (memory.max: shm, memfd, tmpfs included)",
    )
    max_processes: int = _setting(
        1024,
        _count,
        "processes and threads of the sandbox user, counted across all its running deploys "
        "(RLIMIT_NPROC); where cgroup v2 is delegated, also per deploy (pids.max)",
    )
    max_file_size: int = _setting("1G", _size, "largest file a deploy may write (RLIMIT_FSIZE)")
    max_open_files: int = _setting(1024, _count, "open files per deploy process (RLIMIT_NOFILE)")
    max_tmp_size: int = _setting("512M", _size, "size of the deploy's private /tmp (in memory)")
    # Measured by a watcher (gateway/deploys/buildsize.py says why not a quota or a tmpfs).
    max_build_size: int = _setting(
        "4G",
        _size,
        "what a deploy may write in all: its export directory on disk (hard links once, "
        "allocated blocks, deleted files it keeps open) plus its in-memory /tmp and /dev/shm; "
        "the deploy is stopped when over",
    )
    retention: float = _setting(
        90,
        _days,
        "days a finished deploy's record and log are kept (0 = forever); pruned hourly",
    )
    keep_last: int = _setting(
        10, _keep, "the newest finished deploys of each app kept whatever their age"
    )


@dataclass(frozen=True)
class AuditSettings:
    retention: float = _setting(
        365, _days, "days audit events are kept (0 = forever); pruned hourly"
    )


@dataclass(frozen=True)
class HTTPSettings:
    listen: tuple[str, int] | None = _setting(
        "127.0.0.1:8080",
        _optional_listen,
        "HTTP listener: API, keys page, /metrics, /healthz, /readyz, deploy status "
        "reports; empty = off",
    )
    # Monitoring reads probes and metrics without reaching the API (and tenants who reach
    # the API do not read the metrics).
    monitoring_listen: tuple[str, int] | None = _setting(
        "",
        _optional_listen,
        "a second HTTP listener serving only /healthz, /readyz and /metrics, for the "
        "monitoring network; when set, /metrics leaves the main listener (the probes stay); "
        "needs listen set",
    )
    secure_cookies: bool = _setting(
        False, _bool, "mark the keys page's cookies Secure (when served over HTTPS)"
    )
    public_url: str = _setting(
        "",
        _http_url,
        "base URL webhook receivers call back on and the keys page's own origin; "
        "defaults to listen",
    )
    header_timeout: float = _setting(
        30,
        _seconds,
        "seconds a client has to send a request's headers, from connecting or from the "
        "previous answer (idle keep-alive connections close then too)",
    )
    body_timeout: float = _setting(
        60, _seconds, "seconds a request's body may take to arrive once its headers have"
    )
    max_body_size: int = _setting(
        "1M", _size, "largest request body; a larger one gets 413 without being read"
    )
    max_connections: int = _setting(
        500, _count, "open connections per HTTP listener; more get 503 and are closed"
    )


# The setting that chooses each deploy pipeline kind (gateway/deploys/pipelines/): an app
# sets at most one, and one set in [apps.NAME] replaces the global pipeline. A new kind adds
# its key here and to DeploySettings.
PIPELINE_KEYS = ("command", "webhook_url")

# Keys an app may override in [apps.NAME]; everything else is global.
APP_OVERRIDABLE = (
    *PIPELINE_KEYS,
    "webhook_secret",
    "mode",
    "timeout",
    "sandbox",
    "sandbox_read_paths",
    "sandbox_write_paths",
    "network",
    "sandbox_user",
    "max_export_size",
    "max_output",
    "max_cpu_seconds",
    "max_memory",
    "max_processes",
    "max_file_size",
    "max_open_files",
    "max_tmp_size",
    "max_build_size",
)

SECTIONS: dict[str, type] = {
    "server": ServerSettings,
    "ssh": SSHSettings,
    "limits": LimitSettings,
    "storage": StorageSettings,
    "git": GitSettings,
    "deploy": DeploySettings,
    "audit": AuditSettings,
    "http": HTTPSettings,
    "log": LogSettings,
    "cluster": ClusterSettings,
}


@dataclass(frozen=True)
class Config:
    server: ServerSettings
    ssh: SSHSettings
    limits: LimitSettings
    storage: StorageSettings
    git: GitSettings
    deploy: DeploySettings
    audit: AuditSettings
    http: HTTPSettings
    log: LogSettings
    cluster: ClusterSettings
    apps: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    source: Path | None = None

    def deploy_for(self, app: str) -> DeploySettings:
        """The deploy settings of one app: [deploy] with its [apps.NAME] overrides."""
        overrides = dict(self.apps.get(app) or {})
        if not overrides:
            return self.deploy
        # An app that picks a pipeline replaces the global one rather than adding to it.
        if any(overrides.get(key) for key in PIPELINE_KEYS):
            specs = {f.name: f.metadata for f in dataclasses.fields(DeploySettings)}
            for key in PIPELINE_KEYS:
                overrides.setdefault(key, specs[key]["parse"](specs[key]["default"]))
        return dataclasses.replace(self.deploy, **overrides)

    @property
    def clone_host(self) -> str:
        """HOST or HOST:PORT as users should type it."""
        if self.ssh.public_address:
            return self.ssh.public_address
        host, port = self.ssh.listen
        if host in ("0.0.0.0", "::", ""):  # noqa: S104 - a bind-all address, only displayed
            host = os.uname().nodename
        if ":" in host:
            host = f"[{host}]"
        return host if port == 22 else f"{host}:{port}"

    def ssh_command(self, arguments: str) -> str:
        """How a user runs a gateway command over SSH, e.g. `ssh git@host logs web 3`."""
        host = self.clone_host
        match = re.fullmatch(r"(\[[^\]]+\]|[^:]+)(?::(\d+))?", host)
        name, port = (match.group(1), match.group(2)) if match else (host, None)
        name = name.strip("[]")
        port_option = f"-p {port} " if port else ""
        return f"ssh {port_option}{self.ssh.user}@{name} {arguments}"

    def clone_url(self, app: str) -> str:
        host = self.clone_host
        if ":" in host.rsplit("]", 1)[-1]:
            return f"ssh://{self.ssh.user}@{host}/{app}.git"
        return f"{self.ssh.user}@{host}:{app}.git"
