//! The server's own signing key: created once under the data directory, loaded at every start,
//! replaced by `hearth keys rotate` (the old public key is kept as an old verify key), and the
//! self-signed key document that federation peers fetch.
//!
//! Files: `<data_dir>/signing.key` (the current key, mode 0600) and `<data_dir>/old_signing_keys`
//! (one public key per line with the time it expired). A rotation takes effect at the next start.

use std::{
    io::Write,
    path::{Path, PathBuf},
};

use ruma::{CanonicalJsonObject, OwnedServerName};

use crate::matrix::keys::{OldVerifyKey, SigningKey};

/// How long peers may cache our key document.
const KEY_VALIDITY_MS: i64 = 7 * 24 * 60 * 60 * 1000;

pub struct ServerKeys {
    server_name: OwnedServerName,
    key: SigningKey,
    old_keys: Vec<OldVerifyKey>,
}

fn key_path(data_dir: &Path) -> PathBuf {
    data_dir.join("signing.key")
}

fn old_keys_path(data_dir: &Path) -> PathBuf {
    data_dir.join("old_signing_keys")
}

/// Writes a new key file readable by the owner only; `create_new` refuses to overwrite.
fn write_key_file(path: &Path, text: &str) -> Result<(), String> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path).map_err(|err| format!("cannot create {}: {err}", path.display()))?;
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|err| format!("cannot write {}: {err}", path.display()))
}

fn read_key(path: &Path) -> Result<SigningKey, String> {
    let text = std::fs::read_to_string(path).map_err(|err| format!("cannot read {}: {err}", path.display()))?;
    SigningKey::from_file(&text).map_err(|err| format!("signing key {}: {err}", path.display()))
}

fn read_old_keys(data_dir: &Path) -> Result<Vec<OldVerifyKey>, String> {
    let path = old_keys_path(data_dir);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(err) => return Err(format!("cannot read {}: {err}", path.display())),
    };
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(number, line)| {
            OldVerifyKey::from_line(line).map_err(|err| format!("{} line {}: {err}", path.display(), number + 1))
        })
        .collect()
}

impl ServerKeys {
    /// Loads `<data_dir>/signing.key`, generating it (readable by the owner only) on first start,
    /// and the old keys of earlier rotations.
    pub fn load_or_create(data_dir: &Path, server_name: OwnedServerName) -> Result<ServerKeys, String> {
        let path = key_path(data_dir);
        if !path.exists() {
            write_key_file(&path, &SigningKey::generate_file())?;
            tracing::info!(path = %path.display(), "generated the server signing key");
        }
        let key = read_key(&path)?;
        let old_keys = read_old_keys(data_dir)?;
        Ok(ServerKeys { server_name, key, old_keys })
    }

    /// Replaces the signing key with a fresh one, keeping the old public key as an old verify key
    /// that expired at `now`. Returns the old and the new key ID.
    ///
    /// The old key is recorded before the new one replaces it (by rename, so the key file is never
    /// half written): a crash in between leaves the current key also listed as old, which the key
    /// document leaves out, and a repeated rotation then simply goes ahead.
    pub fn rotate(data_dir: &Path, now: i64) -> Result<(String, String), String> {
        let path = key_path(data_dir);
        let current = read_key(&path)?;
        let old = OldVerifyKey { key_id: current.key_id(), public_key: current.public_key_base64(), expired_ts: now };
        let old_path = old_keys_path(data_dir);
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(&old_path)
            .map_err(|err| format!("cannot open {}: {err}", old_path.display()))?;
        file.write_all(old.to_line().as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(|err| format!("cannot write {}: {err}", old_path.display()))?;

        let text = SigningKey::generate_file();
        let new = SigningKey::from_file(&text)?;
        let staging = data_dir.join("signing.key.new");
        let _ = std::fs::remove_file(&staging);
        write_key_file(&staging, &text)?;
        std::fs::rename(&staging, &path)
            .map_err(|err| format!("cannot replace {} with {}: {err}", path.display(), staging.display()))?;
        Ok((old.key_id, new.key_id()))
    }

    pub fn key(&self) -> &SigningKey {
        &self.key
    }

    pub fn server_name(&self) -> &OwnedServerName {
        &self.server_name
    }

    /// Keys used before rotations.
    pub fn old_keys(&self) -> &[OldVerifyKey] {
        &self.old_keys
    }

    /// The signed key document, valid for a week from `now`.
    pub fn document(&self, now: i64) -> CanonicalJsonObject {
        self.key.server_keys(&self.server_name, (now + KEY_VALIDITY_MS) as u64, &self.old_keys)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_keeps_the_old_key_as_an_old_verify_key() {
        let dir = tempfile::tempdir().unwrap();
        let name: OwnedServerName = "example.org".try_into().unwrap();
        let first = ServerKeys::load_or_create(dir.path(), name.clone()).unwrap();
        let first_id = first.key().key_id();
        let (old_id, new_id) = ServerKeys::rotate(dir.path(), 1_000).unwrap();
        assert_eq!(old_id, first_id);
        assert_ne!(new_id, first_id);
        let second = ServerKeys::load_or_create(dir.path(), name).unwrap();
        assert_eq!(second.key().key_id(), new_id);
        assert_eq!(second.old_keys().len(), 1);
        assert_eq!(second.old_keys()[0].expired_ts, 1_000);
        assert_eq!(second.old_keys()[0].public_key, first.key().public_key_base64());
        let document = serde_json::to_value(second.document(0)).unwrap();
        assert_eq!(document["old_verify_keys"][&first_id]["expired_ts"], 1_000);
        assert!(document["verify_keys"][&new_id]["key"].is_string());
    }
}
