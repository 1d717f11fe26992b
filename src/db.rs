//! SQL connections to either side, with errors that name the side and never the password.

use std::str::FromStr;

use anyhow::{anyhow, Result};
use tokio_postgres::{Client, NoTls};

use crate::config::{redact_url, Site};

/// Session settings for every tandem SQL session: text values are parsed the way the replication
/// stream renders them (see `source::stream`).
pub const SESSION_SETTINGS: &str =
    "SET datestyle = 'ISO, MDY'; SET intervalstyle = 'postgres'; SET extra_float_digits = 3; \
     SET bytea_output = 'hex'";

/// Connect to `site` with `application_name` set, spawning the connection task.
pub async fn connect(site: &Site, app: &str) -> Result<Client> {
    let mut cfg = tokio_postgres::Config::from_str(&site.url)
        .map_err(|e| anyhow!("{}: invalid url: {e}", site.side))?;
    cfg.application_name(app);
    if cfg.get_connect_timeout().is_none() {
        cfg.connect_timeout(std::time::Duration::from_secs(10));
    }
    if cfg.get_ssl_mode() == tokio_postgres::config::SslMode::Require {
        return Err(anyhow!(
            "{}: sslmode=require is not supported yet by tandem's SQL connections; \
             use sslmode=prefer or disable, or a TLS-terminating proxy",
            site.side
        ));
    }
    let (client, conn) = cfg
        .connect(NoTls)
        .await
        .map_err(|e| anyhow!("{}: {}", site.side, describe_connect_error(&e, &site.url)))?;
    let side = site.side;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(%side, "connection closed: {e}");
        }
    });
    client.batch_execute(SESSION_SETTINGS).await?;
    Ok(client)
}

/// One line saying what failed and what to do, without the password.
pub fn describe_connect_error(e: &tokio_postgres::Error, url: &str) -> String {
    let at = redact_url(url);
    if let Some(db) = e.as_db_error() {
        return match db.code().code() {
            "28P01" | "28000" => format!(
                "authentication failed for {at}: {}; check the user and password in the url",
                db.message()
            ),
            "3D000" => format!("{at}: {}; create the database or fix the url", db.message()),
            _ => format!("cannot connect to {at}: {}", db.message()),
        };
    }
    let mut msg = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        msg = format!("{msg}: {s}");
        src = s.source();
    }
    format!("cannot reach {at} ({msg}); check the host and port, and that the server is running")
}

/// Is this a lost connection (worth reconnecting) rather than a refusal?
pub fn is_transient(e: &tokio_postgres::Error) -> bool {
    e.is_closed() || (e.as_db_error().is_none() && std::error::Error::source(e).is_some())
}
