-- Several instances on one database: each announces itself and renews its row while it runs.
CREATE TABLE instances (
    id         TEXT        NOT NULL PRIMARY KEY,
    name       TEXT        NOT NULL,
    started_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    expires_at TIMESTAMPTZ NOT NULL
);

-- Who owns each watch: at most one instance, until `expires_at` (the database's clock). Every
-- takeover raises `epoch`; every write of a watch's state checks (owner, epoch, expiry) in its
-- own transaction, so a holder that lost its lease cannot write past the new owner's.
CREATE TABLE leases (
    account     TEXT        NOT NULL,
    folder      TEXT        NOT NULL,
    owner       TEXT,
    epoch       BIGINT      NOT NULL DEFAULT 0,
    acquired_at TIMESTAMPTZ,
    expires_at  TIMESTAMPTZ NOT NULL DEFAULT '-infinity',
    PRIMARY KEY (account, folder)
);
CREATE INDEX leases_by_owner ON leases (owner);
