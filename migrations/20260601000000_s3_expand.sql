-- S3 expand step (SPEC §6): a row's bytes may live in an object instead of `content`.
-- Additive: the previous binary still inserts rows with content and reads them.
ALTER TABLE pending_uploads ADD COLUMN IF NOT EXISTS s3_key text NULL;
ALTER TABLE pending_uploads ALTER COLUMN content DROP NOT NULL;
-- Every row has its bytes somewhere. NOT VALID + VALIDATE avoids a long exclusive lock.
ALTER TABLE pending_uploads
    ADD CONSTRAINT pending_uploads_bytes_somewhere CHECK (content IS NOT NULL OR s3_key IS NOT NULL) NOT VALID;
ALTER TABLE pending_uploads VALIDATE CONSTRAINT pending_uploads_bytes_somewhere;
-- Backfill and contract look for rows whose bytes live only in Postgres.
CREATE INDEX IF NOT EXISTS pending_uploads_bytea_only_idx
    ON pending_uploads (file_id) WHERE s3_key IS NULL;
CREATE INDEX IF NOT EXISTS pending_uploads_s3_key_idx
    ON pending_uploads (s3_key) WHERE s3_key IS NOT NULL;
