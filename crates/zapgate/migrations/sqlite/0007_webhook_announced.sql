-- What the connection webhooks last said for each instance (1 connected, 0 disconnected,
-- NULL nothing yet), written with the event itself, whether or not a URL was set, so
-- a restart neither repeats nor skips a transition.
ALTER TABLE instances ADD COLUMN webhook_connected INTEGER;
