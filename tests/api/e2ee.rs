//! End-to-end encryption key APIs: real ed25519 keys sign what the tests upload, as a client's
//! Olm machine would, so the server's signature checks are exercised for real.

use std::collections::HashSet;

use serde_json::{Value, json};

use crate::harness::{Account, Key, TestServer, assert_error, backend_tests, two_users_in_a_room};

const UPLOAD: &str = "/_matrix/client/v3/keys/upload";
const QUERY: &str = "/_matrix/client/v3/keys/query";
const CLAIM: &str = "/_matrix/client/v3/keys/claim";
const SIGNING: &str = "/_matrix/client/v3/keys/device_signing/upload";
const SIGNATURES: &str = "/_matrix/client/v3/keys/signatures/upload";
const BACKUP: &str = "/_matrix/client/v3/room_keys/version";

/// A device's Olm identity as the server sees it: an ed25519 key that signs.
pub struct Device {
    pub account: Account,
    pub key: Key,
}

impl Device {
    pub fn new(account: &Account) -> Device {
        Device { account: account.clone(), key: Key::new() }
    }

    fn user(&self) -> &str {
        &self.account.user_id
    }

    fn id(&self) -> &str {
        &self.account.device_id
    }

    pub fn device_keys(&self) -> Value {
        let keys = json!({
            "user_id": self.user(),
            "device_id": self.id(),
            "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
            "keys": {
                format!("ed25519:{}", self.id()): self.key.public(),
                format!("curve25519:{}", self.id()): format!("curve-{}", self.id()),
            },
        });
        self.key.sign(self.user(), self.id(), keys)
    }

    /// A signed one-time (or fallback) key.
    pub fn one_time_key(&self, n: usize, fallback: bool) -> Value {
        let mut key = json!({"key": format!("otk-{}-{n}", self.id())});
        if fallback {
            key["fallback"] = json!(true);
        }
        self.key.sign(self.user(), self.id(), key)
    }

    pub fn one_time_keys(&self, range: std::ops::Range<usize>) -> Value {
        let keys: serde_json::Map<String, Value> =
            range.map(|n| (format!("signed_curve25519:K{n}"), self.one_time_key(n, false))).collect();
        Value::Object(keys)
    }
}

async fn upload(server: &TestServer, device: &Device, body: Value) -> (reqwest::StatusCode, Value) {
    server.post(UPLOAD, Some(&device.account.access_token), body).await
}

async fn claim(server: &TestServer, by: &Account, user: &str, device: &str) -> Value {
    let body = json!({"one_time_keys": {user: {device: "signed_curve25519"}}});
    let (status, response) = server.post(CLAIM, Some(&by.access_token), body).await;
    assert_eq!(status, 200, "{response}");
    response["one_time_keys"][user][device].clone()
}

/// Cross-signing keys for a user: (master, self-signing, user-signing) keys and their JSON.
pub struct CrossSigning {
    pub master: Key,
    pub self_signing: Key,
    pub user_signing: Key,
}

impl CrossSigning {
    pub fn new() -> CrossSigning {
        CrossSigning { master: Key::new(), self_signing: Key::new(), user_signing: Key::new() }
    }

    fn key(user: &str, usage: &str, key: &Key) -> Value {
        let public = key.public();
        json!({"user_id": user, "usage": [usage], "keys": {format!("ed25519:{public}"): public}})
    }

    pub fn master_json(&self, user: &str) -> Value {
        Self::key(user, "master", &self.master)
    }

    /// The upload body: the sub-keys signed by the master key.
    pub fn upload_body(&self, user: &str) -> Value {
        let master = self.master.public();
        json!({
            "master_key": self.master_json(user),
            "self_signing_key": self.master.sign(user, &master, Self::key(user, "self_signing", &self.self_signing)),
            "user_signing_key": self.master.sign(user, &master, Self::key(user, "user_signing", &self.user_signing)),
        })
    }
}

fn password_auth(account: &Account, session: &Value) -> Value {
    let localpart = account.user_id.trim_start_matches('@').split(':').next().unwrap().to_owned();
    json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": localpart},
           "password": account.password, "session": session})
}

