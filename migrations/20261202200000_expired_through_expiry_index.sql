-- The quota check subtracts a workspace's expired-but-unswept rows, normally none: one probe
-- of pending_uploads_workspace_expiry_unacked_idx (workspace_id, expires_at). Until the table
-- has statistics (a new deployment, any young table) the planner costs that index and
-- idx_pending_uploads_workspace_unacked (workspace_id, created_at) the same, and took the
-- latter: it then reads every unacked row of the workspace and filters on expires_at, twice
-- per upload (the caller query and this function). Measured: 6,424 rows and 1.5 ms for one
-- call, so a 1 KiB upload got slower with each file its workspace held.
--
-- ORDER BY expires_at (in a subquery; the sums do not care) is an order only the expiry
-- index yields, so it wins without statistics too. Same signature and results: the previous
-- binary calls this function as well. `db::uploads::pending_totals` and the caller query in
-- `db::workspaces` read the same rows the same way.
CREATE OR REPLACE FUNCTION pending_uploads_admit(
    ws uuid, lock_key bigint, n bigint, bytes bigint, max_bytes bigint, max_files bigint,
    OUT refused text, OUT pending_bytes bigint, OUT pending_files bigint)
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(lock_key);
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
