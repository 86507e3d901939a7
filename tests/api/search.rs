//! `POST /search` over the database's own full-text index (FTS5 on SQLite, tsvector on
//! PostgreSQL): ranking, stemming and prefixes, filters, pagination, context, state, groups,
//! and what a user may not find (history visibility, leaves, redactions, encryption).

use std::collections::HashSet;

use serde_json::{Value, json};

use crate::harness::{Account, TestServer, assert_error, backend_tests, enc};

async fn search(server: &TestServer, account: &Account, criteria: Value, next_batch: Option<&str>) -> Value {
    let path = match next_batch {
        Some(token) => format!("/_matrix/client/v3/search?next_batch={}", enc(token)),
        None => "/_matrix/client/v3/search".to_owned(),
    };
    let (status, body) =
        server.post(&path, Some(&account.access_token), json!({"search_categories": {"room_events": criteria}})).await;
    assert_eq!(status, 200, "search: {body}");
    body["search_categories"]["room_events"].clone()
}

/// The bodies of the results, in result order.
fn bodies(found: &Value) -> Vec<String> {
    // An empty list may be left out.
    found["results"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| {
            let content = &r["result"]["content"];
            content["body"].as_str().or(content["name"].as_str()).unwrap_or_else(|| panic!("no text in {r}")).to_owned()
        })
        .collect()
}

fn sorted(mut list: Vec<String>) -> Vec<String> {
    list.sort();
    list
}

fn strings(list: &[&str]) -> Vec<String> {
    sorted(list.iter().map(|s| s.to_string()).collect())
}

