//! Durability: writes survive a dropped database connection, a second server on the same
//! database is refused, redactions stay applied, and multi-step operations (room upgrade,
//! createRoom with an alias) are never half done or done twice by a race.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::harness::{
    Backend, TestServer, backend_tests, enc, hearth_command, message_ids, postgres_available, timeline,
    two_users_in_a_room,
};

/// Ends every connection to the test database but this one (what a PostgreSQL restart, a
/// failover or a network cut does to the server's pool and the stream writer's transaction).
async fn terminate_connections(url: &str) -> u64 {
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(url).await.expect("connect to the test database");
    let killed: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()",
    )
    .fetch_all(&mut conn)
    .await
    .expect("terminate backends");
    killed.len() as u64
}

/// Sends a message; the status and, on success, the event ID.
async fn try_send(server: &TestServer, token: &str, room: &str, txn: String) -> (u16, Option<String>) {
    let path = format!("/_matrix/client/v3/rooms/{}/send/m.room.message/{txn}", enc(room));
    let (status, body) = server.put(&path, Some(token), json!({"msgtype": "m.text", "body": txn})).await;
    (status.as_u16(), body["event_id"].as_str().map(str::to_owned))
}

/// PostgreSQL only: SQLite has no connection to drop (the file is opened in-process).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_succeed_after_the_database_connections_are_killed() {
    if !postgres_available().await {
        return;
    }
    let server = TestServer::start(Backend::Postgres).await;
    let url = server.postgres_url().unwrap();
    let (alice, bob, room) = two_users_in_a_room(&server).await;
    let since = server.sync(&bob, None, None, 0).await["next_batch"].as_str().unwrap().to_owned();

    // Kill the connections again and again while messages are being sent, so some kills land
    // inside the writer's transaction or its commit. A send may fail while its connection dies;
    // whatever succeeded must be delivered, and every send afterwards must succeed.
    let mut sent = Vec::new();
    for round in 0..20 {
        let sends = (0..8).map(|i| try_send(&server, &alice.access_token, &room, format!("r{round}m{i}")));
        let (results, killed) = tokio::join!(futures_util::future::join_all(sends), terminate_connections(&url));
        assert!(killed > 0 || round > 0, "the server holds database connections");
        for (status, event_id) in results {
            assert!(status == 200 || status == 500, "a send failed with {status}");
            sent.extend(event_id);
        }
    }
    let mut after = Vec::new();
    for i in 0..20 {
        let (status, event_id) = try_send(&server, &alice.access_token, &room, format!("after{i}")).await;
        assert_eq!(status, 200, "send {i} after the connections were killed");
        after.push(event_id.unwrap());
    }
    sent.extend(after.iter().cloned());
    assert_eq!(server.http.get(server.url("/health")).send().await.unwrap().status(), 200);

    // The messages sent afterwards reach bob's sync.
    let filter = json!({"room": {"timeline": {"limit": 100}}}).to_string();
    let mut seen: Vec<String> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut since = Some(since);
    while !after.iter().all(|id| seen.contains(id)) {
        assert!(Instant::now() < deadline, "the messages sent after the kills did not all arrive");
        let response: Value = server.sync(&bob, since.as_deref(), Some(&filter), 2000).await;
        seen.extend(message_ids(&timeline(&response, &room)));
        since = response["next_batch"].as_str().map(str::to_owned);
    }
    // Every accepted message is in the room's history exactly once.
    let path = format!("/_matrix/client/v3/rooms/{}/messages?dir=b&limit=1000", enc(&room));
    let (status, history) = server.get(&path, Some(&bob.access_token)).await;
    assert_eq!(status, 200, "{history}");
    let history: Vec<&Value> = history["chunk"].as_array().unwrap().iter().collect();
    let history = message_ids(&history);
    for id in &sent {
        assert_eq!(history.iter().filter(|h| *h == id).count(), 1, "{id} stored once");
    }
}

