"""Configuration: embedded defaults overlaid by one TOML file, validated key by key."""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import json
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .dburl import is_postgres, redact
from .errors import ConfigError
from .names import USER_NAME

DEFAULT_CONFIG_FILE = Path("config/gateway.toml")
CONFIG_ENV = "GATEWAY_CONFIG"
# Overrides [storage] database, so that a PostgreSQL password need not sit in a file.
DATABASE_ENV = "GATEWAY_DATABASE_URL"

# -- value parsers: raw TOML value -> typed value, ValueError with a short reason on bad input --

_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
_SIZE_RE = re.compile(r"(\d+)\s*([kmgt]?)(?:i?b)?", re.IGNORECASE)


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {type(value).__name__}")
    return value


def _nonempty(value: Any) -> str:
    text = _string(value).strip()
    if not text:
        raise ValueError("must not be empty")
    return text


def _path(value: Any) -> Path:
    # Relative paths are taken from the working directory the gateway is started in, made
    # absolute once so that nothing later depends on the current directory.
    return Path(_nonempty(value)).expanduser().absolute()


def _optional_path(value: Any) -> Path | None:
    return _path(value) if _string(value).strip() else None


def _database(value: Any) -> Path | str:
    """A SQLite file path, or a PostgreSQL URL (postgresql://USER[:PASSWORD]@HOST[:PORT]/DB)."""
    text = _nonempty(value)
    if is_postgres(text):
        if any(c.isspace() for c in text):
            raise ValueError("a PostgreSQL URL must not contain spaces")
        return text
    if "://" in text:
        raise ValueError(f"unsupported database URL '{redact(text)}': expected postgresql://")
    return _path(text)


def _size(value: Any) -> int:
    """Bytes, as an integer or a string such as "512M" or "2 GiB"."""
    if isinstance(value, bool):
        raise ValueError("expected a size")
    if isinstance(value, int):
        number = value
    else:
        match = _SIZE_RE.fullmatch(_string(value).strip())
        if not match:
            raise ValueError(f"invalid size '{value}': use bytes or a suffix K, M, G, T")
        number = int(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]
    if number <= 0:
        raise ValueError("must be greater than zero")
    return number


def size_text(size: int) -> str:
    """A size as messages show it: `2 GiB`, `100 MiB`, `20 KiB`, `512 bytes`."""
    for unit, factor in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if size >= factor:
            return f"{size / factor:g} {unit}"
    return f"{size} bytes"


