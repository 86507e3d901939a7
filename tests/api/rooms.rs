//! Room creation (presets, versions, options), upgrades, and the federation-readiness of every
//! event Hearth creates (signatures, content hashes, reference-hash event IDs).

use ruma::{
    CanonicalJsonObject, RoomVersionId,
    serde::Base64,
    signatures::{PublicKeyMap, PublicKeySet, Verified},
};
use serde_json::{Value, json};

use crate::harness::{TestServer, assert_error, backend_tests, enc};

async fn state(server: &TestServer, token: &str, room: &str, event_type: &str, state_key: &str) -> (u16, Value) {
    let path = format!("/_matrix/client/v3/rooms/{}/state/{event_type}/{}", enc(room), enc(state_key));
    let (status, body) = server.get(&path, Some(token)).await;
    (status.as_u16(), body)
}

backend_tests! {
    async fn evicted_room_handles_reload_the_same_tip_and_state(backend) {
        // Two loaded rooms at most: writing to six evicts the first, which is then reloaded.
        let server = TestServer::start_with(backend, "[rooms]\nmax_loaded_rooms = 2\n").await;
        let alice = server.register("alice").await;
        let mut rooms = Vec::new();
        let mut last = Vec::new();
        for i in 0..6 {
            let room = server.create_room(&alice, json!({"name": format!("Room {i}")})).await;
            last.push(server.send_text(&alice, &room, &format!("first in {i}")).await);
            rooms.push(room);
        }
        // Back to the first room, long evicted: the DAG continues from its latest event.
        let second = server.send_text(&alice, &rooms[0], "second in 0").await;
        assert_eq!(server.stored_pdu(&second).await["prev_events"], json!([last[0]]));
        let (status, name) = state(&server, &alice.access_token, &rooms[0], "m.room.name", "").await;
        assert_eq!((status, name["name"].clone()), (200, json!("Room 0")));
        // A state change after the reload is current too, and sync sees every room and message.
        assert_eq!(server.set_state(&alice, &rooms[0], "m.room.topic", "", json!({"topic": "reloaded"})).await.0, 200);
        let (status, topic) = state(&server, &alice.access_token, &rooms[0], "m.room.topic", "").await;
        assert_eq!((status, topic["topic"].clone()), (200, json!("reloaded")));
        let sync = server.sync(&alice, None, None, 0).await;
        for (i, room) in rooms.iter().enumerate() {
            let ids = crate::harness::message_ids(&crate::harness::timeline(&sync, room));
            assert!(ids.contains(&last[i]), "room {i}: {ids:?}");
        }
        let ids = crate::harness::message_ids(&crate::harness::timeline(&sync, &rooms[0]));
        assert_eq!(ids.last(), Some(&second), "{ids:?}");
    }

    async fn presets_set_join_rules_visibility_and_power(backend) {
        let server = TestServer::start(backend).await;
        let alice = server.register("alice").await;
        let public = server.create_room(&alice, json!({"preset": "public_chat", "name": "Lobby"})).await;
        let private = server.create_room(&alice, json!({"preset": "private_chat"})).await;
        let token = &alice.access_token;
        assert_eq!(state(&server, token, &public, "m.room.join_rules", "").await.1["join_rule"], "public");
        assert_eq!(state(&server, token, &private, "m.room.join_rules", "").await.1["join_rule"], "invite");
        assert_eq!(state(&server, token, &public, "m.room.history_visibility", "").await.1["history_visibility"], "shared");
        assert_eq!(state(&server, token, &private, "m.room.guest_access", "").await.1["guest_access"], "can_join");
        assert_eq!(state(&server, token, &public, "m.room.name", "").await.1["name"], "Lobby");
        let levels = state(&server, token, &public, "m.room.power_levels", "").await.1;
        assert_eq!(levels["events"]["m.room.power_levels"], 100);
        assert_eq!(levels["invite"], 50);
        // Room version 12 by default: the creator has unlimited power and is not listed.
        assert!(levels["users"].get(&alice.user_id).is_none(), "{levels}");
        let create = state(&server, token, &public, "m.room.create", "").await.1;
        assert_eq!(create["room_version"], "12");
        assert!(public.starts_with('!') && !public.contains(':'), "v12 room IDs carry no server name: {public}");
    }

    async fn create_room_options_are_applied(backend) {
        let server = TestServer::start(backend).await;
        let alice = server.register("alice").await;
        let bob = server.register("bob").await;
        let room = server
            .create_room(&alice, json!({
                "preset": "private_chat",
                "name": "Plans",
                "topic": "What we do next",
                "room_alias_name": "plans",
                "invite": [bob.user_id],
                "is_direct": true,
                "initial_state": [{"type": "m.room.history_visibility", "state_key": "", "content": {"history_visibility": "joined"}},
                                  {"type": "org.example.custom", "state_key": "k", "content": {"x": 1}}],
                "creation_content": {"m.federate": false},
                "power_level_content_override": {"events_default": 10},
            }))
            .await;
        let token = &alice.access_token;
        assert_eq!(state(&server, token, &room, "m.room.topic", "").await.1["topic"], "What we do next");
        assert_eq!(state(&server, token, &room, "m.room.canonical_alias", "").await.1["alias"], "#plans:localhost");
        assert_eq!(state(&server, token, &room, "m.room.history_visibility", "").await.1["history_visibility"], "joined");
        assert_eq!(state(&server, token, &room, "org.example.custom", "k").await.1["x"], 1);
        assert_eq!(state(&server, token, &room, "m.room.create", "").await.1["m.federate"], false);
        assert_eq!(state(&server, token, &room, "m.room.power_levels", "").await.1["events_default"], 10);
        let member = state(&server, token, &room, "m.room.member", &bob.user_id).await.1;
        assert_eq!(member["membership"], "invite");
        assert_eq!(member["is_direct"], true);
        let (status, alias) = server.get("/_matrix/client/v3/directory/room/%23plans%3Alocalhost", None).await;
        assert_eq!(status, 200);
        assert_eq!(alias["room_id"], room);
        // Bob sees the invite.
        let (sync, _) = server.sync_until(&bob, None, |s| s["rooms"]["invite"].get(&room).is_some()).await;
        let invite_state = sync["rooms"]["invite"][&room]["invite_state"]["events"].as_array().unwrap();
        assert!(invite_state.iter().any(|e| e["type"] == "m.room.name" && e["content"]["name"] == "Plans"));
        assert!(invite_state.iter().any(|e| e["type"] == "m.room.member" && e["state_key"] == bob.user_id));
    }

    async fn every_supported_room_version_can_be_created(backend) {
        let server = TestServer::start(backend).await;
        let alice = server.register("alice").await;
        for version in ["10", "11", "12"] {
            let room = server.create_room(&alice, json!({"room_version": version, "name": format!("v{version}")})).await;
            let create = state(&server, &alice.access_token, &room, "m.room.create", "").await.1;
            assert_eq!(create["room_version"], version);
            assert_eq!(create.get("creator").is_some(), version == "10", "only v10 keeps creator: {create}");
            server.send_text(&alice, &room, "hello").await;
        }
        let unsupported = server.post("/_matrix/client/v3/createRoom", Some(&alice.access_token), json!({"room_version": "9"})).await;
        assert_error(&unsupported, 400, "M_UNSUPPORTED_ROOM_VERSION");
        let bogus = server.post("/_matrix/client/v3/createRoom", Some(&alice.access_token), json!({"room_version": "banana"})).await;
        assert_error(&bogus, 400, "M_UNSUPPORTED_ROOM_VERSION");
    }

    async fn taken_alias_and_bad_initial_state_are_refused(backend) {
        let server = TestServer::start(backend).await;
        let alice = server.register("alice").await;
        server.create_room(&alice, json!({"room_alias_name": "taken"})).await;
        let again = server.post("/_matrix/client/v3/createRoom", Some(&alice.access_token), json!({"room_alias_name": "taken"})).await;
        assert_error(&again, 400, "M_ROOM_IN_USE");
        let bad = server
            .post("/_matrix/client/v3/createRoom", Some(&alice.access_token), json!({"initial_state": [{"type": "m.room.member", "state_key": "@x:localhost", "content": {"membership": "join"}}]}))
            .await;
        assert_error(&bad, 400, "M_INVALID_ROOM_STATE");
        let (_, joined) = server.get("/_matrix/client/v3/joined_rooms", Some(&alice.access_token)).await;
        assert_eq!(joined["joined_rooms"].as_array().unwrap().len(), 1, "failed creations leave no room behind");
    }

    async fn upgrade_tombstones_the_old_room_and_moves_aliases(backend) {
        let server = TestServer::start(backend).await;
        let alice = server.register("alice").await;
        let old = server.create_room(&alice, json!({"preset": "public_chat", "name": "Old name", "room_alias_name": "town", "room_version": "11"})).await;
        let (status, body) = server
            .post(&format!("/_matrix/client/v3/rooms/{}/upgrade", enc(&old)), Some(&alice.access_token), json!({"new_version": "12"}))
            .await;
        assert_eq!(status, 200, "{body}");
        let new = body["replacement_room"].as_str().unwrap().to_owned();
        let token = &alice.access_token;
        assert_eq!(state(&server, token, &old, "m.room.tombstone", "").await.1["replacement_room"], new);
        let create = state(&server, token, &new, "m.room.create", "").await.1;
        assert_eq!(create["predecessor"]["room_id"], old);
        assert_eq!(create["room_version"], "12");
        assert_eq!(state(&server, token, &new, "m.room.name", "").await.1["name"], "Old name");
        assert_eq!(state(&server, token, &new, "m.room.join_rules", "").await.1["join_rule"], "public");
        assert_eq!(state(&server, token, &new, "m.room.canonical_alias", "").await.1["alias"], "#town:localhost");
        let (_, alias) = server.get("/_matrix/client/v3/directory/room/%23town%3Alocalhost", None).await;
        assert_eq!(alias["room_id"], new);
        let old_levels = state(&server, token, &old, "m.room.power_levels", "").await.1;
        assert!(old_levels["events_default"].as_i64().unwrap() >= 50, "{old_levels}");
        // Non-admins cannot upgrade.
        let bob = server.register("bob").await;
        server.join(&bob, &new).await;
        let refused = server.post(&format!("/_matrix/client/v3/rooms/{}/upgrade", enc(&new)), Some(&bob.access_token), json!({"new_version": "12"})).await;
        assert_error(&refused, 403, "M_FORBIDDEN");
    }

    async fn every_event_verifies_and_its_id_recomputes(backend) {
        let server = TestServer::start(backend).await;
        let alice = server.register("alice").await;
        let bob = server.register("bob").await;
        let (_, keys) = server.get("/_matrix/key/v2/server", None).await;
        let (key_id, key) = keys["verify_keys"].as_object().unwrap().iter().next().unwrap();
        let mut key_set = PublicKeySet::new();
        key_set.insert(key_id.clone(), Base64::parse(key["key"].as_str().unwrap()).unwrap());
        let mut key_map = PublicKeyMap::new();
        key_map.insert("localhost".to_owned(), key_set);

        for version in ["10", "11", "12"] {
            let room = server.create_room(&alice, json!({"room_version": version, "preset": "public_chat", "name": "n", "topic": "t"})).await;
            server.join(&bob, &room).await;
            let message = server.send_text(&alice, &room, "to be redacted").await;
            server.send(&bob, &room, "m.reaction", json!({"m.relates_to": {"rel_type": "m.annotation", "event_id": message, "key": "👍"}})).await;
            let (status, _) = server
                .put(&format!("/_matrix/client/v3/rooms/{}/redact/{}/r1", enc(&room), enc(&message)), Some(&alice.access_token), json!({}))
                .await;
            assert_eq!(status, 200);
            let rules = RoomVersionId::try_from(version).unwrap().rules().unwrap();
            let (_, messages) = server.get(&format!("/_matrix/client/v3/rooms/{}/messages?dir=b&limit=100", enc(&room)), Some(&alice.access_token)).await;
            let ids: Vec<String> = messages["chunk"].as_array().unwrap().iter().map(|e| e["event_id"].as_str().unwrap().to_owned()).collect();
            assert!(ids.len() >= 9, "{messages}");
            for event_id in ids {
                let pdu = server.stored_pdu(&event_id).await;
                let object: CanonicalJsonObject = serde_json::from_value(pdu.clone()).unwrap();
                let verified = ruma::signatures::verify_event(&key_map, &object, &rules).unwrap_or_else(|e| panic!("{event_id} in v{version}: {e}"));
                if event_id == message {
                    assert_eq!(verified, Verified::Signatures, "the redacted event keeps its signature");
                } else {
                    assert_eq!(verified, Verified::All, "{event_id} in v{version}");
                }
                let hash = ruma::signatures::reference_hash(&object, &rules).unwrap();
                assert_eq!(format!("${hash}"), event_id, "event ID is the reference hash (v{version})");
                ruma::state_res::check_pdu_format(&object, &rules.event_format).unwrap();
                if pdu["type"] == "m.room.create" && version == "12" {
                    assert_eq!(room, format!("!{hash}"), "the v12 room ID is the create event's hash");
                }
            }
        }
    }
}
