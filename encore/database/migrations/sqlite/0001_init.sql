-- Run records and feedback events (embedded default). Times are ISO 8601 UTC text.
CREATE TABLE runs (
    run_id TEXT PRIMARY KEY,
    kind TEXT NOT NULL CHECK (kind IN ('scheduled', 'manual', 'backfill')),
    status TEXT NOT NULL CHECK (status IN ('queued', 'running', 'published', 'failed')),
    model_version TEXT,
    target_run_id TEXT,
    created_at TEXT NOT NULL,
    started_at TEXT,
    finished_at TEXT,
    users_total INTEGER NOT NULL DEFAULT 0,
    users_scored INTEGER NOT NULL DEFAULT 0,
    cold_users INTEGER NOT NULL DEFAULT 0,
    duration_seconds REAL,
    drift_score REAL,
    drift_pvalue REAL,
    popularity_deciles TEXT,
    error TEXT
);
CREATE INDEX runs_created_at_idx ON runs (created_at DESC);
CREATE INDEX runs_published_idx ON runs (status, finished_at DESC);

CREATE TABLE feedback (
    event_id TEXT PRIMARY KEY,
    user_id INTEGER NOT NULL CHECK (user_id >= 0),
    run_id TEXT NOT NULL,
    model_version TEXT,
    liked_playlist_id INTEGER NOT NULL CHECK (liked_playlist_id >= 0),
    shown_playlist_ids TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE INDEX feedback_created_at_idx ON feedback (created_at);
CREATE INDEX feedback_model_version_created_at_idx ON feedback (model_version, created_at);
CREATE INDEX feedback_user_created_at_idx ON feedback (user_id, created_at);
