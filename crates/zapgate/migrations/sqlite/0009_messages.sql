-- Messages sent through the API: each instance's queue, in order (seq), and what became
-- of every message since. A row is written before the caller hears its ids, so a crash
-- loses nothing; the WhatsApp id is minted then and reused on every resend, so a resend
-- after a crash is a duplicate WhatsApp drops, never a second message.
CREATE TABLE outbound_messages (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,
    zaap_id         TEXT NOT NULL UNIQUE,
    instance_id     TEXT NOT NULL,
    message_id      TEXT NOT NULL,
    -- The number as given, digits only (or a ...@lid id).
    phone           TEXT NOT NULL,
    text            TEXT NOT NULL,
    reply_to        TEXT,
    edit_of         TEXT,
    -- Milliseconds to wait after the previous send (NULL: the gateway's pacing).
    delay_ms        INTEGER,
    typing_ms       INTEGER NOT NULL DEFAULT 0,
    idempotency_key TEXT,
    -- SHA-256 of the request, to tell a replay from another request with the same key.
    request_hash    TEXT,
    -- queued, sending (on the wire, waiting for WhatsApp's ack), sent, received, read,
    -- played, failed.
    state           TEXT NOT NULL DEFAULT 'queued',
    attempts        INTEGER NOT NULL DEFAULT 0,
    error           TEXT,
    created_at      INTEGER NOT NULL,
    sent_at         INTEGER,
    delivered_at    INTEGER,
    read_at         INTEGER,
    UNIQUE (instance_id, message_id)
);
CREATE INDEX outbound_pending ON outbound_messages (instance_id, seq)
    WHERE state IN ('queued', 'sending');
CREATE UNIQUE INDEX outbound_idempotency ON outbound_messages (instance_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;

-- Messages received, recorded before WhatsApp is told they arrived: one row per
-- (chat, sender, id), so a redelivery is recognised and not announced twice. A message
-- that could not be decrypted yet has its own row (waiting = 1).
CREATE TABLE inbound_messages (
    instance_id TEXT NOT NULL,
    chat        TEXT NOT NULL,
    sender      TEXT NOT NULL,
    message_id  TEXT NOT NULL,
    waiting     INTEGER NOT NULL DEFAULT 0,
    text        TEXT,
    from_me     INTEGER NOT NULL DEFAULT 0,
    sent_at     INTEGER NOT NULL,
    received_at INTEGER NOT NULL,
    PRIMARY KEY (instance_id, chat, sender, message_id, waiting)
);
CREATE INDEX inbound_by_id ON inbound_messages (instance_id, message_id);

ALTER TABLE instances ADD COLUMN auto_read_message INTEGER NOT NULL DEFAULT 0;
ALTER TABLE instances ADD COLUMN disable_enqueue_when_disconnected INTEGER NOT NULL DEFAULT 0;
