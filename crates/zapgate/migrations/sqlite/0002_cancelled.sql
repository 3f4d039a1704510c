-- Cancelling an instance is durable: the row is marked first, the instance's task unlinks
-- the number and deletes its session, then the row. A start finishes any cancel that a
-- crash interrupted. Marked rows are no longer listed or reachable.
ALTER TABLE instances ADD COLUMN cancelled_at INTEGER;
