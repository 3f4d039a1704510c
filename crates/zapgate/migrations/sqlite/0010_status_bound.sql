-- Delivery and status events of one instance past 20,000 pending (a receiver gone for
-- long) drop their oldest, marked 'dropped'. SQLite does it itself, looking at every
-- 100th event written (the look walks the instance's pending events), rather than the
-- gateway sending one more statement per event. Received messages are never dropped.
CREATE TRIGGER webhook_outbox_status_bound AFTER INSERT ON webhook_outbox
WHEN NEW.kind IN ('delivery', 'message-status') AND NEW.seq % 100 = 0
BEGIN
    UPDATE webhook_outbox SET done_at = NEW.created_at, outcome = 'dropped' WHERE seq IN
        (SELECT seq FROM webhook_outbox WHERE instance_id = NEW.instance_id
         AND done_at IS NULL AND kind IN ('delivery', 'message-status')
         ORDER BY seq DESC LIMIT -1 OFFSET 20000);
END;
