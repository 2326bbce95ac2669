//! How the client trusts the server: system-style roots (plus `--ca`), an exact
//! certificate pin, or nothing at all (`--insecure`).

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};

/// The trust decision, from the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trust {
    /// Web PKI roots plus any extra CA files.
    Roots { extra_ca: Vec<std::path::PathBuf> },
    /// Exactly this certificate (SHA-256 of its DER), whoever signed it.
    Pin([u8; 32]),
    /// Anything: encryption without authentication.
    Insecure,
}

/// Why the client's TLS settings could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error("--pin-sha256 wants 64 hex digits, got {0:?}")]
    BadPin(String),
    #[error("cannot read CA file {}: {source}", path.display())]
    CaFileUnreadable { path: std::path::PathBuf, source: rustls::pki_types::pem::Error },
    #[error("CA file {} holds no certificate", path.display())]
    CaFileEmpty { path: std::path::PathBuf },
    #[error("CA file {}: {source}", path.display())]
    CaRejected { path: std::path::PathBuf, source: rustls::Error },
    #[error("TLS settings: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("TLS certificate verifier: {0}")]
    Verifier(#[from] rustls::client::VerifierBuilderError),
}

/// Parses a pin given as 64 hex digits, colons allowed.
pub fn parse_pin(text: &str) -> Result<[u8; 32], TrustError> {
    let hex: String = text.chars().filter(|c| *c != ':').collect();
    if hex.len() != 64 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(TrustError::BadPin(text.to_string()));
    }
    let mut pin = [0u8; 32];
    for (i, byte) in pin.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).expect("checked hex");
    }
    Ok(pin)
}

pub fn client_config(trust: &Trust) -> Result<Arc<rustls::ClientConfig>, TrustError> {
    let provider = Arc::new(crate::crypto::provider());
    let builder =
        rustls::ClientConfig::builder_with_provider(provider.clone()).with_safe_default_protocol_versions()?;
    let check = match trust {
        Trust::Roots { extra_ca } => {
            let mut roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
            let mut trusted_leaves = Vec::new();
            for path in extra_ca {
                trusted_leaves.extend(add_ca_file(&mut roots, path)?);
            }
            let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()?;
            Check::WebPki { webpki, trusted_leaves }
        }
        Trust::Pin(pin) => Check::Pin(*pin),
        Trust::Insecure => Check::Anything,
    };
    let verifier = Arc::new(Verifier { check, provider });
    let mut config = builder.dangerous().with_custom_certificate_verifier(verifier).with_no_client_auth();
    config.alpn_protocols = crate::crypto::CLIENT_ALPN.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// Adds a CA file's certificates to `roots` and returns them.
fn add_ca_file(roots: &mut rustls::RootCertStore, path: &Path) -> Result<Vec<CertificateDer<'static>>, TrustError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|source| TrustError::CaFileUnreadable { path: path.to_path_buf(), source })?;
    if certs.is_empty() {
        return Err(TrustError::CaFileEmpty { path: path.to_path_buf() });
    }
    for cert in &certs {
        roots.add(cert.clone()).map_err(|source| TrustError::CaRejected { path: path.to_path_buf(), source })?;
    }
    Ok(certs)
}

/// The server's certificate is not the pinned one.
#[derive(thiserror::Error)]
#[error("certificate does not match --pin-sha256")]
struct PinMismatch;

// rustls shows a custom certificate error with `Debug`: let that be the sentence.
impl std::fmt::Debug for PinMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

/// Explains a failed handshake in terms of the flags that fix it. The certificate case is
/// recognised by the rustls error inside the I/O error, not by its wording.
pub fn explain_handshake_error(err: &std::io::Error) -> String {
    let text = err.to_string();
    let rejected_certificate = matches!(
        err.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()),
        Some(rustls::Error::InvalidCertificate(_))
    );
    if rejected_certificate {
        format!(
            "TLS: the server's certificate was not accepted ({text}). Pass --ca FILE for a private CA, \
             --pin-sha256 HEX with the fingerprint the server logs at start-up, or --insecure to skip checks"
        )
    } else {
        format!("TLS handshake failed: {text}")
    }
}

/// How the server's certificate is judged.
#[derive(Debug)]
enum Check {
    /// Web PKI, plus: a server presenting exactly a certificate from a `--ca` file is
    /// accepted even where Web PKI refuses it (a self-signed CA used as its own server
    /// certificate, as `openssl req -x509` makes), provided the name still matches.
    WebPki {
        webpki: Arc<rustls::client::WebPkiServerVerifier>,
        trusted_leaves: Vec<CertificateDer<'static>>,
    },
    Pin([u8; 32]),
    Anything,
}

