-- Inserted rows are counted into their workspace's totals by a row trigger, not a statement
-- trigger with a transition table (issue 12).
--
-- A trigger `REFERENCING NEW TABLE` makes PostgreSQL keep every row the statement inserts,
-- as inserted: whole, before TOAST. Past `work_mem` (4 MB by default) that copy spills to a
-- temp file on the database server, and the trigger's query reads it back. So a 100 MB
-- upload wrote and read 100 MB of temp file besides its row (`log_temp_files` showed one
-- per large upload), and the capture happened even when the trigger then did nothing (the
-- small-upload path counts its rows itself). A 50 MiB COPY took 487 ms with the statement
-- trigger, 315 ms with this row trigger and 346 ms with no trigger (psql, four each).
--
-- An AFTER ROW trigger's event is queued with the row's address only, and its WHEN clause is
-- checked before anything is queued: rows whose writer counts them itself
-- (`pending_uploads.totals_now = 'caller'`, see 20261203000000) and rows inserted already
-- acked cost nothing. Each other row parks its own delta, folded in at commit by
-- `pending_totals_fold` as before. A bulk insert now parks one delta per row rather than one
-- per workspace; this service inserts one workspace's rows per transaction.
--
-- Updates and deletes keep their statement triggers: their transition tables hold the rows as
-- stored, whose bytes are TOAST pointers.

CREATE OR REPLACE FUNCTION pending_totals_insert_row() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO pending_upload_total_deltas (workspace_id, delta, files)
    VALUES (NEW.workspace_id, NEW.size_bytes, 1);
    RETURN NULL;
END $$;

DROP TRIGGER IF EXISTS pending_totals_insert ON pending_uploads;
CREATE TRIGGER pending_totals_insert
    AFTER INSERT ON pending_uploads
    FOR EACH ROW
    WHEN (NEW.acked_at IS NULL
          AND current_setting('pending_uploads.totals_now', true) IS DISTINCT FROM 'caller')
    EXECUTE FUNCTION pending_totals_insert_row();

DROP FUNCTION IF EXISTS pending_totals_insert();
