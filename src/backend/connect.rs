//! Opening a backend connection: socket, TLS negotiation, startup and authentication.

use std::sync::Arc;

use bytes::BytesMut;
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{ChannelBinding, SCRAM_SHA_256, ScramSha256};
use postgres_protocol::message::backend::{AuthenticationSaslBody, Message};
use postgres_protocol::message::frontend;
use rustls::ClientConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio_rustls::TlsConnector;

use super::connection::Connection;
use super::error::{BackendError, DbError, Stage};
use super::framing::{message_name, protocol};
use super::options::{ConnectOptions, Host, SslMode};
use super::stream::Socket;
use super::tls;

/// Opens connections to one server; cheap to clone and shared by a pool.
///
/// The TLS configuration is prepared once here, so a bad `sslrootcert` is
/// reported when the connector is built, not on the first reconnect.
#[derive(Clone, Debug)]
pub struct Connector {
    options: Arc<ConnectOptions>,
    tls: Option<Arc<ClientConfig>>,
}

impl Connector {
    /// Validates the options and prepares TLS.
    pub fn new(options: ConnectOptions) -> Result<Self, BackendError> {
        let tls = match options.host {
            // PostgreSQL never negotiates TLS on a Unix socket.
            Host::Unix(_) => None,
            Host::Tcp(_) => tls::client_config(options.ssl_mode, options.ssl_root_cert.as_deref())?,
        };
        Ok(Self {
            options: Arc::new(options),
            tls,
        })
    }

    /// The options this connector was built from.
    pub fn options(&self) -> &ConnectOptions {
        &self.options
    }

    /// Opens, secures, starts up and authenticates a new connection, within `connect_timeout`.
    pub async fn connect(&self) -> Result<Connection, BackendError> {
        let started = tokio::time::timeout(self.options.connect_timeout, async {
            let socket = self.open_socket().await?;
            Connection::start(socket, self.clone()).await
        });
        started.await.unwrap_or_else(|_| Err(self.timed_out()))
    }

    pub(crate) fn timed_out(&self) -> BackendError {
        BackendError::ConnectTimeout {
            target: self.options.describe_target(),
        }
    }

    /// Opens the transport and negotiates TLS as `sslmode` says; used for
    /// sessions and for cancel requests alike.
    pub(crate) async fn open_socket(&self) -> Result<Socket, BackendError> {
        let target = self.options.describe_target();
        let connect_error = |source| BackendError::Connect {
            target: target.clone(),
            source,
        };
        match &self.options.host {
            Host::Unix(dir) => {
                let path = dir.join(format!(".s.PGSQL.{}", self.options.port));
                let stream = UnixStream::connect(path).await.map_err(connect_error)?;
                Ok(Socket::Unix(stream))
            }
            Host::Tcp(name) => {
                let stream = TcpStream::connect((name.as_str(), self.options.port))
                    .await
                    .map_err(connect_error)?;
                stream.set_nodelay(true).map_err(connect_error)?;
                self.negotiate_tls(stream, name).await
            }
        }
    }

    async fn negotiate_tls(
        &self,
        mut stream: TcpStream,
        host: &str,
    ) -> Result<Socket, BackendError> {
        let Some(config) = &self.tls else {
            return Ok(Socket::Tcp(stream));
        };
        let mut request = BytesMut::new();
        frontend::ssl_request(&mut request);
        stream
            .write_all(&request)
            .await
            .map_err(BackendError::io(Stage::Connecting))?;
        let answer = stream
            .read_u8()
            .await
            .map_err(BackendError::io(Stage::Connecting))?;
        match (answer, self.options.ssl_mode) {
            (b'S', _) => {
                let connector = TlsConnector::from(config.clone());
                let tls = connector
                    .connect(tls::server_name(host)?, stream)
                    .await
                    .map_err(|e| BackendError::Tls(e.to_string()))?;
                Ok(Socket::Tls(Box::new(tls)))
            }
            (b'N', SslMode::Prefer) => Ok(Socket::Tcp(stream)),
            (b'N', mode) => Err(BackendError::Tls(format!(
                "the server does not support TLS, but sslmode is {mode:?}"
            ))),
            (other, _) => Err(BackendError::Protocol(format!(
                "unexpected answer {other:#04x} to the TLS request"
            ))),
        }
    }
}

impl Connection {
    /// Sends the startup message, authenticates and waits for the first ReadyForQuery.
    async fn start(socket: Socket, connector: Connector) -> Result<Connection, BackendError> {
        let mut conn = Connection::new(socket, connector);
        conn.send_startup()?;
        conn.framer.flush(Stage::Connecting).await?;
        conn.authenticate().await?;
        conn.await_ready_for_query().await?;
        conn.startup_done();
        Ok(conn)
    }

    fn send_startup(&mut self) -> Result<(), BackendError> {
        let options = self.connector().options().clone();
        let mut params = vec![
            ("user", options.user.as_str()),
            ("database", options.database.as_str()),
            ("application_name", options.application_name.as_str()),
            ("client_encoding", "UTF8"),
        ];
        if let Some(extra) = &options.options {
            params.push(("options", extra.as_str()));
        }
        frontend::startup_message(params, self.framer.write_buf())
            .map_err(|e| BackendError::Config(format!("invalid startup parameter: {e}")))
    }

