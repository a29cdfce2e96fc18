-- Schema 1 -> 2. Schema 1 kept one chain per user and accepted its elements in
-- both forms, so an element seen inside a bound knock could open as a plain one.
-- Those chains cannot be split after the fact: users keep their names, policies
-- and door records but are revoked until `nxknock user rekey` gives them two chains.
CREATE TABLE users_v2 (
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
INSERT INTO users_v2 (id, name, chain_len, mac_key, services, src_nets, max_open, revoked, created, updated)
    SELECT id, name, chain_len, mac_key, services, src_nets, max_open, 1, created, updated FROM users;
DROP TABLE users;
ALTER TABLE users_v2 RENAME TO users;
CREATE TABLE chains (
    user_id  INTEGER NOT NULL REFERENCES users(id),
    form     INTEGER NOT NULL CHECK (form IN (0, 1)),
    verifier BLOB NOT NULL UNIQUE,
    counter  INTEGER NOT NULL,
    updated  INTEGER NOT NULL,
    PRIMARY KEY (user_id, form)
);
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value BLOB NOT NULL
);
