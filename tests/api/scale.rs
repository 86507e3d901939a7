//! Scale: a room of 10,000 members, and a user in 1,000 rooms. These take minutes, so they are
//! ignored by a plain `cargo test` and run by `.ci/run` (`cargo test -- --ignored`).

use futures_util::StreamExt;
use serde_json::{Value, json};

use crate::harness::{Account, TestServer, backend_tests, enc, message_ids, timeline};

/// Registers `count` password-less accounts (no password hashing: the point is the room).
async fn register_many(server: &TestServer, prefix: &str, count: usize) -> Vec<Account> {
    futures_util::stream::iter(0..count)
        .map(|i| async move {
            let (status, body) = server
                .post(
                    "/_matrix/client/v3/register",
                    None,
                    json!({"username": format!("{prefix}{i}"), "auth": {"type": "m.login.dummy"}}),
                )
                .await;
            assert_eq!(status, 200, "{body}");
            Account {
                user_id: body["user_id"].as_str().unwrap().to_owned(),
                access_token: body["access_token"].as_str().unwrap().to_owned(),
                device_id: body["device_id"].as_str().unwrap().to_owned(),
                password: String::new(),
            }
        })
        .buffer_unordered(8)
        .collect()
        .await
}

backend_tests! {
    #[ignore = "heavy: run with `cargo test -- --ignored`"]
    async fn a_room_of_ten_thousand_members(backend) {
        const MEMBERS: usize = 10_000;
        let server = TestServer::start(backend).await;
        let owner = server.register("owner").await;
        let room = server.create_room(&owner, json!({"preset": "public_chat", "name": "Everyone"})).await;
        let members = register_many(&server, "m", MEMBERS).await;
        futures_util::stream::iter(members.iter()).for_each_concurrent(8, |member| {
            let (server, room) = (&server, &room);
            async move { server.join(member, room).await }
        }).await;
        let (_, joined) = server.get(&format!("/_matrix/client/v3/rooms/{}/joined_members", enc(&room)), Some(&owner.access_token)).await;
        assert_eq!(joined["joined"].as_object().unwrap().len(), MEMBERS + 1);

        // A few members sync; the owner sends; each sees the message once.
        let watchers = &members[..5];
        let mut tokens = Vec::new();
        for watcher in watchers {
            let lazy = r#"{"room":{"state":{"lazy_load_members":true},"timeline":{"limit":5}}}"#;
            let initial = server.sync(watcher, None, Some(lazy), 0).await;
            assert_eq!(initial["rooms"]["join"][&room]["summary"]["m.joined_member_count"], (MEMBERS + 1) as u64);
            tokens.push(initial["next_batch"].as_str().unwrap().to_owned());
        }
        let sent = server.send_text(&owner, &room, "hello, ten thousand").await;
        for (watcher, token) in watchers.iter().zip(tokens) {
            let (sync, _) = server.sync_until(watcher, Some(token), |s| !timeline(s, &room).is_empty()).await;
            assert_eq!(message_ids(&timeline(&sync, &room)), vec![sent.clone()]);
        }
        // Any member can talk and be heard.
        let last = members.last().unwrap();
        let reply = server.send_text(last, &room, "hi from the back row").await;
        let (_, page) = server.get(&format!("/_matrix/client/v3/rooms/{}/messages?dir=b&limit=1", enc(&room)), Some(&owner.access_token)).await;
        assert_eq!(page["chunk"][0]["event_id"], reply);
    }

    #[ignore = "heavy: run with `cargo test -- --ignored`"]
    async fn a_user_in_a_thousand_rooms(backend) {
        const ROOMS: usize = 1000;
        let server = TestServer::start(backend).await;
        let alice = server.register("alice").await;
        let rooms: Vec<String> = futures_util::stream::iter(0..ROOMS)
            .map(|i| { let (server, alice) = (&server, &alice); async move { server.create_room(alice, json!({"name": format!("room {i}")})).await } })
            .buffer_unordered(4)
            .collect()
            .await;
        let initial = server.sync(&alice, None, None, 0).await;
        assert_eq!(initial["rooms"]["join"].as_object().unwrap().len(), ROOMS);
        let since = initial["next_batch"].as_str().unwrap().to_owned();
        let target = &rooms[ROOMS / 2];
        let sent = server.send_text(&alice, target, "only here").await;
        let (sync, _) = server.sync_until(&alice, Some(since), |s: &Value| !s["rooms"]["join"].as_object().unwrap().is_empty()).await;
        let changed: Vec<&String> = sync["rooms"]["join"].as_object().unwrap().keys().collect();
        assert_eq!(changed, vec![target], "an incremental sync carries only the room that changed");
        assert_eq!(message_ids(&timeline(&sync, target)), vec![sent]);
    }
}
