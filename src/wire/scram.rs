//! The server side of SCRAM-SHA-256 (RFC 5802, RFC 7677), as PostgreSQL
//! implements it in `src/backend/libpq/auth-scram.c`.
//!
//! A state machine without I/O: the session code carries the messages in
//! `AuthenticationSASL`, `SASLInitialResponse`, `AuthenticationSASLContinue`,
//! `SASLResponse` and `AuthenticationSASLFinal`, and this module only turns
//! one message into the next. Keeping I/O out makes every malformed or
//! hostile message testable without a socket.
//!
//! Choices that follow PostgreSQL, so clients behave as they do against it:
//! - The password is SASLprepped when it can be, else used as raw bytes.
//! - The `n=` user name in the client-first-message is ignored: the startup
//!   packet's user is the one that counts.
//! - No channel binding is offered (no `SCRAM-SHA-256-PLUS`), so a client that
//!   requires it (`p=`) is refused, while `n,,` and `y,,` are accepted; `y`
//!   (the client could bind but believes the server cannot) is safe to accept
//!   exactly because the server never offers binding. Once `-PLUS` is offered
//!   (over TLS), `y` must be refused there, as PostgreSQL does, or an attacker
//!   could strip the binding.
//! - An authorization identity (`a=`) and mandatory extensions (`m=`) are
//!   refused; optional extension attributes are ignored.
//! - A failed proof is reported as an error, not as `e=invalid-proof`: the
//!   session answers it with the same ErrorResponse PostgreSQL sends.
//!
//! Secrets (the password, StoredKey, ServerKey) never appear in `Debug` or
//! `Display` output, and error messages never quote client input.

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, KeyInit, Mac};
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The only mechanism offered.
const MECHANISM: &str = "SCRAM-SHA-256";
/// PostgreSQL's default `scram_iterations`.
const ITERATIONS: u32 = 4096;
/// PostgreSQL's salt length (`SCRAM_DEFAULT_SALT_LEN`).
const SALT_LEN: usize = 16;
/// Random bytes in the server's part of the nonce (`SCRAM_RAW_NONCE_LEN`).
const SERVER_NONCE_LEN: usize = 18;
/// Length of SHA-256 output, hence of every key, signature and proof.
const KEY_LEN: usize = 32;
/// The prefix of a SCRAM-SHA-256 verifier in `pg_authid.rolpassword`.
const VERIFIER_PREFIX: &str = "SCRAM-SHA-256$";

type HmacSha256 = Hmac<Sha256>;

/// What the server stores for one password, like a verifier in `pg_authid`:
/// enough to check a client's proof and to prove the server knows the
/// password, without keeping the password itself.
#[derive(Clone)]
pub struct ScramVerifier {
    /// PBKDF2 iterations; sent to the client, which repeats them.
    iterations: u32,
    /// Random salt; sent to the client. Not secret, but never shown.
    salt: Vec<u8>,
    /// `H(HMAC(SaltedPassword, "Client Key"))`: checks the client's proof.
    stored_key: [u8; KEY_LEN],
    /// `HMAC(SaltedPassword, "Server Key")`: signs the server-final-message.
    server_key: [u8; KEY_LEN],
}

impl fmt::Debug for ScramVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScramVerifier")
            .field("iterations", &self.iterations)
            .finish_non_exhaustive()
    }
}

impl ScramVerifier {
    /// Derives a verifier from a plaintext password with a fresh random
    /// 16-byte salt and 4096 iterations, as PostgreSQL does for
    /// `password_encryption = scram-sha-256`.
    pub fn new(password: &str) -> ScramVerifier {
        let mut salt = vec![0; SALT_LEN];
        rand::rng().fill_bytes(&mut salt);
        ScramVerifier::derive(&saslprep(password), salt, ITERATIONS)
    }

    /// Parses a verifier as PostgreSQL stores it in `pg_authid.rolpassword`:
    /// `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`, all three
    /// byte strings in base64.
    pub fn from_postgres_verifier(verifier: &str) -> Result<ScramVerifier, ScramError> {
        let invalid = ScramError::InvalidVerifier;
        let rest = verifier
            .strip_prefix(VERIFIER_PREFIX)
            .ok_or(invalid("not a SCRAM-SHA-256 verifier"))?;
        let (params, keys) = rest.split_once('$').ok_or(invalid("missing keys"))?;
        let (iterations, salt) = params.split_once(':').ok_or(invalid("missing salt"))?;
        let (stored_key, server_key) = keys.split_once(':').ok_or(invalid("missing server key"))?;
        let iterations = iterations
            .parse::<u32>()
            .ok()
            .filter(|&i| i > 0)
            .ok_or(invalid("invalid iteration count"))?;
        let salt = STANDARD.decode(salt).map_err(|_| invalid("invalid salt"))?;
        if salt.is_empty() {
            return Err(invalid("empty salt"));
        }
        Ok(ScramVerifier {
            iterations,
            salt,
            stored_key: decode_key(stored_key).ok_or(invalid("invalid stored key"))?,
            server_key: decode_key(server_key).ok_or(invalid("invalid server key"))?,
        })
    }

