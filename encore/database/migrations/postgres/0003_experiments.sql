-- Model versions side by side: experiments (a champion against a challenger with a share of the
-- users), the versions a run scored with, and feedback of two kinds (a list viewed, a playlist
-- liked) attributed to the experiment whose run served the list.
CREATE TABLE experiments (
    experiment_id text PRIMARY KEY,
    champion text NOT NULL,
    challenger text NOT NULL CHECK (challenger <> champion),
    share double precision NOT NULL CHECK (share > 0 AND share < 1),
    started_at timestamptz NOT NULL DEFAULT now(),
    ended_at timestamptz,
    end_reason text,
    offline jsonb NOT NULL DEFAULT '{}'
);
-- At most one experiment runs at a time.
CREATE UNIQUE INDEX experiments_one_current_idx ON experiments ((true)) WHERE ended_at IS NULL;

ALTER TABLE runs ADD COLUMN experiment_id text;
ALTER TABLE runs ADD COLUMN challenger_version text;
ALTER TABLE runs ADD COLUMN challenger_share double precision;
ALTER TABLE runs ADD COLUMN users_by_version jsonb;

-- A constant default: no table rewrite (Postgres 11+), existing events are likes.
ALTER TABLE feedback ADD COLUMN kind text NOT NULL DEFAULT 'like'
    CHECK (kind IN ('like', 'view'));
ALTER TABLE feedback ALTER COLUMN liked_playlist_id DROP NOT NULL;
ALTER TABLE feedback ADD CONSTRAINT feedback_like_names_a_playlist
    CHECK ((kind = 'like') = (liked_playlist_id IS NOT NULL));
ALTER TABLE feedback ADD COLUMN experiment_id text;
CREATE INDEX feedback_experiment_idx ON feedback (experiment_id, model_version, user_id)
    WHERE experiment_id IS NOT NULL;
