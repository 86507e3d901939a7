//! Server signing keys: the server's own ed25519 key (its file format, the keys it used before a
//! rotation, the self-signed key document served at `GET /_matrix/key/v2/server`) and the check
//! of a peer's key document against its own signature.
//!
//! Key file format (one line): `ed25519 <version> <unpadded base64 of the PKCS#8 v2 DER document>`.
//! It is written on first start and replaced only by `hearth keys rotate`, which keeps the old
//! public key as an [`OldVerifyKey`]: peers cache public keys, and events signed with an old key
//! must stay verifiable.

use std::collections::BTreeMap;

use ruma::{
    CanonicalJsonObject, CanonicalJsonValue, OwnedServerName, ServerName,
    api::federation::discovery::ServerSigningKeys,
    serde::{Base64, base64::Standard},
    signatures::{Ed25519KeyPair, KeyPair, PublicKeyMap, PublicKeySet, Signature, verify_json},
};

/// The longest a key document may count as valid, whatever its `valid_until_ts` says (the spec's
/// rule for room versions 5 and later, applied to everything so a key never outlives it).
pub const MAX_KEY_VALIDITY_MS: i64 = 7 * 24 * 60 * 60 * 1000;

/// A key this server signed with before a rotation (`old_verify_keys`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OldVerifyKey {
    /// `ed25519:<version>`.
    pub key_id: String,
    /// Unpadded standard base64.
    pub public_key: String,
    /// When it stopped being used (ms since the epoch).
    pub expired_ts: i64,
}

impl OldVerifyKey {
    /// One line of the old-keys file: `<key_id> <public key> <expired_ts>`.
    pub fn to_line(&self) -> String {
        format!("{} {} {}\n", self.key_id, self.public_key, self.expired_ts)
    }

    pub fn from_line(line: &str) -> Result<OldVerifyKey, String> {
        let mut parts = line.split_whitespace();
        let (Some(key_id), Some(public_key), Some(expired_ts), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err("expected `<key_id> <public key> <expired_ts>`".to_owned());
        };
        if !key_id.starts_with("ed25519:") {
            return Err(format!("`{key_id}` is not an ed25519 key ID"));
        }
        Base64::<Standard, Vec<u8>>::parse(public_key).map_err(|err| format!("bad base64: {err}"))?;
        let expired_ts = expired_ts.parse().map_err(|_| format!("`{expired_ts}` is not a timestamp"))?;
        Ok(OldVerifyKey { key_id: key_id.to_owned(), public_key: public_key.to_owned(), expired_ts })
    }
}

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

    /// The signed `ServerKeys` document (Server-Server API, "Publishing Keys"), listing the keys
    /// used before rotations in `old_verify_keys`.
    pub fn server_keys(
        &self,
        server_name: &ServerName,
        valid_until_ts: u64,
        old_keys: &[OldVerifyKey],
    ) -> CanonicalJsonObject {
        let mut verify_key = CanonicalJsonObject::new();
        verify_key.insert("key".into(), CanonicalJsonValue::String(self.public_key_base64()));
        let mut verify_keys = CanonicalJsonObject::new();
        verify_keys.insert(self.key_id(), CanonicalJsonValue::Object(verify_key));

        let mut old_verify_keys = CanonicalJsonObject::new();
        for old in old_keys.iter().filter(|old| old.key_id != self.key_id()) {
            let mut entry = CanonicalJsonObject::new();
            entry.insert("key".into(), CanonicalJsonValue::String(old.public_key.clone()));
            entry.insert(
                "expired_ts".into(),
                CanonicalJsonValue::Integer(ruma::Int::try_from(old.expired_ts).unwrap_or(ruma::Int::MAX)),
            );
            old_verify_keys.insert(old.key_id.clone(), CanonicalJsonValue::Object(entry));
        }

        let mut document = CanonicalJsonObject::new();
        document.insert("server_name".into(), CanonicalJsonValue::String(server_name.to_string()));
        document.insert("verify_keys".into(), CanonicalJsonValue::Object(verify_keys));
        document.insert("old_verify_keys".into(), CanonicalJsonValue::Object(old_verify_keys));
        document.insert(
            "valid_until_ts".into(),
            CanonicalJsonValue::Integer(ruma::Int::try_from(valid_until_ts).unwrap_or(ruma::Int::MAX)),
        );
        ruma::signatures::sign_json(server_name.as_str(), &self.pair, &mut document)
            .expect("a freshly built object with no signatures can always be signed");
        document
    }
}

