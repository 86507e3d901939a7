//! The server's own signing key: created once under the data directory, then loaded at every
//! start, and the self-signed key document that federation peers fetch.

use std::{io::Write, path::Path};

use ruma::{CanonicalJsonObject, OwnedServerName};

use crate::matrix::keys::SigningKey;

/// How long peers may cache our key document.
const KEY_VALIDITY_MS: i64 = 7 * 24 * 60 * 60 * 1000;

pub struct ServerKeys {
    server_name: OwnedServerName,
    key: SigningKey,
}

impl ServerKeys {
    /// Loads `<data_dir>/signing.key`, generating it (readable by the owner only) on first start.
    pub fn load_or_create(data_dir: &Path, server_name: OwnedServerName) -> Result<ServerKeys, String> {
        let path = data_dir.join("signing.key");
        if !path.exists() {
            let mut options = std::fs::OpenOptions::new();
            options.write(true).create_new(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
            let mut file = options.open(&path).map_err(|err| format!("cannot create {}: {err}", path.display()))?;
            file.write_all(SigningKey::generate_file().as_bytes())
                .and_then(|()| file.sync_all())
                .map_err(|err| format!("cannot write {}: {err}", path.display()))?;
            tracing::info!(path = %path.display(), "generated the server signing key");
        }
        let text = std::fs::read_to_string(&path).map_err(|err| format!("cannot read {}: {err}", path.display()))?;
        let key = SigningKey::from_file(&text).map_err(|err| format!("signing key {}: {err}", path.display()))?;
        Ok(ServerKeys { server_name, key })
    }

    pub fn key(&self) -> &SigningKey {
        &self.key
    }

    /// The signed key document, valid for a week from `now`.
    pub fn document(&self, now: i64) -> CanonicalJsonObject {
        self.key.server_keys(&self.server_name, (now + KEY_VALIDITY_MS) as u64)
    }
}
