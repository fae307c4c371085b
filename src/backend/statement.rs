//! What callers send: statements with text parameters, and transaction options.

/// One SQL statement with its parameters in text format.
///
/// Parameters are sent with type OID 0, so PostgreSQL infers each type from
/// the statement, as it does for libpq's `PQexecParams` with no types.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Statement {
    /// The SQL text; exactly one statement.
    pub sql: String,
    /// `$1`, `$2`, ... in text format; `None` is NULL.
    pub params: Vec<Option<String>>,
}

impl Statement {
    /// A statement without parameters.
    pub fn new(sql: impl Into<String>) -> Self {
        Self {
            sql: sql.into(),
            params: Vec::new(),
        }
    }

    /// A statement with text parameters.
    pub fn with_params(sql: impl Into<String>, params: Vec<Option<String>>) -> Self {
        Self {
            sql: sql.into(),
            params,
        }
    }
}

/// Isolation level of a transaction batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IsolationLevel {
    /// `READ UNCOMMITTED` (PostgreSQL treats it as READ COMMITTED).
    ReadUncommitted,
    /// `READ COMMITTED`.
    ReadCommitted,
    /// `REPEATABLE READ`.
    RepeatableRead,
    /// `SERIALIZABLE`.
    Serializable,
}

impl IsolationLevel {
    fn sql(self) -> &'static str {
        match self {
            IsolationLevel::ReadUncommitted => "READ UNCOMMITTED",
            IsolationLevel::ReadCommitted => "READ COMMITTED",
            IsolationLevel::RepeatableRead => "REPEATABLE READ",
            IsolationLevel::Serializable => "SERIALIZABLE",
        }
    }
}

/// How a transaction batch starts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TransactionOptions {
    /// Isolation level; the server's default when `None`.
    pub isolation: Option<IsolationLevel>,
    /// `READ ONLY` instead of `READ WRITE`.
    pub read_only: bool,
    /// `DEFERRABLE` (only meaningful for serializable read-only transactions).
    pub deferrable: bool,
    /// Also ask the transaction's id and the server's start time in the
    /// first round trip, so its outcome can be resolved if the connection
    /// breaks after COMMIT was sent.
    pub identify: bool,
}

impl TransactionOptions {
    /// The `START TRANSACTION` statement for these options.
    pub fn start_sql(&self) -> String {
        let mut sql = String::from("START TRANSACTION");
        if let Some(level) = self.isolation {
            sql.push_str(" ISOLATION LEVEL ");
            sql.push_str(level.sql());
        }
        if self.read_only {
            sql.push_str(" READ ONLY");
        }
        if self.deferrable {
            sql.push_str(" DEFERRABLE");
        }
        sql
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_sql_spells_every_option() {
        assert_eq!(
            TransactionOptions::default().start_sql(),
            "START TRANSACTION"
        );
        let all = TransactionOptions {
            isolation: Some(IsolationLevel::Serializable),
            read_only: true,
            deferrable: true,
            identify: false,
        };
        assert_eq!(
            all.start_sql(),
            "START TRANSACTION ISOLATION LEVEL SERIALIZABLE READ ONLY DEFERRABLE"
        );
    }
}
