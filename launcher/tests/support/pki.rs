//! A throwaway CA and certificates signed by it, written as PEM files.

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};

/// A CA's PEM and, per subject, a certificate and key signed by it.
pub struct Pki {
    /// The CA's certificate.
    pub ca: PathBuf,
    issuer: CertifiedIssuer<'static, KeyPair>,
    dir: PathBuf,
}

impl Pki {
    /// A new CA, its files under `dir` as `<name>-ca.pem`.
    pub fn new(dir: &Path, name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let issuer =
            CertifiedIssuer::self_signed(params, KeyPair::generate().expect("key")).expect("CA");
        let ca = dir.join(format!("{name}-ca.pem"));
        std::fs::write(&ca, issuer.pem()).expect("write the CA");
        Self {
            ca,
            issuer,
            dir: dir.to_owned(),
        }
    }

    /// A certificate for `host` (also the file names' stem) and its key.
    pub fn issue(&self, host: &str) -> (PathBuf, PathBuf) {
        let key = KeyPair::generate().expect("key");
        let cert = CertificateParams::new(vec![host.to_owned()])
            .expect("params")
            .signed_by(&key, &self.issuer)
            .expect("cert");
        let (cert_file, key_file) = (
            self.dir.join(format!("{host}-cert.pem")),
            self.dir.join(format!("{host}-key.pem")),
        );
        std::fs::write(&cert_file, cert.pem()).expect("write the certificate");
        std::fs::write(&key_file, key.serialize_pem()).expect("write the key");
        (cert_file, key_file)
    }
}
