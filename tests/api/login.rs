//! Login, access tokens (header and query), refresh tokens, soft logout, logout and rate limits.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::harness::{Backend, TestServer, assert_error, backend_tests};

const WHOAMI: &str = "/_matrix/client/v3/account/whoami";

/// The median time of five logins as `user` with a wrong password.
async fn median_failed_login(server: &TestServer, user: &str) -> Duration {
    let mut times = Vec::new();
    for _ in 0..5 {
        let started = Instant::now();
        assert_error(&server.login(user, "not the password", json!({})).await, 403, "M_FORBIDDEN");
        times.push(started.elapsed());
    }
    times.sort();
    times[2]
}

/// An unknown name is answered only after hashing the guess (against a dummy hash), as a known
/// one is, so response times do not tell which names exist. The bound is loose on purpose (a
/// guard, not a measurement): without the dummy hash an unknown name answers in about 1% of the
/// time a password check takes.
async fn unknown_users_take_as_long_as_wrong_passwords(backend: Backend) {
    let server = TestServer::start(backend).await;
    server.register("alice").await;
    // Interleave, so a load spike on the machine hits both alike.
    let mut known = Duration::ZERO;
    let mut unknown = Duration::ZERO;
    for _ in 0..2 {
        known += median_failed_login(&server, "alice").await;
        unknown += median_failed_login(&server, "nobody").await;
    }
    assert!(unknown * 4 >= known, "unknown user {unknown:?} vs wrong password {known:?}");
}

