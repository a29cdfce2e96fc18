-- nxknock database, schema 2 (PRAGMA user_version = 2): users and their chains.
-- Portable SQL on purpose: the PostgreSQL store will share it. Door records are
-- in doors.sql (unchanged since schema 1, so an upgrade keeps them).

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
    -- Unix time of the last change, and the row's revision: every change raises it by
    -- at least one (max(now, updated + 1), and trigger users_revision for any other
    -- writer), so it may run ahead of the clock. A knock decided on a record kept in
    -- memory commits only while it is unchanged.
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
