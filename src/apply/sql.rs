//! SQL text for a batch shape. Values travel as one array parameter per column, unnested and
//! cast to the target column's type, so one prepared statement serves any number of rows and every
//! type round-trips through its exact text form: `text[]`, except integers (see [`param_type`]).

use crate::apply::plan::{Op, TargetTable};
use crate::config::quote_ident;

/// What an upsert does with a row already at its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Existing {
    /// `ON CONFLICT … DO UPDATE`: the incoming row replaces it.
    Replace,
    /// A plain INSERT: a unique violation (see [`crate::apply::plan::Batch::fresh`]).
    Fail,
    /// `ON CONFLICT … DO NOTHING`: it stays, and the row it met is not counted (see
    /// [`crate::apply::plan::Batch::absent`]).
    Keep,
}

/// The statement for `op` over target columns `cols` (see [`crate::apply::plan::Batch`]).
/// `None` when there is nothing to write (an update whose only sent columns are the key).
/// `existing` says what an upsert does with a row already at its key; a table without a key
/// inserts plainly.
pub fn statement(t: &TargetTable, op: Op, cols: &[usize], existing: Existing) -> Option<String> {
    let params: Vec<String> = cols
        .iter()
        .enumerate()
        .map(|(i, &c)| format!("${}::{}", i + 1, param_type(&t.columns[c].type_sql)))
        .collect();
    let aliases: Vec<String> = (1..=cols.len()).map(|i| format!("v{i}")).collect();
    // A key change in place numbers its rows, to upsert the ones whose old key's row the target
    // lacks (see `Op::Move` below).
    let from = match op {
        Op::Move => format!(
            "unnest({}) WITH ORDINALITY AS u({}, ord)",
            params.join(", "),
            aliases.join(", ")
        ),
        _ => format!("unnest({}) AS u({})", params.join(", "), aliases.join(", ")),
    };
    let cast = |pos: usize| format!("u.v{}::{}", pos + 1, t.columns[cols[pos]].cast_sql);
    let col = |c: usize| quote_ident(&t.columns[c].name);
    let key_match = || {
        t.key
            .iter()
            .map(|k| {
                let pos = cols
                    .iter()
                    .position(|c| c == k)
                    .expect("key columns are always in the batch");
                format!("t.{} = {}", col(*k), cast(pos))
            })
            .collect::<Vec<_>>()
            .join(" AND ")
    };
    // `SET` of the settable columns among the first `n`.
    let sets = |n: usize| -> Vec<String> {
        cols[..n]
            .iter()
            .enumerate()
            .filter(|(_, &c)| settable(t, c))
            .map(|(pos, &c)| format!("{} = {}", col(c), cast(pos)))
            .collect()
    };
    let table = t.name.quoted();
    let rows = t.rows();
    // A table without a key: the row to change is one equal, column by column, to the values
    // from `from_pos` on, found by its physical address (and partition). The target's text forms
    // are compared, NULLs alike, so a type without an equality operator (json, point) matches
    // too, and `1.0` is not taken for `1.00`. A type's own `=` goes first where it has one: the
    // server checks it first (it costs less), and the text forms only of the rows it lets
    // through (2,000 deletes from 20,000 rows: 1.4 s against 4.7 s). A column that leads an
    // index is also looked up as `= v OR IS NULL`, which the index answers (a BitmapOr of both),
    // where `IS NOT DISTINCT FROM` would scan the table, as native does before PostgreSQL 16.
    let one_equal = |from_pos: usize| {
        let same: Vec<String> = cols[from_pos..]
            .iter()
            .enumerate()
            .map(|(j, &c)| {
                let (v, x) = (cast(from_pos + j), format!("x.{}", col(c)));
                let text = format!("{x}::text IS NOT DISTINCT FROM ({v})::text");
                match (t.columns[c].equality, t.columns[c].indexed) {
                    (true, true) => format!(
                        "({x} = {v} OR {x} IS NULL) AND {x} IS NOT DISTINCT FROM {v} AND {text}"
                    ),
                    (true, false) => format!("{x} IS NOT DISTINCT FROM {v} AND {text}"),
                    (false, _) => text,
                }
            })
            .collect();
        format!(
            "CROSS JOIN LATERAL (SELECT x.tableoid AS rel, x.ctid AS tid FROM {rows} AS x \
             WHERE {} LIMIT 1) f WHERE t.tableoid = f.rel AND t.ctid = f.tid",
            if same.is_empty() {
                "true".to_string()
            } else {
                same.join(" AND ")
            }
        )
    };
    // An upsert of the first `n` columns' values, of the rows `only` lets through.
    let upsert = |n: usize, only: &str| {
        let names: Vec<String> = cols[..n].iter().map(|&c| col(c)).collect();
        let values: Vec<String> = (0..n).map(cast).collect();
        let overriding = if cols[..n].iter().any(|&c| t.columns[c].identity_always) {
            " OVERRIDING SYSTEM VALUE"
        } else {
            ""
        };
        let sets: Vec<String> = cols[..n]
            .iter()
            .filter(|&&c| settable(t, c))
            .map(|&c| format!("{0} = EXCLUDED.{0}", col(c)))
            .collect();
        let conflict = if sets.is_empty() || existing == Existing::Keep {
            "DO NOTHING".to_string()
        } else {
            format!("DO UPDATE SET {}", sets.join(", "))
        };
        let keys: Vec<String> = t.key.iter().map(|&k| col(k)).collect();
        let insert = format!(
            "INSERT INTO {table} AS t ({}){overriding} SELECT {} FROM {from}{only}",
            names.join(", "),
            values.join(", "),
        );
        if existing == Existing::Fail || t.key.is_empty() {
            insert
        } else {
            format!("{insert} ON CONFLICT ({}) {conflict}", keys.join(", "))
        }
    };
    // A key change in place (`Rekey`, `Move`): the new image's columns, then the old key's values.
    let n_new = cols.len().saturating_sub(t.key.len());
    let old_key = |alias: &str| {
        t.key
            .iter()
            .enumerate()
            .map(|(j, &k)| format!("{alias}.{} = {}", col(k), cast(n_new + j)))
            .collect::<Vec<_>>()
            .join(" AND ")
    };
    // A row the target holds at the new key (its own, or one the source since deleted there)
    // goes first, as long as the old key's row is there to take its place: the source moved the
    // row, with the values it did not send. The DELETE is drawn into the UPDATE's FROM, so it
    // runs before the moved row's key meets the unique index; the row it deleted is then dead
    // to the index check. Not the old key's row itself: a change of a key's spelling alone
    // (`citext`'s `Foo` to `foo`, numeric `1.0` to `1.00`) has its new key equal to the old by
    // `=`, and deleting that row set off the `ON DELETE CASCADE` of the rows referencing it.
    // (The `gone` query, the `UPDATE` after it.)
    let move_in_place = || {
        let sets: Vec<String> = cols[..n_new]
            .iter()
            .enumerate()
            .filter(|(_, &c)| t.key.contains(&c) || settable(t, c))
            .map(|(pos, &c)| format!("{} = {}", col(c), cast(pos)))
            .collect();
        (
            format!(
                "gone AS (DELETE FROM {rows} AS t USING {from} WHERE {} AND NOT ({}) \
                 AND EXISTS (SELECT 1 FROM {rows} AS x WHERE {}) RETURNING 1)",
                key_match(),
                old_key("t"),
                old_key("x"),
            ),
            format!(
                "UPDATE {rows} AS t SET {} FROM {from}, (SELECT count(*) FROM gone) AS g WHERE {}",
                sets.join(", "),
                old_key("t"),
            ),
        )
    };
    Some(match op {
        Op::Upsert => upsert(cols.len(), ""),
        Op::Update => {
            let sets = sets(cols.len());
            if sets.is_empty() {
                return None;
            }
            format!(
                "UPDATE {rows} AS t SET {} FROM {from} WHERE {}",
                sets.join(", "),
                key_match()
            )
        }
        Op::Delete if t.key.is_empty() => {
            format!("DELETE FROM {rows} AS t USING {from} {}", one_equal(0))
        }
        Op::Delete => format!("DELETE FROM {rows} AS t USING {from} WHERE {}", key_match()),
        Op::Replace => {
            // The new image's columns, then the old row's: the same columns (`Planner::replace`).
            let n = cols.len() / 2;
            let sets = sets(n);
            if sets.is_empty() {
                return None;
            }
            format!(
                "UPDATE {rows} AS t SET {} FROM {from} {}",
                sets.join(", "),
                one_equal(n)
            )
        }
        Op::Rekey => {
            let (gone, update) = move_in_place();
            format!("WITH {gone} {update}")
        }
        // The target may lack an old key's row: that row's whole new image is upserted then.
        // The insert reads `moved`, so the moves are made (or found to match nothing) first.
        Op::Move => {
            let (gone, update) = move_in_place();
            format!(
                "WITH {gone}, moved AS ({update} RETURNING u.ord) {}",
                upsert(
                    n_new,
                    " WHERE NOT EXISTS (SELECT 1 FROM moved AS m WHERE m.ord = u.ord)"
                )
            )
        }
    })
}

