//! `tandem verify`: compare both sides by primary key without pulling every row to the client.
//!
//! Each server hashes its rows into buckets (by a hash of the key) and returns, per bucket, the
//! row count and an order-independent sum of row hashes. Only buckets whose count or sum differ
//! are drilled into: their `(key, row hash)` pairs are fetched, a bounded set of buckets at a time,
//! and compared. When tandem is replicating, keys that differ are re-checked once the stream has
//! passed the moment of the check, so changes in flight are not reported as differences.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;
use tokio_postgres::types::ToSql;
use tokio_postgres::Client;

use crate::apply::plan::TargetTable;
use crate::catalog;
use crate::config::{quote_ident, Config, TableName};
use crate::db;
use crate::side::Side;

/// Rows per bucket the bucket count aims for.
const ROWS_PER_BUCKET: i64 = 1000;
/// Buckets fetched in one drill-down round: bounds client memory to about this many × 1000 keys.
const BUCKETS_PER_FETCH: usize = 64;
const SAMPLES: usize = 5;

#[derive(Debug, Default, Clone, Serialize)]
pub struct Samples {
    pub only_desktop: Vec<serde_json::Value>,
    pub only_mobile: Vec<serde_json::Value>,
    pub differs: Vec<serde_json::Value>,
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct TableReport {
    pub table: String,
    pub in_sync: u64,
    pub only_desktop: u64,
    pub only_mobile: u64,
    pub differs: u64,
    /// Keys that differed at first look and were compared again after the replication lag.
    pub rechecked: u64,
    pub samples: Samples,
}

impl TableReport {
    pub fn is_in_sync(&self) -> bool {
        self.only_desktop == 0 && self.only_mobile == 0 && self.differs == 0
    }
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub tables: Vec<TableReport>,
}

/// One differing key: its values as text (in key-column order) and its JSON form. Without a
/// primary key, the key is the whole row (NULLs included), and each copy of a row that appears
/// more than once on a side is a key of its own.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key {
    pub values: Vec<Option<String>>,
    pub json: String,
}

/// The differences found in one drill-down round.
#[derive(Debug, Default)]
pub struct Diff {
    pub only_desktop: Vec<Key>,
    pub only_mobile: Vec<Key>,
    pub differs: Vec<Key>,
}

/// How to read one table identically on both sides.
pub struct Shape {
    pub name: TableName,
    pub meta: TargetTable,
    /// The columns (indexes into `meta.columns`) a row is known by: the key, or without one
    /// every compared column that is not generated.
    pub key_cols: Vec<usize>,
    /// What the drill-down matches rows by: `ROW(k1, k2)::text`, or without a primary key the
    /// row and its number among its equal rows.
    key_ident: String,
    /// What the bucket hashes: `ROW(k1, k2)::text`, or its UTF8 bytes when a side's encoding
    /// differs. Equal rows of a table without a primary key share their bucket.
    key_hashed: String,
    /// `ARRAY[k1::text, k2::text]`
    key_values: String,
    /// `json_build_object('k1', k1, …)::text`
    key_json: String,
    /// `md5(ROW(c1, …, cn)::text)` over the columns both sides have.
    row_hash: String,
    /// Those columns: what is compared, and what repair writes.
    pub compared_columns: Vec<String>,
    /// With row filters, the condition of the rows compared (both sides hold those alike).
    rows: Option<String>,
    /// Mobile's catalog entry of the table (`meta` is desktop's). What each side reads by its
    /// own: its rows (`ONLY` it where other tables inherit from it) and its key columns' types
    /// (an extension's type is qualified by its schema where that is not on the search path,
    /// `extensions.citext` on Supabase, `citext` on an office server).
    mobile: TargetTable,
}