    /// True when `password` is the one this verifier was derived from
    /// (a full key derivation: thousands of hashes; compared in constant
    /// time).
    pub fn matches_password(&self, password: &str) -> bool {
        let derived =
            ScramVerifier::derive(&saslprep(password), self.salt.clone(), self.iterations);
        bool::from(derived.stored_key.ct_eq(&self.stored_key))
    }

    /// Starts one authentication exchange against this verifier.
    pub fn exchange(&self) -> ScramServer {
        ScramServer {
            verifier: self.clone(),
            state: State::AwaitingClientFirst,
        }
    }

    /// The verifier for an already prepared password, salt and iteration count.
    fn derive(password: &[u8], salt: Vec<u8>, iterations: u32) -> ScramVerifier {
        let salted_password = hi(password, &salt, iterations);
        let client_key = hmac(&salted_password, &[b"Client Key"]);
        ScramVerifier {
            iterations,
            salt,
            stored_key: Sha256::digest(client_key).into(),
            server_key: hmac(&salted_password, &[b"Server Key"]),
        }
    }

    /// Recovers ClientKey from the proof and compares its hash with StoredKey
    /// in constant time.
    fn check_proof(&self, proof: &[u8; KEY_LEN], auth_message: &[&[u8]]) -> Result<(), ScramError> {
        let signature = hmac(&self.stored_key, auth_message);
        let mut client_key = *proof;
        for (k, s) in client_key.iter_mut().zip(signature) {
            *k ^= s;
        }
        let stored_key: [u8; KEY_LEN] = Sha256::digest(client_key).into();
        if bool::from(stored_key.ct_eq(&self.stored_key)) {
            Ok(())
        } else {
            Err(ScramError::WrongPassword)
        }
    }
}

/// One authentication exchange: client-first → server-first, client-final →
/// server-final. Any error ends the exchange; later calls fail with
/// [`ScramError::OutOfOrder`].
pub struct ScramServer {
    /// The keys this exchange checks against (a copy: exchanges are
    /// independent of the verifier's lifetime).
    verifier: ScramVerifier,
    /// Where the exchange stands.
    state: State,
}

/// The steps of an exchange.
enum State {
    /// Nothing received yet.
    AwaitingClientFirst,
    /// Server-first sent; what the client-final-message must match and what
    /// the AuthMessage is built from.
    AwaitingClientFinal {
        /// The client's gs2 header, `n,,` or `y,,`, which `c=` must echo.
        gs2_header: &'static str,
        /// Client nonce followed by server nonce, which `r=` must echo.
        nonce: String,
        /// The client-first-message without its gs2 header.
        client_first_bare: Vec<u8>,
        /// The server-first-message as sent.
        server_first: String,
    },
    /// Finished, successfully or not.
    Done,
}

impl fmt::Debug for ScramServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match self.state {
            State::AwaitingClientFirst => "awaiting_client_first",
            State::AwaitingClientFinal { .. } => "awaiting_client_final",
            State::Done => "done",
        };
        f.debug_struct("ScramServer")
            .field("state", &state)
            .finish_non_exhaustive()
    }
}

