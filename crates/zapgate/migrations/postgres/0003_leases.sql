-- Ownership of instances when several gateway nodes share this database. Each node
-- process has a row it renews; each instance a lease naming its node and an epoch that
-- is never reused (a sequence: logged, so a crash cannot hand out one twice). Every
-- write that only an instance's owner may make checks, in its own transaction, that
-- the lease still names that node at that epoch (zg_fence): a node that lost the
-- instance, however late its write arrives, is refused.
CREATE SEQUENCE zg_epoch;

CREATE TABLE zg_node (
    -- Random per process start, never reused: a node that lost its row joins anew.
    id         text COLLATE "C" PRIMARY KEY,
    name       text NOT NULL,
    -- Where the other nodes reach this one for an instance's commands.
    addr       text NOT NULL,
    capacity   integer NOT NULL,
    draining   boolean NOT NULL DEFAULT false,
    started_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    -- On the database's clock: past it, any node may reap this one.
    expires_at timestamptz NOT NULL
);

CREATE TABLE zg_lease (
    instance   text COLLATE "C" PRIMARY KEY REFERENCES instances(id) ON DELETE CASCADE,
    -- NULL: free for any node to claim.
    node       text COLLATE "C" REFERENCES zg_node(id) ON DELETE SET NULL,
    epoch      bigint NOT NULL,
    granted_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX zg_lease_node ON zg_lease (node);

-- Every change of an instance's owner, for audits and the failover tests.
CREATE TABLE zg_lease_log (
    seq      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    instance text NOT NULL,
    node     text,
    epoch    bigint NOT NULL,
    at       timestamptz NOT NULL DEFAULT clock_timestamp(),
    what     text NOT NULL
);

-- The check that opens every owner-only write transaction. FOR SHARE (not FOR KEY
-- SHARE) conflicts with the row lock a claim's UPDATE takes: a claim waits for a
-- stale owner's transaction in flight, and a stale write queued behind a claim reads
-- the new lease when it wakes, and is refused. It also names the session the
-- transaction may write (zapgate.session), which the session tables' guard checks.
CREATE FUNCTION zg_fence(p_instance text, p_node text, p_epoch bigint, p_session bigint)
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1 FROM zg_lease
     WHERE instance = p_instance AND node = p_node AND epoch = p_epoch FOR SHARE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'instance % is no longer owned by node % at epoch %',
            p_instance, p_node, p_epoch USING ERRCODE = 'ZG001';
    END IF;
    PERFORM set_config('zapgate.session', COALESCE(p_session::text, ''), true);
END $$;

-- The guard on every session table: a write to a session's rows outside a transaction
-- that zg_fence opened for that very session is a bug in a write path, refused loudly.
CREATE FUNCTION zg_session_guard() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    written bigint := CASE WHEN TG_OP = 'DELETE' THEN OLD.session ELSE NEW.session END;
BEGIN
    IF current_setting('zapgate.session', true) IS DISTINCT FROM written::text THEN
        RAISE EXCEPTION 'a write to session % without its fence', written
            USING ERRCODE = 'ZG002';
    END IF;
    IF TG_OP = 'DELETE' THEN RETURN OLD; END IF;
    RETURN NEW;
END $$;

-- A new instance comes with a free lease (epoch 0, never a claimed one): its creator, or
-- any node, claims it like any other.
CREATE FUNCTION zg_lease_new() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO zg_lease (instance, node, epoch) VALUES (NEW.id, NULL, 0);
    RETURN NEW;
END $$;
CREATE TRIGGER instances_lease AFTER INSERT ON instances
    FOR EACH ROW EXECUTE FUNCTION zg_lease_new();
