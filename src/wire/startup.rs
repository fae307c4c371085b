//! One client's startup, from its first packet to its first ReadyForQuery.
//!
//! Every refusal (a wrong password `28P01`, another database `3D000`, too
//! many clients `53300`, an encoding pgwarden does not serve) is answered
//! before any server session is used, so a client that may not connect
//! costs the database nothing. The client learns the real server's
//! parameters (server_version, ...), taken from a pooled session, and a
//! cancel key of pgwarden's own.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::BytesMut;
use subtle::ConstantTimeEq;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tracing::info;

use super::Wire;
use super::cancel::Registration;
use super::messages::{self, Initial, PROTOCOL_3_0, WireError};
use super::scram::{ScramServer, ScramVerifier};
use super::settings;
use crate::backend::BackendError;
use crate::telemetry::labels::WireConnection;

/// Largest packet accepted before authentication.
pub(crate) const MAX_STARTUP_PACKET: usize = 10_000;

/// A client that finished startup.
#[derive(Debug)]
pub struct Client {
    /// Its cancel key and what it runs.
    pub(crate) registration: Registration,
    /// The session settings its startup asked for, sorted by name.
    pub settings: Vec<(String, String)>,
}

/// Runs the startup of one connection, from its `first` packet when that
/// was already read. `None` when the connection was a cancel request
/// (handled) or a refused client (answered).
pub(crate) async fn run<S>(
    wire: &Wire,
    stream: &mut S,
    mut first: Option<Initial>,
    clients: usize,
    private: bool,
) -> Result<Option<Client>, WireError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let parameters = loop {
        let packet = match first.take() {
            Some(packet) => packet,
            None => messages::read_initial(stream, MAX_STARTUP_PACKET).await?,
        };
        match packet {
            // TLS here means none is configured, or it is already on; no
            // GSSAPI encryption: the client may go on in the clear or give
            // up, as with a server without them.
            Initial::SslRequest | Initial::GssEncRequest => stream.write_all(b"N").await?,
            Initial::Cancel {
                process_id,
                secret_key,
            } => {
                wire.cancels.cancel(process_id, secret_key);
                wire.metrics.wire_connection(WireConnection::Cancel);
                return Ok(None);
            }
            Initial::Startup {
                version,
                parameters,
            } => {
                negotiate(stream, version, &parameters).await?;
                break parameters;
            }
        }
    };
    let startup = Startup::from(parameters);
    if let Some((code, text)) = refusal(wire, &startup, clients) {
        return refuse(wire, stream, code, &text).await;
    }
    if !authenticate(wire, stream, &startup, private).await? {
        let text = format!(
            "password authentication failed for user \"{}\"",
            startup.user
        );
        return refuse(wire, stream, "28P01", &text).await;
    }
    greet(wire, stream, startup).await.map(Some)
}

/// What a client's startup packet says.
struct Startup {
    user: String,
    database: String,
    client_encoding: Option<String>,
    /// The session settings asked for, or why they are unusable.
    settings: Result<Vec<(String, String)>, String>,
}

impl From<Vec<(String, String)>> for Startup {
    fn from(parameters: Vec<(String, String)>) -> Self {
        let get = |name: &str| {
            parameters
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.clone())
        };
        let user = get("user").unwrap_or_default();
        Startup {
            database: get("database").unwrap_or_else(|| user.clone()),
            client_encoding: get("client_encoding"),
            settings: settings::from_startup(&parameters),
            user,
        }
    }
}

/// A client asking a newer minor version or protocol options is told what
/// pgwarden speaks (3.0, none of the options), as PostgreSQL does.
async fn negotiate<S>(
    stream: &mut S,
    version: i32,
    parameters: &[(String, String)],
) -> Result<(), WireError>
where
    S: AsyncWrite + Unpin,
{
    let options: Vec<String> = parameters
        .iter()
        .filter(|(name, _)| name.starts_with("_pq_."))
        .map(|(name, _)| name.clone())
        .collect();
    if version == PROTOCOL_3_0 && options.is_empty() {
        return Ok(());
    }
    let mut buf = BytesMut::new();
    messages::negotiate_protocol_version(&mut buf, &options);
    stream.write_all(&buf).await?;
    Ok(())
}

