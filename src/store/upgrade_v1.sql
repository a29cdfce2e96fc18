-- Schema 1 -> 2, run between the creation of schema.sql's tables (with the old
-- users table renamed users_v1) and the drop of users_v1. Schema 1 kept one chain
-- per user and accepted its elements in both forms, so an element seen inside a
-- bound knock could open as a plain one. Those chains cannot be split after the
-- fact: users keep their names, policies and door records but are revoked until
-- `nxknock user rekey` gives them two chains.
INSERT INTO users (id, name, chain_len, mac_key, services, src_nets, max_open, revoked, created, updated)
    SELECT id, name, chain_len, mac_key, services, src_nets, max_open, 1, created, updated FROM users_v1;
