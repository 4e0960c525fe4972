-- The sweep (`db::uploads::sweep_batch`) takes a batch's rows in three parts, each through an
-- index in order: expired unacked rows (idx_pending_uploads_expires), rows acked before
-- ACK_RETENTION (idx_pending_uploads_acked), and rows acked since but expired, read by this
-- one. Before, one condition with an OR had no index to read it by, and each batch scanned the
-- table until it had its rows: 600 rows to sweep behind 20,000 live ones, in batches of 50,
-- read 261,640 rows; a table of 185,000 rows took 13.6-15.7 ms for a pass that found nothing
-- (a review's measurement); now 1,200 and an index probe. An ack writes one more index entry:
-- 4,000 acks at concurrency 4, three interleaved pairs, 2,761 / 2,959 / 2,951 per second with
-- it, 2,740 / 2,856 / 3,029 without. Additive: the previous binary does not need it.
CREATE INDEX IF NOT EXISTS pending_uploads_acked_expiry_idx
    ON pending_uploads (expires_at) WHERE acked_at IS NOT NULL;
