-- The run lifecycle: the publishing and superseded states, rollback runs, who runs a run,
-- when it was first published, and the user ids of a backfill queued through the API.
ALTER TABLE runs DROP CONSTRAINT runs_kind_check;
ALTER TABLE runs ADD CONSTRAINT runs_kind_check
    CHECK (kind IN ('scheduled', 'manual', 'backfill', 'rollback'));
ALTER TABLE runs DROP CONSTRAINT runs_status_check;
ALTER TABLE runs ADD CONSTRAINT runs_status_check
    CHECK (status IN ('queued', 'running', 'publishing', 'published', 'failed', 'superseded'));
ALTER TABLE runs ADD COLUMN published_at timestamptz;
ALTER TABLE runs ADD COLUMN owner text;
UPDATE runs SET published_at = finished_at WHERE status = 'published';
-- Before this, POST /v1/runs started a process that claimed its queued record: a record still
-- queued belongs to a process that exited first (its users were in a file, not here). The
-- scheduler now executes queued records: these must not run weeks late.
UPDATE runs SET status = 'failed', finished_at = now(),
    error = 'never started: the process asked to run it exited before it began'
WHERE status = 'queued';
-- Reconciliation reads every unfinished run, however old; the scheduler claims the oldest
-- queued one.
CREATE INDEX runs_open_idx ON runs (created_at)
    WHERE status IN ('queued', 'running', 'publishing');

CREATE TABLE run_requests (
    run_id text PRIMARY KEY REFERENCES runs (run_id) ON DELETE CASCADE,
    user_ids bigint[] NOT NULL
);
