-- The backlog gauges (rows and bytes by state, the oldest unacked upload) as the fleet last
-- read them. Their read aggregates the upload table, so its time grows with it (86 ms at
-- 520,000 rows), and every replica ran it every 15 s for the same fleet-wide figures. Now
-- each replica calls `pending_uploads_backlog`: the call that finds the last reading old
-- enough, and takes the try-lock, reads the table for the fleet and keeps the result here;
-- every other call reads this row. One aggregate per interval, however many replicas.
CREATE TABLE IF NOT EXISTS pending_uploads_backlog (
    read_at           timestamptz NOT NULL,
    took              interval    NOT NULL,
    unfetched_rows    bigint      NOT NULL,
    unfetched_bytes   bigint      NOT NULL,
    fetched_rows      bigint      NOT NULL,
    fetched_bytes     bigint      NOT NULL,
    acked_rows        bigint      NOT NULL,
    acked_bytes       bigint      NOT NULL,
    oldest_unacked_at timestamptz,
    one_row           boolean     NOT NULL DEFAULT true PRIMARY KEY CHECK (one_row)
);

-- When the live unacked upload that expires first was made: one entry of the expiry index
-- (every row lives its expires_at default, 24 h from created_at; `min(created_at)` read every
-- unacked row: 46-150 ms at 218,000).
CREATE OR REPLACE FUNCTION pending_uploads_oldest_unacked_at() RETURNS timestamptz
LANGUAGE sql STABLE AS $$
    SELECT created_at FROM pending_uploads
    WHERE acked_at IS NULL AND expires_at > now()
    ORDER BY expires_at LIMIT 1
$$;

-- Whether the fleet's last reading is still fresh: younger than `lasts` seconds, and than
-- `share` + 1 times what it took (so the reads keep to 1/(share + 1) of a database core
-- however large the table grows, as each replica's own pacing did).
CREATE OR REPLACE FUNCTION pending_uploads_backlog_fresh(lasts float8, share int)
RETURNS boolean LANGUAGE sql STABLE AS $$
    SELECT EXISTS (SELECT 1 FROM pending_uploads_backlog b
                   WHERE b.read_at > now() - greatest(make_interval(secs => lasts),
                                                      b.took * (share + 1)))
$$;

-- The last reading, read again first when it is stale and no other call is reading (the
-- try-lock, on a two-int key no workspace lock can take; released at commit, after the new
-- reading is visible). A call that finds another reading returns the last reading at once.
CREATE OR REPLACE FUNCTION pending_uploads_backlog(lasts float8, share int)
RETURNS SETOF pending_uploads_backlog
LANGUAGE plpgsql AS $$
DECLARE
    r pending_uploads_backlog;
BEGIN
    IF NOT pending_uploads_backlog_fresh(lasts, share) THEN
        IF pg_try_advisory_xact_lock(1885689203, 2) THEN
            -- Another call may have committed a reading between the check and the lock.
            IF NOT pending_uploads_backlog_fresh(lasts, share) THEN
                SELECT count(*) FILTER (WHERE acked_at IS NULL AND fetched_at IS NULL),
                       COALESCE(sum(size_bytes) FILTER (WHERE acked_at IS NULL
                                                        AND fetched_at IS NULL), 0),
                       count(*) FILTER (WHERE acked_at IS NULL AND fetched_at IS NOT NULL),
                       COALESCE(sum(size_bytes) FILTER (WHERE acked_at IS NULL
                                                        AND fetched_at IS NOT NULL), 0),
                       count(*) FILTER (WHERE acked_at IS NOT NULL),
                       COALESCE(sum(size_bytes) FILTER (WHERE acked_at IS NOT NULL), 0)
                  INTO r.unfetched_rows, r.unfetched_bytes, r.fetched_rows, r.fetched_bytes,
                       r.acked_rows, r.acked_bytes
                  FROM pending_uploads WHERE expires_at > now();
                r.oldest_unacked_at := pending_uploads_oldest_unacked_at();
                r.read_at := now();
                r.took := clock_timestamp() - now();
                r.one_row := true;
                DELETE FROM pending_uploads_backlog;
                INSERT INTO pending_uploads_backlog SELECT r.*;
            END IF;
        END IF;
    END IF;
    RETURN QUERY SELECT * FROM pending_uploads_backlog;
END $$;
