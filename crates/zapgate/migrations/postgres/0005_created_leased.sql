-- A new instance is leased at once to the node that created it (the one named by
-- zapgate.node in the creating transaction), at a fresh epoch: were its lease free
-- for a moment, another node could claim it between the creation and the claim.
-- Without a creating node (a tool, a test), the lease is free, as before.
CREATE OR REPLACE FUNCTION zg_lease_new() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    creator text := NULLIF(current_setting('zapgate.node', true), '');
    granted bigint;
BEGIN
    IF creator IS NULL THEN
        INSERT INTO zg_lease (instance, node, epoch) VALUES (NEW.id, NULL, 0);
        RETURN NEW;
    END IF;
    -- The creator must be a live node, as for any claim (kept so until the commit:
    -- a reap waits for it, and its log sees the new lease).
    PERFORM 1 FROM zg_node WHERE id = creator AND expires_at > clock_timestamp()
        FOR KEY SHARE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'node % is not a live node of this database', creator
            USING ERRCODE = 'ZG001';
    END IF;
    granted := nextval('zg_epoch');
    INSERT INTO zg_lease (instance, node, epoch) VALUES (NEW.id, creator, granted);
    INSERT INTO zg_lease_log (instance, node, epoch, what)
        VALUES (NEW.id, creator, granted, 'claimed');
    RETURN NEW;
END $$;
