-- A small upload writes its rows before it takes the workspace lock (issue 12): uploads to one
-- workspace serialize on that lock until they commit, so what runs under it bounds one
-- workspace's upload rate. The row INSERT (its five index entries, its statement trigger) was
-- the longest step under the lock; pg_stat_statements put it at 0.18 ms of about 0.35 ms.
--
-- The rows are invisible to everyone else until commit, so nothing reads them early. What must
-- stay under the lock stays there: the quota check against the committed totals, the totals
-- update itself (so the next admission reads it), and the activity rows (per workspace, `seq`
-- order is commit order).
--
-- `pending_uploads.totals_now = 'caller'` (transaction-local) tells the statement triggers
-- that the caller counts the rows itself, under the lock: the insert trigger parks no delta,
-- and the delete of a refused upload's rows subtracts nothing. Writers that do not set it
-- (the large path, whose COPY runs before the lock; the previous binary; the platform) park
-- deltas as before. Nothing sets the former 'on' value any more.
--
-- Same signature and results: the previous binary calls this `pending_uploads_stage` too.

CREATE OR REPLACE FUNCTION pending_totals_insert() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('pending_uploads.totals_now', true) = 'caller' THEN
        RETURN NULL;
    END IF;
    INSERT INTO pending_upload_total_deltas (workspace_id, delta, files)
    SELECT workspace_id, sum(size_bytes), count(*) FROM added WHERE acked_at IS NULL
    GROUP BY workspace_id ORDER BY workspace_id;
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION pending_totals_delete() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('pending_uploads.totals_now', true) = 'caller' THEN
        RETURN NULL;
    END IF;
    INSERT INTO pending_upload_totals AS t (workspace_id, unacked_bytes, unacked_files)
    SELECT workspace_id, -sum(size_bytes), -count(*) FROM gone WHERE acked_at IS NULL
    GROUP BY workspace_id ORDER BY workspace_id
    ON CONFLICT (workspace_id) DO UPDATE
        SET unacked_bytes = t.unacked_bytes + EXCLUDED.unacked_bytes,
            unacked_files = t.unacked_files + EXCLUDED.unacked_files;
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION pending_uploads_stage(
    ws uuid, lock_key bigint, max_bytes bigint, max_files bigint,
    file_ids uuid[], names text[], mimes text[], sizes bigint[], digests bytea[], keys text[],
    contents bytea[],
    OUT refused text, OUT pending_bytes bigint, OUT pending_files bigint)
LANGUAGE plpgsql AS $$
DECLARE
    bytes bigint := (SELECT COALESCE(sum(s), 0) FROM unnest(sizes) s);
BEGIN
    PERFORM set_config('pending_uploads.totals_now', 'caller', true);
    INSERT INTO pending_uploads (file_id, workspace_id, size_bytes, filename, mimetype, content_sha256, s3_key, content)
    SELECT f.id, ws, f.size, f.name, f.mime, f.digest, f.key, f.content
    FROM unnest(file_ids, sizes, names, mimes, digests, keys, contents)
         WITH ORDINALITY AS f(id, size, name, mime, digest, key, content, i)
    ORDER BY f.i;
    -- From here on under the workspace lock. The admission's expired-rows part sees these rows
    -- too, but never counts them: they expire in the future.
    SELECT a.refused, a.pending_bytes, a.pending_files INTO refused, pending_bytes, pending_files
      FROM pending_uploads_admit(ws, lock_key, cardinality(file_ids), bytes, max_bytes, max_files) a;
    IF refused IS NOT NULL THEN
        DELETE FROM pending_uploads WHERE file_id = ANY (file_ids);
    ELSE
        INSERT INTO pending_upload_totals AS t (workspace_id, unacked_bytes, unacked_files)
        VALUES (ws, bytes, cardinality(file_ids))
        ON CONFLICT (workspace_id) DO UPDATE
            SET unacked_bytes = t.unacked_bytes + EXCLUDED.unacked_bytes,
                unacked_files = t.unacked_files + EXCLUDED.unacked_files;
        PERFORM pending_uploads_log(ws, file_ids, names, mimes, sizes);
    END IF;
    PERFORM set_config('pending_uploads.totals_now', '', true);
END $$;
