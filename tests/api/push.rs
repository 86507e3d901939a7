//! Push rules and pushers (read only for now: the server-default rules, no pushers).

use serde_json::json;

use crate::harness::{TestServer, assert_error, backend_tests};

backend_tests! {
    async fn push_rules_are_the_server_defaults(backend) {
        let server = TestServer::start(backend).await;
        let alice = server.register("alice").await;
        let token = Some(alice.access_token.as_str());
        assert_error(&server.get("/_matrix/client/v3/pushrules/", None).await, 401, "M_MISSING_TOKEN");

        let (status, all) = server.get("/_matrix/client/v3/pushrules/", token).await;
        assert_eq!(status, 200, "{all}");
        let global = &all["global"];
        let ids = |kind: &str| -> Vec<String> {
            global[kind].as_array().unwrap().iter().map(|r| r["rule_id"].as_str().unwrap().to_owned()).collect()
        };
        // The spec's predefined rules, in its order.
        assert_eq!(ids("override")[..2], [".m.rule.master".to_owned(), ".m.rule.suppress_notices".to_owned()]);
        assert!(ids("override").contains(&".m.rule.is_user_mention".to_owned()));
        assert!(ids("underride").contains(&".m.rule.message".to_owned()));
        assert_eq!(global["override"][0]["enabled"], false, "the master rule is off by default");
        assert!(global["override"].as_array().unwrap().iter().all(|r| r["default"] == true));
        // The user-mention rule names this user.
        let mention = global["override"].as_array().unwrap().iter().find(|r| r["rule_id"] == ".m.rule.is_user_mention").unwrap();
        assert!(mention["conditions"].to_string().contains("@alice:localhost"), "{mention}");

        let (status, scope) = server.get("/_matrix/client/v3/pushrules/global/", token).await;
        assert_eq!(status, 200);
        assert_eq!(&scope, global);

        let (status, rule) = server.get("/_matrix/client/v3/pushrules/global/underride/.m.rule.message", token).await;
        assert_eq!(status, 200, "{rule}");
        assert_eq!(rule["rule_id"], ".m.rule.message");
        assert_eq!(rule["actions"], json!(["notify"]));
        let (status, enabled) = server.get("/_matrix/client/v3/pushrules/global/override/.m.rule.master/enabled", token).await;
        assert_eq!((status.as_u16(), enabled), (200, json!({"enabled": false})));
        let (status, actions) = server.get("/_matrix/client/v3/pushrules/global/underride/.m.rule.message/actions", token).await;
        assert_eq!((status.as_u16(), actions), (200, json!({"actions": ["notify"]})));

        assert_error(&server.get("/_matrix/client/v3/pushrules/global/override/.m.rule.nope", token).await, 404, "M_NOT_FOUND");
        assert_error(&server.get("/_matrix/client/v3/pushrules/global/sideways/.m.rule.message", token).await, 404, "M_NOT_FOUND");
        assert_error(&server.get("/_matrix/client/v3/pushrules/global/underride/.m.rule.message/actions", None).await, 401, "M_MISSING_TOKEN");
        // Writing is not implemented yet: unrouted rather than silently dropped.
        let put = server.put("/_matrix/client/v3/pushrules/global/room/!r:localhost", token, json!({"actions": []})).await;
        assert!(matches!(put.0.as_u16(), 404 | 405), "{put:?}");
        assert_eq!(put.1["errcode"], "M_UNRECOGNIZED");
    }

    async fn pushers_are_empty(backend) {
        let server = TestServer::start(backend).await;
        let alice = server.register("alice").await;
        let (status, body) = server.get("/_matrix/client/v3/pushers", Some(&alice.access_token)).await;
        assert_eq!((status.as_u16(), body), (200, json!({"pushers": []})));
        assert_error(&server.get("/_matrix/client/v3/pushers", None).await, 401, "M_MISSING_TOKEN");
    }
}
