"""The pieces the registry's SQL is written with: each engine's spelling of a statement
(gateway/store/sql/dialect.py) and rows made records by column name (gateway/store/rows.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from gateway.models import Deploy, DeployStatus, Member, Role, User
from gateway.store import rows
from gateway.store.sql import POSTGRES, SQLITE
from gateway.store.sql.deploys import INSERT

STATEMENT = (
    "SELECT a.name FROM apps a WHERE a.id {ids:$2} AND a.owner_id = $1 ORDER BY a.name{bytes}"
)


def test_one_statement_two_spellings() -> None:
    assert SQLITE.sql(STATEMENT) == (
        "SELECT a.name FROM apps a WHERE a.id IN (SELECT value FROM json_each(?2)) "
        "AND a.owner_id = ?1 ORDER BY a.name"
    )
    assert POSTGRES.sql(STATEMENT) == (
        "SELECT a.name FROM apps a WHERE a.id = ANY($2::bigint[]) AND a.owner_id = $1 "
        'ORDER BY a.name COLLATE "C"'
    )
    # Numbered placeholders past 9 keep their number; a JSON path's $ is no placeholder.
    assert SQLITE.sql("SELECT $10, $1, {json:e.detail.user}") == (
        "SELECT ?10, ?1, json_extract(e.detail, '$.user')"
    )
    assert POSTGRES.sql("SELECT {json:e.detail.user}") == "SELECT (e.detail::jsonb ->> 'user')"


def test_row_locks_exist_only_where_rows_lock() -> None:
    assert POSTGRES.sql("SELECT 1 FROM t k {lock:k}") == "SELECT 1 FROM t k FOR UPDATE OF k"
    assert POSTGRES.sql("SELECT 1 FROM t {lock}") == "SELECT 1 FROM t FOR UPDATE"
    assert SQLITE.sql("SELECT 1 FROM t k {lock:k}").rstrip() == "SELECT 1 FROM t k"
    assert "SKIP LOCKED" in POSTGRES.sql("SELECT d.id FROM deploys d {skip:d}")


def test_values_each_engine_takes() -> None:
    moment = datetime(2026, 1, 1, 1, 0, tzinfo=timezone(timedelta(hours=1)))
    assert SQLITE.time(moment) == "2026-01-01T00:00:00Z" == SQLITE.time("2026-01-01T00:00:00Z")
    assert POSTGRES.time("2026-01-01T00:00:00Z") == moment and POSTGRES.time(None) is None
    assert SQLITE.array([3, 1]) == "[3, 1]" and POSTGRES.array((3, 1)) == [3, 1]


def test_a_new_deploy_is_written_with_every_field_of_new_deploy() -> None:
    assert INSERT.startswith(
        "INSERT INTO deploys (app_id, ref, old_sha, new_sha, pusher, key_fingerprint, subject, "
        "author, mode, pipeline, note, status, created_at, origin) VALUES ($1, "
    )
    assert INSERT.endswith("$10, $11, 'queued', $12, $13) RETURNING id")


def test_records_are_made_by_column_name_with_their_types() -> None:
    row = {
        "created_at": "2026-01-01T01:00:00+01:00",
        "name": "alice",
        "id": 7,
        "extra": "ignored",
    }
    assert rows.record(User, row) == User(7, "alice", datetime(2026, 1, 1, tzinfo=UTC))
    member = rows.record(Member, {"user_name": "bob", "role": "write", "created_at": None})
    assert member.role is Role.WRITE
    assert rows.role("owner") is Role.OWNER
    with pytest.raises(KeyError):
        rows.record(User, {"id": 1, "name": "x"})  # a column missing is a bug, not a None


def test_a_select_list_comes_from_the_model() -> None:
    listed = rows.select_list(Deploy, "d", joined={"app_name": "a.name", "note": None})
    assert listed.startswith("d.id AS id, d.app_id AS app_id, a.name AS app_name, d.ref AS ref")
    assert "note" not in listed and "d.duration_ms AS duration_ms" in listed
    assert (
        rows.select_list(User, "u", "p_")
        == "u.id AS p_id, u.name AS p_name, u.created_at AS p_created_at"
    )
    values = {name: None for name in rows.field_names(Deploy)}
    values.update(id=1, app_id=2, status="failed", created_at="2026-01-01T00:00:00Z")
    assert rows.record(Deploy, values).status is DeployStatus.FAILED
