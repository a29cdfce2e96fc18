-- nxknock on PostgreSQL, migration 2: door grants for agents. A new door record
-- for another host (`host` not empty, `[[service]] hosts`) is announced on a
-- channel of its own with the host's name, which only that host's agent acts on:
-- nameservers are not woken by each other's grants.
CREATE FUNCTION nxknock_grant() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('nxknock_grant', NEW.host);
    RETURN NULL;
END
$$;
CREATE TRIGGER doors_grant AFTER INSERT ON doors
    FOR EACH ROW WHEN (NEW.host <> '') EXECUTE FUNCTION nxknock_grant();
CREATE INDEX doors_host ON doors(host, expires_at);
