//! Rows rewritten as a delete and an insert in one statement: how snapshot and repair give the
//! target's rows their source versions when those exchange values of a unique constraint.
//!
//! PostgreSQL checks a unique constraint that is not deferrable row by row as a statement writes,
//! so two rows swapping emails fail in any order of `UPDATE`s, and a value a row the target alone
//! has still holds fails the row taking it. Deleted and inserted again in one statement, the rows
//! hold their values for a moment nowhere, and a foreign key referencing them (`NO ACTION`, the
//! default) is checked at the statement's end, when the same keys are there again. A key with
//! `ON DELETE CASCADE` (or `SET NULL`, `SET DEFAULT`, `RESTRICT`) acts on the delete itself:
//! [`blocked_by`] names those, and the rows are then not rewritten.

use anyhow::{Context, Result};
use tokio_postgres::GenericClient;

use crate::apply::plan::TargetTable;
use crate::config::{quote_ident, TableName};

/// The statement: target rows (`t`) whose key `stage` has with other values, and those `also`
/// names (rows with no version to get, a condition on `t`), are deleted; the first are inserted
/// again from `stage` (its columns `written`, quoted; the target's other columns keep their
/// values). Returns one row: the rows deleted, and of them those inserted again. Rows `stage`
/// has that the target lacks are left to the statements after it.
pub fn statement(
    meta: &TargetTable,
    stage: &str,
    written: &[String],
    also: Option<&str>,
) -> String {
    let table = meta.name.quoted();
    let rows = meta.rows();
    let qualify = |p: &str, cols: &[String]| {
        cols.iter()
            .map(|c| format!("{p}.{c}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let kept: Vec<String> = meta
        .columns
        .iter()
        .filter(|c| !c.generated)
        .map(|c| quote_ident(&c.name))
        .filter(|c| !written.contains(c))
        .collect();
    let into: Vec<String> = written.iter().chain(&kept).cloned().collect();
    let overriding = match meta.columns.iter().any(|c| c.identity_always) {
        true => " OVERRIDING SYSTEM VALUE",
        false => "",
    };
    let also = also.map_or(String::new(), |a| format!(" OR ({a})"));
    let mut values = qualify("s", written);
    if !kept.is_empty() {
        values = format!("{values}, {}", qualify("g", &kept));
    }
    // The insert waits for the delete to finish (the count, a one-time filter, comes first):
    // reading `gone` row by row, it would write a row's new value while the row holding it is
    // not deleted yet.
    format!(
        "WITH gone AS (DELETE FROM {rows} t WHERE EXISTS (SELECT 1 FROM {stage} s WHERE {km_st} \
         AND ROW({ts})::text IS DISTINCT FROM ROW({ss})::text){also} RETURNING t.*), \
         back AS (INSERT INTO {table} ({into}){overriding} SELECT {values} FROM {stage} s \
         JOIN gone g ON {km_gs} WHERE (SELECT count(*) FROM gone) >= 0 RETURNING 1) \
         SELECT (SELECT count(*) FROM gone), (SELECT count(*) FROM back)",
        km_st = meta.key_match("s", "t"),
        ts = qualify("t", written),
        ss = qualify("s", written),
        into = into.join(", "),
        km_gs = meta.key_match("g", "s"),
    )
}

/// A condition on target rows `t`: the row holds, on one of the table's other unique
/// constraints whose columns are all `written`, the values a row of `stage` has.
pub fn holds_a_value_of(meta: &TargetTable, stage: &str, written: &[String]) -> Option<String> {
    let checks: Vec<String> = meta
        .unique
        .iter()
        .map(|u| u.iter().map(|&i| quote_ident(&meta.columns[i].name)))
        .map(|cols| cols.collect::<Vec<_>>())
        .filter(|cols| cols.iter().all(|c| written.contains(c)))
        .map(|cols| {
            let eq: Vec<String> = cols.iter().map(|c| format!("s.{c} = t.{c}")).collect();
            format!(
                "EXISTS (SELECT 1 FROM {stage} s WHERE {})",
                eq.join(" AND ")
            )
        })
        .collect();
    (!checks.is_empty()).then(|| checks.join(" OR "))
}

/// The foreign keys referencing `table` on `c` that act on a deleted row (the constraint, its
/// table and action): a rewrite would set them off.
pub async fn blocked_by(c: &impl GenericClient, table: &TableName) -> Result<Vec<String>> {
    Ok(c.query(
        "SELECT format('%s of %s (ON DELETE %s)', k.conname, k.conrelid::regclass, \
             CASE k.confdeltype WHEN 'c' THEN 'CASCADE' WHEN 'n' THEN 'SET NULL' \
             WHEN 'd' THEN 'SET DEFAULT' ELSE 'RESTRICT' END) \
             FROM pg_constraint k WHERE k.contype = 'f' AND k.confdeltype <> 'a' \
             AND k.confrelid = $1::text::regclass ORDER BY 1",
        &[&table.quoted()],
    )
    .await
    .with_context(|| format!("reading the foreign keys referencing {table}"))?
    .iter()
    .map(|r| r.get(0))
    .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apply::plan::model::text_column as column;

    fn users() -> TargetTable {
        TargetTable {
            name: TableName::new("public", "users"),
            columns: vec![
                column("id", false),
                column("email", false),
                column("local", false),
                column("upper", true),
            ],
            key: vec![0],
            unique: vec![vec![1], vec![1, 2]],
            former: vec![],
            inherited: false,
            referenced: false,
            partitioned: false,
            tree: false,
        }
    }

    #[test]
    fn the_target_keeps_its_own_columns_and_never_writes_generated_ones() {
        let written = [quote_ident("id"), quote_ident("email")];
        let sql = statement(&users(), "pg_temp.st", &written, Some("x"));
        assert!(
            sql.contains(
                r#"INSERT INTO "public"."users" ("id", "email", "local") SELECT s."id", s."email", g."local""#
            ),
            "{sql}"
        );
        assert!(sql.contains("::text) OR (x) RETURNING t.*"), "{sql}");
        assert!(!sql.contains("upper"), "{sql}");
    }

    #[test]
    fn only_constraints_of_written_columns_say_who_holds_a_value() {
        let written = [quote_ident("id"), quote_ident("email")];
        assert_eq!(
            holds_a_value_of(&users(), "st", &written).as_deref(),
            Some(r#"EXISTS (SELECT 1 FROM st s WHERE s."email" = t."email")"#)
        );
        assert_eq!(holds_a_value_of(&users(), "st", &written[..1]), None);
    }
}
