-- The deploy pipeline kinds are the modules of gateway/deploys/pipelines/: the gateway checks a
-- deploy's kind against them (pipelines.KINDS), so a new kind needs no migration. SQLite
-- cannot drop a CHECK constraint, so the table is rebuilt as 0005 did: create, copy (ids
-- kept), drop, rename, indexes again. Foreign keys are off while a migration runs (see
-- SQLiteStore.migrate), so dropping the old table deletes none of its children's rows
-- (webhook_deliveries, deploy_log_chunks); their REFERENCES deploys name the table, which
-- the renamed copy becomes. The AUTOINCREMENT sequence is carried over, not recomputed: a
-- deleted newest deploy's id must not come back.

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
    pipeline         TEXT NOT NULL,
    status           TEXT NOT NULL CHECK (status IN ('queued', 'running', 'succeeded', 'failed',
                                                     'timed_out', 'cancelled', 'interrupted')),
    superseded_by    INTEGER REFERENCES deploys(id),
    exit_code        INTEGER,
    reason           TEXT NOT NULL DEFAULT '',
    -- A webhook receiver reports the final status with this token (stored hashed).
    status_token_hash TEXT,
    created_at       TEXT NOT NULL,
    started_at       TEXT,
    finished_at      TEXT,
    runner           TEXT,
    origin           TEXT,
    cancel_request   TEXT,
    report_status    TEXT CHECK (report_status IS NULL OR report_status IN ('succeeded', 'failed')),
    report_exit_code INTEGER,
    duration_ms      INTEGER,
    log_seq          INTEGER NOT NULL DEFAULT 0,
    log_bytes        INTEGER NOT NULL DEFAULT 0,
    note             TEXT
);
INSERT INTO deploys_new (id, app_id, ref, old_sha, new_sha, pusher, key_fingerprint, subject,
                         author, mode, pipeline, status, superseded_by, exit_code, reason,
                         status_token_hash, created_at, started_at, finished_at, runner, origin,
                         cancel_request, report_status, report_exit_code, duration_ms, log_seq,
                         log_bytes, note)
    SELECT id, app_id, ref, old_sha, new_sha, pusher, key_fingerprint, subject, author, mode,
           pipeline, status, superseded_by, exit_code, reason, status_token_hash, created_at,
           started_at, finished_at, runner, origin, cancel_request, report_status,
           report_exit_code, duration_ms, log_seq, log_bytes, note FROM deploys;
DELETE FROM sqlite_sequence WHERE name = 'deploys_new';
INSERT INTO sqlite_sequence (name, seq)
    SELECT 'deploys_new', seq FROM sqlite_sequence WHERE name = 'deploys';
DROP TABLE deploys;
ALTER TABLE deploys_new RENAME TO deploys;
CREATE INDEX deploys_by_app ON deploys (app_id, id);
CREATE INDEX deploys_by_status ON deploys (status);
CREATE UNIQUE INDEX deploys_one_running_per_app ON deploys (app_id) WHERE status = 'running';
CREATE INDEX deploys_by_runner ON deploys (runner) WHERE status = 'running';