impl ScramServer {
    /// The mechanism names to offer in AuthenticationSASL. No `-PLUS`:
    /// channel binding is not offered.
    pub const MECHANISMS: &'static [&'static str] = &[MECHANISM];

    /// Takes the client-first-message (the data of SASLInitialResponse) and
    /// returns the server-first-message (for AuthenticationSASLContinue).
    pub fn server_first(&mut self, client_first: &[u8]) -> Result<Vec<u8>, ScramError> {
        let mut random = [0u8; SERVER_NONCE_LEN];
        rand::rng().fill_bytes(&mut random);
        self.server_first_with_nonce(client_first, &STANDARD.encode(random))
    }

    /// Takes the client-final-message (the data of SASLResponse), checks the
    /// channel-binding echo, the nonce and the proof, and returns the
    /// server-final-message (for AuthenticationSASLFinal).
    pub fn server_final(&mut self, client_final: &[u8]) -> Result<Vec<u8>, ScramError> {
        let State::AwaitingClientFinal {
            gs2_header,
            nonce,
            client_first_bare,
            server_first,
        } = std::mem::replace(&mut self.state, State::Done)
        else {
            return Err(ScramError::OutOfOrder);
        };
        let message = ClientFinal::parse(client_final)?;
        if message.channel_binding != STANDARD.encode(gs2_header).as_bytes() {
            return Err(ScramError::ChannelBindingMismatch);
        }
        if message.nonce != nonce.as_bytes() {
            return Err(ScramError::NonceMismatch);
        }
        let auth_message: [&[u8]; 5] = [
            &client_first_bare,
            b",",
            server_first.as_bytes(),
            b",",
            message.without_proof,
        ];
        self.verifier.check_proof(&message.proof, &auth_message)?;
        let signature = hmac(&self.verifier.server_key, &auth_message);
        Ok(format!("v={}", STANDARD.encode(signature)).into_bytes())
    }

    /// [`ScramServer::server_first`] with a given server nonce, so a
    /// published exchange can be replayed byte for byte.
    fn server_first_with_nonce(
        &mut self,
        client_first: &[u8],
        server_nonce: &str,
    ) -> Result<Vec<u8>, ScramError> {
        if !matches!(
            std::mem::replace(&mut self.state, State::Done),
            State::AwaitingClientFirst
        ) {
            return Err(ScramError::OutOfOrder);
        }
        let message = ClientFirst::parse(client_first)?;
        let nonce = format!(
            "{}{server_nonce}",
            std::str::from_utf8(message.nonce).expect("a nonce is printable ASCII")
        );
        let server_first = format!(
            "r={nonce},s={},i={}",
            STANDARD.encode(&self.verifier.salt),
            self.verifier.iterations
        );
        self.state = State::AwaitingClientFinal {
            gs2_header: message.gs2_header,
            nonce,
            client_first_bare: message.bare.to_vec(),
            server_first: server_first.clone(),
        };
        Ok(server_first.into_bytes())
    }
}

/// The parts of a client-first-message the server uses.
struct ClientFirst<'a> {
    /// `n,,` or `y,,`.
    gs2_header: &'static str,
    /// Everything after the gs2 header; part of the AuthMessage.
    bare: &'a [u8],
    /// The client's nonce (printable ASCII, no comma).
    nonce: &'a [u8],
}

impl<'a> ClientFirst<'a> {
    /// `gs2-cbind-flag "," [authzid] "," [reserved-mext ","] username "," nonce ["," extensions]`.
    fn parse(message: &'a [u8]) -> Result<ClientFirst<'a>, ScramError> {
        check_no_nul(message)?;
        let gs2_header = match message {
            [b'n', b',', ..] => "n,,",
            [b'y', b',', ..] => "y,,",
            [b'p', ..] => return Err(ScramError::ChannelBindingRequired),
            _ => return Err(ScramError::Malformed("invalid channel-binding flag")),
        };
        let bare = match message[2..] {
            [b',', ..] => &message[3..],
            [b'a', b'=', ..] => return Err(ScramError::Unsupported("authorization identity")),
            _ => return Err(ScramError::Malformed("invalid gs2 header")),
        };
        let mut attributes = bare.split(|&b| b == b',');
        let user = attribute(attributes.next())?;
        match user.0 {
            b'm' => return Err(ScramError::Unsupported("mandatory extension")),
            b'n' => {}
            _ => return Err(ScramError::Malformed("expected user name")),
        }
        let (name, nonce) = attribute(attributes.next())?;
        if name != b'r' || nonce.is_empty() || !nonce.iter().all(|&b| is_printable(b)) {
            return Err(ScramError::Malformed("invalid client nonce"));
        }
        check_extensions(attributes)?;
        Ok(ClientFirst {
            gs2_header,
            bare,
            nonce,
        })
    }
}

/// The parts of a client-final-message the server checks.
struct ClientFinal<'a> {
    /// The base64 value of `c=`.
    channel_binding: &'a [u8],
    /// The value of `r=`.
    nonce: &'a [u8],
    /// Everything before `,p=`; part of the AuthMessage.
    without_proof: &'a [u8],
    /// The decoded proof.
    proof: [u8; KEY_LEN],
}

