-- Keys and API tokens may expire: a key past `expires_at` no longer logs in, a token no
-- longer authenticates (both stay listed, marked expired, until removed). NULL: never.
ALTER TABLE ssh_keys ADD COLUMN expires_at TEXT;
ALTER TABLE api_tokens ADD COLUMN expires_at TEXT;
