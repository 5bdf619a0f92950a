-- The idempotency key the targets got where it is not `key`: Gmail's message identity
-- (`gm1-...`), the same for one message under several labels. `inboxd status`/`replay` find a
-- message by either key; a replay gives the targets this one again.
ALTER TABLE deliveries ADD COLUMN target_key TEXT NOT NULL DEFAULT '';
CREATE INDEX deliveries_by_target_key ON deliveries (target_key);
