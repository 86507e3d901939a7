//! Many clients at once: the DAG stays linear and intact, and every client's sync sees every
//! event exactly once, in the same order.

use std::collections::HashSet;

use serde_json::json;

use crate::harness::{TestServer, backend_tests, enc, message_ids, timeline};

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
}
