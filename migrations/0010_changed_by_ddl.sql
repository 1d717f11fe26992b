-- What `tandem ddl` changed of configured tables, beyond `tandem.renamed`, on each side that ran
-- the statement. The other side may have written rows naming what it changed before the change
-- reached it; they arrive after the change here, and `run` takes them as they were meant
-- instead of refusing the transaction.

-- Columns renamed or dropped, by the name they had: such a value goes to the column (`attnum`)
-- under the name it has now, or is left out when the column was dropped.
CREATE TABLE IF NOT EXISTS tandem.renamed_columns (
    table_oid  oid         NOT NULL,
    old_name   text        NOT NULL,
    attnum     int2        NOT NULL,
    changed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (table_oid, old_name)
);

-- Tables dropped, by name: changes of such a table are left out while no table has its name.
CREATE TABLE IF NOT EXISTS tandem.dropped (
    table_name text        PRIMARY KEY,
    dropped_at timestamptz NOT NULL DEFAULT now()
);
