"""What `check` says of a registry's schema, and where it names a PostgreSQL one."""

from __future__ import annotations

from gateway.store.probe import RegistryState, _where


def test_schema_states():
    assert RegistryState("sqlite", "/v/gw.db", 12, 12).text() == (
        "registry ok (sqlite /v/gw.db, schema 12)"
    )
    assert RegistryState("sqlite", "/v/gw.db", 10, 12).text() == (
        "registry ok (sqlite /v/gw.db, schema 10, 2 migration(s) pending: applied at start)"
    )
    assert RegistryState("postgresql", "db:5432/gw", 13, 12).text() == (
        "registry ok (postgresql db:5432/gw, schema 13, newer than this version's 12)"
    )
    assert RegistryState("postgresql", "db/gw", None, 12).text() == (
        "registry ok (postgresql db/gw: created on first start)"
    )


def test_a_postgresql_registry_is_named_without_its_credentials():
    assert _where("postgresql://gw:s3cret@db.internal:5433/registry") == "db.internal:5433/registry"
    assert _where("postgres://gw@[::1]/registry?sslmode=require") == "[::1]/registry"
    # A socket directory in the query: the whole URL, its password masked.
    assert _where("postgresql://gw:pw@/registry?host=/run/postgresql") == (
        "postgresql://gw:********@/registry?host=%2Frun%2Fpostgresql"
    )
