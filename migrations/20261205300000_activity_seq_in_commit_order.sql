-- An activity row takes its `seq` under its workspace's lock, whoever writes it, so a
-- workspace's rows commit in `seq` order (SPEC §4: paging with since_id never skips a row;
-- §2: the platform writes activity rows too).
--
-- The identity default hands out `seq` when a row is inserted, and rows become visible when
-- their transactions commit. This service's own writers take the workspace lock before they
-- insert activity rows and hold it to commit, so their rows committed in `seq` order; a writer
-- that does not (the platform's plain INSERT, hand-written SQL) could insert with a lower
-- `seq`, commit after a higher one had been read, and be skipped by every reader whose cursor
-- had moved past it. Now the row waits for the lock, held to its transaction's end, and takes
-- a fresh `seq` once it has it: whoever inserted a row of the workspace before has committed
-- or rolled back. (A re-take of a lock its transaction holds costs a counter.)
--
-- A writer that holds the lock long delays that workspace's other writers as long, as an
-- upload's commit already does.

CREATE OR REPLACE FUNCTION activity_logs_seq_under_lock() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(pending_uploads_lock_key(NEW.workspace_id));
    NEW.seq := nextval(pg_get_serial_sequence('activity_logs', 'seq'));
    RETURN NEW;
END $$;

DROP TRIGGER IF EXISTS activity_logs_seq_under_lock ON activity_logs;
CREATE TRIGGER activity_logs_seq_under_lock
    BEFORE INSERT ON activity_logs
    FOR EACH ROW EXECUTE FUNCTION activity_logs_seq_under_lock();
