//! Sending events, state, redactions, edits, reactions, threads and relations, and reading
//! history (`/messages`, `/context`, `/event`, `/timestamp_to_event`) with visibility rules.

use serde_json::{Value, json};

use crate::harness::{Account, Backend, TestServer, assert_error, backend_tests, enc, two_users_in_a_room};

fn room_path(room: &str, rest: &str) -> String {
    format!("/_matrix/client/v3/rooms/{}/{rest}", enc(room))
}

async fn get_event(server: &TestServer, account: &Account, room: &str, event_id: &str) -> (reqwest::StatusCode, Value) {
    server.get(&room_path(room, &format!("event/{}", enc(event_id))), Some(&account.access_token)).await
}

async fn messages(server: &TestServer, account: &Account, room: &str, query: &str) -> Value {
    let (status, body) =
        server.get(&format!("{}?{query}", room_path(room, "messages")), Some(&account.access_token)).await;
    assert_eq!(status, 200, "{body}");
    body
}

fn bodies(chunk: &Value) -> Vec<String> {
    chunk
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "m.room.message")
        .map(|e| e["content"]["body"].as_str().unwrap_or("").to_owned())
        .collect()
}

backend_tests! {
    async fn sends_are_idempotent_per_transaction(backend) {
        let server = TestServer::start(backend).await;
        let (alice, _bob, room) = two_users_in_a_room(&server).await;
        let path = room_path(&room, "send/m.room.message/txn-1");
        let content = json!({"msgtype": "m.text", "body": "once"});
        let (_, first) = server.put(&path, Some(&alice.access_token), content.clone()).await;
        let (_, second) = server.put(&path, Some(&alice.access_token), content.clone()).await;
        assert_eq!(first["event_id"], second["event_id"]);
        let page = messages(&server, &alice, &room, "dir=b&limit=50").await;
        assert_eq!(bodies(&page["chunk"]), vec!["once"]);
        // The sender's own device sees the transaction ID.
        let (_, event) = get_event(&server, &alice, &room, first["event_id"].as_str().unwrap()).await;
        assert_eq!(event["unsigned"]["transaction_id"], "txn-1");
        // Another device of the same user reusing the ID sends a new event.
        let (_, other) = server.login("alice", &alice.password, json!({})).await;
        let (_, third) = server.put(&path, other["access_token"].as_str(), content).await;
        assert_ne!(third["event_id"], first["event_id"]);
    }

    async fn any_event_type_and_content_passes_through(backend) {
        let server = TestServer::start(backend).await;
        let (alice, bob, room) = two_users_in_a_room(&server).await;
        let content = json!({"msgtype": "m.text", "body": "**hi** 🎉", "format": "org.matrix.custom.html",
            "formatted_body": "<b>hi</b> 🎉", "org.example.extra": {"nested": [1, 2, {"deep": true}]}});
        let id = server.send(&alice, &room, "m.room.message", content.clone()).await;
        let (_, event) = get_event(&server, &bob, &room, &id).await;
        assert_eq!(event["content"], content);
        assert_eq!(event["sender"], alice.user_id);
        assert_eq!(event["room_id"], room);
        let custom = server.send(&alice, &room, "org.example.custom.event", json!({"anything": "goes"})).await;
        assert_eq!(get_event(&server, &bob, &room, &custom).await.1["type"], "org.example.custom.event");
        let image = server.send(&alice, &room, "m.room.message", json!({"msgtype": "m.image", "body": "cat.png", "url": "mxc://localhost/cat", "info": {"mimetype": "image/png", "w": 10, "h": 10}})).await;
        assert_eq!(get_event(&server, &bob, &room, &image).await.1["content"]["url"], "mxc://localhost/cat");
        let sticker = server.send(&alice, &room, "m.sticker", json!({"body": "wave", "url": "mxc://localhost/wave", "info": {}})).await;
        assert_eq!(get_event(&server, &bob, &room, &sticker).await.1["type"], "m.sticker");
    }

    async fn bad_sends_store_nothing(backend) {
        let server = TestServer::start(backend).await;
        let (alice, _bob, room) = two_users_in_a_room(&server).await;
        let outsider = server.register("outsider").await;
        let big = json!({"msgtype": "m.text", "body": "x".repeat(70_000)});
        assert_error(&server.put(&room_path(&room, "send/m.room.message/a"), Some(&alice.access_token), big).await, 413, "M_TOO_LARGE");
        assert_error(&server.put(&room_path(&room, "send/m.room.message/b"), Some(&alice.access_token), json!({"body": 1.5})).await, 400, "M_BAD_JSON");
        assert_error(&server.request_raw(reqwest::Method::PUT, &room_path(&room, "send/m.room.message/c"), Some(&alice.access_token), b"[1]".to_vec()).await, 400, "M_BAD_JSON");
        assert_error(&server.put(&room_path(&room, "send/m.room.message/d"), Some(&outsider.access_token), json!({"body": "hi"})).await, 403, "M_FORBIDDEN");
        assert_error(&server.put("/_matrix/client/v3/rooms/%21nope%3Alocalhost/send/m.room.message/e", Some(&alice.access_token), json!({"body": "hi"})).await, 404, "M_NOT_FOUND");
        assert_error(&server.put(&room_path(&room, "send/m.room.create/f"), Some(&alice.access_token), json!({})).await, 403, "M_FORBIDDEN");
        let page = messages(&server, &alice, &room, "dir=b&limit=50").await;
        assert!(bodies(&page["chunk"]).is_empty(), "{page}");
        assert_error(&get_event(&server, &alice, &room, "$unknown").await, 404, "M_NOT_FOUND");
    }

    async fn state_is_enforced_by_power_levels(backend) {
        let server = TestServer::start(backend).await;
        let (alice, bob, room) = two_users_in_a_room(&server).await;
        assert_error(&server.set_state(&bob, &room, "m.room.name", "", json!({"name": "Bob's"})).await, 403, "M_FORBIDDEN");
        let (status, first) = server.set_state(&alice, &room, "m.room.name", "", json!({"name": "Alice's"})).await;
        assert_eq!(status, 200);
        let (_, again) = server.set_state(&alice, &room, "m.room.name", "", json!({"name": "Alice's"})).await;
        assert_eq!(first["event_id"], again["event_id"], "identical state is not stored twice");
        let (_, name) = server.get(&room_path(&room, "state/m.room.name/"), Some(&bob.access_token)).await;
        assert_eq!(name, json!({"name": "Alice's"}));
        let (_, as_event) = server.get(&format!("{}?format=event", room_path(&room, "state/m.room.name/")), Some(&bob.access_token)).await;
        assert_eq!(as_event["event_id"], first["event_id"]);
        let (_, all) = server.get(&room_path(&room, "state"), Some(&bob.access_token)).await;
        let types: Vec<&str> = all.as_array().unwrap().iter().map(|e| e["type"].as_str().unwrap()).collect();
        for wanted in ["m.room.create", "m.room.power_levels", "m.room.join_rules", "m.room.name", "m.room.member"] {
            assert!(types.contains(&wanted), "{wanted} missing from {types:?}");
        }
        assert_error(&server.get(&room_path(&room, "state/m.room.topic/"), Some(&bob.access_token)).await, 404, "M_NOT_FOUND");
        // Give bob power and he may.
        let (_, mut levels) = server.get(&room_path(&room, "state/m.room.power_levels/"), Some(&alice.access_token)).await;
        levels["users"][&bob.user_id] = json!(50);
        assert_eq!(server.set_state(&alice, &room, "m.room.power_levels", "", levels).await.0, 200);
        assert_eq!(server.set_state(&bob, &room, "m.room.name", "", json!({"name": "Bob's"})).await.0, 200);
        // Canonical aliases must exist and point here.
        assert_error(&server.set_state(&alice, &room, "m.room.canonical_alias", "", json!({"alias": "#nope:localhost"})).await, 400, "M_BAD_ALIAS");
    }

    async fn redactions(backend) {
        let server = TestServer::start(backend).await;
        let (alice, bob, room) = two_users_in_a_room(&server).await;
        let bobs = server.send_text(&bob, &room, "bob's secret").await;
        let alices = server.send_text(&alice, &room, "alice's").await;
        // Bob may not redact alice's message; alice (admin) may redact bob's; bob may redact his own.
        assert_error(&server.put(&room_path(&room, &format!("redact/{}/r1", enc(&alices))), Some(&bob.access_token), json!({})).await, 403, "M_FORBIDDEN");
        let (status, redaction) = server.put(&room_path(&room, &format!("redact/{}/r2", enc(&bobs))), Some(&alice.access_token), json!({"reason": "oops"})).await;
        assert_eq!(status, 200);
        let (_, again) = server.put(&room_path(&room, &format!("redact/{}/r2", enc(&bobs))), Some(&alice.access_token), json!({"reason": "oops"})).await;
        assert_eq!(redaction["event_id"], again["event_id"], "redactions are idempotent per transaction");
        let (_, redacted) = get_event(&server, &bob, &room, &bobs).await;
        assert_eq!(redacted["content"], json!({}));
        assert_eq!(redacted["unsigned"]["redacted_because"]["event_id"], redaction["event_id"]);
        assert_eq!(redacted["unsigned"]["redacted_because"]["content"]["reason"], "oops");
        assert_error(&server.put(&room_path(&room, "redact/%24missing/r3"), Some(&alice.access_token), json!({})).await, 404, "M_NOT_FOUND");
    }

    async fn edits_are_bundled_and_listed_as_relations(backend) {
        let server = TestServer::start(backend).await;
        let (alice, bob, room) = two_users_in_a_room(&server).await;
        let original = server.send_text(&alice, &room, "helo").await;
        let edit = |body: &str| json!({"msgtype": "m.text", "body": format!("* {body}"), "m.new_content": {"msgtype": "m.text", "body": body},
            "m.relates_to": {"rel_type": "m.replace", "event_id": original}});
        server.send(&alice, &room, "m.room.message", edit("hello")).await;
        let latest = server.send(&alice, &room, "m.room.message", edit("hello!")).await;
        // An "edit" by someone else is not an edit.
        server.send(&bob, &room, "m.room.message", edit("hijacked")).await;
        let (_, event) = get_event(&server, &bob, &room, &original).await;
        assert_eq!(event["unsigned"]["m.relations"]["m.replace"]["event_id"], latest, "{event}");
        let rel = |suffix: &str| format!("/_matrix/client/v1/rooms/{}/relations/{}{suffix}", enc(&room), enc(&original));
        let (_, all) = server.get(&rel(""), Some(&bob.access_token)).await;
        assert_eq!(all["chunk"].as_array().unwrap().len(), 3);
        let (_, typed) = server.get(&rel("/m.replace/m.room.message"), Some(&bob.access_token)).await;
        assert_eq!(typed["chunk"].as_array().unwrap().len(), 3);
        // Pagination: two pages of two, then one, newest first.
        let (_, page1) = server.get(&format!("{}?limit=2", rel("/m.replace")), Some(&bob.access_token)).await;
        assert_eq!(page1["chunk"].as_array().unwrap().len(), 2);
        let next = page1["next_batch"].as_str().unwrap();
        let (_, page2) = server.get(&format!("{}?limit=2&from={}", rel("/m.replace"), enc(next)), Some(&bob.access_token)).await;
        assert_eq!(page2["chunk"].as_array().unwrap().len(), 1);
        assert!(page2.get("next_batch").is_none() || page2["next_batch"].is_null());
        let mut seen: Vec<&str> = page1["chunk"].as_array().unwrap().iter().chain(page2["chunk"].as_array().unwrap()).map(|e| e["event_id"].as_str().unwrap()).collect();
        seen.dedup();
        assert_eq!(seen.len(), 3);
    }

    async fn reactions_are_one_per_user_and_key(backend) {
        let server = TestServer::start(backend).await;
        let (alice, bob, room) = two_users_in_a_room(&server).await;
        let message = server.send_text(&alice, &room, "react to me").await;
        let reaction = json!({"m.relates_to": {"rel_type": "m.annotation", "event_id": message, "key": "👍"}});
        let first = server.send(&bob, &room, "m.reaction", reaction.clone()).await;
        let dup = server.put(&room_path(&room, "send/m.reaction/dup"), Some(&bob.access_token), reaction.clone()).await;
        assert_error(&dup, 400, "M_DUPLICATE_ANNOTATION");
        server.send(&alice, &room, "m.reaction", reaction.clone()).await;
        server.send(&bob, &room, "m.reaction", json!({"m.relates_to": {"rel_type": "m.annotation", "event_id": message, "key": "🎉"}})).await;
        // After redacting the first, the same reaction may be sent again.
        server.put(&room_path(&room, &format!("redact/{}/x", enc(&first))), Some(&bob.access_token), json!({})).await;
        server.send(&bob, &room, "m.reaction", reaction).await;
        let (_, relations) = server
            .get(&format!("/_matrix/client/v1/rooms/{}/relations/{}/m.annotation", enc(&room), enc(&message)), Some(&alice.access_token))
            .await;
        assert_eq!(relations["chunk"].as_array().unwrap().len(), 3, "the redacted reaction is no longer a relation");
    }

    async fn threads_and_summaries(backend) {
        let server = TestServer::start(backend).await;
        let (alice, bob, room) = two_users_in_a_room(&server).await;
        let root = server.send_text(&alice, &room, "thread root").await;
        let other_root = server.send_text(&alice, &room, "another root").await;
        for i in 0..3 {
            server.send(&bob, &room, "m.room.message", json!({"msgtype": "m.text", "body": format!("reply {i}"),
                "m.relates_to": {"rel_type": "m.thread", "event_id": root, "is_falling_back": true, "m.in_reply_to": {"event_id": root}}})).await;
        }
        server.send(&alice, &room, "m.room.message", json!({"msgtype": "m.text", "body": "other reply", "m.relates_to": {"rel_type": "m.thread", "event_id": other_root}})).await;
        let (_, event) = get_event(&server, &alice, &room, &root).await;
        let summary = &event["unsigned"]["m.relations"]["m.thread"];
        assert_eq!(summary["count"], 3, "{event}");
        assert_eq!(summary["latest_event"]["content"]["body"], "reply 2");
        assert_eq!(summary["current_user_participated"], false);
        let threads = |query: &'static str, who: &Account| {
            let (server, room, token) = (&server, room.clone(), who.access_token.clone());
            async move {
                let (status, body) = server.get(&format!("/_matrix/client/v1/rooms/{}/threads?{query}", enc(&room)), Some(&token)).await;
                assert_eq!(status, 200, "{body}");
                body["chunk"].as_array().unwrap().iter().map(|e| e["event_id"].as_str().unwrap().to_owned()).collect::<Vec<_>>()
            }
        };
        assert_eq!(threads("", &alice).await, vec![other_root.clone(), root.clone()], "most recent activity first");
        assert_eq!(threads("include=participated", &bob).await, vec![root.clone()]);
        let (_, page) = server.get(&format!("/_matrix/client/v1/rooms/{}/threads?limit=1", enc(&room)), Some(&alice.access_token)).await;
        assert_eq!(page["chunk"].as_array().unwrap().len(), 1);
        let next = page["next_batch"].as_str().unwrap();
        let (_, page2) = server.get(&format!("/_matrix/client/v1/rooms/{}/threads?limit=1&from={}", enc(&room), enc(next)), Some(&alice.access_token)).await;
        assert_eq!(page2["chunk"][0]["event_id"], root);
    }

    async fn messages_paginate_in_stable_order_both_ways(backend) {
        let server = TestServer::start(backend).await;
        let (alice, bob, room) = two_users_in_a_room(&server).await;
        for i in 0..25 {
            server.send_text(if i % 2 == 0 { &alice } else { &bob }, &room, &format!("m{i}")).await;
        }
        let mut backwards = Vec::new();
        let mut from: Option<String> = None;
        for _ in 0..20 {
            let query = match &from { Some(token) => format!("dir=b&limit=7&from={}", enc(token)), None => "dir=b&limit=7".to_owned() };
            let page = messages(&server, &bob, &room, &query).await;
            backwards.extend(bodies(&page["chunk"]));
            match page["end"].as_str() {
                Some(end) => from = Some(end.to_owned()),
                None => break,
            }
        }
        let expected: Vec<String> = (0..25).rev().map(|i| format!("m{i}")).collect();
        assert_eq!(backwards, expected);
        let mut forwards = Vec::new();
        let mut from: Option<String> = None;
        for _ in 0..20 {
            let query = match &from { Some(token) => format!("dir=f&limit=10&from={}", enc(token)), None => "dir=f&limit=10".to_owned() };
            let page = messages(&server, &bob, &room, &query).await;
            forwards.extend(bodies(&page["chunk"]));
            match page["end"].as_str() {
                Some(end) => from = Some(end.to_owned()),
                None => break,
            }
        }
        assert_eq!(forwards, (0..25).map(|i| format!("m{i}")).collect::<Vec<_>>());
        // Filters: only bob's messages; lazy-loaded members come with the chunk.
        let filter = enc(&json!({"senders": [bob.user_id], "types": ["m.room.message"], "lazy_load_members": true}).to_string());
        let page = messages(&server, &alice, &room, &format!("dir=b&limit=5&filter={filter}")).await;
        assert_eq!(bodies(&page["chunk"]), vec!["m23", "m21", "m19", "m17", "m15"]);
        let state = page["state"].as_array().unwrap();
        assert!(state.iter().any(|e| e["type"] == "m.room.member" && e["state_key"] == bob.user_id), "{page}");
        // A `to` token bounds the range.
        let all = messages(&server, &alice, &room, "dir=b&limit=100").await;
        assert!(all.get("end").is_none() || all["end"].is_null(), "everything fit: no end token");
        assert_error(&server.get(&format!("{}?dir=b&from=garbage", room_path(&room, "messages")), Some(&alice.access_token)).await, 400, "M_INVALID_PARAM");
    }

    async fn context_around_an_event(backend) {
        let server = TestServer::start(backend).await;
        let (alice, bob, room) = two_users_in_a_room(&server).await;
        let mut ids = Vec::new();
        for i in 0..9 {
            ids.push(server.send_text(&alice, &room, &format!("c{i}")).await);
        }
        let (status, context) = server.get(&format!("{}?limit=4", room_path(&room, &format!("context/{}", enc(&ids[4])))), Some(&bob.access_token)).await;
        assert_eq!(status, 200, "{context}");
        assert_eq!(context["event"]["event_id"], ids[4]);
        assert_eq!(bodies(&context["events_before"]), vec!["c3", "c2"]);
        assert_eq!(bodies(&context["events_after"]), vec!["c5", "c6"]);
        assert!(context["state"].as_array().unwrap().iter().any(|e| e["type"] == "m.room.create"));
        let start = context["start"].as_str().unwrap();
        let earlier = messages(&server, &bob, &room, &format!("dir=b&limit=2&from={}", enc(start))).await;
        assert_eq!(bodies(&earlier["chunk"]), vec!["c1", "c0"]);
        let end = context["end"].as_str().unwrap();
        let later = messages(&server, &bob, &room, &format!("dir=f&limit=2&from={}", enc(end))).await;
        assert_eq!(bodies(&later["chunk"]), vec!["c7", "c8"]);
        assert_error(&server.get(&room_path(&room, "context/%24nope"), Some(&bob.access_token)).await, 404, "M_NOT_FOUND");
    }

    async fn timestamp_to_event_finds_the_closest(backend) {
        let server = TestServer::start(backend).await;
        let (alice, bob, room) = two_users_in_a_room(&server).await;
        let first = server.send_text(&alice, &room, "early").await;
        let (_, event) = get_event(&server, &bob, &room, &first).await;
        let ts = event["origin_server_ts"].as_u64().unwrap();
        let path = format!("/_matrix/client/v1/rooms/{}/timestamp_to_event", enc(&room));
        let (status, found) = server.get(&format!("{path}?ts={ts}&dir=f"), Some(&bob.access_token)).await;
        assert_eq!(status, 200, "{found}");
        assert_eq!(found["origin_server_ts"].as_u64().unwrap(), ts);
        let (_, later) = server.get(&format!("{path}?ts={}&dir=b", ts + 10_000_000), Some(&bob.access_token)).await;
        assert!(later["event_id"].is_string());
        assert_error(&server.get(&format!("{path}?ts=1&dir=b"), Some(&bob.access_token)).await, 404, "M_NOT_FOUND");
    }

    async fn history_visibility_joined_hides_earlier_events(backend) {
        let server = TestServer::start(backend).await;
        let alice = server.register("alice").await;
        let bob = server.register("bob").await;
        let room = server
            .create_room(&alice, json!({"preset": "public_chat", "initial_state": [{"type": "m.room.history_visibility", "content": {"history_visibility": "joined"}}]}))
            .await;
        let before = server.send_text(&alice, &room, "before bob").await;
        server.join(&bob, &room).await;
        server.send_text(&alice, &room, "after bob").await;
        let page = messages(&server, &bob, &room, "dir=b&limit=50").await;
        assert_eq!(bodies(&page["chunk"]), vec!["after bob"]);
        assert_error(&get_event(&server, &bob, &room, &before).await, 404, "M_NOT_FOUND");
        // With the default "shared", a new member sees everything.
        let shared = server.create_room(&alice, json!({"preset": "public_chat"})).await;
        server.send_text(&alice, &shared, "old news").await;
        server.join(&bob, &shared).await;
        assert_eq!(bodies(&messages(&server, &bob, &shared, "dir=b&limit=50").await["chunk"]), vec!["old news"]);
        // Outsiders of a non-world-readable room see nothing.
        let carol = server.register("carol").await;
        assert_error(&server.get(&format!("{}?dir=b", room_path(&shared, "messages")), Some(&carol.access_token)).await, 403, "M_FORBIDDEN");
    }

    async fn left_users_read_up_to_their_leave(backend) {
        let server = TestServer::start(backend).await;
        let (alice, bob, room) = two_users_in_a_room(&server).await;
        server.send_text(&alice, &room, "while bob was here").await;
        server.post(&room_path(&room, "leave"), Some(&bob.access_token), json!({})).await;
        server.send_text(&alice, &room, "after bob left").await;
        let page = messages(&server, &bob, &room, "dir=b&limit=50").await;
        assert_eq!(bodies(&page["chunk"]), vec!["while bob was here"]);
    }

    async fn ignored_users_disappear(backend) {
        let server = TestServer::start(backend).await;
        let (alice, bob, room) = two_users_in_a_room(&server).await;
        server.put(&format!("/_matrix/client/v3/user/{}/account_data/m.ignored_user_list", enc(&bob.user_id)), Some(&bob.access_token),
            json!({"ignored_users": {alice.user_id.clone(): {}}})).await;
        server.send_text(&alice, &room, "you cannot see me").await;
        server.send_text(&bob, &room, "bob talking").await;
        assert_eq!(bodies(&messages(&server, &bob, &room, "dir=b&limit=50").await["chunk"]), vec!["bob talking"]);
        let sync = server.sync(&bob, None, None, 0).await;
        let texts: Vec<&str> = crate::harness::timeline(&sync, &room).iter().filter(|e| e["type"] == "m.room.message").map(|e| e["content"]["body"].as_str().unwrap()).collect();
        assert_eq!(texts, vec!["bob talking"]);
        // Invites from an ignored user are hidden too.
        let private = server.create_room(&alice, json!({"preset": "private_chat", "invite": [bob.user_id]})).await;
        let sync = server.sync(&bob, None, None, 0).await;
        assert!(sync["rooms"]["invite"].get(&private).is_none(), "{sync}");
    }

    async fn bundled_aggregations_pass_visibility_and_ignore_checks(backend) {
        bundled_aggregations_pass_visibility_and_ignore_checks(backend).await
    }

    async fn history_visibility_change_is_visible_under_the_more_permissive_value(backend) {
        history_visibility_change_is_visible_under_the_more_permissive_value(backend).await
    }

    async fn unsigned_membership_is_the_viewers_membership_at_each_event(backend) {
        unsigned_membership_is_the_viewers_membership_at_each_event(backend).await
    }
}

