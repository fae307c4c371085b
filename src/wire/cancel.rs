//! Cancel requests from wire clients.
//!
//! A client gets pgwarden's own key (BackendKeyData), never a server's:
//! the server session behind a client changes from one transaction to the
//! next. A CancelRequest names that key; the registry finds the client and
//! cancels what its current server session runs, if it runs anything.
//! Once the client gives the session back, the slot is empty, so a cancel
//! can never reach a statement of a client that got the session later. A
//! unit still waiting in the guard holds no session: a cancel then ends
//! the wait, and pgwarden answers the unit 57014 itself.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use subtle::ConstantTimeEq;
use tokio::sync::Notify;
use tracing::{info, warn};

use crate::backend::CancelToken;

/// What a client is running right now, as far as a cancel is concerned.
#[derive(Debug, Default)]
pub(crate) struct CancelSlot(Mutex<Target>);

/// What a cancel request for a client reaches.
#[derive(Debug, Default)]
enum Target {
    /// Nothing runs: the cancel is ignored, as PostgreSQL ignores it.
    #[default]
    Idle,
    /// A unit waits in the guard for a session: the wait is given up and
    /// the unit answered 57014 by pgwarden.
    Waiting(Arc<Notify>),
    /// A server session runs the client's unit: the server cancels it.
    Running(CancelToken),
}

impl CancelSlot {
    /// The client now runs on the session `token` cancels (or nothing).
    pub(crate) fn set(&self, token: Option<CancelToken>) {
        *self.lock() = token.map_or(Target::Idle, Target::Running);
    }

    /// The client's unit waits for a session from now on: the returned
    /// notification fires when a cancel request arrives (or arrived
    /// before it is awaited) during the wait.
    pub(crate) fn wait(&self) -> Arc<Notify> {
        let cancelled = Arc::new(Notify::new());
        *self.lock() = Target::Waiting(cancelled.clone());
        cancelled
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Target> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Every connected client's key and slot.
#[derive(Debug, Default)]
pub(crate) struct CancelRegistry {
    clients: Mutex<HashMap<i32, (i32, Arc<CancelSlot>)>>,
}

/// A client's registration; dropping it forgets the client's key.
#[derive(Debug)]
pub(crate) struct Registration {
    registry: Arc<CancelRegistry>,
    /// The process id given to the client.
    pub(crate) process_id: i32,
    /// The secret given to the client.
    pub(crate) secret_key: i32,
    /// What the client runs now.
    pub(crate) slot: Arc<CancelSlot>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut clients = self
            .registry
            .clients
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        clients.remove(&self.process_id);
    }
}

impl CancelRegistry {
    /// Gives a new client a key of its own (random, unique among clients).
    pub(crate) fn register(self: &Arc<Self>) -> Registration {
        let slot = Arc::new(CancelSlot::default());
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        let process_id = loop {
            let candidate = rand::random::<i32>() & i32::MAX;
            if candidate != 0 && !clients.contains_key(&candidate) {
                break candidate;
            }
        };
        let secret_key = rand::random::<i32>();
        clients.insert(process_id, (secret_key, slot.clone()));
        Registration {
            registry: self.clone(),
            process_id,
            secret_key,
            slot,
        }
    }

    /// Handles a CancelRequest: cancels what the client with this key runs.
    /// A wrong key is ignored, as PostgreSQL ignores it (the requester
    /// learns nothing either way).
    pub(crate) fn cancel(&self, process_id: i32, secret_key: i32) {
        let slot = {
            let clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
            match clients.get(&process_id) {
                Some((key, slot))
                    if bool::from(key.to_be_bytes().ct_eq(&secret_key.to_be_bytes())) =>
                {
                    slot.clone()
                }
                _ => return,
            }
        };
        let token = match &*slot.lock() {
            Target::Idle => return,
            Target::Waiting(cancelled) => {
                info!(
                    client = process_id,
                    "Cancel request: the client's unit gives up waiting for a session."
                );
                cancelled.notify_one();
                return;
            }
            Target::Running(token) => token.clone(),
        };
        info!(
            client = process_id,
            "Cancel request: cancelling the client's statement."
        );
        tokio::spawn(async move {
            if let Err(error) = token.cancel().await {
                warn!(error = %error, "Forwarding a cancel request failed.");
            }
        });
    }
}
