//! Message I/O with a server: whole protocol messages in and out of a socket.
//!
//! A [`Framer`] owns the transport and its two buffers and knows nothing of
//! requests or transactions: it writes what was encoded into its write
//! buffer, and reads the next backend message. That is the part every user
//! of a server session needs, the request layer of [`Connection`] as much
//! as a wire front end forwarding a client's messages, so it stands alone.
//!
//! What it does take care of is what the protocol sends unasked, at any
//! time: ParameterStatus values are recorded, notices and notifications
//! are skipped. And it bounds memory: a reader that passes an
//! [`Allowance`] never has a message over it buffered, however large a
//! message the server announces; its bytes are discarded as they arrive.
//!
//! [`Connection`]: super::Connection

use std::collections::HashMap;
use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::io::poll_read_buf;

use super::error::{BackendError, DbError, Stage};
use super::stream::{IdleProbe, Socket};

/// Read buffer capacity of a new session, and what it shrinks back to.
const READ_BUF_INITIAL: usize = 8 * 1024;

/// Read buffer capacity kept between requests; more is given back.
const READ_BUF_KEPT: usize = 64 * 1024;

/// Write buffer capacity of a new session: a typical request fits.
const WRITE_BUF_INITIAL: usize = 1024;

/// The transport of one server session, with its buffers.
pub(crate) struct Framer {
    /// The transport.
    socket: Socket,
    /// Bytes received but not yet parsed into messages.
    read_buf: BytesMut,
    /// Messages encoded but not yet written.
    write_buf: BytesMut,
    /// ParameterStatus values (server_version, TimeZone, ...), kept current.
    parameters: HashMap<String, String>,
}

/// The largest messages a reader under a result limit may still buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Allowance {
    /// For a DataRow: what is left of the limit, in whole-message bytes.
    pub(crate) row: usize,
    /// For any other message, in bytes of its body.
    pub(crate) other: usize,
}

/// The next message of a response, or the type of one that was skipped.
pub(crate) enum Incoming {
    Message(Message),
    /// A message over the allowance was discarded as it arrived.
    Skipped(u8),
}

/// What [`Framer::send_or_read`] got done.
pub(crate) enum Duplex {
    /// Every byte of the write buffer went out.
    Sent,
    /// A whole message arrived first (raw, header included).
    Frame(bytes::Bytes),
}

/// What the buffer holds next.
enum Parsed {
    /// A whole message.
    Message(Message),
    /// The header of a message over the allowance: its type, and its
    /// length with the header.
    Oversized { tag: u8, total: usize },
    /// Not a whole message yet.
    Incomplete,
}

impl Framer {
    pub(crate) fn new(socket: Socket) -> Self {
        Self {
            socket,
            read_buf: BytesMut::with_capacity(READ_BUF_INITIAL),
            write_buf: BytesMut::with_capacity(WRITE_BUF_INITIAL),
            parameters: HashMap::new(),
        }
    }

    /// A ParameterStatus value the server reported, e.g. `server_version`.
    pub(crate) fn parameter(&self, name: &str) -> Option<&str> {
        self.parameters.get(name).map(String::as_str)
    }

    /// The session's port on pgwarden's side; `None` over a Unix socket.
    pub(crate) fn local_port(&self) -> Option<u16> {
        self.socket.local_port()
    }

    /// Where messages are encoded; [`Framer::flush`] sends them.
    pub(crate) fn write_buf(&mut self) -> &mut BytesMut {
        &mut self.write_buf
    }

    /// Writes every encoded message. The buffer is emptied either way: after
    /// a failed write, what part of it went out is unknown.
    pub(crate) async fn flush(&mut self, stage: Stage) -> Result<(), BackendError> {
        let result = async {
            self.socket.write_all(&self.write_buf).await?;
            self.socket.flush().await
        }
        .await;
        self.write_buf.clear();
        result.map_err(BackendError::io(stage))
    }

    /// Reads the next message that is not asynchronous bookkeeping
    /// (ParameterStatus is recorded, notices and notifications are skipped).
    pub(crate) async fn read_message(&mut self, stage: Stage) -> Result<Message, BackendError> {
        match self.read_within(stage, None).await? {
            Incoming::Message(message) => Ok(message),
            // Without an allowance nothing is skipped.
            Incoming::Skipped(tag) => Err(BackendError::Protocol(format!(
                "message {:?} skipped without a size limit",
                char::from(tag)
            ))),
        }
    }

