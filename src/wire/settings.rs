//! A wire client's startup settings (`application_name`, `DateStyle`,
//! `TimeZone`, `extra_float_digits`, `search_path`, `options=-c …`, ...),
//! honoured on whatever server session serves it.
//!
//! A server session remembers which client settings it holds
//! ([`crate::backend::Connection::client_settings`]). When a client is
//! attached, only the difference is sent: `RESET` for what the previous
//! client set and this one did not, `set_config` for what differs. The
//! statement rides in the same write as the client's first unit, and its
//! replies are swallowed, so it costs no round trip; clients that ask the
//! same (every psql with `application_name = psql`) cost nothing at all.

/// Startup parameters that are not session settings.
const NOT_SETTINGS: [&str; 5] = [
    "user",
    "database",
    "options",
    "replication",
    "client_encoding",
];

/// The session settings a client's startup parameters ask for, sorted by
/// name (lower case, as PostgreSQL names them), or why one is unusable.
pub fn from_startup(parameters: &[(String, String)]) -> Result<Vec<(String, String)>, String> {
    let mut settings = Vec::new();
    for (name, value) in parameters {
        if NOT_SETTINGS.contains(&name.as_str()) || name.starts_with("_pq_.") {
            continue;
        }
        settings.push(setting(name, value)?);
    }
    if let Some((_, options)) = parameters.iter().find(|(name, _)| name == "options") {
        for (name, value) in parse_options(options)? {
            settings.push(setting(&name, &value)?);
        }
    }
    settings.sort();
    settings.dedup_by(|later, earlier| later.0 == earlier.0);
    Ok(settings)
}

fn setting(name: &str, value: &str) -> Result<(String, String), String> {
    let name = name.to_ascii_lowercase();
    let valid = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.');
    if !valid {
        return Err(format!("invalid configuration parameter name {name:?}"));
    }
    Ok((name, value.to_owned()))
}

/// `-c name=value` and `--name=value` pairs of the `options` parameter,
/// with `\` escaping the next character (as libpq writes spaces).
fn parse_options(options: &str) -> Result<Vec<(String, String)>, String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut chars = options.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => word.extend(chars.next()),
            c if c.is_whitespace() => {
                if !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
            }
            c => word.push(c),
        }
    }
    if !word.is_empty() {
        words.push(word);
    }
    let mut pairs = Vec::new();
    let mut words = words.into_iter();
    while let Some(word) = words.next() {
        let assignment = if word == "-c" {
            words.next().ok_or("options: -c without a setting")?
        } else if let Some(rest) = word.strip_prefix("-c").or(word.strip_prefix("--")) {
            rest.replace('-', "_")
        } else {
            return Err(format!(
                "options: unsupported {word:?} (only -c name=value)"
            ));
        };
        let (name, value) = assignment
            .split_once('=')
            .ok_or_else(|| format!("options: {assignment:?} is not name=value"))?;
        pairs.push((name.to_owned(), value.to_owned()));
    }
    Ok(pairs)
}

/// The statement that turns the settings a session holds (`held`) into
/// those a client wants (`wanted`), both sorted; `None` when they agree.
pub fn changes(held: &[(String, String)], wanted: &[(String, String)]) -> Option<String> {
    let mut sql = String::new();
    for (name, _) in held {
        if !wanted.iter().any(|(n, _)| n == name) {
            sql.push_str(&format!("RESET {name}; "));
        }
    }
    let sets: Vec<String> = wanted
        .iter()
        .filter(|pair| !held.contains(pair))
        .map(|(name, value)| format!("pg_catalog.set_config('{name}', {}, false)", literal(value)))
        .collect();
    if !sets.is_empty() {
        sql.push_str("SELECT ");
        sql.push_str(&sets.join(", "));
    }
    (!sql.is_empty()).then_some(sql)
}

/// `value` as an escaped string literal, whatever
/// `standard_conforming_strings` says.
fn literal(value: &str) -> String {
    format!("E'{}'", value.replace('\\', "\\\\").replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn startup_parameters_become_sorted_settings_with_options_unpacked() {
        let startup = pairs(&[
            ("user", "app"),
            ("database", "db"),
            ("client_encoding", "UTF8"),
            ("application_name", "psql"),
            ("DateStyle", "ISO, MDY"),
            (
                "options",
                "-c search_path=app,public --statement-timeout=5s -c x.y=a\\ b",
            ),
        ]);
        assert_eq!(
            from_startup(&startup).unwrap(),
            pairs(&[
                ("application_name", "psql"),
                ("datestyle", "ISO, MDY"),
                ("search_path", "app,public"),
                ("statement_timeout", "5s"),
                ("x.y", "a b"),
            ])
        );
        assert!(from_startup(&pairs(&[("bad name; DROP", "x")])).is_err());
        assert!(from_startup(&pairs(&[("options", "-X")])).is_err());
    }

    #[test]
    fn only_the_difference_is_sent_and_values_are_quoted() {
        let held = pairs(&[("application_name", "psql"), ("timezone", "UTC")]);
        assert_eq!(changes(&held, &held), None);
        let wanted = pairs(&[("application_name", "it's")]);
        assert_eq!(
            changes(&held, &wanted).unwrap(),
            "RESET timezone; SELECT pg_catalog.set_config('application_name', E'it''s', false)"
        );
        assert_eq!(
            changes(&held, &[]).unwrap(),
            "RESET application_name; RESET timezone; "
        );
        let backslash = pairs(&[("search_path", "a\\b")]);
        assert!(changes(&[], &backslash).unwrap().contains("E'a\\\\b'"));
    }
}
