//! `tandem.toml`: parsed and validated once, then typed.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::str::FromStr;

use serde::Deserialize;

use crate::apply::conflict::Policy;
use crate::side::Side;

/// A schema-qualified table name. `name` may be `*` in a config pattern.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TableName {
    pub schema: String,
    pub name: String,
}

impl TableName {
    pub fn new(schema: impl Into<String>, name: impl Into<String>) -> Self {
        TableName {
            schema: schema.into(),
            name: name.into(),
        }
    }

    /// The name quoted for SQL: `"public"."jobs"`.
    pub fn quoted(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.name))
    }

    /// In a `FROM`, `UPDATE` or `DELETE`: the table's own rows, `ONLY` it when other tables
    /// inherit from it (see [`crate::catalog::inherited`]).
    pub fn rows(&self, inherited: bool) -> String {
        match inherited {
            true => format!("ONLY {}", self.quoted()),
            false => self.quoted(),
        }
    }

    pub fn is_wildcard(&self) -> bool {
        self.name == "*"
    }

    /// Names for a message: `public.a, public.b`.
    pub fn list(names: &[TableName]) -> String {
        names
            .iter()
            .map(|t| t.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl fmt::Display for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.schema, self.name)
    }
}

/// One part of a configured table name and what follows it: written as it is (taken exactly, no
/// case folding), or double-quoted as in SQL (`"Sales"`, `"Order Items"`, `""` for a quote), so a
/// name copied from SQL means the same table rather than one with quotes in its name.
fn name_part(s: &str) -> Result<(String, &str), &'static str> {
    let Some(quoted) = s.strip_prefix('"') else {
        let end = s.find('.').unwrap_or(s.len());
        return Ok((s[..end].to_string(), &s[end..]));
    };
    let mut part = String::new();
    let mut rest = quoted;
    loop {
        let Some(at) = rest.find('"') else {
            return Err("a double quote is not closed");
        };
        part.push_str(&rest[..at]);
        rest = &rest[at + 1..];
        match rest.strip_prefix('"') {
            Some(after) => {
                part.push('"');
                rest = after;
            }
            None if rest.is_empty() || rest.starts_with('.') => return Ok((part, rest)),
            None => return Err("a quoted name must end at a dot or at the end"),
        }
    }
}

impl FromStr for TableName {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let qualified = || match s {
            "*" => format!("table `{s}` must be schema-qualified, like \"public.*\""),
            _ => format!(
                "table `{s}` must be schema-qualified, like \"public.{s}\" (or \"public.*\")"
            ),
        };
        let (schema, rest) = name_part(s).map_err(|e| format!("table `{s}`: {e}"))?;
        let Some(after) = rest.strip_prefix('.') else {
            return Err(qualified());
        };
        let (name, rest) = name_part(after).map_err(|e| format!("table `{s}`: {e}"))?;
        if schema.is_empty() || name.is_empty() || !rest.is_empty() {
            return Err(qualified());
        }
        // A `*` written unquoted anywhere but as the whole table part would be taken as part of
        // a name no table has (`*.*` as a schema named `*`, `public.job*`), matching nothing.
        let starred = |part: &str, written: &str| part.contains('*') && !written.starts_with('"');
        if starred(&schema, s) || (starred(&name, after) && name != "*") {
            return Err(format!(
                "table `{s}`: `*` stands only for all the tables of one schema, as in \
                 \"public.*\"; list each schema so, and name other tables in full"
            ));
        }
        Ok(TableName::new(schema, name))
    }
}

/// Quote an SQL identifier the way `quote_ident` does.
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// Quote an SQL string literal.
pub fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// Which way a table's changes flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    #[default]
    Both,
    DesktopToMobile,
    MobileToDesktop,
}

impl Direction {
    /// Do changes made on `side` flow to the other side?
    pub fn flows_from(self, side: Side) -> bool {
        matches!(
            (self, side),
            (Direction::Both, _)
                | (Direction::DesktopToMobile, Side::Desktop)
                | (Direction::MobileToDesktop, Side::Mobile)
        )
    }
}

/// How to reach one side. `Debug` never prints the URL: it may hold a password.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SideConfig {
    #[serde(default)]
    pub url: String,
    pub slot: Option<String>,
    pub publication: Option<String>,
}

impl fmt::Debug for SideConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SideConfig")
            .field("url", &redact_url(&self.url))
            .field("slot", &self.slot)
            .field("publication", &self.publication)
            .finish()
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawReplication {
    #[serde(default)]
    tables: Vec<String>,
    #[serde(default)]
    direction: BTreeMap<String, Direction>,
    #[serde(default = "yes")]
    apply_truncate: bool,
    #[serde(default = "default_batch_rows")]
    batch_rows: usize,
    #[serde(default = "yes")]
    initial_snapshot: bool,
    #[serde(default)]
    stream_in_progress: Option<bool>,
    #[serde(default = "default_receive_timeout")]
    receive_timeout: u64,
    #[serde(default)]
    on_refusal: Option<String>,
    #[serde(default)]
    seed: Option<String>,
    #[serde(default)]
    snapshot_seed: BTreeMap<String, String>,
    #[serde(default)]
    columns: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    filter: BTreeMap<String, RawFilter>,
}

