-- One row per instance (one WhatsApp number). Times are unix milliseconds.
CREATE TABLE instances (
    id                        TEXT PRIMARY KEY NOT NULL,
    token                     TEXT NOT NULL,
    name                      TEXT NOT NULL,
    session_name              TEXT,
    connected_callback_url    TEXT,
    disconnected_callback_url TEXT,
    created_at                INTEGER NOT NULL,
    due_at                    INTEGER NOT NULL,
    -- The linked number; NULL while no WhatsApp session is stored.
    phone                     TEXT,
    linked_at                 INTEGER,
    -- The phone's platform as WhatsApp reported it at linking (android, smbi, ...).
    platform                  TEXT
);

-- Listing order: creation time, then insertion order (rowid) for the same millisecond.
CREATE INDEX instances_created ON instances (created_at);
