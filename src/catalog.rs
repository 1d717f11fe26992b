//! What a database's catalog says about the configured tables.

use anyhow::{Context, Result};
use tokio_postgres::GenericClient;

use crate::apply::plan::{TargetColumn, TargetTable};
use crate::config::TableName;

/// Columns and key of `name`, or `None` when there is no such table.
pub async fn table(c: &impl GenericClient, name: &TableName) -> Result<Option<TargetTable>> {
    let rows = c
        .query(
            "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), a.attgenerated <> '', \
                    a.attidentity = 'a', coalesce((SELECT o FROM unnest(k.indkey) WITH ORDINALITY AS u(att, o) \
                                   WHERE u.att = a.attnum), 0)::int4, a.attnum::int4, \
                    EXISTS (SELECT 1 FROM pg_opclass oc JOIN pg_am am ON am.oid = oc.opcmethod \
                            JOIN pg_type ty ON ty.oid = a.atttypid WHERE am.amname = 'btree' \
                            AND oc.opcdefault AND oc.opcintype = CASE WHEN ty.typtype = 'd' \
                            THEN ty.typbasetype ELSE ty.oid END), \
                    EXISTS (SELECT 1 FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid \
                            JOIN pg_am am ON am.oid = ic.relam WHERE i.indrelid = c.oid \
                            AND am.amname = 'btree' AND i.indpred IS NULL AND i.indkey[0] = a.attnum) \
             FROM pg_class c \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped \
             LEFT JOIN LATERAL (SELECT i.indkey FROM pg_index i WHERE i.indrelid = c.oid \
                                AND (i.indisprimary OR i.indisreplident) \
                                ORDER BY i.indisprimary DESC LIMIT 1) k ON true \
             WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p') \
             ORDER BY a.attnum",
            &[&name.schema, &name.name],
        )
        .await
        .with_context(|| format!("reading the catalog entry of {name}"))?;
    if rows.is_empty() {
        return Ok(None);
    }
    let mut key: Vec<(i32, usize)> = Vec::new();
    let columns = rows
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let pos: i32 = r.get(4);
            if pos > 0 {
                key.push((pos, i));
            }
            TargetColumn {
                name: r.get(0),
                type_sql: r.get(1),
                generated: r.get(2),
                identity_always: r.get(3),
                equality: r.get(6),
                indexed: r.get(7),
            }
        })
        .collect();
    key.sort();
    let key: Vec<usize> = key.into_iter().map(|(_, i)| i).collect();
    let attnums: Vec<i32> = rows.iter().map(|r| r.get(5)).collect();
    // Other unique constraints on plain columns (no expression, no predicate, not deferrable):
    // where an incoming row may collide with a different row.
    let mut unique = Vec::new();
    for r in c
        .query(
            "SELECT i.indkey::int2[] FROM pg_index i WHERE i.indrelid = $1::text::regclass \
             AND i.indisunique AND i.indimmediate AND i.indpred IS NULL AND i.indexprs IS NULL \
             ORDER BY i.indexrelid",
            &[&name.quoted()],
        )
        .await?
    {
        let cols: Option<Vec<usize>> = r
            .get::<_, Vec<i16>>(0)
            .iter()
            .map(|&n| attnums.iter().position(|&a| a == n as i32))
            .collect();
        if let Some(mut cols) = cols {
            let mut sorted_key = key.clone();
            sorted_key.sort();
            cols.sort();
            if cols != sorted_key && !unique.contains(&cols) {
                unique.push(cols);
            }
        }
    }
    Ok(Some(TargetTable {
        name: name.clone(),
        columns,
        key,
        unique,
    }))
}

/// Expand `schema.*` patterns into the ordinary tables of that schema; plain names pass through.
pub async fn expand(c: &impl GenericClient, patterns: &[TableName]) -> Result<Vec<TableName>> {
    let mut out: Vec<TableName> = Vec::new();
    for p in patterns {
        if p.is_wildcard() {
            let rows = c
                .query(
                    "SELECT c.relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                     WHERE n.nspname = $1 AND c.relkind IN ('r', 'p') AND NOT c.relispartition \
                     ORDER BY 1",
                    &[&p.schema],
                )
                .await?;
            for r in rows {
                let t = TableName::new(&p.schema, r.get::<_, String>(0));
                if !out.contains(&t) {
                    out.push(t);
                }
            }
        } else if !out.contains(p) {
            out.push(p.clone());
        }
    }
    Ok(out)
}
