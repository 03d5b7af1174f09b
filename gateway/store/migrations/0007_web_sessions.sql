-- Keys page sign-ins. The cookie holds a random session id; only its SHA-256 is kept here,
-- with the personal token the user signed in with. Revoking the token or removing the user
-- (whose tokens go with them) ends their sessions.
CREATE TABLE web_sessions (
    id            INTEGER PRIMARY KEY,
    id_hash       TEXT NOT NULL UNIQUE,
    token_id      INTEGER NOT NULL REFERENCES api_tokens (id) ON DELETE CASCADE,
    created_at    TEXT NOT NULL,
    expires_at    TEXT NOT NULL,  -- the absolute end, whatever the activity
    last_seen_at  TEXT NOT NULL   -- the idle expiry counts from here
);

CREATE INDEX web_sessions_by_token ON web_sessions (token_id, id);
CREATE INDEX web_sessions_by_expiry ON web_sessions (expires_at);
