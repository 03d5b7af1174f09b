-- Scoped keys: deploy keys of one app, user keys limited to apps or to reading (see the
-- SQLite migration 0011 for the meaning of each column).
ALTER TABLE ssh_keys ALTER COLUMN user_id DROP NOT NULL;
ALTER TABLE ssh_keys ADD COLUMN app_id bigint REFERENCES apps (id) ON DELETE CASCADE
    DEFERRABLE INITIALLY IMMEDIATE;
ALTER TABLE ssh_keys ADD COLUMN access text CHECK (access IS NULL OR access IN ('read', 'write'));
ALTER TABLE ssh_keys ADD COLUMN scoped integer NOT NULL DEFAULT 0 CHECK (scoped IN (0, 1));
ALTER TABLE ssh_keys ADD CONSTRAINT ssh_keys_one_owner CHECK ((user_id IS NULL) <> (app_id IS NULL));
ALTER TABLE ssh_keys ADD CONSTRAINT ssh_keys_deploy_access
    CHECK (app_id IS NULL OR (access IS NOT NULL AND scoped = 0));
ALTER TABLE ssh_keys ADD CONSTRAINT ssh_keys_app_id_name_key UNIQUE (app_id, name);

CREATE TABLE key_apps (
    key_id  bigint NOT NULL REFERENCES ssh_keys (id) ON DELETE CASCADE DEFERRABLE INITIALLY IMMEDIATE,
    app_id  bigint NOT NULL REFERENCES apps (id) ON DELETE CASCADE DEFERRABLE INITIALLY IMMEDIATE,
    PRIMARY KEY (key_id, app_id)
);
CREATE INDEX key_apps_by_app ON key_apps (app_id);