fn thread_reply(root: &str, body: &str) -> Value {
    json!({"msgtype": "m.text", "body": body, "m.relates_to": {"rel_type": "m.thread", "event_id": root}})
}

fn edit_of(original: &str, body: &str) -> Value {
    json!({"msgtype": "m.text", "body": format!("* {body}"), "m.new_content": {"msgtype": "m.text", "body": body},
        "m.relates_to": {"rel_type": "m.replace", "event_id": original}})
}

async fn ignore(server: &TestServer, who: &Account, ignored: &Account) {
    let path = format!("/_matrix/client/v3/user/{}/account_data/m.ignored_user_list", enc(&who.user_id));
    let (status, body) =
        server.put(&path, Some(&who.access_token), json!({"ignored_users": {ignored.user_id.clone(): {}}})).await;
    assert_eq!(status, 200, "{body}");
}

/// The latest edit and a thread's latest event are bundled only if the viewer could see them
/// on their own: not from an ignored user, not after the viewer left.
async fn bundled_aggregations_pass_visibility_and_ignore_checks(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (alice, bob, room) = two_users_in_a_room(&server).await;
    let dave = server.register("dave").await;
    let erin = server.register("erin").await;
    server.join(&dave, &room).await;
    server.join(&erin, &room).await;
    ignore(&server, &dave, &alice).await;
    // Ignored: alice's edit and alice's (latest) thread reply.
    let root = server.send_text(&alice, &room, "root").await;
    server.send(&alice, &room, "m.room.message", edit_of(&root, "root, edited")).await;
    let bobs_reply = server.send(&bob, &room, "m.room.message", thread_reply(&root, "bob's reply")).await;
    server.send(&alice, &room, "m.room.message", thread_reply(&root, "alice's reply")).await;
    let (status, event) = get_event(&server, &dave, &room, &root).await;
    assert_eq!(status, 200, "{event}");
    let relations = &event["unsigned"]["m.relations"];
    assert!(relations.get("m.replace").is_none(), "an ignored user's edit is bundled: {event}");
    assert_eq!(relations["m.thread"]["latest_event"]["event_id"], bobs_reply, "{event}");
    assert_eq!(relations["m.thread"]["count"], 1, "{event}");
    // Without the ignore, alice's edit and reply are what others see.
    let (_, seen_by_bob) = get_event(&server, &bob, &room, &root).await;
    assert_eq!(seen_by_bob["unsigned"]["m.relations"]["m.replace"]["content"]["body"], "* root, edited");
    assert_eq!(seen_by_bob["unsigned"]["m.relations"]["m.thread"]["count"], 2);
    // After leaving: no edit or thread reply made since is bundled.
    let message = server.send_text(&bob, &room, "before erin left").await;
    assert_eq!(server.post(&room_path(&room, "leave"), Some(&erin.access_token), json!({})).await.0, 200);
    server.send(&bob, &room, "m.room.message", edit_of(&message, "edited after erin left")).await;
    server.send(&bob, &room, "m.room.message", thread_reply(&message, "reply after erin left")).await;
    let page = messages(&server, &erin, &room, "dir=b&limit=50").await;
    let served =
        page["chunk"].as_array().unwrap().iter().find(|e| e["event_id"] == message).expect("erin saw the message");
    assert!(served["unsigned"].get("m.relations").is_none(), "later relations bundled: {served}");
    let (_, single) = get_event(&server, &erin, &room, &message).await;
    assert!(single["unsigned"].get("m.relations").is_none(), "later relations bundled: {single}");
    let (_, seen_by_bob) = get_event(&server, &bob, &room, &message).await;
    assert_eq!(seen_by_bob["unsigned"]["m.relations"]["m.thread"]["count"], 1, "{seen_by_bob}");
}

