//! The bounded label values of the metrics contract.
//!
//! Every label of every pgwarden metric is one of these enums, so a label
//! value can never come from input, and every value can be pre-created at
//! start-up (dashboards never see a series appear out of nowhere). Other
//! modules use these types as their own vocabulary: the lifecycle's state
//! *is* [`PoolState`].

macro_rules! label_enum {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vdoc])* $variant),+
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The position of this value in [`Self::ALL`].
            pub fn index(self) -> usize {
                self as usize
            }

            /// The label value.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text),+
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

label_enum! {
    /// Lifecycle state of the pool.
    PoolState {
        /// Before the first connection attempt finished.
        Starting => "starting",
        /// A new generation is being warmed up.
        Warming => "warming",
        /// Requests are admitted at once.
        Ready => "ready",
        /// The current generation failed; a new one is being built.
        Reconnecting => "reconnecting",
        /// An operator holds all new work.
        Paused => "paused",
        /// The daemon is shutting down.
        Stopping => "stopping",
    }
}

label_enum! {
    /// Why a reconnect started.
    ReconnectReason {
        /// A periodic health check failed or timed out.
        HealthCheck => "health_check",
        /// A connection of the current generation failed under a request.
        ConnectionLost => "connection_lost",
        /// An operator asked for it.
        Admin => "admin",
    }
}

label_enum! {
    /// Result of an attempt to build a generation.
    AttemptResult {
        /// The generation was warmed up and published.
        Ok => "ok",
        /// Connecting or warming up failed.
        Failed => "failed",
    }
}

label_enum! {
    /// Phase of the two-phase warm-up (`total` covers both).
    WarmupPhase {
        /// Open the minimum connections, `SELECT 1` and the role check on each.
        Ping => "ping",
        /// The configured warm-up queries on each connection.
        Queries => "queries",
        /// Both phases.
        Total => "total",
    }
}

label_enum! {
    /// Result of a periodic health check.
    HealthResult {
        /// `SELECT 1` answered in time.
        Ok => "ok",
        /// The check failed.
        Failed => "failed",
        /// The check did not answer within its timeout.
        Timeout => "timeout",
    }
}

label_enum! {
    /// Why the guard made a request wait.
    GuardCause {
        /// The first (or a new) generation is warming up.
        Warming => "warming",
        /// The current generation failed and a new one is being built.
        Reconnecting => "reconnecting",
        /// An operator paused the pool.
        Paused => "paused",
        /// The request met a connection of a retired generation.
        Stale => "stale",
        /// The pool is ready, but no session was free and the server
        /// refused (or did not answer) a new one.
        Busy => "busy",
    }
}

label_enum! {
    /// Why the server refused a new session, from the SQLSTATE class of its
    /// answer. A refusal is never a reason to reconnect: a new generation
    /// would be refused the same way.
    Refusal {
        /// Class 28: the credentials or `pg_hba.conf` refused us (a configuration problem).
        Auth => "auth",
        /// Class 53: too many connections, out of memory or disk.
        Resources => "resources",
        /// Class 3D: the database does not exist.
        Database => "database",
        /// Class 42: e.g. no CONNECT privilege on the database.
        Privilege => "privilege",
        /// Any other refusal.
        Other => "other",
    }
}

label_enum! {
    /// What a connected wire client is doing.
    WireClientState {
        /// Connected, holding no server session.
        Idle => "idle",
        /// Waiting in the guard for a server session.
        Waiting => "waiting",
        /// Running on a server session (a transaction or a unit).
        Active => "active",
        /// Holding its server session for state that cannot move.
        Pinned => "pinned",
    }
}

label_enum! {
    /// What became of a wire client's named statement on a server session.
    PreparedEvent {
        /// The session had it prepared: no Parse was sent.
        Hit => "hit",
        /// The session lacked it: pgwarden prepared it there.
        Miss => "miss",
        /// The session's cache was full: its least recently used statement
        /// was closed to make room.
        Eviction => "eviction",
    }
}

label_enum! {
    /// How a connection to the wire front end ended its startup.
    WireConnection {
        /// It became a client.
        Accepted => "accepted",
        /// A cancel request, handled.
        Cancel => "cancel",
        /// Refused: wrong password or user (28P01, 28000).
        Auth => "auth",
        /// Refused: another database (3D000).
        Database => "database",
        /// Refused: too many clients (53300).
        TooMany => "too_many",
        /// Refused for another reason (an encoding, a setting, no server).
        Refused => "refused",
        /// Broken off: a protocol violation, a timeout, a failed handshake.
        Failed => "failed",
    }
}

label_enum! {
    /// How a guard wait ended.
    GuardOutcome {
        /// The request got a connection.
        Admitted => "admitted",
        /// The budget ran out.
        Timeout => "timeout",
    }
}

label_enum! {
    /// Result of replaying a request on a new generation.
    ReplayResult {
        /// The replay answered the request.
        Ok => "ok",
        /// The replay failed too.
        Failed => "failed",
    }
}

label_enum! {
    /// Front end a request came through.
    Api {
        /// The SQL-over-HTTP API.
        Http => "http",
        /// The PostgreSQL wire protocol.
        Pgwire => "pgwire",
    }
}

label_enum! {
    /// Shape of a request.
    RequestKind {
        /// One statement.
        Query => "query",
        /// A transaction batch.
        Batch => "batch",
    }
}

label_enum! {
    /// How a request ended.
    RequestOutcome {
        /// Answered with a result.
        Ok => "ok",
        /// The database rejected a statement.
        SqlError => "sql_error",
        /// The guard budget ran out before a connection was available.
        GuardTimeout => "guard_timeout",
        /// The connection failed and the request could not be replayed.
        ConnectionLost => "connection_lost",
        /// The request may or may not have been applied (SQLSTATE 08007).
        ResolutionUnknown => "resolution_unknown",
        /// A transaction ran past its strict timeout.
        TransactionTimeout => "transaction_timeout",
        /// Refused before it reached the database (bad input, credentials, limits).
        Rejected => "rejected",
    }
}

label_enum! {
    /// Kind of an error answered to a client.
    ClientErrorKind {
        /// Malformed request.
        BadRequest => "bad_request",
        /// Wrong credentials.
        Auth => "auth",
        /// The database rejected a statement.
        Sql => "sql",
        /// The guard budget ran out.
        GuardTimeout => "guard_timeout",
        /// The connection failed and the request could not be replayed.
        ConnectionLost => "connection_lost",
        /// The outcome of a write is unknown (SQLSTATE 08007).
        ResolutionUnknown => "resolution_unknown",
        /// A transaction ran past its strict timeout.
        TransactionTimeout => "transaction_timeout",
        /// The request or its response exceeded a size limit.
        TooLarge => "too_large",
        /// A bug or an unexpected condition in pgwarden.
        Internal => "internal",
    }
}
