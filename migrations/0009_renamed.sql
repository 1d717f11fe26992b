-- Tables renamed with `tandem ddl`, on each side that ran the rename, by the name they had. The
-- other side may have written rows under that name before the rename reached it; they arrive
-- after the rename here, and `run` writes them to the table (`table_oid`) under the name it has
-- now instead of refusing them for a table that is gone.
CREATE TABLE IF NOT EXISTS tandem.renamed (
    old_name   text        PRIMARY KEY,
    new_name   text        NOT NULL,
    table_oid  oid         NOT NULL,
    renamed_at timestamptz NOT NULL DEFAULT now()
);
