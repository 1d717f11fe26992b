//! What a database's catalog says about the configured tables.

use anyhow::{Context, Result};
use tokio_postgres::GenericClient;

use crate::apply::plan::{TargetColumn, TargetTable};
use crate::config::TableName;

/// Columns and key of `name`, or `None` when there is no such table. A `DEFERRABLE` primary key
/// is no key: PostgreSQL takes it neither as the replica identity (a published table without
/// another then refuses its application's updates and deletes) nor as an `ON CONFLICT` arbiter.
pub async fn table(c: &impl GenericClient, name: &TableName) -> Result<Option<TargetTable>> {
    let rows = c
        .query(
            &format!("SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), a.attgenerated <> '', \
                    a.attidentity = 'a', coalesce((SELECT o FROM unnest(k.indkey) WITH ORDINALITY AS u(att, o) \
                                   WHERE u.att = a.attnum), 0)::int4, a.attnum::int4, \
                    EXISTS (SELECT 1 FROM pg_opclass oc JOIN pg_am am ON am.oid = oc.opcmethod \
                            JOIN pg_type ty ON ty.oid = a.atttypid WHERE am.amname = 'btree' \
                            AND oc.opcdefault AND oc.opcintype = CASE WHEN ty.typtype = 'd' \
                            THEN ty.typbasetype ELSE ty.oid END), \
                    EXISTS (SELECT 1 FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid \
                            JOIN pg_am am ON am.oid = ic.relam WHERE i.indrelid = c.oid \
                            AND am.amname = 'btree' AND i.indpred IS NULL AND i.indkey[0] = a.attnum), \
                    c.oid, {INHERITED}, format_type(a.atttypid, -1), \
                    coalesce((SELECT NOT co.collisdeterministic FROM pg_collation co \
                              WHERE co.oid = a.attcollation), false) \
                    OR EXISTS (SELECT 1 FROM pg_type ty LEFT JOIN pg_type b ON b.oid = ty.typbasetype \
                               WHERE ty.oid = a.atttypid AND ('citext' IN (ty.typname, b.typname) \
                               OR coalesce(b.oid, ty.oid) IN ('numeric'::regtype, 'float4'::regtype, \
                                                             'float8'::regtype, 'interval'::regtype))), \
                    EXISTS (SELECT 1 FROM pg_constraint f WHERE f.contype = 'f' AND f.confrelid = c.oid), \
                    c.relkind = 'p', \
                    EXISTS (SELECT 1 FROM pg_constraint f WHERE f.contype = 'f' AND f.confrelid = c.oid \
                            AND f.conrelid = c.oid AND f.confupdtype IN ('c', 'n', 'd')) \
             FROM pg_class c \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped \
             LEFT JOIN LATERAL (SELECT i.indkey FROM pg_index i WHERE i.indrelid = c.oid \
                                AND (i.indisprimary OR i.indisreplident) AND i.indimmediate \
                                ORDER BY i.indisprimary DESC LIMIT 1) k ON true \
             WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p') \
             ORDER BY a.attnum"),
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
                cast_sql: r.get(10),
                generated: r.get(2),
                identity_always: r.get(3),
                equality: r.get(6),
                indexed: r.get(7),
                respelled: r.get(11),
            }
        })
        .collect();
    key.sort();
    let key: Vec<usize> = key.into_iter().map(|(_, i)| i).collect();
    let attnums: Vec<i32> = rows.iter().map(|r| r.get(5)).collect();
    // By the OID this read found, not the name again: a table dropped meanwhile (`tandem ddl` on
    // the other side's stream) then has no indexes, where a `regclass` cast of its name failed.
    let (oid, inherited): (u32, bool) = (rows[0].get(8), rows[0].get(9));
    let referenced: bool = rows[0].get(12);
    let partitioned: bool = rows[0].get(13);
    let tree: bool = rows[0].get(14);
    // Other unique constraints on plain columns (no expression, no predicate, not deferrable):
    // where an incoming row may collide with a different row.
    let mut unique = Vec::new();
    for r in c
        .query(
            "SELECT i.indkey::int2[] FROM pg_index i WHERE i.indrelid = $1 \
             AND i.indisunique AND i.indimmediate AND i.indpred IS NULL AND i.indexprs IS NULL \
             ORDER BY i.indexrelid",
            &[&oid],
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
        former: vec![],
        inherited,
        referenced,
        partitioned,
        tree,
    }))
}

