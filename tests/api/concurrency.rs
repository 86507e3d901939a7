//! Many clients at once: the DAG stays linear and intact, and every client's sync sees every
//! event exactly once, in the same order.

use std::collections::HashSet;

use serde_json::json;

use crate::harness::{Account, TestServer, assert_error, backend_tests, enc, message_ids, timeline};

const CLIENTS: usize = 20;
const MESSAGES_EACH: usize = 10;

backend_tests! {
    async fn twenty_clients_sending_at_once_see_the_same_history(backend) {
        let server = TestServer::start(backend).await;
        let owner = server.register("owner").await;
        let room = server.create_room(&owner, json!({"preset": "public_chat"})).await;
        let mut clients = Vec::new();
        for i in 0..CLIENTS {
            let account = server.register(&format!("user{i}")).await;
            server.join(&account, &room).await;
            clients.push(account);
        }
        // Every client syncs in a loop while everyone sends at once. A client that falls behind
        // gets a limited timeline and fills the gap from `prev_batch`, as real clients do.
        let server = std::sync::Arc::new(server);
        let total = CLIENTS * MESSAGES_EACH;
        let mut syncers = Vec::new();
        for client in &clients {
            let start = server.sync(client, None, None, 0).await["next_batch"].as_str().unwrap().to_owned();
            let (server, client, room) = (server.clone(), client.clone(), room.clone());
            syncers.push(tokio::spawn(async move {
                let filter = r#"{"room":{"timeline":{"limit":20}}}"#;
                let mut seen: Vec<String> = Vec::new();
                let mut since = start;
                for _ in 0..1000 {
                    if seen.len() >= total {
                        break;
                    }
                    let sync = server.sync(&client, Some(&since), Some(filter), 2000).await;
                    let room_sync = &sync["rooms"]["join"][&room];
                    let mut batch = message_ids(&timeline(&sync, &room));
                    if room_sync["timeline"]["limited"] == true {
                        let mut gap = Vec::new();
                        let mut from = room_sync["timeline"]["prev_batch"].as_str().unwrap().to_owned();
                        loop {
                            let path = format!("/_matrix/client/v3/rooms/{}/messages?dir=b&limit=50&from={}&to={}", enc(&room), enc(&from), enc(&since));
                            let (_, page) = server.get(&path, Some(&client.access_token)).await;
                            gap.extend(page["chunk"].as_array().unwrap().iter().filter(|e| e["type"] == "m.room.message").map(|e| e["event_id"].as_str().unwrap().to_owned()));
                            match page["end"].as_str() {
                                Some(end) => from = end.to_owned(),
                                None => break,
                            }
                        }
                        gap.reverse();
                        gap.extend(batch);
                        batch = gap;
                    }
                    seen.extend(batch);
                    since = sync["next_batch"].as_str().unwrap().to_owned();
                }
                (client.user_id.clone(), seen)
            }));
        }
        let mut senders = Vec::new();
        for (i, client) in clients.iter().enumerate() {
            let (server, client, room) = (server.clone(), client.clone(), room.clone());
            senders.push(tokio::spawn(async move {
                let mut ids = Vec::new();
                for j in 0..MESSAGES_EACH {
                    ids.push(server.send_text(&client, &room, &format!("{i}-{j}")).await);
                }
                ids
            }));
        }
        let mut sent = HashSet::new();
        for sender in senders {
            sent.extend(sender.await.unwrap());
        }
        assert_eq!(sent.len(), total);
        let mut orders = Vec::new();
        for syncer in syncers {
            let (user, seen) = syncer.await.unwrap();
            let unique: HashSet<&String> = seen.iter().collect();
            assert_eq!(unique.len(), seen.len(), "an event was delivered twice to {user}");
            assert_eq!(unique.len(), total, "{user} missed events");
            orders.push(seen);
        }
        for order in &orders[1..] {
            assert_eq!(order, &orders[0], "all clients see the same order");
        }
        // /messages agrees with sync's order.
        let (_, page) = server.get(&format!("/_matrix/client/v3/rooms/{}/messages?dir=f&limit=1000", enc(&room)), Some(&owner.access_token)).await;
        let paged: Vec<String> = page["chunk"].as_array().unwrap().iter().filter(|e| e["type"] == "m.room.message").map(|e| e["event_id"].as_str().unwrap().to_owned()).collect();
        assert_eq!(paged, orders[0]);
        // The DAG is a single chain: each message points at the one before it, depth increasing.
        let mut previous: Option<(String, i64)> = None;
        for id in &orders[0] {
            let pdu = server.stored_pdu(id).await;
            let depth = pdu["depth"].as_i64().unwrap();
            let prev = pdu["prev_events"].as_array().unwrap();
            assert_eq!(prev.len(), 1, "one forward extremity at a time: {pdu}");
            if let Some((prev_id, prev_depth)) = &previous {
                assert_eq!(prev[0].as_str().unwrap(), prev_id);
                assert_eq!(depth, prev_depth + 1);
            }
            previous = Some((id.clone(), depth));
        }
    }

    async fn messages_sent_together_each_get_their_own_outcome(backend) {
        // Sends that arrive while the room's writer is busy are committed together; a refused
        // one, a repeated transaction ID or an abandoned request must not change anyone else's
        // outcome, and the room stays one chain.
        let server = TestServer::start(backend).await;
        let owner = server.register("owner").await;
        let room = server.create_room(&owner, json!({"preset": "public_chat"})).await;
        let mut members = Vec::new();
        for i in 0..8 {
            let account = server.register(&format!("member{i}")).await;
            server.join(&account, &room).await;
            members.push(account);
        }
        let outsider = server.register("outsider").await;
        let server = std::sync::Arc::new(server);
        let put = |account: &Account, txn: String, body: String| {
            let (server, token, room) = (server.clone(), account.access_token.clone(), room.clone());
            tokio::spawn(async move {
                let path = format!("/_matrix/client/v3/rooms/{}/send/m.room.message/{txn}", enc(&room));
                server.put(&path, Some(&token), json!({"msgtype": "m.text", "body": body})).await
            })
        };
        // A client that gives up on its request at once, then retries the same transaction.
        let impatient = reqwest::Client::builder().timeout(std::time::Duration::from_millis(1)).build().unwrap();
        let abandoned = impatient
            .put(server.url(&format!("/_matrix/client/v3/rooms/{}/send/m.room.message/gone", enc(&room))))
            .bearer_auth(&owner.access_token)
            .json(&json!({"msgtype": "m.text", "body": "abandoned"}))
            .send();
        let mut member_sends = Vec::new();
        let mut repeats = Vec::new();
        let mut refused = Vec::new();
        for round in 0..5 {
            for (i, member) in members.iter().enumerate() {
                member_sends.push(put(member, format!("m{round}"), format!("{i}-{round}")));
            }
            refused.push(put(&outsider, format!("o{round}"), format!("outsider-{round}")));
        }
        for member in &members {
            repeats.push((put(member, "again".to_owned(), "first".to_owned()), put(member, "again".to_owned(), "second".to_owned())));
        }
        let _ = abandoned.await;
        let mut ids = HashSet::new();
        for send in member_sends {
            let (status, body) = send.await.unwrap();
            assert_eq!(status, 200, "{body}");
            assert!(ids.insert(body["event_id"].as_str().unwrap().to_owned()), "two sends got one event ID");
        }
        for send in refused {
            assert_error(&send.await.unwrap(), 403, "M_FORBIDDEN");
        }
        for (a, b) in repeats {
            let (a, b) = (a.await.unwrap(), b.await.unwrap());
            assert_eq!((a.0.as_u16(), b.0.as_u16()), (200, 200), "{a:?} {b:?}");
            assert_eq!(a.1["event_id"], b.1["event_id"], "a repeated transaction is one event");
            assert!(ids.insert(a.1["event_id"].as_str().unwrap().to_owned()));
        }
        let retried = server.send_text_with_txn(&owner, &room, "gone", "abandoned").await;
        ids.insert(retried.clone());
        // History holds exactly these messages, once each, in one chain.
        let (_, page) = server.get(&format!("/_matrix/client/v3/rooms/{}/messages?dir=f&limit=1000", enc(&room)), Some(&owner.access_token)).await;
        let chunk = page["chunk"].as_array().unwrap();
        let stored: Vec<String> = chunk.iter().filter(|e| e["type"] == "m.room.message").map(|e| e["event_id"].as_str().unwrap().to_owned()).collect();
        assert_eq!(stored.len(), ids.len(), "no message lost or stored twice");
        assert_eq!(stored.iter().collect::<HashSet<_>>(), ids.iter().collect::<HashSet<_>>());
        assert!(chunk.iter().all(|e| e["sender"] != outsider.user_id.as_str()));
        let mut previous: Option<String> = None;
        for event in chunk {
            let id = event["event_id"].as_str().unwrap().to_owned();
            let pdu = server.stored_pdu(&id).await;
            let prev = pdu["prev_events"].as_array().unwrap();
            // Every event but the create event follows exactly the one before it.
            if let Some(previous) = &previous {
                assert_eq!(prev.len(), 1, "one forward extremity at a time: {pdu}");
                assert_eq!(prev[0].as_str().unwrap(), previous);
            }
            previous = Some(id);
        }
        // The room goes on from the tip after all that.
        let last = server.send_text(&members[0], &room, "after").await;
        assert_eq!(server.stored_pdu(&last).await["prev_events"][0].as_str().unwrap(), previous.unwrap());
    }
}
