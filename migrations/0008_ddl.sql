-- Schema changes made with `tandem ddl`, on the side they were made on. The same transaction runs
-- the statement, adds its row here and writes a `tandem-ddl` logical message naming the row, so
-- `run` meets the message in that side's stream between the changes before and after the schema
-- change, and runs the statement on the other side right there. `run` only takes a message whose
-- row is here, complete, with the message's transaction id (`xid`): any role may write a logical
-- message, but only tandem's role may add rows here.
CREATE TABLE IF NOT EXISTS tandem.ddl (
    id          bigserial   PRIMARY KEY,
    xid         xid8        NOT NULL DEFAULT pg_current_xact_id(),
    search_path text        NOT NULL DEFAULT current_setting('search_path'),
    sql         text        NOT NULL,
    issued_at   timestamptz NOT NULL DEFAULT now(),
    issued_by   name        NOT NULL DEFAULT current_user,
    -- Set last in that transaction, once the statement ran without ending it (a COMMIT or
    -- ROLLBACK in its text would): `run` takes only a complete one.
    complete    boolean     NOT NULL DEFAULT false
);