impl<'a> ClientFinal<'a> {
    /// `channel-binding "," nonce ["," extensions] "," proof`.
    fn parse(message: &'a [u8]) -> Result<ClientFinal<'a>, ScramError> {
        check_no_nul(message)?;
        let split = message
            .iter()
            .rposition(|&b| b == b',')
            .ok_or(ScramError::Malformed("missing proof"))?;
        let (without_proof, proof) = (&message[..split], &message[split + 1..]);
        let proof = match attribute(Some(proof))? {
            (b'p', value) => {
                decode_key_bytes(value).ok_or(ScramError::Malformed("invalid proof"))?
            }
            _ => return Err(ScramError::Malformed("missing proof")),
        };
        let mut attributes = without_proof.split(|&b| b == b',');
        let (b'c', channel_binding) = attribute(attributes.next())? else {
            return Err(ScramError::Malformed("missing channel binding"));
        };
        let (b'r', nonce) = attribute(attributes.next())? else {
            return Err(ScramError::Malformed("missing nonce"));
        };
        check_extensions(attributes)?;
        Ok(ClientFinal {
            channel_binding,
            nonce,
            without_proof,
            proof,
        })
    }
}

/// Splits `x=value` into its name letter and value.
fn attribute(raw: Option<&[u8]>) -> Result<(u8, &[u8]), ScramError> {
    match raw {
        Some([name, b'=', value @ ..]) if name.is_ascii_alphabetic() => Ok((*name, value)),
        _ => Err(ScramError::Malformed("invalid attribute")),
    }
}

/// Optional extensions are ignored (as PostgreSQL does) but must be
/// well-formed; a mandatory one (`m=`) is refused.
fn check_extensions<'a>(attributes: impl Iterator<Item = &'a [u8]>) -> Result<(), ScramError> {
    for raw in attributes {
        if attribute(Some(raw))?.0 == b'm' {
            return Err(ScramError::Unsupported("mandatory extension"));
        }
    }
    Ok(())
}

/// PostgreSQL refuses SCRAM messages with a NUL byte.
fn check_no_nul(message: &[u8]) -> Result<(), ScramError> {
    if message.contains(&0) {
        return Err(ScramError::Malformed("NUL byte in message"));
    }
    Ok(())
}

/// RFC 5802's `printable`: visible ASCII except the comma.
fn is_printable(b: u8) -> bool {
    (0x21..=0x7e).contains(&b) && b != b','
}

/// A base64 key of exactly [`KEY_LEN`] bytes.
fn decode_key(value: &str) -> Option<[u8; KEY_LEN]> {
    decode_key_bytes(value.as_bytes())
}

/// [`decode_key`] for bytes taken from a client message.
fn decode_key_bytes(value: &[u8]) -> Option<[u8; KEY_LEN]> {
    STANDARD.decode(value).ok()?.try_into().ok()
}

/// SASLprep as PostgreSQL applies it (`pg_saslprep`): when the password
/// cannot be prepared (a prohibited character, say), the raw bytes are used,
/// which is also what clients fall back to.
fn saslprep(password: &str) -> Vec<u8> {
    match stringprep::saslprep(password) {
        Ok(prepared) => prepared.into_owned().into_bytes(),
        Err(_) => password.as_bytes().to_vec(),
    }
}

