-- Users, their SSH keys, apps and app members.
CREATE TABLE users (
    id          INTEGER PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    created_at  TEXT NOT NULL
);

CREATE TABLE ssh_keys (
    id              INTEGER PRIMARY KEY,
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

CREATE TABLE apps (
    id             INTEGER PRIMARY KEY,
    name           TEXT NOT NULL UNIQUE,
    owner_id       INTEGER NOT NULL REFERENCES users(id) ON DELETE RESTRICT,
    deploy_branch  TEXT NOT NULL DEFAULT 'main',
    created_at     TEXT NOT NULL
);

CREATE TABLE app_members (
    app_id      INTEGER NOT NULL REFERENCES apps(id) ON DELETE CASCADE,
    user_id     INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    role        TEXT NOT NULL CHECK (role IN ('read', 'write', 'admin')),
    created_at  TEXT NOT NULL,
    PRIMARY KEY (app_id, user_id)
);

CREATE INDEX app_members_by_user ON app_members (user_id);
CREATE INDEX apps_by_owner ON apps (owner_id);