/// A peer's key document whose self-signature checked out.
#[derive(Debug, Clone)]
pub struct VerifiedServerKeys {
    pub server_name: OwnedServerName,
    /// The document's `valid_until_ts`, capped at [`MAX_KEY_VALIDITY_MS`] after `now`.
    pub valid_until_ts: i64,
    /// Current keys: key ID and unpadded base64 public key.
    pub verify_keys: Vec<(String, String)>,
    /// Keys used before: key ID, public key, and when they expired.
    pub old_verify_keys: Vec<OldVerifyKey>,
    /// The document as received, signatures included (what a notary hands on).
    pub document: CanonicalJsonObject,
}

/// Checks a key document fetched for `expected` (directly or through a notary): it names that
/// server and carries a valid signature by one of its own `verify_keys`. Signatures of other
/// servers (a notary's) are left for [`verify_signed_by`].
pub fn verify_server_keys(
    document: CanonicalJsonObject,
    expected: &ServerName,
    now: i64,
) -> Result<VerifiedServerKeys, String> {
    let value = serde_json::to_value(&document).map_err(|err| err.to_string())?;
    let parsed: ServerSigningKeys =
        serde_json::from_value(value).map_err(|err| format!("not a key document: {err}"))?;
    if parsed.server_name != expected {
        return Err(format!("the document is for {}, not {expected}", parsed.server_name));
    }
    let own_keys: PublicKeySet = parsed.verify_keys.iter().map(|(id, key)| (id.to_string(), key.key.clone())).collect();
    if own_keys.is_empty() {
        return Err("the document lists no verify_keys".to_owned());
    }
    verify_signed_by(&document, expected.as_str(), own_keys)?;
    let valid_until_ts = i64::try_from(u64::from(parsed.valid_until_ts.get())).unwrap_or(i64::MAX);
    Ok(VerifiedServerKeys {
        server_name: parsed.server_name,
        valid_until_ts: valid_until_ts.min(now.saturating_add(MAX_KEY_VALIDITY_MS)),
        verify_keys: parsed.verify_keys.iter().map(|(id, key)| (id.to_string(), key.key.encode())).collect(),
        old_verify_keys: parsed
            .old_verify_keys
            .iter()
            .map(|(id, key)| OldVerifyKey {
                key_id: id.to_string(),
                public_key: key.key.encode(),
                expired_ts: i64::try_from(u64::from(key.expired_ts.get())).unwrap_or(i64::MAX),
            })
            .collect(),
        document,
    })
}

