//! End-to-end encryption keys as the server sees them: signed JSON objects whose signatures it
//! checks on upload (device keys, one-time and fallback keys, cross-signing keys) without ever
//! holding a secret. The signature check is ruma's; what is signed by whom is the spec's.

use ruma::{
    CanonicalJsonObject,
    serde::Base64,
    signatures::{to_canonical_json_string_for_signing, verify_canonical_json_bytes},
};
use serde_json::Value;

/// The cross-signing key types, as they are stored and named in `/keys/query`.
pub const MASTER: &str = "master";
pub const SELF_SIGNING: &str = "self_signing";
pub const USER_SIGNING: &str = "user_signing";

/// Checks `object`'s signature by `signer`'s key `key_id` (`ed25519:…`) against `public_key`
/// (unpadded base64). Other signatures on the object are not looked at.
pub fn check_signature(object: &Value, signer: &str, key_id: &str, public_key: &str) -> Result<(), String> {
    let signature = object
        .get("signatures")
        .and_then(|s| s.get(signer))
        .and_then(|s| s.get(key_id))
        .and_then(Value::as_str)
        .ok_or_else(|| format!("no signature by {signer} with {key_id}"))?;
    verify(object, key_id, public_key, signature)
}

/// Checks one signature (base64) over `object` made with `key_id`'s key `public_key`.
pub fn verify(object: &Value, key_id: &str, public_key: &str, signature: &str) -> Result<(), String> {
    let (algorithm, _) = key_id.split_once(':').ok_or_else(|| format!("{key_id} is not a key ID"))?;
    if algorithm != "ed25519" {
        return Err(format!("{algorithm} signatures are not supported"));
    }
    let canonical: CanonicalJsonObject =
        serde_json::from_value(object.clone()).map_err(|err| format!("not canonical JSON: {err}"))?;
    let bytes = to_canonical_json_string_for_signing(&canonical).map_err(|err| err.to_string())?;
    let public_key: Base64 = Base64::parse(public_key).map_err(|_| "the public key is not base64".to_owned())?;
    let signature: Base64 = Base64::parse(signature).map_err(|_| "the signature is not base64".to_owned())?;
    verify_canonical_json_bytes(
        &ruma::SigningKeyAlgorithm::Ed25519,
        public_key.as_bytes(),
        signature.as_bytes(),
        bytes.as_bytes(),
    )
    .map_err(|_| "the signature does not verify".to_owned())
}

/// A device's ed25519 identity key (`keys["ed25519:<device_id>"]`).
pub fn device_ed25519(device_keys: &Value, device_id: &str) -> Option<String> {
    device_keys.get("keys")?.get(format!("ed25519:{device_id}"))?.as_str().map(str::to_owned)
}

/// A cross-signing key's one public key: (`ed25519:<public>`, `<public>`).
pub fn cross_signing_public(key: &Value) -> Option<(String, String)> {
    let keys = key.get("keys")?.as_object()?;
    if keys.len() != 1 {
        return None;
    }
    let (key_id, public) = keys.iter().next()?;
    let public = public.as_str()?;
    let (algorithm, name) = key_id.split_once(':')?;
    (algorithm == "ed25519" && name == public).then(|| (key_id.clone(), public.to_owned()))
}

/// Checks a cross-signing key's shape: its user, its usage, one ed25519 key named by itself.
pub fn check_cross_signing_key(key: &Value, user_id: &str, usage: &str) -> Result<(String, String), String> {
    if key.get("user_id").and_then(Value::as_str) != Some(user_id) {
        return Err(format!("the {usage} key is not for {user_id}"));
    }
    let usages = key.get("usage").and_then(Value::as_array).ok_or_else(|| format!("the {usage} key has no usage"))?;
    if !usages.iter().any(|u| u.as_str() == Some(usage)) {
        return Err(format!("the {usage} key's usage does not include {usage}"));
    }
    cross_signing_public(key).ok_or_else(|| format!("the {usage} key must hold exactly one ed25519 key"))
}

#[cfg(test)]
mod tests {
    use ruma::{serde::Base64, signatures::Ed25519KeyPair};
    use serde_json::json;

    use super::*;

    fn signed(pair: &Ed25519KeyPair, signer: &str, mut object: Value) -> Value {
        let mut canonical: CanonicalJsonObject = serde_json::from_value(object.clone()).unwrap();
        ruma::signatures::sign_json(signer, pair, &mut canonical).unwrap();
        object["signatures"] = serde_json::to_value(&canonical["signatures"]).unwrap();
        object
    }

    #[test]
    fn a_device_signature_verifies_and_a_changed_object_does_not() {
        let pair = Ed25519KeyPair::from_der(&Ed25519KeyPair::generate(), "DEV".to_owned()).unwrap();
        let public = Base64::<ruma::serde::base64::Standard, _>::new(pair.public_key()).encode();
        let keys = signed(
            &pair,
            "@a:x",
            json!({"user_id": "@a:x", "device_id": "DEV", "algorithms": ["m.olm.v1.curve25519-aes-sha2"],
                   "keys": {"ed25519:DEV": public, "curve25519:DEV": "abc"}}),
        );
        assert_eq!(device_ed25519(&keys, "DEV").as_deref(), Some(public.as_str()));
        check_signature(&keys, "@a:x", "ed25519:DEV", &public).unwrap();
        let mut tampered = keys.clone();
        tampered["keys"]["curve25519:DEV"] = json!("abd");
        assert!(check_signature(&tampered, "@a:x", "ed25519:DEV", &public).is_err());
        assert!(check_signature(&keys, "@b:x", "ed25519:DEV", &public).is_err());
    }

    #[test]
    fn cross_signing_keys_need_one_self_named_key_and_their_usage() {
        let key = json!({"user_id": "@a:x", "usage": ["master"], "keys": {"ed25519:PUB": "PUB"}});
        assert_eq!(check_cross_signing_key(&key, "@a:x", MASTER).unwrap().1, "PUB");
        assert!(check_cross_signing_key(&key, "@b:x", MASTER).is_err());
        assert!(check_cross_signing_key(&key, "@a:x", SELF_SIGNING).is_err());
        let two = json!({"user_id": "@a:x", "usage": ["master"], "keys": {"ed25519:A": "A", "ed25519:B": "B"}});
        assert!(check_cross_signing_key(&two, "@a:x", MASTER).is_err());
        let misnamed = json!({"user_id": "@a:x", "usage": ["master"], "keys": {"ed25519:A": "B"}});
        assert!(check_cross_signing_key(&misnamed, "@a:x", MASTER).is_err());
    }
}
