-- Seed migration (SPEC §2), exactly as the platform defines it.
CREATE TABLE IF NOT EXISTS pending_uploads (
    file_id      uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    workspace_id uuid        NOT NULL,
    content      bytea       NOT NULL,
    size_bytes   bigint      NOT NULL CHECK (size_bytes > 0 AND size_bytes <= 26214400),
    filename     text        NOT NULL CHECK (length(filename) BETWEEN 1 AND 100),
    mimetype     text        NOT NULL DEFAULT '',
    created_at   timestamptz NOT NULL DEFAULT now(),
    fetched_at   timestamptz NULL,
    acked_at     timestamptz NULL,
    expires_at   timestamptz NOT NULL DEFAULT now() + interval '24 hours'
);

-- The workspace's poll.
CREATE INDEX IF NOT EXISTS pending_uploads_workspace_unacked_idx
    ON pending_uploads (workspace_id, created_at) WHERE acked_at IS NULL;
-- The expiry sweep.
CREATE INDEX IF NOT EXISTS pending_uploads_expiry_unacked_idx
    ON pending_uploads (expires_at) WHERE acked_at IS NULL;
