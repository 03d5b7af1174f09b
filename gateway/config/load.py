"""Loading: the file named by --config or $GATEWAY_CONFIG, $GATEWAY_DATABASE_URL, and the
checks across sections that one key's parser cannot make."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import tomllib
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .parse import _database
from .schema import (
    APP_OVERRIDABLE,
    CONFIG_ENV,
    DATABASE_ENV,
    DEFAULT_CONFIG_FILE,
    PIPELINE_KEYS,
    SECTIONS,
    Config,
    DeploySettings,
    StorageSettings,
)


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
    from ..names import APP_NAME  # names has no config dependency; imported late to stay light

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
        chosen = [key for key in PIPELINE_KEYS if getattr(settings, key)]
        if len(chosen) > 1:
            raise ConfigError(f"config: {label}: set only one of {', '.join(chosen)}")


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
    }
    if cfg.deploy.build_dir is not None:  # always set by now (from_mapping's default)
        private["[deploy] build_dir"] = cfg.deploy.build_dir
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
    _check_cluster(cfg)
    return cfg


def _check_cluster(cfg: Config) -> None:
    """The internal listener is never open to everyone, and the others must know where it is."""
    cluster = cfg.cluster
    if cluster.listen is None:
        if cluster.forward == "always":
            raise ConfigError('config: [cluster] forward = "always" needs [cluster] listen')
        return
    if not cluster.peers:
        raise ConfigError(
            "config: [cluster] listen needs [cluster] peers (the other nodes' addresses)"
        )
    everyone = [n for n in cluster.peers if n.endswith("/0")]
    if everyone:
        raise ConfigError(
            f"config: [cluster] peers: {everyone[0]} is every address: list the nodes' "
            "addresses or their private network"
        )
    host = cluster.listen[0]
    if not cluster.advertise and host in ("", "0.0.0.0", "::"):  # noqa: S104 - a check
        raise ConfigError(
            f"config: [cluster] listen on {host or 'every address'} needs [cluster] advertise "
            "(the address the other nodes dial)"
        )


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
