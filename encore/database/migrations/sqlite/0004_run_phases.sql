-- The nightly pipeline's phases (ingest, refresh, score, publish), seconds each, as JSON.
ALTER TABLE runs ADD COLUMN phases TEXT;
