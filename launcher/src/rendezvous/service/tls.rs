//! TLS for the rendezvous (rustls): the host serves with a certificate and key; every agent
//! checks the host against a CA. Given as `--rdzv-conf tls_cert=…,tls_key=…,tls_ca=…`,
//! the same on every node (an agent that does not host reads only the CA). For etcd
//! (`cacert`, `cert`, `key` by torchrun's names), the CA checks etcd and the certificate and
//! key are the node's client identity.
//!
//! # Trust
//! The files are the user's; each is read once, at most [`MAX_PEM`] bytes, and rustls parses
//! them. A node that does not hold the CA cannot complete the handshake, so it cannot join;
//! the token still decides who may, TLS only that nobody reads or alters the calls.

use std::path::{Path, PathBuf};

use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// Largest PEM file read.
pub const MAX_PEM: u64 = 1 << 20;

/// The PEM files of a TLS rendezvous.
#[derive(Clone)]
pub struct Tls {
    cert: Option<Vec<u8>>,
    key: Option<Vec<u8>>,
    ca: Vec<u8>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("serves", &self.cert.is_some())
            .finish_non_exhaustive()
    }
}

fn read(key: &str, path: &Path) -> Result<Vec<u8>, String> {
    use std::io::Read as _;
    let file = std::fs::File::open(path)
        .map_err(|e| format!("--rdzv-conf {key}={}: {e}", path.display()))?;
    let mut bytes = Vec::new();
    file.take(MAX_PEM + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("--rdzv-conf {key}={}: {e}", path.display()))?;
    if bytes.len() as u64 > MAX_PEM {
        return Err(format!(
            "--rdzv-conf {key}={}: larger than {MAX_PEM} bytes; give a PEM file",
            path.display()
        ));
    }
    if !bytes.starts_with(b"-----BEGIN") {
        return Err(format!(
            "--rdzv-conf {key}={}: not a PEM file",
            path.display()
        ));
    }
    Ok(bytes)
}

impl Tls {
    /// Reads the files, each given as its `--rdzv-conf` key and path: the CA always, the
    /// certificate and key when both are given.
    ///
    /// # Errors
    /// A file that cannot be read, is too large or is not PEM; a certificate without its key.
    pub fn load(
        cert: Option<(&str, PathBuf)>,
        key: Option<(&str, PathBuf)>,
        (ca_key, ca): (&str, &Path),
    ) -> Result<Self, String> {
        let (cert, key) = match (cert, key) {
            (Some((cert_key, cert)), Some((key_key, key))) => (
                Some(read(cert_key, &cert)?),
                Some(read(key_key, &key)?),
            ),
            (None, None) => (None, None),
            _ => {
                return Err(
                    "--rdzv-conf tls_cert and tls_key (cert and key) go together: give both, or neither"
                        .into(),
                )
            }
        };
        Ok(Self {
            cert,
            key,
            ca: read(ca_key, ca)?,
        })
    }

    /// From PEM text already in memory (tests, generated certificates).
    pub fn from_pem(cert: Option<(Vec<u8>, Vec<u8>)>, ca: Vec<u8>) -> Self {
        let (cert, key) = cert.map_or((None, None), |(c, k)| (Some(c), Some(k)));
        Self { cert, key, ca }
    }

    /// The server side, when this node can serve.
    pub fn server(&self) -> Option<ServerTlsConfig> {
        let (cert, key) = (self.cert.as_ref()?, self.key.as_ref()?);
        Some(ServerTlsConfig::new().identity(Identity::from_pem(cert, key)))
    }

    /// A client of etcd: etcd's certificate checked against the CA for the URL's host, and
    /// this node's certificate and key presented when given (etcd's `--client-cert-auth`).
    pub fn client_of_etcd(&self) -> ClientTlsConfig {
        let config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&self.ca));
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => config.identity(Identity::from_pem(cert, key)),
            _ => config,
        }
    }

    /// The client side, checking the host's certificate for `host` against the CA.
    pub fn client(&self, host: &str) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca))
            .domain_name(host.trim_start_matches('[').trim_end_matches(']'))
    }
}
