-- Scoped keys. A key belongs either to a user (user_id) or, as a deploy key, to one app
-- (app_id), never both: the fingerprint stays unique across all of them, so one key still has
-- one owner. `access`: 'read' or 'write' for a deploy key (required); for a user key, 'read'
-- limits it to reading, NULL leaves it the user's roles. `scoped`: the user key reaches only
-- the apps listed in key_apps (none left, when they are all removed: it reaches nothing).
-- SQLite cannot relax a NOT NULL in place: the table is rebuilt (ids kept, AUTOINCREMENT
-- kept), as in 0005; the runner applies this with foreign keys off and checks them after.
CREATE TABLE ssh_keys_new (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id         INTEGER REFERENCES users(id) ON DELETE CASCADE,
    app_id          INTEGER REFERENCES apps(id) ON DELETE CASCADE,
    name            TEXT NOT NULL,
    algorithm       TEXT NOT NULL,
    bits            INTEGER NOT NULL,
    public_key      TEXT NOT NULL,
    comment         TEXT NOT NULL DEFAULT '',
    fingerprint     TEXT NOT NULL UNIQUE,
    fingerprint_md5 TEXT NOT NULL,
    created_at      TEXT NOT NULL,
    last_used_at    TEXT,
    expires_at      TEXT,
    access          TEXT CHECK (access IS NULL OR access IN ('read', 'write')),
    scoped          INTEGER NOT NULL DEFAULT 0 CHECK (scoped IN (0, 1)),
    CHECK ((user_id IS NULL) <> (app_id IS NULL)),
    CHECK (app_id IS NULL OR (access IS NOT NULL AND scoped = 0)),
    UNIQUE (user_id, name),
    UNIQUE (app_id, name)
);
INSERT INTO ssh_keys_new (id, user_id, name, algorithm, bits, public_key, comment, fingerprint,
                          fingerprint_md5, created_at, last_used_at, expires_at)
    SELECT id, user_id, name, algorithm, bits, public_key, comment, fingerprint,
           fingerprint_md5, created_at, last_used_at, expires_at FROM ssh_keys;
-- Ids are never handed out twice (0005): the old table's high-water mark goes with the new
-- one (DROP removes its sqlite_sequence row; copying rows seeds only the highest id left).
INSERT INTO sqlite_sequence (name, seq)
    SELECT 'ssh_keys_new', 0
    WHERE NOT EXISTS (SELECT 1 FROM sqlite_sequence WHERE name = 'ssh_keys_new');
UPDATE sqlite_sequence
   SET seq = max(seq, coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'ssh_keys'), 0))
 WHERE name = 'ssh_keys_new';
DROP TABLE ssh_keys;
ALTER TABLE ssh_keys_new RENAME TO ssh_keys;

CREATE TABLE key_apps (
    key_id  INTEGER NOT NULL REFERENCES ssh_keys(id) ON DELETE CASCADE,
    app_id  INTEGER NOT NULL REFERENCES apps(id) ON DELETE CASCADE,
    PRIMARY KEY (key_id, app_id)
);
CREATE INDEX key_apps_by_app ON key_apps (app_id);