backend_tests! {
    async fn unknown_user_logins_are_not_faster(backend) {
        unknown_users_take_as_long_as_wrong_passwords(backend).await
    }

    async fn login_flows_offer_password(backend) {
        let server = TestServer::start(backend).await;
        let (status, body) = server.get("/_matrix/client/v3/login", None).await;
        assert_eq!(status, 200);
        assert_eq!(body["flows"], json!([{"type": "m.login.password"}]));
    }

    async fn login_accepts_localpart_full_id_and_any_case(backend) {
        let server = TestServer::start(backend).await;
        let alice = server.register("alice").await;
        for user in ["alice", "@alice:localhost", "ALICE", "@Alice:localhost"] {
            let (status, body) = server.login(user, &alice.password, json!({})).await;
            assert_eq!(status, 200, "{user}: {body}");
            assert_eq!(body["user_id"], "@alice:localhost");
            assert_eq!(body["home_server"], "localhost");
            assert_eq!(body["well_known"]["m.homeserver"]["base_url"], server.base_url);
            let (status, whoami) = server.get(WHOAMI, body["access_token"].as_str()).await;
            assert_eq!(status, 200);
            assert_eq!(whoami["device_id"], body["device_id"]);
        }
        // The deprecated top-level `user` field still works.
        let (status, _) = server
            .post("/_matrix/client/v3/login", None, json!({"type": "m.login.password", "user": "alice", "password": alice.password}))
            .await;
        assert_eq!(status, 200);
    }

    async fn wrong_password_or_unknown_user_is_forbidden(backend) {
        let server = TestServer::start(backend).await;
        let alice = server.register("alice").await;
        assert_error(&server.login("alice", "wrong", json!({})).await, 403, "M_FORBIDDEN");
        assert_error(&server.login("nobody", "x", json!({})).await, 403, "M_FORBIDDEN");
        assert_error(&server.login("@alice:elsewhere.org", &alice.password, json!({})).await, 403, "M_FORBIDDEN");
    }

    async fn unknown_login_type_is_refused(backend) {
        let server = TestServer::start(backend).await;
        let response = server.post("/_matrix/client/v3/login", None, json!({"type": "m.login.magic"})).await;
        assert_error(&response, 400, "M_UNKNOWN");
        let response = server
            .post("/_matrix/client/v3/login", None, json!({"type": "m.login.password", "identifier": {"type": "m.id.thirdparty", "medium": "email", "address": "a@b.c"}, "password": "x"}))
            .await;
        assert_error(&response, 403, "M_FORBIDDEN");
    }

    async fn reusing_a_device_id_replaces_its_token(backend) {
        let server = TestServer::start(backend).await;
        let alice = server.register("alice").await;
        let (_, first) = server.login("alice", &alice.password, json!({"device_id": "LAPTOP", "initial_device_display_name": "Laptop"})).await;
        let (_, second) = server.login("alice", &alice.password, json!({"device_id": "LAPTOP", "initial_device_display_name": "Other"})).await;
        assert_eq!(second["device_id"], "LAPTOP");
        let stale = server.get(WHOAMI, first["access_token"].as_str()).await;
        assert_error(&stale, 401, "M_UNKNOWN_TOKEN");
        assert_eq!(server.get(WHOAMI, second["access_token"].as_str()).await.0, 200);
        let (_, devices) = server.get("/_matrix/client/v3/devices", Some(&alice.access_token)).await;
        let laptops: Vec<_> = devices["devices"].as_array().unwrap().iter().filter(|d| d["device_id"] == "LAPTOP").collect();
        assert_eq!(laptops.len(), 1);
        assert_eq!(laptops[0]["display_name"], "Laptop", "the initial name is kept for a known device");
    }

    async fn token_in_query_parameter_is_accepted(backend) {
        let server = TestServer::start(backend).await;
        let alice = server.register("alice").await;
        let (status, body) = server.get(&format!("{WHOAMI}?access_token={}", alice.access_token), None).await;
        assert_eq!(status, 200);
        assert_eq!(body["user_id"], alice.user_id);
    }

    async fn missing_and_unknown_tokens(backend) {
        let server = TestServer::start(backend).await;
        assert_error(&server.get(WHOAMI, None).await, 401, "M_MISSING_TOKEN");
        let unknown = server.get(WHOAMI, Some("hat_nonsense")).await;
        assert_error(&unknown, 401, "M_UNKNOWN_TOKEN");
        assert_eq!(unknown.1["soft_logout"], false);
        let response = server.http.get(server.url(WHOAMI)).header("Authorization", "Basic abc").send().await.unwrap();
        assert_eq!(response.status(), 401);
    }

    async fn logout_ends_the_session_and_removes_the_device(backend) {
        let server = TestServer::start(backend).await;
        let alice = server.register("alice").await;
        let (_, other) = server.login("alice", &alice.password, json!({})).await;
        let (status, _) = server.post("/_matrix/client/v3/logout", Some(&alice.access_token), json!({})).await;
        assert_eq!(status, 200);
        let gone = server.get(WHOAMI, Some(&alice.access_token)).await;
        assert_error(&gone, 401, "M_UNKNOWN_TOKEN");
        assert_eq!(gone.1["soft_logout"], false);
        let other_token = other["access_token"].as_str().unwrap();
        let (_, devices) = server.get("/_matrix/client/v3/devices", Some(other_token)).await;
        let ids: Vec<_> = devices["devices"].as_array().unwrap().iter().map(|d| d["device_id"].clone()).collect();
        assert_eq!(ids, vec![other["device_id"].clone()]);
    }

    async fn logout_all_ends_every_session(backend) {
        let server = TestServer::start(backend).await;
        let alice = server.register("alice").await;
        let (_, other) = server.login("alice", &alice.password, json!({})).await;
        let (status, _) = server.post("/_matrix/client/v3/logout/all", Some(&alice.access_token), json!({})).await;
        assert_eq!(status, 200);
        assert_error(&server.get(WHOAMI, Some(&alice.access_token)).await, 401, "M_UNKNOWN_TOKEN");
        assert_error(&server.get(WHOAMI, other["access_token"].as_str()).await, 401, "M_UNKNOWN_TOKEN");
        assert_eq!(server.login("alice", &alice.password, json!({})).await.0, 200);
    }

    async fn refresh_tokens_rotate(backend) {
        let server = TestServer::start(backend).await;
        let alice = server.register("alice").await;
        let (status, login) = server.login("alice", &alice.password, json!({"refresh_token": true})).await;
        assert_eq!(status, 200);
        let access1 = login["access_token"].as_str().unwrap().to_owned();
        let refresh1 = login["refresh_token"].as_str().unwrap().to_owned();
        assert_eq!(login["expires_in_ms"], 300_000);

        let (status, refreshed) = server.post("/_matrix/client/v3/refresh", None, json!({"refresh_token": refresh1})).await;
        assert_eq!(status, 200, "{refreshed}");
        let access2 = refreshed["access_token"].as_str().unwrap().to_owned();
        let refresh2 = refreshed["refresh_token"].as_str().unwrap().to_owned();
        assert_ne!(access1, access2);
        assert_ne!(refresh1, refresh2);
        assert_eq!(refreshed["expires_in_ms"], 300_000);
        assert_error(&server.get(WHOAMI, Some(&access1)).await, 401, "M_UNKNOWN_TOKEN");

        // Until the new pair is used, the old refresh token still works (a lost response can be retried).
        let (status, retried) = server.post("/_matrix/client/v3/refresh", None, json!({"refresh_token": refresh1})).await;
        assert_eq!(status, 200);
        let access3 = retried["access_token"].as_str().unwrap().to_owned();
        assert_error(&server.get(WHOAMI, Some(&access2)).await, 401, "M_UNKNOWN_TOKEN");
        let refresh2 = retried["refresh_token"].as_str().unwrap().to_owned();

        let (status, whoami) = server.get(WHOAMI, Some(&access3)).await;
        assert_eq!(status, 200);
        assert_eq!(whoami["device_id"], login["device_id"], "refreshing keeps the device");
        // The new access token was used, so the old refresh token is spent.
        assert_error(&server.post("/_matrix/client/v3/refresh", None, json!({"refresh_token": refresh1})).await, 401, "M_UNKNOWN_TOKEN");
        assert_eq!(server.post("/_matrix/client/v3/refresh", None, json!({"refresh_token": refresh2})).await.0, 200);
        assert_error(&server.post("/_matrix/client/v3/refresh", None, json!({"refresh_token": "hrt_nonsense"})).await, 401, "M_UNKNOWN_TOKEN");
    }

    async fn registration_can_issue_refresh_tokens(backend) {
        let server = TestServer::start(backend).await;
        let (status, body) = server
            .post("/_matrix/client/v3/register", None, json!({"username": "alice", "password": "x", "refresh_token": true, "auth": {"type": "m.login.dummy"}}))
            .await;
        assert_eq!(status, 200);
        assert!(body["refresh_token"].is_string());
        assert_eq!(body["expires_in_ms"], 300_000);
        // Without the flag, tokens do not expire and no refresh token is issued.
        let (_, plain) = server.login("alice", "x", json!({})).await;
        assert!(plain.get("refresh_token").is_none() && plain.get("expires_in_ms").is_none(), "{plain}");
    }

    async fn expired_access_token_is_a_soft_logout(backend) {
        let server = TestServer::start_with(backend, "[auth]\nrefreshable_access_token_lifetime_secs = 1\n").await;
        let alice = server.register("alice").await;
        let (_, login) = server.login("alice", &alice.password, json!({"refresh_token": true})).await;
        let token = login["access_token"].as_str().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        let expired = loop {
            let response = server.get(WHOAMI, Some(token)).await;
            if response.0 == 401 {
                break response;
            }
            assert!(Instant::now() < deadline, "token never expired");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_error(&expired, 401, "M_UNKNOWN_TOKEN");
        assert_eq!(expired.1["soft_logout"], true);
        let (status, refreshed) = server.post("/_matrix/client/v3/refresh", None, json!({"refresh_token": login["refresh_token"]})).await;
        assert_eq!(status, 200);
        assert_eq!(server.get(WHOAMI, refreshed["access_token"].as_str()).await.0, 200);
    }

    async fn login_is_rate_limited_per_address(backend) {
        let server = TestServer::start_with(backend, "[rate_limits]\nenabled = true\n[rate_limits.login]\nper_second = 0.1\nburst = 2\n").await;
        let alice = server.register("alice").await;
        assert_eq!(server.login("alice", &alice.password, json!({})).await.0, 200);
        assert_eq!(server.login("alice", &alice.password, json!({})).await.0, 200);
        let limited = server.login("alice", &alice.password, json!({})).await;
        assert_error(&limited, 429, "M_LIMIT_EXCEEDED");
        let retry = limited.1["retry_after_ms"].as_u64().unwrap();
        assert!(retry > 0 && retry <= 10_000, "{retry}");
        let response = server
            .http
            .post(server.url("/_matrix/client/v3/login"))
            .json(&json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": "alice"}, "password": alice.password}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 429);
        assert!(response.headers().contains_key("retry-after"));
        // GET /login is not limited.
        assert_eq!(server.get("/_matrix/client/v3/login", None).await.0, 200);
    }

    async fn registration_is_rate_limited_per_address(backend) {
        let server = TestServer::start_with(backend, "[rate_limits]\nenabled = true\n[rate_limits.register]\nper_second = 0.1\nburst = 2\n").await;
        server.register("alice").await;
        server.register("bob").await;
        let limited = server
            .post("/_matrix/client/v3/register", None, json!({"username": "carol", "password": "x", "auth": {"type": "m.login.dummy"}}))
            .await;
        assert_error(&limited, 429, "M_LIMIT_EXCEEDED");
        assert_eq!(server.get("/_matrix/client/v3/register/available?username=carol", None).await.0, 200, "nothing was stored");
    }

    async fn failed_passwords_are_rate_limited_per_account(backend) {
        let server = TestServer::start_with(backend, "[rate_limits]\nenabled = true\n[rate_limits.login]\nper_second = 100.0\nburst = 100\n[rate_limits.failed_login_per_account]\nper_second = 0.1\nburst = 2\n").await;
        server.register("alice").await;
        assert_error(&server.login("alice", "wrong", json!({})).await, 403, "M_FORBIDDEN");
        assert_error(&server.login("alice", "wrong", json!({})).await, 403, "M_FORBIDDEN");
        assert_error(&server.login("alice", "wrong", json!({})).await, 429, "M_LIMIT_EXCEEDED");
    }

    async fn correct_password_during_lockout_is_refused(backend) {
        let server = TestServer::start_with(backend, "[rate_limits]\nenabled = true\n[rate_limits.login]\nper_second = 100.0\nburst = 100\n[rate_limits.failed_login_per_account]\nper_second = 0.01\nburst = 2\n").await;
        let alice = server.register("alice").await;
        assert_error(&server.login("alice", "wrong", json!({})).await, 403, "M_FORBIDDEN");
        assert_error(&server.login("alice", "wrong", json!({})).await, 403, "M_FORBIDDEN");
        let locked = server.login("alice", &alice.password, json!({})).await;
        assert_error(&locked, 429, "M_LIMIT_EXCEEDED");
        assert!(locked.1["retry_after_ms"].as_u64().is_some_and(|ms| ms > 0), "{}", locked.1);
        // Another account is not affected, and unknown names are refused the same way as wrong passwords.
        let bob = server.register("bob").await;
        assert_eq!(server.login("bob", &bob.password, json!({})).await.0, 200);
        assert_error(&server.login("nobody", "x", json!({})).await, 403, "M_FORBIDDEN");
    }
}
