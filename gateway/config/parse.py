"""Value parsers: a raw TOML value becomes a typed setting, or ValueError with a short reason."""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable
from dataclasses import field
from pathlib import Path
from typing import Any

from ..dburl import is_postgres, redact
from ..names import USER_NAME

MAX_WORKERS = 256

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
    from ..errors import InvalidName
    from ..names import branch_name

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


def _node_name(value: Any) -> str:
    text = _string(value).strip()
    if text and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}", text):
        raise ValueError(f"invalid node name '{text}': letters, digits, '.', '_', '-'")
    return text
