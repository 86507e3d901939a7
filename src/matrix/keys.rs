//! The server's ed25519 signing key: its file format and the self-signed key document served at
//! `GET /_matrix/key/v2/server`.
//!
//! Key file format (one line): `ed25519 <version> <unpadded base64 of the PKCS#8 v2 DER document>`.
//! It is written once on first start and never regenerated: peers cache the public key, and events
//! signed with it must stay verifiable.

use ruma::{
    CanonicalJsonObject, CanonicalJsonValue, ServerName,
    serde::{Base64, base64::Standard},
    signatures::{Ed25519KeyPair, KeyPair, Signature},
};

/// The server's signing key.
pub struct SigningKey {
    pair: Ed25519KeyPair,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey").field("key_id", &self.key_id()).finish_non_exhaustive()
    }
}

impl SigningKey {
    /// A fresh key with a random version, as the text of a key file.
    pub fn generate_file() -> String {
        let document = Ed25519KeyPair::generate();
        let version: String = {
            use rand::Rng;
            let mut rng = rand::thread_rng();
            (0..6).map(|_| rng.sample(rand::distributions::Alphanumeric) as char).collect()
        };
        format!("ed25519 a_{version} {}\n", Base64::<Standard, _>::new(document.as_slice()).encode())
    }

    /// Reads a key file.
    pub fn from_file(text: &str) -> Result<SigningKey, String> {
        let mut parts = text.split_whitespace();
        let (Some("ed25519"), Some(version), Some(document), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err("expected `ed25519 <version> <base64 key>`".to_owned());
        };
        if !version.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return Err("key version may only contain letters, digits and '_'".to_owned());
        }
        let der = Base64::<Standard, Vec<u8>>::parse(document).map_err(|err| format!("bad base64: {err}"))?;
        let pair = Ed25519KeyPair::from_der(der.as_bytes(), version.to_owned()).map_err(|err| err.to_string())?;
        Ok(SigningKey { pair })
    }

    /// `ed25519:<version>`.
    pub fn key_id(&self) -> String {
        format!("ed25519:{}", self.pair.version())
    }

    pub fn public_key_base64(&self) -> String {
        Base64::<Standard, _>::new(self.pair.public_key()).encode()
    }

    pub fn key_pair(&self) -> &Ed25519KeyPair {
        &self.pair
    }

    pub fn sign(&self, message: &[u8]) -> Signature {
        self.pair.sign(message)
    }

    /// The signed `ServerKeys` document (Server-Server API, "Publishing Keys").
    pub fn server_keys(&self, server_name: &ServerName, valid_until_ts: u64) -> CanonicalJsonObject {
        let mut verify_key = CanonicalJsonObject::new();
        verify_key.insert("key".into(), CanonicalJsonValue::String(self.public_key_base64()));
        let mut verify_keys = CanonicalJsonObject::new();
        verify_keys.insert(self.key_id(), CanonicalJsonValue::Object(verify_key));

        let mut document = CanonicalJsonObject::new();
        document.insert("server_name".into(), CanonicalJsonValue::String(server_name.to_string()));
        document.insert("verify_keys".into(), CanonicalJsonValue::Object(verify_keys));
        document.insert("old_verify_keys".into(), CanonicalJsonValue::Object(CanonicalJsonObject::new()));
        document.insert(
            "valid_until_ts".into(),
            CanonicalJsonValue::Integer(ruma::Int::try_from(valid_until_ts).unwrap_or(ruma::Int::MAX)),
        );
        ruma::signatures::sign_json(server_name.as_str(), &self.pair, &mut document)
            .expect("a freshly built object with no signatures can always be signed");
        document
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use ruma::signatures::{PublicKeyMap, PublicKeySet, verify_json};

    use super::*;

    #[test]
    fn generated_key_file_round_trips() {
        let file = SigningKey::generate_file();
        let key = SigningKey::from_file(&file).unwrap();
        let again = SigningKey::from_file(&file).unwrap();
        assert_eq!(key.key_id(), again.key_id());
        assert_eq!(key.public_key_base64(), again.public_key_base64());
        assert!(key.key_id().starts_with("ed25519:a_"));
    }

    #[test]
    fn malformed_key_files_are_rejected() {
        assert!(SigningKey::from_file("").is_err());
        assert!(SigningKey::from_file("ed25519 a_x").is_err());
        assert!(SigningKey::from_file("rsa a_x AAAA").is_err());
        assert!(SigningKey::from_file("ed25519 a_x !!!notbase64").is_err());
        assert!(SigningKey::from_file("ed25519 a_x AAAA").is_err());
    }

    #[test]
    fn server_keys_document_verifies_with_its_own_key() {
        let key = SigningKey::from_file(&SigningKey::generate_file()).unwrap();
        let server: &ServerName = "example.org".try_into().unwrap();
        let document = key.server_keys(server, 1_000_000);
        let mut keys = PublicKeySet::new();
        keys.insert(key.key_id(), Base64::parse(key.public_key_base64()).unwrap());
        let mut key_map = PublicKeyMap::new();
        key_map.insert("example.org".to_owned(), keys);
        verify_json(&key_map, &document).unwrap();
        let value: BTreeMap<String, serde_json::Value> =
            serde_json::from_value(serde_json::to_value(&document).unwrap()).unwrap();
        assert_eq!(value["server_name"], "example.org");
        assert_eq!(value["valid_until_ts"], 1_000_000);
    }
}
