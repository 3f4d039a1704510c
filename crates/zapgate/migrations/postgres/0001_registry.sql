-- The instance registry, link pages and the webhook outbox: the same tables as SQLite's
-- migrations 0001-0008 and 0011 build, in one step. Times are unix milliseconds (bigint).
-- Ids and other keys are compared and ordered by their bytes (COLLATE "C"), whatever the
-- database's locale, as SQLite does.

-- One row per instance (one WhatsApp number). Every write that reads a webhook URL or
-- depends on what the instance's row says (link pages, connection events) locks the
-- row first: several gateway nodes share this table.
CREATE TABLE instances (
    id                                TEXT COLLATE "C" PRIMARY KEY,
    -- Insertion order, for instances created in the same millisecond (SQLite's rowid).
    seq                               BIGINT GENERATED ALWAYS AS IDENTITY,
    token                             TEXT COLLATE "C" NOT NULL,
    -- "C" here too: a search by name ignores the case of ASCII letters only, as on SQLite.
    name                              TEXT COLLATE "C" NOT NULL,
    session_name                      TEXT,
    connected_callback_url            TEXT,
    disconnected_callback_url         TEXT,
    received_callback_url             TEXT,
    received_delivery_callback_url    TEXT,
    delivery_callback_url             TEXT,
    message_status_callback_url       TEXT,
    presence_chat_callback_url        TEXT,
    notify_sent_by_me                 BOOLEAN NOT NULL DEFAULT false,
    -- What the connection webhooks last said: true connected, false disconnected, NULL
    -- nothing yet. Written with the event itself, whether or not a URL was set.
    webhook_connected                 BOOLEAN,
    auto_read_message                 BOOLEAN NOT NULL DEFAULT false,
    disable_enqueue_when_disconnected BOOLEAN NOT NULL DEFAULT false,
    created_at                        BIGINT NOT NULL,
    due_at                            BIGINT NOT NULL,
    -- The linked number; NULL while no WhatsApp session is stored.
    phone                             TEXT,
    linked_at                         BIGINT,
    -- The phone's platform as WhatsApp reported it at linking (android, smbi, ...).
    platform                          TEXT,
    -- Set when a cancel began: the row is no longer listed, and goes once the number is
    -- unlinked and its session deleted.
    cancelled_at                      BIGINT
);

-- Listing order: creation time, then insertion order for the same millisecond.
CREATE INDEX instances_created ON instances (created_at, seq);

-- Link pages: a URL with its own single-purpose, expiring token that shows one instance's
-- linking experience to the number's owner. Only the token's SHA-256 is kept.
CREATE TABLE link_pages (
    token_hash  TEXT COLLATE "C" PRIMARY KEY,
    instance_id TEXT COLLATE "C" NOT NULL REFERENCES instances (id) ON DELETE CASCADE,
    created_at  BIGINT NOT NULL,
    expires_at  BIGINT NOT NULL,
    revoked_at  BIGINT,
    -- Set when the number linked while the page lived: the page is spent.
    used_at     BIGINT,
    -- The pairing codes the page was given over its life.
    pair_codes  BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX link_pages_by_instance ON link_pages (instance_id);

-- Webhook events waiting to be delivered, and the last ones delivered. An event is
-- written in the transaction that decides it, so a crash cannot lose it; each instance's
-- events are delivered in seq order. Not tied to the instance row: a cancelled
-- instance's last events are still delivered.
CREATE TABLE webhook_outbox (
    seq             BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id        TEXT COLLATE "C" NOT NULL UNIQUE,
    instance_id     TEXT COLLATE "C" NOT NULL,
    kind            TEXT COLLATE "C" NOT NULL,
    url             TEXT NOT NULL,
    body            TEXT NOT NULL,
    created_at      BIGINT NOT NULL,
    attempts        BIGINT NOT NULL DEFAULT 0,
    next_attempt_at BIGINT NOT NULL,
    last_status     BIGINT,
    last_error      TEXT,
    -- Set once the event is settled: delivered, gone (410), refused, expired or dropped.
    done_at         BIGINT,
    outcome         TEXT
);
CREATE INDEX webhook_outbox_pending ON webhook_outbox (instance_id, seq) WHERE done_at IS NULL;
CREATE INDEX webhook_outbox_by_instance ON webhook_outbox (instance_id, seq);
-- An instance's pending events of one kind (the bounds on connection and status events,
-- the count of received ones waiting).
CREATE INDEX webhook_outbox_pending_kind ON webhook_outbox (instance_id, kind, seq)
    WHERE done_at IS NULL;
-- Forgetting settled events reads this rather than the whole table.
CREATE INDEX webhook_outbox_settled ON webhook_outbox (done_at) WHERE done_at IS NOT NULL;