/// Checks that `object` carries a valid signature of `entity` by one of `keys`, ignoring other
/// entities' signatures (ruma's `verify_json` wants keys for every signer present).
pub fn verify_signed_by(object: &CanonicalJsonObject, entity: &str, keys: PublicKeySet) -> Result<(), String> {
    let mut object = object.clone();
    let Some(CanonicalJsonValue::Object(signatures)) = object.get_mut("signatures") else {
        return Err("the document is not signed".to_owned());
    };
    signatures.retain(|signer, _| signer == entity);
    if signatures.is_empty() {
        return Err(format!("the document carries no signature of {entity}"));
    }
    let key_map: PublicKeyMap = BTreeMap::from([(entity.to_owned(), keys)]);
    verify_json(&key_map, &object).map_err(|err| format!("signature of {entity}: {err}"))
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
        let document = key.server_keys(server, 1_000_000, &[]);
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

    fn example() -> &'static ServerName {
        "example.org".try_into().unwrap()
    }

    #[test]
    fn a_self_signed_document_verifies_with_its_old_keys_listed() {
        let key = SigningKey::from_file(&SigningKey::generate_file()).unwrap();
        let old = OldVerifyKey { key_id: "ed25519:a_old".into(), public_key: key.public_key_base64(), expired_ts: 5 };
        let document = key.server_keys(example(), 10_000, std::slice::from_ref(&old));
        let verified = verify_server_keys(document, example(), 0).unwrap();
        assert_eq!(verified.valid_until_ts, 10_000);
        assert_eq!(verified.verify_keys, vec![(key.key_id(), key.public_key_base64())]);
        assert_eq!(verified.old_verify_keys, vec![old]);
    }

    #[test]
    fn validity_is_capped_at_seven_days() {
        let key = SigningKey::from_file(&SigningKey::generate_file()).unwrap();
        let document = key.server_keys(example(), i64::MAX as u64 / 2, &[]);
        let verified = verify_server_keys(document, example(), 1_000).unwrap();
        assert_eq!(verified.valid_until_ts, 1_000 + MAX_KEY_VALIDITY_MS);
    }

    #[test]
    fn documents_for_another_server_or_forged_are_refused() {
        let key = SigningKey::from_file(&SigningKey::generate_file()).unwrap();
        let other: &ServerName = "other.example".try_into().unwrap();
        assert!(verify_server_keys(key.server_keys(example(), 10, &[]), other, 0).unwrap_err().contains("not other"));

        let mut tampered = key.server_keys(example(), 10, &[]);
        tampered.insert("valid_until_ts".into(), CanonicalJsonValue::Integer(ruma::Int::from(99_999)));
        assert!(verify_server_keys(tampered, example(), 0).is_err());

        // Signed by a key that is not among its verify_keys.
        let impostor = SigningKey::from_file(&SigningKey::generate_file()).unwrap();
        let mut forged = key.server_keys(example(), 10, &[]);
        forged.remove("signatures");
        ruma::signatures::sign_json("example.org", impostor.key_pair(), &mut forged).unwrap();
        assert!(verify_server_keys(forged, example(), 0).is_err());

        let mut unsigned = key.server_keys(example(), 10, &[]);
        unsigned.remove("signatures");
        assert!(verify_server_keys(unsigned, example(), 0).is_err());
    }

    #[test]
    fn a_notary_signature_is_checked_apart_from_the_origin_one() {
        let key = SigningKey::from_file(&SigningKey::generate_file()).unwrap();
        let notary = SigningKey::from_file(&SigningKey::generate_file()).unwrap();
        let mut document = key.server_keys(example(), 10, &[]);
        ruma::signatures::sign_json("notary.example", notary.key_pair(), &mut document).unwrap();
        verify_server_keys(document.clone(), example(), 0).unwrap();
        let notary_keys = PublicKeySet::from([(notary.key_id(), Base64::parse(notary.public_key_base64()).unwrap())]);
        verify_signed_by(&document, "notary.example", notary_keys).unwrap();
        let wrong = PublicKeySet::from([(notary.key_id(), Base64::parse(key.public_key_base64()).unwrap())]);
        assert!(verify_signed_by(&document, "notary.example", wrong).is_err());
    }

    #[test]
    fn old_key_lines_round_trip() {
        let old = OldVerifyKey { key_id: "ed25519:a_x".into(), public_key: "AAAA".into(), expired_ts: 1234 };
        assert_eq!(OldVerifyKey::from_line(&old.to_line()).unwrap(), old);
        assert!(OldVerifyKey::from_line("rsa:x AAAA 1").is_err());
        assert!(OldVerifyKey::from_line("ed25519:x AAAA").is_err());
        assert!(OldVerifyKey::from_line("ed25519:x !!! 1").is_err());
    }
}
