-- Each app's repository is served by one home node at a time (see the SQLite migration 0013):
-- a home lives as long as its node's row, and goes with it or with its app.
CREATE TABLE app_homes (
    app_id      bigint PRIMARY KEY REFERENCES apps (id) ON DELETE CASCADE,
    node        text NOT NULL REFERENCES nodes (id) ON DELETE CASCADE,
    claimed_at  timestamptz NOT NULL
);
CREATE INDEX app_homes_by_node ON app_homes (node);
-- Where the other nodes reach a node's internal listener ([cluster] listen), to forward the
-- git operations of the apps it is home to.
ALTER TABLE nodes ADD COLUMN address text;