/// The array type a column of type `type_sql` (`format_type`) travels as in a batch statement.
/// Integers go as binary integers, parsed by tandem ([`crate::apply::pipeline::TextArray`]): the
/// target then reads 8 bytes per value instead of parsing digits. In SQL alone, updating 1M rows
/// of `(bigint, int, text)` in batches of 2,000 took 3.5–3.8 s this way against 4.0–4.2 s as
/// `text[]` with casts. Everything else goes as text and is cast by the server.
pub fn param_type(type_sql: &str) -> &'static str {
    match type_sql {
        "bigint" => "int8[]",
        "integer" => "int4[]",
        "smallint" => "int2[]",
        _ => "text[]",
    }
}

/// Target column `c` is one an UPDATE (or an upsert's `DO UPDATE`) sets: not part of the key
/// (unless its equal values may be spelled otherwise, see
/// [`crate::apply::plan::TargetColumn::respelled`]), and not
/// an identity column `GENERATED ALWAYS`.
pub fn settable(t: &TargetTable, c: usize) -> bool {
    (!t.key.contains(&c) || t.columns[c].respelled) && !t.columns[c].identity_always
}

/// What last_write_wins compares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Version {
    None,
    /// A target column (index), compared with the incoming value of it.
    Column(usize),
    /// The commit timestamp of the target row's last writer (`track_commit_timestamp`) against the
    /// source commit time, passed as one more `int8[]` parameter (µs since 2000-01-01). A row
    /// last written under the given replication origin came from this same source: it is older
    /// than anything that source sends next, whatever the times say (one target commit carries the
    /// time of the last source commit it covers).
    CommitTs(String),
}

