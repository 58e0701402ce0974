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
) WITH (fillfactor = 50);
-- A job's status writes change no indexed column, so PostgreSQL updates its row in place (a
-- heap-only tuple: no new index entries per write) in the room the fillfactor leaves on each
-- page. The purge finds expired rows through created_at (a record expires at least its TTL
-- after it was created). Tables made by an earlier version get the same settings here.
ALTER TABLE {schema}.workq_jobs SET (fillfactor = 50);
CREATE INDEX IF NOT EXISTS workq_jobs_created_idx ON {schema}.workq_jobs (created_at);
DROP INDEX IF EXISTS {schema}.workq_jobs_expires_idx;

-- Groups (aio_workq.jobs.group): one row per group, one per member. A member's terminal write
-- marks its row done and counts the group down in one transaction; the one that reaches zero
-- sets callback_claimed (once).
CREATE TABLE IF NOT EXISTS {schema}.workq_groups (
    group_id            text              PRIMARY KEY,
    size                integer           NOT NULL,
    remaining           integer           NOT NULL,
    callback_task       text,
    callback_queue      text,
    callback_param      text,
    callback_body       bytea,
    callback_claimed    boolean           NOT NULL DEFAULT false,
    callback_published  boolean           NOT NULL DEFAULT false,
    created_at          double precision  NOT NULL,
    expires_at          double precision  NOT NULL
);
CREATE TABLE IF NOT EXISTS {schema}.workq_group_members (
    group_id       text              NOT NULL,
    idx            integer           NOT NULL,
    job_id         text              NOT NULL,
    done           boolean           NOT NULL DEFAULT false,
    state          text,
    result         bytea,
    content_type   text,
    error_type     text,
    error_message  text,
    expires_at     double precision  NOT NULL,
    PRIMARY KEY (group_id, idx)
);
-- Rate limits (@tasks.task(rate_limit=...)): one token bucket per key, as its theoretical
-- arrival time (GCRA).
CREATE TABLE IF NOT EXISTS {schema}.workq_rates (
    key         text              PRIMARY KEY,
    tat         double precision  NOT NULL,
    expires_at  double precision  NOT NULL
);
