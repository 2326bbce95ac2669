//! The server's TLS identity: certificate files, or a self-signed certificate.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("cannot read certificate {path}: {source}")]
    Certificate { path: String, source: rustls::pki_types::pem::Error },
    #[error("cannot read private key {path}: {source}")]
    Key { path: String, source: rustls::pki_types::pem::Error },
    #[error("cannot generate a self-signed certificate: {0}")]
    SelfSigned(#[from] rcgen::Error),
    #[error("certificate and key do not make a TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// A certificate chain and its key, ready for rustls.
pub struct Identity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl Identity {
    pub fn from_files(cert: &Path, key: &Path) -> Result<Identity, TlsSetupError> {
        let chain = CertificateDer::pem_file_iter(cert)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(|source| TlsSetupError::Certificate { path: cert.display().to_string(), source })?;
        let key = PrivateKeyDer::from_pem_file(key)
            .map_err(|source| TlsSetupError::Key { path: key.display().to_string(), source })?;
        Ok(Identity { chain, key })
    }

    /// A fresh self-signed certificate for `localhost` and the loopback addresses.
    pub fn self_signed() -> Result<Identity, TlsSetupError> {
        let names = vec!["localhost".to_string(), "127.0.0.1".to_string(), "::1".to_string()];
        let certified = rcgen::generate_simple_self_signed(names)?;
        let key = PrivateKeyDer::try_from(certified.signing_key.serialize_der()).expect("rcgen emits PKCS#8");
        Ok(Identity { chain: vec![certified.cert.der().clone()], key })
    }

    /// Lowercase hex SHA-256 of the leaf certificate: what `--pin-sha256` takes.
    pub fn fingerprint(&self) -> String {
        certificate_fingerprint(&self.chain[0])
    }

    pub fn server_config(self) -> Result<Arc<rustls::ServerConfig>, TlsSetupError> {
        let provider = Arc::new(crate::crypto::provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(self.chain, self.key)?;
        Ok(Arc::new(config))
    }
}

pub fn certificate_fingerprint(cert: &CertificateDer<'_>) -> String {
    Sha256::digest(cert.as_ref()).iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_signed_identity_makes_a_server_config() {
        let identity = Identity::self_signed().unwrap();
        assert_eq!(identity.fingerprint().len(), 64);
        identity.server_config().unwrap();
    }

    #[test]
    fn missing_files_name_the_path() {
        let err =
            Identity::from_files(Path::new("/nonexistent/cert.pem"), Path::new("/nonexistent/key.pem")).err().unwrap();
        assert!(err.to_string().contains("/nonexistent/cert.pem"), "{err}");
    }
}
