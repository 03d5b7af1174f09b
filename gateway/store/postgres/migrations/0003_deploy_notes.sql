-- A pusher's note on a deploy (see the SQLite migration 0009).
ALTER TABLE deploys ADD COLUMN note text;
