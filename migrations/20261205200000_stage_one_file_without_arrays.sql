-- An upload of one file is staged by `pending_uploads_stage_one`, whose file is a plain
-- `bytea` argument, not the one element of a `bytea[]` (issue 12).
--
-- A `bytea[]` argument costs PostgreSQL two more copies of the bytes than a `bytea` one: the
-- array is built from the element it received, and PL/pgSQL turns every array argument into
-- an expanded array (a copy) on entry. For a 1 MiB file that is about 0.5 ms of the
-- database's CPU per upload: psycopg, 150 calls per run, four alternating runs, a function
-- that inserts the row from a `bytea` argument 2.54-2.85 ms per call, the same from a
-- one-element `bytea[]` 3.15-3.22 ms.
--
-- What both staging functions do after their INSERT (admission under the workspace lock,
-- the totals, the activity rows) is now `pending_uploads_admit_staged`, which
-- `pending_uploads_stage` calls too: same signature and results as before, for the previous
-- binary during a rolling deploy.

CREATE OR REPLACE FUNCTION pending_uploads_admit_staged(
    ws uuid, lock_key bigint, max_bytes bigint, max_files bigint,
    file_ids uuid[], names text[], mimes text[], sizes bigint[],
    OUT refused text, OUT pending_bytes bigint, OUT pending_files bigint)
LANGUAGE plpgsql AS $$
DECLARE
    bytes bigint := (SELECT COALESCE(sum(s), 0) FROM unnest(sizes) s);
BEGIN
    -- From here on under the workspace lock. The admission's expired-rows part sees the new
    -- rows too, but never counts them: they expire in the future.
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

CREATE OR REPLACE FUNCTION pending_uploads_stage(
    ws uuid, lock_key bigint, max_bytes bigint, max_files bigint,
    file_ids uuid[], names text[], mimes text[], sizes bigint[], digests bytea[], keys text[],
    contents bytea[],
    OUT refused text, OUT pending_bytes bigint, OUT pending_files bigint)
LANGUAGE plpgsql AS $$
BEGIN
    -- The caller (pending_uploads_admit_staged) counts the rows under the lock.
    PERFORM set_config('pending_uploads.totals_now', 'caller', true);
    INSERT INTO pending_uploads (file_id, workspace_id, size_bytes, filename, mimetype, content_sha256, s3_key, content)
    SELECT f.id, ws, f.size, f.name, f.mime, f.digest, f.key, f.content
    FROM unnest(file_ids, sizes, names, mimes, digests, keys, contents)
         WITH ORDINALITY AS f(id, size, name, mime, digest, key, content, i)
    ORDER BY f.i;
    SELECT a.refused, a.pending_bytes, a.pending_files INTO refused, pending_bytes, pending_files
      FROM pending_uploads_admit_staged(ws, lock_key, max_bytes, max_files, file_ids, names, mimes, sizes) a;
END $$;

CREATE OR REPLACE FUNCTION pending_uploads_stage_one(
    ws uuid, lock_key bigint, max_bytes bigint, max_files bigint,
    f_id uuid, f_name text, f_mime text, f_size bigint, f_digest bytea, f_key text, f_content bytea,
    OUT refused text, OUT pending_bytes bigint, OUT pending_files bigint)
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM set_config('pending_uploads.totals_now', 'caller', true);
    INSERT INTO pending_uploads (file_id, workspace_id, size_bytes, filename, mimetype, content_sha256, s3_key, content)
    VALUES (f_id, ws, f_size, f_name, f_mime, f_digest, f_key, f_content);
    SELECT a.refused, a.pending_bytes, a.pending_files INTO refused, pending_bytes, pending_files
      FROM pending_uploads_admit_staged(ws, lock_key, max_bytes, max_files,
                                        ARRAY[f_id], ARRAY[f_name], ARRAY[f_mime], ARRAY[f_size]) a;
END $$;
