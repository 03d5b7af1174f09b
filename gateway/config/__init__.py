"""Configuration: embedded defaults overlaid by one TOML file, validated key by key (the
schema in schema.py, its parsers in parse.py, loading in load.py, rendering in render.py), and
the running value every part reads at use (holder.py)."""

from __future__ import annotations

from ..errors import ConfigError
from .cluster import ClusterSettings
from .holder import Settings, at_use
from .load import default_build_dir, from_mapping, load
from .parse import MAX_WORKERS, size_text
from .render import example, reference, render
from .schema import (
    APP_OVERRIDABLE,
    CONFIG_ENV,
    DATABASE_ENV,
    DEFAULT_CONFIG_FILE,
    DEPLOY_MODES,
    SECTIONS,
    AuditSettings,
    Config,
    DeploySettings,
    GitSettings,
    HTTPSettings,
    LimitSettings,
    LogSettings,
    ServerSettings,
    SSHSettings,
    StorageSettings,
)

__all__ = [
    "APP_OVERRIDABLE",
    "CONFIG_ENV",
    "DATABASE_ENV",
    "DEFAULT_CONFIG_FILE",
    "DEPLOY_MODES",
    "MAX_WORKERS",
    "SECTIONS",
    "AuditSettings",
    "ClusterSettings",
    "Config",
    "ConfigError",
    "DeploySettings",
    "GitSettings",
    "HTTPSettings",
    "LimitSettings",
    "LogSettings",
    "SSHSettings",
    "ServerSettings",
    "Settings",
    "StorageSettings",
    "at_use",
    "default_build_dir",
    "example",
    "from_mapping",
    "load",
    "reference",
    "render",
    "size_text",
]
