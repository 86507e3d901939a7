//! Device management.

use serde_json::json;

use crate::harness::{TestServer, assert_error, backend_tests};

const WHOAMI: &str = "/_matrix/client/v3/account/whoami";

backend_tests! {
    async fn devices_are_listed_with_last_seen(backend) {
        let server = TestServer::start(backend).await;
        let alice = server.register_with("alice", json!({"initial_device_display_name": "Desktop"})).await;
        server.login("alice", &alice.password, json!({"device_id": "PHONE", "initial_device_display_name": "Phone"})).await;
        let (status, body) = server.get("/_matrix/client/v3/devices", Some(&alice.access_token)).await;
        assert_eq!(status, 200);
        let devices = body["devices"].as_array().unwrap();
        assert_eq!(devices.len(), 2);
        let phone = devices.iter().find(|d| d["device_id"] == "PHONE").unwrap();
        assert_eq!(phone["display_name"], "Phone");
        assert!(phone["last_seen_ts"].as_u64().unwrap() > 1_700_000_000_000);
        assert_eq!(phone["last_seen_ip"], "127.0.0.1");

        let (status, one) = server.get(&format!("/_matrix/client/v3/devices/{}", alice.device_id), Some(&alice.access_token)).await;
        assert_eq!(status, 200);
        assert_eq!(one["display_name"], "Desktop");
    }

    async fn unknown_device_is_not_found(backend) {
        let server = TestServer::start(backend).await;
        let alice = server.register("alice").await;
        let bob = server.register("bob").await;
        assert_error(&server.get("/_matrix/client/v3/devices/NOPE", Some(&alice.access_token)).await, 404, "M_NOT_FOUND");
        // Another user's device is invisible.
        let path = format!("/_matrix/client/v3/devices/{}", bob.device_id);
        assert_error(&server.get(&path, Some(&alice.access_token)).await, 404, "M_NOT_FOUND");
        assert_error(&server.put(&path, Some(&alice.access_token), json!({"display_name": "mine"})).await, 404, "M_NOT_FOUND");
    }

    async fn devices_can_be_renamed(backend) {
        let server = TestServer::start(backend).await;
        let alice = server.register("alice").await;
        let path = format!("/_matrix/client/v3/devices/{}", alice.device_id);
        assert_eq!(server.put(&path, Some(&alice.access_token), json!({"display_name": "Work laptop"})).await.0, 200);
        assert_eq!(server.get(&path, Some(&alice.access_token)).await.1["display_name"], "Work laptop");
    }

    async fn deleting_a_device_needs_uia_and_kills_its_token(backend) {
        let server = TestServer::start(backend).await;
        let alice = server.register("alice").await;
        let (_, phone) = server.login("alice", &alice.password, json!({"device_id": "PHONE"})).await;
        let path = "/_matrix/client/v3/devices/PHONE";
        let (status, challenge) = server.delete(path, Some(&alice.access_token), json!({})).await;
        assert_eq!(status, 401);
        let auth = json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": "alice"},
            "password": alice.password, "session": challenge["session"]});
        assert_eq!(server.delete(path, Some(&alice.access_token), json!({"auth": auth})).await.0, 200);
        assert_error(&server.get(WHOAMI, phone["access_token"].as_str()).await, 401, "M_UNKNOWN_TOKEN");
        assert_error(&server.get(path, Some(&alice.access_token)).await, 404, "M_NOT_FOUND");
        assert_error(&server.delete(path, Some(&alice.access_token), json!({})).await, 404, "M_NOT_FOUND");
    }

    async fn bulk_delete_devices(backend) {
        let server = TestServer::start(backend).await;
        let alice = server.register("alice").await;
        let (_, a) = server.login("alice", &alice.password, json!({"device_id": "A"})).await;
        let (_, b) = server.login("alice", &alice.password, json!({"device_id": "B"})).await;
        let body = json!({"devices": ["A", "B", "UNKNOWN"]});
        let (status, challenge) = server.post("/_matrix/client/v3/delete_devices", Some(&alice.access_token), body).await;
        assert_eq!(status, 401);
        let auth = json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": "alice"},
            "password": alice.password, "session": challenge["session"]});
        let (status, _) = server
            .post("/_matrix/client/v3/delete_devices", Some(&alice.access_token), json!({"devices": ["A", "B", "UNKNOWN"], "auth": auth}))
            .await;
        assert_eq!(status, 200);
        assert_error(&server.get(WHOAMI, a["access_token"].as_str()).await, 401, "M_UNKNOWN_TOKEN");
        assert_error(&server.get(WHOAMI, b["access_token"].as_str()).await, 401, "M_UNKNOWN_TOKEN");
        let (_, devices) = server.get("/_matrix/client/v3/devices", Some(&alice.access_token)).await;
        assert_eq!(devices["devices"].as_array().unwrap().len(), 1);
        assert_error(&server.post("/_matrix/client/v3/delete_devices", Some(&alice.access_token), json!({})).await, 400, "M_MISSING_PARAM");
    }
}
