//! A TCP proxy that injects network faults between a client and a server.
//!
//! A client under test connects to the proxy instead of the server. Tests
//! then flip the proxy into failure modes that a real network produces but a
//! healthy local server never does: connections refused or reset on arrival,
//! connections that open but never answer, live connections cut in the
//! middle, and added latency.
//!
//! Every accepted connection is handled by its own task and registered with
//! a duplicate of its socket descriptors, so `cut_all` can shut the sockets
//! down immediately from synchronous code, whichever runtime flavour the
//! test uses.
//!
//! `partition_all` cuts only the client's side: the server's side stays
//! open and silent, as after a network partition, which a server does not
//! notice for a long time (its backends keep their transactions and locks).

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::{Shutdown, SocketAddr};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

/// Size of the buffer each forwarding direction reads into.
const CHUNK: usize = 16 * 1024;

/// Back-off after a failed `accept` (e.g. out of file descriptors).
const ACCEPT_RETRY: Duration = Duration::from_millis(50);

/// What the proxy does with connections accepted from now on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyMode {
    /// Connect to the target and forward bytes both ways.
    PassThrough,
    /// Accept, then close at once with a reset (like a crashed or firewalled server).
    Refuse,
    /// Accept, read and discard everything, never answer and never connect
    /// upstream (like a host that vanished behind a stateful firewall).
    Blackhole,
}

/// A fault-injecting TCP proxy listening on 127.0.0.1; stops on drop.
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept_task: AbortHandle,
}

/// State shared between the proxy handle and its tasks.
struct Shared {
    target: Mutex<SocketAddr>,
    mode: Mutex<ProxyMode>,
    latency_nanos: AtomicU64,
    next_id: AtomicU64,
    connections: Mutex<HashMap<u64, Connection>>,
    /// Connections cut on the client's side only; their tasks hold the
    /// server's side open and forward nothing more.
    partitioned: Mutex<HashSet<u64>>,
    /// The tasks of partitioned connections, stopped when the proxy is dropped.
    held: Mutex<Vec<AbortHandle>>,
}

/// A connection the proxy holds open.
struct Connection {
    /// The task serving the connection; `None` only while it is being spawned.
    task: Option<AbortHandle>,
    /// Duplicated descriptors of the client socket and, once connected, the upstream socket.
    sockets: Vec<std::net::TcpStream>,
}

impl FaultProxy {
    /// Starts a pass-through proxy to `target` on a free port of 127.0.0.1.
    ///
    /// Must be called inside a Tokio runtime; the proxy's tasks run on it.
    pub async fn start(target: SocketAddr) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy to 127.0.0.1:0");
        let addr = listener.local_addr().expect("proxy local address");
        let shared = Arc::new(Shared {
            target: Mutex::new(target),
            mode: Mutex::new(ProxyMode::PassThrough),
            latency_nanos: AtomicU64::new(0),
            next_id: AtomicU64::new(0),
            connections: Mutex::default(),
            partitioned: Mutex::default(),
            held: Mutex::default(),
        });
        let accept_task = tokio::spawn(accept_loop(listener, Arc::clone(&shared))).abort_handle();
        FaultProxy {
            addr,
            shared,
            accept_task,
        }
    }

    /// Address clients should connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Port clients should connect to on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Address the proxy forwards to.
    pub fn target(&self) -> SocketAddr {
        *lock(&self.shared.target)
    }

    /// Forwards connections accepted from now on to `target` (a failover
    /// behind a stable address); live ones are unaffected.
    pub fn set_target(&self, target: SocketAddr) {
        *lock(&self.shared.target) = target;
    }

    /// Sets how connections accepted from now on are treated; live ones are unaffected.
    pub fn set_mode(&self, mode: ProxyMode) {
        *lock(&self.shared.mode) = mode;
    }

    /// Closes every connection the proxy holds open (forwarded or
    /// blackholed), on both sides, and returns how many there were.
    pub fn cut_all(&self) -> usize {
        let cut: Vec<Connection> = lock(&self.shared.connections)
            .drain()
            .map(|(_, c)| c)
            .collect();
        for connection in &cut {
            connection.close();
        }
        cut.len()
    }

    /// Cuts every connection the proxy holds open on the client's side
    /// only, and returns how many there were. The client sees its
    /// connection closed; the server sees nothing: its side stays open and
    /// silent until the proxy is dropped, as after a network partition.
    pub fn partition_all(&self) -> usize {
        let cut: Vec<(u64, Connection)> = lock(&self.shared.connections).drain().collect();
        // Marked before the client sockets close, so no task forwards the
        // end of stream (or anything else) to the server.
        lock(&self.shared.partitioned).extend(cut.iter().map(|(id, _)| *id));
        for (_, connection) in &cut {
            if let Some(client) = connection.sockets.first() {
                let _ = client.shutdown(Shutdown::Both);
            }
        }
        let tasks = cut.iter().filter_map(|(_, c)| c.task.clone());
        lock(&self.shared.held).extend(tasks);
        cut.len()
    }

    /// Delays every forwarded chunk, in both directions, by `delay`
    /// (zero for none). Applies to live connections too.
    pub fn set_latency(&self, delay: Duration) {
        let nanos = u64::try_from(delay.as_nanos()).unwrap_or(u64::MAX);
        self.shared.latency_nanos.store(nanos, Ordering::Relaxed);
    }

    /// How many connections the proxy holds open (forwarded or blackholed).
    pub fn live_connections(&self) -> usize {
        lock(&self.shared.connections).len()
    }
}

