-- An upload's claim (its workspace not removed, its token not revoked) is checked in the
-- statement that commits it, but as of that statement's start. One that then waited for the
-- workspace lock (up to `pending_uploads.lock_wait`, half of DEPENDENCY_TIMEOUT) while its
-- token was revoked or its workspace removed was still staged, after the revocation had
-- committed (a review). The service now names the caller in `pending_uploads.caller` (the hex
-- of its token's hash, or `admin`), and an admission that had to wait for the lock checks it
-- again once the lock is held, in statements of their own (a fresh snapshot): refused
-- `caller`, the answer the service already gives a claim lost before the statement. The
-- token is held (`FOR SHARE`) so that a revocation after this check waits for the commit. An
-- admission that took the lock at once is not checked again: no one it waited for committed.
-- A connection without the setting (the previous binary's) is admitted as before.
CREATE OR REPLACE FUNCTION pending_uploads_admit(
    ws uuid, lock_key bigint, n bigint, bytes bigint, max_bytes bigint, max_files bigint,
    OUT refused text, OUT pending_bytes bigint, OUT pending_files bigint)
LANGUAGE plpgsql AS $$
DECLARE
    key bigint := pending_uploads_lock_key(ws);
    wait text;
    session_lock_timeout text;
    caller text;
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
        caller := current_setting('pending_uploads.caller', true);
        IF caller <> '' THEN
            PERFORM 1 FROM workspaces w WHERE w.id = ws AND w.status IS DISTINCT FROM 'removed';
            IF NOT FOUND THEN
                refused := 'caller'; pending_bytes := 0; pending_files := 0;
                RETURN;
            END IF;
            IF caller <> 'admin' THEN
                PERFORM 1 FROM workspace_auth_tokens t
                 WHERE t.workspace_id = ws AND t.token_hash = decode(caller, 'hex')
                   AND t.revoked_at IS NULL
                   FOR SHARE;
                IF NOT FOUND THEN
                    refused := 'caller'; pending_bytes := 0; pending_files := 0;
                    RETURN;
                END IF;
            END IF;
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
