//! Aliases, the public room directory and the user directory.

use serde_json::{Value, json};

use crate::harness::{TestServer, assert_error, backend_tests, enc};

backend_tests! {
    async fn aliases_can_be_created_resolved_and_deleted(backend) {
        let server = TestServer::start(backend).await;
        let alice = server.register("alice").await;
        let bob = server.register("bob").await;
        let room = server.create_room(&alice, json!({"preset": "public_chat"})).await;
        let alias = "/_matrix/client/v3/directory/room/%23cafe%3Alocalhost";
        assert_error(&server.put(alias, Some(&bob.access_token), json!({"room_id": room})).await, 403, "M_FORBIDDEN");
        assert_eq!(server.put(alias, Some(&alice.access_token), json!({"room_id": room})).await.0, 200);
        // The spec: 409 `M_UNKNOWN` for an alias that already exists, whichever room it names.
        assert_error(&server.put(alias, Some(&alice.access_token), json!({"room_id": room})).await, 409, "M_UNKNOWN");
        let other = server.create_room(&alice, json!({})).await;
        assert_error(&server.put(alias, Some(&alice.access_token), json!({"room_id": other})).await, 409, "M_UNKNOWN");
        let (status, resolved) = server.get(alias, None).await;
        assert_eq!(status, 200);
        assert_eq!(resolved, json!({"room_id": room, "servers": ["localhost"]}));
        let (_, listed) = server.get(&format!("/_matrix/client/v3/rooms/{}/aliases", enc(&room)), Some(&alice.access_token)).await;
        assert_eq!(listed["aliases"], json!(["#cafe:localhost"]));
        // The alias can become the canonical alias.
        assert_eq!(server.set_state(&alice, &room, "m.room.canonical_alias", "", json!({"alias": "#cafe:localhost"})).await.0, 200);
        server.join(&bob, &room).await;
        assert_error(&server.delete(alias, Some(&bob.access_token), json!({})).await, 403, "M_FORBIDDEN");
        assert_eq!(server.delete(alias, Some(&alice.access_token), json!({})).await.0, 200);
        assert_error(&server.get(alias, None).await, 404, "M_NOT_FOUND");
        assert_error(&server.put("/_matrix/client/v3/directory/room/%23x%3Aelsewhere.org", Some(&alice.access_token), json!({"room_id": room})).await, 400, "M_INVALID_PARAM");
    }

    async fn cached_public_list_follows_publishing_and_pages_completely(backend) {
        let server = TestServer::start(backend).await;
        let alice = server.register("alice").await;
        let mut public = Vec::new();
        for i in 0..4 {
            public.push(server.create_room(&alice, json!({"preset": "public_chat", "visibility": "public", "name": format!("Room {i}")})).await);
        }
        let hidden = server.create_room(&alice, json!({"preset": "public_chat", "name": "Hidden"})).await;
        let list_ids = |list: &Value| -> Vec<String> { list["chunk"].as_array().unwrap().iter().map(|r| r["room_id"].as_str().unwrap().to_owned()).collect() };
        // Builds (and caches) the list.
        assert_eq!(list_ids(&server.get("/_matrix/client/v3/publicRooms", None).await.1).len(), 4);
        // Publishing and unpublishing show at once, not after the cache's lifetime.
        let vis = format!("/_matrix/client/v3/directory/list/room/{}", enc(&hidden));
        assert_eq!(server.put(&vis, Some(&alice.access_token), json!({"visibility": "public"})).await.0, 200);
        assert!(list_ids(&server.get("/_matrix/client/v3/publicRooms", None).await.1).contains(&hidden));
        assert_eq!(server.put(&vis, Some(&alice.access_token), json!({"visibility": "private"})).await.0, 200);
        assert!(!list_ids(&server.get("/_matrix/client/v3/publicRooms", None).await.1).contains(&hidden));
        // A room created public shows at once too.
        let fresh = server.create_room(&alice, json!({"preset": "public_chat", "visibility": "public", "name": "Fresh"})).await;
        assert!(list_ids(&server.get("/_matrix/client/v3/publicRooms", None).await.1).contains(&fresh));
        public.push(fresh);
        // Pages of one cover every room exactly once.
        let mut seen = Vec::new();
        let mut since: Option<String> = None;
        for _ in 0..10 {
            let path = match &since {
                Some(s) => format!("/_matrix/client/v3/publicRooms?limit=1&since={}", enc(s)),
                None => "/_matrix/client/v3/publicRooms?limit=1".to_owned(),
            };
            let (status, page) = server.get(&path, None).await;
            assert_eq!(status, 200, "{page}");
            seen.extend(list_ids(&page));
            match page["next_batch"].as_str() {
                Some(next) => since = Some(next.to_owned()),
                None => break,
            }
        }
        let mut sorted = seen.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), seen.len(), "duplicates: {seen:?}");
        public.sort();
        assert_eq!(sorted, public);
    }

    async fn public_room_list_search_and_pagination(backend) {
        let server = TestServer::start(backend).await;
        let alice = server.register("alice").await;
        let bob = server.register("bob").await;
        let big = server.create_room(&alice, json!({"preset": "public_chat", "visibility": "public", "name": "Gardening club", "topic": "plants"})).await;
        server.join(&bob, &big).await;
        let small = server.create_room(&alice, json!({"preset": "public_chat", "visibility": "public", "name": "Chess"})).await;
        let hidden = server.create_room(&alice, json!({"preset": "public_chat", "name": "Unlisted"})).await;
        let (status, list) = server.get("/_matrix/client/v3/publicRooms", None).await;
        assert_eq!(status, 200, "{list}");
        let ids: Vec<&str> = list["chunk"].as_array().unwrap().iter().map(|r| r["room_id"].as_str().unwrap()).collect();
        assert_eq!(ids, vec![big.as_str(), small.as_str()], "most members first, unlisted rooms absent");
        assert_eq!(list["chunk"][0]["num_joined_members"], 2);
        // `join_rule` defaults to public and may be omitted.
        assert!(list["chunk"][0].get("join_rule").is_none_or(|rule| rule == "public"));
        assert_eq!(list["total_room_count_estimate"], 2);
        let (_, page) = server.get("/_matrix/client/v3/publicRooms?limit=1", None).await;
        assert_eq!(page["chunk"].as_array().unwrap().len(), 1);
        let next = page["next_batch"].as_str().unwrap();
        let (_, page2) = server.get(&format!("/_matrix/client/v3/publicRooms?limit=1&since={next}"), None).await;
        assert_eq!(page2["chunk"][0]["room_id"], small);
        let (_, found) = server.post("/_matrix/client/v3/publicRooms", Some(&bob.access_token), json!({"filter": {"generic_search_term": "PLANTS"}})).await;
        assert_eq!(found["chunk"].as_array().unwrap().len(), 1);
        assert_eq!(found["chunk"][0]["room_id"], big);
        // Visibility can be toggled by the room's admin.
        let vis = format!("/_matrix/client/v3/directory/list/room/{}", enc(&hidden));
        assert_eq!(server.get(&vis, None).await.1["visibility"], "private");
        assert_error(&server.put(&vis, Some(&bob.access_token), json!({"visibility": "public"})).await, 403, "M_FORBIDDEN");
        assert_eq!(server.put(&vis, Some(&alice.access_token), json!({"visibility": "public"})).await.0, 200);
        assert_eq!(server.get(&vis, None).await.1["visibility"], "public");
        assert_error(&server.get("/_matrix/client/v3/publicRooms?server=elsewhere.org", None).await, 404, "M_NOT_FOUND");
    }

    async fn user_directory_finds_people_you_share_rooms_with(backend) {
        let server = TestServer::start(backend).await;
        let alice = server.register("alice").await;
        let bob = server.register("bob").await;
        let _hermit = server.register("bobcat").await;
        let room = server.create_room(&alice, json!({"preset": "private_chat", "invite": [bob.user_id]})).await;
        server.join(&bob, &room).await;
        server.put(&format!("/_matrix/client/v3/profile/{}/displayname", enc(&bob.user_id)), Some(&bob.access_token), json!({"displayname": "Robert"})).await;
        let (status, found) = server.post("/_matrix/client/v3/user_directory/search", Some(&alice.access_token), json!({"search_term": "bob"})).await;
        assert_eq!(status, 200, "{found}");
        let ids: Vec<&str> = found["results"].as_array().unwrap().iter().map(|u| u["user_id"].as_str().unwrap()).collect();
        assert_eq!(ids, vec![bob.user_id.as_str()], "bobcat shares no room with alice");
        assert_eq!(found["results"][0]["display_name"], "Robert");
        let (_, by_name) = server.post("/_matrix/client/v3/user_directory/search", Some(&alice.access_token), json!({"search_term": "rober"})).await;
        assert_eq!(by_name["results"].as_array().unwrap().len(), 1);
        assert_eq!(by_name["limited"], false);
    }
}
