-- The last transaction the target refused, per direction, on the side it applies to: `tandem
-- status` (a process of its own, which cannot see `run`'s /health) shows it while the direction's
-- checkpoint has not moved past `checkpoint`. Written by `run` in a transaction of its own after
-- the refusal (`stopped`: `on_refusal = "stop"` stopped `run`; otherwise it tries again).
CREATE TABLE IF NOT EXISTS tandem.refusals (
    direction  text        PRIMARY KEY CHECK (direction IN ('D>M', 'M>D')),
    checkpoint pg_lsn      NOT NULL,
    since      timestamptz NOT NULL DEFAULT now(),
    last_at    timestamptz NOT NULL DEFAULT now(),
    tries      bigint      NOT NULL DEFAULT 1,
    stopped    boolean     NOT NULL,
    error      text        NOT NULL
);
