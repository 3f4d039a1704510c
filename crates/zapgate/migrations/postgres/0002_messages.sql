-- Messages sent through the API: each instance's queue, in order (seq), and what became
-- of every message since. A row is written before the caller hears its ids, so a crash
-- loses nothing; the WhatsApp id is minted then and reused on every resend, so a resend
-- after a crash is a duplicate WhatsApp drops, never a second message. A message is
-- queued holding its instance's row lock, so seq order is commit order within an
-- instance.
CREATE TABLE outbound_messages (
    seq             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    zaap_id         text COLLATE "C" NOT NULL UNIQUE,
    instance_id     text COLLATE "C" NOT NULL,
    message_id      text COLLATE "C" NOT NULL,
    -- The number as given, digits only (or a ...@lid id).
    phone           text COLLATE "C" NOT NULL,
    text            text NOT NULL,
    reply_to        text COLLATE "C",
    edit_of         text COLLATE "C",
    -- Milliseconds to wait after the previous send (NULL: the gateway's pacing).
    delay_ms        bigint,
    typing_ms       bigint NOT NULL DEFAULT 0,
    idempotency_key text COLLATE "C",
    -- SHA-256 of the request, to tell a replay from another request with the same key.
    request_hash    text COLLATE "C",
    -- queued, sending (on the wire, waiting for WhatsApp's ack), sent, received, read,
    -- played, failed.
    state           text COLLATE "C" NOT NULL DEFAULT 'queued',
    attempts        bigint NOT NULL DEFAULT 0,
    error           text,
    created_at      bigint NOT NULL,
    sent_at         bigint,
    delivered_at    bigint,
    read_at         bigint,
    UNIQUE (instance_id, message_id)
);
CREATE INDEX outbound_pending ON outbound_messages (instance_id, seq)
    WHERE state IN ('queued', 'sending');
CREATE UNIQUE INDEX outbound_idempotency ON outbound_messages (instance_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;

-- Messages received, recorded before WhatsApp is told they arrived: one row per
-- (chat, sender, id), so a redelivery is recognised and not announced twice. A message
-- that could not be decrypted yet has its own row (waiting).
CREATE TABLE inbound_messages (
    instance_id text COLLATE "C" NOT NULL,
    chat        text COLLATE "C" NOT NULL,
    sender      text COLLATE "C" NOT NULL,
    message_id  text COLLATE "C" NOT NULL,
    waiting     boolean NOT NULL DEFAULT false,
    text        text,
    from_me     boolean NOT NULL DEFAULT false,
    sent_at     bigint NOT NULL,
    received_at bigint NOT NULL,
    PRIMARY KEY (instance_id, chat, sender, message_id, waiting)
);
CREATE INDEX inbound_by_id ON inbound_messages (instance_id, message_id);

-- Forgetting old rows (every ten minutes, a thousand at a time) reads these indexes
-- rather than whole tables.
CREATE INDEX outbound_by_created ON outbound_messages (created_at);
CREATE INDEX inbound_by_received ON inbound_messages (received_at);

-- Delivery and status events of one instance past 20,000 pending (a receiver gone for
-- long) drop their oldest, marked 'dropped'. The database does it itself, looking at
-- every 100th event written (the look walks the instance's pending events), rather than
-- the gateway sending one more statement per event. Received messages are never
-- dropped. Events are written holding their instance's row lock, so two looks at one
-- instance never run at once.
CREATE FUNCTION webhook_outbox_status_bound() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- The events to drop are listed once (an array): as a join, the planner may walk
    -- the instance's pending events again for every row it looks at.
    UPDATE webhook_outbox SET done_at = NEW.created_at, outcome = 'dropped'
     WHERE seq = ANY (ARRAY(SELECT seq FROM webhook_outbox WHERE instance_id = NEW.instance_id
         AND done_at IS NULL AND kind IN ('delivery', 'message-status')
         ORDER BY seq DESC OFFSET 20000))
       -- A delivery may settle one of them meanwhile: it stays as delivered.
       AND done_at IS NULL;
    RETURN NULL;
END;
$$;
CREATE TRIGGER webhook_outbox_status_bound AFTER INSERT ON webhook_outbox
    FOR EACH ROW
    WHEN (NEW.kind IN ('delivery', 'message-status') AND NEW.seq % 100 = 0)
    EXECUTE FUNCTION webhook_outbox_status_bound();