/// The spec: a user may see an `m.room.history_visibility` event if the value before or after
/// it lets them.
async fn history_visibility_change_is_visible_under_the_more_permissive_value(backend: Backend) {
    let server = TestServer::start(backend).await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let room = server.create_room(&alice, json!({"preset": "public_chat"})).await;
    server.send_text(&alice, &room, "shared history").await;
    let (status, change) =
        server.set_state(&alice, &room, "m.room.history_visibility", "", json!({"history_visibility": "joined"})).await;
    assert_eq!(status, 200, "{change}");
    server.send_text(&alice, &room, "for members only").await;
    server.join(&bob, &room).await;
    let page = messages(&server, &bob, &room, "dir=b&limit=50").await;
    assert_eq!(bodies(&page["chunk"]), vec!["shared history"]);
    let change_id = change["event_id"].as_str().unwrap();
    assert!(page["chunk"].as_array().unwrap().iter().any(|e| e["event_id"] == change_id), "{page}");
    assert_eq!(get_event(&server, &bob, &room, change_id).await.0, 200);
}

fn membership_in<'a>(chunk: &'a Value, event_id: &str) -> &'a Value {
    let event = chunk
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["event_id"] == event_id)
        .unwrap_or_else(|| panic!("{event_id} missing: {chunk}"));
    &event["unsigned"]["membership"]
}

