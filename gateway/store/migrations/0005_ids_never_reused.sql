-- Ids a user can see are never handed out twice. A plain INTEGER PRIMARY KEY gives the next
-- row max(id) + 1, so deleting the newest row (an app with its deploys, a token, a user)
-- made its id come back, and with it whatever still carried that id (a deploy log file on
-- disk, an id cached by an API client). AUTOINCREMENT keeps the highest id ever used in
-- sqlite_sequence and never goes below it. SQLite cannot add AUTOINCREMENT to a table, so each
-- table is rebuilt: create, copy (ids kept), drop, rename, indexes again. The runner applies
-- migrations with foreign key enforcement off and checks every foreign key before committing
-- (https://www.sqlite.org/lang_altertable.html, "Making Other Kinds Of Table Schema Changes"):
-- with it on, dropping a parent table would cascade-delete its children's rows.
-- Copying the rows seeds sqlite_sequence with the highest id present; an id deleted before
-- this migration above that is unknowable here (deploy ids are also reserved above the
-- highest log file on disk at every start).

CREATE TABLE users_new (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    name        TEXT NOT NULL UNIQUE,
    created_at  TEXT NOT NULL
);
INSERT INTO users_new (id, name, created_at) SELECT id, name, created_at FROM users;
DROP TABLE users;
ALTER TABLE users_new RENAME TO users;

CREATE TABLE ssh_keys_new (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id         INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    name            TEXT NOT NULL,
    algorithm       TEXT NOT NULL,
    bits            INTEGER NOT NULL,
    public_key      TEXT NOT NULL,
    comment         TEXT NOT NULL DEFAULT '',
    -- One key belongs to one account: the fingerprint is unique across all users,
    -- and this index is what authentication looks keys up by.
    fingerprint     TEXT NOT NULL UNIQUE,
    fingerprint_md5 TEXT NOT NULL,
    created_at      TEXT NOT NULL,
    last_used_at    TEXT,
    UNIQUE (user_id, name)
);
INSERT INTO ssh_keys_new (id, user_id, name, algorithm, bits, public_key, comment, fingerprint,
                          fingerprint_md5, created_at, last_used_at)
    SELECT id, user_id, name, algorithm, bits, public_key, comment, fingerprint,
           fingerprint_md5, created_at, last_used_at FROM ssh_keys;
DROP TABLE ssh_keys;
ALTER TABLE ssh_keys_new RENAME TO ssh_keys;

CREATE TABLE apps_new (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    name           TEXT NOT NULL UNIQUE,
    owner_id       INTEGER NOT NULL REFERENCES users(id) ON DELETE RESTRICT,
    deploy_branch  TEXT NOT NULL DEFAULT 'main',
    created_at     TEXT NOT NULL
);
INSERT INTO apps_new (id, name, owner_id, deploy_branch, created_at)
    SELECT id, name, owner_id, deploy_branch, created_at FROM apps;
DROP TABLE apps;
ALTER TABLE apps_new RENAME TO apps;
CREATE INDEX apps_by_owner ON apps (owner_id);

CREATE TABLE deploys_new (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    app_id           INTEGER NOT NULL REFERENCES apps(id) ON DELETE CASCADE,
    ref              TEXT NOT NULL,
    old_sha          TEXT NOT NULL,
    new_sha          TEXT NOT NULL,
    pusher           TEXT NOT NULL,
    key_fingerprint  TEXT NOT NULL,
    subject          TEXT NOT NULL DEFAULT '',
    author           TEXT NOT NULL DEFAULT '',
    mode             TEXT NOT NULL CHECK (mode IN ('attached', 'detached', 'gate')),
    pipeline         TEXT NOT NULL CHECK (pipeline IN ('command', 'webhook')),
    status           TEXT NOT NULL CHECK (status IN ('queued', 'running', 'succeeded', 'failed',
                                                     'timed_out', 'cancelled', 'interrupted')),
    superseded_by    INTEGER REFERENCES deploys(id),
    exit_code        INTEGER,
    reason           TEXT NOT NULL DEFAULT '',
    -- A webhook receiver reports the final status with this token (stored hashed).
    status_token_hash TEXT,
    created_at       TEXT NOT NULL,
    started_at       TEXT,
    finished_at      TEXT
);
INSERT INTO deploys_new (id, app_id, ref, old_sha, new_sha, pusher, key_fingerprint, subject,
                         author, mode, pipeline, status, superseded_by, exit_code, reason,
                         status_token_hash, created_at, started_at, finished_at)
    SELECT id, app_id, ref, old_sha, new_sha, pusher, key_fingerprint, subject, author, mode,
           pipeline, status, superseded_by, exit_code, reason, status_token_hash, created_at,
           started_at, finished_at FROM deploys;
DROP TABLE deploys;
ALTER TABLE deploys_new RENAME TO deploys;
CREATE INDEX deploys_by_app ON deploys (app_id, id);
CREATE INDEX deploys_by_status ON deploys (status);

CREATE TABLE webhook_deliveries_new (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    deploy_id    INTEGER NOT NULL REFERENCES deploys(id) ON DELETE CASCADE,
    attempt      INTEGER NOT NULL,
    url          TEXT NOT NULL,
    status_code  INTEGER,
    error        TEXT NOT NULL DEFAULT '',
    duration_ms  INTEGER NOT NULL,
    created_at   TEXT NOT NULL
);
INSERT INTO webhook_deliveries_new (id, deploy_id, attempt, url, status_code, error,
                                    duration_ms, created_at)
    SELECT id, deploy_id, attempt, url, status_code, error, duration_ms, created_at
      FROM webhook_deliveries;
DROP TABLE webhook_deliveries;
ALTER TABLE webhook_deliveries_new RENAME TO webhook_deliveries;
CREATE INDEX webhook_deliveries_by_deploy ON webhook_deliveries (deploy_id, attempt);

CREATE TABLE audit_events_new (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    at           TEXT NOT NULL,
    event        TEXT NOT NULL,
    actor        TEXT NOT NULL DEFAULT '',   -- user name; "operator" for the CLI; "" if unknown
    fingerprint  TEXT NOT NULL DEFAULT '',
    source       TEXT NOT NULL DEFAULT '',   -- client address
    app          TEXT NOT NULL DEFAULT '',
    detail       TEXT NOT NULL DEFAULT '{}'  -- JSON object
);
INSERT INTO audit_events_new (id, at, event, actor, fingerprint, source, app, detail)
    SELECT id, at, event, actor, fingerprint, source, app, detail FROM audit_events;
DROP TABLE audit_events;
ALTER TABLE audit_events_new RENAME TO audit_events;
CREATE INDEX audit_by_app ON audit_events (app, id);
CREATE INDEX audit_by_actor ON audit_events (actor, id);

CREATE TABLE api_tokens_new (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    name          TEXT NOT NULL UNIQUE,
    user_id       INTEGER REFERENCES users (id) ON DELETE CASCADE,
    token_hash    TEXT NOT NULL UNIQUE,
    created_at    TEXT NOT NULL,
    last_used_at  TEXT
);
INSERT INTO api_tokens_new (id, name, user_id, token_hash, created_at, last_used_at)
    SELECT id, name, user_id, token_hash, created_at, last_used_at FROM api_tokens;
DROP TABLE api_tokens;
ALTER TABLE api_tokens_new RENAME TO api_tokens;
