-- Unacked bytes per workspace, kept by triggers, so the upload quota check (SPEC §9) reads
-- one row instead of summing every pending row of the workspace: with small files a
-- workspace under its 1 GiB quota can hold hundreds of thousands of rows, and the sum ran
-- twice per upload, once under the workspace lock. Triggers, not application code, keep it,
-- so every writer counts: this binary, the previous one during a rolling deploy, the
-- platform, an operator's UPDATE or DELETE.
--
-- The total counts unacked rows that exist, expired or not; the quota query subtracts the
-- expired ones not yet swept (a short index range scan), so expiry frees quota at once.
--
-- Every trigger works per statement (transition tables), never per row: a bulk statement
-- over n rows costs one aggregate, not n updates of one total row.
CREATE TABLE IF NOT EXISTS pending_upload_totals (
    workspace_id  uuid   PRIMARY KEY,
    unacked_bytes bigint NOT NULL
);

-- The quota query's expired-but-unswept part.
CREATE INDEX IF NOT EXISTS pending_uploads_workspace_expiry_unacked_idx
    ON pending_uploads (workspace_id, expires_at) WHERE acked_at IS NULL;

-- Adds one workspace's delta to its total. A total may pass through a negative value when a
-- row is inserted and settled in one transaction (inserts count at commit).
CREATE OR REPLACE FUNCTION pending_totals_add(ws uuid, delta bigint) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO pending_upload_totals AS t (workspace_id, unacked_bytes) VALUES (ws, delta)
    ON CONFLICT (workspace_id) DO UPDATE SET unacked_bytes = t.unacked_bytes + EXCLUDED.unacked_bytes;
END $$;

-- Inserts count at commit. An upload copies its bytes before it takes the workspace lock;
-- locking the total row at insert time would serialise concurrent uploads to one workspace
-- (and stall its acks) for the whole copy. So an insert statement parks its per-workspace
-- sums here, and a deferred trigger folds each into its total at commit.
CREATE TABLE IF NOT EXISTS pending_upload_total_deltas (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    workspace_id uuid   NOT NULL,
    delta        bigint NOT NULL
);

CREATE OR REPLACE FUNCTION pending_totals_insert() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO pending_upload_total_deltas (workspace_id, delta)
    SELECT workspace_id, sum(size_bytes) FROM added WHERE acked_at IS NULL
    GROUP BY workspace_id ORDER BY workspace_id;
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION pending_totals_fold() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pending_totals_add(NEW.workspace_id, NEW.delta);
    DELETE FROM pending_upload_total_deltas WHERE id = NEW.id;
    RETURN NULL;
END $$;

-- Updates and deletes settle at once, in workspace order: transactions that settle several
-- workspaces (two sweepers' batches) lock the total rows in one order and cannot deadlock
-- on them. An ack (or an un-ack, or a moved or resized row) changes what rows contribute;
-- every other update (fetched_at, s3_key, content) nets to zero and writes nothing.
-- One set-based upsert per statement rather than a loop over pending_totals_add: a sweep
-- batch touching 500 workspaces settles in about half the time.
CREATE OR REPLACE FUNCTION pending_totals_update() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO pending_upload_totals AS t (workspace_id, unacked_bytes)
    SELECT workspace_id, sum(delta)
    FROM (SELECT workspace_id, size_bytes AS delta FROM after_rows WHERE acked_at IS NULL
          UNION ALL
          SELECT workspace_id, -size_bytes FROM before_rows WHERE acked_at IS NULL) u
    GROUP BY workspace_id HAVING sum(delta) <> 0 ORDER BY workspace_id
    ON CONFLICT (workspace_id) DO UPDATE SET unacked_bytes = t.unacked_bytes + EXCLUDED.unacked_bytes;
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION pending_totals_delete() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO pending_upload_totals AS t (workspace_id, unacked_bytes)
    SELECT workspace_id, -sum(size_bytes) FROM gone WHERE acked_at IS NULL
    GROUP BY workspace_id ORDER BY workspace_id
    ON CONFLICT (workspace_id) DO UPDATE SET unacked_bytes = t.unacked_bytes + EXCLUDED.unacked_bytes;
    RETURN NULL;
END $$;

-- Creating the triggers locks out writers until this migration commits, so the initial
-- totals below match the rows exactly.
DROP TRIGGER IF EXISTS pending_totals_insert ON pending_uploads;
CREATE TRIGGER pending_totals_insert
    AFTER INSERT ON pending_uploads REFERENCING NEW TABLE AS added
    FOR EACH STATEMENT EXECUTE FUNCTION pending_totals_insert();

DROP TRIGGER IF EXISTS pending_totals_fold ON pending_upload_total_deltas;
CREATE CONSTRAINT TRIGGER pending_totals_fold
    AFTER INSERT ON pending_upload_total_deltas DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION pending_totals_fold();

DROP TRIGGER IF EXISTS pending_totals_update ON pending_uploads;
CREATE TRIGGER pending_totals_update
    AFTER UPDATE ON pending_uploads REFERENCING OLD TABLE AS before_rows NEW TABLE AS after_rows
    FOR EACH STATEMENT EXECUTE FUNCTION pending_totals_update();

DROP TRIGGER IF EXISTS pending_totals_delete ON pending_uploads;
CREATE TRIGGER pending_totals_delete
    AFTER DELETE ON pending_uploads REFERENCING OLD TABLE AS gone
    FOR EACH STATEMENT EXECUTE FUNCTION pending_totals_delete();

INSERT INTO pending_upload_totals (workspace_id, unacked_bytes)
SELECT workspace_id, sum(size_bytes) FROM pending_uploads WHERE acked_at IS NULL
GROUP BY workspace_id
ON CONFLICT (workspace_id) DO UPDATE SET unacked_bytes = EXCLUDED.unacked_bytes;
