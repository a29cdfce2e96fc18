-- Doors nxknock opened: who, for which address and service, until when. Read by
-- `nxknock doors` and at start-up to adopt doors still open in the kernel.
CREATE TABLE doors (
    id         INTEGER PRIMARY KEY,
    user_name  TEXT NOT NULL,
    service    TEXT NOT NULL,
    addr       TEXT NOT NULL,
    prefix_len INTEGER NOT NULL,
    proto      TEXT NOT NULL,
    port       INTEGER NOT NULL,
    via        TEXT NOT NULL,
    single_use INTEGER NOT NULL,
    opened_at  INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    closed     INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX doors_expiry ON doors(expires_at);