/// `[replication.filter."schema.table"]`: which rows flow, per direction (SQL conditions).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFilter {
    desktop_to_mobile: Option<String>,
    mobile_to_desktop: Option<String>,
}

fn yes() -> bool {
    true
}
fn default_batch_rows() -> usize {
    2000
}
/// Seconds, as the native apply worker's `wal_receiver_timeout`.
fn default_receive_timeout() -> u64 {
    60
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    desktop: Option<SideConfig>,
    mobile: Option<SideConfig>,
    replication: Option<RawReplication>,
    conflicts: Option<RawConflicts>,
    kafka: Option<RawKafka>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKafka {
    brokers: String,
    topic: Option<String>,
    format: Option<KafkaFormat>,
    required: Option<bool>,
    transactions: Option<bool>,
    spool_path: Option<String>,
    spool_max_bytes: Option<u64>,
    #[serde(default)]
    properties: BTreeMap<String, String>,
}

/// How events are encoded on the topic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KafkaFormat {
    Protobuf,
    Json,
}

/// `[kafka]`: publish every decoded change of either side.
#[derive(Clone, PartialEq, Eq)]
pub struct KafkaConfig {
    pub brokers: String,
    pub topic: String,
    pub format: KafkaFormat,
    /// The source slot is confirmed only past events Kafka acknowledged.
    pub required: bool,
    /// After each source transaction's events, an event saying how many there were (`commit`).
    pub transactions: bool,
    /// Passed to librdkafka as they are (may hold credentials: never printed).
    pub properties: BTreeMap<String, String>,
    /// `required = false`: undelivered events wait in `<spool_path>.<direction>.bin`.
    pub spool_path: String,
    pub spool_max_bytes: u64,
}

impl fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaConfig")
            .field("brokers", &self.brokers)
            .field("topic", &self.topic)
            .field("format", &self.format)
            .field("required", &self.required)
            .field("transactions", &self.transactions)
            .field("properties", &self.properties.keys().collect::<Vec<_>>())
            .finish()
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConflicts {
    policy: Option<Policy>,
    version_column: Option<String>,
    priority: Option<String>,
    #[serde(default)]
    tables: BTreeMap<String, RawTableConflicts>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTableConflicts {
    policy: Option<Policy>,
    version_column: Option<String>,
}

/// How one table's conflicts are resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableConflicts {
    pub policy: Policy,
    /// The column last_write_wins compares (a timestamp or an increasing number).
    pub version_column: Option<String>,
}

/// `[conflicts]`: without it, changes are applied as they come and nothing is detected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConflictConfig {
    pub default: TableConflicts,
    pub tables: BTreeMap<TableName, TableConflicts>,
    /// Who wins a last_write_wins tie.
    pub priority: Side,
}

/// The whole, validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub desktop: Site,
    pub mobile: Site,
    pub tables: Vec<TableName>,
    pub directions: BTreeMap<TableName, Direction>,
    /// Replicate `TRUNCATE` (on by default).
    pub apply_truncate: bool,
    /// Most rows in one multi-row apply statement.
    pub batch_rows: usize,
    /// `run` snapshots tables that were never synchronised before streaming them.
    pub initial_snapshot: bool,
    /// Ask the source to stream large transactions while they are in progress (pgoutput
    /// protocol 2, PostgreSQL 14 and later). Unset: only where tandem can apply one as it
    /// arrives (no conflict rules, no Kafka); `true` also spools them elsewhere (see
    /// `sync::stream_mode`).
    pub stream_in_progress: Option<bool>,
    /// A replication connection the server sent nothing on for this long is taken as lost and
    /// opened again (`None`: never). At half of it, tandem asks the server for a reply.
    pub receive_timeout: Option<std::time::Duration>,
    /// What a direction does when the target refuses a source transaction, or a change carries
    /// a column the target lacks.
    pub on_refusal: OnRefusal,
    /// Whose rows win in an initial snapshot, unless a table says otherwise.
    pub seed: Side,
    /// Per-table seed; `None` means the table gets no initial snapshot.
    pub snapshot_seed: BTreeMap<TableName, Option<Side>>,
    /// Tables of which only these columns flow (both ways, in publication column lists); the
    /// others stay each side's own.
    pub columns: BTreeMap<TableName, Vec<String>>,
    /// Row filters (publication `WHERE` conditions) by table and the side the rows flow from.
    pub filters: BTreeMap<(TableName, Side), String>,
    pub conflicts: Option<ConflictConfig>,
    pub kafka: Option<KafkaConfig>,
}

