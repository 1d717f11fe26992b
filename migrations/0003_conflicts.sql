-- Every conflict tandem detected while applying to this database, and what it did about it.
-- Written in the same transaction as the decision, so a replay after a crash neither loses nor
-- repeats a row.
CREATE TABLE tandem.conflicts (
    id                bigserial PRIMARY KEY,
    detected_at       timestamptz NOT NULL DEFAULT now(),
    kind              text        NOT NULL,
    table_name        text        NOT NULL,
    key               jsonb       NOT NULL,
    local_row         jsonb,
    remote_row        jsonb,
    source_side       text        NOT NULL CHECK (source_side IN ('D', 'M')),
    source_commit_lsn pg_lsn      NOT NULL,
    source_commit_ts  timestamptz NOT NULL,
    policy            text        NOT NULL,
    resolution        text        NOT NULL
        CHECK (resolution IN ('applied_remote', 'kept_local', 'merged', 'skipped', 'paused'))
);
CREATE INDEX conflicts_table_idx ON tandem.conflicts (table_name, detected_at);
