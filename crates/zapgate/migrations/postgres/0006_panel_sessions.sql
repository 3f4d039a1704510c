-- The admin panel's open sessions, shared by every node: signed in through one node,
-- an operator is signed in on all. A session is kept under a hash of its cookie and
-- the admin token it was opened with: a changed admin token closes every session, and
-- the database never holds a usable cookie.
CREATE TABLE panel_sessions (
    session_key TEXT COLLATE "C" PRIMARY KEY,
    csrf        TEXT NOT NULL,
    expires_at  BIGINT NOT NULL
);
CREATE INDEX panel_sessions_by_expiry ON panel_sessions (expires_at);
