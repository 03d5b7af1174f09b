-- The deploy pipeline kinds are the modules of gateway/deploys/pipelines/: the gateway checks a
-- deploy's kind against them (pipelines.KINDS), so a new kind needs no migration (see the
-- SQLite migration 0012). The constraint has PostgreSQL's name for a column's CHECK.
ALTER TABLE deploys DROP CONSTRAINT IF EXISTS deploys_pipeline_check;
