-- The platform's index names (SPEC §2): a database the platform migrated has them already,
-- one we migrated has ours. Rename ours where the platform's name is free; where both exist,
-- ours is a duplicate of the platform's and goes.
DO $$
DECLARE
    pair text[];
BEGIN
    FOREACH pair SLICE 1 IN ARRAY ARRAY[
        ['pending_uploads_workspace_unacked_idx', 'idx_pending_uploads_workspace_unacked'],
        ['pending_uploads_expiry_unacked_idx', 'idx_pending_uploads_expires'],
        ['pending_uploads_acked_idx', 'idx_pending_uploads_acked']
    ] LOOP
        IF to_regclass(pair[2]) IS NULL THEN
            EXECUTE format('ALTER INDEX IF EXISTS %I RENAME TO %I', pair[1], pair[2]);
        ELSE
            EXECUTE format('DROP INDEX IF EXISTS %I', pair[1]);
        END IF;
    END LOOP;
END $$;
