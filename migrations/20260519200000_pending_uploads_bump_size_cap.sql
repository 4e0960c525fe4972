-- The platform's own step (its migration of the same name): the per-file cap, and so the
-- CHECK, rises from 25 MiB to 100 MiB. Same constraint name, so a database the platform
-- already migrated ends up in the same state. A looser CHECK cannot fail on existing rows;
-- NOT VALID + VALIDATE keeps writers unblocked while it is checked.
ALTER TABLE pending_uploads
    DROP CONSTRAINT IF EXISTS pending_uploads_size_bytes_check;
ALTER TABLE pending_uploads
    ADD CONSTRAINT pending_uploads_size_bytes_check
    CHECK (size_bytes > 0 AND size_bytes <= 104857600) NOT VALID;
ALTER TABLE pending_uploads VALIDATE CONSTRAINT pending_uploads_size_bytes_check;
