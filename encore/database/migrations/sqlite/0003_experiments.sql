-- Model versions side by side: experiments (a champion against a challenger with a share of the
-- users), the versions a run scored with, and feedback of two kinds (a list viewed, a playlist
-- liked) attributed to the experiment whose run served the list.
CREATE TABLE experiments (
    experiment_id TEXT PRIMARY KEY,
    champion TEXT NOT NULL,
    challenger TEXT NOT NULL CHECK (challenger <> champion),
    share REAL NOT NULL CHECK (share > 0 AND share < 1),
    started_at TEXT NOT NULL,
    ended_at TEXT,
    end_reason TEXT,
    offline TEXT NOT NULL DEFAULT '{}'
);
-- At most one experiment runs at a time.
CREATE UNIQUE INDEX experiments_one_current_idx ON experiments ((1)) WHERE ended_at IS NULL;

ALTER TABLE runs ADD COLUMN experiment_id TEXT;
ALTER TABLE runs ADD COLUMN challenger_version TEXT;
ALTER TABLE runs ADD COLUMN challenger_share REAL;
ALTER TABLE runs ADD COLUMN users_by_version TEXT;

-- SQLite cannot drop a NOT NULL: the table is rebuilt. Existing events are likes.
CREATE TABLE feedback_new (
    event_id TEXT PRIMARY KEY,
    user_id INTEGER NOT NULL CHECK (user_id >= 0),
    run_id TEXT NOT NULL,
    model_version TEXT,
    liked_playlist_id INTEGER CHECK (liked_playlist_id >= 0),
    shown_playlist_ids TEXT NOT NULL,
    created_at TEXT NOT NULL,
    kind TEXT NOT NULL DEFAULT 'like' CHECK (kind IN ('like', 'view')),
    experiment_id TEXT,
    CHECK ((kind = 'like') = (liked_playlist_id IS NOT NULL))
);
INSERT INTO feedback_new (event_id, user_id, run_id, model_version, liked_playlist_id,
    shown_playlist_ids, created_at)
SELECT event_id, user_id, run_id, model_version, liked_playlist_id, shown_playlist_ids, created_at
FROM feedback;
DROP TABLE feedback;
ALTER TABLE feedback_new RENAME TO feedback;
CREATE INDEX feedback_created_at_idx ON feedback (created_at);
CREATE INDEX feedback_model_version_created_at_idx ON feedback (model_version, created_at);
CREATE INDEX feedback_user_created_at_idx ON feedback (user_id, created_at);
CREATE INDEX feedback_experiment_idx ON feedback (experiment_id, model_version, user_id)
    WHERE experiment_id IS NOT NULL;
