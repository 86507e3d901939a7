//! TLS set-up for federation, with rustls and its `ring` provider: the listener's certificate
//! (checked against its private key at start) and the trust roots of outbound requests (the
//! system's roots plus `federation.extra_ca_certificates`).

use std::{path::Path, sync::Arc};

use rustls::{
    ClientConfig, ServerConfig,
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    sign::{CertifiedKey, SingleCertAndKey},
};

/// The one crypto provider Hearth uses (ring: no C toolchain beyond cc, quick to build).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Makes ring the process-wide default, for any library that asks rustls for one.
pub fn install_default_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn read_certificates(path: &Path, key: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certificates: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|err| format!("config key `{key}`: cannot read {}: {err}", path.display()))?
        .collect::<Result<_, _>>()
        .map_err(|err| format!("config key `{key}`: {} is not a PEM certificate file: {err}", path.display()))?;
    if certificates.is_empty() {
        return Err(format!("config key `{key}`: {} holds no PEM certificate", path.display()));
    }
    Ok(certificates)
}

/// The listener's TLS configuration. Errors name the configuration key at fault: an unreadable
/// or empty file, or a private key that does not belong to the certificate.
pub fn server_config(certificate: &Path, private_key: &Path) -> Result<Arc<ServerConfig>, String> {
    let chain = read_certificates(certificate, "federation.tls_certificate")?;
    let key = PrivateKeyDer::from_pem_file(private_key).map_err(|err| {
        format!(
            "config key `federation.tls_private_key`: cannot read a PEM private key from {}: {err}",
            private_key.display()
        )
    })?;
    let provider = provider();
    // `from_der` compares the key's public half with the certificate's.
    let certified = CertifiedKey::from_der(chain, key, &provider).map_err(|err| {
        format!(
            "config key `federation.tls_private_key`: {} does not fit the certificate in {}: {err}",
            private_key.display(),
            certificate.display()
        )
    })?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|err| format!("TLS: {err}"))?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(SingleCertAndKey::from(certified)));
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The TLS configuration of outbound requests: certificates are checked against the system's
/// roots and `extra_ca_certificates`, for the name discovery says the peer must prove.
pub fn client_config(extra_ca_certificates: &[impl AsRef<Path>]) -> Result<ClientConfig, String> {
    let mut extra = Vec::new();
    for path in extra_ca_certificates {
        extra.extend(read_certificates(path.as_ref(), "federation.extra_ca_certificates")?);
    }
    let provider = provider();
    let verifier = rustls_platform_verifier::Verifier::new_with_extra_roots(extra, provider.clone())
        .map_err(|err| format!("config key `federation.extra_ca_certificates`: {err}"))?;
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|err| format!("TLS: {err}"))?
        .dangerous()
        // Not a weakening: the platform verifier is the full WebPKI check (chain, name, expiry)
        // over the system's roots and the extra CAs; rustls only calls this API "dangerous"
        // because it accepts any verifier.
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}
