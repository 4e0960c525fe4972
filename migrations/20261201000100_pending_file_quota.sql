-- SPEC §10, bounded storage: unacked *files* per workspace are capped too (1-byte files cost
-- hundreds of database bytes each), so the trigger-kept totals count rows beside bytes.
-- Additive: a new column with a default; the functions keep their names and the triggers
-- their definitions, so every writer (the previous binary too) keeps both counts.

-- Writers wait while the counts are initialised, so no insert is counted twice or not at
-- all; in-flight upload transactions finish first (their inserts fold at commit).
LOCK TABLE pending_uploads IN SHARE ROW EXCLUSIVE MODE;

ALTER TABLE pending_upload_totals ADD COLUMN IF NOT EXISTS unacked_files bigint NOT NULL DEFAULT 0;
ALTER TABLE pending_upload_total_deltas ADD COLUMN IF NOT EXISTS files bigint NOT NULL DEFAULT 0;

CREATE OR REPLACE FUNCTION pending_totals_add(ws uuid, delta bigint, files bigint) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO pending_upload_totals AS t (workspace_id, unacked_bytes, unacked_files)
    VALUES (ws, delta, files)
    ON CONFLICT (workspace_id) DO UPDATE
        SET unacked_bytes = t.unacked_bytes + EXCLUDED.unacked_bytes,
            unacked_files = t.unacked_files + EXCLUDED.unacked_files;
END $$;

CREATE OR REPLACE FUNCTION pending_totals_insert() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO pending_upload_total_deltas (workspace_id, delta, files)
    SELECT workspace_id, sum(size_bytes), count(*) FROM added WHERE acked_at IS NULL
    GROUP BY workspace_id ORDER BY workspace_id;
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION pending_totals_fold() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pending_totals_add(NEW.workspace_id, NEW.delta, NEW.files);
    DELETE FROM pending_upload_total_deltas WHERE id = NEW.id;
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION pending_totals_update() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO pending_upload_totals AS t (workspace_id, unacked_bytes, unacked_files)
    SELECT workspace_id, sum(delta), sum(files)
    FROM (SELECT workspace_id, size_bytes AS delta, 1 AS files FROM after_rows WHERE acked_at IS NULL
          UNION ALL
          SELECT workspace_id, -size_bytes, -1 FROM before_rows WHERE acked_at IS NULL) u
    GROUP BY workspace_id HAVING sum(delta) <> 0 OR sum(files) <> 0 ORDER BY workspace_id
    ON CONFLICT (workspace_id) DO UPDATE
        SET unacked_bytes = t.unacked_bytes + EXCLUDED.unacked_bytes,
            unacked_files = t.unacked_files + EXCLUDED.unacked_files;
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION pending_totals_delete() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO pending_upload_totals AS t (workspace_id, unacked_bytes, unacked_files)
    SELECT workspace_id, -sum(size_bytes), -count(*) FROM gone WHERE acked_at IS NULL
    GROUP BY workspace_id ORDER BY workspace_id
    ON CONFLICT (workspace_id) DO UPDATE
        SET unacked_bytes = t.unacked_bytes + EXCLUDED.unacked_bytes,
            unacked_files = t.unacked_files + EXCLUDED.unacked_files;
    RETURN NULL;
END $$;

UPDATE pending_upload_totals t SET unacked_files = COALESCE(
    (SELECT count(*) FROM pending_uploads r WHERE r.workspace_id = t.workspace_id AND r.acked_at IS NULL), 0);

-- The sweeper removes this service's own upload activity rows after ACTIVITY_RETENTION.
CREATE INDEX IF NOT EXISTS activity_logs_upload_receive_created_idx
    ON activity_logs (created_at) WHERE method = 'chat_upload_receive';
