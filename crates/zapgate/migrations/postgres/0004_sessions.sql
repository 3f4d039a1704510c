-- The WhatsApp sessions of every instance, as SQLite keeps them in sessions.db: what
-- whatsapp-rust keeps for a linked device (its keys, its Signal sessions with contacts,
-- app-state sync), one `session` row per instance and every other row keyed by it.
-- Every write is an owner's: its transaction opens with zg_fence, which names the one
-- session it may write, and a guard on each table refuses a row of any other.

-- Drawn before a session row is written, so that the fence can name it.
CREATE SEQUENCE session_id;

CREATE TABLE session (
    -- never reused, so a write from a client that outlived its session cannot land in
    -- a later one
    id bigint PRIMARY KEY DEFAULT nextval('session_id'),
    -- the instance's id, or `set-aside/<id>/<unix ms>[/unlink]` for a session no
    -- instance claims
    instance text COLLATE "C" NOT NULL UNIQUE,
    created_at bigint NOT NULL,
    -- the device (identity, noise and prekey keys, the account), as JSON, once saved
    device bytea
);
ALTER SEQUENCE session_id OWNED BY session.id;

CREATE TABLE identity (
    session bigint NOT NULL REFERENCES session (id) ON DELETE CASCADE,
    address text COLLATE "C" NOT NULL,
    key bytea NOT NULL,
    PRIMARY KEY (session, address)
);

CREATE TABLE signal_session (
    session bigint NOT NULL REFERENCES session (id) ON DELETE CASCADE,
    address text COLLATE "C" NOT NULL,
    record bytea NOT NULL,
    PRIMARY KEY (session, address)
);

CREATE TABLE prekey (
    session bigint NOT NULL REFERENCES session (id) ON DELETE CASCADE,
    id bigint NOT NULL,
    record bytea NOT NULL,
    uploaded boolean NOT NULL,
    PRIMARY KEY (session, id)
);

CREATE TABLE signed_prekey (
    session bigint NOT NULL REFERENCES session (id) ON DELETE CASCADE,
    id bigint NOT NULL,
    record bytea NOT NULL,
    PRIMARY KEY (session, id)
);

CREATE TABLE sender_key (
    session bigint NOT NULL REFERENCES session (id) ON DELETE CASCADE,
    address text COLLATE "C" NOT NULL,
    record bytea NOT NULL,
    PRIMARY KEY (session, address)
);

CREATE TABLE sync_key (
    session bigint NOT NULL REFERENCES session (id) ON DELETE CASCADE,
    key_id bytea NOT NULL,
    key bytea NOT NULL,
    PRIMARY KEY (session, key_id)
);

CREATE TABLE sync_version (
    session bigint NOT NULL REFERENCES session (id) ON DELETE CASCADE,
    name text COLLATE "C" NOT NULL,
    state bytea NOT NULL,
    PRIMARY KEY (session, name)
);

CREATE TABLE mutation_mac (
    session bigint NOT NULL REFERENCES session (id) ON DELETE CASCADE,
    name text COLLATE "C" NOT NULL,
    index_mac bytea NOT NULL,
    version bigint NOT NULL,
    value_mac bytea NOT NULL,
    PRIMARY KEY (session, name, index_mac)
);

CREATE TABLE sender_key_device (
    session bigint NOT NULL REFERENCES session (id) ON DELETE CASCADE,
    group_jid text COLLATE "C" NOT NULL,
    device_jid text COLLATE "C" NOT NULL,
    has_key boolean NOT NULL,
    PRIMARY KEY (session, group_jid, device_jid)
);
CREATE INDEX sender_key_device_by_device ON sender_key_device (session, device_jid);

CREATE TABLE lid_pn (
    session bigint NOT NULL REFERENCES session (id) ON DELETE CASCADE,
    lid text COLLATE "C" NOT NULL,
    phone text COLLATE "C" NOT NULL,
    created_at bigint NOT NULL,
    updated_at bigint NOT NULL,
    source text NOT NULL,
    PRIMARY KEY (session, lid)
);
CREATE INDEX lid_pn_by_phone ON lid_pn (session, phone, updated_at);

CREATE TABLE base_key (
    session bigint NOT NULL REFERENCES session (id) ON DELETE CASCADE,
    address text COLLATE "C" NOT NULL,
    message_id text COLLATE "C" NOT NULL,
    base_key bytea NOT NULL,
    PRIMARY KEY (session, address, message_id)
);

CREATE TABLE device_list (
    session bigint NOT NULL REFERENCES session (id) ON DELETE CASCADE,
    -- `user` on SQLite, a reserved word here
    user_id text COLLATE "C" NOT NULL,
    -- the devices, as JSON
    devices text NOT NULL,
    timestamp bigint NOT NULL,
    phash text,
    raw_id bigint,
    PRIMARY KEY (session, user_id)
);

CREATE TABLE group_metadata (
    session bigint NOT NULL REFERENCES session (id) ON DELETE CASCADE,
    group_jid text COLLATE "C" NOT NULL,
    info bytea NOT NULL,
    PRIMARY KEY (session, group_jid)
);

CREATE TABLE tc_token (
    session bigint NOT NULL REFERENCES session (id) ON DELETE CASCADE,
    jid text COLLATE "C" NOT NULL,
    token bytea NOT NULL,
    token_timestamp bigint NOT NULL,
    sender_timestamp bigint,
    PRIMARY KEY (session, jid)
);

