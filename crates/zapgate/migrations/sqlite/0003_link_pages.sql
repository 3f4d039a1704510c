-- Link pages: a URL with its own single-purpose, expiring token that shows one instance's
-- linking experience to the number's owner. Only the token's SHA-256 is kept.
CREATE TABLE link_pages (
    token_hash TEXT PRIMARY KEY NOT NULL,
    instance_id TEXT NOT NULL REFERENCES instances(id) ON DELETE CASCADE,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    revoked_at INTEGER
);
CREATE INDEX link_pages_by_instance ON link_pages(instance_id);