def _seconds(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("expected a number of seconds")
    if value <= 0:
        raise ValueError("must be greater than zero")
    return float(value)


def _seconds_or_zero(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ValueError("expected a number of seconds >= 0")
    return float(value)


def _days(value: Any) -> float:
    """A retention period in days; 0 keeps everything."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("expected a number of days (0 keeps everything)")
    if value < 0:
        raise ValueError("must not be negative")
    return float(value)


def _keep(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError("expected a whole number >= 0")
    return value


def _listen(value: Any) -> tuple[str, int]:
    """ "HOST:PORT" or "[IPv6]:PORT"; port 0 asks the OS for any free port."""
    text = _nonempty(value)
    match = re.fullmatch(r"\[([0-9a-fA-F:.]+)\]:(\d{1,5})|([A-Za-z0-9.-]+):(\d{1,5})", text)
    if not match:
        raise ValueError(f"invalid address '{text}': expected HOST:PORT")
    host = match.group(1) or match.group(3)
    port = int(match.group(2) or match.group(4))
    if port > 65535:
        raise ValueError(f"invalid port {port}")
    return host, port


def _ssh_user(value: Any) -> str:
    text = _nonempty(value)
    if not re.fullmatch(r"[a-z_][a-z0-9_-]{0,31}", text):
        raise ValueError(f"invalid user name '{text}'")
    return text


def _principal_map(value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        raise ValueError("expected a table of principal = user name")
    found = {}
    for principal, user in value.items():
        if not isinstance(user, str) or not USER_NAME.fullmatch(user):
            raise ValueError(f"invalid user name for principal '{principal}'")
        if not principal or len(principal) > 256 or not principal.isprintable():
            raise ValueError("a principal is 1 to 256 printable characters")
        found[principal] = user
    return found


def _public_address(value: Any) -> str:
    text = _string(value).strip()
    if text and not re.fullmatch(r"[A-Za-z0-9.-]+(:\d{1,5})?|\[[0-9a-fA-F:.]+\](:\d{1,5})?", text):
        raise ValueError(f"invalid address '{text}': expected HOST or HOST:PORT")
    return text


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError("expected true or false")
    return value


def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError("expected a whole number >= 1")
    return value


def _workers(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_WORKERS:
        raise ValueError(f"expected a whole number from 0 (one per CPU core) to {MAX_WORKERS}")
    return value


def _argv(value: Any) -> tuple[str, ...]:
    """A command as an argument list, run without a shell; [] means no command."""
    if not isinstance(value, list) or not all(isinstance(a, str) for a in value):
        raise ValueError('expected a list of strings, e.g. ["./deploy.sh", "--prod"]')
    if value and not value[0].strip():
        raise ValueError("the program (first element) must not be empty")
    if any("\x00" in a for a in value):
        raise ValueError("arguments must not contain NUL")
    return tuple(value)


def _paths(value: Any) -> tuple[Path, ...]:
    """A list of absolute paths (bound into the deploy sandbox at the same place)."""
    if not isinstance(value, list) or not all(isinstance(a, str) for a in value):
        raise ValueError('expected a list of absolute paths, e.g. ["/opt/node"]')
    out = []
    for text in value:
        path = Path(text).expanduser()
        if not path.is_absolute() or "\x00" in text:
            raise ValueError(f"'{text}' is not an absolute path")
        # The sandbox's own layout (system, /tmp, /proc, the export) cannot be replaced.
        normalized = Path(os.path.normpath(path))
        if (
            normalized in _SANDBOX_RESERVED
            or normalized == Path("/")
            or normalized.is_relative_to("/proc")
            or normalized.is_relative_to("/dev")
        ):
            raise ValueError(f"'{text}' is part of the sandbox's own layout")
        out.append(normalized)
    return tuple(out)


# Paths the deploy sandbox builds itself; operators' extra binds may not shadow them.
_SANDBOX_RESERVED = frozenset(
    Path(p)
    for p in ("/proc", "/dev", "/tmp", "/etc", "/usr", "/app", "/run", "/var/tmp")  # noqa: S108
)


def _sandbox_user(value: Any) -> str:
    text = _string(value).strip()
    if text and not re.fullmatch(r"[a-z_][a-z0-9_-]{0,31}\$?|\d{1,10}", text):
        raise ValueError(f"invalid user name '{text}'")
    return text


def _seconds_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError("expected a whole number of seconds >= 1")
    return value


def _branch(value: Any) -> str:
    from .errors import InvalidName
    from .names import branch_name

    try:
        return branch_name(_nonempty(value))
    except InvalidName as exc:
        raise ValueError(str(exc)) from None


def _http_url(value: Any) -> str:
    text = _string(value).strip()
    if text and not re.fullmatch(r"https?://[^\s/?#]+[^\s]*", text):
        raise ValueError(f"invalid URL '{text}': expected http:// or https://")
    return text


def _help_url(value: Any) -> str:
    """An http(s) URL shown to SSH clients: printable ASCII only, it reaches terminals."""
    text = _http_url(value)
    if len(text) > 200 or not all(" " < c <= "~" for c in text):
        raise ValueError("help_url must be at most 200 printable ASCII characters")
    return text


def _optional_listen(value: Any) -> tuple[str, int] | None:
    text = _string(value).strip()
    return _listen(text) if text else None


def _algorithms(kind: str) -> Callable[[Any], tuple[str, ...]]:
    """A non-empty list of algorithm names that asyncssh implements."""

    def parse(value: Any) -> tuple[str, ...]:
        if not isinstance(value, list) or not value or not all(isinstance(a, str) for a in value):
            raise ValueError(f"expected a non-empty list of {kind} algorithm names")
        supported = _supported_algorithms(kind)
        unknown = [a for a in value if a not in supported]
        if unknown:
            raise ValueError(f"unsupported {kind} algorithm(s): {', '.join(unknown)}")
        return tuple(value)

    return parse


def _supported_algorithms(kind: str) -> set[str]:
    # Imported here: only validating a config needs the SSH stack's algorithm tables.
    from asyncssh.encryption import get_encryption_algs
    from asyncssh.kex import get_kex_algs
    from asyncssh.mac import get_mac_algs
    from asyncssh.public_key import get_public_key_algs

    tables = {
        "kex": get_kex_algs,
        "cipher": get_encryption_algs,
        "mac": get_mac_algs,
        "public key": get_public_key_algs,
    }
    return {a.decode() for a in tables[kind]()}


def _choice(*allowed: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        text = _nonempty(value).lower()
        if text not in allowed:
            raise ValueError(f"invalid value '{value}': expected one of {', '.join(allowed)}")
        return text

    return parse


def _network(value: Any) -> str:
    """[deploy] network: a mode, or the boolean of earlier versions (true only ever promised
    outbound network, which "isolated" gives)."""
    if isinstance(value, bool):
        return "isolated" if value else "none"
    return _choice("isolated", "none", "host")(value)


def _networks(value: Any) -> tuple[str, ...]:
    """A list of addresses or CIDR blocks, normalized ("10.0.0.0/8", "::1/128")."""
    if not isinstance(value, list) or not all(isinstance(a, str) for a in value):
        raise ValueError('expected a list of addresses or CIDR blocks, e.g. ["10.0.0.0/8"]')
    out = []
    for text in value:
        try:
            out.append(str(ipaddress.ip_network(text.strip(), strict=False)))
        except ValueError:
            raise ValueError(f"invalid address or CIDR block '{text}'") from None
    return tuple(out)


def _setting(raw_default: Any, parse: Callable[[Any], Any], doc: str) -> Any:
    """A config key: its raw default goes through the same parser as file values."""
    return field(metadata={"default": raw_default, "parse": parse, "doc": doc})


# -- sections --

MAX_WORKERS = 256


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


def _node_name(value: Any) -> str:
    text = _string(value).strip()
    if text and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}", text):
        raise ValueError(f"invalid node name '{text}': letters, digits, '.', '_', '-'")
    return text


@dataclass(frozen=True)
class ClusterSettings:
    node_name: str = _setting(
        "",
        _node_name,
        "this machine's name among the gateways sharing the registry ('' = host name); "
        "max_parallel counts per name",
    )
    node_timeout: float = _setting(
        15,
        _seconds,
        "seconds without a sign of life after which the other gateways declare one gone "
        "and mark its running deploys interrupted",
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


# Keys an app may override in [apps.NAME]; everything else is global.
APP_OVERRIDABLE = (
    "command",
    "webhook_url",
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
        if overrides.get("webhook_url") and "command" not in overrides:
            overrides["command"] = ()
        if overrides.get("command") and "webhook_url" not in overrides:
            overrides["webhook_url"] = ""
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


def _build_section(name: str, cls: type, table: Mapping[str, Any]) -> Any:
    known = {f.name: f for f in fields(cls)}
    for key in table:
        if key not in known:
            raise ConfigError(f"config: unknown key [{name}] {key}")
    values = {}
    for key, spec in known.items():
        raw = table.get(key, spec.metadata["default"])
        try:
            values[key] = spec.metadata["parse"](raw)
        except ValueError as exc:
            raise ConfigError(f"config: [{name}] {key}: {exc}") from None
    return cls(**values)


def _build_app_overrides(table: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    from .names import APP_NAME  # names has no config dependency; imported late to stay light

    specs = {f.name: f for f in fields(DeploySettings)}
    apps: dict[str, dict[str, Any]] = {}
    for app, overrides in table.items():
        if not APP_NAME.fullmatch(app):
            raise ConfigError(f"config: [apps.{app}]: invalid app name")
        if not isinstance(overrides, dict):
            raise ConfigError(f"config: [apps.{app}] must be a table")
        parsed = {}
        for key, raw in overrides.items():
            if key not in APP_OVERRIDABLE:
                raise ConfigError(
                    f"config: unknown key [apps.{app}] {key} "
                    f"(an app may override: {', '.join(APP_OVERRIDABLE)})"
                )
            try:
                parsed[key] = specs[key].metadata["parse"](raw)
            except ValueError as exc:
                raise ConfigError(f"config: [apps.{app}] {key}: {exc}") from None
        apps[app] = parsed
    return apps


def _check_pipelines(cfg: Config) -> None:
    labelled = [("[deploy]", cfg.deploy)]
    labelled += [(f"[apps.{app}]", cfg.deploy_for(app)) for app in cfg.apps]
    for label, settings in labelled:
        if settings.command and settings.webhook_url:
            raise ConfigError(f"config: {label}: set either command or webhook_url, not both")


_STATE_FILES = ("[storage] database", "[storage] control_socket", "the configuration file")


def _check_sandbox_paths(cfg: Config) -> None:
    """Extra sandbox binds must not expose the gateway's own state: a bind shows everything
    below it, so none may contain (or lie inside) the registry, repositories, host keys,
    control socket, deploy logs, build directories or this file."""
    private: dict[str, Path] = {
        "[storage] repos": cfg.storage.repos,
        "[storage] control_socket": cfg.storage.control_socket,
        "[ssh] host_key_dir": cfg.ssh.host_key_dir,
        "[deploy] log_dir": cfg.deploy.log_dir,
        "[deploy] build_dir": cfg.deploy.build_dir,
    }
    if cfg.git.pack_cache_dir is not None:
        private["[git] pack_cache_dir"] = cfg.git.pack_cache_dir
    if isinstance(cfg.storage.database, Path):
        private["[storage] database"] = cfg.storage.database
    if cfg.source is not None:
        private["the configuration file"] = cfg.source
    labelled = [("[deploy]", cfg.deploy)]
    labelled += [(f"[apps.{app}]", cfg.deploy_for(app)) for app in cfg.apps]
    for label, settings in labelled:
        for key in ("sandbox_read_paths", "sandbox_write_paths"):
            for path in getattr(settings, key):
                for what, secret in private.items():
                    if secret.is_relative_to(path) or (
                        (secret.is_dir() or what.endswith(("repos", "dir")))
                        and path.is_relative_to(secret)
                    ):
                        raise ConfigError(
                            f"config: {label} {key}: {path} would expose {what} ({secret}) "
                            "to deploys"
                        )


def from_mapping(data: Mapping[str, Any], source: Path | None = None) -> Config:
    """Validate a parsed TOML document; unknown sections or keys are errors."""
    for name, table in data.items():
        if name not in SECTIONS and name != "apps":
            raise ConfigError(f"config: unknown section [{name}]")
        if not isinstance(table, dict):
            raise ConfigError(f"config: [{name}] must be a table")
    sections = {
        name: _build_section(name, cls, data.get(name, {})) for name, cls in SECTIONS.items()
    }
    cfg = Config(**sections, apps=_build_app_overrides(data.get("apps", {})), source=source)
    if cfg.git.pack_cache_dir is None:
        # Resolved once from the node's control socket (workers each listen on their own).
        directory = Path(f"{cfg.storage.control_socket}.pack-cache")
        cfg = dataclasses.replace(cfg, git=dataclasses.replace(cfg.git, pack_cache_dir=directory))
    if cfg.deploy.build_dir is None:
        deploy = dataclasses.replace(cfg.deploy, build_dir=default_build_dir(cfg.storage))
        cfg = dataclasses.replace(cfg, deploy=deploy)
    _check_pipelines(cfg)
    _check_sandbox_paths(cfg)
    return cfg


def default_build_dir(storage: StorageSettings) -> Path:
    """This gateway's build directory when none is set. Its deploys run as itself unless it
    runs as root: then `var/builds`, beside its other state. A root gateway runs them as
    `sandbox_user`, which must reach the directory; the state directory may well lie in a
    home directory that only root can enter (/root), so its builds go to a directory that
    only root can create names in, which no other local user can take first, named after the
    control socket so that the workers of a node, `check` and a reload agree and two gateways
    on one host never share one."""
    if os.geteuid() != 0:
        return Path("var/builds").absolute()
    digest = hashlib.sha256(str(storage.control_socket).encode()).hexdigest()[:12]
    return Path("/var/lib/git-gateway-builds") / digest


def load(
    path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None
) -> Config:
    """Load the configuration: --config PATH, else $GATEWAY_CONFIG, else config/gateway.toml.

    An explicitly named file must exist; the default file is optional (embedded defaults).
    $GATEWAY_DATABASE_URL, when set, replaces [storage] database.
    """
    env = os.environ if env is None else env
    explicit = path if path is not None else env.get(CONFIG_ENV) or None
    file = Path(explicit) if explicit is not None else DEFAULT_CONFIG_FILE
    data: dict[str, Any] = {}
    source = None
    if file.exists():
        try:
            data = tomllib.loads(file.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config: {file}: {exc}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config: cannot read {file}: {exc}") from None
        source = file.absolute()
    elif explicit is not None:
        raise ConfigError(f"config: file not found: {file}")
    database = env.get(DATABASE_ENV, "").strip()
    if database:
        storage = data.get("storage", {})
        if not isinstance(storage, dict):
            raise ConfigError("config: [storage] must be a table")
        try:
            _database(database)
        except ValueError as exc:
            raise ConfigError(f"config: ${DATABASE_ENV}: {exc}") from None
        data = {**data, "storage": {**storage, "database": database}}
    return from_mapping(data, source=source)


def _render(name: str, value: Any) -> str:
    if "secret" in name and value:
        return '"********"'
    if name == "database":
        return json.dumps(redact(value))
    if value is None:
        return '""'
    if name.endswith("listen"):  # listen, monitoring_listen
        host, port = value
        return json.dumps(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    if isinstance(value, tuple):
        return json.dumps([str(v) for v in value])
    if isinstance(value, bool):
        return "true" if value else "false"
    if not isinstance(value, int | float):
        return json.dumps(str(value))
    return str(value)


def render(cfg: Config) -> str:
    """The effective configuration as TOML (what `config show` prints)."""
    lines = [f"# source: {cfg.source or 'embedded defaults'}"]
    for name in SECTIONS:
        lines.append(f"[{name}]")
        section = getattr(cfg, name)
        lines += [
            f"{f.name} = {_render(f.name, getattr(section, f.name))}" for f in fields(section)
        ]
        lines.append("")
    for app, overrides in cfg.apps.items():
        lines.append(f"[apps.{app}]")
        lines += [f"{key} = {_render(key, value)}" for key, value in overrides.items()]
        lines.append("")
    return "\n".join(lines)


EXAMPLE_HEADER = """\
# git-gateway configuration: every key with its embedded default and what it does.
# This file is generated by `python -m gateway.config` from the code's own settings table:
# edit a copy (e.g. /etc/git-gateway/gateway.toml) and start with
# `git-gateway --config PATH serve`, or set GATEWAY_CONFIG=PATH.
# Relative paths are taken from the directory the gateway is started in.
# `kill -HUP` reloads [limits], [deploy], [audit], [log] and [apps.*]; other sections need a
# restart.
"""

EXAMPLE_APPS = """\
# Per-app overrides of [deploy]: the pipeline (command, webhook_url, webhook_secret, mode,
# timeout) and the sandbox (sandbox, sandbox_read_paths, sandbox_write_paths, network,
# sandbox_user and the max_* limits), for example:
# [apps.myapp]
# command = ["/srv/deploy/myapp.sh"]
# mode = "gate"
# max_memory = "4G"
"""


def example() -> str:
    """The commented example configuration committed as config/gateway.toml."""
    import textwrap

    lines = [EXAMPLE_HEADER]
    for name, cls in SECTIONS.items():
        lines.append(f"[{name}]")
        for spec in fields(cls):
            for part in textwrap.wrap(spec.metadata["doc"], 96):
                lines.append(f"# {part}")
            default = spec.metadata["default"]
            if isinstance(default, bool):
                text = "true" if default else "false"
            elif isinstance(default, list) and len(json.dumps(default)) > 80:
                text = "[\n" + "".join(f"    {json.dumps(v)},\n" for v in default) + "]"
            elif isinstance(default, str | list):
                text = json.dumps(default)
            else:
                text = str(default)
            lines.append(f"{spec.name} = {text}")
        lines.append("")
    lines.append(EXAMPLE_APPS)
    return "\n".join(lines)


def reference() -> str:
    """Every key with its default and description, for the docs and `config show`."""
    lines = []
    for name, cls in SECTIONS.items():
        lines.append(f"[{name}]")
        for spec in fields(cls):
            default = spec.metadata["default"]
            rendered = _render(spec.name, default) if isinstance(default, bool) else None
            rendered = rendered or (f'"{default}"' if isinstance(default, str) else str(default))
            lines.append(f"{spec.name} = {rendered}  # {spec.metadata['doc']}")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(example(), end="")
