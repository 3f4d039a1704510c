-- The WhatsApp sessions of every instance, in one database: what whatsapp-rust keeps for
-- a linked device (its keys, its Signal sessions with contacts, app-state sync), one
-- `session` row per instance and every other row keyed by it.

CREATE TABLE session (
    -- never reused, so a write from a client that outlived its session cannot land in
    -- a later one
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    -- the instance's id, or `set-aside/<id>/<unix ms>` for a session no instance claims
    instance TEXT NOT NULL UNIQUE,
    created_at INTEGER NOT NULL,
    -- the device (identity, noise and prekey keys, the account), as JSON, once saved
    device BLOB
);

CREATE TABLE identity (
    session INTEGER NOT NULL REFERENCES session (id) ON DELETE CASCADE,
    address TEXT NOT NULL,
    key BLOB NOT NULL,
    PRIMARY KEY (session, address)
) WITHOUT ROWID;

CREATE TABLE signal_session (
    session INTEGER NOT NULL REFERENCES session (id) ON DELETE CASCADE,
    address TEXT NOT NULL,
    record BLOB NOT NULL,
    PRIMARY KEY (session, address)
) WITHOUT ROWID;

CREATE TABLE prekey (
    session INTEGER NOT NULL REFERENCES session (id) ON DELETE CASCADE,
    id INTEGER NOT NULL,
    record BLOB NOT NULL,
    uploaded INTEGER NOT NULL,
    PRIMARY KEY (session, id)
) WITHOUT ROWID;

CREATE TABLE signed_prekey (
    session INTEGER NOT NULL REFERENCES session (id) ON DELETE CASCADE,
    id INTEGER NOT NULL,
    record BLOB NOT NULL,
    PRIMARY KEY (session, id)
) WITHOUT ROWID;

CREATE TABLE sender_key (
    session INTEGER NOT NULL REFERENCES session (id) ON DELETE CASCADE,
    address TEXT NOT NULL,
    record BLOB NOT NULL,
    PRIMARY KEY (session, address)
) WITHOUT ROWID;

CREATE TABLE sync_key (
    session INTEGER NOT NULL REFERENCES session (id) ON DELETE CASCADE,
    key_id BLOB NOT NULL,
    key BLOB NOT NULL,
    PRIMARY KEY (session, key_id)
) WITHOUT ROWID;

CREATE TABLE sync_version (
    session INTEGER NOT NULL REFERENCES session (id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    state BLOB NOT NULL,
    PRIMARY KEY (session, name)
) WITHOUT ROWID;

CREATE TABLE mutation_mac (
    session INTEGER NOT NULL REFERENCES session (id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    index_mac BLOB NOT NULL,
    version INTEGER NOT NULL,
    value_mac BLOB NOT NULL,
    PRIMARY KEY (session, name, index_mac)
) WITHOUT ROWID;

CREATE TABLE sender_key_device (
    session INTEGER NOT NULL REFERENCES session (id) ON DELETE CASCADE,
    group_jid TEXT NOT NULL,
    device_jid TEXT NOT NULL,
    has_key INTEGER NOT NULL,
    PRIMARY KEY (session, group_jid, device_jid)
) WITHOUT ROWID;
CREATE INDEX sender_key_device_by_device ON sender_key_device (session, device_jid);

CREATE TABLE lid_pn (
    session INTEGER NOT NULL REFERENCES session (id) ON DELETE CASCADE,
    lid TEXT NOT NULL,
    phone TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    source TEXT NOT NULL,
    PRIMARY KEY (session, lid)
) WITHOUT ROWID;
CREATE INDEX lid_pn_by_phone ON lid_pn (session, phone, updated_at);

CREATE TABLE base_key (
    session INTEGER NOT NULL REFERENCES session (id) ON DELETE CASCADE,
    address TEXT NOT NULL,
    message_id TEXT NOT NULL,
    base_key BLOB NOT NULL,
    PRIMARY KEY (session, address, message_id)
) WITHOUT ROWID;

CREATE TABLE device_list (
    session INTEGER NOT NULL REFERENCES session (id) ON DELETE CASCADE,
    user TEXT NOT NULL,
    -- the devices, as JSON
    devices TEXT NOT NULL,
    timestamp INTEGER NOT NULL,
    phash TEXT,
    raw_id INTEGER,
    PRIMARY KEY (session, user)
) WITHOUT ROWID;

CREATE TABLE group_metadata (
    session INTEGER NOT NULL REFERENCES session (id) ON DELETE CASCADE,
    group_jid TEXT NOT NULL,
    info BLOB NOT NULL,
    PRIMARY KEY (session, group_jid)
) WITHOUT ROWID;

CREATE TABLE tc_token (
    session INTEGER NOT NULL REFERENCES session (id) ON DELETE CASCADE,
    jid TEXT NOT NULL,
    token BLOB NOT NULL,
    token_timestamp INTEGER NOT NULL,
    sender_timestamp INTEGER,
    PRIMARY KEY (session, jid)
) WITHOUT ROWID;

CREATE TABLE sent_message (
    session INTEGER NOT NULL REFERENCES session (id) ON DELETE CASCADE,
    chat TEXT NOT NULL,
    message_id TEXT NOT NULL,
    payload BLOB NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (session, chat, message_id)
) WITHOUT ROWID;

CREATE TABLE pending_inbound (
    session INTEGER NOT NULL REFERENCES session (id) ON DELETE CASCADE,
    chat TEXT NOT NULL,
    sender TEXT NOT NULL,
    id TEXT NOT NULL,
    message BLOB NOT NULL,
    inserted_at INTEGER NOT NULL,
    PRIMARY KEY (session, chat, sender, id)
) WITHOUT ROWID;

CREATE TABLE msg_secret (
    session INTEGER NOT NULL REFERENCES session (id) ON DELETE CASCADE,
    chat TEXT NOT NULL,
    sender TEXT NOT NULL,
    msg_id TEXT NOT NULL,
    secret BLOB NOT NULL,
    -- 0: never
    expires_at INTEGER NOT NULL,
    message_ts INTEGER NOT NULL,
    PRIMARY KEY (session, chat, sender, msg_id)
) WITHOUT ROWID;
