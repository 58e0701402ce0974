-- aio-workq outbox and idempotent-consumer tables (aio_workq.outbox).
-- The schema placeholder in braces is replaced by the quoted schema name (default "public"); the
-- statements are idempotent, so running them again is safe. Copy this file into your migration tool as it is, or call
-- `await aio_workq.outbox.migrate(connection)`, or print it: `python -m aio_workq.outbox schema`.

CREATE SCHEMA IF NOT EXISTS {schema};

-- Messages inserted inside the application's own transactions, waiting for the relay.
CREATE TABLE IF NOT EXISTS {schema}.workq_outbox (
    id            bigserial    PRIMARY KEY,
    message_id    text         NOT NULL UNIQUE,
    queue         text,                            -- a queue name (declared on first use) ...
    exchange      text         NOT NULL DEFAULT '', -- ... or an exchange and a routing key
    routing_key   text         NOT NULL DEFAULT '',
    body          bytea        NOT NULL,
    content_type  text,
    headers       jsonb,
    available_at  timestamptz  NOT NULL DEFAULT now(), -- `delay=` and the relay's retry backoff
    created_at    timestamptz  NOT NULL DEFAULT now(),
    attempts      integer      NOT NULL DEFAULT 0,
    last_error    text
);
CREATE INDEX IF NOT EXISTS workq_outbox_available_idx ON {schema}.workq_outbox (available_at, id);

-- Message ids whose handler transaction committed, per consumer name.
CREATE TABLE IF NOT EXISTS {schema}.workq_processed (
    consumer      text         NOT NULL,
    message_id    text         NOT NULL,
    processed_at  timestamptz  NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, message_id)
);
CREATE INDEX IF NOT EXISTS workq_processed_at_idx ON {schema}.workq_processed (processed_at);

-- Wake the relays when an insert commits (NOTIFY is delivered at commit, once per transaction).
CREATE OR REPLACE FUNCTION {schema}.workq_outbox_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('workq_outbox', TG_TABLE_SCHEMA);
    RETURN NULL;
END;
$$;
DROP TRIGGER IF EXISTS workq_outbox_notify ON {schema}.workq_outbox;
CREATE TRIGGER workq_outbox_notify AFTER INSERT ON {schema}.workq_outbox
    FOR EACH STATEMENT EXECUTE FUNCTION {schema}.workq_outbox_notify();
