-- Accounts managed at run time (`inboxd account add|remove`, the HTTP API), besides those in
-- the config file. `sealed` is the account's config text (its `[accounts.NAME]` table, its
-- targets and watches) encrypted with the instances' `accounts_key` (AES-256-GCM, the name as
-- associated data): passwords and client secrets are never stored in clear. Host, user and
-- folders are kept beside it, in clear, for listing. Every change notifies the channel
-- `inboxd_accounts` in its own transaction; running instances reload on it.
CREATE TABLE accounts (
    name       TEXT        NOT NULL PRIMARY KEY,
    sealed     BYTEA       NOT NULL,
    host       TEXT        NOT NULL,
    user_name  TEXT        NOT NULL,
    folders    TEXT[]      NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_by TEXT        NOT NULL
);
