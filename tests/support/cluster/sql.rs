//! Running SQL on a cluster through `psql`, the reference client.
//!
//! `psql_rows` is used to compare pgwarden's own protocol code byte for byte
//! against psql, so values must come back exactly as the server sent them:
//! fields and rows are separated by ASCII unit/record separators (which do
//! not occur in ordinary data, unlike newlines, tabs, `|`, commas or quotes),
//! and NULL is printed as a marker that no realistic value equals.

use std::time::Duration;

use super::{Cluster, os, process, users};

/// Separates fields of a row in `psql_rows` output (ASCII unit separator).
const FIELD_SEPARATOR: char = '\u{1f}';

/// Separates rows in `psql_rows` output (ASCII record separator).
const RECORD_SEPARATOR: char = '\u{1e}';

/// What psql prints for NULL in `psql_rows`.
const NULL_MARKER: &str = "\u{1a}pgwarden-kit-NULL\u{1a}";

/// Longest a helper query may take, including a connection to a slow server.
const PSQL_TIMEOUT: Duration = Duration::from_secs(60);

impl Cluster {
    /// Runs `sql` (one or more statements) as the superuser over the unix
    /// socket and returns psql's stdout.
    ///
    /// Output is unaligned and tuples-only (`-A -t`), so `select 1` gives
    /// `"1\n"`; command tags are suppressed (`-q`). Stops at the first error
    /// (`ON_ERROR_STOP`) and panics with psql's stderr.
    #[track_caller]
    pub fn psql(&self, sql: &str) -> String {
        let stdout = self.run_psql(&["-A", "-t"], sql);
        String::from_utf8(stdout).expect("psql output is UTF-8")
    }

    /// Runs one row-returning query as the superuser and returns its rows
    /// exactly as psql received them; SQL NULL becomes `None`.
    ///
    /// Values may contain anything but the ASCII unit and record separators
    /// (`\x1f`, `\x1e`); a row of unexpected width reveals those and panics.
    #[track_caller]
    pub fn psql_rows(&self, sql: &str) -> Vec<Vec<Option<String>>> {
        let field_separator = format!("fieldsep={FIELD_SEPARATOR}");
        let record_separator = format!("recordsep={RECORD_SEPARATOR}");
        let null = format!("null={NULL_MARKER}");
        let args = [
            "-A",
            "-t",
            "-P",
            &field_separator,
            "-P",
            &record_separator,
            "-P",
            &null,
        ];
        let stdout = self.run_psql(&args, sql);
        let text = String::from_utf8(stdout).expect("psql output is UTF-8");
        parse_rows(&text)
            .unwrap_or_else(|e| panic!("psql_rows({sql:?}): {e}; raw output: {text:?}"))
    }

    /// Like [`Cluster::psql`], but a failure (the server is down or
    /// recovering) is returned instead of failing the test.
    pub fn try_psql(&self, sql: &str) -> Result<String, String> {
        match self.psql_output(&["-A", "-t"], sql) {
            Ok(output) if output.status.success() => {
                String::from_utf8(output.stdout).map_err(|e| e.to_string())
            }
            Ok(output) => Err(String::from_utf8_lossy(&output.stderr).into_owned()),
            Err(e) => Err(e),
        }
    }

    /// Runs psql with the kit's connection settings plus `extra_args`, feeding `sql` on stdin.
    #[track_caller]
    fn run_psql(&self, extra_args: &[&str], sql: &str) -> Vec<u8> {
        match self.psql_output(extra_args, sql) {
            Ok(output) if output.status.success() => output.stdout,
            Ok(output) => self.fail(&format!(
                "psql failed ({}) running {sql:?}:\n{}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            )),
            Err(e) => self.fail(&format!("psql running {sql:?}: {e}")),
        }
    }

    fn psql_output(&self, extra_args: &[&str], sql: &str) -> Result<std::process::Output, String> {
        let mut cmd = os::client_command(&self.bin, "psql");
        cmd.args([
            "-X",
            "-q",
            "-w",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            "postgres",
            "-U",
            users::SUPERUSER,
        ])
        .arg("-h")
        .arg(&self.socket_dir)
        .arg("-p")
        .arg(self.port.to_string())
        .args(extra_args)
        .args(["-f", "-"])
        .env("PGCLIENTENCODING", "UTF8")
        .env("PGCONNECT_TIMEOUT", "10")
        .env("PGAPPNAME", "pgwarden-kit");
        process::run(&mut cmd, Some(sql.as_bytes()), PSQL_TIMEOUT)
    }
}

/// Splits unaligned psql output into rows of fields.
///
/// psql separates rows with the record separator and ends the last row with
/// a newline instead; an empty result prints nothing at all. That newline is
/// the only byte removed, so values keep trailing whitespace and newlines.
fn parse_rows(text: &str) -> Result<Vec<Vec<Option<String>>>, String> {
    if text.is_empty() {
        return Ok(Vec::new());
    }
    let body = text
        .strip_suffix('\n')
        .ok_or("output does not end with the newline psql puts after the last row")?;
    let rows: Vec<Vec<Option<String>>> = body
        .split(RECORD_SEPARATOR)
        .map(|row| row.split(FIELD_SEPARATOR).map(parse_field).collect())
        .collect();
    let width = rows[0].len();
    match rows.iter().find(|row| row.len() != width) {
        Some(row) => Err(format!(
            "rows of {width} and {} fields: a value contains a separator, \
             or the SQL returned several results",
            row.len()
        )),
        None => Ok(rows),
    }
}

/// One field, with the NULL marker mapped to `None`.
fn parse_field(field: &str) -> Option<String> {
    (field != NULL_MARKER).then(|| field.to_owned())
}
