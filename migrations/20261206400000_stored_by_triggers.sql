-- What MAX_STORED_BYTES counts (every upload row's bytes, the rows themselves, and this
-- service's `chat_upload_receive` activity rows), kept by triggers, so a replica's reading is
-- a sum over a few rows instead of aggregates over both tables. Those aggregates grow with the
-- tables (86 ms at 520,000 upload rows); every replica ran them every 15 s and after every
-- sweep pass, and past DEPENDENCY_TIMEOUT every reading failed.
--
-- Every writer counts (this binary, the previous one during a rolling deploy, the platform,
-- an operator's statement): each change appends a delta row, and a reading sums them. Nothing
-- is locked but the new row, so writers never wait on one another here; a reading folds the
-- deltas it sees into one row (`pending_uploads_stored`), one replica at a time.
CREATE TABLE IF NOT EXISTS pending_upload_stored_deltas (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    bytes         bigint NOT NULL DEFAULT 0,
    files         bigint NOT NULL DEFAULT 0,
    activity_rows bigint NOT NULL DEFAULT 0
);

-- Inserts count per row: a statement trigger's transition table would keep each inserted row
-- whole, bytes and all, before TOAST (see 20261203120000).
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
    FOR EACH ROW EXECUTE FUNCTION pending_stored_insert_row();

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
    FOR EACH ROW WHEN (NEW.method = 'chat_upload_receive')
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

-- The reading: what every committed delta adds up to. One replica at a time (a try-lock; the
-- others just sum) first folds the deltas it sees into one row, so a reading sums the deltas
-- of one interval, not of the deployment's life. A fold that waited for another's would sum
-- from a snapshot taken before that one's new row. The lock's two-part key is its own key
-- space: no workspace lock (one bigint) can take it.
CREATE OR REPLACE FUNCTION pending_uploads_stored(
    OUT total_bytes bigint, OUT total_files bigint, OUT total_activity_rows bigint)
LANGUAGE plpgsql AS $$
BEGIN
    IF pg_try_advisory_xact_lock(1885689203, 1) THEN
        WITH gone AS (DELETE FROM pending_upload_stored_deltas
                      RETURNING bytes AS b, files AS f, activity_rows AS a)
        INSERT INTO pending_upload_stored_deltas (bytes, files, activity_rows)
        SELECT sum(b), sum(f), sum(a) FROM gone HAVING count(*) > 0;
    END IF;
    SELECT COALESCE(sum(d.bytes), 0), COALESCE(sum(d.files), 0), COALESCE(sum(d.activity_rows), 0)
      INTO total_bytes, total_files, total_activity_rows
      FROM pending_upload_stored_deltas d;
END $$;
