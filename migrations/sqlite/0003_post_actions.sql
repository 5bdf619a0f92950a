-- The post-action (flag, move, delete) of a delivered message, when it did not succeed:
-- 'pending' (a transient refusal or a lost session: retried at the next wake and the next
-- start) or 'failed: <server text>' (a permanent refusal such as [TRYCREATE]: shown by
-- `inboxd status`, not retried). Empty once done, or when there is none.
ALTER TABLE deliveries ADD COLUMN post_action TEXT NOT NULL DEFAULT '';
CREATE INDEX deliveries_by_post_action ON deliveries (post_action, account, folder) WHERE post_action <> '';
