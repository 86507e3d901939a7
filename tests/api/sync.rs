//! `/sync`: initial and incremental, long-poll wake-ups, limited timelines, filters, sections,
//! summaries, unread counts, typing, receipts, presence, account data, to-device, device lists.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{Value, json};

use crate::harness::{Backend, TestServer, backend_tests, enc, message_ids, timeline, two_users_in_a_room};

fn ephemeral<'a>(sync: &'a Value, room: &str, event_type: &str) -> Option<&'a Value> {
    sync["rooms"]["join"][room]["ephemeral"]["events"].as_array()?.iter().find(|e| e["type"] == event_type)
}

backend_tests! {
    async fn initial_then_incremental(backend) {
        let server = TestServer::start(backend).await;
        let (alice, bob, room) = two_users_in_a_room(&server).await;
        let first = server.send_text(&alice, &room, "one").await;
        let initial = server.sync(&bob, None, None, 0).await;
        let room_sync = &initial["rooms"]["join"][&room];
        assert!(message_ids(&timeline(&initial, &room)).contains(&first));
        assert_eq!(room_sync["summary"]["m.joined_member_count"], 2);
        assert!(room_sync["timeline"]["prev_batch"].is_string());
        let since = initial["next_batch"].as_str().unwrap().to_owned();
        // Nothing new: an incremental sync with timeout 0 is empty.
                let empty = server.sync(&bob, Some(&since), None, 0).await;
        assert!(timeline(&empty, &room).is_empty(), "{empty}");
        let second = server.send_text(&alice, &room, "two").await;
        let (next, _) = server.sync_until(&bob, Some(since), |s| !timeline(s, &room).is_empty()).await;
        assert_eq!(message_ids(&timeline(&next, &room)), vec![second]);
    }

    async fn long_poll_returns_when_an_event_arrives(backend) {
        let server = TestServer::start(backend).await;
        let (alice, bob, room) = two_users_in_a_room(&server).await;
        let initial = server.sync(&bob, None, None, 0).await["next_batch"].as_str().unwrap().to_owned();
        // Confirming the initial sync records bob's delivered receipt for alice's events, which
        // his own devices see too: that answer comes at once, so take it before the long-poll.
        let since = server.sync(&bob, Some(&initial), None, 0).await["next_batch"].as_str().unwrap().to_owned();
        let started = Instant::now();
        let waiter = {
            let url = server.url(&format!("/_matrix/client/v3/sync?timeout=30000&since={}", enc(&since)));
            let client = server.http.clone();
            let token = bob.access_token.clone();
            tokio::spawn(async move { client.get(url).bearer_auth(token).send().await.unwrap().json::<Value>().await.unwrap() })
        };
        tokio::time::sleep(Duration::from_millis(200)).await;
        let sent = server.send_text(&alice, &room, "wake up").await;
        let response = waiter.await.unwrap();
        assert!(started.elapsed() < Duration::from_secs(25), "the long-poll returned because of the event, not its timeout");
        assert_eq!(message_ids(&timeline(&response, &room)), vec![sent]);
    }

    async fn limited_timeline_and_prev_batch_pagination(backend) {
        let server = TestServer::start(backend).await;
        let (alice, bob, room) = two_users_in_a_room(&server).await;
        let since = server.sync(&bob, None, None, 0).await["next_batch"].as_str().unwrap().to_owned();
        server.set_state(&alice, &room, "m.room.topic", "", json!({"topic": "gap topic"})).await;
        for i in 0..15 {
            server.send_text(&alice, &room, &format!("n{i}")).await;
        }
        let filter = r#"{"room":{"timeline":{"limit":5}}}"#;
        let sync = server.sync(&bob, Some(&since), Some(filter), 0).await;
        let room_sync = &sync["rooms"]["join"][&room];
        assert_eq!(room_sync["timeline"]["limited"], true);
        let bodies: Vec<&str> = timeline(&sync, &room).iter().map(|e| e["content"]["body"].as_str().unwrap()).collect();
        assert_eq!(bodies, vec!["n10", "n11", "n12", "n13", "n14"]);
        // The topic changed in the gap, so it is in `state`.
        let state = room_sync["state"]["events"].as_array().unwrap();
        assert!(state.iter().any(|e| e["type"] == "m.room.topic" && e["content"]["topic"] == "gap topic"), "{room_sync}");
        let prev = room_sync["timeline"]["prev_batch"].as_str().unwrap();
        let (_, page) = server.get(&format!("/_matrix/client/v3/rooms/{}/messages?dir=b&limit=3&from={}", enc(&room), enc(prev)), Some(&bob.access_token)).await;
        let earlier: Vec<&str> = page["chunk"].as_array().unwrap().iter().map(|e| e["content"]["body"].as_str().unwrap()).collect();
        assert_eq!(earlier, vec!["n9", "n8", "n7"]);
    }

    async fn filters_stored_and_inline(backend) {
        let server = TestServer::start(backend).await;
        let (alice, bob, room) = two_users_in_a_room(&server).await;
        let other = server.create_room(&alice, json!({"preset": "public_chat"})).await;
        server.join(&bob, &other).await;
        server.send(&alice, &room, "org.example.noise", json!({})).await;
        server.send_text(&alice, &room, "signal").await;
        server.send_text(&bob, &room, "from bob").await;
        let definition = json!({"room": {"rooms": [room], "timeline": {"types": ["m.room.message"], "not_senders": [bob.user_id], "limit": 10},
            "state": {"lazy_load_members": true}}, "presence": {"not_types": ["*"]}});
        let (status, created) = server.post(&format!("/_matrix/client/v3/user/{}/filter", enc(&bob.user_id)), Some(&bob.access_token), definition.clone()).await;
        assert_eq!(status, 200);
        let filter_id = created["filter_id"].as_str().unwrap().to_owned();
        let (_, stored) = server.get(&format!("/_matrix/client/v3/user/{}/filter/{}", enc(&bob.user_id), filter_id), Some(&bob.access_token)).await;
        assert_eq!(stored["room"]["rooms"], definition["room"]["rooms"]);
        for filter in [filter_id.clone(), definition.to_string()] {
            let sync = server.sync(&bob, None, Some(&filter), 0).await;
            assert!(sync["rooms"]["join"].get(&other).is_none(), "rooms filter");
            let bodies: Vec<&str> = timeline(&sync, &room).iter().map(|e| e["content"]["body"].as_str().unwrap()).collect();
            assert_eq!(bodies, vec!["signal"]);
            // Lazy loading: only the members of senders in view (plus the syncing user).
            let members: Vec<&str> = sync["rooms"]["join"][&room]["state"]["events"].as_array().unwrap().iter()
                .filter(|e| e["type"] == "m.room.member").map(|e| e["state_key"].as_str().unwrap()).collect();
            assert!(members.contains(&alice.user_id.as_str()), "{members:?}");
            assert!(sync["presence"]["events"].as_array().unwrap().is_empty());
        }
        crate::harness::assert_error(&server.get(&format!("/_matrix/client/v3/user/{}/filter/999", enc(&bob.user_id)), Some(&bob.access_token)).await, 404, "M_NOT_FOUND");
        crate::harness::assert_error(&server.get("/_matrix/client/v3/sync?filter=%7Bnot-json", Some(&bob.access_token)).await, 400, "M_NOT_JSON");
        crate::harness::assert_error(&server.get("/_matrix/client/v3/sync?since=bogus", Some(&bob.access_token)).await, 400, "M_INVALID_PARAM");
    }

    async fn full_state_and_state_before_timeline(backend) {
        let server = TestServer::start(backend).await;
        let (alice, bob, room) = two_users_in_a_room(&server).await;
        let since = server.sync(&bob, None, None, 0).await["next_batch"].as_str().unwrap().to_owned();
        server.send_text(&alice, &room, "x").await;
        let (status, sync) = server.get(&format!("/_matrix/client/v3/sync?full_state=true&since={}", enc(&since)), Some(&bob.access_token)).await;
        assert_eq!(status, 200);
        let state = sync["rooms"]["join"][&room]["state"]["events"].as_array().unwrap();
        assert!(state.iter().any(|e| e["type"] == "m.room.create"));
        assert!(state.iter().any(|e| e["type"] == "m.room.power_levels"));
    }

    async fn leave_and_invite_sections(backend) {
        let server = TestServer::start(backend).await;
        let (alice, bob, room) = two_users_in_a_room(&server).await;
        let since = server.sync(&bob, None, None, 0).await["next_batch"].as_str().unwrap().to_owned();
        server.post(&format!("/_matrix/client/v3/rooms/{}/kick", enc(&room)), Some(&alice.access_token), json!({"user_id": bob.user_id})).await;
        let (sync, since) = server.sync_until(&bob, Some(since), |s| s["rooms"]["leave"].get(&room).is_some()).await;
        let left = &sync["rooms"]["leave"][&room];
        assert!(left["timeline"]["events"].as_array().unwrap().iter().any(|e| e["type"] == "m.room.member" && e["content"]["membership"] == "leave"));
        server.invite(&alice, &room, &bob.user_id).await;
        let (sync, _) = server.sync_until(&bob, Some(since), |s| s["rooms"]["invite"].get(&room).is_some()).await;
        assert!(sync["rooms"]["invite"][&room]["invite_state"]["events"].as_array().unwrap().iter().any(|e| e["type"] == "m.room.join_rules"));
    }

    async fn summary_heroes_for_unnamed_rooms(backend) {
        let server = TestServer::start(backend).await;
        let alice = server.register("alice").await;
        let bob = server.register("bob").await;
        let carol = server.register("carol").await;
        let room = server.create_room(&alice, json!({"preset": "private_chat", "invite": [bob.user_id, carol.user_id]})).await;
        server.join(&bob, &room).await;
        let sync = server.sync(&alice, None, None, 0).await;
        let summary = &sync["rooms"]["join"][&room]["summary"];
        assert_eq!(summary["m.joined_member_count"], 2);
        assert_eq!(summary["m.invited_member_count"], 1);
        assert_eq!(summary["m.heroes"], json!([bob.user_id, carol.user_id]));
    }

    async fn unread_counts_and_highlights(backend) {
        let server = TestServer::start(backend).await;
        let (alice, bob, room) = two_users_in_a_room(&server).await;
        server.send_text(&alice, &room, "one").await;
        server.send_text(&alice, &room, "two").await;
        let mention = server
            .send(&alice, &room, "m.room.message", json!({"msgtype": "m.text", "body": "hey bob", "m.mentions": {"user_ids": [bob.user_id]}}))
            .await;
        let sync = server.sync(&bob, None, None, 0).await;
        let counts = &sync["rooms"]["join"][&room]["unread_notifications"];
        assert_eq!(counts["notification_count"], 3, "{counts}");
        assert_eq!(counts["highlight_count"], 1);
        server.post(&format!("/_matrix/client/v3/rooms/{}/receipt/m.read/{}", enc(&room), enc(&mention)), Some(&bob.access_token), json!({})).await;
        let sync = server.sync(&bob, None, None, 0).await;
        let counts = &sync["rooms"]["join"][&room]["unread_notifications"];
        assert_eq!((counts["notification_count"].as_u64(), counts["highlight_count"].as_u64()), (Some(0), Some(0)));
    }

    async fn typing_notifications_and_expiry(backend) {
        let server = TestServer::start(backend).await;
        let (alice, bob, room) = two_users_in_a_room(&server).await;
        let since = server.sync(&alice, None, None, 0).await["next_batch"].as_str().unwrap().to_owned();
        let typing_path = format!("/_matrix/client/v3/rooms/{}/typing/{}", enc(&room), enc(&bob.user_id));
        assert_eq!(server.put(&typing_path, Some(&bob.access_token), json!({"typing": true, "timeout": 1500})).await.0, 200);
        let (sync, since) = server
            .sync_until(&alice, Some(since), |s| ephemeral(s, &room, "m.typing").is_some_and(|t| !t["content"]["user_ids"].as_array().unwrap().is_empty()))
            .await;
        assert_eq!(ephemeral(&sync, &room, "m.typing").unwrap()["content"]["user_ids"], json!([bob.user_id]));
        // The timeout expires on its own.
        server
            .sync_until(&alice, Some(since), |s| ephemeral(s, &room, "m.typing").is_some_and(|t| t["content"]["user_ids"].as_array().unwrap().is_empty()))
            .await;
        // Typing for someone else or in a room one is not in is refused.
        crate::harness::assert_error(&server.put(&format!("/_matrix/client/v3/rooms/{}/typing/{}", enc(&room), enc(&alice.user_id)), Some(&bob.access_token), json!({"typing": true, "timeout": 1000})).await, 403, "M_FORBIDDEN");
    }

    async fn typing_timer_expiry_refresh_and_stop(backend) {
        let server = TestServer::start(backend).await;
        let (alice, bob, room) = two_users_in_a_room(&server).await;
        let path = format!("/_matrix/client/v3/rooms/{}/typing/{}", enc(&room), enc(&bob.user_id));
        let users = |s: &Value| ephemeral(s, &room, "m.typing").map(|t| t["content"]["user_ids"].clone());
        let mut since = server.sync(&alice, None, None, 0).await["next_batch"].as_str().unwrap().to_owned();
        // Expires at the requested timeout (not before it), through the one sweeper.
        let started = Instant::now();
        assert_eq!(server.put(&path, Some(&bob.access_token), json!({"typing": true, "timeout": 1000})).await.0, 200);
        (_, since) = server.sync_until(&alice, Some(since), |s| users(s) == Some(json!([bob.user_id]))).await;
        (_, since) = server.sync_until(&alice, Some(since), |s| users(s) == Some(json!([]))).await;
        assert!(started.elapsed() >= Duration::from_millis(900), "expired early: {:?}", started.elapsed());
        // A refresh before expiry extends it: a 1.5 s timeout refreshed with 4 s outlives 1.5 s.
        let refreshed = Instant::now();
        assert_eq!(server.put(&path, Some(&bob.access_token), json!({"typing": true, "timeout": 1500})).await.0, 200);
        assert_eq!(server.put(&path, Some(&bob.access_token), json!({"typing": true, "timeout": 4000})).await.0, 200);
        (_, since) = server.sync_until(&alice, Some(since), |s| users(s) == Some(json!([bob.user_id]))).await;
        (_, since) = server.sync_until(&alice, Some(since), |s| users(s) == Some(json!([]))).await;
        assert!(refreshed.elapsed() >= Duration::from_millis(3500), "refresh did not extend: {:?}", refreshed.elapsed());
        // Stopping clears at once, long before the 60 s timeout; the stale deadline does nothing.
        assert_eq!(server.put(&path, Some(&bob.access_token), json!({"typing": true, "timeout": 60000})).await.0, 200);
        (_, since) = server.sync_until(&alice, Some(since), |s| users(s) == Some(json!([bob.user_id]))).await;
        let stopped = Instant::now();
        assert_eq!(server.put(&path, Some(&bob.access_token), json!({"typing": false})).await.0, 200);
        server.sync_until(&alice, Some(since), |s| users(s) == Some(json!([]))).await;
        assert!(stopped.elapsed() < Duration::from_secs(30), "stop took {:?}", stopped.elapsed());
    }

    async fn receipts_public_private_and_threaded(backend) {
        let server = TestServer::start(backend).await;
        let (alice, bob, room) = two_users_in_a_room(&server).await;
        let first = server.send_text(&alice, &room, "read me").await;
        let second = server.send_text(&alice, &room, "and me").await;
        let since = server.sync(&alice, None, None, 0).await["next_batch"].as_str().unwrap().to_owned();
        let receipt = |kind: &str, event: &str| format!("/_matrix/client/v3/rooms/{}/receipt/{kind}/{}", enc(&room), enc(event));
        assert_eq!(server.post(&receipt("m.read", &second), Some(&bob.access_token), json!({"thread_id": "main"})).await.0, 200);
        assert_eq!(server.post(&receipt("m.read.private", &second), Some(&bob.access_token), json!({})).await.0, 200);
        let (sync, _) = server.sync_until(&alice, Some(since), |s| ephemeral(s, &room, "m.receipt").is_some()).await;
        let content = &ephemeral(&sync, &room, "m.receipt").unwrap()["content"];
        assert_eq!(content[&second]["m.read"][&bob.user_id]["thread_id"], "main");
        assert!(content[&second].get("m.read.private").is_none(), "private receipts stay private: {content}");
        let bob_sync = server.sync(&bob, None, None, 0).await;
        let own = &ephemeral(&bob_sync, &room, "m.receipt").unwrap()["content"];
        assert!(own[&second]["m.read.private"].get(&bob.user_id).is_some(), "{own}");
        // Receipts never move backwards.
        server.post(&receipt("m.read", &first), Some(&bob.access_token), json!({"thread_id": "main"})).await;
        let again = server.sync(&alice, None, None, 0).await;
        let content = &ephemeral(&again, &room, "m.receipt").unwrap()["content"];
        assert!(content.get(&first).is_none(), "{content}");
        // Read markers: m.fully_read lands in room account data.
        let markers = format!("/_matrix/client/v3/rooms/{}/read_markers", enc(&room));
        assert_eq!(server.post(&markers, Some(&bob.access_token), json!({"m.fully_read": second, "m.read": second})).await.0, 200);
        let sync = server.sync(&bob, None, None, 0).await;
        let data = sync["rooms"]["join"][&room]["account_data"]["events"].as_array().unwrap();
        assert!(data.iter().any(|e| e["type"] == "m.fully_read" && e["content"]["event_id"] == second), "{data:?}");
        crate::harness::assert_error(&server.post(&receipt("m.read", "$nope"), Some(&bob.access_token), json!({})).await, 404, "M_NOT_FOUND");
    }

    async fn own_delivered_receipts_on_the_users_other_devices_and_initial_sync(backend) {
        let server = TestServer::start(backend).await;
        let (alice, bob, room) = two_users_in_a_room(&server).await;
        let laptop = server.login_device(&bob, "LAPTOP").await;
        let delivered = |s: &Value, event: &str| {
            ephemeral(s, &room, "m.receipt").is_some_and(|r| r["content"][event]["org.hearth.delivered"].get(&bob.user_id).is_some())
        };
        let phone_since = server.sync(&bob, None, None, 0).await["next_batch"].as_str().unwrap().to_owned();
        let laptop_since = server.sync(&laptop, None, None, 0).await["next_batch"].as_str().unwrap().to_owned();
        let event = server.send_text(&alice, &room, "to the phone").await;
        let (_, next) = server.sync_until(&bob, Some(phone_since), |s| message_ids(&timeline(s, &room)).contains(&event)).await;
        // The phone's next request confirms the response, and its answer holds the receipt at once.
        let confirmed = server.sync(&bob, Some(&next), None, 0).await;
        assert!(delivered(&confirmed, &event), "{confirmed}");
        // The laptop, which never received the event, is told it reached the phone.
        server.sync_until(&laptop, Some(laptop_since), |s| delivered(s, &event)).await;
        let initial = server.sync(&laptop, None, None, 0).await;
        assert!(delivered(&initial, &event), "{initial}");
    }

    async fn presence_follows_syncing_and_is_shared_with_room_members(backend) {
        let server = TestServer::start(backend).await;
        let (alice, bob, _room) = two_users_in_a_room(&server).await;
        let stranger = server.register("stranger").await;
        server.sync(&alice, None, None, 0).await;
        let (status, presence) = server.get(&format!("/_matrix/client/v3/presence/{}/status", enc(&alice.user_id)), Some(&bob.access_token)).await;
        assert_eq!(status, 200);
        assert_eq!(presence["presence"], "online");
        let path = format!("/_matrix/client/v3/presence/{}/status", enc(&alice.user_id));
        assert_eq!(server.put(&path, Some(&alice.access_token), json!({"presence": "unavailable", "status_msg": "in a meeting"})).await.0, 200);
        let (sync, _) = server.sync_until(&bob, None, |s| {
            s["presence"]["events"].as_array().unwrap().iter().any(|e| e["sender"] == alice.user_id && e["content"]["status_msg"] == "in a meeting")
        }).await;
        let event = sync["presence"]["events"].as_array().unwrap().iter().find(|e| e["sender"] == alice.user_id).unwrap();
        assert_eq!(event["content"]["presence"], "unavailable");
        crate::harness::assert_error(&server.get(&path, Some(&stranger.access_token)).await, 403, "M_FORBIDDEN");
        crate::harness::assert_error(&server.put(&path, Some(&bob.access_token), json!({"presence": "online"})).await, 403, "M_FORBIDDEN");
    }

    async fn presence_goes_offline_when_syncing_stops(backend) {
        let server = TestServer::start_with(backend, "[presence]\noffline_after_secs = 1\nidle_after_secs = 1\n").await;
        let (alice, bob, _room) = two_users_in_a_room(&server).await;
        server.sync(&alice, None, None, 0).await;
        let path = format!("/_matrix/client/v3/presence/{}/status", enc(&alice.user_id));
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (_, presence) = server.get(&path, Some(&bob.access_token)).await;
            if presence["presence"] == "offline" {
                break;
            }
            assert!(Instant::now() < deadline, "alice never went offline: {presence}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn account_data_and_tags_in_sync(backend) {
        let server = TestServer::start(backend).await;
        let (alice, bob, room) = two_users_in_a_room(&server).await;
        let since = server.sync(&bob, None, None, 0).await["next_batch"].as_str().unwrap().to_owned();
        let direct = json!({alice.user_id.clone(): [room]});
        let global = format!("/_matrix/client/v3/user/{}/account_data/m.direct", enc(&bob.user_id));
        assert_eq!(server.put(&global, Some(&bob.access_token), direct.clone()).await.0, 200);
        assert_eq!(server.get(&global, Some(&bob.access_token)).await.1, direct);
        let room_data = format!("/_matrix/client/v3/user/{}/rooms/{}/account_data/org.example.note", enc(&bob.user_id), enc(&room));
        assert_eq!(server.put(&room_data, Some(&bob.access_token), json!({"note": "cosy"})).await.0, 200);
        let tag = format!("/_matrix/client/v3/user/{}/rooms/{}/tags/m.favourite", enc(&bob.user_id), enc(&room));
        assert_eq!(server.put(&tag, Some(&bob.access_token), json!({"order": 0.25})).await.0, 200);
        let (_, tags) = server.get(&format!("/_matrix/client/v3/user/{}/rooms/{}/tags", enc(&bob.user_id), enc(&room)), Some(&bob.access_token)).await;
        assert_eq!(tags["tags"]["m.favourite"]["order"], 0.25);
        let (sync, _) = server.sync_until(&bob, Some(since), |s| !s["account_data"]["events"].as_array().unwrap().is_empty()).await;
        assert!(sync["account_data"]["events"].as_array().unwrap().iter().any(|e| e["type"] == "m.direct" && e["content"] == direct));
        let room_events = sync["rooms"]["join"][&room]["account_data"]["events"].as_array().unwrap();
        assert!(room_events.iter().any(|e| e["type"] == "org.example.note"));
        assert!(room_events.iter().any(|e| e["type"] == "m.tag" && e["content"]["tags"]["m.favourite"]["order"] == 0.25));
        assert_eq!(server.delete(&tag, Some(&bob.access_token), json!({})).await.0, 200);
        let (_, tags) = server.get(&format!("/_matrix/client/v3/user/{}/rooms/{}/tags", enc(&bob.user_id), enc(&room)), Some(&bob.access_token)).await;
        assert_eq!(tags["tags"], json!({}));
        crate::harness::assert_error(&server.get(&global, Some(&alice.access_token)).await, 403, "M_FORBIDDEN");
        crate::harness::assert_error(&server.put(&format!("/_matrix/client/v3/user/{}/account_data/m.fully_read", enc(&bob.user_id)), Some(&bob.access_token), json!({})).await, 400, "M_BAD_JSON");
        crate::harness::assert_error(&server.get(&format!("/_matrix/client/v3/user/{}/account_data/org.none", enc(&bob.user_id)), Some(&bob.access_token)).await, 404, "M_NOT_FOUND");
    }

    async fn to_device_messages_between_local_devices(backend) {
        let server = TestServer::start(backend).await;
        let (alice, bob, _room) = two_users_in_a_room(&server).await;
        let since = server.sync(&bob, None, None, 0).await["next_batch"].as_str().unwrap().to_owned();
        let body = json!({"messages": {bob.user_id.clone(): {bob.device_id.clone(): {"secret": 1}}}});
        assert_eq!(server.put("/_matrix/client/v3/sendToDevice/org.example.ping/t1", Some(&alice.access_token), body.clone()).await.0, 200);
        assert_eq!(server.put("/_matrix/client/v3/sendToDevice/org.example.ping/t1", Some(&alice.access_token), body).await.0, 200, "retries are not delivered twice");
        let (sync, next) = server.sync_until(&bob, Some(since.clone()), |s| !s["to_device"]["events"].as_array().unwrap().is_empty()).await;
        let events = sync["to_device"]["events"].as_array().unwrap();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0]["sender"], alice.user_id);
        assert_eq!(events[0]["content"]["secret"], 1);
        // Syncing past it acknowledges it: it is not delivered again, even from an older token.
        server.sync(&bob, Some(&next), None, 0).await;
        let again = server.sync(&bob, Some(&since), None, 0).await;
        assert!(again["to_device"]["events"].as_array().unwrap().is_empty(), "{again}");
    }

    async fn to_device_messages_past_one_sync_page_are_all_delivered_exactly_once(backend) {
        // One sync delivers at most 10,000 to-device messages; the rest must wait for the next
        // sync, not be deleted by it.
        const TOTAL: usize = 10_001;
        let server = TestServer::start(backend).await;
        let (alice, bob, _room) = two_users_in_a_room(&server).await;
        let since = server.sync(&bob, None, None, 0).await["next_batch"].as_str().unwrap().to_owned();
        let sends = futures_util::stream::iter(0..TOTAL).map(|n| {
            let body = json!({"messages": {bob.user_id.clone(): {bob.device_id.clone(): {"n": n}}}});
            let server = &server;
            let token = alice.access_token.clone();
            async move {
                let path = format!("/_matrix/client/v3/sendToDevice/org.example.key/bulk{n}");
                let (status, response) = server.put(&path, Some(&token), body).await;
                assert_eq!(status, 200, "sendToDevice {n}: {response}");
            }
        });
        sends.buffer_unordered(32).collect::<Vec<()>>().await;

        let mut seen = vec![0u32; TOTAL];
        let mut received = 0;
        let mut since = since;
        let mut syncs = 0;
        while received < TOTAL {
            syncs += 1;
            assert!(syncs <= 10, "{received} of {TOTAL} to-device messages after {syncs} syncs");
            // A long timeout: a sync with messages left to deliver must answer at once anyway.
            let response = server.sync(&bob, Some(&since), None, 30_000).await;
            for event in response["to_device"]["events"].as_array().unwrap() {
                seen[event["content"]["n"].as_u64().unwrap() as usize] += 1;
                received += 1;
            }
            since = response["next_batch"].as_str().unwrap().to_owned();
        }
        assert!(syncs >= 2, "all {TOTAL} came in one sync; the page limit was not exercised");
        assert!(seen.iter().all(|&count| count == 1), "every message exactly once");
        // Confirming the last response deletes them all; nothing comes again.
        let after = server.sync(&bob, Some(&since), None, 0).await;
        assert!(after["to_device"]["events"].as_array().unwrap().is_empty(), "{after}");
    }

    async fn device_lists_report_new_devices_of_room_members(backend) {
        let server = TestServer::start(backend).await;
        let (alice, bob, _room) = two_users_in_a_room(&server).await;
        let since = server.sync(&bob, None, None, 0).await["next_batch"].as_str().unwrap().to_owned();
        server.login("alice", &alice.password, json!({"device_id": "NEWPHONE"})).await;
        let (sync, _) = server.sync_until(&bob, Some(since), |s| !s["device_lists"]["changed"].as_array().unwrap().is_empty()).await;
        assert_eq!(sync["device_lists"]["changed"], json!([alice.user_id]));
        assert_eq!(sync["device_one_time_keys_count"]["signed_curve25519"], 0);
    }

    async fn unread_counts_leave_out_ignored_users(backend) {
        unread_counts_leave_out_ignored_users(backend).await
    }

    async fn device_lists_left_when_no_room_is_shared_any_more(backend) {
        device_lists_left_when_no_room_is_shared_any_more(backend).await
    }
}