/// `[replication] on_refusal`: a refused source transaction (a constraint, trigger or type only
/// the target has) or a column the target lacks stops `run` (exit 1, as a subscription with
/// `disable_on_error`), or stalls only its direction, tried again with a growing pause while the
/// other direction goes on (as native's apply worker retries by default).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OnRefusal {
    #[default]
    Stop,
    Retry,
}

/// One side, resolved: URL (possibly from the environment), slot and publication names.
#[derive(Clone)]
pub struct Site {
    pub side: Side,
    pub url: String,
    pub slot: String,
    pub publication: String,
}

impl fmt::Debug for Site {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Site")
            .field("side", &self.side)
            .field("url", &redact_url(&self.url))
            .field("slot", &self.slot)
            .field("publication", &self.publication)
            .finish()
    }
}

impl Config {
    pub fn site(&self, side: Side) -> &Site {
        match side {
            Side::Desktop => &self.desktop,
            Side::Mobile => &self.mobile,
        }
    }

    /// The seed of `table`'s initial snapshot (`None`: no snapshot). A one-way table's seed is the
    /// side it flows from: its other side is never written by tandem's stream.
    pub fn seed_for(&self, table: &TableName) -> Option<Side> {
        if let Some(s) = self.snapshot_seed.get(table) {
            return *s;
        }
        match self.direction(table) {
            Direction::DesktopToMobile => Some(Side::Desktop),
            Direction::MobileToDesktop => Some(Side::Mobile),
            Direction::Both => Some(self.seed),
        }
    }

    /// The conflict rule of `table`; `None` when `[conflicts]` is not configured.
    pub fn conflicts_for(&self, table: &TableName) -> Option<&TableConflicts> {
        let c = self.conflicts.as_ref()?;
        Some(
            c.tables
                .get(table)
                .or_else(|| c.tables.get(&TableName::new(&table.schema, "*")))
                .unwrap_or(&c.default),
        )
    }

    /// The columns of `table` that flow, when `[replication.columns]` limits them.
    pub fn columns_of(&self, table: &TableName) -> Option<&[String]> {
        self.columns.get(table).map(Vec::as_slice)
    }

    /// Does column `name` of `table` flow between the sides?
    pub fn column_flows(&self, table: &TableName, name: &str) -> bool {
        self.columns_of(table)
            .is_none_or(|cols| cols.iter().any(|c| c == name))
    }

    /// The condition rows of `table` meet to flow from `source`, if it has one.
    pub fn filter(&self, table: &TableName, source: Side) -> Option<&str> {
        self.filters
            .get(&(table.clone(), source))
            .map(String::as_str)
    }

    /// What rows verify compares: those every filter of `table` lets through (both sides hold
    /// those alike), as an SQL condition; `None` without filters.
    pub fn compared_rows(&self, table: &TableName) -> Option<String> {
        let parts: Vec<String> = Side::BOTH
            .into_iter()
            .filter_map(|s| self.filter(table, s))
            .map(|f| format!("({f})"))
            .collect();
        (!parts.is_empty()).then(|| parts.join(" AND "))
    }

    /// `[replication] tables` names `t`, itself or by a pattern.
    pub fn lists(&self, t: &TableName) -> bool {
        self.tables
            .iter()
            .any(|c| c == t || (c.is_wildcard() && c.schema == t.schema))
    }

    /// Some configured table flows from `side`, so `run` streams it (otherwise that direction
    /// only keeps its slot moving), and a `tandem ddl` made there reaches the other side.
    pub fn streams(&self, side: Side) -> bool {
        self.tables
            .iter()
            .any(|t| self.direction(t).flows_from(side))
    }

    pub fn direction(&self, table: &TableName) -> Direction {
        self.directions
            .get(table)
            .or_else(|| self.directions.get(&TableName::new(&table.schema, "*")))
            .copied()
            .unwrap_or_default()
    }

    /// Of `tables`, those whose changes arrive on `side`.
    pub fn arriving(&self, side: Side, tables: &[TableName]) -> Vec<TableName> {
        tables
            .iter()
            .filter(|t| self.direction(t).flows_from(side.other()))
            .cloned()
            .collect()
    }

