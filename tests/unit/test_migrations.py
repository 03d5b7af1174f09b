"""SQLite migrations that rebuild tables keep what 0005 promised: ids are never reused."""

from __future__ import annotations

import sqlite3

from gateway.store.sqlite import migrations


def test_regression_the_scoped_keys_rebuild_keeps_the_key_id_high_water_mark():
    """0011 rebuilds ssh_keys; DROP TABLE removed its sqlite_sequence row, so the id of a
    key deleted just before the upgrade came back (review finding)."""
    db = sqlite3.connect(":memory:", isolation_level=None)
    db.execute("PRAGMA foreign_keys = OFF")
    for number, _, sql in migrations():
        if number == 11:
            db.execute("INSERT INTO users (name, created_at) VALUES ('u', 'x')")
            for i in range(3):
                db.execute(
                    "INSERT INTO ssh_keys (user_id, name, algorithm, bits, public_key, "
                    "fingerprint, fingerprint_md5, created_at) "
                    "VALUES (1, ?, 'a', 1, 'k', ?, 'm', 'x')",
                    (f"k{i}", f"fp{i}"),
                )
            db.execute("DELETE FROM ssh_keys WHERE id = 3")
        db.executescript(sql)
    db.execute(
        "INSERT INTO ssh_keys (user_id, name, algorithm, bits, public_key, fingerprint, "
        "fingerprint_md5, created_at) VALUES (1, 'new', 'a', 1, 'k', 'fpn', 'm', 'x')"
    )
    assert db.execute("SELECT id FROM ssh_keys WHERE name = 'new'").fetchone() == (4,)
    assert db.execute("PRAGMA foreign_key_check").fetchall() == []