impl Shape {
    /// `flows`: the columns compared (all both sides have, unless a column list limits them).
    /// `convert`: a side's database is not UTF8, so text is hashed as its UTF8 bytes.
    fn new(
        name: TableName,
        d: TargetTable,
        m: TargetTable,
        flows: impl Fn(&str) -> bool,
        rows: Option<String>,
        convert: bool,
    ) -> Result<Shape> {
        let utf8 = |text: String| match convert {
            true => format!("convert_to({text}, 'UTF8')"),
            false => text,
        };
        let col = |c: &str| format!("t.{}", quote_ident(c));
        let compared_columns: Vec<String> = d
            .columns
            .iter()
            .filter(|c| m.columns.iter().any(|x| x.name == c.name) && flows(&c.name))
            .map(|c| c.name.clone())
            .collect();
        let key_cols: Vec<usize> = match d.key.is_empty() {
            false => d.key.clone(),
            true => (0..d.columns.len())
                .filter(|&i| {
                    !d.columns[i].generated && compared_columns.contains(&d.columns[i].name)
                })
                .collect(),
        };
        let keys: Vec<&str> = key_cols
            .iter()
            .map(|&k| d.columns[k].name.as_str())
            .collect();
        let cols: Vec<String> = compared_columns.iter().map(|c| col(c)).collect();
        let key_text = format!(
            "ROW({})::text",
            keys.iter().map(|k| col(k)).collect::<Vec<_>>().join(", ")
        );
        Ok(Shape {
            // `hashtext` takes text: the UTF8 bytes, escaped to ASCII, are text alike on both.
            key_hashed: match convert {
                true => format!("encode({}, 'escape')", utf8(key_text.clone())),
                false => key_text.clone(),
            },
            key_ident: match d.key.is_empty() {
                false => key_text.clone(),
                true => {
                    format!("{key_text} || ' #' || row_number() OVER (PARTITION BY {key_text})")
                }
            },
            key_cols,
            key_values: format!(
                "ARRAY[{}]",
                keys.iter()
                    .map(|k| format!("{}::text", col(k)))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            key_json: json_object(
                keys.iter()
                    .map(|k| format!("{}, {}", crate::config::quote_literal(k), col(k)))
                    .collect(),
            ),
            row_hash: format!("md5({})", utf8(format!("ROW({})::text", cols.join(", ")))),
            compared_columns,
            rows,
            name,
            meta: d,
            mobile: m,
        })
    }

    /// `side`'s catalog entry of the table.
    pub(crate) fn meta_of(&self, side: Side) -> &TargetTable {
        match side {
            Side::Desktop => &self.meta,
            Side::Mobile => &self.mobile,
        }
    }

    /// The table's own rows on `side`, for a `FROM`.
    pub(crate) fn from(&self, side: Side) -> String {
        self.meta_of(side).rows()
    }

    /// `WHERE` and `AND` forms of [`Shape::rows`] (empty without filters).
    fn rows_where(&self) -> String {
        self.rows
            .as_ref()
            .map_or(String::new(), |r| format!(" WHERE {r}"))
    }

    fn rows_and(&self) -> String {
        self.rows
            .as_ref()
            .map_or(String::new(), |r| format!(" AND {r}"))
    }

    /// A row's key as [`Key`] holds it, of rows aliased `t`: its values as text, and its JSON.
    pub(crate) fn key_of_t(&self) -> String {
        format!("{}, {}", self.key_values, self.key_json)
    }

    /// What a row is compared by, as [`collect_rows`] reads it: key text, key values, key JSON,
    /// row hash.
    fn compared(&self) -> String {
        format!(
            "{}, {}, {}, {}",
            self.key_ident, self.key_values, self.key_json, self.row_hash
        )
    }

    fn bucket(&self, n: i64) -> String {
        format!("((hashtext({}) & 2147483647) % {n})", self.key_hashed)
    }

    /// The parameters of [`Shape::key_join`] for `keys`: one array per key column.
    pub(crate) fn key_params<'a>(&self, keys: &[&'a Key]) -> Vec<Vec<Option<&'a str>>> {
        (0..self.key_cols.len())
            .map(|i| keys.iter().map(|k| k.values[i].as_deref()).collect())
            .collect()
    }

    /// `JOIN unnest($1::text[], …) u ON t.k1 = u.v1::type …`: rows with the given keys. Without
    /// a primary key: every row equal to one given, as the arrays of their text forms (`=` on
    /// arrays takes NULL elements as equal, and hashes: with a column-by-column `IS NOT
    /// DISTINCT FROM`, the server compared every row with every key, 80,000 × 413 per round).
    pub(crate) fn key_join(&self, side: Side) -> String {
        let keys = &self.key_cols;
        let params: Vec<String> = (1..=keys.len()).map(|i| format!("${i}::text[]")).collect();
        let aliases: Vec<String> = (1..=keys.len()).map(|i| format!("v{i}")).collect();
        let on = match self.meta.key.is_empty() {
            false => keys
                .iter()
                .enumerate()
                .map(|(i, &k)| {
                    let name = &self.meta.columns[k].name;
                    // The type as this side writes it (setup made sure both have the column).
                    let ty = self
                        .meta_of(side)
                        .columns
                        .iter()
                        .find(|c| &c.name == name)
                        .unwrap_or(&self.meta.columns[k]);
                    format!("t.{} = u.v{}::{}", quote_ident(name), i + 1, ty.cast_sql)
                })
                .collect::<Vec<_>>()
                .join(" AND "),
            true => format!(
                "{} = ARRAY[{}]",
                self.key_values,
                aliases
                    .iter()
                    .map(|a| format!("u.{a}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        format!(
            "JOIN unnest({}) AS u({}) ON {on}",
            params.join(", "),
            aliases.join(", "),
        )
    }
}

/// Connect for comparison: the same text rendering on both sides, whatever the servers' defaults.
pub async fn connect_pair(cfg: &Config) -> Result<(Client, Client)> {
    let d = db::connect(&cfg.desktop, "tandem verify").await?;
    let m = db::connect(&cfg.mobile, "tandem verify").await?;
    for c in [&d, &m] {
        c.batch_execute("SET TimeZone = 'UTC'").await?;
    }
    Ok((d, m))
}

/// The configured tables (optionally just `only`), as both sides have them.
pub async fn shapes(
    cfg: &Config,
    d: &Client,
    m: &Client,
    only: Option<&TableName>,
) -> Result<Vec<Shape>> {
    let mut names = catalog::expand(d, &cfg.tables).await?;
    // Nothing compared is not "in sync": before, verify printed nothing and exited 0.
    if names.is_empty() {
        bail!(
            "desktop: [replication] tables ({}) match no table; nothing to compare. Correct the \
             patterns, or create the tables (and run `tandem setup`)",
            TableName::list(&cfg.tables)
        );
    }
    if let Some(t) = only {
        if !names.contains(t) {
            return Err(anyhow!(
                "table {t} is not among the configured tables ({})",
                TableName::list(&names)
            ));
        }
        names = vec![t.clone()];
    }
    for (side, c) in [(Side::Desktop, d), (Side::Mobile, m)] {
        if let Some(problem) = catalog::row_security(c, side, &names).await? {
            bail!(problem);
        }
    }
    // Hashes are of the bytes each server stores: alike only in one encoding.
    let mut utf8 = true;
    for c in [d, m] {
        utf8 &= c
            .query_one("SHOW server_encoding", &[])
            .await?
            .get::<_, String>(0)
            == "UTF8";
    }
    let mut out = Vec::new();
    for n in names {
        let dt = catalog::table(d, &n)
            .await?
            .ok_or_else(|| anyhow!("desktop: table {n} does not exist"))?;
        let mt = catalog::table(m, &n)
            .await?
            .ok_or_else(|| anyhow!("mobile: table {n} does not exist"))?;
        let flows = |c: &str| cfg.column_flows(&n, c);
        out.push(Shape::new(
            n.clone(),
            dt,
            mt,
            flows,
            cfg.compared_rows(&n),
            !utf8,
        )?);
    }
    Ok(out)
}

/// `json_build_object(pairs)::text`. A function takes at most 100 arguments, and a table without
/// a key is known by all its columns: past 50, objects of 50 are merged (`jsonb ||`).
fn json_object(pairs: Vec<String>) -> String {
    if pairs.len() <= 50 {
        return format!("json_build_object({})::text", pairs.join(", "));
    }
    let parts: Vec<String> = pairs
        .chunks(50)
        .map(|c| format!("jsonb_build_object({})", c.join(", ")))
        .collect();
    format!("({})::text", parts.join(" || "))
}

type Buckets = BTreeMap<i32, (i64, String)>;

async fn bucket_sums(c: &Client, side: Side, s: &Shape, n: i64) -> Result<Buckets> {
    let sql = format!(
        "SELECT {b}::int4, count(*), sum(('x' || left({h}, 16))::bit(64)::bigint::numeric)::text \
         FROM {t} t{w} GROUP BY 1",
        b = s.bucket(n),
        h = s.row_hash,
        t = s.from(side),
        w = s.rows_where()
    );
    Ok(c.query(&sql, &[])
        .await?
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect())
}

/// The rows of the differing buckets, on one side, when the drill-down takes more than one
/// round: the bucket is a hash of the key, so no index finds a bucket's rows, and each round
/// scanned the whole table again (2M rows, 2,048 buckets all differing: 32 scans of ~0.6 s per
/// side). Written once into a temp table indexed by bucket, each round reads only its rows.
const STAGED: &str = "pg_temp.tandem_verify_rows";

async fn stage_rows(c: &Client, side: Side, s: &Shape, n: i64, buckets: &[i32]) -> Result<()> {
    c.batch_execute(&format!(
        "DROP TABLE IF EXISTS {STAGED}; \
         CREATE TEMP TABLE tandem_verify_rows (bucket int4, k text, kv text[], kj text, h text)"
    ))
    .await?;
    let sql = format!(
        "INSERT INTO {STAGED} SELECT {b}, {r} FROM {t} t WHERE {b} = ANY($1){a}",
        r = s.compared(),
        t = s.from(side),
        b = s.bucket(n),
        a = s.rows_and()
    );
    c.execute(&sql, &[&buckets]).await?;
    c.batch_execute(&format!(
        "CREATE INDEX ON {STAGED} (bucket); ANALYZE {STAGED}"
    ))
    .await?;
    Ok(())
}

/// `(key → (key, row hash))` for the rows of `c` in the given buckets, from the table or, when
/// `staged`, from [`stage_rows`]'s copy.
async fn rows_in(
    c: &Client,
    side: Side,
    s: &Shape,
    n: i64,
    buckets: &[i32],
    staged: bool,
) -> Result<HashMap<String, (Key, String)>> {
    let sql = match staged {
        true => format!("SELECT k, kv, kj, h FROM {STAGED} WHERE bucket = ANY($1)"),
        false => format!(
            "SELECT {r} FROM {t} t WHERE {b} = ANY($1){a}",
            r = s.compared(),
            t = s.from(side),
            b = s.bucket(n),
            a = s.rows_and()
        ),
    };
    Ok(collect_rows(c.query(&sql, &[&buckets]).await?))
}

fn collect_rows(rows: Vec<tokio_postgres::Row>) -> HashMap<String, (Key, String)> {
    rows.into_iter()
        .map(|r| {
            (
                r.get::<_, String>(0),
                (
                    Key {
                        values: r.get(1),
                        json: r.get(2),
                    },
                    r.get(3),
                ),
            )
        })
        .collect()
}

/// Rows of `c` with the given keys.
async fn rows_with_keys(
    c: &Client,
    side: Side,
    s: &Shape,
    keys: &[Key],
) -> Result<HashMap<String, (Key, String)>> {
    let sql = format!(
        "SELECT {r} FROM {t} t {join}{w}",
        r = s.compared(),
        t = s.from(side),
        join = s.key_join(side),
        w = s.rows_where()
    );
    // Copies of one row are one key here: the join finds them all, and numbers them again.
    let mut seen = std::collections::HashSet::new();
    let distinct: Vec<&Key> = keys.iter().filter(|k| seen.insert(&k.values)).collect();
    let cols = s.key_params(&distinct);
    let params: Vec<&(dyn ToSql + Sync)> = cols.iter().map(|c| c as &(dyn ToSql + Sync)).collect();
    Ok(collect_rows(c.query(&sql, &params).await?))
}

fn diff(d: HashMap<String, (Key, String)>, mut m: HashMap<String, (Key, String)>) -> Diff {
    let mut out = Diff::default();
    for (k, (key, hash)) in d {
        match m.remove(&k) {
            None => out.only_desktop.push(key),
            Some((_, h)) if h != hash => out.differs.push(key),
            Some(_) => {}
        }
    }
    out.only_mobile = m.into_values().map(|(k, _)| k).collect();
    out
}

/// Is tandem streaming either side of this pair right now?
async fn replicating(cfg: &Config, d: &Client, m: &Client) -> Result<bool> {
    for (c, site) in [(d, &cfg.desktop), (m, &cfg.mobile)] {
        let active = c
            .query_opt(
                "SELECT active FROM pg_replication_slots WHERE slot_name = $1",
                &[&site.slot],
            )
            .await?
            .is_some_and(|r| r.get::<_, bool>(0));
        if active {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Wait until each side's walsender has sent everything written before now, then a moment for
/// the apply to commit.
async fn wait_for_lag(cfg: &Config, d: &Client, m: &Client) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    for (c, site) in [(d, &cfg.desktop), (m, &cfg.mobile)] {
        let now: String = c
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await?
            .get(0);
        loop {
            let passed = c
                .query_opt(
                    "SELECT r.sent_lsn >= $2::text::pg_lsn FROM pg_stat_replication r \
                     JOIN pg_replication_slots s ON s.active_pid = r.pid WHERE s.slot_name = $1",
                    &[&site.slot, &now],
                )
                .await?
                .is_none_or(|r| r.get::<_, Option<bool>>(0).unwrap_or(true));
            if passed || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    Ok(())
}

/// Compare one table; `each` sees every round's differences (after re-checks), for repair.
pub async fn compare<F>(
    cfg: &Config,
    d: &Client,
    m: &Client,
    s: &Shape,
    mut each: F,
) -> Result<TableReport>
where
    F: AsyncFnMut(&Diff) -> Result<()>,
{
    let rows: i64 = d
        .query_one(
            &format!(
                "SELECT count(*) FROM {} t{}",
                s.from(Side::Desktop),
                s.rows_where()
            ),
            &[],
        )
        .await?
        .get(0);
    let n = ((rows / ROWS_PER_BUCKET).clamp(1, 65_536) as u64).next_power_of_two() as i64;
    let (bd, bm) = tokio::try_join!(
        bucket_sums(d, Side::Desktop, s, n),
        bucket_sums(m, Side::Mobile, s, n)
    )?;
    let mut differing: Vec<i32> = bd
        .keys()
        .chain(bm.keys())
        .copied()
        .filter(|b| bd.get(b) != bm.get(b))
        .collect();
    differing.sort_unstable();
    differing.dedup();
    let live = replicating(cfg, d, m).await?;
    let mut report = TableReport {
        table: s.name.to_string(),
        ..Default::default()
    };
    let staged = differing.len() > BUCKETS_PER_FETCH;
    if staged {
        tokio::try_join!(
            stage_rows(d, Side::Desktop, s, n, &differing),
            stage_rows(m, Side::Mobile, s, n, &differing)
        )?;
    }
    for chunk in differing.chunks(BUCKETS_PER_FETCH) {
        let (rd, rm) = tokio::try_join!(
            rows_in(d, Side::Desktop, s, n, chunk, staged),
            rows_in(m, Side::Mobile, s, n, chunk, staged)
        )?;
        let mut found = diff(rd, rm);
        // In flight while replicating: look again once the streams have passed this moment.
        let mut rounds = 0;
        while live
            && rounds < 5
            && !(found.only_desktop.is_empty()
                && found.only_mobile.is_empty()
                && found.differs.is_empty())
        {
            wait_for_lag(cfg, d, m).await?;
            let keys: Vec<Key> = found
                .only_desktop
                .iter()
                .chain(&found.only_mobile)
                .chain(&found.differs)
                .cloned()
                .collect();
            report.rechecked += keys.len() as u64;
            let (rd, rm) = tokio::try_join!(
                rows_with_keys(d, Side::Desktop, s, &keys),
                rows_with_keys(m, Side::Mobile, s, &keys)
            )?;
            found = diff(rd, rm);
            rounds += 1;
        }
        report.only_desktop += found.only_desktop.len() as u64;
        report.only_mobile += found.only_mobile.len() as u64;
        report.differs += found.differs.len() as u64;
        for (dst, src) in [
            (&mut report.samples.only_desktop, &found.only_desktop),
            (&mut report.samples.only_mobile, &found.only_mobile),
            (&mut report.samples.differs, &found.differs),
        ] {
            for k in src.iter().take(SAMPLES.saturating_sub(dst.len())) {
                dst.push(
                    serde_json::from_str(&k.json)
                        .unwrap_or(serde_json::Value::String(k.json.clone())),
                );
            }
        }
        each(&found).await?;
    }
    if staged {
        let drop = format!("DROP TABLE {STAGED}");
        tokio::try_join!(d.batch_execute(&drop), m.batch_execute(&drop))?;
    }
    report.in_sync = (rows as u64).saturating_sub(report.only_desktop + report.differs);
    Ok(report)
}

/// `tandem verify`.
pub async fn verify(cfg: &Config, only: Option<&TableName>) -> Result<Report> {
    let (d, m) = connect_pair(cfg).await?;
    let mut tables = Vec::new();
    for s in shapes(cfg, &d, &m, only).await? {
        tables.push(
            compare(cfg, &d, &m, &s, async |_| Ok(()))
                .await
                .with_context(|| format!("comparing {}", s.name))?,
        );
    }
    Ok(Report { tables })
}

/// Human-readable lines of a report.
pub fn render(r: &Report) -> String {
    let mut out = String::new();
    for t in &r.tables {
        out.push_str(&format!(
            "{:<32} {:>10} in sync  {:>8} only desktop  {:>8} only mobile  {:>8} differ  {}\n",
            t.table,
            t.in_sync,
            t.only_desktop,
            t.only_mobile,
            t.differs,
            if t.is_in_sync() { "OK" } else { "DIFFERENT" }
        ));
        for (what, keys) in [
            ("only desktop", &t.samples.only_desktop),
            ("only mobile", &t.samples.only_mobile),
            ("differ", &t.samples.differs),
        ] {
            if !keys.is_empty() {
                let keys: Vec<String> = keys.iter().map(|k| k.to_string()).collect();
                out.push_str(&format!("    {what}: {}\n", keys.join(" ")));
            }
        }
    }
    out
}

/// The side named on the command line.
pub fn parse_side(s: &str) -> Result<Side> {
    match s {
        "desktop" | "D" => Ok(Side::Desktop),
        "mobile" | "M" => Ok(Side::Mobile),
        _ => Err(anyhow!("`{s}` is not a side; use desktop or mobile")),
    }
}
