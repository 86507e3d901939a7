//! Rate limits and request limits: per-user limits on actions, the client address behind trusted
//! proxies, the global request timeout and the in-flight request cap.

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::harness::{TestServer, assert_error, backend_tests};

/// `POST /login` as `user` from a client that a proxy says is at `forwarded_for`.
async fn login_via_proxy(server: &TestServer, user: &str, password: &str, forwarded_for: &str) -> (StatusCode, Value) {
    let response = server
        .http
        .post(server.url("/_matrix/client/v3/login"))
        .header("X-Forwarded-For", forwarded_for)
        .json(&json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": user}, "password": password}))
        .send()
        .await
        .unwrap();
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

const ONE_LOGIN: &str = "[rate_limits]\nenabled = true\n[rate_limits.login]\nper_second = 0.01\nburst = 1\n";

backend_tests! {
    async fn trusted_proxy_gives_each_forwarded_client_its_own_login_budget(backend) {
        let server = TestServer::start_with(backend, &format!("trusted_proxies = [\"127.0.0.1/32\"]\n{ONE_LOGIN}")).await;
        let alice = server.register("alice").await;
        assert_eq!(login_via_proxy(&server, "alice", &alice.password, "192.0.2.1").await.0, 200);
        assert_error(&login_via_proxy(&server, "alice", &alice.password, "192.0.2.1").await, 429, "M_LIMIT_EXCEEDED");
        // A client-written hop to the left of the proxy's is not believed: the budget is still 192.0.2.1's.
        assert_error(&login_via_proxy(&server, "alice", &alice.password, "198.51.100.7, 192.0.2.1").await, 429, "M_LIMIT_EXCEEDED");
        let (status, login) = login_via_proxy(&server, "alice", &alice.password, "192.0.2.2").await;
        assert_eq!(status, 200, "{login}");
        // The device records the forwarded address (listed from another device, whose own
        // request comes straight from 127.0.0.1).
        let (_, devices) = server.get("/_matrix/client/v3/devices", Some(&alice.access_token)).await;
        let device = devices["devices"].as_array().unwrap().iter().find(|d| d["device_id"] == login["device_id"]).unwrap().clone();
        assert_eq!(device["last_seen_ip"], "192.0.2.2", "{devices}");
    }

    async fn forwarding_headers_from_untrusted_peers_are_ignored(backend) {
        let server = TestServer::start_with(backend, ONE_LOGIN).await;
        let alice = server.register("alice").await;
        let (status, login) = login_via_proxy(&server, "alice", &alice.password, "192.0.2.1").await;
        assert_eq!(status, 200);
        assert_error(&login_via_proxy(&server, "alice", &alice.password, "192.0.2.2").await, 429, "M_LIMIT_EXCEEDED");
        let (_, devices) = server.get("/_matrix/client/v3/devices", Some(&alice.access_token)).await;
        let device = devices["devices"].as_array().unwrap().iter().find(|d| d["device_id"] == login["device_id"]).unwrap().clone();
        assert_eq!(device["last_seen_ip"], "127.0.0.1", "{devices}");
    }
}
