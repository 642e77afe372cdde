-- Run records and feedback events.
CREATE TABLE runs (
    run_id text PRIMARY KEY,
    kind text NOT NULL CHECK (kind IN ('scheduled', 'manual', 'backfill')),
    status text NOT NULL CHECK (status IN ('queued', 'running', 'published', 'failed')),
    model_version text,
    target_run_id text,
    created_at timestamptz NOT NULL DEFAULT now(),
    started_at timestamptz,
    finished_at timestamptz,
    users_total bigint NOT NULL DEFAULT 0,
    users_scored bigint NOT NULL DEFAULT 0,
    cold_users bigint NOT NULL DEFAULT 0,
    duration_seconds double precision,
    drift_score double precision,
    drift_pvalue double precision,
    popularity_deciles jsonb,
    error text
);
CREATE INDEX runs_created_at_idx ON runs (created_at DESC);
-- The scheduler's catch-up check and the metrics read the last published full run.
CREATE INDEX runs_published_idx ON runs (finished_at DESC) WHERE status = 'published';

CREATE TABLE feedback (
    event_id uuid PRIMARY KEY,
    user_id bigint NOT NULL CHECK (user_id >= 0),
    run_id text NOT NULL,
    model_version text,
    liked_playlist_id bigint NOT NULL CHECK (liked_playlist_id >= 0),
    shown_playlist_ids bigint[] NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
-- Exports for retraining read a time range; dashboards group by model version over time.
CREATE INDEX feedback_created_at_idx ON feedback (created_at);
CREATE INDEX feedback_model_version_created_at_idx ON feedback (model_version, created_at);
CREATE INDEX feedback_user_created_at_idx ON feedback (user_id, created_at);
