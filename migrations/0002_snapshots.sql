-- Initial snapshot progress, per table, on the side the snapshot wrote to. A table with a `done`
-- row has been synchronised; `pending` rows are a snapshot run that has not finished (a rerun
-- resumes there and does not redo the tables already done).
CREATE TABLE tandem.snapshots (
    table_name text PRIMARY KEY,
    seed       text        NOT NULL CHECK (seed IN ('D', 'M')),
    mode       text        NOT NULL CHECK (mode IN ('merge', 'mirror')),
    state      text        NOT NULL CHECK (state IN ('pending', 'done')),
    rows       bigint,
    updated_at timestamptz NOT NULL DEFAULT now()
);
