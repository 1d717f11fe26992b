-- tandem's control schema. Applied by `tandem setup` on both sides, in order, once each.
CREATE SCHEMA IF NOT EXISTS tandem;

-- Last source commit applied to this database, per direction. Written in the same transaction as
-- the rows it covers, so after any crash it says exactly what this side already holds.
CREATE TABLE tandem.checkpoints (
    direction        text PRIMARY KEY CHECK (direction IN ('D>M', 'M>D')),
    source_system_id text        NOT NULL,
    source_timeline  integer     NOT NULL,
    slot_name        text        NOT NULL,
    lsn              pg_lsn      NOT NULL,
    updated_at       timestamptz NOT NULL DEFAULT now()
);