fn notification_count(sync: &Value, room: &str) -> u64 {
    sync["rooms"]["join"][room]["unread_notifications"]["notification_count"].as_u64().unwrap()
}

/// Events from users one ignores are shown nowhere, so they are not unread either — also the
/// ones counted before the ignore.
async fn unread_counts_leave_out_ignored_users(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (alice, bob, room) = two_users_in_a_room(&server).await;
    let carol = server.register("carol").await;
    server.join(&carol, &room).await;
    server.send_text(&alice, &room, "one").await;
    server.send_text(&alice, &room, "two").await;
    server.send_text(&carol, &room, "three").await;
    assert_eq!(notification_count(&server.sync(&bob, None, None, 0).await, &room), 3);
    let path = format!("/_matrix/client/v3/user/{}/account_data/m.ignored_user_list", enc(&bob.user_id));
    let (status, body) =
        server.put(&path, Some(&bob.access_token), json!({"ignored_users": {alice.user_id.clone(): {}}})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(notification_count(&server.sync(&bob, None, None, 0).await, &room), 1);
    server.send_text(&alice, &room, "four").await;
    server.send_text(&carol, &room, "five").await;
    assert_eq!(notification_count(&server.sync(&bob, None, None, 0).await, &room), 2);
}

fn device_list<'a>(sync: &'a Value, which: &str) -> Vec<&'a str> {
    sync["device_lists"][which].as_array().unwrap().iter().map(|u| u.as_str().unwrap()).collect()
}

