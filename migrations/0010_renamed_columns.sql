-- Columns of configured tables that `tandem ddl` renamed or dropped, on each side that ran the
-- statement, by the name they had. The other side may have written rows naming the column so
-- before the change reached it; they arrive after the change here, and `run` writes such a value
-- to the column (`attnum`) under the name it has now, or leaves it out when the column was
-- dropped, instead of refusing the transaction for a column the table lacks.
CREATE TABLE IF NOT EXISTS tandem.renamed_columns (
    table_oid  oid         NOT NULL,
    old_name   text        NOT NULL,
    attnum     int2        NOT NULL,
    changed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (table_oid, old_name)
);
