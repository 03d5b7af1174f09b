"""Configuration: embedded defaults overlaid by one TOML file, validated key by key."""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import ConfigError

DEFAULT_CONFIG_FILE = Path("config/gateway.toml")
CONFIG_ENV = "GATEWAY_CONFIG"

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


def _seconds(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("expected a number of seconds")
    if value <= 0:
        raise ValueError("must be greater than zero")
    return float(value)


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


def _public_address(value: Any) -> str:
    text = _string(value).strip()
    if text and not re.fullmatch(r"[A-Za-z0-9.-]+(:\d{1,5})?|\[[0-9a-fA-F:.]+\](:\d{1,5})?", text):
        raise ValueError(f"invalid address '{text}': expected HOST or HOST:PORT")
    return text


def _choice(*allowed: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        text = _nonempty(value).lower()
        if text not in allowed:
            raise ValueError(f"invalid value '{value}': expected one of {', '.join(allowed)}")
        return text

    return parse


def _setting(raw_default: Any, parse: Callable[[Any], Any], doc: str) -> Any:
    """A config key: its raw default goes through the same parser as file values."""
    return field(metadata={"default": raw_default, "parse": parse, "doc": doc})


# -- sections --


@dataclass(frozen=True)
class SSHSettings:
    listen: tuple[str, int] = _setting(
        "127.0.0.1:2222", _listen, "address the SSH server binds; port 0 picks a free port"
    )
    host_key_dir: Path = _setting(
        "config/host_keys", _path, "where host keys are generated on first start and reused"
    )
    user: str = _setting("git", _ssh_user, "the only SSH user name accepted")
    public_address: str = _setting(
        "", _public_address, "HOST[:PORT] shown in clone URLs; defaults to the listen address"
    )
    login_timeout: float = _setting(
        60, _seconds, "seconds an unauthenticated connection may take to log in"
    )
    keepalive_interval: float = _setting(
        30, _seconds, "seconds between keepalives to detect dead clients"
    )


@dataclass(frozen=True)
class StorageSettings:
    repos: Path = _setting("repos", _path, "root directory of the apps' bare repositories")
    database: Path = _setting("var/gateway.db", _path, "SQLite registry file")


@dataclass(frozen=True)
class GitSettings:
    binary: str = _setting("git", _nonempty, "git executable (name on PATH or absolute path)")
    max_input_size: int = _setting(
        "2G", _size, "largest pack a push may send (receive.maxInputSize)"
    )


@dataclass(frozen=True)
class LogSettings:
    level: str = _setting("info", _choice("debug", "info", "warning", "error"), "log level")
    format: str = _setting("text", _choice("text", "json"), "text (key=value) or json lines")


SECTIONS: dict[str, type] = {
    "ssh": SSHSettings,
    "storage": StorageSettings,
    "git": GitSettings,
    "log": LogSettings,
}


@dataclass(frozen=True)
class Config:
    ssh: SSHSettings
    storage: StorageSettings
    git: GitSettings
    log: LogSettings
    source: Path | None = None

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


def from_mapping(data: Mapping[str, Any], source: Path | None = None) -> Config:
    """Validate a parsed TOML document; unknown sections or keys are errors."""
    for name, table in data.items():
        if name not in SECTIONS:
            raise ConfigError(f"config: unknown section [{name}]")
        if not isinstance(table, dict):
            raise ConfigError(f"config: [{name}] must be a table")
    sections = {
        name: _build_section(name, cls, data.get(name, {})) for name, cls in SECTIONS.items()
    }
    return Config(**sections, source=source)


def load(
    path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None
) -> Config:
    """Load the configuration: --config PATH, else $GATEWAY_CONFIG, else config/gateway.toml.

    An explicitly named file must exist; the default file is optional (embedded defaults).
    """
    env = os.environ if env is None else env
    explicit = path if path is not None else env.get(CONFIG_ENV) or None
    file = Path(explicit) if explicit is not None else DEFAULT_CONFIG_FILE
    if not file.exists():
        if explicit is not None:
            raise ConfigError(f"config: file not found: {file}")
        return from_mapping({})
    try:
        data = tomllib.loads(file.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config: {file}: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config: cannot read {file}: {exc}") from None
    return from_mapping(data, source=file.absolute())


def reference() -> str:
    """Every key with its default and description, for the README and `config show`."""
    lines = []
    for name, cls in SECTIONS.items():
        lines.append(f"[{name}]")
        for spec in fields(cls):
            default = spec.metadata["default"]
            rendered = f'"{default}"' if isinstance(default, str) else str(default)
            lines.append(f"{spec.name} = {rendered}  # {spec.metadata['doc']}")
        lines.append("")
    return "\n".join(lines)