/// `device_lists.left` names whoever no longer shares a room with the syncing user since the
/// token; `changed` whoever newly does.
async fn device_lists_left_when_no_room_is_shared_any_more(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (alice, bob, room) = two_users_in_a_room(&server).await;
    let carol = server.register("carol").await;
    let dave = server.register("dave").await;
    let other = server.create_room(&alice, json!({"preset": "public_chat"})).await;
    server.join(&carol, &room).await;
    server.join(&carol, &other).await;
    let alice_since = server.sync(&alice, None, None, 0).await["next_batch"].as_str().unwrap().to_owned();
    let bob_since = server.sync(&bob, None, None, 0).await["next_batch"].as_str().unwrap().to_owned();
    // Bob leaves the only room he shares with alice; carol leaves one of two; dave joins.
    assert_eq!(
        server
            .post(&format!("/_matrix/client/v3/rooms/{}/leave", enc(&room)), Some(&bob.access_token), json!({}))
            .await
            .0,
        200
    );
    assert_eq!(
        server
            .post(&format!("/_matrix/client/v3/rooms/{}/leave", enc(&other)), Some(&carol.access_token), json!({}))
            .await
            .0,
        200
    );
    server.join(&dave, &room).await;
    let dave_joined =
        |s: &Value| timeline(s, &room).iter().any(|e| e["type"] == "m.room.member" && e["state_key"] == dave.user_id);
    let (sync, _) = server.sync_until(&alice, Some(alice_since), dave_joined).await;
    assert_eq!(device_list(&sync, "left"), vec![bob.user_id.as_str()], "{sync}");
    assert_eq!(device_list(&sync, "changed"), vec![dave.user_id.as_str()], "{sync}");
    // The user who left sees it the other way round: everyone of that room is gone.
    let (sync, _) = server.sync_until(&bob, Some(bob_since), |s| s["rooms"]["leave"].get(&room).is_some()).await;
    let mut expected = vec![alice.user_id.as_str(), carol.user_id.as_str(), dave.user_id.as_str()];
    expected.sort();
    assert_eq!(device_list(&sync, "left"), expected, "{sync}");
    assert!(device_list(&sync, "changed").is_empty(), "{sync}");
}

