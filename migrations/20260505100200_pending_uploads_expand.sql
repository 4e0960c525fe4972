-- Additive expand step: the previous binary keeps running against it.

-- The retention sweep of acked rows.
CREATE INDEX IF NOT EXISTS pending_uploads_acked_idx
    ON pending_uploads (acked_at) WHERE acked_at IS NOT NULL;

-- sha256 of the content, written at upload: the strong ETag, and what the S3 backfill
-- verifies copies against. NULL only on rows written by a binary that predates it.
ALTER TABLE pending_uploads ADD COLUMN IF NOT EXISTS content_sha256 bytea NULL;

-- Keep content uncompressed out of line, so substring() reads of one slice fetch only the
-- TOAST chunks they need instead of decompressing the whole value.
ALTER TABLE pending_uploads ALTER COLUMN content SET STORAGE EXTERNAL;

-- Rows of one upload share created_at; seq keeps lists in upload (input) order.
ALTER TABLE pending_uploads ADD COLUMN IF NOT EXISTS seq bigint GENERATED ALWAYS AS IDENTITY;
