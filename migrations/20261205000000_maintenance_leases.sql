-- Fleet-wide maintenance turns (sweep::Sweeper::reconcile_in_turn): the orphan reconciliation
-- lists the whole prefix, so one replica takes a turn and the others skip it, rather than
-- every replica listing (and deleting) the same objects. A turn is when it was taken; each
-- asker judges it by its own period, so a replica that died (or ran with a longer period)
-- holds nobody back longer than the asker's own cycle. Additive: the previous binary does not
-- read it.
CREATE TABLE IF NOT EXISTS pending_uploads_leases (
    name text PRIMARY KEY,
    holder uuid NOT NULL,
    taken_at timestamptz NOT NULL
);