    async fn authenticate(&mut self) -> Result<(), BackendError> {
        loop {
            match self.framer.read_message(Stage::Connecting).await? {
                Message::AuthenticationOk => return Ok(()),
                Message::AuthenticationCleartextPassword => {
                    let password = self.password()?;
                    self.send_password(password.as_bytes()).await?;
                }
                Message::AuthenticationMd5Password(body) => {
                    let password = self.password()?;
                    let user = self.connector().options().user.clone();
                    let hash = md5_hash(user.as_bytes(), password.as_bytes(), body.salt());
                    self.send_password(hash.as_bytes()).await?;
                }
                Message::AuthenticationSasl(body) => self.authenticate_scram(&body).await?,
                Message::ErrorResponse(body) => {
                    return Err(auth_failure(DbError::parse(body.fields())));
                }
                other => return Err(unsupported_auth(&other)),
            }
        }
    }

    async fn authenticate_scram(
        &mut self,
        body: &AuthenticationSaslBody,
    ) -> Result<(), BackendError> {
        let offered: Vec<String> = body
            .mechanisms()
            .map(|m| Ok(m.to_owned()))
            .collect()
            .map_err(|e| BackendError::Protocol(e.to_string()))?;
        if !offered.iter().any(|m| m == SCRAM_SHA_256) {
            return Err(BackendError::AuthMethod(format!(
                "the server offers only {offered:?}; SCRAM-SHA-256 is supported"
            )));
        }
        // Channel binding is not negotiated: "n" is always accepted by the
        // server, while "y" would be refused when the server offers -PLUS.
        let password = self.password()?;
        let mut scram = ScramSha256::new(password.as_bytes(), ChannelBinding::unsupported());
        frontend::sasl_initial_response(SCRAM_SHA_256, scram.message(), self.framer.write_buf())
            .map_err(|e| BackendError::Protocol(e.to_string()))?;
        self.framer.flush(Stage::Connecting).await?;
        let server_first = match self.framer.read_message(Stage::Connecting).await? {
            Message::AuthenticationSaslContinue(body) => body,
            Message::ErrorResponse(body) => {
                return Err(auth_failure(DbError::parse(body.fields())));
            }
            other => return Err(unexpected_in_auth(&other)),
        };
        scram
            .update(server_first.data())
            .map_err(|e| BackendError::AuthMethod(format!("SCRAM exchange failed: {e}")))?;
        frontend::sasl_response(scram.message(), self.framer.write_buf())
            .map_err(|e| BackendError::Protocol(e.to_string()))?;
        self.framer.flush(Stage::Connecting).await?;
        let server_final = match self.framer.read_message(Stage::Connecting).await? {
            Message::AuthenticationSaslFinal(body) => body,
            Message::ErrorResponse(body) => {
                return Err(auth_failure(DbError::parse(body.fields())));
            }
            other => return Err(unexpected_in_auth(&other)),
        };
        scram.finish(server_final.data()).map_err(|e| {
            BackendError::AuthMethod(format!("the server's SCRAM proof is invalid: {e}"))
        })
    }

    fn password(&self) -> Result<String, BackendError> {
        self.connector()
            .options()
            .password
            .as_ref()
            .map(|p| p.expose().to_owned())
            .ok_or_else(|| {
                BackendError::AuthMethod(
                    "the server asks for a password, but none is configured".into(),
                )
            })
    }

    async fn send_password(&mut self, password: &[u8]) -> Result<(), BackendError> {
        frontend::password_message(password, self.framer.write_buf())
            .map_err(|e| BackendError::Protocol(e.to_string()))?;
        self.framer.flush(Stage::Connecting).await
    }

    async fn await_ready_for_query(&mut self) -> Result<(), BackendError> {
        loop {
            match self.framer.read_message(Stage::Connecting).await? {
                Message::BackendKeyData(body) => {
                    self.set_backend_key(body.process_id(), body.secret_key())
                }
                Message::ReadyForQuery(body) => {
                    self.set_transaction_status(body.status())?;
                    return Ok(());
                }
                Message::ErrorResponse(body) => {
                    let error = DbError::parse(body.fields()).map_err(protocol)?;
                    return Err(BackendError::Fatal(Box::new(error)));
                }
                other => return Err(unexpected_in_auth(&other)),
            }
        }
    }
}

fn auth_failure(parsed: std::io::Result<DbError>) -> BackendError {
    match parsed {
        Ok(error) if error.code.starts_with("28") => BackendError::AuthRejected(Box::new(error)),
        Ok(error) => BackendError::Fatal(Box::new(error)),
        Err(e) => protocol(e),
    }
}

fn unsupported_auth(message: &Message) -> BackendError {
    let method = match message {
        Message::AuthenticationGss | Message::AuthenticationGssContinue(_) => "GSSAPI",
        Message::AuthenticationSspi => "SSPI",
        Message::AuthenticationKerberosV5 => "Kerberos V5",
        Message::AuthenticationScmCredential => "SCM credentials",
        _ => return unexpected_in_auth(message),
    };
    BackendError::AuthMethod(format!(
        "the server asks for {method}; supported are trust, password, md5 and SCRAM-SHA-256"
    ))
}

fn unexpected_in_auth(message: &Message) -> BackendError {
    BackendError::Protocol(format!(
        "unexpected message during startup: {}",
        message_name(message)
    ))
}