/// Why a client may not connect, checked before any authentication.
fn refusal(wire: &Wire, startup: &Startup, clients: usize) -> Option<(&'static str, String)> {
    if startup.user.is_empty() {
        return Some((
            "28000",
            "no PostgreSQL user name specified in startup packet".into(),
        ));
    }
    if clients > wire.limits.max_clients {
        return Some(("53300", "sorry, too many clients already".into()));
    }
    if startup.database != wire.auth.database {
        return Some((
            "3D000",
            format!("database \"{}\" does not exist", startup.database),
        ));
    }
    let encoding = startup.client_encoding.as_deref().unwrap_or("UTF8");
    if !is_utf8(encoding) {
        let text = format!("client_encoding {encoding:?} is not served: pgwarden serves UTF8");
        return Some(("22023", text));
    }
    if let Err(problem) = &startup.settings {
        return Some(("42704", problem.clone()));
    }
    if wire.auth.verifier.is_none() && startup.user != wire.auth.user {
        return Some(("28000", format!("role \"{}\" does not exist", startup.user)));
    }
    None
}

/// True when `encoding` names UTF-8 as PostgreSQL reads encoding names:
/// case and anything but letters and digits ignored (asyncpg sends
/// `'utf-8'`, quotes included).
fn is_utf8(encoding: &str) -> bool {
    let name: String = encoding
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .map(|c| c.to_ascii_lowercase())
        .collect();
    name == "utf8" || name == "unicode"
}

/// Proves the configured password with SCRAM-SHA-256, when one is set.
/// The user name is compared in constant time after the proof, so a wrong
/// user and a wrong password look the same from outside.
async fn authenticate<S>(
    wire: &Wire,
    stream: &mut S,
    startup: &Startup,
    private: bool,
) -> Result<bool, WireError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let Some(verifier) = &wire.auth.verifier else {
        return Ok(true);
    };
    if wire.auth.cleartext && private {
        return cleartext(wire, stream, startup, verifier).await;
    }
    let mut exchange = verifier.exchange();
    let mut buf = BytesMut::new();
    messages::authentication_sasl(&mut buf, ScramServer::MECHANISMS);
    stream.write_all(&buf).await?;
    let initial = read_password_message(stream).await?;
    let (mechanism, client_first) = sasl_initial(&initial)?;
    if !ScramServer::MECHANISMS.contains(&mechanism.as_str()) {
        return Err(WireError::Protocol(format!(
            "unsupported SASL mechanism {mechanism:?}"
        )));
    }
    let Ok(server_first) = exchange.server_first(client_first) else {
        return Ok(false);
    };
    buf.clear();
    messages::authentication_sasl_data(&mut buf, 11, &server_first);
    stream.write_all(&buf).await?;
    let client_final = read_password_message(stream).await?;
    let Ok(server_final) = exchange.server_final(&client_final) else {
        return Ok(false);
    };
    let same_user = bool::from(startup.user.as_bytes().ct_eq(wire.auth.user.as_bytes()));
    if !same_user {
        return Ok(false);
    }
    buf.clear();
    messages::authentication_sasl_data(&mut buf, 12, &server_final);
    stream.write_all(&buf).await?;
    Ok(true)
}

