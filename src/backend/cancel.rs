//! Cancel requests: a separate, short connection that asks the server to
//! interrupt the statement running on another session.

use bytes::BytesMut;
use postgres_protocol::message::frontend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::connect::Connector;
use super::error::{BackendError, Stage};

/// Everything needed to cancel the statement running on one session.
///
/// Cloneable and detached from the session, so it can be used while the
/// session itself is busy waiting for the statement.
#[derive(Clone, Debug)]
pub struct CancelToken {
    connector: Connector,
    process_id: i32,
    secret_key: i32,
}

impl CancelToken {
    pub(crate) fn new(connector: Connector, process_id: i32, secret_key: i32) -> Self {
        Self {
            connector,
            process_id,
            secret_key,
        }
    }

    /// The server process whose statement would be cancelled.
    pub fn process_id(&self) -> i32 {
        self.process_id
    }

    /// Sends the cancel request and waits until the server has read it (it
    /// closes the connection), within the connect timeout. The server gives no
    /// answer; the cancelled statement fails with SQLSTATE 57014 on its session.
    pub async fn cancel(&self) -> Result<(), BackendError> {
        let send = async {
            let mut socket = self.connector.open_socket().await?;
            let mut request = BytesMut::new();
            frontend::cancel_request(self.process_id, self.secret_key, &mut request);
            socket
                .write_all(&request)
                .await
                .map_err(BackendError::io(Stage::Sending))?;
            socket
                .flush()
                .await
                .map_err(BackendError::io(Stage::Sending))?;
            let mut rest = Vec::new();
            // EOF means the server processed the request; a reset means the same.
            let _ = socket.read_to_end(&mut rest).await;
            Ok(())
        };
        let limit = self.connector.options().connect_timeout;
        tokio::time::timeout(limit, send)
            .await
            .unwrap_or_else(|_| Err(self.connector.timed_out()))
    }
}