/// The locking lookup that precedes a batch of a table with conflict detection: for each
/// incoming row (in order), what the target holds. Parameters: the batch columns `cols` as
/// `text[]`, then the old-row columns `old_cols` as `text[]`, then `bool[]` (row has an old row).
/// Columns returned: found, same as incoming, same as old (NULL without one), version comparison
/// (-1 target older, 0, 1; NULL without a version), the target row as JSON, the target's values of
/// `cols` as `text[]`, the key as JSON, the incoming row as JSON; then for a different target row
/// colliding on another unique constraint (NULLs when none): it as JSON, its key as `text[]`, and
/// its version comparison.
///
/// Without `details` the four JSON and `text[]` columns of the target row, key and incoming row
/// are NULL: most rows are no conflict and need none of them, and building them cost more than
/// the rest of the lookup (a subquery per JSON value and row).
pub fn lookup(
    t: &TargetTable,
    op: Op,
    cols: &[usize],
    old_cols: &[usize],
    version: &Version,
    details: bool,
) -> String {
    let col = |c: usize| quote_ident(&t.columns[c].name);
    let ty = |c: usize| &t.columns[c].cast_sql;
    let n = cols.len();
    let m = old_cols.len();
    let mut params: Vec<String> = (1..=n + m).map(|i| format!("${i}::text[]")).collect();
    params.push(format!("${}::bool[]", n + m + 1));
    if matches!(version, Version::CommitTs(_)) {
        params.push(format!("${}::int8[]", n + m + 2));
    }
    let mut aliases: Vec<String> = (1..=n).map(|i| format!("v{i}")).collect();
    aliases.extend((1..=m).map(|i| format!("o{i}")));
    aliases.push("has_old".into());
    if matches!(version, Version::CommitTs(_)) {
        aliases.push("ts".into());
    }
    aliases.push("ord".into());
    // Compare as the target's text form of both values: works for every type, equality
    // operator or not.
    let same = |pairs: Vec<(usize, String)>| {
        if pairs.is_empty() {
            return "true".to_string();
        }
        pairs
            .iter()
            .map(|(c, v)| format!("x.f{c}::text IS NOT DISTINCT FROM ({v}::{})::text", ty(*c)))
            .collect::<Vec<_>>()
            .join(" AND ")
    };
    let incoming: Vec<(usize, String)> = cols
        .iter()
        .enumerate()
        .map(|(i, &c)| (c, format!("u.v{}", i + 1)))
        .collect();
    let old: Vec<(usize, String)> = old_cols
        .iter()
        .enumerate()
        .map(|(i, &c)| (c, format!("u.o{}", i + 1)))
        .collect();
    let as_json = |pairs: &[(usize, String)]| {
        let fields: Vec<String> = pairs
            .iter()
            .map(|(c, v)| format!("{v}::{} AS {}", ty(*c), col(*c)))
            .collect();
        format!(
            "(SELECT to_jsonb(j) FROM (SELECT {}) j)::text",
            fields.join(", ")
        )
    };
    let key: Vec<(usize, String)> = incoming
        .iter()
        .filter(|(c, _)| t.key.contains(c))
        .cloned()
        .collect();
    let key_match: Vec<String> = key
        .iter()
        .map(|(c, v)| format!("t.{} = {v}::{}", col(*c), ty(*c)))
        .collect();
    // The version column, when it arrives: each lateral below selects it as `f<column>`.
    let version_col = match version {
        Version::Column(v) => cols.iter().position(|c| c == v).map(|p| (*v, p)),
        _ => None,
    };
    // The version of the target row found under `alias` against the incoming one.
    let version_cmp = |alias: &str| {
        let column = match version {
            Version::Column(_) => version_col
                .map(|(c, p)| (format!("{alias}.f{c}"), format!("u.v{}::{}", p + 1, ty(c)))),
            Version::CommitTs(origin) => Some((
                format!(
                    "(SELECT CASE WHEN o.roident = (SELECT roident FROM pg_replication_origin WHERE roname = {}) \
                     THEN '-infinity' ELSE o.timestamp END FROM pg_xact_commit_timestamp_origin({alias}.xmin) o)",
                    crate::config::quote_literal(origin)
                ),
                "(timestamptz '2000-01-01 00:00:00+00' + u.ts * interval '1 microsecond')".to_string(),
            )),
            Version::None => None,
        };
        match column {
            Some((l, r)) => format!(
                "CASE WHEN {alias}.present THEN CASE WHEN {l} IS NULL AND {r} IS NULL THEN 0 \
                 WHEN {l} IS NULL THEN -1 WHEN {r} IS NULL THEN 1 WHEN {l} < {r} THEN -1 \
                 WHEN {l} > {r} THEN 1 ELSE 0 END END::int4"
            ),
            None => "NULL::int4".into(),
        }
    };
    // Other unique constraints whose columns all arrive: a different row holding the same values.
    let collisions: Vec<&Vec<usize>> = if op == Op::Delete {
        Vec::new()
    } else {
        t.unique
            .iter()
            .filter(|u| u.iter().all(|c| cols.contains(c)))
            .collect()
    };
    let key_cols: Vec<String> = t.key.iter().map(|&k| format!("t.{}", col(k))).collect();
    let key_vals: Vec<String> = key
        .iter()
        .map(|(c, v)| format!("{v}::{}", ty(*c)))
        .collect();
    // A row the batch itself rewrites is no collision: the lookup sees the target before the
    // batch, and a batch of a swap (row 1 takes row 2's value, row 2 row 1's) found each row
    // colliding with the other, and a policy's resolution deleted both. A collision left with
    // the batch's write is refused there, and that transaction is applied change by change.
    let batch_keys = {
        let (arrays, pairs): (Vec<String>, Vec<(String, String)>) = t
            .key
            .iter()
            .enumerate()
            .filter_map(|(i, &k)| {
                let p = cols.iter().position(|&c| c == k)?;
                Some((
                    format!("${}::text[]", p + 1),
                    (format!("t.{}", col(k)), format!("b.k{i}::{}", ty(k))),
                ))
            })
            .unzip();
        let names: Vec<String> = (0..arrays.len()).map(|i| format!("k{i}")).collect();
        let (ts, bs): (Vec<String>, Vec<String>) = pairs.into_iter().unzip();
        format!(
            "NOT EXISTS (SELECT 1 FROM unnest({}) AS b({}) WHERE ({}) = ({}))",
            arrays.join(", "),
            names.join(", "),
            ts.join(", "),
            bs.join(", ")
        )
    };
    let mut joins = String::new();
    let (mut c_json, mut c_key, mut c_version) = (Vec::new(), Vec::new(), Vec::new());
    for (j, u) in collisions.iter().enumerate() {
        let same: Vec<String> = u
            .iter()
            .map(|&c| {
                let p = cols.iter().position(|&x| x == c).expect("filtered above");
                format!("t.{} = u.v{}::{}", col(c), p + 1, ty(c))
            })
            .collect();
        let version_field = version_col
            .map(|(c, _)| format!(", t.{} AS f{c}", col(c)))
            .unwrap_or_default();
        joins.push_str(&format!(
            " LEFT JOIN LATERAL (SELECT true AS present, t AS r{version_field}, t.xmin AS xmin FROM {} AS t \
             WHERE {} AND ({}) IS DISTINCT FROM ({}) AND {batch_keys} LIMIT 1 FOR UPDATE) y{j} ON true",
            t.rows(),
            same.join(" AND "),
            key_cols.join(", "),
            key_vals.join(", ")
        ));
        c_json.push(format!("to_jsonb(y{j}.r)::text"));
        let keys: Vec<String> = t
            .key
            .iter()
            .map(|&k| format!("(y{j}.r).{}::text", col(k)))
            .collect();
        c_key.push(format!(
            "CASE WHEN y{j}.present THEN ARRAY[{}]::text[] END",
            keys.join(", ")
        ));
        c_version.push(format!(
            "CASE WHEN y{j}.present THEN {} END",
            version_cmp(&format!("y{j}"))
        ));
    }
    let first = |v: Vec<String>, null: &str| {
        if v.is_empty() {
            null.to_string()
        } else {
            format!("coalesce({})", v.join(", "))
        }
    };
    let collision_cols = format!(
        "{}, {}, {}",
        first(c_json, "NULL::text"),
        first(c_key, "NULL::text[]"),
        first(c_version, "NULL::int4")
    );
    let version_cmp = version_cmp("x");
    let remote = if op == Op::Delete {
        format!(
            "CASE WHEN u.has_old THEN {} ELSE {} END",
            as_json(&old),
            as_json(&key)
        )
    } else {
        as_json(&incoming)
    };
    let detail_cols = if details {
        let local_vals: Vec<String> = cols.iter().map(|&c| format!("x.f{c}::text")).collect();
        format!(
            "CASE WHEN x.present THEN to_jsonb(x.r)::text END, \
             CASE WHEN x.present THEN ARRAY[{}]::text[] END, {}, {remote}",
            local_vals.join(", "),
            as_json(&key)
        )
    } else {
        "NULL::text, NULL::text[], NULL::text, NULL::text".to_string()
    };
    // The target row's columns one by one: each `(x.r).c` of a whole-row value would take its
    // row apart again (a lookup over 2,000 rows at a time took 15% longer so).
    let mut fields: Vec<usize> = cols.iter().chain(old_cols).copied().collect();
    fields.sort_unstable();
    fields.dedup();
    let mut x_cols: Vec<String> = fields
        .iter()
        .map(|&c| format!("t.{} AS f{c}", col(c)))
        .collect();
    if details {
        x_cols.push("t AS r".into());
    }
    format!(
        "SELECT x.present IS NOT NULL, coalesce(x.present AND {}, false), \
         CASE WHEN x.present AND u.has_old THEN {} END, ({version_cmp})::int4, \
         {detail_cols}, {collision_cols}, \
         coalesce(x.xmin = pg_current_xact_id_if_assigned()::xid, false) \
         FROM unnest({}) WITH ORDINALITY AS u({}) \
         LEFT JOIN LATERAL (SELECT true AS present, {}, t.xmin AS xmin FROM {} AS t WHERE {} FOR UPDATE) x ON true{joins} \
         ORDER BY u.ord",
        same(incoming.clone()),
        same(old),
        params.join(", "),
        aliases.join(", "),
        x_cols.join(", "),
        t.rows(),
        key_match.join(" AND ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apply::plan::TargetColumn;
    use crate::config::TableName;

    fn table() -> TargetTable {
        let c = |n: &str, ty: &str, ia| TargetColumn {
            name: n.into(),
            type_sql: ty.into(),
            cast_sql: ty.into(),
            generated: false,
            identity_always: ia,
            equality: true,
            indexed: n == "note",
            respelled: false,
        };
        TargetTable {
            name: TableName::new("public", "Jobs"),
            columns: vec![
                c("id", "bigint", true),
                c("note", "text", false),
                c("n", "numeric(10,2)", false),
            ],
            key: vec![0],
            unique: vec![],
            former: vec![],
            inherited: false,
            referenced: false,
            partitioned: false,
            tree: false,
        }
    }

    #[test]
    fn upsert_casts_each_column_and_overrides_identity() {
        assert_eq!(
            statement(&table(), Op::Upsert, &[0, 1, 2], Existing::Replace).unwrap(),
            "INSERT INTO \"public\".\"Jobs\" AS t (\"id\", \"note\", \"n\") OVERRIDING SYSTEM VALUE \
             SELECT u.v1::bigint, u.v2::text, u.v3::numeric(10,2) FROM unnest($1::int8[], $2::text[], $3::text[]) \
             AS u(v1, v2, v3) ON CONFLICT (\"id\") DO UPDATE SET \"note\" = EXCLUDED.\"note\", \"n\" = EXCLUDED.\"n\""
        );
    }

    #[test]
    fn an_upsert_meets_a_row_at_its_key_as_asked() {
        let t = table();
        let text = |e| statement(&t, Op::Upsert, &[0, 1, 2], e).unwrap();
        let replace = text(Existing::Replace);
        let (insert, _) = replace.split_once(" ON CONFLICT").unwrap();
        assert_eq!(text(Existing::Fail), insert);
        assert_eq!(
            text(Existing::Keep),
            format!("{insert} ON CONFLICT (\"id\") DO NOTHING")
        );
    }

    #[test]
    fn a_key_whose_equal_values_may_be_spelled_otherwise_is_set_too() {
        let mut t = table();
        t.columns[0].identity_always = false;
        t.columns[0].respelled = true;
        let upsert = statement(&t, Op::Upsert, &[0, 1], Existing::Replace).unwrap();
        assert!(
            upsert.ends_with(
                "ON CONFLICT (\"id\") DO UPDATE SET \"id\" = EXCLUDED.\"id\", \"note\" = EXCLUDED.\"note\""
            ),
            "{upsert}"
        );
        let update = statement(&t, Op::Update, &[0, 1], Existing::Replace).unwrap();
        assert!(
            update.starts_with(
                "UPDATE \"public\".\"Jobs\" AS t SET \"id\" = u.v1::bigint, \"note\" ="
            ),
            "{update}"
        );
    }

    #[test]
    fn partial_update_sets_only_sent_columns() {
        assert_eq!(
            statement(&table(), Op::Update, &[0, 2], Existing::Replace).unwrap(),
            "UPDATE \"public\".\"Jobs\" AS t SET \"n\" = u.v2::numeric(10,2) FROM unnest($1::int8[], $2::text[]) \
             AS u(v1, v2) WHERE t.\"id\" = u.v1::bigint"
        );
        assert_eq!(
            statement(&table(), Op::Update, &[0], Existing::Replace),
            None
        );
    }

    #[test]
    fn a_key_change_moves_the_old_row_over_one_at_the_new_key() {
        // Columns: the new image (id, n), then the old key.
        assert_eq!(
            statement(&table(), Op::Rekey, &[0, 2, 0], Existing::Replace).unwrap(),
            "WITH gone AS (DELETE FROM \"public\".\"Jobs\" AS t USING unnest($1::int8[], $2::text[], $3::int8[]) \
             AS u(v1, v2, v3) WHERE t.\"id\" = u.v1::bigint AND NOT (t.\"id\" = u.v3::bigint) AND EXISTS (SELECT 1 FROM \"public\".\"Jobs\" AS x \
             WHERE x.\"id\" = u.v3::bigint) RETURNING 1) UPDATE \"public\".\"Jobs\" AS t SET \"id\" = u.v1::bigint, \
             \"n\" = u.v2::numeric(10,2) FROM unnest($1::int8[], $2::text[], $3::int8[]) AS u(v1, v2, v3), \
             (SELECT count(*) FROM gone) AS g WHERE t.\"id\" = u.v3::bigint"
        );
    }

    #[test]
    fn a_key_change_of_a_referenced_row_moves_it_or_upserts_the_new_image() {
        // (An identity column `GENERATED ALWAYS` can be updated only to its default: such a
        // key is not moved, see `Planner::update`.)
        let mut t = table();
        t.columns[0].identity_always = false;
        assert_eq!(
            statement(&t, Op::Move, &[0, 2, 0], Existing::Replace).unwrap(),
            "WITH gone AS (DELETE FROM \"public\".\"Jobs\" AS t USING unnest($1::int8[], $2::text[], $3::int8[]) \
             WITH ORDINALITY AS u(v1, v2, v3, ord) WHERE t.\"id\" = u.v1::bigint AND NOT (t.\"id\" = u.v3::bigint) AND EXISTS (SELECT 1 FROM \"public\".\"Jobs\" AS x \
             WHERE x.\"id\" = u.v3::bigint) RETURNING 1), moved AS (UPDATE \"public\".\"Jobs\" AS t SET \
             \"id\" = u.v1::bigint, \"n\" = u.v2::numeric(10,2) FROM unnest($1::int8[], $2::text[], $3::int8[]) \
             WITH ORDINALITY AS u(v1, v2, v3, ord), (SELECT count(*) FROM gone) AS g WHERE t.\"id\" = u.v3::bigint RETURNING u.ord) \
             INSERT INTO \"public\".\"Jobs\" AS t (\"id\", \"n\") SELECT u.v1::bigint, u.v2::numeric(10,2) \
             FROM unnest($1::int8[], $2::text[], $3::int8[]) WITH ORDINALITY AS u(v1, v2, v3, ord) \
             WHERE NOT EXISTS (SELECT 1 FROM moved AS m WHERE m.ord = u.ord) ON CONFLICT (\"id\") DO UPDATE SET \"n\" = EXCLUDED.\"n\""
        );
    }

    #[test]
    fn without_a_key_rows_insert_plainly_and_one_equal_row_is_changed_or_deleted() {
        let mut t = TargetTable {
            key: vec![],
            ..table()
        };
        t.columns.push(TargetColumn {
            name: "doc".into(),
            type_sql: "json".into(),
            cast_sql: "json".into(),
            generated: false,
            identity_always: false,
            equality: false,
            indexed: true,
            respelled: false,
        });
        assert_eq!(
            statement(&t, Op::Upsert, &[1, 3], Existing::Replace).unwrap(),
            "INSERT INTO \"public\".\"Jobs\" AS t (\"note\", \"doc\") SELECT u.v1::text, u.v2::json \
             FROM unnest($1::text[], $2::text[]) AS u(v1, v2)"
        );
        // `note` (indexed) through the index, by `=`, then by its text; `json` has no `=`: by its
        // text only, index or not.
        let one = |a: &str, b: &str| {
            format!(
                "CROSS JOIN LATERAL (SELECT x.tableoid AS rel, x.ctid AS tid FROM \"public\".\"Jobs\" AS x \
                 WHERE (x.\"note\" = u.{a}::text OR x.\"note\" IS NULL) AND \
                 x.\"note\" IS NOT DISTINCT FROM u.{a}::text AND x.\"note\"::text IS NOT DISTINCT FROM \
                 (u.{a}::text)::text AND x.\"doc\"::text IS NOT DISTINCT FROM (u.{b}::json)::text LIMIT 1) f \
                 WHERE t.tableoid = f.rel AND t.ctid = f.tid"
            )
        };
        assert_eq!(
            statement(&t, Op::Delete, &[1, 3], Existing::Replace).unwrap(),
            format!(
                "DELETE FROM \"public\".\"Jobs\" AS t USING unnest($1::text[], $2::text[]) AS u(v1, v2) {}",
                one("v1", "v2")
            )
        );
        // New values, then the old row's.
        assert_eq!(
            statement(&t, Op::Replace, &[1, 3, 1, 3], Existing::Replace).unwrap(),
            format!(
                "UPDATE \"public\".\"Jobs\" AS t SET \"note\" = u.v1::text, \"doc\" = u.v2::json \
                 FROM unnest($1::text[], $2::text[], $3::text[], $4::text[]) AS u(v1, v2, v3, v4) {}",
                one("v3", "v4")
            )
        );
    }

    #[test]
    fn conflict_lookup_reads_columns_one_by_one_and_builds_json_only_for_details() {
        let t = table();
        let statement = |details| {
            lookup(
                &t,
                Op::Upsert,
                &[0, 2],
                &[0, 1, 2],
                &Version::Column(2),
                details,
            )
        };
        let cheap = statement(false);
        assert_eq!(
            cheap,
            "SELECT x.present IS NOT NULL, coalesce(x.present AND x.f0::text IS NOT DISTINCT FROM (u.v1::bigint)::text \
             AND x.f2::text IS NOT DISTINCT FROM (u.v2::numeric(10,2))::text, false), \
             CASE WHEN x.present AND u.has_old THEN x.f0::text IS NOT DISTINCT FROM (u.o1::bigint)::text \
             AND x.f1::text IS NOT DISTINCT FROM (u.o2::text)::text AND x.f2::text IS NOT DISTINCT FROM (u.o3::numeric(10,2))::text END, \
             (CASE WHEN x.present THEN CASE WHEN x.f2 IS NULL AND u.v2::numeric(10,2) IS NULL THEN 0 \
             WHEN x.f2 IS NULL THEN -1 WHEN u.v2::numeric(10,2) IS NULL THEN 1 WHEN x.f2 < u.v2::numeric(10,2) THEN -1 \
             WHEN x.f2 > u.v2::numeric(10,2) THEN 1 ELSE 0 END END::int4)::int4, \
             NULL::text, NULL::text[], NULL::text, NULL::text, NULL::text, NULL::text[], NULL::int4, \
             coalesce(x.xmin = pg_current_xact_id_if_assigned()::xid, false) \
             FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::bool[]) WITH ORDINALITY \
             AS u(v1, v2, o1, o2, o3, has_old, ord) \
             LEFT JOIN LATERAL (SELECT true AS present, t.\"id\" AS f0, t.\"note\" AS f1, t.\"n\" AS f2, t.xmin AS xmin \
             FROM \"public\".\"Jobs\" AS t WHERE t.\"id\" = u.v1::bigint FOR UPDATE) x ON true ORDER BY u.ord"
        );
        // With details: the same statement, but for the target row (whole, and its values of the
        // batch's columns), the key and the incoming row.
        let details = statement(true);
        let json = |cols: &str| format!("(SELECT to_jsonb(j) FROM (SELECT {cols}) j)::text");
        let detail_cols = format!(
            "CASE WHEN x.present THEN to_jsonb(x.r)::text END, \
             CASE WHEN x.present THEN ARRAY[x.f0::text, x.f2::text]::text[] END, {}, {}",
            json("u.v1::bigint AS \"id\""),
            json("u.v1::bigint AS \"id\", u.v2::numeric(10,2) AS \"n\"")
        );
        assert!(details.contains(&detail_cols), "{details}");
        assert!(details.contains(", t AS r, t.xmin AS xmin"), "{details}");
        assert_eq!(
            details
                .replace(
                    &detail_cols,
                    "NULL::text, NULL::text[], NULL::text, NULL::text"
                )
                .replace(", t AS r", ""),
            cheap
        );
    }

    #[test]
    fn delete_matches_on_the_key() {
        assert_eq!(
            statement(&table(), Op::Delete, &[0], Existing::Replace).unwrap(),
            "DELETE FROM \"public\".\"Jobs\" AS t USING unnest($1::int8[]) AS u(v1) WHERE t.\"id\" = u.v1::bigint"
        );
    }
}