/// `unsigned.membership` (spec v1.11): the requesting user's membership at each event,
/// including changes the event makes, `leave` before they ever joined.
async fn unsigned_membership_is_the_viewers_membership_at_each_event(backend: Backend) {
    let server = TestServer::start(backend).await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let room = server.create_room(&alice, json!({"preset": "public_chat"})).await;
    let before = server.send_text(&alice, &room, "before bob").await;
    server.invite(&alice, &room, &bob.user_id).await;
    let while_invited = server.send_text(&alice, &room, "while bob is invited").await;
    server.join(&bob, &room).await;
    let after = server.send_text(&alice, &room, "after bob joined").await;
    let page = messages(&server, &bob, &room, "dir=b&limit=50").await;
    assert_eq!(*membership_in(&page["chunk"], &before), "leave");
    assert_eq!(*membership_in(&page["chunk"], &while_invited), "invite");
    assert_eq!(*membership_in(&page["chunk"], &after), "join");
    let own_join = page["chunk"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["type"] == "m.room.member" && e["state_key"] == bob.user_id && e["content"]["membership"] == "join")
        .unwrap();
    assert_eq!(own_join["unsigned"]["membership"], "join", "the event's own change counts");
    let (_, single) = get_event(&server, &bob, &room, &before).await;
    assert_eq!(single["unsigned"]["membership"], "leave", "{single}");
    let (status, context) = server
        .get(
            &format!("{}?limit=10", room_path(&room, &format!("context/{}", enc(&while_invited)))),
            Some(&bob.access_token),
        )
        .await;
    assert_eq!(status, 200, "{context}");
    assert_eq!(context["event"]["unsigned"]["membership"], "invite");
    assert_eq!(*membership_in(&context["events_before"], &before), "leave");
    assert_eq!(*membership_in(&context["events_after"], &after), "join");
    let sync = server.sync(&bob, None, None, 0).await;
    let timeline = crate::harness::timeline(&sync, &room);
    let synced = timeline.iter().find(|e| e["event_id"] == after).expect("in bob's timeline");
    assert_eq!(synced["unsigned"]["membership"], "join", "{synced}");
    // After leaving, the leave itself says so.
    assert_eq!(server.post(&room_path(&room, "leave"), Some(&bob.access_token), json!({})).await.0, 200);
    let page = messages(&server, &bob, &room, "dir=b&limit=1").await;
    assert_eq!(page["chunk"][0]["content"]["membership"], "leave");
    assert_eq!(page["chunk"][0]["unsigned"]["membership"], "leave");
}