    /// Load from a file, then let `TANDEM_DESKTOP_URL` / `TANDEM_MOBILE_URL` override the URLs.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError(format!(
            "cannot read config file {}: {e}; pass --config PATH or create tandem.toml (see README)",
            path.display()
        )))?;
        Self::parse(&text, |k| std::env::var(k).ok())
            .map_err(|e| ConfigError(format!("{}: {}", path.display(), e.0)))
    }

    pub fn parse(text: &str, env: impl Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let value: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| ConfigError(format!("invalid TOML: {}", e.message())))?;
        check_keys(&value)?;
        let raw: RawConfig = toml::Value::Table(value)
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError(e.message().to_string()))?;

        let mut problems = Vec::new();
        let mut site = |side: Side, cfg: Option<SideConfig>, var: &str| {
            let cfg = cfg.unwrap_or(SideConfig {
                url: String::new(),
                slot: None,
                publication: None,
            });
            let url = env(var).filter(|u| !u.is_empty()).unwrap_or(cfg.url);
            if url.is_empty() {
                problems.push(format!(
                    "[{side}] url is missing; set it in the file or in {var}"
                ));
            } else if let Err(e) = crate::tls::parse_url(&url) {
                problems.push(format!("[{side}] url: {e}"));
            }
            let default = format!("tandem_{side}");
            Site {
                side,
                url,
                slot: cfg.slot.unwrap_or_else(|| default.clone()),
                publication: cfg.publication.unwrap_or(default),
            }
        };
        let desktop = site(Side::Desktop, raw.desktop, "TANDEM_DESKTOP_URL");
        let mobile = site(Side::Mobile, raw.mobile, "TANDEM_MOBILE_URL");
        for s in [&desktop, &mobile] {
            for (what, name) in [("slot", &s.slot), ("publication", &s.publication)] {
                if !valid_object_name(name) {
                    problems.push(format!(
                        "[{}] {what} `{name}` must be lowercase letters, digits and underscores",
                        s.side
                    ));
                }
            }
        }
        if desktop.slot == mobile.slot && desktop.url == mobile.url {
            problems.push(
                "[desktop] and [mobile] point at the same database with the same slot".into(),
            );
        }

        let repl = raw.replication.unwrap_or(RawReplication {
            tables: vec![],
            direction: BTreeMap::new(),
            apply_truncate: true,
            batch_rows: default_batch_rows(),
            initial_snapshot: true,
            stream_in_progress: None,
            receive_timeout: default_receive_timeout(),
            on_refusal: None,
            seed: None,
            snapshot_seed: BTreeMap::new(),
            columns: BTreeMap::new(),
            filter: BTreeMap::new(),
        });
        let mut tables = Vec::new();
        for t in &repl.tables {
            match t.parse::<TableName>() {
                Ok(t) if !tables.contains(&t) => tables.push(t),
                Ok(_) => {}
                Err(e) => problems.push(format!("[replication] tables: {e}")),
            }
        }
        // Entries that were all refused above say enough.
        if repl.tables.is_empty() {
            problems.push(
                "[replication] tables is empty; list the tables to sync, e.g. tables = [\"public.jobs\"]".into(),
            );
        }
        // A per-table setting names a configured table (or one a pattern takes in).
        let uncovered = |section: &str, name: &TableName| {
            let covered = tables
                .iter()
                .any(|c| c == name || (c.is_wildcard() && c.schema == name.schema));
            (!covered).then(|| {
                format!(
                    "[replication.{section}] names {name}, which is not in [replication] tables"
                )
            })
        };
        let mut directions = BTreeMap::new();
        for (t, d) in repl.direction {
            match t.parse::<TableName>() {
                Ok(name) => {
                    problems.extend(uncovered("direction", &name));
                    directions.insert(name, d);
                }
                Err(e) => problems.push(format!("[replication.direction] {e}")),
            }
        }
        // A column list or a row filter is about one configured table, not a pattern.
        let one_table = |section: &str, t: &str| match t.parse::<TableName>() {
            Ok(name) if name.is_wildcard() => Err(format!(
                "[replication.{section}] \"{t}\": name one table, not a pattern"
            )),
            Ok(name) => uncovered(section, &name).map_or(Ok(name), Err),
            Err(e) => Err(format!("[replication.{section}] {e}")),
        };
        let mut columns = BTreeMap::new();
        for (t, cols) in repl.columns {
            match one_table("columns", &t) {
                Ok(name) if cols.is_empty() => problems.push(format!(
                    "[replication.columns] \"{name}\" is empty; list the columns that flow, key included"
                )),
                Ok(name) => {
                    columns.insert(name, cols);
                }
                Err(p) => problems.push(p),
            }
        }
        let mut filters = BTreeMap::new();
        for (t, f) in repl.filter {
            let name = match one_table("filter", &t) {
                Ok(name) => name,
                Err(p) => {
                    problems.push(p);
                    continue;
                }
            };
            let dir = directions
                .get(&name)
                .or_else(|| directions.get(&TableName::new(&name.schema, "*")))
                .copied()
                .unwrap_or_default();
            for (source, cond) in [
                (Side::Desktop, f.desktop_to_mobile),
                (Side::Mobile, f.mobile_to_desktop),
            ] {
                let Some(cond) = cond else { continue };
                let key = format!("[replication.filter.\"{name}\"] {}", source.direction_key());
                if cond.trim().is_empty() {
                    problems.push(format!(
                        "{key}: empty; give an SQL condition, e.g. \"region = 'north'\""
                    ));
                } else if !dir.flows_from(source) {
                    problems.push(format!(
                        "{key}: {name} does not flow that way ([replication.direction])"
                    ));
                } else {
                    filters.insert((name.clone(), source), cond);
                }
            }
        }
        let side = |v: &str| match v {
            "desktop" => Ok(Side::Desktop),
            "mobile" => Ok(Side::Mobile),
            other => Err(other.to_string()),
        };
        let seed = match repl.seed.as_deref().map(side) {
            None => Side::Desktop,
            Some(Ok(s)) => s,
            Some(Err(v)) => {
                problems.push(format!(
                    "[replication] seed = \"{v}\": use \"desktop\" or \"mobile\""
                ));
                Side::Desktop
            }
        };
        let mut snapshot_seed = BTreeMap::new();
        for (t, v) in &repl.snapshot_seed {
            let value = if v == "none" {
                Ok(None)
            } else {
                side(v).map(Some)
            };
            match (t.parse::<TableName>(), value) {
                (Ok(t), Ok(v)) => {
                    snapshot_seed.insert(t, v);
                }
                (Err(e), _) => problems.push(format!("[replication.snapshot_seed] {e}")),
                (_, Err(v)) => problems.push(format!(
                    "[replication.snapshot_seed] \"{t}\" = \"{v}\": use \"desktop\", \"mobile\" or \"none\""
                )),
            }
        }
        let conflicts = raw.conflicts.map(|c| {
            let version = |v: Option<String>, p: Policy| {
                v.or_else(|| (p == Policy::LastWriteWins).then(|| "updated_at".to_string()))
            };
            let policy = c.policy.unwrap_or(Policy::LastWriteWins);
            let default = TableConflicts {
                policy,
                version_column: version(c.version_column.clone(), policy),
            };
            let mut per_table = BTreeMap::new();
            for (t, tc) in c.tables {
                match t.parse::<TableName>() {
                    Ok(name) => {
                        let policy = tc.policy.unwrap_or(default.policy);
                        let v = tc.version_column.or_else(|| c.version_column.clone());
                        per_table.insert(
                            name,
                            TableConflicts {
                                policy,
                                version_column: version(v, policy),
                            },
                        );
                    }
                    Err(e) => problems.push(format!("[conflicts.tables] {e}")),
                }
            }
            let priority = match c.priority.as_deref().map(side) {
                None => Side::Desktop,
                Some(Ok(s)) => s,
                Some(Err(v)) => {
                    problems.push(format!(
                        "[conflicts] priority = \"{v}\": use \"desktop\" or \"mobile\""
                    ));
                    Side::Desktop
                }
            };
            ConflictConfig {
                default,
                tables: per_table,
                priority,
            }
        });
        if repl.batch_rows == 0 {
            problems.push("[replication] batch_rows must be at least 1".into());
        }
        let on_refusal = match repl.on_refusal.as_deref() {
            None | Some("stop") => OnRefusal::Stop,
            Some("retry") => OnRefusal::Retry,
            Some(v) => {
                problems.push(format!(
                    "[replication] on_refusal = \"{v}\": use \"stop\" or \"retry\""
                ));
                OnRefusal::Stop
            }
        };
        if !problems.is_empty() {
            return Err(ConfigError(problems.join("\n")));
        }
        Ok(Config {
            desktop,
            mobile,
            tables,
            directions,
            apply_truncate: repl.apply_truncate,
            batch_rows: repl.batch_rows,
            initial_snapshot: repl.initial_snapshot,
            stream_in_progress: repl.stream_in_progress,
            receive_timeout: (repl.receive_timeout > 0)
                .then(|| std::time::Duration::from_secs(repl.receive_timeout)),
            on_refusal,
            seed,
            snapshot_seed,
            columns,
            filters,
            conflicts,
            kafka: raw.kafka.map(|k| KafkaConfig {
                brokers: k.brokers,
                topic: k.topic.unwrap_or_else(|| "tandem.events".into()),
                format: k.format.unwrap_or(KafkaFormat::Protobuf),
                required: k.required.unwrap_or(true),
                transactions: k.transactions.unwrap_or(false),
                properties: k.properties,
                spool_path: k.spool_path.unwrap_or_else(|| "tandem-kafka-spool".into()),
                spool_max_bytes: k.spool_max_bytes.unwrap_or(1 << 30),
            }),
        })
    }
}

