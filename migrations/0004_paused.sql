-- Tables paused by the `error` conflict policy, per direction, on the side they apply to: the
-- conflicting change and every later change of the table wait in `held` (in order) until
-- `tandem resolve` continues them. Other tables keep flowing and the checkpoint moves on, so the
-- held changes live here, committed with the checkpoint that passed them.
CREATE TABLE tandem.paused (
    direction   text        NOT NULL CHECK (direction IN ('D>M', 'M>D')),
    table_name  text        NOT NULL,
    conflict_id bigint      NOT NULL,
    since       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (direction, table_name)
);
CREATE TABLE tandem.held (
    id         bigserial PRIMARY KEY,
    direction  text   NOT NULL CHECK (direction IN ('D>M', 'M>D')),
    table_name text   NOT NULL,
    op         text   NOT NULL CHECK (op IN ('upsert', 'update', 'delete')),
    source_op  text   NOT NULL CHECK (source_op IN ('insert', 'update', 'partial_update', 'delete')),
    cols       text[] NOT NULL,
    vals       jsonb  NOT NULL,
    old_cols   text[] NOT NULL,
    old_vals   jsonb,
    commit_lsn pg_lsn NOT NULL,
    commit_ts  bigint NOT NULL
);
CREATE INDEX held_table_idx ON tandem.held (direction, table_name, id);
