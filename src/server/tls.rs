//! The server's TLS identity: certificate files, or a self-signed certificate.
//!
//! The certificate can be replaced while the server runs (SIGHUP): the rustls
//! configuration asks a [`CertificateSlot`] for the certificate at each handshake, so new
//! connections get the new one and established sessions are untouched.

use std::path::Path;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
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

/// What became of the self-signed certificate kept in the state directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeptCertificate {
    /// The one from an earlier start: pinned clients keep working.
    Reused,
    /// None was there (or it was for another name, or near its end): a new one, saved.
    Created,
    /// A new one that could not be saved (the reason); the next start makes another.
    NotSaved(String),
}

/// Named self-signed certificates are valid for a year; one older than this is replaced.
const RENEW_AFTER_DAYS: i64 = 300;

/// The self-signed certificate for `name` (`None`: localhost) kept in `dir` between starts,
/// so that clients pinned to its fingerprint still connect after a restart: the one saved
/// there if it is for the same name and not near its end, else a new one, saved with the
/// key readable by its owner only.
pub fn kept_self_signed(dir: &Path, name: Option<&str>) -> Result<(Identity, KeptCertificate), TlsSetupError> {
    let (cert, key, about) = (dir.join("self-signed.pem"), dir.join("self-signed.key"), dir.join("self-signed.name"));
    let wanted = name.unwrap_or("localhost");
    let today = days_since_epoch();
    let saved = std::fs::read_to_string(&about).ok().and_then(|text| {
        let (saved_name, created) = text.trim().split_once('\n')?;
        let fresh = name.is_none() || today - created.trim().parse::<i64>().ok()? < RENEW_AFTER_DAYS;
        (saved_name == wanted && fresh).then_some(())
    });
    if saved.is_some()
        && let Ok(identity) = Identity::from_files(&cert, &key)
    {
        return Ok((identity, KeptCertificate::Reused));
    }
    let (identity, cert_pem, key_pem) = match name {
        Some(name) => generate_named(name)?,
        None => generate_localhost()?,
    };
    let saved = save_private(dir, &[(&key, &key_pem), (&cert, &cert_pem), (&about, &format!("{wanted}\n{today}\n"))]);
    let kept = match saved {
        Ok(()) => KeptCertificate::Created,
        Err(why) => KeptCertificate::NotSaved(format!("cannot save it in {}: {why}", dir.display())),
    };
    Ok((identity, kept))
}

/// Writes each file through a temporary name and a rename, so a crash or a second server
/// starting at the same moment never leaves half a key; files and directory owner-only.
fn save_private(dir: &Path, files: &[(&Path, &str)]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    for (path, text) in files {
        let temporary = path.with_extension(format!("tmp{}", std::process::id()));
        let mut file =
            std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&temporary)?;
        file.write_all(text.as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&temporary, path)?;
    }
    Ok(())
}

fn days_since_epoch() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|since| since.as_secs() / 86_400)
        .unwrap_or(0) as i64
}

fn generate_localhost() -> Result<(Identity, String, String), TlsSetupError> {
    let names = vec!["localhost".to_string(), "127.0.0.1".to_string(), "::1".to_string()];
    let certified = rcgen::generate_simple_self_signed(names)?;
    let key = PrivateKeyDer::try_from(certified.signing_key.serialize_der()).expect("rcgen emits PKCS#8");
    let pems = (certified.cert.pem(), certified.signing_key.serialize_pem());
    Ok((Identity { chain: vec![certified.cert.der().clone()], key }, pems.0, pems.1))
}

fn generate_named(name: &str) -> Result<(Identity, String, String), TlsSetupError> {
    let mut params = rcgen::CertificateParams::new(vec![name.to_string()])?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(rcgen::DnType::CommonName, name);
    let days = days_since_epoch();
    let (from, to) = (civil_date(days - 1), civil_date(days + 364));
    params.not_before = rcgen::date_time_ymd(from.0, from.1, from.2);
    params.not_after = rcgen::date_time_ymd(to.0, to.1, to.2);
    let key = rcgen::KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    let pems = (cert.pem(), key.serialize_pem());
    let key = PrivateKeyDer::try_from(key.serialize_der()).expect("rcgen emits PKCS#8");
    Ok((Identity { chain: vec![cert.der().clone()], key }, pems.0, pems.1))
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
        generate_localhost().map(|(identity, _, _)| identity)
    }

    /// A fresh self-signed certificate for `name` alone (`--self-signed-name`), with `name`
    /// as its common name and a validity of about a year from yesterday: it names the
    /// site the server stands for, not `localhost` or rcgen's defaults, which give it away.
    pub fn self_signed_named(name: &str) -> Result<Identity, TlsSetupError> {
        generate_named(name).map(|(identity, _, _)| identity)
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

/// (year, month, day) of a day counted from 1970-01-01 (Howard Hinnant's `civil_from_days`).
fn civil_date(days: i64) -> (i32, u8, u8) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u8;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
    let year = (yoe + era * 400 + i64::from(month <= 2)) as i32;
    (year, month, day)
}

