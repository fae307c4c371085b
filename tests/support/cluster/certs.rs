//! TLS material for one cluster: a throwaway CA and a server certificate it signs.
//!
//! A real CA (rather than a self-signed server certificate) lets clients run
//! with full verification (`verify-full`) against the CA file, which is what
//! production deployments do.

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// PEM texts for the CA certificate, the server certificate and its private key.
pub struct TlsFiles {
    /// Certificate of the signing CA; clients trust this.
    pub ca_pem: String,
    /// Server certificate for `localhost` and `127.0.0.1`.
    pub cert_pem: String,
    /// Private key of the server certificate.
    pub key_pem: String,
}

/// Generates a fresh CA and a server certificate valid for `localhost` and `127.0.0.1`.
pub fn generate() -> TlsFiles {
    let ca_key = KeyPair::generate().expect("generate CA key");
    let ca_params = ca_params();
    let ca_pem = ca_params.self_signed(&ca_key).expect("self-sign CA").pem();
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().expect("generate server key");
    let cert = server_params()
        .signed_by(&key, &issuer)
        .expect("sign server certificate");
    TlsFiles {
        ca_pem,
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    }
}

/// Parameters of the CA certificate.
fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params
        .distinguished_name
        .push(DnType::CommonName, "pgwarden test CA");
    params
}

/// Parameters of the server certificate.
fn server_params() -> CertificateParams {
    let names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    let mut params = CertificateParams::new(names).expect("server params");
    params
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params
}
