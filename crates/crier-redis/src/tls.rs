//! TLS (`rediss://`): rustls with the `ring` provider, certificates always verified.
//!
//! - Roots: the system's (rustls-native-certs, e.g. Debian's `ca-certificates`), or only the
//!   certificates of `tls_ca_file` (PEM) when it is set (a private CA).
//! - The server's name is checked against the URL's host (a DNS name, or an IP address for an
//!   IP SAN). `rediss://...#insecure` (the redis crate's "skip verification") is refused.
//! - A certificate that fails verification is a setting problem (wrong CA, wrong host name):
//!   [`is_certificate_error`] tells it from a Redis that is merely down, so that start-up can
//!   fail clearly instead of retrying forever.

use std::path::Path;

use redis::{ConnectionAddr, ConnectionInfo, IntoConnectionInfo, TlsCertificates};

use crate::error::Fault;

/// The trust settings of every connection a broker opens.
#[derive(Clone, Default)]
pub(crate) struct Tls {
    /// PEM bytes of the private CA (`None`: the system roots).
    ca: Option<Vec<u8>>,
}

impl Tls {
    /// Reads and checks the CA file (at least one PEM certificate).
    pub(crate) fn load(ca_file: Option<&Path>) -> Result<Tls, Fault> {
        install_provider();
        let Some(path) = ca_file else { return Ok(Tls::default()) };
        let bad = |e: &dyn std::fmt::Display| Fault::Setting(format!("redis_tls_ca_file {}: {e}", path.display()));
        let pem = std::fs::read(path).map_err(|e| bad(&e))?;
        check_ca_pem(&pem).map_err(|e| bad(&e))?;
        Ok(Tls { ca: Some(pem) })
    }

    /// The certificates for clients built by others (the cluster client); `None`: system roots.
    pub(crate) fn certificates(&self) -> Option<TlsCertificates> {
        self.ca.clone().map(|ca| TlsCertificates { client_tls: None, root_cert: Some(ca) })
    }

    /// A client for `url`: TLS with these roots for `rediss://`, plain TCP otherwise.
    pub(crate) fn client(&self, info: ConnectionInfo) -> Result<redis::Client, Fault> {
        match info.addr() {
            ConnectionAddr::TcpTls { insecure: true, .. } => Err(insecure()),
            ConnectionAddr::TcpTls { .. } => {
                let certs = TlsCertificates { client_tls: None, root_cert: self.ca.clone() };
                redis::Client::build_with_tls(info, certs).map_err(|e| Fault::Setting(format!("TLS setup: {e}")))
            }
            _ => redis::Client::open(info).map_err(|e| Fault::Setting(e.to_string())),
        }
    }
}

/// Parses a URL into connection info, refusing what crier does not accept.
pub(crate) fn parse_url(url: &str) -> Result<ConnectionInfo, Fault> {
    let info = url.into_connection_info().map_err(|e| Fault::Setting(format!("invalid redis url: {e}")))?;
    if let ConnectionAddr::TcpTls { insecure: true, .. } = info.addr() {
        return Err(insecure());
    }
    Ok(info)
}

fn insecure() -> Fault {
    Fault::Setting(
        "`#insecure` is not accepted: crier always verifies Redis certificates \
         (use redis_tls_ca_file for a private CA)"
            .to_owned(),
    )
}

/// Checks that `pem` holds at least one parsable certificate.
pub fn check_ca_pem(pem: &[u8]) -> Result<usize, String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem) {
        let cert = cert.map_err(|e| format!("not a PEM certificate file: {e}"))?;
        roots.add(cert).map_err(|e| format!("not a usable CA certificate: {e}"))?;
    }
    if roots.is_empty() {
        return Err("holds no PEM certificate (-----BEGIN CERTIFICATE-----)".to_owned());
    }
    Ok(roots.len())
}

/// rustls needs one process-wide crypto provider; `ring` is the only one compiled in.
fn install_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // Err only if another thread installed one first: fine either way.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

/// Whether a connection failure is a certificate that did not verify (a setting problem, not
/// an outage: wrong CA, wrong host name). The redis crate hands rustls' error on as text.
pub(crate) fn message_is_certificate_error(msg: &str) -> bool {
    msg.contains("invalid peer certificate")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_insecure_and_garbage_ca() {
        assert!(parse_url("rediss://h:6380/#insecure").is_err());
        assert!(parse_url("rediss://h:6380/").is_ok());
        assert!(check_ca_pem(b"hello").is_err());
        assert!(check_ca_pem(b"").is_err());
    }
}
