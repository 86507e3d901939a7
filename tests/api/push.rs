//! Push rules, pushers, the notification list and pushes to a real HTTP push gateway (a small
//! server the test runs on loopback that records what it is told).

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{Json, Router, extract::State, http::StatusCode, routing::post};
use serde_json::{Value, json};

use crate::harness::{TestServer, assert_error, backend_tests, enc};

/// Pushes go out quickly in tests, to loopback gateways.
const PUSH_CONFIG: &str = "[push]\nallowed_ip_ranges = [\"127.0.0.0/8\"]\ncoalesce_ms = 300\n";

/// A push gateway on loopback: it records every notification and answers with the scripted
/// status codes first (then 200), rejecting the pushkeys in `reject`.
#[derive(Clone, Default)]
struct Gateway {
    seen: Arc<Mutex<Vec<Value>>>,
    script: Arc<Mutex<VecDeque<u16>>>,
    reject: Arc<Mutex<Vec<String>>>,
    attempts: Arc<Mutex<usize>>,
}

impl Gateway {
    async fn start() -> (Gateway, String) {
        let gateway = Gateway::default();
        async fn notify(State(gw): State<Gateway>, Json(body): Json<Value>) -> (StatusCode, Json<Value>) {
            *gw.attempts.lock().unwrap() += 1;
            if let Some(status) = gw.script.lock().unwrap().pop_front() {
                return (StatusCode::from_u16(status).unwrap(), Json(json!({})));
            }
            let keys: Vec<String> = body["notification"]["devices"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|d| d["pushkey"].as_str().map(str::to_owned))
                .collect();
            let rejected: Vec<String> = keys.into_iter().filter(|k| gw.reject.lock().unwrap().contains(k)).collect();
            gw.seen.lock().unwrap().push(body);
            (StatusCode::OK, Json(json!({ "rejected": rejected })))
        }
        let app = Router::new().route("/_matrix/push/v1/notify", post(notify)).with_state(gateway.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/_matrix/push/v1/notify", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (gateway, url)
    }

    fn seen(&self) -> Vec<Value> {
        self.seen.lock().unwrap().clone()
    }

    /// Notifications about events (badge updates left out).
    fn event_pushes(&self) -> Vec<Value> {
        self.seen().into_iter().filter(|n| n["notification"]["event_id"].is_string()).collect()
    }

    /// Waits until `count` event pushes arrived (at most 20 s).
    async fn wait_for(&self, count: usize) -> Vec<Value> {
        for _ in 0..200 {
            let pushes = self.event_pushes();
            if pushes.len() >= count {
                return pushes;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("expected {count} pushes, the gateway saw {:?}", self.seen());
    }
}

fn pusher(url: &str, pushkey: &str, format: Option<&str>) -> Value {
    let mut data = json!({ "url": url, "extra": "kept" });
    if let Some(format) = format {
        data["format"] = json!(format);
    }
    json!({
        "kind": "http", "app_id": "org.example.app", "pushkey": pushkey, "app_display_name": "Example",
        "device_display_name": "Phone", "lang": "en", "data": data,
    })
}

fn rule_ids(rules: &Value, kind: &str) -> Vec<String> {
    rules["global"][kind].as_array().unwrap().iter().map(|r| r["rule_id"].as_str().unwrap().to_owned()).collect()
}

fn unread(sync: &Value, room: &str) -> (u64, u64) {
    let counts = &sync["rooms"]["join"][room]["unread_notifications"];
    (counts["notification_count"].as_u64().unwrap_or(0), counts["highlight_count"].as_u64().unwrap_or(0))
}

backend_tests! {
    async fn push_rules_are_the_server_defaults(backend) {
        let server = TestServer::start(backend).await;
        let alice = server.register("alice").await;
        let token = Some(alice.access_token.as_str());
        assert_error(&server.get("/_matrix/client/v3/pushrules/", None).await, 401, "M_MISSING_TOKEN");

        let (status, all) = server.get("/_matrix/client/v3/pushrules/", token).await;
        assert_eq!(status, 200, "{all}");
        let global = &all["global"];
        // The spec's predefined rules, in its order.
        assert_eq!(rule_ids(&all, "override")[..2], [".m.rule.master".to_owned(), ".m.rule.suppress_notices".to_owned()]);
        for id in [".m.rule.is_user_mention", ".m.rule.is_room_mention", ".m.rule.member_event"] {
            assert!(rule_ids(&all, "override").contains(&id.to_owned()), "{id}");
        }
        for id in [".m.rule.message", ".m.rule.encrypted_room_one_to_one", ".m.rule.room_one_to_one", ".m.rule.encrypted"] {
            assert!(rule_ids(&all, "underride").contains(&id.to_owned()), "{id}");
        }
        assert_eq!(global["override"][0]["enabled"], false, "the master rule is off by default");
        assert!(global["override"].as_array().unwrap().iter().all(|r| r["default"] == true));
        let mention = global["override"].as_array().unwrap().iter().find(|r| r["rule_id"] == ".m.rule.is_user_mention").unwrap();
        assert!(mention["conditions"].to_string().contains("@alice:localhost"), "{mention}");

        let (status, scope) = server.get("/_matrix/client/v3/pushrules/global/", token).await;
        assert_eq!(status, 200);
        assert_eq!(&scope, global);
        let (status, rule) = server.get("/_matrix/client/v3/pushrules/global/underride/.m.rule.message", token).await;
        assert_eq!(status, 200, "{rule}");
        assert_eq!(rule["actions"], json!(["notify"]));
        let (status, enabled) = server.get("/_matrix/client/v3/pushrules/global/override/.m.rule.master/enabled", token).await;
        assert_eq!((status.as_u16(), enabled), (200, json!({"enabled": false})));
        assert_error(&server.get("/_matrix/client/v3/pushrules/global/override/.m.rule.nope", token).await, 404, "M_NOT_FOUND");
        assert_error(&server.get("/_matrix/client/v3/pushrules/global/sideways/.m.rule.message", token).await, 404, "M_NOT_FOUND");

        // An initial sync carries them as account data, as clients expect.
        let sync = server.sync(&alice, None, None, 0).await;
        let event = sync["account_data"]["events"].as_array().unwrap().iter().find(|e| e["type"] == "m.push_rules").cloned();
        assert_eq!(event.map(|e| e["content"]["global"].clone()), Some(global.clone()));
    }

    async fn push_rules_are_written_ordered_and_kept(backend) {
        let mut server = TestServer::start(backend).await;
        let alice = server.register("alice").await;
        let token = Some(alice.access_token.as_str());
        let rules = "/_matrix/client/v3/pushrules/global";
        let since = server.sync(&alice, None, None, 0).await["next_batch"].as_str().unwrap().to_owned();

        // Content rules need a pattern; new rules go first in their kind unless placed.
        let put = |path: String, body: Value| {
            let server = &server;
            async move { server.put(&path, token, body).await }
        };
        assert_eq!(put(format!("{rules}/content/cake"), json!({"pattern": "cake", "actions": ["notify", {"set_tweak": "highlight"}]})).await.0, 200);
        assert_eq!(put(format!("{rules}/content/pie"), json!({"pattern": "pie", "actions": ["notify"]})).await.0, 200);
        assert_eq!(put(format!("{rules}/content/tart?after=pie"), json!({"pattern": "tart", "actions": []})).await.0, 200);
        assert_eq!(put(format!("{rules}/content/scone?before=pie"), json!({"pattern": "scone", "actions": ["notify"]})).await.0, 200);
        let (_, all) = server.get("/_matrix/client/v3/pushrules/", token).await;
        let content = rule_ids(&all, "content");
        assert_eq!(content[..4], ["scone", "pie", "tart", "cake"].map(str::to_owned), "{content:?}");

        // Room and sender rules, actions and enabled.
        let room_rule = format!("{rules}/room/{}", enc("!quiet:localhost"));
        assert_eq!(put(room_rule.clone(), json!({"actions": []})).await.0, 200);
        assert_eq!(put(format!("{room_rule}/actions"), json!({"actions": ["notify", {"set_tweak": "sound", "value": "bell"}]})).await.0, 200);
        assert_eq!(put(format!("{room_rule}/enabled"), json!({"enabled": false})).await.0, 200);
        let (status, rule) = server.get(&room_rule, token).await;
        assert_eq!(status, 200, "{rule}");
        assert_eq!(rule["enabled"], false);
        assert_eq!(rule["actions"], json!(["notify", {"set_tweak": "sound", "value": "bell"}]));
        assert_eq!(put(format!("{rules}/override/.m.rule.suppress_notices/enabled"), json!({"enabled": false})).await.0, 200);
        assert_eq!(put(format!("{rules}/underride/.m.rule.message/actions"), json!({"actions": []})).await.0, 200);

        // Refusals.
        assert_error(&put(format!("{rules}/content/nopattern"), json!({"actions": []})).await, 400, "M_MISSING_PARAM");
        assert_error(&put(format!("{rules}/override/.m.rule.mine"), json!({"actions": [], "conditions": []})).await, 400, "M_INVALID_PARAM");
        assert_error(&put(format!("{rules}/content/x?before=nothing"), json!({"pattern": "x", "actions": []})).await, 404, "M_NOT_FOUND");
        assert_error(&put(format!("{rules}/content/nothing/enabled"), json!({"enabled": true})).await, 404, "M_NOT_FOUND");
        assert_error(&put(format!("{rules}/content/nothing/actions"), json!({"actions": []})).await, 404, "M_NOT_FOUND");
        assert_error(&server.delete(&format!("{rules}/override/.m.rule.master"), token, json!({})).await, 400, "M_INVALID_PARAM");
        assert_error(&server.delete(&format!("{rules}/content/nothing"), token, json!({})).await, 404, "M_NOT_FOUND");
        assert_eq!(server.delete(&format!("{rules}/content/tart"), token, json!({})).await.0, 200);
        assert_error(&server.get(&format!("{rules}/content/tart"), token).await, 404, "M_NOT_FOUND");

        // The change reaches the user's other devices as account data.
        let sync = server.sync(&alice, Some(&since), None, 0).await;
        let event = sync["account_data"]["events"].as_array().unwrap().iter().find(|e| e["type"] == "m.push_rules").cloned().expect("m.push_rules in sync");
        assert_eq!(rule_ids(&event["content"], "content")[..3], ["scone", "pie", "cake"].map(str::to_owned));
        // The account data API cannot bypass the rules API.
        let direct = server.put("/_matrix/client/v3/user/%40alice%3Alocalhost/account_data/m.push_rules", token, json!({"global": {}})).await;
        assert_eq!(direct.0, 400, "{direct:?}");

        // They survive a restart.
        server.restart();
        let (_, after) = server.get("/_matrix/client/v3/pushrules/", token).await;
        assert_eq!(rule_ids(&after, "content")[..3], ["scone", "pie", "cake"].map(str::to_owned));
        let message = after["global"]["underride"].as_array().unwrap().iter().find(|r| r["rule_id"] == ".m.rule.message").unwrap().clone();
        assert_eq!(message["actions"], json!([]));
        let room = after["global"]["room"].as_array().unwrap()[0].clone();
        assert_eq!((room["rule_id"].as_str(), room["enabled"].as_bool()), (Some("!quiet:localhost"), Some(false)));
    }

    async fn the_users_rules_make_the_unread_counts(backend) {
        let server = TestServer::start(backend).await;
        let alice = server.register("alice").await;
        let bob = server.register("bob").await;
        let carol = server.register("carol").await;
        let token = Some(alice.access_token.as_str());
        let rules = "/_matrix/client/v3/pushrules/global";
        // A group room (three members, so the one-to-one rules do not apply) and a DM.
        let group = server.create_room(&bob, json!({"preset": "public_chat", "name": "Group"})).await;
        server.join(&alice, &group).await;
        server.join(&carol, &group).await;
        let dm = server.create_room(&bob, json!({"preset": "trusted_private_chat", "invite": ["@alice:localhost"], "is_direct": true})).await;
        server.join(&alice, &dm).await;

        let counts = |sync: Value, room: &str| unread(&sync, room);
        server.send_text(&bob, &group, "plain message").await;
        server.send(&bob, &group, "m.room.message", json!({"msgtype": "m.text", "body": "hey alice", "m.mentions": {"user_ids": ["@alice:localhost"]}})).await;
        server.send(&bob, &group, "m.room.message", json!({"msgtype": "m.notice", "body": "a bot notice"})).await;
        server.send(&bob, &dm, "m.room.encrypted", json!({"algorithm": "m.megolm.v1.aes-sha2", "ciphertext": "x", "sender_key": "k", "session_id": "s", "device_id": "D"})).await;
        let sync = server.sync(&alice, None, None, 0).await;
        // Message + mention notify (the mention highlights); the notice is suppressed.
        assert_eq!(counts(sync.clone(), &group), (2, 1));
        // An encrypted one-to-one message notifies.
        assert_eq!(counts(sync.clone(), &dm), (1, 0));

        // A keyword rule highlights; a room rule silences a room; disabling the message rule
        // leaves only what other rules match.
        server.put(&format!("{rules}/content/cake"), token, json!({"pattern": "cake", "actions": ["notify", {"set_tweak": "highlight"}]})).await;
        server.send_text(&carol, &group, "who wants cake?").await;
        let sync = server.sync(&alice, None, None, 0).await;
        assert_eq!(counts(sync.clone(), &group), (3, 2));
        server.put(&format!("{rules}/room/{}", enc(&dm)), token, json!({"actions": []})).await;
        server.send_text(&bob, &dm, "psst").await;
        let sync = server.sync(&alice, None, None, 0).await;
        assert_eq!(counts(sync.clone(), &dm), (0, 0), "a dont-notify room rule counts nothing");
        server.put(&format!("{rules}/underride/.m.rule.message/enabled"), token, json!({"enabled": false})).await;
        server.send_text(&bob, &group, "another plain one").await;
        let sync = server.sync(&alice, None, None, 0).await;
        // Counts are made with the rules of now: the plain messages no longer count at all.
        assert_eq!(counts(sync.clone(), &group), (2, 2), "plain messages no longer count");

        // A read receipt clears the room's counts.
        let last = server.send_text(&carol, &group, "cake again").await;
        assert_eq!(counts(server.sync(&alice, None, None, 0).await, &group), (3, 3));
        let receipt = server.post(&format!("/_matrix/client/v3/rooms/{}/receipt/m.read/{}", enc(&group), enc(&last)), token, json!({})).await;
        assert_eq!(receipt.0, 200);
        assert_eq!(counts(server.sync(&alice, None, None, 0).await, &group), (0, 0));

        // The notification list: what notified, newest first, read or not.
        server.send_text(&bob, &group, "more cake").await;
        let (status, list) = server.get("/_matrix/client/v3/notifications?limit=3", token).await;
        assert_eq!(status, 200, "{list}");
        let items = list["notifications"].as_array().unwrap();
        assert_eq!(items.len(), 3, "{list}");
        assert_eq!(items[0]["event"]["content"]["body"], "more cake");
        assert_eq!(items[0]["read"], false);
        assert_eq!(items[0]["room_id"], group.as_str());
        assert!(items[0]["actions"].to_string().contains("highlight"), "{list}");
        assert_eq!(items[1]["event"]["content"]["body"], "cake again");
        assert_eq!(items[1]["read"], true);
        let next = list["next_token"].as_str().expect("a next page").to_owned();
        let (_, rest) = server.get(&format!("/_matrix/client/v3/notifications?from={next}"), token).await;
        let bodies: Vec<&str> = rest["notifications"].as_array().unwrap().iter().filter_map(|n| n["event"]["content"]["body"].as_str()).collect();
        assert!(bodies.contains(&"hey alice") && !bodies.contains(&"more cake"), "{rest}");
        let (_, highlights) = server.get("/_matrix/client/v3/notifications?only=highlight", token).await;
        assert!(highlights["notifications"].as_array().unwrap().iter().all(|n| n["actions"].to_string().contains("highlight")));
        assert_error(&server.get("/_matrix/client/v3/notifications?from=nonsense", token).await, 400, "M_INVALID_PARAM");
    }

    async fn pushers_are_set_listed_replaced_and_removed(backend) {
        let mut server = TestServer::start_with(backend, PUSH_CONFIG).await;
        let alice = server.register("alice").await;
        let bob = server.register("bob").await;
        let token = Some(alice.access_token.as_str());
        let url = "http://127.0.0.1:9/_matrix/push/v1/notify";
        let (status, body) = server.get("/_matrix/client/v3/pushers", token).await;
        assert_eq!((status.as_u16(), body), (200, json!({"pushers": []})));
        assert_error(&server.get("/_matrix/client/v3/pushers", None).await, 401, "M_MISSING_TOKEN");

        assert_eq!(server.post("/_matrix/client/v3/pushers/set", token, pusher(url, "key1", None)).await.0, 200);
        assert_eq!(server.post("/_matrix/client/v3/pushers/set", token, pusher(url, "key2", Some("event_id_only"))).await.0, 200);
        let (_, listed) = server.get("/_matrix/client/v3/pushers", token).await;
        let pushers = listed["pushers"].as_array().unwrap();
        assert_eq!(pushers.len(), 2, "{listed}");
        assert_eq!(pushers[0]["pushkey"], "key1");
        assert_eq!(pushers[0]["data"]["url"], url);
        assert_eq!(pushers[0]["data"]["extra"], "kept");
        assert_eq!(pushers[1]["data"]["format"], "event_id_only");
        assert_eq!(pushers[0]["kind"], "http");

        // Updating keeps one pusher per (app, key).
        let mut renamed = pusher(url, "key1", None);
        renamed["device_display_name"] = json!("Tablet");
        server.post("/_matrix/client/v3/pushers/set", token, renamed).await;
        let (_, listed) = server.get("/_matrix/client/v3/pushers", token).await;
        assert_eq!(listed["pushers"].as_array().unwrap().len(), 2);
        assert_eq!(listed["pushers"][0]["device_display_name"], "Tablet");

        // Another user taking the pushkey takes it from alice, unless they append.
        let bob_token = Some(bob.access_token.as_str());
        let mut appended = pusher(url, "key2", None);
        appended["append"] = json!(true);
        server.post("/_matrix/client/v3/pushers/set", bob_token, appended).await;
        assert_eq!(server.get("/_matrix/client/v3/pushers", token).await.1["pushers"].as_array().unwrap().len(), 2);
        server.post("/_matrix/client/v3/pushers/set", bob_token, pusher(url, "key1", None)).await;
        let (_, listed) = server.get("/_matrix/client/v3/pushers", token).await;
        assert_eq!(listed["pushers"].as_array().unwrap().iter().map(|p| p["pushkey"].clone()).collect::<Vec<_>>(), vec![json!("key2")]);

        // Refusals.
        let bad = |mut p: Value, change: &dyn Fn(&mut Value)| { change(&mut p); p };
        for body in [
            bad(pusher("http://127.0.0.1:9/notify", "k", None), &|_| {}),
            bad(pusher("not a url", "k", None), &|_| {}),
            bad(pusher(url, "", None), &|_| {}),
            bad(pusher(url, "k", None), &|p| p["kind"] = json!("email")),
        ] {
            let response = server.post("/_matrix/client/v3/pushers/set", token, body.clone()).await;
            assert_eq!(response.0, 400, "{body} → {response:?}");
        }
        let no_url = server.post("/_matrix/client/v3/pushers/set", token, bad(pusher(url, "k", None), &|p| p["data"] = json!({}))).await;
        assert_eq!(no_url.0, 400, "{no_url:?}");

        // Kept across a restart; deleted with `kind: null`.
        server.restart();
        assert_eq!(server.get("/_matrix/client/v3/pushers", token).await.1["pushers"].as_array().unwrap().len(), 1);
        let delete = server.post("/_matrix/client/v3/pushers/set", token, json!({"kind": null, "app_id": "org.example.app", "pushkey": "key2"})).await;
        assert_eq!(delete.0, 200, "{delete:?}");
        assert_eq!(server.get("/_matrix/client/v3/pushers", token).await.1, json!({"pushers": []}));

        // Logging out a device removes its pushers.
        let (_, bob_listed) = server.get("/_matrix/client/v3/pushers", bob_token).await;
        assert_eq!(bob_listed["pushers"].as_array().unwrap().len(), 2);
        assert_eq!(server.post("/_matrix/client/v3/logout", bob_token, json!({})).await.0, 200);
        let bob2 = server.login_device(&bob, "OTHER").await;
        assert_eq!(server.get("/_matrix/client/v3/pushers", Some(&bob2.access_token)).await.1, json!({"pushers": []}));
    }

    async fn the_gateway_is_told_what_notifies(backend) {
        let server = TestServer::start_with(backend, PUSH_CONFIG).await;
        let (gateway, url) = Gateway::start().await;
        let alice = server.register("alice").await;
        let bob = server.register("bob").await;
        let carol = server.register("carol").await;
        let token = Some(alice.access_token.as_str());
        let room = server.create_room(&bob, json!({"preset": "public_chat", "name": "Bakery"})).await;
        server.join(&alice, &room).await;
        server.join(&carol, &room).await;
        assert_eq!(server.post("/_matrix/client/v3/pushers/set", token, pusher(&url, "phone", None)).await.0, 200);

        // A message notifies: the full format, with counts, tweaks and the pusher's data.
        let first = server.send_text(&bob, &room, "fresh bread").await;
        let pushes = gateway.wait_for(1).await;
        let n = &pushes[0]["notification"];
        assert_eq!(n["event_id"], first.as_str());
        assert_eq!(n["room_id"], room.as_str());
        assert_eq!(n["type"], "m.room.message");
        assert_eq!(n["sender"], "@bob:localhost");
        assert_eq!(n["sender_display_name"], "bob");
        assert_eq!(n["room_name"], "Bakery");
        assert_eq!(n["content"]["body"], "fresh bread");
        assert_eq!(n["user_is_target"], false);
        assert_eq!(n["prio"], "low");
        assert_eq!(n["counts"]["unread"], 1);
        let device = &n["devices"][0];
        assert_eq!((device["app_id"].as_str(), device["pushkey"].as_str()), (Some("org.example.app"), Some("phone")));
        assert_eq!(device["data"], json!({"extra": "kept"}), "the URL is not sent back");
        assert!(device["pushkey_ts"].as_u64().unwrap() > 1_600_000_000);
        // Alice's own messages and notices never push.
        server.send_text(&alice, &room, "my own").await;
        server.send(&bob, &room, "m.room.message", json!({"msgtype": "m.notice", "body": "notice"})).await;

        // A mention is a highlight, pushed with high priority and the highlight tweak.
        let mention = server.send(&carol, &room, "m.room.message", json!({"msgtype": "m.text", "body": "alice!", "m.mentions": {"user_ids": ["@alice:localhost"]}})).await;
        let pushes = gateway.wait_for(2).await;
        assert_eq!(pushes.len(), 2, "{pushes:?}");
        let n = &pushes[1]["notification"];
        assert_eq!(n["event_id"], mention.as_str());
        assert_eq!(n["prio"], "high");
        assert_eq!(n["devices"][0]["tweaks"]["highlight"], true);
        assert_eq!(n["devices"][0]["tweaks"]["sound"], "default");
        assert_eq!(n["counts"]["unread"], 2);
        // The count the gateway was told is the one sync shows.
        let sync = server.sync(&alice, None, None, 0).await;
        assert_eq!(unread(&sync, &room), (2, 1));

        // Reading clears the badge: a counts-only push.
        let receipt = server.post(&format!("/_matrix/client/v3/rooms/{}/receipt/m.read/{}", enc(&room), enc(&mention)), token, json!({})).await;
        assert_eq!(receipt.0, 200);
        for _ in 0..100 {
            if gateway.seen().iter().any(|n| n["notification"]["counts"]["unread"] == 0 && n["notification"]["event_id"].is_null()) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(gateway.seen().iter().any(|n| n["notification"]["counts"]["unread"] == 0 && n["notification"]["event_id"].is_null()), "{:?}", gateway.seen());

        // A burst in a room is one push, of its latest message.
        for i in 0..5 {
            server.send_text(&bob, &room, &format!("burst {i}")).await;
        }
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let pushes = gateway.event_pushes();
        assert_eq!(pushes.len(), 3, "{pushes:?}");
        assert_eq!(pushes[2]["notification"]["content"]["body"], "burst 4");
        assert_eq!(pushes[2]["notification"]["counts"]["unread"], 5);

        // event_id_only: ids and counts, no content.
        server.post("/_matrix/client/v3/pushers/set", token, json!({"kind": null, "app_id": "org.example.app", "pushkey": "phone"})).await;
        server.post("/_matrix/client/v3/pushers/set", token, pusher(&url, "slim", Some("event_id_only"))).await;
        let slim = server.send_text(&bob, &room, "quiet").await;
        let pushes = gateway.wait_for(4).await;
        let n = &pushes[3]["notification"];
        assert_eq!(n["event_id"], slim.as_str());
        assert!(n.get("content").is_none() && n.get("sender").is_none() && n.get("type").is_none(), "{n}");
        assert_eq!(n["counts"]["unread"], 6);
        assert_eq!(n["devices"][0]["data"]["format"], "event_id_only");
    }

    async fn pushes_are_retried_and_rejected_pushkeys_removed(backend) {
        let server = TestServer::start_with(backend, PUSH_CONFIG).await;
        let (gateway, url) = Gateway::start().await;
        let alice = server.register("alice").await;
        let bob = server.register("bob").await;
        let token = Some(alice.access_token.as_str());
        let room = server.create_room(&bob, json!({"preset": "public_chat"})).await;
        server.join(&alice, &room).await;
        server.post("/_matrix/client/v3/pushers/set", token, pusher(&url, "flaky", None)).await;

        // Two failures (a 500 and a 503), then it gets through.
        gateway.script.lock().unwrap().extend([500, 503]);
        let event = server.send_text(&bob, &room, "are you there").await;
        let pushes = gateway.wait_for(1).await;
        assert_eq!(pushes[0]["notification"]["event_id"], event.as_str());
        assert_eq!(*gateway.attempts.lock().unwrap(), 3);

        // A pushkey the gateway rejects is removed.
        gateway.reject.lock().unwrap().push("flaky".to_owned());
        server.send_text(&bob, &room, "again").await;
        gateway.wait_for(2).await;
        for _ in 0..50 {
            if server.get("/_matrix/client/v3/pushers", token).await.1 == json!({"pushers": []}) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(server.get("/_matrix/client/v3/pushers", token).await.1, json!({"pushers": []}));
        server.send_text(&bob, &room, "nobody hears this").await;
        tokio::time::sleep(Duration::from_millis(1200)).await;
        assert_eq!(gateway.event_pushes().len(), 2);
    }

    async fn a_device_that_is_syncing_gets_no_push_for_what_it_received(backend) {
        let server = TestServer::start_with(backend, "[push]\nallowed_ip_ranges = [\"127.0.0.0/8\"]\ncoalesce_ms = 1500\n").await;
        let (gateway, url) = Gateway::start().await;
        let alice = server.register("alice").await;
        let bob = server.register("bob").await;
        let token = Some(alice.access_token.as_str());
        let room = server.create_room(&bob, json!({"preset": "public_chat"})).await;
        server.join(&alice, &room).await;
        server.post("/_matrix/client/v3/pushers/set", token, pusher(&url, "live", None)).await;

        // Alice's device long-polls: it gets the message at once and acknowledges it with its
        // next request's `since`, well within the wait before a push.
        let since = server.sync(&alice, None, None, 0).await["next_batch"].as_str().unwrap().to_owned();
        let poll = {
            let url = server.url(&format!("/_matrix/client/v3/sync?timeout=10000&since={}", enc(&since)));
            let token = alice.access_token.clone();
            tokio::spawn(async move {
                let http = reqwest::Client::new();
                http.get(url).bearer_auth(token).send().await.unwrap().json::<Value>().await.unwrap()
            })
        };
        tokio::time::sleep(Duration::from_millis(200)).await;
        server.send_text(&bob, &room, "seen live").await;
        let (_, token) = server
            .sync_until(&alice, Some(since), |r| r["rooms"]["join"][&room]["timeline"].to_string().contains("seen live"))
            .await;
        let _ = server.sync(&alice, Some(&token), None, 0).await;
        let _ = poll.await.unwrap();
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert_eq!(gateway.event_pushes().len(), 0, "the syncing device got it: {:?}", gateway.seen());

        // Once it stops syncing, the next message is pushed.
        let missed = server.send_text(&bob, &room, "while away").await;
        let pushes = gateway.wait_for(1).await;
        assert_eq!(pushes[0]["notification"]["event_id"], missed.as_str());
    }

    async fn thread_counts_clear_with_their_own_receipts(backend) {
        let server = TestServer::start(backend).await;
        let alice = server.register("alice").await;
        let bob = server.register("bob").await;
        let carol = server.register("carol").await;
        let token = Some(alice.access_token.as_str());
        let room = server.create_room(&bob, json!({"preset": "public_chat"})).await;
        server.join(&alice, &room).await;
        server.join(&carol, &room).await;
        let reply = |root: &str, body: &str, mention: bool| {
            let mut content = json!({"msgtype": "m.text", "body": body, "m.relates_to": {
                "rel_type": "m.thread", "event_id": root, "is_falling_back": true, "m.in_reply_to": {"event_id": root}}});
            if mention {
                content["m.mentions"] = json!({"user_ids": ["@alice:localhost"]});
            }
            content
        };
        let root = server.send_text(&bob, &room, "root of a thread").await;
        server.send(&carol, &room, "m.room.message", reply(&root, "first reply", false)).await;
        let second = server.send(&carol, &room, "m.room.message", reply(&root, "second reply, alice?", true)).await;
        let other_root = server.send_text(&bob, &room, "another root").await;
        server.send(&bob, &room, "m.room.message", reply(&other_root, "other thread reply", false)).await;

        let threaded = r#"{"room":{"timeline":{"unread_thread_notifications":true}}}"#;
        let thread_counts = |sync: &Value, root: &str| {
            let counts = &sync["rooms"]["join"][&room]["unread_thread_notifications"][root];
            (counts["notification_count"].as_u64().unwrap_or(0), counts["highlight_count"].as_u64().unwrap_or(0))
        };
        // Asked for, threads are counted apart from the main timeline; otherwise all in one.
        let sync = server.sync(&alice, None, Some(threaded), 0).await;
        assert_eq!(unread(&sync, &room), (2, 0), "{}", sync["rooms"]["join"][&room]);
        assert_eq!(thread_counts(&sync, &root), (2, 1));
        assert_eq!(thread_counts(&sync, &other_root), (1, 0));
        assert_eq!(unread(&server.sync(&alice, None, None, 0).await, &room), (5, 1));

        // A receipt in one thread clears that thread only.
        let receipt = |event: String, thread: Option<String>| {
            let server = &server;
            let room = &room;
            async move {
                let body = thread.map_or(json!({}), |t| json!({"thread_id": t}));
                server.post(&format!("/_matrix/client/v3/rooms/{}/receipt/m.read/{}", enc(room), enc(&event)), token, body).await
            }
        };
        assert_eq!(receipt(second.clone(), Some(root.clone())).await.0, 200);
        let sync = server.sync(&alice, None, Some(threaded), 0).await;
        assert_eq!(unread(&sync, &room), (2, 0));
        assert_eq!(thread_counts(&sync, &root), (0, 0));
        assert!(sync["rooms"]["join"][&room]["unread_thread_notifications"].get(&root).is_none(), "a read thread is left out");
        assert_eq!(thread_counts(&sync, &other_root), (1, 0));
        assert_eq!(unread(&server.sync(&alice, None, None, 0).await, &room), (3, 0));

        // A main-timeline receipt clears the main timeline, not the threads.
        assert_eq!(receipt(other_root.clone(), Some("main".to_owned())).await.0, 200);
        let sync = server.sync(&alice, None, Some(threaded), 0).await;
        assert_eq!(unread(&sync, &room), (0, 0));
        assert_eq!(thread_counts(&sync, &other_root), (1, 0));

        // New replies count again; an unthreaded receipt clears everything before it.
        let third = server.send(&carol, &room, "m.room.message", reply(&root, "third reply", false)).await;
        let sync = server.sync(&alice, None, Some(threaded), 0).await;
        assert_eq!(thread_counts(&sync, &root), (1, 0));
        assert_eq!(receipt(third, None).await.0, 200);
        let sync = server.sync(&alice, None, Some(threaded), 0).await;
        assert_eq!(unread(&sync, &room), (0, 0));
        assert!(sync["rooms"]["join"][&room].get("unread_thread_notifications").is_none(), "{}", sync["rooms"]["join"][&room]);

        // The notification list knows which were read, per thread.
        server.send(&carol, &room, "m.room.message", reply(&root, "fourth reply", false)).await;
        let (_, list) = server.get("/_matrix/client/v3/notifications?limit=2", token).await;
        let items = list["notifications"].as_array().unwrap();
        assert_eq!((items[0]["event"]["content"]["body"].as_str(), items[0]["read"].as_bool()), (Some("fourth reply"), Some(false)), "{list}");
        assert_eq!((items[1]["event"]["content"]["body"].as_str(), items[1]["read"].as_bool()), (Some("third reply"), Some(true)), "{list}");
    }
}
