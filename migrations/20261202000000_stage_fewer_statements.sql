-- Fewer statements inside the server per small upload (issue 12): much of PostgreSQL's CPU per
-- upload went on setting up the statements nested in `pending_uploads_stage`, not running
-- them. Three of them (park a delta, fold it in at commit, delete it) become one upsert.
--
-- The insert trigger counts the rows into their total at once when the inserting transaction
-- says it holds the workspace lock (`pending_uploads.totals_now`, set transaction-locally).
-- Deferral exists so that a large upload's COPY, which runs before the lock, does not hold the
-- total row for the whole copy; `pending_uploads_stage` inserts after its admission has taken
-- the lock, and sets the flag. Writers that do not set it (the large path, the previous
-- binary, the platform) are unchanged.
--
-- Same signatures and results: the previous binary calls the new `pending_uploads_stage` too.
-- (Also tried: admission and activity rows written inline instead of calling
-- `pending_uploads_admit` and `pending_uploads_log`: no faster in pgbench, and a second copy.)

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
BEGIN
    SELECT a.refused, a.pending_bytes, a.pending_files INTO refused, pending_bytes, pending_files
      FROM pending_uploads_admit(ws, lock_key, cardinality(file_ids),
                                 (SELECT COALESCE(sum(s), 0) FROM unnest(sizes) s)::bigint,
                                 max_bytes, max_files) a;
    IF refused IS NOT NULL THEN
        RETURN;
    END IF;
    -- Under the workspace lock now: count the rows at once (pending_totals_insert).
    PERFORM set_config('pending_uploads.totals_now', 'on', true);
    INSERT INTO pending_uploads (file_id, workspace_id, size_bytes, filename, mimetype, content_sha256, s3_key, content)
    SELECT f.id, ws, f.size, f.name, f.mime, f.digest, f.key, f.content
    FROM unnest(file_ids, sizes, names, mimes, digests, keys, contents)
         WITH ORDINALITY AS f(id, size, name, mime, digest, key, content, i)
    ORDER BY f.i;
    PERFORM pending_uploads_log(ws, file_ids, names, mimes, sizes);
END $$;
