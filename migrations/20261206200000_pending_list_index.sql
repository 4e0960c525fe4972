-- A workspace's pending list (SPEC §4 Fetch) pages by (created_at, seq), every page bounded by
-- `(created_at, seq) > (…)` (`db::uploads::list_pending_page`). The platform's
-- (workspace_id, created_at) index cannot take the seq half of that bound, so a page read the
-- workspace's unacked rows from the first and sorted them, and once PostgreSQL's generic plan
-- took over the statement (`$3 IS NULL OR …`) every page did. Measured with 10,000 pending
-- files sharing 50 created_at values: 0.27 ms a page analyzed (3.15 ms before any ANALYZE),
-- 51 pages a list; with this index 0.05 ms. expires_at is a key so that rows expired but not
-- yet swept are passed over in the index: a workspace of 10,000 such rows read and dropped
-- 10,000 heap rows for its first page (2.5-3.5 ms), 0.88 ms with it. On a table with no
-- statistics at all (a deployment's first minute, before autovacuum's first ANALYZE) the
-- planner may still take another index and sort. An upload writes one more index entry: 1 KiB
-- uploads at concurrency 4, six interleaved pairs of 4,000 each, 1,721-1,898 per second with
-- it (mean 1,818), 1,747-1,950 without (mean 1,848), within the runs' spread. Additive: the
-- previous binary does not need it.
CREATE INDEX IF NOT EXISTS pending_uploads_workspace_list_idx
    ON pending_uploads (workspace_id, created_at, seq, expires_at) WHERE acked_at IS NULL;
