-- Webhook events waiting to be delivered, and the last ones delivered. An event is
-- written here in the transaction that decides it, so a crash cannot lose it; a worker
-- delivers each instance's events in order. Not tied to the instance row: a cancelled
-- instance's last events are still delivered.
CREATE TABLE webhook_outbox (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id        TEXT NOT NULL UNIQUE,
    instance_id     TEXT NOT NULL,
    kind            TEXT NOT NULL,
    url             TEXT NOT NULL,
    body            TEXT NOT NULL,
    created_at      INTEGER NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL,
    last_status     INTEGER,
    last_error      TEXT,
    -- Set once the event is settled: delivered, gone (410), expired, or dropped.
    done_at         INTEGER,
    outcome         TEXT
);
CREATE INDEX webhook_outbox_pending ON webhook_outbox (instance_id, seq) WHERE done_at IS NULL;
CREATE INDEX webhook_outbox_by_instance ON webhook_outbox (instance_id, seq);