CREATE TABLE sent_message (
    session bigint NOT NULL REFERENCES session (id) ON DELETE CASCADE,
    chat text COLLATE "C" NOT NULL,
    message_id text COLLATE "C" NOT NULL,
    payload bytea NOT NULL,
    created_at bigint NOT NULL,
    PRIMARY KEY (session, chat, message_id)
);

CREATE TABLE pending_inbound (
    session bigint NOT NULL REFERENCES session (id) ON DELETE CASCADE,
    chat text COLLATE "C" NOT NULL,
    sender text COLLATE "C" NOT NULL,
    id text COLLATE "C" NOT NULL,
    message bytea NOT NULL,
    inserted_at bigint NOT NULL,
    PRIMARY KEY (session, chat, sender, id)
);

CREATE TABLE msg_secret (
    session bigint NOT NULL REFERENCES session (id) ON DELETE CASCADE,
    chat text COLLATE "C" NOT NULL,
    sender text COLLATE "C" NOT NULL,
    msg_id text COLLATE "C" NOT NULL,
    secret bytea NOT NULL,
    -- 0: never
    expires_at bigint NOT NULL,
    message_ts bigint NOT NULL,
    PRIMARY KEY (session, chat, sender, msg_id)
);

-- zg_session_guard for the session rows themselves, which carry their session as `id`.
-- An UPDATE checks the row before and after: a row cannot be moved out of, or into,
-- the session its transaction was fenced for.
CREATE FUNCTION zg_session_row_guard() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    fenced text := current_setting('zapgate.session', true);
BEGIN
    IF (TG_OP <> 'INSERT' AND fenced IS DISTINCT FROM OLD.id::text)
       OR (TG_OP <> 'DELETE' AND fenced IS DISTINCT FROM NEW.id::text) THEN
        RAISE EXCEPTION 'a write to session % without its fence',
            CASE WHEN TG_OP = 'DELETE' THEN OLD.id ELSE NEW.id END
            USING ERRCODE = 'ZG002';
    END IF;
    IF TG_OP = 'DELETE' THEN RETURN OLD; END IF;
    RETURN NEW;
END $$;

CREATE TRIGGER session_guard BEFORE INSERT OR UPDATE OR DELETE ON session
    FOR EACH ROW EXECUTE FUNCTION zg_session_row_guard();

-- Every key table's rows are guarded by their `session` column, those a wipe deletes
-- by cascade too.
CREATE TRIGGER identity_guard BEFORE INSERT OR UPDATE OR DELETE ON identity
    FOR EACH ROW EXECUTE FUNCTION zg_session_guard();
CREATE TRIGGER signal_session_guard BEFORE INSERT OR UPDATE OR DELETE ON signal_session
    FOR EACH ROW EXECUTE FUNCTION zg_session_guard();
CREATE TRIGGER prekey_guard BEFORE INSERT OR UPDATE OR DELETE ON prekey
    FOR EACH ROW EXECUTE FUNCTION zg_session_guard();
CREATE TRIGGER signed_prekey_guard BEFORE INSERT OR UPDATE OR DELETE ON signed_prekey
    FOR EACH ROW EXECUTE FUNCTION zg_session_guard();
CREATE TRIGGER sender_key_guard BEFORE INSERT OR UPDATE OR DELETE ON sender_key
    FOR EACH ROW EXECUTE FUNCTION zg_session_guard();
CREATE TRIGGER sync_key_guard BEFORE INSERT OR UPDATE OR DELETE ON sync_key
    FOR EACH ROW EXECUTE FUNCTION zg_session_guard();
CREATE TRIGGER sync_version_guard BEFORE INSERT OR UPDATE OR DELETE ON sync_version
    FOR EACH ROW EXECUTE FUNCTION zg_session_guard();
CREATE TRIGGER mutation_mac_guard BEFORE INSERT OR UPDATE OR DELETE ON mutation_mac
    FOR EACH ROW EXECUTE FUNCTION zg_session_guard();
CREATE TRIGGER sender_key_device_guard BEFORE INSERT OR UPDATE OR DELETE ON sender_key_device
    FOR EACH ROW EXECUTE FUNCTION zg_session_guard();
CREATE TRIGGER lid_pn_guard BEFORE INSERT OR UPDATE OR DELETE ON lid_pn
    FOR EACH ROW EXECUTE FUNCTION zg_session_guard();
CREATE TRIGGER base_key_guard BEFORE INSERT OR UPDATE OR DELETE ON base_key
    FOR EACH ROW EXECUTE FUNCTION zg_session_guard();
CREATE TRIGGER device_list_guard BEFORE INSERT OR UPDATE OR DELETE ON device_list
    FOR EACH ROW EXECUTE FUNCTION zg_session_guard();
CREATE TRIGGER group_metadata_guard BEFORE INSERT OR UPDATE OR DELETE ON group_metadata
    FOR EACH ROW EXECUTE FUNCTION zg_session_guard();
CREATE TRIGGER tc_token_guard BEFORE INSERT OR UPDATE OR DELETE ON tc_token
    FOR EACH ROW EXECUTE FUNCTION zg_session_guard();
CREATE TRIGGER sent_message_guard BEFORE INSERT OR UPDATE OR DELETE ON sent_message
    FOR EACH ROW EXECUTE FUNCTION zg_session_guard();
CREATE TRIGGER pending_inbound_guard BEFORE INSERT OR UPDATE OR DELETE ON pending_inbound
    FOR EACH ROW EXECUTE FUNCTION zg_session_guard();
CREATE TRIGGER msg_secret_guard BEFORE INSERT OR UPDATE OR DELETE ON msg_secret
    FOR EACH ROW EXECUTE FUNCTION zg_session_guard();