/// HMAC-SHA-256 of the concatenated `parts`.
fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; KEY_LEN] {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes keys of any length");
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

/// RFC 5802's `Hi()`: PBKDF2 with HMAC-SHA-256 and one output block.
fn hi(password: &[u8], salt: &[u8], iterations: u32) -> [u8; KEY_LEN] {
    let mut u = hmac(password, &[salt, &1u32.to_be_bytes()]);
    let mut result = u;
    for _ in 1..iterations {
        u = hmac(password, &[&u]);
        for (r, x) in result.iter_mut().zip(u) {
            *r ^= x;
        }
    }
    result
}

/// Why an exchange failed. No variant carries client input or secrets.
#[derive(Debug, thiserror::Error)]
pub enum ScramError {
    /// A message does not follow the SCRAM grammar.
    #[error("malformed SCRAM message: {0}")]
    Malformed(&'static str),
    /// The client asked for something the server does not support.
    #[error("unsupported SCRAM feature: {0}")]
    Unsupported(&'static str),
    /// The client requires channel binding (`p=`), which is not offered.
    #[error("the client requires SCRAM channel binding, which is not offered")]
    ChannelBindingRequired,
    /// `c=` is not the base64 of the gs2 header the client sent first.
    #[error("SCRAM channel binding check failed")]
    ChannelBindingMismatch,
    /// `r=` is not the nonce the server sent.
    #[error("SCRAM nonce mismatch")]
    NonceMismatch,
    /// The proof does not match: the client does not know the password.
    #[error("password authentication failed")]
    WrongPassword,
    /// A message arrived when the exchange did not expect one.
    #[error("SCRAM message out of order")]
    OutOfOrder,
    /// A stored verifier could not be parsed.
    #[error("invalid SCRAM-SHA-256 verifier: {0}")]
    InvalidVerifier(&'static str),
}

/// Bounded classification of a [`ScramError`], usable as a metric label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScramErrorKind {
    /// See [`ScramError::Malformed`].
    Malformed,
    /// See [`ScramError::Unsupported`].
    Unsupported,
    /// A channel-binding request or a mismatched `c=`.
    ChannelBinding,
    /// See [`ScramError::NonceMismatch`].
    NonceMismatch,
    /// See [`ScramError::WrongPassword`].
    WrongPassword,
    /// See [`ScramError::OutOfOrder`].
    OutOfOrder,
    /// See [`ScramError::InvalidVerifier`].
    InvalidVerifier,
}

impl ScramErrorKind {
    /// Every kind, for pre-creating metric labels.
    pub const ALL: &'static [ScramErrorKind] = &[
        ScramErrorKind::Malformed,
        ScramErrorKind::Unsupported,
        ScramErrorKind::ChannelBinding,
        ScramErrorKind::NonceMismatch,
        ScramErrorKind::WrongPassword,
        ScramErrorKind::OutOfOrder,
        ScramErrorKind::InvalidVerifier,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            ScramErrorKind::Malformed => "malformed",
            ScramErrorKind::Unsupported => "unsupported",
            ScramErrorKind::ChannelBinding => "channel_binding",
            ScramErrorKind::NonceMismatch => "nonce_mismatch",
            ScramErrorKind::WrongPassword => "wrong_password",
            ScramErrorKind::OutOfOrder => "out_of_order",
            ScramErrorKind::InvalidVerifier => "invalid_verifier",
        }
    }
}

impl ScramError {
    /// The bounded classification of this error.
    pub fn kind(&self) -> ScramErrorKind {
        match self {
            ScramError::Malformed(_) => ScramErrorKind::Malformed,
            ScramError::Unsupported(_) => ScramErrorKind::Unsupported,
            ScramError::ChannelBindingRequired | ScramError::ChannelBindingMismatch => {
                ScramErrorKind::ChannelBinding
            }
            ScramError::NonceMismatch => ScramErrorKind::NonceMismatch,
            ScramError::WrongPassword => ScramErrorKind::WrongPassword,
            ScramError::OutOfOrder => ScramErrorKind::OutOfOrder,
            ScramError::InvalidVerifier(_) => ScramErrorKind::InvalidVerifier,
        }
    }

    /// Whether the client failed to prove it knows the password (PostgreSQL
    /// answers 28P01), as opposed to breaking the protocol (08P01).
    pub fn is_wrong_password(&self) -> bool {
        matches!(self, ScramError::WrongPassword)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::LazyLock;

    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    const PASSWORD: &str = "correct horse battery staple";

    /// Deriving a verifier costs 4096 HMAC rounds; most tests share one.
    static VERIFIER: LazyLock<ScramVerifier> = LazyLock::new(|| ScramVerifier::new(PASSWORD));

    /// Runs a whole exchange with the `postgres-protocol` client, which also
    /// checks the server's signature.
    fn authenticate(
        verifier: &ScramVerifier,
        password: &str,
        binding: ChannelBinding,
    ) -> Result<(), ScramError> {
        let mut client = ScramSha256::new(password.as_bytes(), binding);
        let mut server = verifier.exchange();
        let server_first = server.server_first(client.message())?;
        client
            .update(&server_first)
            .expect("client accepts server-first");
        let server_final = server.server_final(client.message())?;
        client
            .finish(&server_final)
            .expect("client verifies the server signature");
        Ok(())
    }

    /// A client-first-message, the server-first answer and the matching
    /// client-final-message for [`VERIFIER`], with a fixed server nonce.
    fn valid_messages(binding: ChannelBinding) -> (ScramServer, Vec<u8>, Vec<u8>) {
        let mut client = ScramSha256::new(PASSWORD.as_bytes(), binding);
        let client_first = client.message().to_vec();
        let mut server = VERIFIER.exchange();
        let server_first = server
            .server_first_with_nonce(&client_first, "fixedservernonce")
            .unwrap();
        client.update(&server_first).unwrap();
        (server, client_first, client.message().to_vec())
    }

    fn server_after_first(client_first: &[u8]) -> ScramServer {
        let mut server = VERIFIER.exchange();
        server
            .server_first_with_nonce(client_first, "fixedservernonce")
            .unwrap();
        server
    }

    fn replace(message: &[u8], from: &str, to: &str) -> Vec<u8> {
        let text = std::str::from_utf8(message).unwrap();
        assert!(text.contains(from), "{text} lacks {from}");
        text.replacen(from, to, 1).into_bytes()
    }

    #[test]
    fn a_password_itself_is_checked_against_the_verifier() {
        let verifier = ScramVerifier::new("pencil");
        assert!(verifier.matches_password("pencil"));
        assert!(!verifier.matches_password("Pencil"));
        assert!(!verifier.matches_password(""));
    }

    #[test]
    fn right_password_authenticates_with_and_without_client_binding_support() {
        authenticate(&VERIFIER, PASSWORD, ChannelBinding::unsupported()).unwrap();
        authenticate(&VERIFIER, PASSWORD, ChannelBinding::unrequested()).unwrap();
    }

    #[test]
    fn wrong_password_is_refused_as_such() {
        let err =
            authenticate(&VERIFIER, "correct horse", ChannelBinding::unsupported()).unwrap_err();
        assert!(err.is_wrong_password(), "{err}");
        assert_eq!(err.kind().as_str(), "wrong_password");
    }

    #[test]
    fn replays_a_recorded_postgresql_exchange_and_the_rfc_7677_example() {
        // (password, salt, client-first, server nonce, client-final, server-final)
        let cases = [
            (
                "foobar",
                "fs3IXBy7U7+IvVjZ",
                "n,,n=,r=9IZ2O01zb9IgiIZ1WJ/zgpJB",
                "jx/oIRLs02gGSHcw1KEty3eY",
                "c=biws,r=9IZ2O01zb9IgiIZ1WJ/zgpJBjx/oIRLs02gGSHcw1KEty3eY,\
                 p=AmNKosjJzS31NTlQYNs5BTeQjdHdk7lOflDo5re2an8=",
                "v=U+ppxD5XUKtradnv8e2MkeupiA8FU87Sg8CXzXHDAzw=",
            ),
            (
                "pencil",
                "W22ZaJ0SNY7soEsUEjb6gQ==",
                "n,,n=user,r=rOprNGfwEbeRWgbNEkqO",
                "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0",
                "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,\
                 p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=",
                "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=",
            ),
        ];
        for (password, salt, client_first, server_nonce, client_final, server_final) in cases {
            let raw_salt = STANDARD.decode(salt).unwrap();
            let verifier = ScramVerifier::derive(password.as_bytes(), raw_salt, ITERATIONS);
            let mut server = verifier.exchange();
            let first = server
                .server_first_with_nonce(client_first.as_bytes(), server_nonce)
                .unwrap();
            let client_nonce = &client_first[client_first.find("r=").unwrap() + 2..];
            let expected = format!("r={client_nonce}{server_nonce},s={salt},i=4096");
            assert_eq!(String::from_utf8(first).unwrap(), expected);
            let last = server.server_final(client_final.as_bytes()).unwrap();
            assert_eq!(String::from_utf8(last).unwrap(), server_final);
        }
    }

    #[test]
    fn a_verifier_stored_by_postgresql_authenticates_its_password() {
        let stored = postgres_protocol::password::scram_sha_256(PASSWORD.as_bytes());
        let verifier = ScramVerifier::from_postgres_verifier(&stored).unwrap();
        authenticate(&verifier, PASSWORD, ChannelBinding::unsupported()).unwrap();
        let err = authenticate(&verifier, "guess", ChannelBinding::unsupported()).unwrap_err();
        assert!(err.is_wrong_password(), "{err}");
    }

    #[test]
    fn malformed_stored_verifiers_are_refused() {
        let key = STANDARD.encode([7u8; KEY_LEN]);
        let short = STANDARD.encode([7u8; 16]);
        let cases = [
            String::new(),
            "md5abcdef".into(),
            format!("SCRAM-SHA-1$4096:c2FsdA==${key}:{key}"),
            format!("SCRAM-SHA-256$4096:c2FsdA=={key}:{key}"),
            format!("SCRAM-SHA-256$4096c2FsdA==${key}:{key}"),
            format!("SCRAM-SHA-256$0:c2FsdA==${key}:{key}"),
            format!("SCRAM-SHA-256$-1:c2FsdA==${key}:{key}"),
            format!("SCRAM-SHA-256$4096:${key}:{key}"),
            format!("SCRAM-SHA-256$4096:not base64!${key}:{key}"),
            format!("SCRAM-SHA-256$4096:c2FsdA==${key}{key}"),
            format!("SCRAM-SHA-256$4096:c2FsdA==${short}:{key}"),
            format!("SCRAM-SHA-256$4096:c2FsdA==${key}:{key}:"),
        ];
        for case in cases {
            let err = ScramVerifier::from_postgres_verifier(&case).unwrap_err();
            assert_eq!(err.kind(), ScramErrorKind::InvalidVerifier, "{case}");
        }
    }

    #[test]
    fn non_ascii_passwords_are_saslprepped_like_postgresql_does() {
        for password in ["pässwörd", "日本語のパスワード", "pass\u{7}word"] {
            let verifier = ScramVerifier::new(password);
            authenticate(&verifier, password, ChannelBinding::unsupported()).unwrap();
        }
        // SASLprep maps a soft hyphen to nothing and a no-break space to a
        // space, so both spellings are the same password.
        let verifier = ScramVerifier::new("I\u{AD}X\u{A0}Y");
        authenticate(&verifier, "IX Y", ChannelBinding::unsupported()).unwrap();
    }

    #[test]
    fn each_exchange_appends_a_fresh_random_nonce() {
        let client_first = b"n,,n=,r=clientnonce";
        let nonce = |mut server: ScramServer| {
            let first = String::from_utf8(server.server_first(client_first).unwrap()).unwrap();
            let nonce = first.strip_prefix("r=clientnonce").unwrap();
            nonce[..nonce.find(',').unwrap()].to_string()
        };
        let (a, b) = (nonce(VERIFIER.exchange()), nonce(VERIFIER.exchange()));
        assert_ne!(a, b);
        assert_eq!(STANDARD.decode(&a).unwrap().len(), SERVER_NONCE_LEN);
    }

    #[test]
    fn a_tampered_nonce_is_refused() {
        let (mut server, _, client_final) = valid_messages(ChannelBinding::unsupported());
        let tampered = replace(&client_final, "fixedservernonce", "fixedservernoncf");
        let err = server.server_final(&tampered).unwrap_err();
        assert_eq!(err.kind(), ScramErrorKind::NonceMismatch);
    }

    #[test]
    fn channel_binding_echo_must_match_the_gs2_header() {
        let (mut server, _, client_final) = valid_messages(ChannelBinding::unsupported());
        let err = server
            .server_final(&replace(&client_final, "c=biws", "c=eSws"))
            .unwrap_err();
        assert!(matches!(err, ScramError::ChannelBindingMismatch), "{err}");

        let (mut server, _, client_final) = valid_messages(ChannelBinding::unrequested());
        let err = server
            .server_final(&replace(&client_final, "c=eSws", "c=biws"))
            .unwrap_err();
        assert!(matches!(err, ScramError::ChannelBindingMismatch), "{err}");
    }

    #[test]
    fn a_client_that_requires_channel_binding_is_refused() {
        let mut server = VERIFIER.exchange();
        let err = server
            .server_first(b"p=tls-server-end-point,,n=,r=clientnonce")
            .unwrap_err();
        assert!(matches!(err, ScramError::ChannelBindingRequired), "{err}");
        assert_eq!(err.kind(), ScramErrorKind::ChannelBinding);
    }

    #[test]
    fn authorization_identities_and_mandatory_extensions_are_refused() {
        for message in [
            "n,a=admin,n=,r=clientnonce",
            "n,,m=ext,n=,r=clientnonce",
            "n,,n=,r=clientnonce,m=ext",
        ] {
            let err = VERIFIER
                .exchange()
                .server_first(message.as_bytes())
                .unwrap_err();
            assert_eq!(err.kind(), ScramErrorKind::Unsupported, "{message}");
        }
        let (mut server, _, client_final) = valid_messages(ChannelBinding::unsupported());
        let with_extension = replace(&client_final, ",p=", ",m=ext,p=");
        let err = server.server_final(&with_extension).unwrap_err();
        assert_eq!(err.kind(), ScramErrorKind::Unsupported);
    }

    #[test]
    fn the_user_name_and_optional_extensions_are_ignored() {
        let client_first = b"n,,n=someone else,r=clientnonce,x=ext";
        let mut server = VERIFIER.exchange();
        assert!(server.server_first(client_first).is_ok());
    }

    #[test]
    fn malformed_client_first_messages_are_refused() {
        let cases: [&[u8]; 14] = [
            b"",
            b"x",
            b"n",
            b"n,",
            b"n,,",
            b"n,x,n=,r=clientnonce",
            b"q,,n=,r=clientnonce",
            b"n,,r=clientnonce",
            b"n,,n=,r=",
            b"n,,n=,r=client nonce",
            b"n,,n=,r=clientnonce,",
            b"n,,n=,r=clientnonce,ext",
            b"n,,n=,r=client\0nonce",
            b"n,,n=,r=client\xffnonce",
        ];
        for case in cases {
            let err = VERIFIER.exchange().server_first(case).unwrap_err();
            assert_eq!(err.kind(), ScramErrorKind::Malformed, "{case:?}");
        }
    }

    #[test]
    fn malformed_client_final_messages_are_refused() {
        let client_first = b"n,,n=,r=clientnonce";
        let nonce = "r=clientnoncefixedservernonce";
        let proof = STANDARD.encode([1u8; KEY_LEN]);
        let short_proof = STANDARD.encode([1u8; KEY_LEN - 1]);
        let cases = [
            String::new(),
            "c=biws".into(),
            format!("c=biws,{nonce}"),
            format!("c=biws,{nonce},"),
            format!("c=biws,{nonce},p="),
            format!("c=biws,{nonce},p={short_proof}"),
            format!("c=biws,{nonce},p=not*base64"),
            format!("c=biws,{nonce},p={proof},x=trailing"),
            format!("{nonce},c=biws,p={proof}"),
            format!("c=biws,p={proof}"),
            format!("c=biws,{nonce},ext,p={proof}"),
            format!("c=biws,{nonce}\0,p={proof}"),
        ];
        for case in cases {
            let err = server_after_first(client_first)
                .server_final(case.as_bytes())
                .unwrap_err();
            assert_eq!(err.kind(), ScramErrorKind::Malformed, "{case}");
        }
    }

    #[test]
    fn messages_out_of_order_are_refused_and_a_failed_exchange_stays_failed() {
        let err = VERIFIER.exchange().server_final(b"c=biws").unwrap_err();
        assert_eq!(err.kind(), ScramErrorKind::OutOfOrder);

        let (mut server, client_first, client_final) =
            valid_messages(ChannelBinding::unsupported());
        let err = server.server_first(&client_first).unwrap_err();
        assert_eq!(err.kind(), ScramErrorKind::OutOfOrder);
        let err = server.server_final(&client_final).unwrap_err();
        assert_eq!(
            err.kind(),
            ScramErrorKind::OutOfOrder,
            "dead after an error"
        );

        let (mut server, _, client_final) = valid_messages(ChannelBinding::unsupported());
        server.server_final(&client_final).unwrap();
        let err = server.server_final(&client_final).unwrap_err();
        assert_eq!(err.kind(), ScramErrorKind::OutOfOrder, "no replay");
    }

    #[test]
    fn arbitrary_and_mutated_messages_never_panic() {
        let mut rng = StdRng::seed_from_u64(5802);
        let (_, client_first, client_final) = valid_messages(ChannelBinding::unsupported());
        let mutate = |rng: &mut StdRng, message: &[u8]| {
            let mut message = message.to_vec();
            for _ in 0..rng.random_range(1..4) {
                match rng.random_range(0..3) {
                    0 if !message.is_empty() => {
                        let i = rng.random_range(0..message.len());
                        message[i] = rng.random();
                    }
                    1 if !message.is_empty() => {
                        message.truncate(rng.random_range(0..message.len()));
                    }
                    _ => message.push(*b",=pnrcy\0\xff".get(rng.random_range(0..9)).unwrap()),
                }
            }
            message
        };
        for _ in 0..2000 {
            let random: Vec<u8> = (0..rng.random_range(0..64)).map(|_| rng.random()).collect();
            let _ = VERIFIER.exchange().server_first(&random);
            let _ = VERIFIER
                .exchange()
                .server_first(&mutate(&mut rng, &client_first));
            let mutated = mutate(&mut rng, &client_final);
            let result = server_after_first(&client_first).server_final(&mutated);
            assert!(result.is_err() || mutated == client_final);
        }
    }

    #[test]
    fn debug_output_shows_no_secrets() {
        let shown = format!("{:?} {:?}", *VERIFIER, VERIFIER.exchange());
        for secret in [
            STANDARD.encode(VERIFIER.stored_key),
            STANDARD.encode(VERIFIER.server_key),
            STANDARD.encode(&VERIFIER.salt),
        ] {
            assert!(!shown.contains(&secret), "{shown}");
        }
        assert!(!shown.contains("stored_key") && !shown.contains("server_key"));
    }

    #[test]
    fn error_kinds_are_distinct_labels() {
        let mut labels: Vec<_> = ScramErrorKind::ALL.iter().map(|k| k.as_str()).collect();
        labels.sort_unstable();
        labels.dedup();
        assert_eq!(labels.len(), ScramErrorKind::ALL.len());
        assert_eq!(ScramServer::MECHANISMS, ["SCRAM-SHA-256"]);
    }
}
