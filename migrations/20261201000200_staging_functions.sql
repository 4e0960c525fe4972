-- The upload's commit as functions, so a small upload costs one round trip (issue 12: an
-- upload at most 4 database round trips; the commit used to be one per row, one per activity
-- row, the lock, the quota, BEGIN and COMMIT). Additive: the previous binary does not call
-- them; the rows they write are the rows it writes.

-- Takes the workspace lock (held until the transaction ends: the quota check cannot be raced
-- and activity `seq` order is commit order) and checks the quotas for `n` more files of
-- `bytes` more bytes. Returns NULL when admitted, else 'bytes' or 'files', with the totals.
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
      LEFT JOIN (SELECT sum(size_bytes) AS b, count(*) AS f FROM pending_uploads
                 WHERE workspace_id = ws AND acked_at IS NULL AND expires_at <= now()) x ON true;
    refused := CASE
        WHEN pending_bytes + bytes > max_bytes THEN 'bytes'
        WHEN pending_files + n > max_files THEN 'files'
    END;
END $$;

-- One activity row per staged file, in input order, then the notification the long polls
-- wait for (delivered at commit). The caller holds the workspace lock.
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
    PERFORM pg_notify('pending_uploads_activity', ws::text);
END $$;

-- A whole small upload in one statement: admit, the rows (bytes inline, or an object key),
-- the activity rows. Returns the refusal (nothing written) or NULL.
CREATE OR REPLACE FUNCTION pending_uploads_stage(
    ws uuid, lock_key bigint, max_bytes bigint, max_files bigint,
    file_ids uuid[], names text[], mimes text[], sizes bigint[], digests bytea[], keys text[],
    contents bytea[],
    OUT refused text, OUT pending_bytes bigint, OUT pending_files bigint)
LANGUAGE plpgsql AS $$
BEGIN
    SELECT a.refused, a.pending_bytes, a.pending_files INTO refused, pending_bytes, pending_files
      FROM pending_uploads_admit(ws, lock_key, cardinality(file_ids),
                                 (SELECT COALESCE(sum(s), 0) FROM unnest(sizes) s)::bigint,
                                 max_bytes, max_files) a;
    IF refused IS NOT NULL THEN
        RETURN;
    END IF;
    INSERT INTO pending_uploads (file_id, workspace_id, size_bytes, filename, mimetype, content_sha256, s3_key, content)
    SELECT f.id, ws, f.size, f.name, f.mime, f.digest, f.key, f.content
    FROM unnest(file_ids, sizes, names, mimes, digests, keys, contents)
         WITH ORDINALITY AS f(id, size, name, mime, digest, key, content, i)
    ORDER BY f.i;
    PERFORM pending_uploads_log(ws, file_ids, names, mimes, sizes);
END $$;
