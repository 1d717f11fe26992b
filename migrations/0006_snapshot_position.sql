-- Where an initial snapshot read each side (`txid_current_snapshot()` and the WAL insert position
-- read right after it). `seed_*`: the copy's read of the seed; the seed->target stream, resuming at
-- its checkpoint before the copy, leaves out the changes of transactions that snapshot saw (the
-- copy has them). `back_*`: the merge's read of this (the target) side; the target->seed stream
-- leaves out this table's changes that the merge saw (it overwrote them with the seed's rows, or
-- copied them to the seed).
ALTER TABLE tandem.snapshots
    ADD COLUMN IF NOT EXISTS seed_snapshot text,
    ADD COLUMN IF NOT EXISTS seed_lsn pg_lsn,
    ADD COLUMN IF NOT EXISTS back_snapshot text,
    ADD COLUMN IF NOT EXISTS back_lsn pg_lsn;
