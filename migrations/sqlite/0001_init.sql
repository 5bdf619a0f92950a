-- Checkpoint per watched folder: every UID up to last_uid has been acknowledged.
CREATE TABLE checkpoints (
    account        TEXT    NOT NULL,
    folder         TEXT    NOT NULL,
    uidvalidity    INTEGER NOT NULL,
    last_uid       INTEGER NOT NULL,
    dedupe_through INTEGER NOT NULL DEFAULT 0,
    updated_at     INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (account, folder)
) STRICT;

-- The delivery log: one row per message that was delivered, skipped as a duplicate,
-- failed (and will be retried) or dead-lettered.
CREATE TABLE deliveries (
    key         TEXT    NOT NULL PRIMARY KEY,
    account     TEXT    NOT NULL,
    folder      TEXT    NOT NULL,
    uidvalidity INTEGER NOT NULL,
    uid         INTEGER NOT NULL,
    message_id  TEXT    NOT NULL DEFAULT '',
    status      TEXT    NOT NULL,
    attempts    INTEGER NOT NULL DEFAULT 0,
    last_error  TEXT    NOT NULL DEFAULT '',
    first_at    INTEGER NOT NULL DEFAULT 0,
    updated_at  INTEGER NOT NULL DEFAULT 0
) STRICT;

CREATE INDEX deliveries_by_message_id ON deliveries (account, folder, message_id);
CREATE INDEX deliveries_by_status ON deliveries (status, account, folder);