impl Drop for FaultProxy {
    /// Stops accepting and closes every connection.
    fn drop(&mut self) {
        self.accept_task.abort();
        self.cut_all();
        for task in lock(&self.shared.held).drain(..) {
            task.abort();
        }
    }
}

impl Connection {
    /// Shuts both sockets down now and stops the task serving them.
    fn close(&self) {
        for socket in &self.sockets {
            let _ = socket.shutdown(Shutdown::Both);
        }
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

impl Shared {
    /// Current delay per forwarded chunk.
    fn latency(&self) -> Duration {
        Duration::from_nanos(self.latency_nanos.load(Ordering::Relaxed))
    }

    /// Spawns `handler` for `client` and registers the connection until the handler ends.
    fn serve<F, Fut>(self: &Arc<Self>, client: TcpStream, handler: F)
    where
        F: FnOnce(Arc<Shared>, u64, TcpStream) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let Ok(client_dup) = duplicate(&client) else {
            return;
        };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let unregister = Unregister {
            shared: Arc::clone(self),
            id,
        };
        let work = handler(Arc::clone(self), id, client);
        let connection = Connection {
            task: None,
            sockets: vec![client_dup],
        };
        // Registered before the task exists, so it cannot finish and
        // unregister first; the lock is not held across `spawn`, which may
        // drop the task (and run `Unregister`) at once during runtime shutdown.
        lock(&self.connections).insert(id, connection);
        let task = tokio::spawn(async move {
            let _unregister = unregister;
            work.await;
        })
        .abort_handle();
        match lock(&self.connections).get_mut(&id) {
            Some(connection) => connection.task = Some(task),
            // Already finished, or cut before it started: make sure it stops.
            None => task.abort(),
        }
    }

    /// Passes `result` on, unless connection `id` was partitioned: then it
    /// never returns, so its task keeps the server's side open and silent
    /// (dropping a write half would send the server an end of stream).
    async fn unless_partitioned<T>(&self, id: u64, result: T) -> T {
        if lock(&self.partitioned).contains(&id) {
            std::future::pending::<()>().await;
        }
        result
    }

    /// Records the upstream socket of connection `id`, so `cut_all` closes it too.
    fn add_upstream(&self, id: u64, upstream: &TcpStream) {
        if let (Ok(dup), Some(connection)) =
            (duplicate(upstream), lock(&self.connections).get_mut(&id))
        {
            connection.sockets.push(dup);
        }
    }
}

/// Removes a connection from the registry when its task ends or is aborted.
struct Unregister {
    shared: Arc<Shared>,
    id: u64,
}

impl Drop for Unregister {
    fn drop(&mut self) {
        lock(&self.shared.connections).remove(&self.id);
    }
}

/// Accepts connections forever, treating each according to the current mode.
async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let client = match listener.accept().await {
            Ok((client, _)) => client,
            Err(_) => {
                tokio::time::sleep(ACCEPT_RETRY).await;
                continue;
            }
        };
        let mode = *lock(&shared.mode);
        match mode {
            ProxyMode::PassThrough => shared.serve(client, forward),
            ProxyMode::Blackhole => shared.serve(client, |_, _, client| swallow(client)),
            ProxyMode::Refuse => refuse(client),
        }
    }
}

/// Closes `client` with a reset rather than an orderly shutdown.
fn refuse(client: TcpStream) {
    let _ = client.set_zero_linger();
    drop(client);
}

/// Reads and discards everything `client` sends, until it goes away.
async fn swallow(mut client: TcpStream) {
    let mut buffer = vec![0; CHUNK];
    while let Ok(1..) = client.read(&mut buffer).await {}
}

/// Connects upstream and forwards bytes both ways until either side closes.
async fn forward(shared: Arc<Shared>, id: u64, client: TcpStream) {
    let target = *lock(&shared.target);
    let Ok(upstream) = TcpStream::connect(target).await else {
        refuse(client);
        return;
    };
    shared.add_upstream(id, &upstream);
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (upstream_read, upstream_write) = upstream.into_split();
    let _ = tokio::try_join!(
        pump(&shared, id, client_read, upstream_write),
        pump(&shared, id, upstream_read, client_write),
    );
}

/// Copies one direction chunk by chunk, applying the current latency, and
/// passes end-of-stream on as a write shutdown; a partitioned connection
/// forwards nothing more (see [`Shared::unless_partitioned`]).
async fn pump(
    shared: &Shared,
    id: u64,
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
) -> io::Result<()> {
    let mut buffer = vec![0; CHUNK];
    loop {
        let read = from.read(&mut buffer).await;
        let read = shared.unless_partitioned(id, read).await?;
        if read == 0 {
            return to.shutdown().await;
        }
        let delay = shared.latency();
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        // A chunk still delayed when the partition came is lost with it.
        shared.unless_partitioned(id, ()).await;
        let written = to.write_all(&buffer[..read]).await;
        shared.unless_partitioned(id, written).await?;
    }
}

/// A second descriptor for `stream`'s socket, to shut it down from outside its task.
fn duplicate(stream: &TcpStream) -> io::Result<std::net::TcpStream> {
    Ok(std::net::TcpStream::from(
        stream.as_fd().try_clone_to_owned()?,
    ))
}

/// Locks `mutex`, ignoring poisoning: the guarded data stays consistent.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
