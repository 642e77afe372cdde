-- The run lifecycle: the publishing and superseded states, rollback runs, who runs a run,
-- when it was first published, and the user ids of a backfill queued through the API.
-- SQLite cannot alter a CHECK constraint: the table is rebuilt.
CREATE TABLE runs_new (
    run_id TEXT PRIMARY KEY,
    kind TEXT NOT NULL CHECK (kind IN ('scheduled', 'manual', 'backfill', 'rollback')),
    status TEXT NOT NULL
        CHECK (status IN ('queued', 'running', 'publishing', 'published', 'failed', 'superseded')),
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
    error TEXT,
    published_at TEXT,
    owner TEXT
);
INSERT INTO runs_new (run_id, kind, status, model_version, target_run_id, created_at, started_at,
    finished_at, users_total, users_scored, cold_users, duration_seconds, drift_score,
    drift_pvalue, popularity_deciles, error, published_at)
SELECT run_id, kind, status, model_version, target_run_id, created_at, started_at, finished_at,
    users_total, users_scored, cold_users, duration_seconds, drift_score, drift_pvalue,
    popularity_deciles, error, CASE WHEN status = 'published' THEN finished_at END
FROM runs;
DROP TABLE runs;
ALTER TABLE runs_new RENAME TO runs;
-- Before this, POST /v1/runs started a process that claimed its queued record: a record still
-- queued belongs to a process that exited first (its users were in a file, not here). The
-- scheduler now executes queued records: these must not run weeks late.
UPDATE runs SET status = 'failed',
    finished_at = strftime('%Y-%m-%dT%H:%M:%f+00:00', 'now'),
    error = 'never started: the process asked to run it exited before it began'
WHERE status = 'queued';
CREATE INDEX runs_created_at_idx ON runs (created_at DESC);
CREATE INDEX runs_published_idx ON runs (status, finished_at DESC);
CREATE INDEX runs_open_idx ON runs (status, created_at);

CREATE TABLE run_requests (
    run_id TEXT PRIMARY KEY REFERENCES runs (run_id) ON DELETE CASCADE,
    user_ids TEXT NOT NULL
);