    /// Like [`Framer::read_message`], but a message over `allowance` is
    /// never buffered: its bytes are discarded as they arrive, and only its
    /// type is reported. The buffer thus never grows past what the
    /// allowance admits, however large a message the server announces.
    pub(crate) async fn read_within(
        &mut self,
        stage: Stage,
        allowance: Option<Allowance>,
    ) -> Result<Incoming, BackendError> {
        loop {
            match self.parse_within(allowance)? {
                Parsed::Message(message) => return Ok(Incoming::Message(message)),
                Parsed::Oversized { tag, total } => {
                    self.skip_bytes(total, stage).await?;
                    return Ok(Incoming::Skipped(tag));
                }
                Parsed::Incomplete => {}
            }
            let read = self.socket.read_buf(&mut self.read_buf).await;
            match read {
                Ok(0) => return Err(BackendError::Closed { stage }),
                Ok(_) => {}
                Err(source) => return Err(BackendError::Io { stage, source }),
            }
        }
    }

    /// Reads the next whole message as raw bytes (type, length and body),
    /// for forwarding as is: nothing is skipped, ParameterStatus is also
    /// recorded. Cancel-safe: a partial message stays buffered for the next
    /// call. A message announcing more than `max_len` bytes is refused, so a
    /// forwarding client never buffers an unbounded message.
    pub(crate) async fn read_frame(
        &mut self,
        stage: Stage,
        max_len: usize,
    ) -> Result<bytes::Bytes, BackendError> {
        loop {
            if let Some(frame) = self.take_frame(max_len)? {
                return Ok(frame);
            }
            match self.socket.read_buf(&mut self.read_buf).await {
                Ok(0) => return Err(BackendError::Closed { stage }),
                Ok(_) => {}
                Err(source) => return Err(BackendError::Io { stage, source }),
            }
        }
    }

    /// The next whole message in the read buffer, raw, if there is one
    /// (room is reserved for the rest of a partial one).
    pub(crate) fn take_frame(
        &mut self,
        max_len: usize,
    ) -> Result<Option<bytes::Bytes>, BackendError> {
        let Some((tag, total)) = peek_header(&self.read_buf) else {
            return Ok(None);
        };
        if total > max_len {
            return Err(BackendError::Protocol(format!(
                "a {:?} message of {total} bytes is over the limit of {max_len}",
                char::from(tag)
            )));
        }
        if self.read_buf.len() < total {
            self.read_buf.reserve(total - self.read_buf.len());
            return Ok(None);
        }
        let frame = self.read_buf.split_to(total).freeze();
        if tag == b'S' {
            self.record_parameter(&frame)?;
        }
        Ok(Some(frame))
    }

    /// Writes the write buffer and reads at the same time: returns a whole
    /// message as soon as one has arrived (the write goes on at the next
    /// call), or [`Duplex::Sent`] once every byte is written. A server
    /// answering the start of a long pipeline while its end is still being
    /// sent thus never blocks on replies nobody reads. After an error the
    /// write buffer is empty, as after [`Framer::flush`].
    pub(crate) async fn send_or_read(&mut self, max_len: usize) -> Result<Duplex, BackendError> {
        let result = std::future::poll_fn(|cx| self.poll_send_or_read(cx, max_len)).await;
        if result.is_err() {
            self.write_buf.clear();
        }
        result
    }

    fn poll_send_or_read(
        &mut self,
        cx: &mut Context<'_>,
        max_len: usize,
    ) -> Poll<Result<Duplex, BackendError>> {
        loop {
            if let Some(frame) = self.take_frame(max_len)? {
                return Poll::Ready(Ok(Duplex::Frame(frame)));
            }
            let mut progressed = false;
            let socket = Pin::new(&mut self.socket);
            if self.write_buf.is_empty() {
                if let Poll::Ready(flushed) = socket.poll_flush(cx) {
                    let flushed = flushed.map_err(BackendError::io(Stage::Sending));
                    return Poll::Ready(flushed.map(|()| Duplex::Sent));
                }
            } else if let Poll::Ready(wrote) = socket.poll_write(cx, &self.write_buf) {
                match wrote {
                    Ok(0) => {
                        return Poll::Ready(Err(BackendError::Closed {
                            stage: Stage::Sending,
                        }));
                    }
                    Ok(n) => {
                        self.write_buf.advance(n);
                        progressed = true;
                    }
                    Err(source) => {
                        return Poll::Ready(Err(BackendError::Io {
                            stage: Stage::Sending,
                            source,
                        }));
                    }
                }
            }
            self.read_buf.reserve(READ_BUF_INITIAL);
            let socket = Pin::new(&mut self.socket);
            if let Poll::Ready(read) = poll_read_buf(socket, cx, &mut self.read_buf) {
                match read {
                    Ok(0) => {
                        return Poll::Ready(Err(BackendError::Closed {
                            stage: Stage::Receiving,
                        }));
                    }
                    Ok(_) => progressed = true,
                    Err(source) => {
                        return Poll::Ready(Err(BackendError::Io {
                            stage: Stage::Receiving,
                            source,
                        }));
                    }
                }
            }
            if !progressed {
                return Poll::Pending;
            }
        }
    }

