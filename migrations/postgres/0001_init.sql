-- The PostgreSQL store: the same tables as the SQLite store's migrations 0001-0005, in one
-- step (PostgreSQL's store starts here). Integers that hold UIDs are BIGINT: a UID is an
-- unsigned 32-bit number.

-- Checkpoint per watched folder: every UID up to last_uid has been acknowledged.
CREATE TABLE checkpoints (
    account        TEXT   NOT NULL,
    folder         TEXT   NOT NULL,
    uidvalidity    BIGINT NOT NULL,
    last_uid       BIGINT NOT NULL,
    dedupe_through BIGINT NOT NULL DEFAULT 0,
    updated_at     BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (account, folder)
);

-- The delivery log: one row per message that was delivered, skipped, failed (to be retried),
-- dead-lettered or found vanished. `post_action`: '' (done or none), 'pending',
-- 'pending <after>' or 'failed: <reason>'. `route`: where the routing sent it.
-- `acknowledged`: an operator set this dead letter aside.
CREATE TABLE deliveries (
    key          TEXT    NOT NULL PRIMARY KEY,
    account      TEXT    NOT NULL,
    folder       TEXT    NOT NULL,
    uidvalidity  BIGINT  NOT NULL,
    uid          BIGINT  NOT NULL,
    message_id   TEXT    NOT NULL DEFAULT '',
    status       TEXT    NOT NULL,
    attempts     BIGINT  NOT NULL DEFAULT 0,
    last_error   TEXT    NOT NULL DEFAULT '',
    first_at     BIGINT  NOT NULL DEFAULT 0,
    updated_at   BIGINT  NOT NULL DEFAULT 0,
    post_action  TEXT    NOT NULL DEFAULT '',
    route        TEXT    NOT NULL DEFAULT '',
    acknowledged BOOLEAN NOT NULL DEFAULT FALSE
);

CREATE INDEX deliveries_by_message_id ON deliveries (account, folder, message_id);
CREATE INDEX deliveries_by_status ON deliveries (status, account, folder);
CREATE INDEX deliveries_by_post_action ON deliveries (post_action, account, folder) WHERE post_action <> '';

-- Secrets inboxd itself must keep (a refresh token the authorization server rotated), with a
-- fingerprint of the configured value it replaced.
CREATE TABLE secrets (
    name       TEXT   NOT NULL PRIMARY KEY,
    value      TEXT   NOT NULL,
    origin     TEXT   NOT NULL DEFAULT '',
    updated_at BIGINT NOT NULL DEFAULT 0
);

-- Fan-out: the targets that acknowledged a message whose delivery to all its targets has not
-- completed.
CREATE TABLE target_deliveries (
    key    TEXT   NOT NULL,
    target TEXT   NOT NULL,
    at     BIGINT NOT NULL,
    PRIMARY KEY (key, target)
);
