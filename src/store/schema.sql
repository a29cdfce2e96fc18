-- nxknock database, schema 2 (PRAGMA user_version = 2).
-- Portable SQL on purpose: the PostgreSQL store will share it.

-- One row per enrolled user. The server holds no seed: only each chain's verifier.
CREATE TABLE users (
    id        INTEGER PRIMARY KEY,
    name      TEXT NOT NULL UNIQUE,
    chain_len INTEGER NOT NULL,
    mac_key   BLOB NOT NULL,
    services  TEXT NOT NULL,
    src_nets  TEXT NOT NULL,
    max_open  INTEGER,
    revoked   INTEGER NOT NULL DEFAULT 0,
    created   INTEGER NOT NULL,
    updated   INTEGER NOT NULL
);

-- Two chains per user, one per knock form (0 = plain, 1 = bound): an element of
-- one never opens as the other (ARCHITECTURE.md, "Two chains per user").
CREATE TABLE chains (
    user_id  INTEGER NOT NULL REFERENCES users(id),
    form     INTEGER NOT NULL CHECK (form IN (0, 1)),
    verifier BLOB NOT NULL UNIQUE,
    counter  INTEGER NOT NULL,
    updated  INTEGER NOT NULL,
    PRIMARY KEY (user_id, form)
);

-- Zone-wide values: `zone_key`, the admission key every credential holds.
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value BLOB NOT NULL
);

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
