-- A workspace's feed filtered by type, method or age (SPEC §4 Activity: `type=`, `method=`,
-- `since_secs=`; the agent asks for all three) reads that workspace's matching rows only. With
-- the workspace's `seq` index alone a filter that matched few rows or none read every row of
-- the workspace: `type=zzz` took 55 ms at 244,000 rows, and registration is open, so anyone
-- can make such a workspace and ask that as often as they like, on the database every client
-- shares. Each upload writes an activity row: its staging statement took 0.38 ms without
-- these and 0.38-0.41 with them (1 KiB uploads, 2,000 per run, two runs each, PostgreSQL's own
-- figure). Additive: the previous binary does not need them.
CREATE INDEX IF NOT EXISTS activity_logs_workspace_type_seq_idx
    ON activity_logs (workspace_id, activity_type, seq);
CREATE INDEX IF NOT EXISTS activity_logs_workspace_method_seq_idx
    ON activity_logs (workspace_id, method, seq);
CREATE INDEX IF NOT EXISTS activity_logs_workspace_created_idx
    ON activity_logs (workspace_id, created_at);