/// The password itself, checked against the verifier (a key derivation,
/// off the async workers), and the user name, both in constant time.
async fn cleartext<S>(
    wire: &Wire,
    stream: &mut S,
    startup: &Startup,
    verifier: &Arc<ScramVerifier>,
) -> Result<bool, WireError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut buf = BytesMut::new();
    messages::authentication_cleartext(&mut buf);
    stream.write_all(&buf).await?;
    let message = read_password_message(stream).await?;
    let password = message.strip_suffix(&[0]).unwrap_or(&message);
    let password = String::from_utf8_lossy(password).into_owned();
    let verifier = verifier.clone();
    let matches = tokio::task::spawn_blocking(move || verifier.matches_password(&password))
        .await
        .unwrap_or(false);
    let same_user = bool::from(startup.user.as_bytes().ct_eq(wire.auth.user.as_bytes()));
    Ok(matches && same_user)
}

/// Reads a PasswordMessage-type message ('p') during authentication.
async fn read_password_message<S>(stream: &mut S) -> Result<Vec<u8>, WireError>
where
    S: AsyncRead + Unpin,
{
    let tag = stream.read_u8().await?;
    let len = stream.read_i32().await?;
    if tag != b'p' || !(4..=MAX_STARTUP_PACKET as i32).contains(&len) {
        return Err(WireError::Protocol("expected a password message".into()));
    }
    let mut body = vec![0; len as usize - 4];
    stream.read_exact(&mut body).await?;
    Ok(body)
}

/// The mechanism and data of a SASLInitialResponse.
fn sasl_initial(body: &[u8]) -> Result<(String, &[u8]), WireError> {
    let mut rest = body;
    let mechanism = messages::take_cstr(&mut rest)?;
    let len = rest
        .get(..4)
        .map(|b| i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        .ok_or_else(|| WireError::Protocol("truncated SASLInitialResponse".into()))?;
    let data = &rest[4..];
    if len < 0 || len as usize != data.len() {
        return Err(WireError::Protocol("malformed SASLInitialResponse".into()));
    }
    Ok((mechanism, data))
}

/// Answers a refused client with a FATAL error, as PostgreSQL does.
async fn refuse<S>(
    wire: &Wire,
    stream: &mut S,
    code: &str,
    text: &str,
) -> Result<Option<Client>, WireError>
where
    S: AsyncWrite + Unpin,
{
    info!(code, reason = text, "Wire client refused.");
    let result = match code {
        "28P01" | "28000" => WireConnection::Auth,
        "3D000" => WireConnection::Database,
        "53300" => WireConnection::TooMany,
        _ => WireConnection::Refused,
    };
    wire.metrics.wire_connection(result);
    let mut buf = BytesMut::new();
    messages::error_response(&mut buf, "FATAL", code, text);
    stream.write_all(&buf).await?;
    Ok(None)
}

/// AuthenticationOk, the server's parameters, the cancel key, ready.
async fn greet<S>(wire: &Wire, stream: &mut S, startup: Startup) -> Result<Client, WireError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let settings = startup.settings.unwrap_or_default();
    let parameters = match server_parameters(wire, &settings).await {
        Ok(parameters) => parameters,
        Err((code, text)) => {
            refuse(wire, stream, &code, &text).await?;
            return Err(WireError::Protocol(text));
        }
    };
    let registration = wire.cancels.register();
    let mut buf = BytesMut::new();
    messages::authentication_ok(&mut buf);
    for (name, value) in &parameters {
        messages::parameter_status(&mut buf, name, value);
    }
    messages::backend_key_data(&mut buf, registration.process_id, registration.secret_key);
    messages::ready_for_query(&mut buf, b'I');
    stream.write_all(&buf).await?;
    wire.metrics.wire_connection(WireConnection::Accepted);
    Ok(Client {
        registration,
        settings,
    })
}

