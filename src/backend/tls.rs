//! TLS for backend connections, with libpq's `sslmode` semantics.
//!
//! `prefer` and `require` encrypt without authenticating the server, exactly
//! as libpq does; only `verify-full` checks the chain and the host name. The
//! client configuration is built once per target and shared by every
//! connection, because loading a root store per connection would cost more
//! than the handshake.

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

use super::error::BackendError;
use super::options::SslMode;

/// Builds the shared client configuration for `mode`, or `None` for `disable`.
pub(crate) fn client_config(
    mode: SslMode,
    root_cert: Option<&Path>,
) -> Result<Option<Arc<ClientConfig>>, BackendError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| BackendError::Tls(e.to_string()))?;
    let config = match mode {
        SslMode::Disable => return Ok(None),
        SslMode::Prefer | SslMode::Require => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate {
                algorithms: provider.signature_verification_algorithms,
            }))
            .with_no_client_auth(),
        SslMode::VerifyFull => builder
            .with_root_certificates(root_store(root_cert)?)
            .with_no_client_auth(),
    };
    Ok(Some(Arc::new(config)))
}

/// The server name to verify and to send as SNI.
pub(crate) fn server_name(host: &str) -> Result<ServerName<'static>, BackendError> {
    ServerName::try_from(host.to_owned())
        .map_err(|_| BackendError::Tls(format!("{host:?} is not a valid TLS server name")))
}

fn root_store(root_cert: Option<&Path>) -> Result<RootCertStore, BackendError> {
    let mut store = RootCertStore::empty();
    let Some(path) = root_cert else {
        store.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        return Ok(store);
    };
    let unreadable = |e: &dyn std::fmt::Display| {
        BackendError::Tls(format!("cannot read sslrootcert {}: {e}", path.display()))
    };
    for cert in CertificateDer::pem_file_iter(path).map_err(|e| unreadable(&e))? {
        let cert = cert.map_err(|e| unreadable(&e))?;
        store.add(cert).map_err(|e| unreadable(&e))?;
    }
    if store.is_empty() {
        return Err(unreadable(&"no certificate in file"));
    }
    Ok(store)
}

/// Encrypts without authenticating the server (`sslmode=prefer|require`).
///
/// Signatures are still verified, so the handshake proves the peer holds the
/// key of the certificate it shows; only the certificate's trust is skipped.
#[derive(Debug)]
struct AcceptAnyCertificate {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
