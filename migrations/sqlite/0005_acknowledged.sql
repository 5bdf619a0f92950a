-- An operator has seen this dead letter and set it aside (`inboxd ack KEY`, or the status
-- page): it no longer makes /readyz fail under `unready_on_dead_letters`. Replaying it clears
-- the mark along with the status.
ALTER TABLE deliveries ADD COLUMN acknowledged INTEGER NOT NULL DEFAULT 0;
