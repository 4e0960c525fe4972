-- Compatible subsets of the platform's tables, so the service stands alone (SPEC §2).
CREATE TABLE IF NOT EXISTS workspaces (
    id                      uuid        PRIMARY KEY,
    name                    text        NOT NULL DEFAULT '',
    delivery_mode           text        NOT NULL DEFAULT 'push'
                                        CHECK (delivery_mode IN ('push', 'poll')),
    url                     text        NULL,
    platform_inbound_secret text        NULL,
    status                  text        NOT NULL DEFAULT 'online',
    created_at              timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS workspace_auth_tokens (
    id           uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    workspace_id uuid        NOT NULL REFERENCES workspaces (id) ON DELETE CASCADE,
    token_hash   bytea       NOT NULL UNIQUE,
    prefix       text        NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    last_used_at timestamptz NULL,
    revoked_at   timestamptz NULL
);
CREATE INDEX IF NOT EXISTS workspace_auth_tokens_workspace_idx
    ON workspace_auth_tokens (workspace_id) WHERE revoked_at IS NULL;

CREATE TABLE IF NOT EXISTS activity_logs (
    id            uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    workspace_id  uuid        NOT NULL,
    activity_type text        NOT NULL,
    source_id     uuid        NULL,
    target_id     uuid        NULL,
    method        text        NULL,
    summary       text        NULL,
    request_body  jsonb       NULL,
    response_body jsonb       NULL,
    status        text        NOT NULL DEFAULT 'ok',
    error_detail  text        NULL,
    created_at    timestamptz NOT NULL DEFAULT now()
);
-- Rows written in one transaction share now(): page by a strictly increasing key instead.
-- Writers of one workspace serialize on an advisory lock, so per workspace `seq` order is
-- also commit order and a since_id cursor never skips a row committed late.
ALTER TABLE activity_logs ADD COLUMN IF NOT EXISTS seq bigint GENERATED ALWAYS AS IDENTITY;
CREATE UNIQUE INDEX IF NOT EXISTS activity_logs_workspace_seq_idx
    ON activity_logs (workspace_id, seq);
