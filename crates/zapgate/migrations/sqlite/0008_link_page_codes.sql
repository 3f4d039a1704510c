-- The pairing codes a link page was given over its life: past a few, it gives no more, and
-- a restart does not reset the count.
ALTER TABLE link_pages ADD COLUMN pair_codes INTEGER NOT NULL DEFAULT 0;
