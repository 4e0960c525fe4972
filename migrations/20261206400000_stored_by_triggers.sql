-- What MAX_STORED_BYTES counts (every upload row's bytes, the rows themselves, and this
-- service's `chat_upload_receive` activity rows), kept by triggers, so a replica's reading is
-- a sum over a few rows instead of aggregates over both tables. Those aggregates grow with the
-- tables (86 ms at 520,000 upload rows); every replica ran them every 15 s and after every
-- sweep pass, and past DEPENDENCY_TIMEOUT every reading failed.
--
-- Every writer counts (this binary, the previous one during a rolling deploy, the platform,
-- an operator's statement): each change appends a delta row, and a reading sums them. Nothing
-- is locked but the new row, so writers never wait on one another here; past 1,000 deltas a
-- reading folds those it sees into one row (`pending_uploads_stored`), one replica at a time.
--
-- No key and no index: nothing looks a delta up, and a key cost each upload 13-15 µs (pgbench,
-- one-row inserts, 20,000 each: 0.106 ms with an identity key, 0.091 without). REPLICA
-- IDENTITY FULL lets a logical-replication publication of every table take its deletes.
CREATE TABLE IF NOT EXISTS pending_upload_stored_deltas (
    bytes         bigint NOT NULL DEFAULT 0,
    files         bigint NOT NULL DEFAULT 0,
    activity_rows bigint NOT NULL DEFAULT 0
);
ALTER TABLE pending_upload_stored_deltas REPLICA IDENTITY FULL;

-- Inserts count per row: a statement trigger's transition table would keep each inserted row
-- whole, bytes and all, before TOAST (see 20261203120000). The staging functions count their
-- own rows, upload and activity alike, in one delta, before they take the workspace lock
-- (below): under `pending_uploads.totals_now = 'caller'` (see 20261203000000) the insert
-- triggers do nothing, and neither does the delete of a refused upload's rows (whose delta
-- is taken back). The bench's 1 KiB uploads at concurrency 8, against the binary before, five
-- or six interleaved runs each: two trigger calls and two delta rows an upload 0.86-0.97 of
-- its rate; this 0.92-0.96 to one workspace, 0.93-0.99 spread over 8 (its downloads, which
-- nothing here touches, 0.94-1.07).
CREATE OR REPLACE FUNCTION pending_stored_insert_row() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO pending_upload_stored_deltas (bytes, files) VALUES (NEW.size_bytes, 1);
    RETURN NULL;
END $$;

-- A row whose size changes (no writer does that today; an operator might).
CREATE OR REPLACE FUNCTION pending_stored_resize_row() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO pending_upload_stored_deltas (bytes) VALUES (NEW.size_bytes - OLD.size_bytes);
    RETURN NULL;
END $$;

-- Deletes count per statement: a sweep batch appends one delta, not one per row.
CREATE OR REPLACE FUNCTION pending_stored_delete() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('pending_uploads.totals_now', true) = 'caller' THEN
        RETURN NULL;
    END IF;
    INSERT INTO pending_upload_stored_deltas (bytes, files)
    SELECT -sum(size_bytes), -count(*) FROM gone HAVING count(*) > 0;
    RETURN NULL;
END $$;

-- TRUNCATE fires no delete trigger. It holds the table exclusively, so every delta of its
-- rows is committed (or its own): their sum is what it removed.
CREATE OR REPLACE FUNCTION pending_stored_truncate() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO pending_upload_stored_deltas (bytes, files)
    SELECT -sum(bytes), -sum(files) FROM pending_upload_stored_deltas
    HAVING sum(bytes) <> 0 OR sum(files) <> 0;
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION activity_stored_insert_row() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO pending_upload_stored_deltas (activity_rows) VALUES (1);
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION activity_stored_change_row() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO pending_upload_stored_deltas (activity_rows)
    VALUES (COALESCE(NEW.method = 'chat_upload_receive', false)::int
          - COALESCE(OLD.method = 'chat_upload_receive', false)::int);
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION activity_stored_delete() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO pending_upload_stored_deltas (activity_rows)
    SELECT -count(*) FROM gone WHERE method = 'chat_upload_receive' HAVING count(*) > 0;
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION activity_stored_truncate() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO pending_upload_stored_deltas (activity_rows)
    SELECT -sum(activity_rows) FROM pending_upload_stored_deltas HAVING sum(activity_rows) <> 0;
    RETURN NULL;
END $$;

-- Creating the triggers locks out writers of both tables until this migration commits, so
-- the first delta below matches the rows exactly (on a large deployment they wait for its
-- two aggregates, once).
DROP TRIGGER IF EXISTS pending_stored_insert ON pending_uploads;
CREATE TRIGGER pending_stored_insert
    AFTER INSERT ON pending_uploads
    FOR EACH ROW
    WHEN (current_setting('pending_uploads.totals_now', true) IS DISTINCT FROM 'caller')
    EXECUTE FUNCTION pending_stored_insert_row();

DROP TRIGGER IF EXISTS pending_stored_resize ON pending_uploads;
CREATE TRIGGER pending_stored_resize
    AFTER UPDATE OF size_bytes ON pending_uploads
    FOR EACH ROW WHEN (OLD.size_bytes IS DISTINCT FROM NEW.size_bytes)
    EXECUTE FUNCTION pending_stored_resize_row();

DROP TRIGGER IF EXISTS pending_stored_delete ON pending_uploads;
CREATE TRIGGER pending_stored_delete
    AFTER DELETE ON pending_uploads REFERENCING OLD TABLE AS gone
    FOR EACH STATEMENT EXECUTE FUNCTION pending_stored_delete();

DROP TRIGGER IF EXISTS pending_stored_truncate ON pending_uploads;
CREATE TRIGGER pending_stored_truncate
    AFTER TRUNCATE ON pending_uploads
    FOR EACH STATEMENT EXECUTE FUNCTION pending_stored_truncate();

-- The platform's own activity rows cost a WHEN check each, nothing queued.
DROP TRIGGER IF EXISTS activity_stored_insert ON activity_logs;
CREATE TRIGGER activity_stored_insert
    AFTER INSERT ON activity_logs
    FOR EACH ROW
    WHEN (NEW.method = 'chat_upload_receive'
          AND current_setting('pending_uploads.totals_now', true) IS DISTINCT FROM 'caller')
    EXECUTE FUNCTION activity_stored_insert_row();

DROP TRIGGER IF EXISTS activity_stored_change ON activity_logs;
CREATE TRIGGER activity_stored_change
    AFTER UPDATE OF method ON activity_logs
    FOR EACH ROW WHEN (COALESCE(OLD.method = 'chat_upload_receive', false)
                       <> COALESCE(NEW.method = 'chat_upload_receive', false))
    EXECUTE FUNCTION activity_stored_change_row();

DROP TRIGGER IF EXISTS activity_stored_delete ON activity_logs;
CREATE TRIGGER activity_stored_delete
    AFTER DELETE ON activity_logs REFERENCING OLD TABLE AS gone
    FOR EACH STATEMENT EXECUTE FUNCTION activity_stored_delete();

DROP TRIGGER IF EXISTS activity_stored_truncate ON activity_logs;
CREATE TRIGGER activity_stored_truncate
    AFTER TRUNCATE ON activity_logs
    FOR EACH STATEMENT EXECUTE FUNCTION activity_stored_truncate();

DELETE FROM pending_upload_stored_deltas;
INSERT INTO pending_upload_stored_deltas (bytes, files, activity_rows)
SELECT (SELECT COALESCE(sum(size_bytes), 0) FROM pending_uploads),
       (SELECT count(*) FROM pending_uploads),
       (SELECT count(*) FROM activity_logs WHERE method = 'chat_upload_receive');

-- The reading: what every committed delta adds up to. Past 1,000 deltas one replica at a time
-- (a try-lock; the others just sum) folds up to 100,000 of those it sees into one row, so a
-- reading sums the deltas of an interval, not of the deployment's life, and a fold's work is
-- bounded whatever another writer inserted at once (500,000 deltas folded in 416 ms, a
-- reading's deadline is DEPENDENCY_TIMEOUT); an idle deployment writes nothing. A
-- fold that waited for another's would sum from a snapshot taken before that one's new row.
-- The lock's two-part key is its own key space: no workspace lock (one bigint) can take it.
CREATE OR REPLACE FUNCTION pending_uploads_stored(
    OUT total_bytes bigint, OUT total_files bigint, OUT total_activity_rows bigint)
LANGUAGE plpgsql AS $$
DECLARE
    deltas bigint;
BEGIN
    SELECT COALESCE(sum(d.bytes), 0), COALESCE(sum(d.files), 0),
           COALESCE(sum(d.activity_rows), 0), count(*)
      INTO total_bytes, total_files, total_activity_rows, deltas
      FROM pending_upload_stored_deltas d;
    IF deltas >= 1000 AND pg_try_advisory_xact_lock(1885689203, 1) THEN
        WITH gone AS (DELETE FROM pending_upload_stored_deltas
                      WHERE ctid = ANY (ARRAY(SELECT ctid FROM pending_upload_stored_deltas
                                              LIMIT 100000))
                      RETURNING bytes AS b, files AS f, activity_rows AS a)
        INSERT INTO pending_upload_stored_deltas (bytes, files, activity_rows)
        SELECT sum(b), sum(f), sum(a) FROM gone HAVING count(*) > 0;
    END IF;
END $$;

-- As in 20261205200000. The staging functions count the rows they insert, and the activity
-- rows an accepted upload gets, in one delta before the workspace lock (what runs under it
-- bounds one workspace's upload rate); a refused upload takes it back.
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
        INSERT INTO pending_upload_stored_deltas (bytes, files, activity_rows)
        VALUES (-bytes, -cardinality(file_ids), -cardinality(file_ids));
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
    INSERT INTO pending_upload_stored_deltas (bytes, files, activity_rows)
    SELECT COALESCE(sum(s), 0), cardinality(file_ids), cardinality(file_ids) FROM unnest(sizes) s;
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
    INSERT INTO pending_upload_stored_deltas (bytes, files, activity_rows) VALUES (f_size, 1, 1);
    SELECT a.refused, a.pending_bytes, a.pending_files INTO refused, pending_bytes, pending_files
      FROM pending_uploads_admit_staged(ws, lock_key, max_bytes, max_files,
                                        ARRAY[f_id], ARRAY[f_name], ARRAY[f_mime], ARRAY[f_size]) a;
END $$;