/// Judges the certificate per [`Check`]; handshake signatures are verified in every mode.
#[derive(Debug)]
struct Verifier {
    check: Check,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match &self.check {
            Check::Anything => Ok(ServerCertVerified::assertion()),
            Check::Pin(pin) if Sha256::digest(end_entity.as_ref())[..] == pin[..] => {
                Ok(ServerCertVerified::assertion())
            }
            Check::Pin(_) => Err(rustls::Error::InvalidCertificate(rustls::CertificateError::Other(
                rustls::OtherError(Arc::new(PinMismatch)),
            ))),
            Check::WebPki { webpki, trusted_leaves } => {
                let verdict = webpki.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now);
                if verdict.is_err() && trusted_leaves.iter().any(|leaf| leaf.as_ref() == end_entity.as_ref()) {
                    let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
                    rustls::client::verify_server_name(&cert, server_name)?;
                    return Ok(ServerCertVerified::assertion());
                }
                verdict
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_parse_with_or_without_colons() {
        let hex = "5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8";
        let pin = parse_pin(hex).unwrap();
        assert_eq!(pin[0], 0x5e);
        let colons: Vec<String> = hex.as_bytes().chunks(2).map(|c| String::from_utf8_lossy(c).into()).collect();
        assert_eq!(parse_pin(&colons.join(":")).unwrap(), pin);
        assert!(parse_pin("abc").is_err());
    }

    #[test]
    fn a_rejected_certificate_is_explained_by_its_type_not_its_wording() {
        let rejected =
            |cause| std::io::Error::new(std::io::ErrorKind::InvalidData, rustls::Error::InvalidCertificate(cause));
        for cause in [
            rustls::CertificateError::UnknownIssuer,
            rustls::CertificateError::Other(rustls::OtherError(Arc::new(PinMismatch))),
        ] {
            assert!(explain_handshake_error(&rejected(cause)).contains("--pin-sha256 HEX"));
        }
        // Text that merely mentions certificates is not a certificate rejection.
        let other = std::io::Error::other("peer sent no certificate request");
        assert!(explain_handshake_error(&other).starts_with("TLS handshake failed"));
        let alert = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::AlertReceived(rustls::AlertDescription::HandshakeFailure),
        );
        assert!(explain_handshake_error(&alert).starts_with("TLS handshake failed"));
    }

    #[test]
    fn every_trust_mode_builds() {
        for trust in [Trust::Roots { extra_ca: vec![] }, Trust::Pin([0; 32]), Trust::Insecure] {
            client_config(&trust).unwrap();
        }
    }
}

#[cfg(test)]
mod verifier_tests {
    use super::*;

    /// A self-signed CA certificate for localhost, as `openssl req -x509` makes.
    fn ca_as_leaf() -> CertificateDer<'static> {
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().clone()
    }

    fn verifier(trusted: Vec<CertificateDer<'static>>) -> Verifier {
        let mut roots = rustls::RootCertStore::empty();
        for cert in &trusted {
            roots.add(cert.clone()).unwrap();
        }
        let provider = Arc::new(crate::crypto::provider());
        let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()
            .unwrap();
        Verifier { check: Check::WebPki { webpki, trusted_leaves: trusted }, provider }
    }

    #[test]
    fn a_ca_file_certificate_served_as_leaf_is_accepted_for_its_name_only() {
        let cert = ca_as_leaf();
        let verifier = verifier(vec![cert.clone()]);
        let now = UnixTime::now();
        let name = ServerName::try_from("localhost").unwrap();
        verifier.verify_server_cert(&cert, &[], &name, &[], now).unwrap();
        let wrong = ServerName::try_from("other.example").unwrap();
        assert!(verifier.verify_server_cert(&cert, &[], &wrong, &[], now).is_err());
        let stranger = ca_as_leaf();
        assert!(verifier.verify_server_cert(&stranger, &[], &name, &[], now).is_err());
    }

    #[test]
    fn a_pin_accepts_exactly_its_certificate() {
        let (cert, other) = (ca_as_leaf(), ca_as_leaf());
        let pin: [u8; 32] = Sha256::digest(cert.as_ref()).into();
        let provider = Arc::new(crate::crypto::provider());
        let verifier = Verifier { check: Check::Pin(pin), provider };
        let name = ServerName::try_from("any.example").unwrap();
        verifier.verify_server_cert(&cert, &[], &name, &[], UnixTime::now()).unwrap();
        let err = verifier.verify_server_cert(&other, &[], &name, &[], UnixTime::now()).unwrap_err();
        assert!(err.to_string().contains("does not match --pin-sha256"), "{err}");
    }
}