/// The server's ParameterStatus values as this client will see them. On a
/// pooled session, when the guard admits one within its budget, the
/// client's settings are tried (a value the server refuses refuses the
/// client, as PostgreSQL would), and the values reported then are the
/// client's. Without a session, the last values learned serve.
async fn server_parameters(
    wire: &Wire,
    settings: &[(String, String)],
) -> Result<Vec<(String, String)>, (String, String)> {
    let unavailable = || {
        (
            "57P03".to_owned(),
            "the database system is not available yet".to_owned(),
        )
    };
    let answers = || {
        wire.server_parameters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    };
    if let Some(generation) = wire.guard.generation_id()
        && let Some(known) = answers().get(generation, settings)
    {
        return Ok(known);
    }
    let Ok(mut lease) = wire.guard.admit().await else {
        let known = answers().defaults.clone();
        return if known.is_empty() {
            Err(unavailable())
        } else {
            Ok(reported(&known, settings))
        };
    };
    let generation = lease.generation().id();
    let conn = lease.conn();
    let defaults = collect(conn.parameters());
    answers().learn_defaults(generation, &defaults);
    let Some(sql) = settings::changes(&[], settings) else {
        return Ok(defaults);
    };
    match conn.simple_query(&sql).await {
        Ok(_) => {
            let parameters = collect(conn.parameters());
            answers().learn(generation, settings, &parameters);
            Ok(parameters)
        }
        Err(BackendError::Sql { error, .. }) => Err((error.code.clone(), error.message.clone())),
        Err(_) => Ok(reported(&defaults, settings)),
    }
}

/// What the server answered the settings clients asked for, per
/// generation: a client asking what an earlier one asked (every pgbench,
/// every psql) starts without a server round trip, and without taking a
/// session another client could use. A new generation (another server,
/// perhaps another version) starts afresh.
#[derive(Debug, Default)]
pub(crate) struct Answers {
    generation: u64,
    /// The server's own values.
    defaults: Vec<(String, String)>,
    /// The values reported with each set of settings the server accepted.
    by_settings: HashMap<Settings, Settings>,
}

/// Names and values, sorted by name.
type Settings = Vec<(String, String)>;

/// Distinct sets of settings remembered at most; more start afresh.
const MAX_ANSWERS: usize = 256;

impl Answers {
    fn get(&self, generation: u64, settings: &[(String, String)]) -> Option<Vec<(String, String)>> {
        if generation != self.generation || self.defaults.is_empty() {
            return None;
        }
        if settings.is_empty() {
            return Some(self.defaults.clone());
        }
        self.by_settings.get(settings).cloned()
    }

    fn learn_defaults(&mut self, generation: u64, defaults: &[(String, String)]) {
        if generation != self.generation {
            self.by_settings.clear();
            self.generation = generation;
        }
        self.defaults = defaults.to_vec();
    }

    fn learn(
        &mut self,
        generation: u64,
        settings: &[(String, String)],
        parameters: &[(String, String)],
    ) {
        if generation != self.generation {
            return;
        }
        if self.by_settings.len() >= MAX_ANSWERS {
            self.by_settings.clear();
        }
        self.by_settings
            .insert(settings.to_vec(), parameters.to_vec());
    }
}

fn collect<'a>(parameters: impl Iterator<Item = (&'a str, &'a str)>) -> Vec<(String, String)> {
    let mut list: Vec<(String, String)> = parameters
        .map(|(n, v)| (n.to_owned(), v.to_owned()))
        .collect();
    list.sort();
    list
}

/// The server's values, with the client's own where it set a reported one
/// (names compared case-insensitively: `DateStyle` is `datestyle`).
fn reported(defaults: &[(String, String)], settings: &[(String, String)]) -> Vec<(String, String)> {
    defaults
        .iter()
        .map(|(name, value)| {
            let own = settings
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map_or(value, |(_, v)| v);
            (name.clone(), own.clone())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf8_is_recognised_however_a_driver_spells_it() {
        for name in ["UTF8", "utf-8", "'utf-8'", "Unicode", "utf_8"] {
            assert!(is_utf8(name), "{name}");
        }
        for name in ["LATIN1", "SQL_ASCII", "utf16", ""] {
            assert!(!is_utf8(name), "{name}");
        }
    }
}
