-- The workspace lock's key was the XOR of the id's two halves, computed by the caller. A
-- workspace id is its registrant's choice (SPEC §4, first registration), and any number of
-- ids fold to one key: anyone who knew another workspace's id could register twins of it and
-- queue its uploads behind their own commits, into 503s past DEPENDENCY_TIMEOUT.
--
-- The key is now the first 8 bytes of the id's SHA-256, computed here from `ws`: picking an
-- id that shares another's key means a second preimage of 64 bits. `lock_key` stays in the
-- signature and is ignored, so the previous binary, which still passes its XOR key, takes the
-- same lock as this one during a rolling restart.
--
-- The wait for the lock is bounded by the connection's `pending_uploads.lock_wait` (the
-- service sets half its DEPENDENCY_TIMEOUT): past it the statement fails and its transaction
-- writes nothing. Before, only the caller's own deadline ended the wait, by giving up on the
-- connection; PostgreSQL went on waiting, and a small upload's single statement then
-- committed after its client had been answered 503. The bound covers this wait only: the
-- session's own `lock_timeout` is put back once the lock is held, so the rest of the
-- transaction (the totals row, which acks and sweeps also lock, and the deferred fold at
-- COMMIT) waits as before rather than throwing away a large upload at COMMIT. A connection
-- without the setting (the previous binary's) waits as before.
CREATE OR REPLACE FUNCTION pending_uploads_lock_key(ws uuid) RETURNS bigint
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    SELECT ('x' || encode(substring(sha256(uuid_send(ws)) FROM 1 FOR 8), 'hex'))::bit(64)::bigint
$$;

CREATE OR REPLACE FUNCTION pending_uploads_admit(
    ws uuid, lock_key bigint, n bigint, bytes bigint, max_bytes bigint, max_files bigint,
    OUT refused text, OUT pending_bytes bigint, OUT pending_files bigint)
LANGUAGE plpgsql AS $$
DECLARE
    key bigint := pending_uploads_lock_key(ws);
    wait text;
    session_lock_timeout text;
BEGIN
    -- Uncontended, the lock is taken at once and lock_timeout is not touched. The settings
    -- are assignments rather than PERFORMs: plpgsql evaluates those without an executor of
    -- their own, and uploads to one workspace pay this in turn, under the lock.
    IF NOT pg_try_advisory_xact_lock(key) THEN
        wait := current_setting('pending_uploads.lock_wait', true);
        IF wait <> '' THEN
            session_lock_timeout := current_setting('lock_timeout');
            wait := set_config('lock_timeout', wait, true);
            PERFORM pg_advisory_xact_lock(key);
            wait := set_config('lock_timeout', session_lock_timeout, true);
        ELSE
            PERFORM pg_advisory_xact_lock(key);
        END IF;
    END IF;
    -- The trigger-kept totals (committed rows), less what has expired but is not swept yet.
    SELECT GREATEST(0, COALESCE(t.unacked_bytes, 0) - COALESCE(x.b, 0))::bigint,
           GREATEST(0, COALESCE(t.unacked_files, 0) - COALESCE(x.f, 0))::bigint
      INTO pending_bytes, pending_files
      FROM (SELECT 1) one
      LEFT JOIN pending_upload_totals t ON t.workspace_id = ws
      LEFT JOIN (SELECT sum(size_bytes) AS b, count(*) AS f FROM (
                     SELECT size_bytes FROM pending_uploads
                     WHERE workspace_id = ws AND acked_at IS NULL AND expires_at <= now()
                     ORDER BY expires_at) expired) x ON true;
    refused := CASE
        WHEN pending_bytes + bytes > max_bytes THEN 'bytes'
        WHEN pending_files + n > max_files THEN 'files'
    END;
END $$;