backend_tests! {
    async fn search_ranks_stems_and_filters(backend) {
        let server = TestServer::start(backend).await;
        let alice = server.register("alice").await;
        let bob = server.register("bob").await;
        let den = server.create_room(&alice, json!({"preset": "public_chat", "name": "The fox den"})).await;
        server.join(&bob, &den).await;
        let other = server.create_room(&alice, json!({"preset": "public_chat"})).await;
        server.join(&bob, &other).await;

        server.send_text(&alice, &den, "the quick brown fox jumps over the lazy dog").await;
        server.send_text(&bob, &den, "foxes are quick animals").await;
        server.send_text(&bob, &den, "nothing to see here").await;
        server.send_text(&alice, &den, "fox fox fox").await;
        server.send_text(&bob, &other, "a fox in another room").await;
        server.send(&bob, &den, "m.room.message", json!({"msgtype": "m.notice", "body": "Jumping is a skill"})).await;

        // Rank order: the message that is nothing but the word comes first; every message
        // with the word or its plural is found, the room name too, and nothing else.
        let found = search(&server, &alice, json!({"search_term": "fox"}), None).await;
        let got = bodies(&found);
        assert_eq!(got[0], "fox fox fox", "{found}");
        assert_eq!(sorted(got), strings(&["fox fox fox", "the quick brown fox jumps over the lazy dog", "foxes are quick animals", "a fox in another room", "The fox den"]));
        assert_eq!(found["count"], 5);
        assert_eq!(found["highlights"], json!(["fox"]));
        assert!(found.get("next_batch").is_none(), "{found}");
        let ranks: Vec<f64> = found["results"].as_array().unwrap().iter().map(|r| r["rank"].as_f64().unwrap()).collect();
        assert!(ranks.windows(2).all(|w| w[0] >= w[1]), "ranks fall: {ranks:?}");
        let first = &found["results"][0]["result"];
        assert_eq!(first["room_id"], den.as_str());
        assert_eq!(first["sender"], "@alice:localhost");
        assert!(first["event_id"].is_string() && first["origin_server_ts"].is_u64(), "{first}");

        // Stemming (jumping ~ jumps), case, and the last word as a prefix.
        assert_eq!(sorted(bodies(&search(&server, &alice, json!({"search_term": "JUMPING"}), None).await)),
            strings(&["the quick brown fox jumps over the lazy dog", "Jumping is a skill"]));
        assert_eq!(sorted(bodies(&search(&server, &alice, json!({"search_term": "qui"}), None).await)),
            strings(&["the quick brown fox jumps over the lazy dog", "foxes are quick animals"]));
        assert_eq!(bodies(&search(&server, &alice, json!({"search_term": "brown do"}), None).await),
            ["the quick brown fox jumps over the lazy dog"]);
        assert_eq!(search(&server, &alice, json!({"search_term": "giraffe"}), None).await["count"], 0);
        // Punctuation is only a separator.
        assert_eq!(search(&server, &alice, json!({"search_term": "\"fox\" AND (OR) NEAR*"}), None).await["count"], 0);
        assert_eq!(search(&server, &alice, json!({"search_term": "fox!!"}), None).await["count"], 5);

        // Recent order: newest first.
        let recent = search(&server, &alice, json!({"search_term": "fox", "order_by": "recent"}), None).await;
        assert_eq!(bodies(&recent), ["a fox in another room", "fox fox fox", "foxes are quick animals", "the quick brown fox jumps over the lazy dog", "The fox den"]);

        // Filters: rooms, senders, not_senders, and the keys searched.
        let in_other = search(&server, &alice, json!({"search_term": "fox", "filter": {"rooms": [other]}}), None).await;
        assert_eq!(bodies(&in_other), ["a fox in another room"]);
        assert_eq!(in_other["count"], 1);
        let not_den = search(&server, &alice, json!({"search_term": "fox", "filter": {"not_rooms": [den]}}), None).await;
        assert_eq!(bodies(&not_den), ["a fox in another room"]);
        let by_bob = search(&server, &alice, json!({"search_term": "fox", "filter": {"senders": ["@bob:localhost"]}}), None).await;
        assert_eq!(sorted(bodies(&by_bob)), strings(&["foxes are quick animals", "a fox in another room"]));
        let not_bob = search(&server, &alice, json!({"search_term": "fox", "filter": {"not_senders": ["@bob:localhost"]}, "order_by": "recent"}), None).await;
        assert_eq!(bodies(&not_bob), ["fox fox fox", "the quick brown fox jumps over the lazy dog", "The fox den"]);
        let names = search(&server, &alice, json!({"search_term": "fox", "keys": ["content.name"]}), None).await;
        assert_eq!(bodies(&names), ["The fox den"]);
        let only_bodies = search(&server, &alice, json!({"search_term": "fox", "keys": ["content.body"]}), None).await;
        assert_eq!(only_bodies["count"], 4);
        let topic = server.set_state(&alice, &den, "m.room.topic", "", json!({"topic": "All about foxes"})).await;
        assert_eq!(topic.0, 200);
        let topics = search(&server, &bob, json!({"search_term": "fox", "keys": ["content.topic"]}), None).await;
        assert_eq!(topics["results"][0]["result"]["content"]["topic"], "All about foxes");
        let limited = search(&server, &alice, json!({"search_term": "fox", "filter": {"limit": 2}}), None).await;
        assert_eq!(limited["results"].as_array().unwrap().len(), 2);
        assert!(limited["next_batch"].is_string());

        // Bad requests.
        let token = Some(alice.access_token.as_str());
        assert_error(&server.post("/_matrix/client/v3/search", None, json!({"search_categories": {}})).await, 401, "M_MISSING_TOKEN");
        assert_error(&server.post("/_matrix/client/v3/search", token, json!({"search_categories": {"room_events": {"search_term": " ?! "}}})).await, 400, "M_INVALID_PARAM");
        assert_error(&server.post("/_matrix/client/v3/search?next_batch=zzz", token, json!({"search_categories": {"room_events": {"search_term": "fox"}}})).await, 400, "M_INVALID_PARAM");
        let (status, body) = server.post("/_matrix/client/v3/search", token, json!({"search_categories": {"room_events": {"search_term": 5}}})).await;
        assert_eq!(status, 400, "{body}");
        let (status, body) = server.post("/_matrix/client/v3/search", token, json!({})).await;
        assert_eq!(status, 400, "{body}");
        // No category asked: nothing found, no error.
        let (status, body) = server.post("/_matrix/client/v3/search", token, json!({"search_categories": {}})).await;
        assert_eq!(status, 200, "{body}");
    }

    async fn search_pages_with_context_state_and_groups(backend) {
        let server = TestServer::start(backend).await;
        let alice = server.register("alice").await;
        let bob = server.register("bob").await;
        let room = server.create_room(&alice, json!({"preset": "public_chat", "name": "Bakery"})).await;
        server.join(&bob, &room).await;
        let side = server.create_room(&bob, json!({"preset": "public_chat"})).await;
        server.join(&alice, &side).await;
        let name = server.put("/_matrix/client/v3/profile/@bob:localhost/displayname", Some(&bob.access_token), json!({"displayname": "Bob the Baker"})).await;
        assert_eq!(name.0, 200);
        for n in 0..25 {
            let sender = if n % 2 == 0 { &alice } else { &bob };
            server.send_text(sender, &room, &format!("cake number {n}")).await;
            server.send_text(sender, &room, &format!("filler {n}")).await;
        }
        server.send_text(&bob, &side, "cake on the side").await;

        // Both orders page through everything once: pages of 10, 10, 6.
        for order in ["rank", "recent"] {
            let mut seen = Vec::new();
            let mut pages = Vec::new();
            let mut next: Option<String> = None;
            loop {
                let page = search(&server, &alice, json!({"search_term": "cake", "order_by": order, "filter": {"limit": 10}}), next.as_deref()).await;
                assert_eq!(page["count"], 26, "{page}");
                let found = bodies(&page);
                pages.push(found.len());
                seen.extend(found);
                match page["next_batch"].as_str() {
                    Some(token) => next = Some(token.to_owned()),
                    None => break,
                }
                assert!(pages.len() < 10, "pagination ends");
            }
            assert_eq!(pages[..3], [10, 10, 6], "{order}: {pages:?}");
            assert_eq!(seen.len(), 26);
            assert_eq!(seen.iter().collect::<HashSet<_>>().len(), 26, "{order}: no duplicates");
            if order == "recent" {
                assert_eq!(seen[0], "cake on the side");
                assert_eq!(seen[1], "cake number 24");
                assert_eq!(seen[25], "cake number 0");
            }
        }

        // Context: the events around a result, the senders' profiles at that point.
        let found = search(&server, &alice, json!({
            "search_term": "number 12", "order_by": "recent",
            "event_context": {"before_limit": 2, "after_limit": 3, "include_profile": true},
            "include_state": true,
            "groupings": {"group_by": [{"key": "room_id"}, {"key": "sender"}]},
        }), None).await;
        assert_eq!(bodies(&found), ["cake number 12"], "{found}");
        let context = &found["results"][0]["context"];
        let text = |events: &Value| -> Vec<String> { events.as_array().unwrap().iter().map(|e| e["content"]["body"].as_str().unwrap().to_owned()).collect() };
        assert_eq!(text(&context["events_before"]), ["filler 11", "cake number 11"], "{context}");
        assert_eq!(text(&context["events_after"]), ["filler 12", "cake number 13", "filler 13"], "{context}");
        assert!(context["start"].is_string() && context["end"].is_string(), "{context}");
        assert_eq!(context["profile_info"]["@bob:localhost"]["displayname"], "Bob the Baker", "{context}");
        assert_eq!(context["profile_info"]["@alice:localhost"]["displayname"], "alice", "{context}");
        // The paging tokens of the context continue the room's timeline.
        let (status, more) = server.get(&format!("/_matrix/client/v3/rooms/{}/messages?dir=b&limit=1&from={}", enc(&room), context["start"].as_str().unwrap()), Some(&alice.access_token)).await;
        assert_eq!(status, 200, "{more}");
        assert_eq!(more["chunk"][0]["content"]["body"], "filler 10", "{more}");
        // State of the result's room.
        let state = found["state"][&room].as_array().expect("state of the room");
        assert!(state.iter().any(|e| e["type"] == "m.room.name" && e["content"]["name"] == "Bakery"), "{state:?}");
        assert!(state.iter().any(|e| e["type"] == "m.room.member" && e["state_key"] == "@bob:localhost"));
        // Groups.
        assert_eq!(found["groups"]["room_id"][&room]["results"][0], found["results"][0]["result"]["event_id"]);
        assert_eq!(found["groups"]["room_id"][&room]["order"], 1);
        assert!(found["groups"]["sender"]["@alice:localhost"]["results"].is_array(), "{found}");

        let grouped = search(&server, &alice, json!({"search_term": "cake", "order_by": "recent", "groupings": {"group_by": [{"key": "room_id"}]}}), None).await;
        let groups = &grouped["groups"]["room_id"];
        assert_eq!(groups[&side]["results"].as_array().unwrap().len(), 1);
        assert_eq!(groups[&side]["order"], 1);
        assert_eq!(groups[&room]["results"].as_array().unwrap().len(), 9);
        assert_eq!(groups[&room]["order"], 2);
        assert_eq!(groups[&room]["next_batch"], grouped["next_batch"]);
    }

    async fn search_finds_only_what_the_user_may_see(backend) {
        let server = TestServer::start(backend).await;
        let alice = server.register("alice").await;
        let bob = server.register("bob").await;
        let carol = server.register("carol").await;
        let room = server.create_room(&bob, json!({"preset": "public_chat", "initial_state": [
            {"type": "m.room.history_visibility", "state_key": "", "content": {"history_visibility": "joined"}}
        ]})).await;
        server.send_text(&bob, &room, "secret before alice came").await;
        server.join(&alice, &room).await;
        server.send_text(&bob, &room, "secret while alice is here").await;
        let doomed = server.send_text(&bob, &room, "secret soon redacted").await;
        let found = search(&server, &alice, json!({"search_term": "secret", "order_by": "recent"}), None).await;
        assert_eq!(bodies(&found), ["secret soon redacted", "secret while alice is here"], "history before joining is hidden");
        assert_eq!(search(&server, &bob, json!({"search_term": "secret"}), None).await["count"], 3);

        // A redaction takes the message out of the index.
        let (status, body) = server.put(&format!("/_matrix/client/v3/rooms/{}/redact/{}/r1", enc(&room), enc(&doomed)), Some(&bob.access_token), json!({"reason": "oops"})).await;
        assert_eq!(status, 200, "{body}");
        let found = search(&server, &alice, json!({"search_term": "redacted"}), None).await;
        assert_eq!(found["count"], 0, "{found}");
        assert_eq!(bodies(&search(&server, &bob, json!({"search_term": "secret", "order_by": "recent"}), None).await), ["secret while alice is here", "secret before alice came"]);

        // After leaving, what she saw stays findable and what came later does not.
        let (status, _) = server.post(&format!("/_matrix/client/v3/rooms/{}/leave", enc(&room)), Some(&alice.access_token), json!({})).await;
        assert_eq!(status, 200);
        server.send_text(&bob, &room, "secret after alice left").await;
        let found = search(&server, &alice, json!({"search_term": "secret", "order_by": "recent"}), None).await;
        assert_eq!(bodies(&found), ["secret while alice is here"], "{found}");
        // Forgetting the room takes it out of her search.
        let (status, _) = server.post(&format!("/_matrix/client/v3/rooms/{}/forget", enc(&room)), Some(&alice.access_token), json!({})).await;
        assert_eq!(status, 200);
        assert_eq!(search(&server, &alice, json!({"search_term": "secret"}), None).await["count"], 0);

        // Someone never in the room finds nothing of it, even a public one.
        assert_eq!(search(&server, &carol, json!({"search_term": "secret"}), None).await["count"], 0);
        let open = server.create_room(&bob, json!({"preset": "public_chat", "initial_state": [
            {"type": "m.room.history_visibility", "state_key": "", "content": {"history_visibility": "world_readable"}}
        ]})).await;
        server.send_text(&bob, &open, "secret in the open").await;
        assert_eq!(search(&server, &carol, json!({"search_term": "secret"}), None).await["count"], 0);
        // With shared history, a newcomer finds what came before.
        server.join(&carol, &open).await;
        assert_eq!(bodies(&search(&server, &carol, json!({"search_term": "secret"}), None).await), ["secret in the open"]);

        // Encrypted messages are not searchable on the server (the client searches them).
        let encrypted = server.create_room(&bob, json!({"preset": "private_chat", "invite": ["@alice:localhost"], "initial_state": [
            {"type": "m.room.encryption", "state_key": "", "content": {"algorithm": "m.megolm.v1.aes-sha2"}}
        ]})).await;
        server.join(&alice, &encrypted).await;
        server.send(&bob, &encrypted, "m.room.encrypted", json!({"algorithm": "m.megolm.v1.aes-sha2", "ciphertext": "secret", "body": "secret", "sender_key": "k", "session_id": "s", "device_id": "D"})).await;
        let found = search(&server, &alice, json!({"search_term": "secret", "filter": {"rooms": [encrypted]}}), None).await;
        assert_eq!(found["count"], 0, "{found}");

        // An ignored user's messages are not shown.
        server.send_text(&carol, &open, "secret from carol").await;
        server.join(&alice, &open).await;
        assert_eq!(search(&server, &alice, json!({"search_term": "carol"}), None).await["count"], 1);
        let ignore = server.put("/_matrix/client/v3/user/@alice:localhost/account_data/m.ignored_user_list", Some(&alice.access_token), json!({"ignored_users": {"@carol:localhost": {}}})).await;
        assert_eq!(ignore.0, 200);
        assert!(bodies(&search(&server, &alice, json!({"search_term": "carol"}), None).await).is_empty());
    }

    async fn search_index_survives_restart_and_grows(backend) {
        let mut server = TestServer::start(backend).await;
        let alice = server.register("alice").await;
        let room = server.create_room(&alice, json!({"name": "Notes"})).await;
        for n in 0..5 {
            server.send_text(&alice, &room, &format!("remember the milk {n}")).await;
        }
        server.restart();
        server.send_text(&alice, &room, "remember the eggs").await;
        let found = search(&server, &alice, json!({"search_term": "remember", "order_by": "recent"}), None).await;
        assert_eq!(found["count"], 6);
        assert_eq!(bodies(&found)[0], "remember the eggs");
        // An edit's new text is searchable; the event found is the edit itself.
        let original = server.send_text(&alice, &room, "teh typo").await;
        server.send(&alice, &room, "m.room.message", json!({"msgtype": "m.text", "body": "* the typo", "m.new_content": {"msgtype": "m.text", "body": "the typo"}, "m.relates_to": {"rel_type": "m.replace", "event_id": original}})).await;
        assert_eq!(search(&server, &alice, json!({"search_term": "teh"}), None).await["count"], 1);
        assert_eq!(search(&server, &alice, json!({"search_term": "typo"}), None).await["count"], 2);
        // Emoji and non-Latin text.
        server.send_text(&alice, &room, "Grüße aus Köln 🎉").await;
        server.send_text(&alice, &room, "привет мир").await;
        assert_eq!(bodies(&search(&server, &alice, json!({"search_term": "köln"}), None).await), ["Grüße aus Köln 🎉"]);
        assert_eq!(bodies(&search(&server, &alice, json!({"search_term": "привет"}), None).await), ["привет мир"]);
    }

    async fn search_ranks_long_histories_in_blocks_and_estimates_counts(backend) {
        // Blocks of four and counts exact up to four matches, so a handful of messages shows
        // what a word in a hundred thousand does at the default of a thousand.
        let server = TestServer::start_with(backend, "[search]\nrank_window = 4\nexact_count_up_to = 4\n").await;
        let alice = server.register("alice").await;
        let bob = server.register("bob").await;
        let elsewhere = server.create_room(&bob, json!({})).await;
        for n in 0..6 {
            server.send_text(&bob, &elsewhere, &format!("cake at bob's n{n}")).await;
        }
        let room = server.create_room(&alice, json!({})).await;
        let body = |n: usize| if n % 2 == 1 { format!("cake cake n{n}") } else { format!("cake with several other words n{n}") };
        for n in 0..10 {
            server.send_text(&alice, &room, &body(n)).await;
        }

        // Newest four ranked (the two-cake ones first), then the next four, then the rest;
        // a page may span blocks, and what arrives while paging does not move the pages.
        let mut pages = Vec::new();
        let mut next: Option<String> = None;
        loop {
            let page = search(&server, &alice, json!({"search_term": "cake", "filter": {"limit": 3}}), next.as_deref()).await;
            if pages.is_empty() {
                // 16 matches in the index; the newest four are all Alice's: 16 × 4/4.
                assert_eq!(page["count"], 16, "{page}");
                server.send_text(&alice, &room, "cake cake newest").await;
            }
            pages.push(bodies(&page));
            match page["next_batch"].as_str() {
                Some(token) => next = Some(token.to_owned()),
                None => break,
            }
            assert!(pages.len() < 10, "pagination ends");
        }
        let expected: Vec<Vec<String>> =
            [vec![9, 7, 8], vec![6, 5, 3], vec![4, 2, 1], vec![0]].iter().map(|page| page.iter().map(|&n| body(n)).collect()).collect();
        assert_eq!(pages, expected);

        // An estimate never says less than what the page holds: Bob's six are older than the
        // newest four matches, none of which he may see.
        let found = search(&server, &bob, json!({"search_term": "cake", "order_by": "recent"}), None).await;
        assert_eq!(bodies(&found).len(), 6, "{found}");
        assert_eq!(found["count"], 6, "{found}");
    }
}