    /// Records the value of a raw ParameterStatus message.
    fn record_parameter(&mut self, frame: &[u8]) -> Result<(), BackendError> {
        let mut copy = BytesMut::from(frame);
        if let Some(Message::ParameterStatus(body)) = Message::parse(&mut copy).map_err(protocol)? {
            let name = body.name().map_err(protocol)?.to_owned();
            let value = body.value().map_err(protocol)?.to_owned();
            self.parameters.insert(name, value);
        }
        Ok(())
    }

    /// Every ParameterStatus value the server reported, as it last did.
    pub(crate) fn parameters(&self) -> impl Iterator<Item = (&str, &str)> {
        self.parameters
            .iter()
            .map(|(name, value)| (name.as_str(), value.as_str()))
    }

    /// Discards the next `len` bytes of the stream: those already buffered,
    /// then the rest straight from the socket, a small chunk at a time.
    async fn skip_bytes(&mut self, len: usize, stage: Stage) -> Result<(), BackendError> {
        let buffered = len.min(self.read_buf.len());
        self.read_buf.advance(buffered);
        match self.socket.discard(len - buffered).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                Err(BackendError::Closed { stage })
            }
            Err(source) => Err(BackendError::Io { stage, source }),
        }
    }

    /// A buffer grown for one large message gives its memory back once the
    /// request is over, so an idle pooled session holds little.
    pub(crate) fn shrink_read_buf(&mut self) {
        if self.read_buf.capacity() <= READ_BUF_KEPT {
            return;
        }
        let mut fresh = BytesMut::with_capacity(READ_BUF_INITIAL.max(self.read_buf.len()));
        fresh.extend_from_slice(&self.read_buf);
        self.read_buf = fresh;
    }

    fn parse_buffered(&mut self) -> Result<Option<Message>, BackendError> {
        match self.parse_within(None)? {
            Parsed::Message(message) => Ok(Some(message)),
            // Without an allowance nothing is oversized.
            Parsed::Incomplete | Parsed::Oversized { .. } => Ok(None),
        }
    }

    /// Parses the next buffered message that is not bookkeeping. The header
    /// is checked against `allowance` before the message is parsed, because
    /// parsing an incomplete message reserves buffer room for all of it.
    fn parse_within(&mut self, allowance: Option<Allowance>) -> Result<Parsed, BackendError> {
        loop {
            if let (Some(allowance), Some((tag, total))) = (allowance, peek_header(&self.read_buf))
                && !allowance.admits(tag, total)
            {
                return Ok(Parsed::Oversized { tag, total });
            }
            let message = Message::parse(&mut self.read_buf).map_err(protocol)?;
            match message {
                Some(Message::ParameterStatus(body)) => {
                    let name = body.name().map_err(protocol)?.to_owned();
                    let value = body.value().map_err(protocol)?.to_owned();
                    self.parameters.insert(name, value);
                }
                Some(Message::NoticeResponse(_) | Message::NotificationResponse(_)) => {}
                Some(other) => return Ok(Parsed::Message(other)),
                None => return Ok(Parsed::Incomplete),
            }
        }
    }

    /// True when nothing is buffered and the kernel holds no byte (nor the
    /// end of the stream) for the socket: an idle session that heard nothing.
    pub(crate) fn is_quiet(&self) -> bool {
        self.read_buf.is_empty() && matches!(self.socket.probe_idle(), Ok(IdleProbe::Quiet))
    }

    /// Checks, without waiting, what an idle session received: nothing, or
    /// only asynchronous bookkeeping, is fine; a closed socket, an error
    /// (the server's goodbye) or any other message means it is gone.
    pub(crate) fn poll_unsolicited(&mut self) -> Result<(), BackendError> {
        let closed = BackendError::Closed {
            stage: Stage::Sending,
        };
        let probe = self
            .socket
            .probe_idle()
            .map_err(BackendError::io(Stage::Sending))?;
        match probe {
            IdleProbe::Quiet => return Ok(()),
            IdleProbe::Closed => return Err(closed),
            IdleProbe::Data => {}
        }
        let read = self.socket.read_available(&mut self.read_buf);
        let drained = read.map_err(BackendError::io(Stage::Sending))?;
        match self.parse_buffered()? {
            // Notices only, then the end: the server ended the session
            // with a WARNING (an immediate shutdown, a crash elsewhere).
            None if drained.closed => Err(closed),
            None => Ok(()),
            Some(Message::ErrorResponse(body)) => {
                Err(fatal_or_protocol(DbError::parse(body.fields())))
            }
            Some(other) => Err(BackendError::Protocol(format!(
                "unsolicited {} on an idle connection",
                message_name(&other)
            ))),
        }
    }

    /// Sends Terminate, replacing anything unsent, and shuts the transport
    /// down, ignoring errors: the session is over either way.
    pub(crate) async fn terminate(&mut self) {
        self.write_buf.clear();
        frontend::terminate(&mut self.write_buf);
        let _ = self.socket.write_all(&self.write_buf).await;
        let _ = self.socket.shutdown().await;
    }

    /// Sends Terminate if the socket takes it at once, for goodbyes from
    /// synchronous code (`Drop`), so the server ends the session as a normal
    /// disconnect instead of counting it abandoned.
    pub(crate) fn terminate_now(&mut self) {
        // The Terminate message: type 'X', length 4, no body.
        self.socket.write_now(&[b'X', 0, 0, 0, 4]);
    }
}

