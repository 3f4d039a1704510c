-- The admin panel's open sessions, so a sign-in outlives a restart. A session is kept
-- under a hash of its cookie and the admin token it was opened with: a changed admin
-- token closes every session, and the database never holds a usable cookie.
CREATE TABLE panel_sessions (
    session_key TEXT PRIMARY KEY,
    csrf        TEXT NOT NULL,
    expires_at  INTEGER NOT NULL
);
CREATE INDEX panel_sessions_by_expiry ON panel_sessions (expires_at);
