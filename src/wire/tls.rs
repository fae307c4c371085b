//! TLS to wire clients: a client's SSLRequest is answered `S` and the
//! connection continues inside a TLS session with pgwarden's certificate,
//! when one is configured (`pg_tls_cert`, `pg_tls_key`).
//!
//! The server configuration is built once, at start-up, so a broken
//! certificate or key stops the daemon with a clear message instead of
//! failing every client's handshake.

use std::path::Path;
use std::sync::Arc;

use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

/// Why the TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {reason}")]
pub struct TlsConfigError {
    /// The configuration key at fault.
    pub key: &'static str,
    /// What is wrong, without the file's contents.
    pub reason: String,
}

/// Accepts TLS from wire clients with pgwarden's certificate.
#[derive(Clone)]
pub struct ClientTls(pub TlsAcceptor);

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientTls")
    }
}

/// The acceptor for `cert` (a PEM chain, leaf first) and `key` (PEM).
pub fn acceptor(cert: &Path, key: &Path) -> Result<ClientTls, TlsConfigError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<_, _>>())
        .map_err(|e| TlsConfigError {
            key: "pg_tls_cert",
            reason: format!("cannot read certificates from {}: {e}", cert.display()),
        })?;
    if chain.is_empty() {
        return Err(TlsConfigError {
            key: "pg_tls_cert",
            reason: format!("{} holds no certificate", cert.display()),
        });
    }
    let private = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsConfigError {
        key: "pg_tls_key",
        reason: format!("cannot read a private key from {}: {e}", key.display()),
    })?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .and_then(|builder| {
            builder
                .with_no_client_auth()
                .with_single_cert(chain, private)
        })
        .map_err(|e| TlsConfigError {
            key: "pg_tls_key",
            reason: format!("the certificate and key do not make a TLS configuration: {e}"),
        })?;
    Ok(ClientTls(TlsAcceptor::from(Arc::new(config))))
}
