"""A throwaway PostgreSQL server for the tests (bench/postgres.py), skipped where absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bench.postgres import INSTALL_HINT, SUPERUSER, PostgresServer, binaries

__all__ = ["SUPERUSER", "PostgresServer", "binaries", "require_postgres"]


def require_postgres() -> Path:
    """The bin directory, or skip (fail in CI, where GATEWAY_REQUIRE_TOOLS=1)."""
    bin_dir = binaries()
    if bin_dir is None:
        if os.environ.get("GATEWAY_REQUIRE_TOOLS") == "1":
            raise RuntimeError(INSTALL_HINT)
        pytest.skip(INSTALL_HINT)
    return bin_dir
