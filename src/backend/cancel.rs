//! Cancel requests: a separate, short connection that asks the server to
//! interrupt the statement running on another session.

use std::fmt;

use bytes::BytesMut;
use postgres_protocol::message::frontend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::connect::Connector;
use super::error::{BackendError, Stage};

/// Everything needed to cancel the statement running on one session.
///
/// Cloneable and detached from the session, so it can be used while the
/// session itself is busy waiting for the statement.
#[derive(Clone)]
pub struct CancelToken {
    connector: Connector,
    process_id: i32,
    secret_key: i32,
}

/// The secret key is what authorizes a cancel request: anyone who knows it
/// and the process id can cancel that session's statements, so it never
/// appears in logs or error reports.
impl fmt::Debug for CancelToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CancelToken")
            .field("connector", &self.connector)
            .field("process_id", &self.process_id)
            .finish_non_exhaustive()
    }
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

    /// Cancels the statement of a session that will never be used again
    /// (its request was abandoned), in the background. A cancel that
    /// reaches the server before it has read the statement is ignored, so
    /// the request is repeated a little later; that is safe only because
    /// the session runs nothing else any more.
    pub fn cancel_abandoned(self) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        runtime.spawn(async move {
            for pause in ABANDONED_CANCEL_PAUSES {
                tokio::time::sleep(pause).await;
                if let Err(error) = self.cancel().await {
                    tracing::warn!(pid = self.process_id, error = %error, "Cancel request failed.");
                    return;
                }
            }
        });
    }
}

/// When the cancels of an abandoned statement go out (see
/// [`CancelToken::cancel_abandoned`]).
const ABANDONED_CANCEL_PAUSES: [std::time::Duration; 3] = [
    std::time::Duration::ZERO,
    std::time::Duration::from_millis(250),
    std::time::Duration::from_millis(1000),
];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{ConnectOptions, SslMode};

    #[test]
    fn debug_shows_the_process_id_but_never_the_secret_key() {
        let mut options = ConnectOptions::tcp("localhost", 5432, "app", "db");
        options.ssl_mode = SslMode::Disable;
        let connector = Connector::new(options).unwrap();
        let token = CancelToken::new(connector, 4242, 918_273_645);
        let shown = format!("{token:?}");
        assert!(shown.contains("4242"), "{shown}");
        assert!(!shown.contains("918273645"), "{shown}");
    }
}
