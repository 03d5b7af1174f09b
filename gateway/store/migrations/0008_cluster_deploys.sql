-- The deploy queue lives here, shared by every gateway process of every node.
-- A node is one gateway process; it renews `seen_at` (seconds since the machine booted: the
-- clock every process of the machine shares, never stepped) while it lives,
-- and one that stops renewing is declared gone by the others: its running deploys become
-- interrupted. `name` groups the processes of one machine: max_parallel counts per name.
CREATE TABLE nodes (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    pid         INTEGER NOT NULL,
    started_at  TEXT NOT NULL,
    seen_at     REAL NOT NULL
);

-- Who runs a deploy; for a gated one, the process holding the push's quarantine (only it can
-- run it); a stop asked while it runs elsewhere; a webhook receiver's report; the duration.
ALTER TABLE deploys ADD COLUMN runner TEXT;
ALTER TABLE deploys ADD COLUMN origin TEXT;
ALTER TABLE deploys ADD COLUMN cancel_request TEXT;
ALTER TABLE deploys ADD COLUMN report_status TEXT
    CHECK (report_status IS NULL OR report_status IN ('succeeded', 'failed'));
ALTER TABLE deploys ADD COLUMN report_exit_code INTEGER;
ALTER TABLE deploys ADD COLUMN duration_ms INTEGER;
-- The log so far: chunks appended, numbered per deploy; bytes counted in UTF-8.
ALTER TABLE deploys ADD COLUMN log_seq INTEGER NOT NULL DEFAULT 0;
ALTER TABLE deploys ADD COLUMN log_bytes INTEGER NOT NULL DEFAULT 0;

-- Two gateways on one file could each have run a deploy of one app: the older ones were
-- interrupted, and from now on the database refuses a second running deploy per app.
UPDATE deploys SET status = 'interrupted',
       reason = 'the gateway stopped while this deploy was running'
 WHERE status = 'running'
   AND id NOT IN (SELECT MAX(id) FROM deploys WHERE status = 'running' GROUP BY app_id);
CREATE UNIQUE INDEX deploys_one_running_per_app ON deploys (app_id) WHERE status = 'running';
CREATE INDEX deploys_by_runner ON deploys (runner) WHERE status = 'running';

-- A deploy's output, bounded to its tail: the oldest chunks are deleted past the log limit;
-- `position` is where the chunk starts in the whole output, so a gap shows what was cut.
-- `closing` marks the final line the runner adds (watchers print their own).
CREATE TABLE deploy_log_chunks (
    deploy_id  INTEGER NOT NULL REFERENCES deploys (id) ON DELETE CASCADE,
    seq        INTEGER NOT NULL,
    position   INTEGER NOT NULL,
    size       INTEGER NOT NULL,
    closing    INTEGER NOT NULL DEFAULT 0,
    text       TEXT NOT NULL,
    PRIMARY KEY (deploy_id, seq)
);
