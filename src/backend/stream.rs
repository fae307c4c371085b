//! The byte stream under a backend connection: TCP, Unix socket, or TLS over TCP.

use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd};
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tokio_rustls::client::TlsStream;

/// Bytes read at a time while discarding: the memory a skipped message costs.
const DISCARD_CHUNK: usize = 64 * 1024;

/// One of the transports PostgreSQL speaks over.
#[derive(Debug)]
pub(crate) enum Socket {
    Tcp(TcpStream),
    Unix(UnixStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// What an idle socket holds right now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum IdleProbe {
    /// Nothing to read: the peer is silent, as it should be.
    Quiet,
    /// The peer closed the connection.
    Closed,
    /// Bytes arrived while nothing was asked.
    Data,
}

impl Socket {
    fn fd(&self) -> BorrowedFd<'_> {
        match self {
            Socket::Tcp(s) => s.as_fd(),
            Socket::Unix(s) => s.as_fd(),
            Socket::Tls(s) => s.get_ref().0.as_fd(),
        }
    }

    /// The local TCP port (the server sees it as `client_port`), so a
    /// backend can be told apart from a later one with a reused pid.
    pub(crate) fn local_port(&self) -> Option<u16> {
        let tcp = match self {
            Socket::Tcp(s) => s,
            Socket::Tls(s) => s.get_ref().0,
            Socket::Unix(_) => return None,
        };
        tcp.local_addr().ok().map(|a| a.port())
    }

    /// Asks the kernel, without waiting and without consuming anything,
    /// whether the peer sent something or closed. This bypasses tokio's
    /// readiness cache, which only learns of new bytes when the runtime next
    /// polls the reactor and could report a dead idle connection as quiet.
    pub(crate) fn probe_idle(&self) -> io::Result<IdleProbe> {
        let mut byte = [MaybeUninit::<u8>::uninit(); 1];
        let fd = self.fd();
        match socket2::SockRef::from(&fd).peek(&mut byte) {
            Ok(0) => Ok(IdleProbe::Closed),
            Ok(_) => Ok(IdleProbe::Data),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(IdleProbe::Quiet),
            Err(e) => Err(e),
        }
    }

    /// Reads what an idle socket holds now, without waiting, and appends
    /// the protocol bytes to `out`. Over TLS the records are decrypted
    /// here, so an idle session's asynchronous messages (a NOTIFY after a
    /// client's LISTEN, a NOTICE, a ParameterStatus) can be told from a
    /// goodbye on every transport.
    pub(crate) fn read_available(&mut self, out: &mut bytes::BytesMut) -> io::Result<Drained> {
        match self {
            Socket::Tls(tls) => read_available_tls(tls, out),
            plain => read_available_plain(plain.fd(), out),
        }
    }
}

/// What [`Socket::read_available`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Drained {
    /// Protocol bytes appended (0: nothing, or only part of a TLS record).
    pub(crate) bytes: usize,
    /// The peer closed the connection after them. A server ends its
    /// sessions so on an immediate shutdown or another backend's crash:
    /// a WARNING notice, then the end of the stream.
    pub(crate) closed: bool,
}

fn read_available_plain(fd: BorrowedFd<'_>, out: &mut bytes::BytesMut) -> io::Result<Drained> {
    let socket = socket2::SockRef::from(&fd);
    let mut chunk = [0u8; 4096];
    let mut total = 0;
    loop {
        match io::Read::read(&mut &*socket, &mut chunk) {
            Ok(0) => {
                return Ok(Drained {
                    bytes: total,
                    closed: true,
                });
            }
            Ok(n) => {
                out.extend_from_slice(&chunk[..n]);
                total += n;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                return Ok(Drained {
                    bytes: total,
                    closed: false,
                });
            }
            Err(e) => return Err(e),
        }
    }
}

/// Feeds the TLS records the kernel holds to rustls (reading the socket
/// directly, as [`Socket::probe_idle`] does, since tokio's readiness cache
/// may not know of them yet) and takes out the plaintext.
fn read_available_tls(
    tls: &mut TlsStream<TcpStream>,
    out: &mut bytes::BytesMut,
) -> io::Result<Drained> {
    let (tcp, session) = tls.get_mut();
    let fd = tcp.as_fd();
    let socket = socket2::SockRef::from(&fd);
    let mut ended = false;
    loop {
        match session.read_tls(&mut &*socket) {
            Ok(0) => {
                ended = true;
                break;
            }
            Ok(_) => {
                session
                    .process_new_packets()
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => return Err(e),
        }
    }
    let mut chunk = [0u8; 4096];
    let mut total = 0;
    loop {
        match io::Read::read(&mut session.reader(), &mut chunk) {
            Ok(n) if n > 0 => {
                out.extend_from_slice(&chunk[..n]);
                total += n;
            }
            // A close_notify (Ok(0)), or the end without one.
            Ok(_) => {
                ended = true;
                break;
            }
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                ended = true;
                break;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => return Err(e),
        }
    }
    Ok(Drained {
        bytes: total,
        closed: ended,
    })
}

impl Socket {
    /// Reads and drops the next `len` bytes, a chunk at a time, so a message
    /// too large to hold can go by without being held. A peer that closes
    /// first yields `UnexpectedEof`.
    pub(crate) async fn discard(&mut self, mut len: usize) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        let mut chunk = vec![0u8; len.min(DISCARD_CHUNK)];
        while len > 0 {
            let want = len.min(chunk.len());
            let read = tokio::io::AsyncReadExt::read(self, &mut chunk[..want]).await?;
            if read == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            len -= read;
        }
        Ok(())
    }

    /// Writes `message` now if the socket takes it without waiting, for
    /// goodbyes from synchronous code (`Drop`); over TLS the message is
    /// followed by a close_notify. Anything that would block is dropped.
    pub(crate) fn write_now(&mut self, message: &[u8]) {
        match self {
            Socket::Tcp(s) => {
                let _ = s.try_write(message);
            }
            Socket::Unix(s) => {
                let _ = s.try_write(message);
            }
            Socket::Tls(s) => {
                let (tcp, tls) = s.get_mut();
                if io::Write::write_all(&mut tls.writer(), message).is_err() {
                    return;
                }
                tls.send_close_notify();
                let mut sink = TryWriter(tcp);
                while tls.wants_write() {
                    if !matches!(tls.write_tls(&mut sink), Ok(n) if n > 0) {
                        return;
                    }
                }
            }
        }
    }
}

/// `io::Write` over a tokio TCP stream that never waits.
struct TryWriter<'a>(&'a TcpStream);

impl io::Write for TryWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.try_write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl AsyncRead for Socket {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Socket::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Socket::Unix(s) => Pin::new(s).poll_read(cx, buf),
            Socket::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Socket {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Socket::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Socket::Unix(s) => Pin::new(s).poll_write(cx, buf),
            Socket::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Socket::Tcp(s) => Pin::new(s).poll_flush(cx),
            Socket::Unix(s) => Pin::new(s).poll_flush(cx),
            Socket::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Socket::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Socket::Unix(s) => Pin::new(s).poll_shutdown(cx),
            Socket::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
