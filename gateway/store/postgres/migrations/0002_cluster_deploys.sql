-- The deploy queue lives here, shared by every gateway process of every node (see the SQLite
-- migration 0008 for the meaning of each column). `seen_at` is the database's own clock, in
-- seconds since the epoch, so that nodes' clocks never have to agree.
CREATE TABLE nodes (
    id          text PRIMARY KEY,
    name        text NOT NULL,
    pid         integer NOT NULL,
    started_at  timestamptz NOT NULL,
    seen_at     double precision NOT NULL
);

ALTER TABLE deploys ADD COLUMN runner text;
ALTER TABLE deploys ADD COLUMN origin text;
ALTER TABLE deploys ADD COLUMN cancel_request text;
ALTER TABLE deploys ADD COLUMN report_status text
    CHECK (report_status IS NULL OR report_status IN ('succeeded', 'failed'));
ALTER TABLE deploys ADD COLUMN report_exit_code integer;
ALTER TABLE deploys ADD COLUMN duration_ms bigint;
ALTER TABLE deploys ADD COLUMN log_seq bigint NOT NULL DEFAULT 0;
ALTER TABLE deploys ADD COLUMN log_bytes bigint NOT NULL DEFAULT 0;

UPDATE deploys SET status = 'interrupted',
       reason = 'the gateway stopped while this deploy was running'
 WHERE status = 'running'
   AND id NOT IN (SELECT MAX(id) FROM deploys WHERE status = 'running' GROUP BY app_id);
CREATE UNIQUE INDEX deploys_one_running_per_app ON deploys (app_id) WHERE status = 'running';
CREATE INDEX deploys_by_runner ON deploys (runner) WHERE status = 'running';

CREATE TABLE deploy_log_chunks (
    deploy_id  bigint NOT NULL REFERENCES deploys (id) ON DELETE CASCADE
                   DEFERRABLE INITIALLY IMMEDIATE,
    seq        bigint NOT NULL,
    position   bigint NOT NULL,
    size       integer NOT NULL,
    closing    integer NOT NULL DEFAULT 0,
    text       text NOT NULL,
    PRIMARY KEY (deploy_id, seq)
);
