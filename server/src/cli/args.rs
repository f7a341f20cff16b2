//! What the client commands share: where the server is and who we are
//! ([`ServerArg`]), and how enum values are printed.

use crate::client::DEFAULT_SERVER;

/// Where the server is, and who we are, for client commands.
#[derive(Debug, Clone, clap::Args)]
pub struct ServerArg {
    /// URL of the niix server.
    #[arg(long, env = "NIIX_SERVER", default_value = DEFAULT_SERVER)]
    pub server: String,
    /// Bearer token, when the server requires authentication.
    #[arg(long, env = "NIIX_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// CA certificate (PEM) of the server's TLS certificate; implies TLS.
    #[arg(long = "tls-ca", env = "NIIX_TLS_CA")]
    pub tls_ca: Option<std::path::PathBuf>,
    /// Client certificate (PEM) for mutual TLS.
    #[arg(long = "tls-cert", env = "NIIX_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<std::path::PathBuf>,
    /// Client key (PEM) for mutual TLS.
    #[arg(long = "tls-key", env = "NIIX_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,
}

impl ServerArg {
    /// Connects (over TLS when a CA or certificate is given), with the token
    /// on every call.
    pub async fn connect(&self) -> anyhow::Result<crate::client::Authed> {
        let tls = (self.tls_ca.is_some() || self.tls_cert.is_some()).then(|| crate::client::ClientTls {
            ca: self.tls_ca.clone(),
            cert: self.tls_cert.clone(),
            key: self.tls_key.clone(),
            domain: None,
        });
        let channel = crate::client::connect_tls(&self.server, tls.as_ref()).await?;
        crate::client::authed(channel, self.token.as_deref())
    }
}

/// Lower-case name of a protobuf enum value without its prefix, e.g.
/// `SCAN_STATUS_RECEIVED` -> `received`.
pub fn enum_word(full: &str, prefix: &str) -> String {
    full.strip_prefix(prefix).unwrap_or(full).to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enum_words_drop_the_prefix() {
        assert_eq!(enum_word("SCAN_STATUS_RECEIVED", "SCAN_STATUS_"), "received");
    }
}