backend_tests! {
    async fn pathological_type_globs_are_matched_in_linear_time(backend) {
        let server = TestServer::start(backend).await;
        let alice = server.register("alice").await;
        let room = server.create_room(&alice, json!({})).await;
        let long_type = "a".repeat(200);
        server.send(&alice, &room, &long_type, json!({"body": "x"})).await;
        // 20 stars against a 200-character type: the old recursive matcher tries every way of
        // splitting the type among the stars (C(200, 20)) before failing on the final `b`.
        let glob = format!("{}b", "*a".repeat(20));
        let filter = json!({"room": {"timeline": {"types": [glob, "m.room.create"]}}}).to_string();
        let started = Instant::now();
        let sync = tokio::time::timeout(Duration::from_secs(30), server.sync(&alice, None, Some(&filter), 0))
            .await
            .expect("a filter with a pathological glob was not answered in 30 s");
        assert!(started.elapsed() < Duration::from_secs(30));
        let types: Vec<&str> = timeline(&sync, &room).iter().map(|e| e["type"].as_str().unwrap()).collect();
        assert_eq!(types, vec!["m.room.create"], "the glob does not match the long type");
        let matching = json!({"room": {"timeline": {"types": [format!("{}*", "*a".repeat(20))]}}}).to_string();
        let sync = server.sync(&alice, None, Some(&matching), 0).await;
        let types: Vec<&str> = timeline(&sync, &room).iter().map(|e| e["type"].as_str().unwrap()).collect();
        assert_eq!(types, vec![long_type.as_str()]);
    }

    async fn filters_over_the_pattern_caps_are_rejected(backend) {
        let server = TestServer::start(backend).await;
        let alice = server.register("alice").await;
        let path = format!("/_matrix/client/v3/user/{}/filter", enc(&alice.user_id));
        let too_long = json!({"room": {"timeline": {"types": ["*".repeat(513)]}}});
        let too_many = json!({"presence": {"not_types": (0..257).map(|i| format!("t{i}")).collect::<Vec<_>>()}});
        for filter in [&too_long, &too_many] {
            let response = server.post(&path, Some(&alice.access_token), filter.clone()).await;
            crate::harness::assert_error(&response, 400, "M_INVALID_PARAM");
            let inline = format!("/_matrix/client/v3/sync?timeout=0&filter={}", enc(&filter.to_string()));
            crate::harness::assert_error(&server.get(&inline, Some(&alice.access_token)).await, 400, "M_INVALID_PARAM");
        }
        let room = server.create_room(&alice, json!({})).await;
        let messages = format!("/_matrix/client/v3/rooms/{}/messages?dir=b&filter={}", enc(&room), enc(&json!({"types": ["*".repeat(513)]}).to_string()));
        crate::harness::assert_error(&server.get(&messages, Some(&alice.access_token)).await, 400, "M_INVALID_PARAM");
        // At the caps is fine.
        let at_caps = json!({"room": {"timeline": {"types": ["*".repeat(512)]}}, "presence": {"not_types": (0..255).map(|i| format!("t{i}")).collect::<Vec<_>>()}});
        assert_eq!(server.post(&path, Some(&alice.access_token), at_caps).await.0, 200);
    }
}
