-- The nightly pipeline's phases (ingest, refresh, score, publish), seconds each.
ALTER TABLE runs ADD COLUMN phases jsonb;
