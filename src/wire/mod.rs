//! The Postgres wire front end: clients such as psql, JDBC and node-postgres connect to pgwarden as if to PostgreSQL.

pub mod scram;
