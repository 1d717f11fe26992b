-- `tandem skip`: the commit LSN of one source transaction the operator chose to leave out of this
-- direction (one the target rejects). `run` leaves out the transaction whose commit is exactly
-- here and clears it in the transaction that moves the checkpoint past it, as native
-- `ALTER SUBSCRIPTION ... SKIP (lsn = ...)` does.
ALTER TABLE tandem.checkpoints ADD COLUMN IF NOT EXISTS skip_lsn pg_lsn;
