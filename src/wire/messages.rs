//! The PostgreSQL protocol as a server speaks it to its clients: the
//! packets a client sends before startup, the messages pgwarden itself
//! writes to a client (authentication, parameter status, errors, ready for
//! query), and the header that frames everything else.
//!
//! `postgres-protocol` encodes what a *client* sends and parses what a
//! *server* sends; a proxy also needs the other two directions, which are
//! small enough to write here. Everything after startup is forwarded as it
//! came, framed by its 5-byte header alone.

use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

/// Protocol 3.0, the only version pgwarden speaks.
pub const PROTOCOL_3_0: i32 = 196_608;
const SSL_REQUEST: i32 = 80_877_103;
const GSSENC_REQUEST: i32 = 80_877_104;
const CANCEL_REQUEST: i32 = 80_877_102;

/// A malformed or refused packet from a client.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// Reading or writing the client's socket failed, or it closed.
    #[error("client connection: {0}")]
    Io(#[from] std::io::Error),
    /// The client sent something the protocol does not allow here.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// A message announced more bytes than the configured cap.
    #[error("a message of {len} bytes is over the limit of {limit}")]
    TooLong {
        /// What the message announced.
        len: usize,
        /// The cap.
        limit: usize,
    },
}

/// The first packet of a client connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Initial {
    /// A StartupMessage: the protocol version and its parameters.
    Startup {
        /// `major << 16 | minor`.
        version: i32,
        /// `user`, `database`, `application_name`, `options`, ...
        parameters: Vec<(String, String)>,
    },
    /// The client asks for TLS.
    SslRequest,
    /// The client asks for GSSAPI encryption.
    GssEncRequest,
    /// A cancel request for the session with this key.
    Cancel {
        /// The process id pgwarden gave the client.
        process_id: i32,
        /// The secret pgwarden gave the client.
        secret_key: i32,
    },
}

/// Reads one length-prefixed packet sent before startup; `limit` bounds
/// its length, so a client cannot make pgwarden buffer an endless packet.
pub async fn read_initial<R: AsyncRead + Unpin>(
    reader: &mut R,
    limit: usize,
) -> Result<Initial, WireError> {
    let len = reader.read_i32().await?;
    if len < 8 {
        return Err(WireError::Protocol(format!(
            "startup packet of {len} bytes"
        )));
    }
    let len = len as usize;
    if len > limit {
        return Err(WireError::TooLong { len, limit });
    }
    let mut body = vec![0; len - 4];
    reader.read_exact(&mut body).await?;
    parse_initial(&body)
}

fn parse_initial(body: &[u8]) -> Result<Initial, WireError> {
    let code = i32::from_be_bytes([body[0], body[1], body[2], body[3]]);
    let rest = &body[4..];
    match code {
        SSL_REQUEST => Ok(Initial::SslRequest),
        GSSENC_REQUEST => Ok(Initial::GssEncRequest),
        CANCEL_REQUEST if rest.len() == 8 => Ok(Initial::Cancel {
            process_id: i32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]),
            secret_key: i32::from_be_bytes([rest[4], rest[5], rest[6], rest[7]]),
        }),
        CANCEL_REQUEST => Err(WireError::Protocol("malformed cancel request".into())),
        version if version >> 16 == 3 => Ok(Initial::Startup {
            version,
            parameters: parse_parameters(rest)?,
        }),
        other => Err(WireError::Protocol(format!(
            "unsupported frontend protocol {}.{}: the server supports 3.0",
            other >> 16,
            other & 0xffff
        ))),
    }
}

/// Name/value pairs of C strings, ended by an empty name.
fn parse_parameters(mut rest: &[u8]) -> Result<Vec<(String, String)>, WireError> {
    let mut parameters = Vec::new();
    loop {
        let name = take_cstr(&mut rest)?;
        if name.is_empty() {
            return Ok(parameters);
        }
        let value = take_cstr(&mut rest)?;
        parameters.push((name, value));
    }
}