impl Identity {
    /// The certificate and key checked and ready to serve (the key must match).
    pub fn certified_key(self) -> Result<Arc<CertifiedKey>, TlsSetupError> {
        let provider = crate::crypto::provider();
        let key = CertifiedKey::from_der(self.chain, self.key, &provider)?;
        Ok(Arc::new(key))
    }

    /// A server configuration whose certificate can be swapped later through the slot.
    pub fn reloadable_server_config(self) -> Result<(Arc<rustls::ServerConfig>, Arc<CertificateSlot>), TlsSetupError> {
        let slot = Arc::new(CertificateSlot(ArcSwap::new(self.certified_key()?)));
        let provider = Arc::new(crate::crypto::provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(slot.clone());
        Ok((Arc::new(config), slot))
    }
}

/// The certificate new handshakes get.
#[derive(Debug)]
pub struct CertificateSlot(ArcSwap<CertifiedKey>);

impl CertificateSlot {
    pub fn replace(&self, identity: Identity) -> Result<(), TlsSetupError> {
        self.0.store(identity.certified_key()?);
        Ok(())
    }

    pub fn replace_key(&self, key: Arc<CertifiedKey>) {
        self.0.store(key);
    }

    /// Fingerprint of the leaf certificate served now.
    pub fn fingerprint(&self) -> String {
        certificate_fingerprint(&self.0.load().cert[0])
    }
}

impl ResolvesServerCert for CertificateSlot {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load_full())
    }
}

pub fn certificate_fingerprint(cert: &CertificateDer<'_>) -> String {
    Sha256::digest(cert.as_ref()).iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kept_certificate_is_reused_for_the_same_name_and_replaced_for_another() {
        let dir = tempfile::tempdir().unwrap();
        let (first, kept) = kept_self_signed(dir.path(), None).unwrap();
        assert_eq!(kept, KeptCertificate::Created);
        let (again, kept) = kept_self_signed(dir.path(), None).unwrap();
        assert_eq!((kept, again.fingerprint()), (KeptCertificate::Reused, first.fingerprint()));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("self-signed.key")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "the key is the owner's only");
        let (named, kept) = kept_self_signed(dir.path(), Some("www.example.test")).unwrap();
        assert_eq!(kept, KeptCertificate::Created, "another name: a new certificate");
        assert_ne!(named.fingerprint(), first.fingerprint());
        // A named certificate near the end of its year is replaced.
        std::fs::write(dir.path().join("self-signed.name"), "www.example.test\n1\n").unwrap();
        let (renewed, kept) = kept_self_signed(dir.path(), Some("www.example.test")).unwrap();
        assert_eq!(kept, KeptCertificate::Created);
        assert_ne!(renewed.fingerprint(), named.fingerprint());
    }

    #[test]
    fn a_certificate_that_cannot_be_saved_still_serves() {
        let file = tempfile::NamedTempFile::new().unwrap();
        let (identity, kept) = kept_self_signed(&file.path().join("under-a-file"), None).unwrap();
        assert!(matches!(kept, KeptCertificate::NotSaved(_)), "{kept:?}");
        identity.server_config().unwrap();
    }

    #[test]
    fn self_signed_identity_makes_a_server_config() {
        let identity = Identity::self_signed().unwrap();
        assert_eq!(identity.fingerprint().len(), 64);
        identity.server_config().unwrap();
    }

    #[test]
    fn a_named_self_signed_certificate_names_the_site_and_a_plausible_year() {
        let identity = Identity::self_signed_named("www.example.org").unwrap();
        let der = identity.chain[0].as_ref();
        let has = |needle: &[u8]| der.windows(needle.len()).any(|w| w == needle);
        assert!(has(b"www.example.org"));
        assert!(!has(b"localhost") && !has(b"rcgen"), "no default names left in the certificate");
        identity.server_config().unwrap();
        assert_eq!(civil_date(0), (1970, 1, 1));
        assert_eq!(civil_date(20_513), (2026, 3, 1));
        assert_eq!(civil_date(11_016), (2000, 2, 29));
    }

    #[test]
    fn the_slot_serves_the_certificate_it_was_last_given() {
        let first = Identity::self_signed().unwrap();
        let first_print = first.fingerprint();
        let (_config, slot) = first.reloadable_server_config().unwrap();
        assert_eq!(slot.fingerprint(), first_print);
        let second = Identity::self_signed().unwrap();
        let second_print = second.fingerprint();
        slot.replace(second).unwrap();
        assert_eq!(slot.fingerprint(), second_print);
        let mismatched = Identity { key: Identity::self_signed().unwrap().key, ..Identity::self_signed().unwrap() };
        assert!(slot.replace(mismatched).is_err(), "a key that does not match its certificate is refused");
        assert_eq!(slot.fingerprint(), second_print);
    }

    #[test]
    fn missing_files_name_the_path() {
        let err =
            Identity::from_files(Path::new("/nonexistent/cert.pem"), Path::new("/nonexistent/key.pem")).err().unwrap();
        assert!(err.to_string().contains("/nonexistent/cert.pem"), "{err}");
    }
}
