-- Where an initial snapshot read its seed: `txid_current_snapshot()` of the copy's transaction and
-- the seed's WAL insert position right after it. The seed→target stream resumes at its checkpoint,
-- before the copy, and leaves out the changes of transactions that snapshot saw (the copy has
-- them already), until it passes that position.
ALTER TABLE tandem.snapshots
    ADD COLUMN IF NOT EXISTS seed_snapshot text,
    ADD COLUMN IF NOT EXISTS seed_lsn pg_lsn;
