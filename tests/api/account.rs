//! Password change and deactivation, both behind `m.login.password` user-interactive auth.

use serde_json::{Value, json};

use crate::harness::{Account, TestServer, assert_error, backend_tests, enc};

const PASSWORD: &str = "/_matrix/client/v3/account/password";
const DEACTIVATE: &str = "/_matrix/client/v3/account/deactivate";
const WHOAMI: &str = "/_matrix/client/v3/account/whoami";

fn password_auth(account: &Account, session: &str) -> Value {
    json!({
        "type": "m.login.password",
        "identifier": {"type": "m.id.user", "user": account.user_id},
        "password": account.password,
        "session": session,
    })
}

/// Starts a UIA round for `path` and returns the session ID.
async fn uia_session(server: &TestServer, path: &str, token: &str, body: Value) -> String {
    let (status, challenge) = server.post(path, Some(token), body).await;
    assert_eq!(status, 401, "{challenge}");
    assert_eq!(challenge["flows"], json!([{"stages": ["m.login.password"]}]));
    challenge["session"].as_str().unwrap().to_owned()
}

backend_tests! {
    async fn password_change_logs_out_other_devices(backend) {
        let server = TestServer::start(backend).await;
        let alice = server.register("alice").await;
        let (_, phone) = server.login("alice", &alice.password, json!({})).await;
        let session = uia_session(&server, PASSWORD, &alice.access_token, json!({"new_password": "new-secret"})).await;
        let (status, body) = server
            .post(PASSWORD, Some(&alice.access_token), json!({"new_password": "new-secret", "auth": password_auth(&alice, &session)}))
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(server.get(WHOAMI, Some(&alice.access_token)).await.0, 200, "the current session stays");
        assert_error(&server.get(WHOAMI, phone["access_token"].as_str()).await, 401, "M_UNKNOWN_TOKEN");
        assert_error(&server.login("alice", &alice.password, json!({})).await, 403, "M_FORBIDDEN");
        assert_eq!(server.login("alice", "new-secret", json!({})).await.0, 200);
    }

    async fn password_change_can_keep_other_devices(backend) {
        let server = TestServer::start(backend).await;
        let alice = server.register("alice").await;
        let (_, phone) = server.login("alice", &alice.password, json!({})).await;
        let body = json!({"new_password": "new-secret", "logout_devices": false});
        let session = uia_session(&server, PASSWORD, &alice.access_token, body.clone()).await;
        let mut with_auth = body;
        with_auth["auth"] = password_auth(&alice, &session);
        assert_eq!(server.post(PASSWORD, Some(&alice.access_token), with_auth).await.0, 200);
        assert_eq!(server.get(WHOAMI, phone["access_token"].as_str()).await.0, 200);
    }

    async fn wrong_password_in_uia_is_a_401_with_the_flows(backend) {
        let server = TestServer::start(backend).await;
        let alice = server.register("alice").await;
        let session = uia_session(&server, PASSWORD, &alice.access_token, json!({"new_password": "n"})).await;
        let mut auth = password_auth(&alice, &session);
        auth["password"] = json!("wrong");
        let (status, body) = server.post(PASSWORD, Some(&alice.access_token), json!({"new_password": "n", "auth": auth})).await;
        assert_eq!(status, 401);
        assert_eq!(body["errcode"], "M_FORBIDDEN");
        assert_eq!(body["session"], session.as_str());
        assert!(body["flows"].is_array());
        assert_eq!(server.login("alice", &alice.password, json!({})).await.0, 200, "password unchanged");
    }

    async fn uia_cannot_authenticate_as_someone_else(backend) {
        let server = TestServer::start(backend).await;
        let alice = server.register("alice").await;
        let bob = server.register("bob").await;
        let session = uia_session(&server, DEACTIVATE, &alice.access_token, json!({})).await;
        // Bob's valid credentials do not authorise deactivating Alice.
        let (status, body) = server.post(DEACTIVATE, Some(&alice.access_token), json!({"auth": password_auth(&bob, &session)})).await;
        assert_eq!(status, 401, "{body}");
        assert_eq!(server.get(WHOAMI, Some(&alice.access_token)).await.0, 200);
    }

    async fn uia_session_is_bound_to_its_operation(backend) {
        let server = TestServer::start(backend).await;
        let alice = server.register("alice").await;
        let session = uia_session(&server, PASSWORD, &alice.access_token, json!({"new_password": "n"})).await;
        let response = server.post(DEACTIVATE, Some(&alice.access_token), json!({"auth": password_auth(&alice, &session)})).await;
        assert_error(&response, 403, "M_FORBIDDEN");
        assert_eq!(server.get(WHOAMI, Some(&alice.access_token)).await.0, 200);
    }

    async fn deactivation_is_final(backend) {
        let server = TestServer::start(backend).await;
        let alice = server.register("alice").await;
        let (_, phone) = server.login("alice", &alice.password, json!({})).await;
        let session = uia_session(&server, DEACTIVATE, &alice.access_token, json!({})).await;
        let (status, body) = server.post(DEACTIVATE, Some(&alice.access_token), json!({"auth": password_auth(&alice, &session)})).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["id_server_unbind_result"], "no-support");
        assert_error(&server.get(WHOAMI, Some(&alice.access_token)).await, 401, "M_UNKNOWN_TOKEN");
        assert_error(&server.get(WHOAMI, phone["access_token"].as_str()).await, 401, "M_UNKNOWN_TOKEN");
        assert_error(&server.login("alice", &alice.password, json!({})).await, 403, "M_USER_DEACTIVATED");
        let again = server.post("/_matrix/client/v3/register", None, json!({"username": "alice", "password": "x", "auth": {"type": "m.login.dummy"}})).await;
        assert_error(&again, 400, "M_USER_IN_USE");
        assert_error(&server.get(&format!("/_matrix/client/v3/profile/{}", enc(&alice.user_id)), None).await, 404, "M_NOT_FOUND");
    }

    async fn password_change_needs_new_password(backend) {
        let server = TestServer::start(backend).await;
        let alice = server.register("alice").await;
        assert_error(&server.post(PASSWORD, Some(&alice.access_token), json!({})).await, 400, "M_MISSING_PARAM");
        assert_error(&server.post(PASSWORD, Some(&alice.access_token), json!({"new_password": ""})).await, 400, "M_WEAK_PASSWORD");
        assert_error(&server.post(PASSWORD, None, json!({"new_password": "x"})).await, 401, "M_MISSING_TOKEN");
    }

    async fn uia_password_stage_locks_out_after_wrong_passwords(backend) {
        let limits = "[rate_limits]\nenabled = true\n[rate_limits.failed_login_per_account]\nper_second = 0.01\nburst = 2\n";
        let server = TestServer::start_with(backend, limits).await;
        let alice = server.register("alice").await;
        let session = uia_session(&server, DEACTIVATE, &alice.access_token, json!({})).await;
        let mut wrong = password_auth(&alice, &session);
        wrong["password"] = json!("wrong");
        for _ in 0..2 {
            let (status, body) = server.post(DEACTIVATE, Some(&alice.access_token), json!({"auth": wrong})).await;
            assert_eq!((status.as_u16(), body["errcode"].as_str()), (401, Some("M_FORBIDDEN")), "{body}");
        }
        // The right password during the lockout is refused too, and nothing is deactivated.
        let locked = server.post(DEACTIVATE, Some(&alice.access_token), json!({"auth": password_auth(&alice, &session)})).await;
        assert_error(&locked, 429, "M_LIMIT_EXCEEDED");
        assert!(locked.1["retry_after_ms"].as_u64().is_some_and(|ms| ms > 0), "{}", locked.1);
        assert_eq!(server.get(WHOAMI, Some(&alice.access_token)).await.0, 200);
        // Login shares the per-account budget.
        assert_error(&server.login("alice", &alice.password, json!({})).await, 429, "M_LIMIT_EXCEEDED");
    }
}
