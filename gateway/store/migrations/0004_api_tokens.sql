-- Bearer tokens for the HTTP API and the keys page; only a SHA-256 of each secret is kept.
-- user_id NULL: an operator token (the whole API); otherwise a personal token that acts
-- as that user (their own keys only).
CREATE TABLE api_tokens (
    id            INTEGER PRIMARY KEY,
    name          TEXT NOT NULL UNIQUE,
    user_id       INTEGER REFERENCES users (id) ON DELETE CASCADE,
    token_hash    TEXT NOT NULL UNIQUE,
    created_at    TEXT NOT NULL,
    last_used_at  TEXT
);