/// Takes one NUL-terminated string off the front of `rest`.
pub fn take_cstr(rest: &mut &[u8]) -> Result<String, WireError> {
    let end = rest
        .iter()
        .position(|&b| b == 0)
        .ok_or_else(|| WireError::Protocol("string without its terminator".into()))?;
    let text = String::from_utf8(rest[..end].to_vec())
        .map_err(|_| WireError::Protocol("a startup string is not UTF-8".into()))?;
    *rest = &rest[end + 1..];
    Ok(text)
}

/// Type and whole length (type byte included) of the next message in
/// `buf`, once its 5-byte header is in.
pub fn peek_header(buf: &[u8]) -> Option<(u8, usize)> {
    let header = buf.get(..5)?;
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    Some((header[0], len + 1))
}

/// Writes a message of type `tag` whose body `body` writes.
fn message(buf: &mut BytesMut, tag: u8, body: impl FnOnce(&mut BytesMut)) {
    buf.put_u8(tag);
    let at = buf.len();
    buf.put_i32(0);
    body(buf);
    let len = (buf.len() - at) as i32;
    buf[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

fn put_cstr(buf: &mut BytesMut, text: &str) {
    buf.put_slice(text.as_bytes());
    buf.put_u8(0);
}

/// AuthenticationOk.
pub fn authentication_ok(buf: &mut BytesMut) {
    message(buf, b'R', |b| b.put_i32(0));
}

/// AuthenticationCleartextPassword.
pub fn authentication_cleartext(buf: &mut BytesMut) {
    message(buf, b'R', |b| b.put_i32(3));
}

/// AuthenticationSASL offering `mechanisms`.
pub fn authentication_sasl(buf: &mut BytesMut, mechanisms: &[&str]) {
    message(buf, b'R', |b| {
        b.put_i32(10);
        for mechanism in mechanisms {
            put_cstr(b, mechanism);
        }
        b.put_u8(0);
    });
}

/// AuthenticationSASLContinue (11) or AuthenticationSASLFinal (12).
pub fn authentication_sasl_data(buf: &mut BytesMut, code: i32, data: &[u8]) {
    message(buf, b'R', |b| {
        b.put_i32(code);
        b.put_slice(data);
    });
}

/// ParameterStatus.
pub fn parameter_status(buf: &mut BytesMut, name: &str, value: &str) {
    message(buf, b'S', |b| {
        put_cstr(b, name);
        put_cstr(b, value);
    });
}

/// BackendKeyData: the key a client presents to cancel.
pub fn backend_key_data(buf: &mut BytesMut, process_id: i32, secret_key: i32) {
    message(buf, b'K', |b| {
        b.put_i32(process_id);
        b.put_i32(secret_key);
    });
}

/// ReadyForQuery with transaction status `I`, `T` or `E`.
pub fn ready_for_query(buf: &mut BytesMut, status: u8) {
    message(buf, b'Z', |b| b.put_u8(status));
}

/// ParseComplete, for a Parse pgwarden did not need to send.
pub fn parse_complete(buf: &mut BytesMut) {
    message(buf, b'1', |_| {});
}

/// BindComplete, for a Bind answered without the server.
pub fn bind_complete(buf: &mut BytesMut) {
    message(buf, b'2', |_| {});
}

/// NoData: the described statement or portal returns no rows.
pub fn no_data(buf: &mut BytesMut) {
    message(buf, b'n', |_| {});
}

/// ParameterDescription of a statement without parameters.
pub fn no_parameters(buf: &mut BytesMut) {
    message(buf, b't', |b| b.put_i16(0));
}

/// CloseComplete, for a Close pgwarden did not need to send.
pub fn close_complete(buf: &mut BytesMut) {
    message(buf, b'3', |_| {});
}

/// CommandComplete with its command tag.
pub fn command_complete(buf: &mut BytesMut, tag: &str) {
    message(buf, b'C', |b| put_cstr(b, tag));
}

/// NegotiateProtocolVersion: pgwarden speaks 3.0, and none of the
/// protocol options (`_pq_.*`) the client asked for.
pub fn negotiate_protocol_version(buf: &mut BytesMut, options: &[String]) {
    message(buf, b'v', |b| {
        b.put_i32(PROTOCOL_3_0);
        b.put_i32(options.len() as i32);
        for option in options {
            put_cstr(b, option);
        }
    });
}

/// ErrorResponse with severity `ERROR` or `FATAL`, a SQLSTATE and a message.
pub fn error_response(buf: &mut BytesMut, severity: &str, code: &str, text: &str) {
    report(buf, b'E', severity, code, text);
}

/// NoticeResponse with its severity, SQLSTATE and message: a warning the
/// client may get at any time, between its statements too.
pub fn notice_response(buf: &mut BytesMut, severity: &str, code: &str, text: &str) {
    report(buf, b'N', severity, code, text);
}

fn report(buf: &mut BytesMut, tag: u8, severity: &str, code: &str, text: &str) {
    message(buf, tag, |b| {
        for (field, value) in [
            (b'S', severity),
            (b'V', severity),
            (b'C', code),
            (b'M', text),
        ] {
            b.put_u8(field);
            put_cstr(b, value);
        }
        b.put_u8(0);
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_protocol::message::backend::Message;

    #[test]
    fn what_pgwarden_writes_parses_as_the_protocol_says() {
        let mut buf = BytesMut::new();
        authentication_ok(&mut buf);
        parameter_status(&mut buf, "server_version", "15.19");
        backend_key_data(&mut buf, 7, -9);
        error_response(&mut buf, "ERROR", "57P03", "not now");
        ready_for_query(&mut buf, b'I');
        assert!(matches!(
            Message::parse(&mut buf).unwrap(),
            Some(Message::AuthenticationOk)
        ));
        match Message::parse(&mut buf).unwrap() {
            Some(Message::ParameterStatus(body)) => {
                assert_eq!(body.name().unwrap(), "server_version");
                assert_eq!(body.value().unwrap(), "15.19");
            }
            other => panic!("{:?}", other.is_some()),
        }
        match Message::parse(&mut buf).unwrap() {
            Some(Message::BackendKeyData(body)) => {
                assert_eq!((body.process_id(), body.secret_key()), (7, -9));
            }
            other => panic!("{:?}", other.is_some()),
        }
        assert!(matches!(
            Message::parse(&mut buf).unwrap(),
            Some(Message::ErrorResponse(_))
        ));
        match Message::parse(&mut buf).unwrap() {
            Some(Message::ReadyForQuery(body)) => assert_eq!(body.status(), b'I'),
            other => panic!("{:?}", other.is_some()),
        }
        assert!(buf.is_empty());
    }

    #[tokio::test]
    async fn startup_packets_are_read_within_their_limit() {
        let mut packet = BytesMut::new();
        postgres_protocol::message::frontend::startup_message(
            [("user", "app"), ("database", "db")],
            &mut packet,
        )
        .unwrap();
        let read = read_initial(&mut &packet[..], 10_000).await.unwrap();
        assert_eq!(
            read,
            Initial::Startup {
                version: PROTOCOL_3_0,
                parameters: vec![
                    ("user".into(), "app".into()),
                    ("database".into(), "db".into())
                ],
            }
        );
        let huge = [0x7f, 0, 0, 0];
        assert!(matches!(
            read_initial(&mut &huge[..], 10_000).await,
            Err(WireError::TooLong { .. })
        ));
        let mut ssl = BytesMut::new();
        postgres_protocol::message::frontend::ssl_request(&mut ssl);
        assert_eq!(
            read_initial(&mut &ssl[..], 10_000).await.unwrap(),
            Initial::SslRequest
        );
        let garbage = [0, 0, 0, 9, 1, 2, 3, 4, 5];
        assert!(read_initial(&mut &garbage[..], 10_000).await.is_err());
    }
}
