-- Every webhook Z-API has, stored now (the events of most come with messaging).
ALTER TABLE instances ADD COLUMN received_callback_url TEXT;
ALTER TABLE instances ADD COLUMN received_delivery_callback_url TEXT;
ALTER TABLE instances ADD COLUMN delivery_callback_url TEXT;
ALTER TABLE instances ADD COLUMN message_status_callback_url TEXT;
ALTER TABLE instances ADD COLUMN presence_chat_callback_url TEXT;
ALTER TABLE instances ADD COLUMN notify_sent_by_me INTEGER NOT NULL DEFAULT 0;
