-- Fewer statements inside the server per small upload (issue 12): PostgreSQL's CPU per upload
-- was mostly setting up the dozen statements nested in `pending_uploads_stage`, not running
-- them. Two changes, both invisible to every other writer:
--
-- 1. The insert trigger counts the rows into their total at once when the inserting
--    transaction says it holds the workspace lock (`pending_uploads.totals_now`, set
--    transaction-locally), instead of parking a delta for a deferred trigger to fold in at
--    commit and then delete: one upsert for three statements and a dead row. Deferral exists
--    so that a large upload's COPY, which runs before the lock, does not hold the total row
--    for the whole copy; a small upload inserts under the lock and holds it anyway. Writers
--    that do not set it (the large path, the previous binary, the platform) are unchanged.
-- 2. `pending_uploads_stage` does its admission and activity rows inline instead of calling
--    `pending_uploads_admit` and `pending_uploads_log` (kept, for the large path): a nested
--    call is a statement of its own.
--
-- Same signatures and results: the previous binary calls the new `pending_uploads_stage` too.

CREATE OR REPLACE FUNCTION pending_totals_insert() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('pending_uploads.totals_now', true) = 'on' THEN
        INSERT INTO pending_upload_totals AS t (workspace_id, unacked_bytes, unacked_files)
        SELECT workspace_id, sum(size_bytes), count(*) FROM added WHERE acked_at IS NULL
        GROUP BY workspace_id ORDER BY workspace_id
        ON CONFLICT (workspace_id) DO UPDATE
            SET unacked_bytes = t.unacked_bytes + EXCLUDED.unacked_bytes,
                unacked_files = t.unacked_files + EXCLUDED.unacked_files;
    ELSE
        INSERT INTO pending_upload_total_deltas (workspace_id, delta, files)
        SELECT workspace_id, sum(size_bytes), count(*) FROM added WHERE acked_at IS NULL
        GROUP BY workspace_id ORDER BY workspace_id;
    END IF;
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION pending_uploads_stage(
    ws uuid, lock_key bigint, max_bytes bigint, max_files bigint,
    file_ids uuid[], names text[], mimes text[], sizes bigint[], digests bytea[], keys text[],
    contents bytea[],
    OUT refused text, OUT pending_bytes bigint, OUT pending_files bigint)
LANGUAGE plpgsql AS $$
DECLARE
    n bigint := cardinality(file_ids);
    bytes bigint := (SELECT COALESCE(sum(s), 0) FROM unnest(sizes) s);
BEGIN
    -- As pending_uploads_admit: the workspace lock (until the transaction ends), then the
    -- trigger-kept totals less what has expired but is not swept yet. Two statements: the
    -- read must take its snapshot after the lock is granted, or it would miss an upload that
    -- committed while this one waited.
    PERFORM pg_advisory_xact_lock(lock_key);
    SELECT GREATEST(0, COALESCE(t.unacked_bytes, 0) - COALESCE(x.b, 0))::bigint,
           GREATEST(0, COALESCE(t.unacked_files, 0) - COALESCE(x.f, 0))::bigint
      INTO pending_bytes, pending_files
      FROM (SELECT 1) one
      LEFT JOIN pending_upload_totals t ON t.workspace_id = ws
      LEFT JOIN (SELECT sum(size_bytes) AS b, count(*) AS f FROM pending_uploads
                 WHERE workspace_id = ws AND acked_at IS NULL AND expires_at <= now()) x ON true;
    refused := CASE
        WHEN pending_bytes + bytes > max_bytes THEN 'bytes'
        WHEN pending_files + n > max_files THEN 'files'
    END;
    IF refused IS NOT NULL THEN
        RETURN;
    END IF;
    PERFORM set_config('pending_uploads.totals_now', 'on', true);
    INSERT INTO pending_uploads (file_id, workspace_id, size_bytes, filename, mimetype, content_sha256, s3_key, content)
    SELECT f.id, ws, f.size, f.name, f.mime, f.digest, f.key, f.content
    FROM unnest(file_ids, sizes, names, mimes, digests, keys, contents)
         WITH ORDINALITY AS f(id, size, name, mime, digest, key, content, i)
    ORDER BY f.i;
    -- As pending_uploads_log: one activity row per file in input order, then the
    -- notification the long polls wait for (delivered at commit).
    INSERT INTO activity_logs (workspace_id, activity_type, target_id, method, summary, request_body, status)
    SELECT ws, 'a2a_receive', ws, 'chat_upload_receive', 'chat_upload_receive: ' || f.name,
           jsonb_build_object('file_id', f.id, 'name', f.name, 'mimeType', f.mime, 'size', f.size,
                              'uri', 'platform-pending:' || ws || '/' || f.id),
           'ok'
    FROM unnest(file_ids, names, mimes, sizes) WITH ORDINALITY AS f(id, name, mime, size, i)
    ORDER BY f.i;
    PERFORM pg_notify('pending_uploads_activity', ws::text);
END $$;
