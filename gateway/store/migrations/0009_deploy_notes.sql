-- A pusher's note on a deploy (`git push -o deploy.note="..."`): printable, one line, at
-- most 200 characters, validated by the gateway before it is stored.
ALTER TABLE deploys ADD COLUMN note TEXT;