/// [`inherited`] of `pg_class c`.
const INHERITED: &str =
    "(c.relkind = 'r' AND EXISTS (SELECT 1 FROM pg_inherits i WHERE i.inhparent = c.oid))";

/// Do other tables inherit from `name` (`INHERITS`; partitions are not counted)? Its own rows are
/// then `ONLY` it: a query of it reads theirs too, an `UPDATE` or `DELETE` writes theirs, while
/// logical decoding sends each table's changes under its own name (native's table sync, too,
/// copies each table of such a tree by itself). Before, a repair or snapshot of the parent wrote
/// a child's rows into the parent a second time, and verify counted them under both.
pub async fn inherited(c: &impl GenericClient, name: &TableName) -> Result<bool> {
    Ok(c.query_one(
        &format!("SELECT {INHERITED} FROM pg_class c WHERE c.oid = $1::text::regclass"),
        &[&name.quoted()],
    )
    .await
    .with_context(|| format!("reading whether tables inherit from {name}"))?
    .get(0))
}

/// Expand `schema.*` patterns into the ordinary tables of that schema; plain names pass through.
/// A pattern leaves unlogged tables out, as a publication `FOR TABLES IN SCHEMA` does: their
/// changes are not logged, so there is nothing to replicate (`setup` warns of them).
pub async fn expand(c: &impl GenericClient, patterns: &[TableName]) -> Result<Vec<TableName>> {
    let mut out: Vec<TableName> = Vec::new();
    for p in patterns {
        if p.is_wildcard() {
            let rows = c
                .query(
                    "SELECT c.relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                     WHERE n.nspname = $1 AND c.relkind IN ('r', 'p') AND NOT c.relispartition \
                     AND c.relpersistence = 'p' \
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

/// Of `tables`, those whose row-level security applies to this session's role, as a problem
/// naming them and the fix; `None` when it applies to none. Its policies would hide rows from the
/// snapshot's and verify's reads (a copy without them, "in sync" over what the role sees) and
/// refuse rows replication writes: the sides would differ unsaid. PostgreSQL's own apply worker
/// refuses such a table too.
pub async fn row_security(
    c: &impl GenericClient,
    side: crate::side::Side,
    tables: &[TableName],
) -> Result<Option<String>> {
    let quoted: Vec<String> = tables.iter().map(TableName::quoted).collect();
    let rows = c
        .query(
            "SELECT current_user::text, o::int4 FROM unnest($1::text[]) WITH ORDINALITY AS u(t, o) \
             WHERE to_regclass(t) IS NOT NULL AND row_security_active(t) ORDER BY o",
            &[&quoted],
        )
        .await
        .context("reading the tables' row-level security")?;
    let Some(first) = rows.first() else {
        return Ok(None);
    };
    let role: String = first.get(0);
    let hidden: Vec<String> = rows
        .iter()
        .map(|r| tables[r.get::<_, i32>(1) as usize - 1].to_string())
        .collect();
    Ok(Some(format!(
        "{side}: row-level security applies to role {role} on {}: its policies would hide rows \
         from tandem's reads and refuse rows it writes, and the sides would differ unnoticed; \
         connect as a role that bypasses it (`ALTER ROLE {role} BYPASSRLS`), or as the owner of \
         the table without FORCE ROW LEVEL SECURITY",
        hidden.join(", ")
    )))
}

/// Columns of `tables` that may hold large objects' OIDs (of type `oid`, or a domain over it such
/// as the `lo` extension's), as warnings: logical decoding writes no large object, so the other
/// side would get the number and never the object (or find another object under it). pg_dump
/// copies them; native logical replication and pglogical do not either.
pub async fn large_object_columns(
    c: &impl GenericClient,
    tables: &[TableName],
) -> Result<Vec<String>> {
    let quoted: Vec<String> = tables.iter().map(TableName::quoted).collect();
    let rows = c
        .query(
            "SELECT u.o::int4, a.attname::text, format_type(a.atttypid, a.atttypmod) \
             FROM unnest($1::text[]) WITH ORDINALITY AS u(t, o) \
             JOIN pg_attribute a ON a.attrelid = to_regclass(u.t) AND a.attnum > 0 AND NOT a.attisdropped \
             JOIN pg_type ty ON ty.oid = a.atttypid \
             WHERE 'oid'::regtype IN (ty.oid, ty.typbasetype) ORDER BY u.o, a.attnum",
            &[&quoted],
        )
        .await
        .context("reading the tables' columns of type oid")?;
    Ok(rows
        .iter()
        .map(|r| {
            let t = &tables[r.get::<_, i32>(0) as usize - 1];
            let (column, ty): (String, String) = (r.get(1), r.get(2));
            format!(
                "column {column} of {t} is of type {ty}: if it holds large objects \
                 (`lo_import`, `lo_from_bytea`), their contents do not replicate (logical \
                 decoding writes none), only the numbers naming them, which name nothing on the \
                 other side (or another object there); keep such contents in a `bytea` column"
            )
        })
        .collect())
}

/// Whether this session's role may set `session_replication_role` (superuser, or PostgreSQL
/// 15's `GRANT SET ON PARAMETER`): probed, not derived. tandem's writing sessions set it where
/// they may, as PostgreSQL's own apply worker does.
pub async fn may_replica(c: &tokio_postgres::Client) -> Result<bool> {
    let may = c
        .batch_execute("BEGIN; SET LOCAL session_replication_role = replica; ROLLBACK")
        .await
        .is_ok();
    if !may {
        // The refused SET left the transaction open, aborted.
        c.batch_execute("ROLLBACK").await?;
    }
    Ok(may)
}

/// The rules on `tables` that break tandem's writes there, as problems naming the fix. Rules
/// rewrite a statement before it runs (PostgreSQL's own apply worker bypasses them), and
/// PostgreSQL refuses `INSERT … ON CONFLICT`, which tandem applies rows with, on a table with an
/// UPDATE rule (even a disabled one) or an INSERT rule that fires, and a data-modifying `WITH`
/// (a key change) on one with a DELETE rule that fires: `run` stopped at the table's first row.
/// An INSERT or DELETE rule fires for tandem's writes as a trigger does: not when the role may
/// set `session_replication_role` ([`may_replica`]) unless `ENABLE REPLICA` or `ALWAYS`.
pub async fn rules(
    c: &tokio_postgres::Client,
    side: crate::side::Side,
    tables: &[TableName],
) -> Result<Vec<String>> {
    let replica = may_replica(c).await?;
    let quoted: Vec<String> = tables.iter().map(TableName::quoted).collect();
    let rows = c
        .query(
            "SELECT o::int4, r.rulename::text, r.ev_type::text, r.ev_enabled::text \
             FROM unnest($1::text[]) WITH ORDINALITY AS u(t, o) \
             JOIN pg_rewrite r ON r.ev_class = to_regclass(u.t) \
             WHERE r.ev_type IN ('2', '3', '4') ORDER BY o, r.rulename",
            &[&quoted],
        )
        .await
        .context("reading the tables' rules")?;
    let mut problems = Vec::new();
    for r in rows {
        let t = &tables[r.get::<_, i32>(0) as usize - 1];
        let (name, event, enabled): (String, String, String) = (r.get(1), r.get(2), r.get(3));
        let fires = match enabled.as_str() {
            "A" => true,
            "R" => replica,
            "O" => !replica,
            _ => false,
        };
        // Only an ordinary rule stops firing under `session_replication_role = replica`.
        let helps = enabled == "O" && !replica;
        let rule = format!("{side}: rule {name} on {t}");
        let fix = "replace it with a trigger or drop it";
        problems.push(match event.as_str() {
            "2" => format!(
                "{rule} is an UPDATE rule, and PostgreSQL refuses INSERT … ON CONFLICT, which \
                 tandem applies rows with, on a table with one (even disabled); {fix}"
            ),
            _ if !fires => continue,
            "3" => format!(
                "{rule} is an INSERT rule that fires for tandem's writes, and PostgreSQL refuses \
                 INSERT … ON CONFLICT, which tandem applies rows with, on a table with one; {fix}{}",
                replica_fix(helps)
            ),
            _ => format!(
                "{rule} is a DELETE rule that fires for tandem's writes: it rewrites the deletes \
                 tandem applies, and PostgreSQL refuses the statement tandem changes a key with \
                 on a table with one; {fix}{}",
                replica_fix(helps)
            ),
        });
    }
    Ok(problems)
}

/// The other way out of a rule that fires for tandem's writes only because its role may not
/// set `session_replication_role` (`helps`).
fn replica_fix(helps: bool) -> &'static str {
    match helps {
        false => "",
        true => {
            ", or let tandem's role set session_replication_role (as a superuser, `GRANT SET ON \
             PARAMETER session_replication_role TO` the role), under which an ordinary rule does \
             not fire for replicated rows, as in PostgreSQL's own replication"
        }
    }
}

/// The type under a column's type `ty_oid` once domains and arrays are taken off (an array of a
/// domain of an enum: the enum), as `base.oid` and `base.typtype`: FROM-clause SQL over
/// `pg_type`s `t1` to `base`.
const UNDERLYING: &str = "JOIN pg_type t1 ON t1.oid = {ty} \
     JOIN pg_type t2 ON t2.oid = CASE WHEN t1.typtype = 'd' THEN t1.typbasetype ELSE t1.oid END \
     JOIN pg_type t3 ON t3.oid = CASE WHEN t2.typelem <> 0 AND t2.typlen = -1 THEN t2.typelem \
                                      ELSE t2.oid END \
     JOIN pg_type base ON base.oid = CASE WHEN t3.typtype = 'd' THEN t3.typbasetype ELSE t3.oid END";

/// The enum type of each enum column of `t` (an array or domain of an enum too), as
/// `format_type` writes it, and its labels in order, by column name.
pub async fn enum_labels(
    c: &impl GenericClient,
    t: &TableName,
) -> Result<std::collections::BTreeMap<String, (String, Vec<String>)>> {
    let sql = format!(
        "SELECT a.attname::text, format_type(base.oid, NULL), \
                array(SELECT e.enumlabel::text FROM pg_enum e WHERE e.enumtypid = base.oid \
                      ORDER BY e.enumsortorder) \
         FROM pg_attribute a {} \
         WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped \
           AND base.typtype = 'e'",
        UNDERLYING.replace("{ty}", "a.atttypid")
    );
    let rows = c
        .query(&sql, &[&t.quoted()])
        .await
        .with_context(|| format!("reading the enum labels of {t}"))?;
    Ok(rows
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect())
}

/// A composite type as `format_type` names it, with its attributes (name, type) in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Composite {
    pub name: String,
    pub attributes: Vec<(String, String)>,
}

/// Each column of `t` of a composite type (an array or domain of one too), by name: the type,
/// then the composite types its attributes hold in turn. A composite value crosses as text, its
/// fields by position.
pub async fn composites(
    c: &impl GenericClient,
    t: &TableName,
) -> Result<std::collections::BTreeMap<String, Vec<Composite>>> {
    let under = |ty: &str| UNDERLYING.replace("{ty}", ty);
    let cols = c
        .query(
            &format!(
                "SELECT a.attname::text, base.oid FROM pg_attribute a {} \
                 WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped \
                   AND base.typtype = 'c'",
                under("a.atttypid")
            ),
            &[&t.quoted()],
        )
        .await
        .with_context(|| format!("reading the composite types of {t}"))?;
    let attrs_sql = format!(
        "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), \
                CASE WHEN base.typtype = 'c' THEN base.oid END, format_type($1::oid, NULL) \
         FROM pg_type ty JOIN pg_attribute a ON a.attrelid = ty.typrelid \
              AND a.attnum > 0 AND NOT a.attisdropped {} \
         WHERE ty.oid = $1::oid ORDER BY a.attnum",
        under("a.atttypid")
    );
    let mut out = std::collections::BTreeMap::new();
    for r in cols {
        let (col, oid): (String, u32) = (r.get(0), r.get(1));
        // Each composite type under this column once (the bound is for safety: PostgreSQL
        // refuses a type that holds itself).
        let (mut todo, mut seen, mut types) = (vec![oid], Vec::new(), Vec::new());
        while let Some(ty) = todo.pop() {
            if seen.contains(&ty) || seen.len() > 32 {
                continue;
            }
            seen.push(ty);
            let rows = c.query(&attrs_sql, &[&ty]).await?;
            let name = match rows.first() {
                Some(r) => r.get(3),
                None => c
                    .query_one("SELECT format_type($1::oid, NULL)", &[&ty])
                    .await?
                    .get(0),
            };
            let held: Vec<u32> = rows.iter().filter_map(|r| r.get(2)).collect();
            todo.extend(held.into_iter().rev());
            types.push(Composite {
                name,
                attributes: rows.iter().map(|r| (r.get(0), r.get(1))).collect(),
            });
        }
        out.insert(col, types);
    }
    Ok(out)
}

/// The foreign keys between tables on `c`, as (referencing, referenced); a table referencing
/// itself is left out. A partitioned table's keys count once, as its own, not its partitions'.
pub async fn references(c: &impl GenericClient) -> Result<Vec<(TableName, TableName)>> {
    let rows = c
        .query(
            "SELECT rn.nspname::text, r.relname::text, fn.nspname::text, f.relname::text \
             FROM pg_constraint k \
             JOIN pg_class r ON r.oid = k.conrelid JOIN pg_namespace rn ON rn.oid = r.relnamespace \
             JOIN pg_class f ON f.oid = k.confrelid JOIN pg_namespace fn ON fn.oid = f.relnamespace \
             WHERE k.contype = 'f' AND k.conparentid = 0 AND k.conrelid <> k.confrelid",
            &[],
        )
        .await
        .context("reading the foreign keys")?;
    Ok(rows
        .iter()
        .map(|r| {
            (
                TableName::new(r.get::<_, String>(0), r.get::<_, String>(1)),
                TableName::new(r.get::<_, String>(2), r.get::<_, String>(3)),
            )
        })
        .collect())
}

/// `tables` in [`referenced_first`] order by the foreign keys of both sides.
pub async fn reference_order(
    tables: Vec<TableName>,
    d: &impl GenericClient,
    m: &impl GenericClient,
) -> Result<Vec<TableName>> {
    Ok(referenced_first(tables, &references_on_both(d, m).await?))
}

async fn references_on_both(
    d: &impl GenericClient,
    m: &impl GenericClient,
) -> Result<Vec<(TableName, TableName)>> {
    let mut refs = references(d).await?;
    refs.extend(references(m).await?);
    Ok(refs)
}

/// Those of `tables` that another of them references, by the foreign keys of either side.
pub async fn referenced_within(
    tables: &[TableName],
    d: &impl GenericClient,
    m: &impl GenericClient,
) -> Result<Vec<TableName>> {
    let refs = references_on_both(d, m).await?;
    Ok(tables
        .iter()
        .filter(|t| {
            refs.iter()
                .any(|(from, to)| to == *t && tables.contains(from))
        })
        .cloned()
        .collect())
}

/// `tables`, each after the ones it references (`refs`, as [`references`] gives them), so that
/// rows copied one table at a time find the rows they reference already there; otherwise in the
/// order given. Tables that reference each other round a cycle keep the order given.
pub fn referenced_first(tables: Vec<TableName>, refs: &[(TableName, TableName)]) -> Vec<TableName> {
    let mut left = tables;
    let mut out = Vec::with_capacity(left.len());
    while !left.is_empty() {
        // The first table whose referenced tables (among those left) are all placed. Round a
        // cycle none is: then the first one that a table left references, a table of the cycle
        // rather than one that only references into it.
        let waits = |t: &TableName| {
            refs.iter()
                .any(|(from, to)| from == t && to != t && left.contains(to))
        };
        let referenced = |t: &TableName| {
            refs.iter()
                .any(|(from, to)| to == t && from != t && left.contains(from))
        };
        let next = left
            .iter()
            .position(|t| !waits(t))
            .or_else(|| left.iter().position(referenced))
            .unwrap_or(0);
        out.push(left.remove(next));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(name: &str) -> TableName {
        TableName::new("public", name)
    }

    #[test]
    fn referenced_tables_come_first_and_the_rest_keeps_its_order() {
        let refs = [
            (t("child"), t("parent")),
            (t("grandchild"), t("child")),
            (t("child"), t("other")),
            (t("audit"), t("unconfigured")),
        ];
        let tables = ["audit", "child", "grandchild", "other", "parent", "plain"].map(t);
        assert_eq!(
            referenced_first(tables.to_vec(), &refs),
            ["audit", "other", "parent", "child", "grandchild", "plain"].map(t)
        );
        // Without references, the order given.
        assert_eq!(referenced_first(tables.to_vec(), &[]), tables);
        // Round a cycle, a table of the cycle goes first, not the one that references into it.
        let refs = [(t("a"), t("b")), (t("b"), t("a")), (t("c"), t("a"))];
        assert_eq!(
            referenced_first(["c", "a", "b"].map(t).to_vec(), &refs),
            ["a", "c", "b"].map(t)
        );
    }
}
