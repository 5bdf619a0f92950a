-- Secrets inboxd itself must keep, e.g. a refresh token the authorization server rotated.
-- `origin` is a fingerprint of the configured value the secret replaced, so a newly
-- configured value wins over a stale rotated one. The database file is created mode 0600.
CREATE TABLE secrets (
    name       TEXT    NOT NULL PRIMARY KEY,
    value      TEXT    NOT NULL,
    origin     TEXT    NOT NULL DEFAULT '',
    updated_at INTEGER NOT NULL DEFAULT 0
) STRICT;
