-- Deployments triggered by pushes to an app's deploy branch, and webhook delivery attempts.
CREATE TABLE deploys (
    id               INTEGER PRIMARY KEY,
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

CREATE INDEX deploys_by_app ON deploys (app_id, id);
CREATE INDEX deploys_by_status ON deploys (status);

CREATE TABLE webhook_deliveries (
    id           INTEGER PRIMARY KEY,
    deploy_id    INTEGER NOT NULL REFERENCES deploys(id) ON DELETE CASCADE,
    attempt      INTEGER NOT NULL,
    url          TEXT NOT NULL,
    status_code  INTEGER,
    error        TEXT NOT NULL DEFAULT '',
    duration_ms  INTEGER NOT NULL,
    created_at   TEXT NOT NULL
);

CREATE INDEX webhook_deliveries_by_deploy ON webhook_deliveries (deploy_id, attempt);