fn valid_object_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// Refuse unknown keys, naming the key and the nearest valid one.
fn check_keys(t: &toml::Table) -> Result<(), ConfigError> {
    const TOP: &[&str] = &["desktop", "mobile", "replication", "conflicts", "kafka"];
    const KAFKA: &[&str] = &[
        "brokers",
        "topic",
        "format",
        "required",
        "transactions",
        "properties",
        "spool_path",
        "spool_max_bytes",
    ];
    const CONFLICTS: &[&str] = &["policy", "version_column", "priority", "tables"];
    const TABLE_CONFLICTS: &[&str] = &["policy", "version_column"];
    const SIDE: &[&str] = &["url", "slot", "publication"];
    const REPL: &[&str] = &[
        "tables",
        "direction",
        "apply_truncate",
        "batch_rows",
        "initial_snapshot",
        "stream_in_progress",
        "receive_timeout",
        "on_refusal",
        "seed",
        "snapshot_seed",
        "columns",
        "filter",
    ];
    let mut problems = Vec::new();
    let mut check = |path: &str, table: &toml::Table, known: &[&str]| {
        for key in table.keys() {
            if !known.contains(&key.as_str()) {
                let full = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                let hint = nearest(key, known)
                    .map(|n| format!("; did you mean `{n}`?"))
                    .unwrap_or_else(|| format!("; valid keys here: {}", known.join(", ")));
                problems.push(format!("unknown key `{full}`{hint}"));
            }
        }
    };
    check("", t, TOP);
    for side in ["desktop", "mobile"] {
        if let Some(toml::Value::Table(s)) = t.get(side) {
            check(side, s, SIDE);
        }
    }
    if let Some(toml::Value::Table(r)) = t.get("replication") {
        check("replication", r, REPL);
    }
    if let Some(toml::Value::Table(k)) = t.get("kafka") {
        check("kafka", k, KAFKA);
    }
    if let Some(toml::Value::Table(c)) = t.get("conflicts") {
        check("conflicts", c, CONFLICTS);
        if let Some(toml::Value::Table(ts)) = c.get("tables") {
            for (name, v) in ts {
                if let toml::Value::Table(tc) = v {
                    check(&format!("conflicts.tables.\"{name}\""), tc, TABLE_CONFLICTS);
                }
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(ConfigError(problems.join("\n")))
    }
}

/// The known key closest to `key` by edit distance, when it is close enough to be a typo.
fn nearest<'a>(key: &str, known: &[&'a str]) -> Option<&'a str> {
    known
        .iter()
        .map(|k| (levenshtein(key, k), *k))
        .filter(|(d, k)| *d <= 2.max(k.len() / 3))
        .min()
        .map(|(_, k)| k)
}

fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

/// `user@host:port/db`, never the password.
pub fn redact_url(url: &str) -> String {
    match crate::tls::parse_url(url) {
        Ok(crate::tls::Url { pg: c, .. }) => {
            let host = c
                .get_hosts()
                .first()
                .map(|h| match h {
                    tokio_postgres::config::Host::Tcp(h) => h.clone(),
                    tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
                })
                .unwrap_or_else(|| "localhost".into());
            let port = c.get_ports().first().copied().unwrap_or(5432);
            format!(
                "{}@{}:{}/{}",
                c.get_user().unwrap_or("?"),
                host,
                port,
                c.get_dbname().unwrap_or("?")
            )
        }
        Err(_) => "<unparsable url>".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
        [desktop]
        url = "postgresql://tandem:s3cret@127.0.0.1:5433/enterprise_db"
        [mobile]
        url = "postgresql://tandem@db.example.com:5432/postgres?sslmode=require"
        [replication]
        tables = ["public.jobshead", "public.jobtasks", "public.climaster"]
        [replication.direction]
        "public.climaster" = "desktop_to_mobile"
    "#;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn parses_the_documented_example() {
        let c = Config::parse(GOOD, no_env).unwrap();
        assert_eq!(c.desktop.slot, "tandem_desktop");
        assert_eq!(c.mobile.publication, "tandem_mobile");
        assert_eq!(c.tables.len(), 3);
        let cm = TableName::new("public", "climaster");
        assert_eq!(c.direction(&cm), Direction::DesktopToMobile);
        assert!(!c.direction(&cm).flows_from(Side::Mobile));
        assert!(c
            .direction(&TableName::new("public", "jobshead"))
            .flows_from(Side::Mobile));
        assert!(c.apply_truncate);
        assert!(c.streams(Side::Desktop) && c.streams(Side::Mobile));
        // Every table one way: the other side is not streamed.
        let one_way = GOOD.replace(
            r#"tables = ["public.jobshead", "public.jobtasks", "public.climaster"]"#,
            r#"tables = ["public.climaster"]"#,
        );
        let c = Config::parse(&one_way, no_env).unwrap();
        assert!(c.streams(Side::Desktop) && !c.streams(Side::Mobile));
    }

    #[test]
    fn receive_timeout_defaults_to_a_minute_and_zero_turns_it_off() {
        use std::time::Duration;
        let c = Config::parse(GOOD, no_env).unwrap();
        assert_eq!(c.receive_timeout, Some(Duration::from_secs(60)));
        let text = GOOD.replace("[replication]\n", "[replication]\nreceive_timeout = 0\n");
        assert_ne!(text, GOOD);
        assert_eq!(Config::parse(&text, no_env).unwrap().receive_timeout, None);
        let text = GOOD.replace("[replication]\n", "[replication]\nreceive_timeout = 5\n");
        assert_eq!(
            Config::parse(&text, no_env).unwrap().receive_timeout,
            Some(Duration::from_secs(5))
        );
    }

    #[test]
    fn on_refusal_stops_unless_set_to_retry() {
        assert_eq!(
            Config::parse(GOOD, no_env).unwrap().on_refusal,
            OnRefusal::Stop
        );
        let with = |v: &str| {
            GOOD.replace(
                "[replication]\n",
                &format!("[replication]\non_refusal = \"{v}\"\n"),
            )
        };
        assert_eq!(
            Config::parse(&with("retry"), no_env).unwrap().on_refusal,
            OnRefusal::Retry
        );
        assert_eq!(
            Config::parse(&with("stop"), no_env).unwrap().on_refusal,
            OnRefusal::Stop
        );
        let e = Config::parse(&with("skip"), no_env)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "[replication] on_refusal = \"skip\": use \"stop\" or \"retry\""
        );
    }

    #[test]
    fn conflicts_default_per_table_and_unknown_keys() {
        let text = format!(
            "{GOOD}\n[conflicts]\npolicy = \"last_write_wins\"\nversion_column = \"changed\"\n\
             priority = \"mobile\"\n[conflicts.tables.\"public.climaster\"]\npolicy = \"desktop_wins\"\n\
             [conflicts.tables.\"public.jobtasks\"]\npolicy = \"fill_missing\"\n"
        );
        let c = Config::parse(&text, no_env).unwrap();
        let rule = |t: &str| c.conflicts_for(&t.parse().unwrap()).cloned().unwrap();
        assert_eq!(rule("public.jobshead").policy, Policy::LastWriteWins);
        assert_eq!(
            rule("public.jobshead").version_column.as_deref(),
            Some("changed")
        );
        assert_eq!(rule("public.climaster").policy, Policy::DesktopWins);
        assert_eq!(rule("public.jobtasks").policy, Policy::FillMissing);
        assert_eq!(c.conflicts.as_ref().unwrap().priority, Side::Mobile);
        // Without [conflicts], nothing is detected.
        assert!(Config::parse(GOOD, no_env)
            .unwrap()
            .conflicts_for(&"public.jobshead".parse().unwrap())
            .is_none());
        let e = Config::parse(
            &format!("{GOOD}\n[conflicts]\npolicy = \"newest\"\npolcy = 1\n"),
            no_env,
        )
        .unwrap_err()
        .0;
        assert!(
            e.contains("unknown key `conflicts.polcy`; did you mean `policy`?"),
            "{e}"
        );
        let e = Config::parse(
            &format!("{GOOD}\n[conflicts]\npolicy = \"newest\"\n"),
            no_env,
        )
        .unwrap_err()
        .0;
        assert!(e.contains("unknown variant `newest`"), "{e}");
    }

    #[test]
    fn unknown_keys_name_the_key_and_the_nearest_valid_one() {
        let bad = GOOD.replace("tables =", "tabels =");
        let e = Config::parse(&bad, no_env).unwrap_err().0;
        assert!(
            e.contains("unknown key `replication.tabels`; did you mean `tables`?"),
            "{e}"
        );
        let e = Config::parse("[desktop]\nurl='x'\nzzz=1", no_env)
            .unwrap_err()
            .0;
        assert!(
            e.contains("unknown key `desktop.zzz`; valid keys here: url, slot, publication"),
            "{e}"
        );
    }

    #[test]
    fn env_overrides_urls_and_debug_never_shows_passwords() {
        let c = Config::parse(GOOD, |k| {
            (k == "TANDEM_DESKTOP_URL").then(|| "postgresql://u:hunter2@h:1/d".to_string())
        })
        .unwrap();
        assert_eq!(c.desktop.url, "postgresql://u:hunter2@h:1/d");
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("hunter2") && !dbg.contains("s3cret"), "{dbg}");
        assert!(dbg.contains("u@h:1/d"), "{dbg}");
    }

    #[test]
    fn snapshot_seed_per_table_overrides_then_direction_then_global() {
        let text = format!("{GOOD}\n[replication.snapshot_seed]\n\"public.jobtasks\" = \"none\"\n")
            .replace(
                "[replication]\n",
                "[replication]\nseed = \"mobile\"\ninitial_snapshot = true\n",
            );
        let c = Config::parse(&text, no_env).unwrap();
        assert_eq!(c.seed, Side::Mobile);
        assert_eq!(
            c.seed_for(&TableName::new("public", "jobshead")),
            Some(Side::Mobile)
        );
        assert_eq!(c.seed_for(&TableName::new("public", "jobtasks")), None);
        // One-way table: seeded from where it flows from, whatever the global seed.
        assert_eq!(
            c.seed_for(&TableName::new("public", "climaster")),
            Some(Side::Desktop)
        );
        let bad = text.replace("= \"none\"", "= \"nobody\"");
        let e = Config::parse(&bad, no_env).unwrap_err().0;
        assert!(
            e.contains("\"public.jobtasks\" = \"nobody\": use \"desktop\", \"mobile\" or \"none\""),
            "{e}"
        );
    }

    #[test]
    fn row_filters_go_with_a_direction_the_table_flows() {
        let text = format!(
            "{GOOD}\n[replication.filter.\"public.jobshead\"]\ndesktop_to_mobile = \"region = 'north'\"\n\
             mobile_to_desktop = \"owner = 'phone'\"\n"
        );
        let c = Config::parse(&text, no_env).unwrap();
        let head = TableName::new("public", "jobshead");
        assert_eq!(c.filter(&head, Side::Desktop), Some("region = 'north'"));
        assert_eq!(
            c.compared_rows(&head).as_deref(),
            Some("(region = 'north') AND (owner = 'phone')")
        );
        assert_eq!(c.compared_rows(&TableName::new("public", "jobtasks")), None);
        // climaster flows desktop → mobile only.
        let e = Config::parse(
            &format!(
                "{GOOD}\n[replication.filter.\"public.climaster\"]\nmobile_to_desktop = \"true\"\n\
                 [replication.filter.\"public.jobtasks\"]\ndesktop_to_mobile = \" \"\n\
                 [replication.filter.\"public.x\"]\ndesktop_to_mobile = \"true\"\n"
            ),
            no_env,
        )
        .unwrap_err()
        .0;
        for want in [
            "mobile_to_desktop: public.climaster does not flow that way",
            "[replication.filter.\"public.jobtasks\"] desktop_to_mobile: empty",
            "[replication.filter] names public.x, which is not in [replication] tables",
        ] {
            assert!(e.contains(want), "{want} in {e}");
        }
    }

    #[test]
    fn the_example_file_parses() {
        let c = Config::parse(include_str!("../tandem.example.toml"), no_env).unwrap();
        assert_eq!(c.tables.len(), 2);
        assert!(c.columns.is_empty());
    }

    #[test]
    fn column_lists_name_configured_tables_and_columns() {
        let text =
            format!("{GOOD}\n[replication.columns]\n\"public.jobshead\" = [\"id\", \"title\"]\n");
        let c = Config::parse(&text, no_env).unwrap();
        let head = TableName::new("public", "jobshead");
        let tasks = TableName::new("public", "jobtasks");
        assert!(c.column_flows(&head, "title"));
        assert!(!c.column_flows(&head, "salary"));
        assert!(
            c.column_flows(&tasks, "anything"),
            "no list: every column flows"
        );
        let e = Config::parse(
            &format!(
                "{GOOD}\n[replication.columns]\n\"public.*\" = [\"id\"]\n\"public.other\" = [\"id\"]\n\"public.jobtasks\" = []\n"
            ),
            no_env,
        )
        .unwrap_err()
        .0;
        for want in [
            "\"public.*\": name one table, not a pattern",
            "names public.other, which is not in [replication] tables",
            "\"public.jobtasks\" is empty",
        ] {
            assert!(e.contains(want), "{want} in {e}");
        }
    }

    #[test]
    fn table_names_are_taken_as_written_or_unquoted_as_in_sql() {
        let t = |s: &str| s.parse::<TableName>();
        assert_eq!(t("Sales.Orders"), Ok(TableName::new("Sales", "Orders")));
        assert_eq!(t("\"Sales\".*"), Ok(TableName::new("Sales", "*")));
        assert_eq!(
            t("\"my.app\".\"Order \"\"Items\"\"\""),
            Ok(TableName::new("my.app", "Order \"Items\""))
        );
        assert_eq!(t("public.\"t\""), Ok(TableName::new("public", "t")));
        for bad in [
            "jobs",
            "a.b.c",
            "\"a.b\"",
            ".t",
            "s.",
            "\"s.t",
            "\"s\"x.t",
            "s.\"\"",
            "*.*",
            "*.t",
            "public.job*",
            "public.**",
        ] {
            assert!(t(bad).is_err(), "{bad}");
        }
        assert!(t("*.*")
            .unwrap_err()
            .contains("`*` stands only for all the tables of one"));
        assert_eq!(t("\"*\".\"a*\""), Ok(TableName::new("*", "a*")));
        assert!(t("\"s.t").unwrap_err().contains("not closed"));
        // A quoted name round-trips through its SQL form.
        let odd = TableName::new("my.app", "Order \"Items\"");
        assert_eq!(odd.quoted().parse::<TableName>(), Ok(odd));
    }

    #[test]
    fn all_problems_are_reported_at_once() {
        let e = Config::parse("[replication]\ntables=[\"jobs\"]", no_env)
            .unwrap_err()
            .0;
        assert!(e.contains("[desktop] url is missing"), "{e}");
        assert!(e.contains("[mobile] url is missing"), "{e}");
        assert!(
            e.contains("must be schema-qualified, like \"public.jobs\""),
            "{e}"
        );
    }
}
