-- The count of an instance's received events waiting (once per incoming message) and
-- the status bound's look read an index of the pending events by kind, not every one.
CREATE INDEX webhook_outbox_pending_kind ON webhook_outbox (instance_id, kind, seq)
    WHERE done_at IS NULL;

-- Forgetting old rows (every ten minutes, holding the write lock) reads these indexes
-- rather than whole tables.
CREATE INDEX outbound_by_created ON outbound_messages (created_at);
CREATE INDEX inbound_by_received ON inbound_messages (received_at);
CREATE INDEX webhook_outbox_settled ON webhook_outbox (done_at) WHERE done_at IS NOT NULL;
