-- An upload's transaction no longer sends the long-poll notification itself when its session
-- says the service announces it after the commit (issue 12).
--
-- PostgreSQL (async.c, `PreCommit_Notify`) takes one database-wide lock in every transaction
-- that has called NOTIFY and holds it until the commit is done, WAL flush included: every
-- upload's commit waited for the previous upload's, in any workspace. pgbench, 8 clients,
-- one 1 KiB insert per transaction: durable cluster (fsync, synchronous_commit on) 5,826 tps
-- without NOTIFY, 2,596 with it in the transaction; the test cluster (fsync off) 8,234 vs
-- 4,109 and 6,753 vs 5,640.
--
-- The service now connects with `pending_uploads.notify = after_commit` and sends the
-- notifications of the workspaces that committed uploads in batches, each its own
-- transaction of NOTIFYs only (no WAL to wait for: it commits asynchronously), off the
-- upload's path. Sessions without that setting (an older binary during a rolling deploy,
-- hand-written SQL) still notify from the transaction, as before.

CREATE OR REPLACE FUNCTION pending_uploads_log(
    ws uuid, file_ids uuid[], names text[], mimes text[], sizes bigint[])
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO activity_logs (workspace_id, activity_type, target_id, method, summary, request_body, status)
    SELECT ws, 'a2a_receive', ws, 'chat_upload_receive', 'chat_upload_receive: ' || f.name,
           jsonb_build_object('file_id', f.id, 'name', f.name, 'mimeType', f.mime, 'size', f.size,
                              'uri', 'platform-pending:' || ws || '/' || f.id),
           'ok'
    FROM unnest(file_ids, names, mimes, sizes) WITH ORDINALITY AS f(id, name, mime, size, i)
    ORDER BY f.i;
    IF current_setting('pending_uploads.notify', true) IS DISTINCT FROM 'after_commit' THEN
        PERFORM pg_notify('pending_uploads_activity', ws::text);
    END IF;
END $$;