impl Allowance {
    /// Whether a message of type `tag`, `total` bytes long with its header,
    /// may be buffered. Messages that steer the protocol (ReadyForQuery, COPY
    /// responses, completions) are far below the smallest allowance.
    fn admits(self, tag: u8, total: usize) -> bool {
        let body = total.saturating_sub(5);
        match tag {
            b'D' => total <= self.row,
            _ => body <= self.other,
        }
    }
}

/// Type and whole length of the next message, once its 5-byte header is
/// in (the length field counts itself but not the type byte).
fn peek_header(buf: &[u8]) -> Option<(u8, usize)> {
    let header = buf.get(..5)?;
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]);
    Some((header[0], len as usize + 1))
}

/// The transport, without what must not reach a log: the buffers' contents
/// (rows, parameters, and during startup the password exchange) show only
/// their length.
impl fmt::Debug for Framer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Framer")
            .field("socket", &self.socket)
            .field("read_buffered", &self.read_buf.len())
            .field("write_buffered", &self.write_buf.len())
            .finish_non_exhaustive()
    }
}

/// A message that does not parse: the stream is out of step.
pub(crate) fn protocol(e: std::io::Error) -> BackendError {
    BackendError::Protocol(e.to_string())
}

fn fatal_or_protocol(parsed: std::io::Result<DbError>) -> BackendError {
    match parsed {
        Ok(error) => BackendError::Fatal(Box::new(error)),
        Err(e) => protocol(e),
    }
}

/// A short name of a backend message for error texts.
pub(crate) fn message_name(message: &Message) -> &'static str {
    match message {
        Message::AuthenticationOk => "AuthenticationOk",
        Message::BackendKeyData(_) => "BackendKeyData",
        Message::BindComplete => "BindComplete",
        Message::CloseComplete => "CloseComplete",
        Message::CommandComplete(_) => "CommandComplete",
        Message::CopyData(_) => "CopyData",
        Message::CopyDone => "CopyDone",
        Message::CopyInResponse(_) => "CopyInResponse",
        Message::CopyOutResponse(_) => "CopyOutResponse",
        Message::DataRow(_) => "DataRow",
        Message::EmptyQueryResponse => "EmptyQueryResponse",
        Message::ErrorResponse(_) => "ErrorResponse",
        Message::NoData => "NoData",
        Message::ParameterDescription(_) => "ParameterDescription",
        Message::ParseComplete => "ParseComplete",
        Message::PortalSuspended => "PortalSuspended",
        Message::ReadyForQuery(_) => "ReadyForQuery",
        Message::RowDescription(_) => "RowDescription",
        _ => "authentication or other message",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_allowance_admits_rows_up_to_what_is_left_and_others_up_to_the_limit() {
        let allowance = Allowance {
            row: 100,
            other: 1000,
        };
        assert!(allowance.admits(b'D', 100));
        assert!(!allowance.admits(b'D', 101));
        assert!(allowance.admits(b'E', 1005));
        assert!(!allowance.admits(b'E', 1006));
        assert_eq!(peek_header(&[b'D', 0, 0, 1, 0]), Some((b'D', 257)));
        assert_eq!(peek_header(&[b'D', 0, 0]), None);
    }

    #[tokio::test]
    async fn debug_shows_the_buffers_lengths_but_never_their_contents() {
        let (ours, _server) = tokio::net::UnixStream::pair().unwrap();
        let mut framer = Framer::new(Socket::Unix(ours));
        framer.read_buf.extend_from_slice(b"row-secret");
        framer.write_buf.extend_from_slice(b"password");
        let shown = format!("{framer:?}");
        assert!(shown.contains("read_buffered: 10"), "{shown}");
        assert!(!shown.contains("row-secret"), "{shown}");
        assert!(!shown.contains("password"), "{shown}");
    }
}
