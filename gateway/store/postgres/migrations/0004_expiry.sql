-- Keys and API tokens may expire (see the SQLite migration 0010).
ALTER TABLE ssh_keys ADD COLUMN expires_at timestamptz;
ALTER TABLE api_tokens ADD COLUMN expires_at timestamptz;
