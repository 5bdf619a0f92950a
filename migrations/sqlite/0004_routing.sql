-- Fan-out: the targets that acknowledged a message whose delivery to all its targets has not
-- completed (one failed and it awaits a retry, or it was dead-lettered). A retry, or the next
-- process after a crash, calls only the targets not listed here.
CREATE TABLE target_deliveries (
    key TEXT NOT NULL,
    target TEXT NOT NULL,
    at INTEGER NOT NULL,
    PRIMARY KEY (key, target)
) WITHOUT ROWID;
-- Where the routing sent a message: `rule "<name>" -> a, b`, `else -> a`, or `skipped by ...`.
ALTER TABLE deliveries ADD COLUMN route TEXT NOT NULL DEFAULT '';
