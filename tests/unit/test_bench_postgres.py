"""The benchmark's throwaway PostgreSQL server (bench/postgres.py): logins over TCP need the
password it was created with, since any local user can reach 127.0.0.1."""

from __future__ import annotations

import secrets

import asyncpg
import pytest

from bench.postgres import SUPERUSER, PostgresServer
from tests import pg


async def test_regression_bench_postgres_refuses_tcp_logins_without_its_password() -> None:
    server = PostgresServer(pg.require_postgres(), password=secrets.token_urlsafe(24)).start()
    try:
        conn = await asyncpg.connect(server.url(), timeout=10)
        assert await conn.fetchval("SELECT current_user") == SUPERUSER
        await conn.close()
        anyone = f"postgresql://{SUPERUSER}@127.0.0.1:{server.port}/postgres"
        for password in (None, "", "guess"):
            with pytest.raises(asyncpg.InvalidPasswordError):
                await asyncpg.connect(anyone, password=password, timeout=10)
        assert server.version()  # the superuser's own unix socket still needs none
        assert not list(server.root.glob("pwfile*"))  # initdb's copy of it is gone
    finally:
        server.remove()