backend_tests! {
    async fn keys_are_uploaded_queried_and_each_one_time_key_claimed_once(backend) {
        let server = TestServer::start(backend).await;
        let (alice, bob, _room) = two_users_in_a_room(&server).await;
        let device = Device::new(&alice);
        let body = json!({
            "device_keys": device.device_keys(),
            "one_time_keys": device.one_time_keys(0..3),
            "fallback_keys": {"signed_curve25519:F1": device.one_time_key(100, true)},
        });
        let (status, counts) = upload(&server, &device, body).await;
        assert_eq!(status, 200, "{counts}");
        assert_eq!(counts["one_time_key_counts"]["signed_curve25519"], 3);

        // The device's own sync shows its counts and its unused fallback key.
        let sync = server.sync(&alice, None, None, 0).await;
        assert_eq!(sync["device_one_time_keys_count"]["signed_curve25519"], 3);
        assert_eq!(sync["device_unused_fallback_key_types"], json!(["signed_curve25519"]));

        // Bob sees Alice's device with its display name and her own signature.
        let (status, query) = server.post(QUERY, Some(&bob.access_token), json!({"device_keys": {&alice.user_id: []}})).await;
        assert_eq!(status, 200, "{query}");
        let keys = &query["device_keys"][&alice.user_id][&alice.device_id];
        assert_eq!(keys["keys"], device.device_keys()["keys"]);
        assert_eq!(keys["signatures"], device.device_keys()["signatures"]);
        assert!(keys["unsigned"].get("device_display_name").is_some());

        // Three claims get the three one-time keys, each once; then the fallback key, again and again.
        let mut seen = HashSet::new();
        for _ in 0..3 {
            let claimed = claim(&server, &bob, &alice.user_id, &alice.device_id).await;
            let (id, key) = claimed.as_object().unwrap().iter().next().unwrap();
            assert!(id.starts_with("signed_curve25519:K"), "{id}");
            assert!(key.get("fallback").is_none());
            assert!(seen.insert(id.clone()), "{id} claimed twice");
        }
        for _ in 0..2 {
            let claimed = claim(&server, &bob, &alice.user_id, &alice.device_id).await;
            assert_eq!(claimed["signed_curve25519:F1"]["fallback"], true, "{claimed}");
        }
        let sync = server.sync(&alice, None, None, 0).await;
        assert_eq!(sync["device_one_time_keys_count"]["signed_curve25519"], 0);
        assert_eq!(sync["device_unused_fallback_key_types"], json!([]));
        // A new fallback key is unused again.
        let body = json!({"fallback_keys": {"signed_curve25519:F2": device.one_time_key(101, true)}});
        assert_eq!(upload(&server, &device, body).await.0, 200);
        let sync = server.sync(&alice, None, None, 0).await;
        assert_eq!(sync["device_unused_fallback_key_types"], json!(["signed_curve25519"]));

        // A device with no keys left and no fallback key gives nothing; unknown users are no error.
        let bob_device = Device::new(&bob);
        assert_eq!(upload(&server, &bob_device, json!({"device_keys": bob_device.device_keys()})).await.0, 200);
        assert_eq!(claim(&server, &alice, &bob.user_id, &bob.device_id).await, Value::Null);
        let (status, query) = server
            .post(QUERY, Some(&bob.access_token), json!({"device_keys": {"@nobody:localhost": []}}))
            .await;
        assert_eq!(status, 200, "{query}");

        // Deleting the device deletes its keys.
        let path = format!("/_matrix/client/v3/devices/{}", alice.device_id);
        let (_, challenge) = server.delete(&path, Some(&alice.access_token), json!({})).await;
        let auth = password_auth(&alice, &challenge["session"]);
        assert_eq!(server.delete(&path, Some(&alice.access_token), json!({"auth": auth})).await.0, 200);
        let (_, query) = server.post(QUERY, Some(&bob.access_token), json!({"device_keys": {&alice.user_id: []}})).await;
        assert_eq!(query["device_keys"][&alice.user_id], json!({}));
    }

    async fn bad_key_uploads_are_refused_and_change_nothing(backend) {
        let server = TestServer::start(backend).await;
        let alice = server.register("alice").await;
        let bob = server.register("bob").await;
        let device = Device::new(&alice);

        // Keys for someone else, for another device, or with a bad signature.
        let mut other_user = device.device_keys();
        other_user["user_id"] = json!(bob.user_id);
        assert_error(&upload(&server, &device, json!({"device_keys": other_user})).await, 400, "M_INVALID_PARAM");
        let mut other_device = device.device_keys();
        other_device["device_id"] = json!("ELSEWHERE");
        assert_error(&upload(&server, &device, json!({"device_keys": other_device})).await, 400, "M_INVALID_PARAM");
        let mut tampered = device.device_keys();
        tampered["keys"][format!("curve25519:{}", alice.device_id)] = json!("another-curve");
        assert_error(&upload(&server, &device, json!({"device_keys": tampered})).await, 400, "M_INVALID_SIGNATURE");
        // Signed one-time keys before identity keys cannot be checked.
        assert_error(&upload(&server, &device, json!({"one_time_keys": device.one_time_keys(0..1)})).await, 400, "M_INVALID_PARAM");
        // Shapes.
        assert_error(&upload(&server, &device, json!({"device_keys": "nope"})).await, 400, "M_BAD_JSON");
        assert_error(&upload(&server, &device, json!({"one_time_keys": {"no-colon": "x"}})).await, 400, "M_BAD_JSON");
        let (status, _) = server.request_raw(reqwest::Method::POST, UPLOAD, Some(&alice.access_token), b"{not json".to_vec()).await;
        assert_eq!(status, 400);

        // The real keys go in; new identity keys for the same device never replace them.
        assert_eq!(upload(&server, &device, json!({"device_keys": device.device_keys(),
            "one_time_keys": device.one_time_keys(0..2)})).await.0, 200);
        let impostor = Device { account: alice.clone(), key: Key::new() };
        assert_error(&upload(&server, &impostor, json!({"device_keys": impostor.device_keys()})).await, 400, "M_INVALID_PARAM");
        // The same upload again is fine; a changed key under a used ID is not.
        assert_eq!(upload(&server, &device, json!({"device_keys": device.device_keys(),
            "one_time_keys": device.one_time_keys(0..2)})).await.0, 200);
        let changed = json!({"signed_curve25519:K0": device.one_time_key(7, false)});
        assert_error(&upload(&server, &device, json!({"one_time_keys": changed})).await, 400, "M_INVALID_PARAM");
        // A one-time key signed by another key.
        let forged = Key::new().sign(&alice.user_id, &alice.device_id, json!({"key": "forged"}));
        assert_error(&upload(&server, &device, json!({"one_time_keys": {"signed_curve25519:X": forged}})).await, 400, "M_INVALID_SIGNATURE");

        let (status, counts) = upload(&server, &device, json!({})).await;
        assert_eq!(status, 200);
        assert_eq!(counts["one_time_key_counts"]["signed_curve25519"], 2);
        // At most 500 unclaimed one-time keys per algorithm.
        assert_error(&upload(&server, &device, json!({"one_time_keys": device.one_time_keys(2..501)})).await, 400, "M_TOO_LARGE");
        assert_eq!(upload(&server, &device, json!({"one_time_keys": device.one_time_keys(2..500)})).await.0, 200);
        let (_, counts) = upload(&server, &device, json!({})).await;
        assert_eq!(counts["one_time_key_counts"]["signed_curve25519"], 500);
        let (_, query) = server.post(QUERY, Some(&bob.access_token), json!({"device_keys": {&alice.user_id: [&alice.device_id]}})).await;
        assert_eq!(query["device_keys"][&alice.user_id][&alice.device_id]["keys"], device.device_keys()["keys"]);
        // Claims and queries with malformed bodies are Matrix errors.
        assert_error(&server.post(CLAIM, Some(&bob.access_token), json!({"one_time_keys": {"not-a-user": {}}})).await, 400, "M_BAD_JSON");
        assert_error(&server.post(QUERY, Some(&bob.access_token), json!({"device_keys": []})).await, 400, "M_BAD_JSON");
    }

    async fn concurrent_claims_never_share_a_one_time_key(backend) {
        let server = TestServer::start(backend).await;
        let alice = server.register("alice").await;
        let bob = server.register("bob").await;
        let device = Device::new(&alice);
        let body = json!({
            "device_keys": device.device_keys(),
            "one_time_keys": device.one_time_keys(0..40),
            "fallback_keys": {"signed_curve25519:F": device.one_time_key(99, true)},
        });
        assert_eq!(upload(&server, &device, body).await.0, 200);
        let claims = (0..50).map(|_| claim(&server, &bob, &alice.user_id, &alice.device_id));
        let results = futures_util::future::join_all(claims).await;
        let mut one_time = HashSet::new();
        let mut fallbacks = 0;
        for claimed in results {
            let (id, _) = claimed.as_object().unwrap().iter().next().unwrap();
            if id == "signed_curve25519:F" {
                fallbacks += 1;
            } else {
                assert!(one_time.insert(id.clone()), "{id} was handed out twice");
            }
        }
        assert_eq!(one_time.len(), 40);
        assert_eq!(fallbacks, 10);
    }

    async fn cross_signing_keys_and_signatures(backend) {
        let server = TestServer::start(backend).await;
        let (alice, bob, _room) = two_users_in_a_room(&server).await;
        let device = Device::new(&alice);
        assert_eq!(upload(&server, &device, json!({"device_keys": device.device_keys()})).await.0, 200);
        let alice_keys = CrossSigning::new();
        // The first upload needs no password.
        let (status, body) = server.post(SIGNING, Some(&alice.access_token), alice_keys.upload_body(&alice.user_id)).await;
        assert_eq!(status, 200, "{body}");
        let bob_keys = CrossSigning::new();
        assert_eq!(server.post(SIGNING, Some(&bob.access_token), bob_keys.upload_body(&bob.user_id)).await.0, 200);

        // Alice sees her user-signing key; Bob sees only her master and self-signing keys.
        let query_alice = json!({"device_keys": {&alice.user_id: []}});
        let (_, own) = server.post(QUERY, Some(&alice.access_token), query_alice.clone()).await;
        assert_eq!(own["master_keys"][&alice.user_id]["keys"], alice_keys.master_json(&alice.user_id)["keys"]);
        assert!(own["user_signing_keys"].get(&alice.user_id).is_some(), "{own}");
        let (_, theirs) = server.post(QUERY, Some(&bob.access_token), query_alice.clone()).await;
        assert!(theirs["self_signing_keys"].get(&alice.user_id).is_some(), "{theirs}");
        assert!(theirs.get("user_signing_keys").is_none_or(|keys| keys.get(&alice.user_id).is_none()), "{theirs}");

        // A self-signing key not signed by the master key is refused.
        let mut bad = alice_keys.upload_body(&alice.user_id);
        bad["self_signing_key"] = Key::new().sign(&alice.user_id, "x", CrossSigning::key(&alice.user_id, "self_signing", &Key::new()));
        bad.as_object_mut().unwrap().remove("master_key");
        assert_error(&server.post(SIGNING, Some(&alice.access_token), bad).await, 400, "M_INVALID_SIGNATURE");

        // Replacing the master key needs the password.
        let replacement = CrossSigning::new();
        let (status, challenge) = server.post(SIGNING, Some(&alice.access_token), replacement.upload_body(&alice.user_id)).await;
        assert_eq!(status, 401, "{challenge}");
        let mut with_auth = replacement.upload_body(&alice.user_id);
        with_auth["auth"] = password_auth(&alice, &challenge["session"]);
        assert_eq!(server.post(SIGNING, Some(&alice.access_token), with_auth).await.0, 200);
        let alice_keys = replacement;

        // Alice's self-signing key signs her device; her user-signing key signs Bob's master key.
        let ss = alice_keys.self_signing.public();
        let signed_device = alice_keys.self_signing.sign(&alice.user_id, &ss, device.device_keys());
        let us = alice_keys.user_signing.public();
        let signed_bob = alice_keys.user_signing.sign(&alice.user_id, &us, bob_keys.master_json(&bob.user_id));
        let body = json!({
            &alice.user_id: {&alice.device_id: signed_device},
            &bob.user_id: {bob_keys.master.public(): signed_bob},
        });
        let (status, response) = server.post(SIGNATURES, Some(&alice.access_token), body).await;
        assert_eq!(status, 200, "{response}");
        assert!(response.get("failures").is_none_or(|f| f.as_object().unwrap().is_empty()), "{response}");

        let (_, theirs) = server.post(QUERY, Some(&bob.access_token), query_alice).await;
        let device_sigs = &theirs["device_keys"][&alice.user_id][&alice.device_id]["signatures"][&alice.user_id];
        assert!(device_sigs.get(format!("ed25519:{ss}")).is_some(), "{theirs}");
        // Alice's signature of Bob's master key is for Alice's eyes only.
        let query_bob = json!({"device_keys": {&bob.user_id: []}});
        let (_, by_alice) = server.post(QUERY, Some(&alice.access_token), query_bob.clone()).await;
        assert!(by_alice["master_keys"][&bob.user_id]["signatures"][&alice.user_id].get(format!("ed25519:{us}")).is_some(), "{by_alice}");
        let (_, by_bob) = server.post(QUERY, Some(&bob.access_token), query_bob).await;
        assert!(by_bob["master_keys"][&bob.user_id]["signatures"].get(&alice.user_id).is_none(), "{by_bob}");

        // A signature that does not verify is reported per key, and not stored.
        let forged = Key::new().sign(&alice.user_id, &ss, device.device_keys());
        let (status, response) = server.post(SIGNATURES, Some(&alice.access_token),
            json!({&alice.user_id: {&alice.device_id: forged, "NODEVICE": {"signatures": {}}}})).await;
        assert_eq!(status, 200);
        assert_eq!(response["failures"][&alice.user_id][&alice.device_id]["errcode"], "M_INVALID_SIGNATURE", "{response}");
        assert!(response["failures"][&alice.user_id].get("NODEVICE").is_some(), "{response}");
    }

    async fn key_changes_reach_people_sharing_a_room(backend) {
        let server = TestServer::start(backend).await;
        let (alice, bob, _room) = two_users_in_a_room(&server).await;
        let carol = server.register("carol").await;
        let before = server.sync(&bob, None, None, 0).await["next_batch"].as_str().unwrap().to_owned();
        let carol_before = server.sync(&carol, None, None, 0).await["next_batch"].as_str().unwrap().to_owned();
        let device = Device::new(&alice);
        assert_eq!(upload(&server, &device, json!({"device_keys": device.device_keys()})).await.0, 200);
        let (_, after) = server.sync_until(&bob, Some(before.clone()), |s| {
            s["device_lists"]["changed"].as_array().is_some_and(|c| c.iter().any(|u| u == &json!(alice.user_id)))
        }).await;
        let path = format!("/_matrix/client/v3/keys/changes?from={before}&to={after}");
        let (status, changes) = server.get(&path, Some(&bob.access_token)).await;
        assert_eq!(status, 200, "{changes}");
        assert!(changes["changed"].as_array().unwrap().contains(&json!(alice.user_id)), "{changes}");
        // Carol shares no room with Alice and hears nothing.
        let path = format!("/_matrix/client/v3/keys/changes?from={carol_before}&to={after}");
        let (_, changes) = server.get(&path, Some(&carol.access_token)).await;
        assert_eq!(changes["changed"], json!([]));
        assert_error(&server.get("/_matrix/client/v3/keys/changes?from=x&to=y", Some(&bob.access_token)).await, 400, "M_INVALID_PARAM");
    }

    async fn room_key_backups_keep_the_best_key_of_each_session(backend) {
        let server = TestServer::start(backend).await;
        let alice = server.register("alice").await;
        let token = Some(alice.access_token.as_str());
        assert_error(&server.get(BACKUP, token).await, 404, "M_NOT_FOUND");
        let algorithm = json!({"algorithm": "m.megolm_backup.v1.curve25519-aes-sha2", "auth_data": {"public_key": "abc"}});
        let (status, created) = server.post(BACKUP, token, algorithm.clone()).await;
        assert_eq!(status, 200, "{created}");
        let version = created["version"].as_str().unwrap().to_owned();
        let (_, info) = server.get(BACKUP, token).await;
        assert_eq!(info["version"], version);
        assert_eq!(info["count"], 0);
        assert_eq!(info["auth_data"]["public_key"], "abc");
        let etag0 = info["etag"].as_str().unwrap().to_owned();

        let key = |index: u64, forwarded: u64, verified: bool, tag: &str| json!({
            "first_message_index": index, "forwarded_count": forwarded, "is_verified": verified,
            "session_data": {"ephemeral": "e", "ciphertext": tag, "mac": "m"},
        });
        let session = |room: &str, id: &str| format!("/_matrix/client/v3/room_keys/keys/{}/{id}?version={version}", crate::harness::enc(room));
        let room = "!room:localhost";
        let (status, put) = server.put(&session(room, "S1"), token, key(5, 1, false, "first")).await;
        assert_eq!(status, 200, "{put}");
        assert_eq!(put["count"], 1);
        assert_ne!(put["etag"], etag0);
        // A worse key (higher index) does not replace it; a verified one does; then a lower index.
        server.put(&session(room, "S1"), token, key(9, 0, false, "worse")).await;
        assert_eq!(server.get(&session(room, "S1"), token).await.1["session_data"]["ciphertext"], "first");
        server.put(&session(room, "S1"), token, key(7, 0, true, "verified")).await;
        assert_eq!(server.get(&session(room, "S1"), token).await.1["session_data"]["ciphertext"], "verified");
        server.put(&session(room, "S1"), token, key(2, 3, false, "unverified-lower")).await;
        assert_eq!(server.get(&session(room, "S1"), token).await.1["session_data"]["ciphertext"], "verified");
        server.put(&session(room, "S1"), token, key(3, 0, true, "best")).await;
        assert_eq!(server.get(&session(room, "S1"), token).await.1["session_data"]["ciphertext"], "best");

        // Bulk upload, all three read levels.
        let all = format!("/_matrix/client/v3/room_keys/keys?version={version}");
        let body = json!({"rooms": {room: {"sessions": {"S2": key(0, 0, false, "two")}}, "!other:localhost": {"sessions": {"S3": key(0, 0, false, "three")}}}});
        let (status, put) = server.put(&all, token, body).await;
        assert_eq!(status, 200, "{put}");
        assert_eq!(put["count"], 3);
        let (_, everything) = server.get(&all, token).await;
        assert_eq!(everything["rooms"][room]["sessions"].as_object().unwrap().len(), 2);
        let room_path = format!("/_matrix/client/v3/room_keys/keys/{}?version={version}", crate::harness::enc(room));
        assert_eq!(server.get(&room_path, token).await.1["sessions"].as_object().unwrap().len(), 2);
        assert_error(&server.get(&session(room, "NOPE"), token).await, 404, "M_NOT_FOUND");

        // Only the current version takes keys.
        let (_, newer) = server.post(BACKUP, token, algorithm.clone()).await;
        let newer = newer["version"].as_str().unwrap().to_owned();
        let (status, body) = server.put(&session(room, "S9"), token, key(0, 0, false, "late")).await;
        assert_eq!(status, 403, "{body}");
        assert_eq!(body["errcode"], "M_WRONG_ROOM_KEYS_VERSION");
        assert_eq!(body["current_version"], newer);
        // Old versions stay readable until deleted; deleting takes their keys.
        assert_eq!(server.get(&format!("{BACKUP}/{version}"), token).await.1["count"], 3);
        let (status, deleted) = server.delete(&room_path, token, json!({})).await;
        assert_eq!(status, 200, "{deleted}");
        assert_eq!(deleted["count"], 1);
        assert_eq!(server.delete(&format!("{BACKUP}/{version}"), token, json!({})).await.0, 200);
        assert_error(&server.get(&format!("{BACKUP}/{version}"), token).await, 404, "M_NOT_FOUND");
        assert_error(&server.get(&format!("{BACKUP}/junk"), token).await, 404, "M_NOT_FOUND");
        // The auth data can change, the algorithm cannot.
        let update = json!({"algorithm": "m.megolm_backup.v1.curve25519-aes-sha2", "auth_data": {"public_key": "def"}, "version": newer});
        assert_eq!(server.put(&format!("{BACKUP}/{newer}"), token, update).await.0, 200);
        assert_eq!(server.get(BACKUP, token).await.1["auth_data"]["public_key"], "def");
        let other = json!({"algorithm": "org.example.other", "auth_data": {}});
        assert_error(&server.put(&format!("{BACKUP}/{newer}"), token, other).await, 400, "M_INVALID_PARAM");
        // Another user sees none of it.
        let bob = server.register("bob").await;
        assert_error(&server.get(&format!("{BACKUP}/{newer}"), Some(&bob.access_token)).await, 404, "M_NOT_FOUND");
    }

    async fn to_device_messages_are_sent_once_per_transaction_across_a_restart(backend) {
        let mut server = TestServer::start(backend).await;
        let alice = server.register("alice").await;
        let bob = server.register("bob").await;
        let path = "/_matrix/client/v3/sendToDevice/m.room_key_request/txn-1";
        let body = json!({"messages": {&bob.user_id: {&bob.device_id: {"n": 1}}}});
        assert_eq!(server.put(path, Some(&alice.access_token), body.clone()).await.0, 200);
        server.restart();
        assert_eq!(server.put(path, Some(&alice.access_token), body).await.0, 200);
        let sync = server.sync(&bob, None, None, 0).await;
        let events = sync["to_device"]["events"].as_array().unwrap();
        assert_eq!(events.len(), 1, "{sync}");
        assert_eq!(events[0]["sender"], json!(alice.user_id));
    }

    async fn to_device_messages_reach_a_device_exactly_once_across_reconnects_and_a_restart(backend) {
        let mut server = TestServer::start(backend).await;
        let alice = server.register("alice").await;
        let bob = server.register("bob").await;
        let send = |n: usize| {
            let path = format!("/_matrix/client/v3/sendToDevice/m.room.encrypted/once-{n}");
            (path, json!({"messages": {&bob.user_id: {&bob.device_id: {"n": n}}}}))
        };
        let numbers = |sync: &Value| -> Vec<u64> {
            sync["to_device"]["events"].as_array().unwrap().iter().map(|e| e["content"]["n"].as_u64().unwrap()).collect()
        };
        let first = server.sync(&bob, None, None, 0).await;
        let start = first["next_batch"].as_str().unwrap().to_owned();
        for n in 0..3 {
            let (path, body) = send(n);
            assert_eq!(server.put(&path, Some(&alice.access_token), body).await.0, 200);
        }
        // A response lost on the way (the client syncs again from the same token) is delivered
        // again, because the device never confirmed it; a server restart loses nothing.
        let lost = server.sync(&bob, Some(&start), None, 0).await;
        assert_eq!(numbers(&lost), vec![0, 1, 2], "{lost}");
        server.restart();
        let again = server.sync(&bob, Some(&start), None, 0).await;
        assert_eq!(numbers(&again), vec![0, 1, 2], "{again}");
        // Confirmed by the next sync, they are gone for good, across another restart too.
        let next = again["next_batch"].as_str().unwrap().to_owned();
        let (path, body) = send(3);
        assert_eq!(server.put(&path, Some(&alice.access_token), body).await.0, 200);
        let after = server.sync(&bob, Some(&next), None, 0).await;
        assert_eq!(numbers(&after), vec![3], "{after}");
        let last = after["next_batch"].as_str().unwrap().to_owned();
        let confirm = server.sync(&bob, Some(&last), None, 0).await;
        assert_eq!(numbers(&confirm), Vec::<u64>::new());
        server.restart();
        let old = server.sync(&bob, Some(&next), None, 0).await;
        assert_eq!(numbers(&old), Vec::<u64>::new(), "confirmed messages came back: {old}");
    }

    async fn a_dehydrated_device_receives_to_device_messages_for_later(backend) {
        let server = TestServer::start(backend).await;
        let alice = server.register("alice").await;
        let bob = server.register("bob").await;
        let base = "/_matrix/client/unstable/org.matrix.msc3814.v1/dehydrated_device";
        let token = Some(alice.access_token.as_str());
        assert_error(&server.get(base, token).await, 404, "M_NOT_FOUND");
        let dehydrated = Device::new(&Account { device_id: "DEHYDRATED1".to_owned(), ..alice.clone() });
        let mut device_keys = dehydrated.device_keys();
        device_keys["dehydrated"] = json!(true);
        let device_keys = dehydrated.key.sign(&alice.user_id, "DEHYDRATED1", {
            let mut unsigned = device_keys.clone();
            unsigned.as_object_mut().unwrap().remove("signatures");
            unsigned
        });
        let body = json!({
            "device_id": "DEHYDRATED1",
            "initial_device_display_name": "Dehydrated device",
            "device_data": {"algorithm": "org.matrix.msc3814.v2", "device_pickle": "pickle", "nonce": "n"},
            "device_keys": device_keys,
            "one_time_keys": dehydrated.one_time_keys(0..2),
        });
        let (status, put) = server.put(base, token, body.clone()).await;
        assert_eq!(status, 200, "{put}");
        assert_eq!(put["device_id"], "DEHYDRATED1");
        let (_, got) = server.get(base, token).await;
        assert_eq!(got["device_data"]["device_pickle"], "pickle");
        // Others find it and can claim its keys and message it.
        let (_, query) = server.post(QUERY, Some(&bob.access_token), json!({"device_keys": {&alice.user_id: []}})).await;
        assert_eq!(query["device_keys"][&alice.user_id]["DEHYDRATED1"]["dehydrated"], true, "{query}");
        assert!(claim(&server, &bob, &alice.user_id, "DEHYDRATED1").await.as_object().is_some_and(|k| k.len() == 1));
        for n in 0..3 {
            let path = format!("/_matrix/client/v3/sendToDevice/m.room.encrypted/t{n}");
            let body = json!({"messages": {&alice.user_id: {"DEHYDRATED1": {"n": n}}}});
            assert_eq!(server.put(&path, Some(&bob.access_token), body).await.0, 200);
        }
        // A new device of Alice's fetches them, then confirms them away.
        let events = format!("{base}/DEHYDRATED1/events");
        let (status, first) = server.post(&events, token, json!({})).await;
        assert_eq!(status, 200, "{first}");
        assert_eq!(first["events"].as_array().unwrap().len(), 3);
        let (_, second) = server.post(&events, token, json!({"next_batch": first["next_batch"]})).await;
        assert_eq!(second["events"], json!([]));
        assert_error(&server.post(&format!("{base}/OTHER/events"), token, json!({})).await, 403, "M_FORBIDDEN");
        // The dehydrated device cannot take over a real device's ID.
        let mut clash = body.clone();
        clash["device_id"] = json!(alice.device_id);
        assert_error(&server.put(base, token, clash).await, 400, "M_INVALID_PARAM");
        // Deleting it removes the device.
        let (status, deleted) = server.delete(base, token, json!({})).await;
        assert_eq!(status, 200, "{deleted}");
        let (_, devices) = server.get("/_matrix/client/v3/devices", token).await;
        assert!(!devices["devices"].as_array().unwrap().iter().any(|d| d["device_id"] == "DEHYDRATED1"));
        assert_error(&server.get(base, token).await, 404, "M_NOT_FOUND");
    }
}
