-- A link page is spent once the number links: from then on it only says so, and cannot
-- be used to link another number to the instance.
ALTER TABLE link_pages ADD COLUMN used_at INTEGER;
