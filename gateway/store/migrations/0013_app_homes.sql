-- Each app's repository is served by one home node at a time (the others forward to it): the
-- first node that needs the app claims it. A home lives as long as its node's lease: it has
-- no lease of its own, so renewing the node renews all its homes, and when the node is
-- declared gone (expired) or leaves, its homes go with its row (ON DELETE CASCADE) and the
-- next node that needs the app takes it. An app removed takes its home with it.
CREATE TABLE app_homes (
    app_id      INTEGER PRIMARY KEY REFERENCES apps (id) ON DELETE CASCADE,
    node        TEXT NOT NULL REFERENCES nodes (id) ON DELETE CASCADE,
    claimed_at  TEXT NOT NULL
);
-- A node's homes: what it gives up when it drains, and what its row's deletion cascades to.
CREATE INDEX app_homes_by_node ON app_homes (node);
-- Where the other nodes reach a node's internal listener ([cluster] listen), to forward the
-- git operations of the apps it is home to.
ALTER TABLE nodes ADD COLUMN address TEXT;
