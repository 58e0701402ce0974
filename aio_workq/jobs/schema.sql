-- aio-workq job store table (aio_workq.jobs.postgres.PostgresStore).
-- The schema placeholder in braces is replaced by the quoted schema name (default "public"); the
-- statements are idempotent, so running them again is safe. Copy this file into your migration
-- tool as it is, or call `await aio_workq.jobs.postgres.migrate(connection)`, or print it:
-- `python -c "from aio_workq.jobs.postgres import schema_sql; print(schema_sql())"`.
-- Times are Unix seconds (to_timestamp(updated_at) shows them as timestamps).

CREATE SCHEMA IF NOT EXISTS {schema};

CREATE TABLE IF NOT EXISTS {schema}.workq_jobs (
    job_id            text              PRIMARY KEY,
    task              text              NOT NULL,
    queue             text              NOT NULL,
    state             text              NOT NULL,  -- queued, running, retrying, succeeded, failed, cancelled
    rank              smallint          NOT NULL,  -- the state's order within one run
    attempt           integer           NOT NULL,
    defers            integer           NOT NULL DEFAULT 0,
    next_retry_at     double precision,
    error_type        text,
    error_message     text,
    result            bytea,
    content_type      text,
    cancel_requested  boolean           NOT NULL DEFAULT false,
    created_at        double precision  NOT NULL,
    started_at        double precision,
    finished_at       double precision,
    updated_at        double precision  NOT NULL,
    expires_at        double precision  NOT NULL   -- the record reads as absent from then on
);
CREATE INDEX IF NOT EXISTS workq_jobs_expires_idx ON {schema}.workq_jobs (expires_at);