backend_tests! {
    async fn a_second_server_on_the_same_database_is_refused_naming_the_holder(backend) {
        let server = TestServer::start(backend).await;
        let alice = server.register("alice").await;
        let mut second = hearth_command()
            .arg("--config")
            .arg(server.config_path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(status) = second.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = second.kill();
                let _ = second.wait();
                panic!("a second server on the same database started");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut second.stderr.take().unwrap(), &mut stderr).unwrap();
        assert!(!status.success(), "{stderr}");
        assert!(stderr.contains("another Hearth server is running"), "{stderr}");
        assert!(stderr.contains(&format!("hearth pid {} on ", server.pid())), "the holder is named: {stderr}");

        // The first server carries on, and operator commands still work beside it.
        let (status, whoami) = server.get("/_matrix/client/v3/account/whoami", Some(&alice.access_token)).await;
        assert_eq!(status, 200, "{whoami}");
        let list = server.cli(&["user", "list"], None);
        assert!(list.status.success(), "{}", String::from_utf8_lossy(&list.stderr));
        assert!(String::from_utf8_lossy(&list.stdout).contains(&alice.user_id));
    }

    async fn events_read_while_being_redacted_are_served_redacted_afterwards(backend) {
        let mut server = TestServer::start(backend).await;
        let alice = server.register("alice").await;
        let room = server.create_room(&alice, json!({})).await;
        let mut targets = Vec::new();
        for round in 0..30 {
            targets.push(server.send_text(&alice, &room, &format!("secret {round}")).await);
        }
        // A fresh process: every first read of an event misses the cache and reads the database.
        server.restart();
        for (round, target) in targets.iter().enumerate() {
            let event_path = format!("/_matrix/client/v3/rooms/{}/event/{}", enc(&room), enc(target));
            let redact_path = format!("/_matrix/client/v3/rooms/{}/redact/{}/r{round}", enc(&room), enc(target));
            // Readers that miss the cache race the redaction's commit.
            let readers = (0..4).map(|_| async {
                for _ in 0..10 {
                    let (status, _) = server.get(&event_path, Some(&alice.access_token)).await;
                    assert_eq!(status, 200);
                }
            });
            let redact = async {
                let (status, body) = server.put(&redact_path, Some(&alice.access_token), json!({})).await;
                assert_eq!(status, 200, "{body}");
            };
            tokio::join!(futures_util::future::join_all(readers), redact);
            let (status, event) = server.get(&event_path, Some(&alice.access_token)).await;
            assert_eq!(status, 200);
            assert_eq!(event["content"], json!({}), "round {round}: the redaction was undone: {event}");
            assert!(event["unsigned"]["redacted_because"].is_object(), "{event}");
        }
    }

    async fn concurrent_upgrades_make_one_replacement_room(backend) {
        let server = TestServer::start(backend).await;
        let alice = server.register("alice").await;
        let old = server.create_room(&alice, json!({"room_version": "11"})).await;
        let path = format!("/_matrix/client/v3/rooms/{}/upgrade", enc(&old));
        let upgrades = (0..6).map(|_| server.post(&path, Some(&alice.access_token), json!({"new_version": "12"})));
        let results = futures_util::future::join_all(upgrades).await;
        let mut replacements: Vec<String> = Vec::new();
        for (status, body) in &results {
            assert!(*status == 200 || (400..500).contains(&status.as_u16()), "{status}: {body}");
            if *status == 200 {
                replacements.push(body["replacement_room"].as_str().unwrap().to_owned());
            }
        }
        replacements.dedup();
        assert_eq!(replacements.len(), 1, "one replacement room: {results:?}");
        let new = &replacements[0];
        let (status, tombstone) = server
            .get(&format!("/_matrix/client/v3/rooms/{}/state/m.room.tombstone/", enc(&old)), Some(&alice.access_token))
            .await;
        assert_eq!(status, 200, "{tombstone}");
        assert_eq!(tombstone["replacement_room"], json!(new));
        let (_, joined) = server.get("/_matrix/client/v3/joined_rooms", Some(&alice.access_token)).await;
        let mut joined: Vec<String> =
            joined["joined_rooms"].as_array().unwrap().iter().map(|r| r.as_str().unwrap().to_owned()).collect();
        joined.sort();
        let mut expected = vec![old.clone(), new.clone()];
        expected.sort();
        assert_eq!(joined, expected, "no second replacement room was created");
        // Exactly one tombstone in the old room's history.
        let (_, history) = server
            .get(&format!("/_matrix/client/v3/rooms/{}/messages?dir=b&limit=100", enc(&old)), Some(&alice.access_token))
            .await;
        let tombstones = history["chunk"].as_array().unwrap().iter().filter(|e| e["type"] == "m.room.tombstone").count();
        assert_eq!(tombstones, 1, "{history}");
    }

    async fn concurrent_creations_with_one_alias_make_one_room(backend) {
        let server = TestServer::start(backend).await;
        let mut users = Vec::new();
        for i in 0..8 {
            users.push(server.register(&format!("racer{i}")).await);
        }
        let creations = users.iter().map(|user| {
            server.post("/_matrix/client/v3/createRoom", Some(&user.access_token), json!({"room_alias_name": "contested"}))
        });
        let results = futures_util::future::join_all(creations).await;
        let mut winners = 0;
        for (user, (status, body)) in users.iter().zip(&results) {
            let (_, joined) = server.get("/_matrix/client/v3/joined_rooms", Some(&user.access_token)).await;
            let joined = joined["joined_rooms"].as_array().unwrap().len();
            if *status == 200 {
                winners += 1;
                assert_eq!(joined, 1);
                let (status, alias) = server.get(&format!("/_matrix/client/v3/directory/room/{}", enc("#contested:localhost")), None).await;
                assert_eq!(status, 200);
                assert_eq!(alias["room_id"], body["room_id"]);
            } else {
                assert_eq!((status.as_u16(), body["errcode"].as_str()), (400, Some("M_ROOM_IN_USE")), "{body}");
                assert_eq!(joined, 0, "the loser {} has no orphan room", user.user_id);
            }
        }
        assert_eq!(winners, 1, "{results:?}");
    }

    async fn positions_are_not_reused_after_a_restart_when_the_last_rows_were_deleted(backend) {
        // The last write is a to-device message; once confirmed it is deleted. A restart must
        // still resume after its position, or the next event would get a position the client's
        // token already passed, and never reach it.
        // (Delivered receipts off: they would be written after it.)
        let mut server = TestServer::start_with(backend, "[delivered_receipts]\nenabled = false").await;
        let (alice, bob, room) = two_users_in_a_room(&server).await;
        let since = server.sync(&bob, None, None, 0).await["next_batch"].as_str().unwrap().to_owned();
        let body = json!({"messages": {bob.user_id.clone(): {bob.device_id.clone(): {"k": 1}}}});
        assert_eq!(server.put("/_matrix/client/v3/sendToDevice/org.example.key/last", Some(&alice.access_token), body).await.0, 200);
        let (_, token) = server.sync_until(&bob, Some(since), |s| !s["to_device"]["events"].as_array().unwrap().is_empty()).await;
        // Confirms (deletes) it.
        let empty = server.sync(&bob, Some(&token), None, 0).await;
        assert!(empty["to_device"]["events"].as_array().unwrap().is_empty(), "{empty}");
        server.restart();
        let event_id = server.send_text(&alice, &room, "after the restart").await;
        let (sync, _) = server.sync_until(&bob, Some(token), |s| !timeline(s, &room).is_empty()).await;
        assert_eq!(message_ids(&timeline(&sync, &room)), vec![event_id]);
    }
}
