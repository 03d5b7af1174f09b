-- The registry as SQLite's migrations 0001-0007 leave it, in one step.
-- Ids are identities that are never handed out twice: a sequence only moves forward, so
-- deleting the newest row does not bring its id back (SQLite's AUTOINCREMENT, 0005).
-- Times are timestamptz; the store converts them from and to the interface's UTC strings.
-- Foreign keys are DEFERRABLE so that `git-gateway db copy` can insert rows that point
-- forward (a deploy superseded by a later one) and check them all at commit.

CREATE TABLE users (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name        text NOT NULL UNIQUE,
    created_at  timestamptz NOT NULL
);

CREATE TABLE ssh_keys (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id         bigint NOT NULL REFERENCES users (id) ON DELETE CASCADE
                        DEFERRABLE INITIALLY IMMEDIATE,
    name            text NOT NULL,
    algorithm       text NOT NULL,
    bits            integer NOT NULL,
    public_key      text NOT NULL,
    comment         text NOT NULL DEFAULT '',
    -- One key belongs to one account: the fingerprint is unique across all users,
    -- and this index is what authentication looks keys up by.
    fingerprint     text NOT NULL UNIQUE,
    fingerprint_md5 text NOT NULL,
    created_at      timestamptz NOT NULL,
    last_used_at    timestamptz,
    UNIQUE (user_id, name)
);

CREATE TABLE apps (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name           text NOT NULL UNIQUE,
    owner_id       bigint NOT NULL REFERENCES users (id) ON DELETE RESTRICT
                       DEFERRABLE INITIALLY IMMEDIATE,
    deploy_branch  text NOT NULL DEFAULT 'main',
    created_at     timestamptz NOT NULL
);
CREATE INDEX apps_by_owner ON apps (owner_id);

CREATE TABLE app_members (
    app_id      bigint NOT NULL REFERENCES apps (id) ON DELETE CASCADE
                    DEFERRABLE INITIALLY IMMEDIATE,
    user_id     bigint NOT NULL REFERENCES users (id) ON DELETE CASCADE
                    DEFERRABLE INITIALLY IMMEDIATE,
    role        text NOT NULL CHECK (role IN ('read', 'write', 'admin')),
    created_at  timestamptz NOT NULL,
    PRIMARY KEY (app_id, user_id)
);
CREATE INDEX app_members_by_user ON app_members (user_id);

CREATE TABLE deploys (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    app_id           bigint NOT NULL REFERENCES apps (id) ON DELETE CASCADE
                         DEFERRABLE INITIALLY IMMEDIATE,
    ref              text NOT NULL,
    old_sha          text NOT NULL,
    new_sha          text NOT NULL,
    pusher           text NOT NULL,
    key_fingerprint  text NOT NULL,
    subject          text NOT NULL DEFAULT '',
    author           text NOT NULL DEFAULT '',
    mode             text NOT NULL CHECK (mode IN ('attached', 'detached', 'gate')),
    pipeline         text NOT NULL CHECK (pipeline IN ('command', 'webhook')),
    status           text NOT NULL CHECK (status IN ('queued', 'running', 'succeeded', 'failed',
                                                     'timed_out', 'cancelled', 'interrupted')),
    superseded_by    bigint REFERENCES deploys (id) DEFERRABLE INITIALLY IMMEDIATE,
    exit_code        integer,
    reason           text NOT NULL DEFAULT '',
    -- A webhook receiver reports the final status with this token (stored hashed).
    status_token_hash text,
    created_at       timestamptz NOT NULL,
    started_at       timestamptz,
    finished_at      timestamptz
);
CREATE INDEX deploys_by_app ON deploys (app_id, id);
CREATE INDEX deploys_by_status ON deploys (status);
CREATE INDEX deploys_by_superseder ON deploys (superseded_by);

CREATE TABLE webhook_deliveries (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    deploy_id    bigint NOT NULL REFERENCES deploys (id) ON DELETE CASCADE
                     DEFERRABLE INITIALLY IMMEDIATE,
    attempt      integer NOT NULL,
    url          text NOT NULL,
    status_code  integer,
    error        text NOT NULL DEFAULT '',
    duration_ms  integer NOT NULL,
    created_at   timestamptz NOT NULL
);
CREATE INDEX webhook_deliveries_by_deploy ON webhook_deliveries (deploy_id, attempt);

CREATE TABLE audit_events (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at           timestamptz NOT NULL,
    event        text NOT NULL,
    actor        text NOT NULL DEFAULT '',   -- user name; "operator" for the CLI; "" if unknown
    fingerprint  text NOT NULL DEFAULT '',
    source       text NOT NULL DEFAULT '',   -- client address
    app          text NOT NULL DEFAULT '',
    -- A JSON object, kept as the text the gateway wrote (jsonb would reorder its keys).
    detail       text NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(detail::jsonb) = 'object')
);
CREATE INDEX audit_by_app ON audit_events (app, id);
CREATE INDEX audit_by_actor ON audit_events (actor, id);
CREATE INDEX audit_by_at ON audit_events (at);
CREATE INDEX audit_by_subject ON audit_events ((detail::jsonb ->> 'user'), id);

-- Bearer tokens for the HTTP API and the keys page; only a SHA-256 of each secret is kept.
-- user_id NULL: an operator token (the whole API); otherwise a personal token.
CREATE TABLE api_tokens (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name          text NOT NULL UNIQUE,
    user_id       bigint REFERENCES users (id) ON DELETE CASCADE DEFERRABLE INITIALLY IMMEDIATE,
    token_hash    text NOT NULL UNIQUE,
    created_at    timestamptz NOT NULL,
    last_used_at  timestamptz
);

-- Keys page sign-ins: only the SHA-256 of each session id is kept.
CREATE TABLE web_sessions (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id_hash       text NOT NULL UNIQUE,
    token_id      bigint NOT NULL REFERENCES api_tokens (id) ON DELETE CASCADE
                      DEFERRABLE INITIALLY IMMEDIATE,
    created_at    timestamptz NOT NULL,
    expires_at    timestamptz NOT NULL,  -- the absolute end, whatever the activity
    last_seen_at  timestamptz NOT NULL   -- the idle expiry counts from here
);
CREATE INDEX web_sessions_by_token ON web_sessions (token_id, id);
CREATE INDEX web_sessions_by_expiry ON web_sessions (expires_at);
