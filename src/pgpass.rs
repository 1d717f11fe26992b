//! libpq's password file: a URL without a password takes the one its first matching line gives,
//! as psql, pg_dump and PostgreSQL's own subscriptions do, so that an operator keeps the password
//! out of tandem's config (and out of `TANDEM_*_URL`, which `ps e` shows). Read from the file
//! `PGPASSFILE` names, or `~/.pgpass`; one group or others may read is ignored, as libpq ignores
//! it (the password would be readable by them).
//!
//! A line is `host:port:database:user:password`; `*` matches anything in the first four fields,
//! and `\:` and `\\` stand for `:` and `\`. Lines starting with `#` are comments.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Once;

/// Where a password came from, for an error that must say which line to fix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Source {
    pub file: PathBuf,
    /// 1-based.
    pub line: usize,
}

/// The connection as libpq matches it against the file: a Unix socket counts as `localhost`,
/// the port as its decimal text.
pub struct Target<'a> {
    pub host: &'a str,
    pub port: u16,
    pub database: &'a str,
    pub user: &'a str,
}

/// The password of the first line of `contents` that matches `to`, and that line's number.
pub fn find(contents: &str, to: &Target) -> Option<(String, usize)> {
    let port = to.port.to_string();
    let wanted = [to.host, port.as_str(), to.database, to.user];
    contents.lines().enumerate().find_map(|(i, line)| {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.is_empty() || line.starts_with('#') {
            return None;
        }
        let fields = fields(line);
        if fields.len() < 5 {
            return None;
        }
        let matches = fields
            .iter()
            .zip(wanted)
            .all(|(field, value)| field.any || field.text == value);
        matches.then(|| (fields[4].text.clone(), i + 1))
    })
}

/// A field of a line, its escapes removed; `any`: it is the bare `*` (an escaped one, `\*`, is
/// the character itself).
struct Field {
    text: String,
    any: bool,
}

/// `line` split at each `:` not escaped by a backslash.
fn fields(line: &str) -> Vec<Field> {
    let mut out = Vec::new();
    // The field so far, and whether it had an escape.
    let (mut text, mut escaped) = (String::new(), false);
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                escaped = true;
                text.push(chars.next().unwrap_or('\\'));
            }
            ':' => out.push(Field::new(
                std::mem::take(&mut text),
                std::mem::take(&mut escaped),
            )),
            c => text.push(c),
        }
    }
    out.push(Field::new(text, escaped));
    out
}

impl Field {
    fn new(text: String, escaped: bool) -> Field {
        Field {
            any: !escaped && text == "*",
            text,
        }
    }
}

/// The password file libpq would read: `PGPASSFILE`, or `~/.pgpass`.
fn path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("PGPASSFILE").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    std::env::var_os("HOME").map(|h| Path::new(&h).join(".pgpass"))
}

/// The password for `to` from the password file, if it has a line for it.
pub fn lookup(to: &Target) -> Option<(String, Source)> {
    let file = path()?;
    let meta = std::fs::metadata(&file).ok()?;
    if !meta.is_file() {
        return None;
    }
    if meta.permissions().mode() & 0o077 != 0 {
        static WARNED: Once = Once::new();
        WARNED.call_once(|| {
            tracing::warn!(
                "password file {} is readable by group or others, so it is ignored (as libpq \
                 ignores it); run `chmod 0600 {}`",
                file.display(),
                file.display()
            )
        });
        return None;
    }
    let contents = std::fs::read_to_string(&file).ok()?;
    let (password, line) = find(&contents, to)?;
    Some((password, Source { file, line }))
}

/// The operating system's name for this process's user, which libpq (and tokio-postgres)
/// connect as when the URL names no user.
pub fn os_user() -> Option<String> {
    let mut buf = vec![0u8; 4096];
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut out: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: getpwuid_r writes into `pwd` and `buf`, which outlive the call; `out` is null or
    // points at `pwd`, whose `pw_name` points into `buf`.
    let rc = unsafe {
        libc::getpwuid_r(
            libc::geteuid(),
            &mut pwd,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut out,
        )
    };
    if rc != 0 || out.is_null() {
        return None;
    }
    // SAFETY: pw_name is a NUL-terminated string inside `buf`.
    let name = unsafe { std::ffi::CStr::from_ptr(pwd.pw_name) };
    name.to_str().ok().map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn to<'a>(host: &'a str, port: u16, database: &'a str, user: &'a str) -> Target<'a> {
        Target {
            host,
            port,
            database,
            user,
        }
    }

    #[test]
    fn the_first_matching_line_gives_the_password() {
        let file = "# office\n\
                    office.lan:5432:app:tandem:first\n\
                    *:5432:app:tandem:second\n\
                    *:*:*:*:fallback\n";
        assert_eq!(
            find(file, &to("office.lan", 5432, "app", "tandem")),
            Some(("first".into(), 2))
        );
        assert_eq!(
            find(file, &to("db.supabase.co", 5432, "app", "tandem")),
            Some(("second".into(), 3))
        );
        assert_eq!(
            find(file, &to("office.lan", 6543, "app", "tandem")),
            Some(("fallback".into(), 4))
        );
        assert_eq!(
            find(
                "office.lan:5432:app:tandem:x\n",
                &to("h", 5432, "app", "tandem")
            ),
            None
        );
    }

    #[test]
    fn escapes_and_short_lines() {
        // `\:` and `\\` in the password and in a field; a line of four fields is skipped.
        let file = "h:5432:app:tandem\r\n\
                    h:5432:app:tandem:a\\:b\\\\c\r\n";
        assert_eq!(
            find(file, &to("h", 5432, "app", "tandem")),
            Some(("a:b\\c".into(), 2))
        );
        assert_eq!(
            find("h:5432:my\\:db:u:p\n", &to("h", 5432, "my:db", "u")),
            Some(("p".into(), 1))
        );
        // An escaped star is not the wildcard.
        assert_eq!(find("\\*:5432:app:u:p\n", &to("h", 5432, "app", "u")), None);
        assert_eq!(find("", &to("h", 5432, "app", "u")), None);
    }
}
