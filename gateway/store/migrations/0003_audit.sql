-- Security-relevant events: logins, refusals, registry changes, pushes.
CREATE TABLE audit_events (
    id           INTEGER PRIMARY KEY,
    at           TEXT NOT NULL,
    event        TEXT NOT NULL,
    actor        TEXT NOT NULL DEFAULT '',   -- user name; "operator" for the CLI; "" if unknown
    fingerprint  TEXT NOT NULL DEFAULT '',
    source       TEXT NOT NULL DEFAULT '',   -- client address
    app          TEXT NOT NULL DEFAULT '',
    detail       TEXT NOT NULL DEFAULT '{}'  -- JSON object
);

CREATE INDEX audit_by_app ON audit_events (app, id);
CREATE INDEX audit_by_actor ON audit_events (actor, id);
