//! A PostgreSQL client speaking the protocol by hand, for what drivers do
//! not let a test choose: statement names, pipelines with an error
//! inside, pipelines longer than any socket buffer.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A client speaking the protocol by hand, for what drivers do not let a
/// test choose: statement names, pipelines with an error inside. It
/// speaks to pgwarden as the configured user, without a password.
pub struct Raw {
    stream: TcpStream,
    read: BytesMut,
    send: BytesMut,
}

impl Raw {
    /// The connection, after startup, for a test that drives it itself.
    pub fn into_stream(self) -> TcpStream {
        self.stream
    }
}

/// A message from the server: its type and body.
pub type Reply = (u8, Vec<u8>);

impl Raw {
    pub async fn connect(address: SocketAddr) -> Raw {
        let stream = TcpStream::connect(address).await.unwrap();
        let mut raw = Raw {
            stream,
            read: BytesMut::new(),
            send: BytesMut::new(),
        };
        let params = [("user", "postgres"), ("database", "postgres")];
        frontend::startup_message(params.iter().copied(), &mut raw.send).unwrap();
        let replies = raw.exchange().await;
        assert_eq!(replies.last().map(|r| r.0), Some(b'Z'), "{replies:?}");
        raw
    }

    pub fn parse(&mut self, name: &str, sql: &str) -> &mut Self {
        frontend::parse(name, sql, std::iter::empty(), &mut self.send).unwrap();
        self
    }

    /// Bind without parameters, then Execute.
    pub fn run(&mut self, statement: &str) -> &mut Self {
        let mut body = BytesMut::new();
        body.put_u8(0);
        body.put_slice(statement.as_bytes());
        body.put_u8(0);
        body.put_slice(&[0; 6]);
        self.send.put_u8(b'B');
        self.send.put_u32(body.len() as u32 + 4);
        self.send.put_slice(&body);
        frontend::execute("", 0, &mut self.send).unwrap();
        self
    }

    /// Describe of a statement (`S`) or portal (`P`).
    pub fn describe(&mut self, kind: u8, name: &str) -> &mut Self {
        frontend::describe(kind, name, &mut self.send).unwrap();
        self
    }

    /// Close of a statement (`S`) or portal (`P`).
    pub fn close(&mut self, kind: u8, name: &str) -> &mut Self {
        frontend::close(kind, name, &mut self.send).unwrap();
        self
    }

    pub fn flush(&mut self) -> &mut Self {
        frontend::flush(&mut self.send);
        self
    }

    pub fn query(&mut self, sql: &str) -> &mut Self {
        frontend::query(sql, &mut self.send).unwrap();
        self
    }

    pub fn sync(&mut self) -> &mut Self {
        frontend::sync(&mut self.send);
        self
    }

    /// Sends what was queued and reads replies up to a ReadyForQuery.
    pub async fn exchange(&mut self) -> Vec<Reply> {
        self.stream.write_all(&self.send).await.unwrap();
        self.send.clear();
        let mut replies = Vec::new();
        loop {
            while self.read.len() >= 5 {
                let len = u32::from_be_bytes(self.read[1..5].try_into().unwrap()) as usize;
                if self.read.len() < len + 1 {
                    break;
                }
                let message = self.read.split_to(len + 1);
                let reply = (message[0], message[5..].to_vec());
                let ready = reply.0 == b'Z';
                replies.push(reply);
                if ready {
                    return replies;
                }
            }
            let read = tokio::time::timeout(
                Duration::from_secs(10),
                self.stream.read_buf(&mut self.read),
            )
            .await
            .expect("the server answers")
            .unwrap();
            assert!(read > 0, "the connection stays open; got {replies:?}");
        }
    }
}

pub fn tags(replies: &[Reply]) -> String {
    replies.iter().map(|r| r.0 as char).collect()
}

/// The text of the first DataRow's first column.
pub fn first_value(replies: &[Reply]) -> String {
    let (_, body) = replies.iter().find(|r| r.0 == b'D').expect("a row");
    let len = i32::from_be_bytes(body[2..6].try_into().unwrap()) as usize;
    String::from_utf8(body[6..6 + len].to_vec()).unwrap()
}

/// The SQLSTATE of the first ErrorResponse.
pub fn error_code(replies: &[Reply]) -> String {
    let (_, body) = replies.iter().find(|r| r.0 == b'E').expect("an error");
    let mut fields = &body[..];
    while let Some((&kind, rest)) = fields.split_first() {
        let end = rest.iter().position(|&b| b == 0).unwrap();
        if kind == b'C' {
            return String::from_utf8(rest[..end].to_vec()).unwrap();
        }
        fields = &rest[end + 1..];
    }
    panic!("no SQLSTATE in {body:?}")
}
