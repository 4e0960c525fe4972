-- This database's deployment, as the bucket prefix's marker object (`<prefix>.deployment`)
-- names it: the orphan reconciliation deletes only under a prefix whose marker names this
-- database (a second deployment given the same bucket and prefix took the first's live
-- objects for orphans). One row, made by the first reconciliation (so databases cloned from
-- one migrated template each get their own); a restored copy keeps the original's: give it
-- a new one (`DELETE FROM pending_uploads_deployment`) before it reconciles.
CREATE TABLE IF NOT EXISTS pending_uploads_deployment (
    id         uuid        PRIMARY KEY,
    created_at timestamptz NOT NULL DEFAULT now(),
    one_row    boolean     NOT NULL DEFAULT true UNIQUE CHECK (one_row)
);
