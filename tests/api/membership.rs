//! Membership: invite, join (ID and alias), leave, kick, ban, unban, knock, restricted joins,
//! forget, member lists and profile propagation.

use serde_json::{Value, json};

use crate::harness::{Account, Backend, TestServer, assert_error, backend_tests, enc};

fn path(room: &str, action: &str) -> String {
    format!("/_matrix/client/v3/rooms/{}/{action}", enc(room))
}

async fn membership_of(server: &TestServer, token: &str, room: &str, user: &str) -> Option<String> {
    let (status, body) = server.get(&format!("{}/{}", path(room, "state/m.room.member"), enc(user)), Some(token)).await;
    (status == 200).then(|| body["membership"].as_str().unwrap().to_owned())
}

async fn joined_rooms(server: &TestServer, token: &str) -> Vec<String> {
    let (_, body) = server.get("/_matrix/client/v3/joined_rooms", Some(token)).await;
    body["joined_rooms"].as_array().unwrap().iter().map(|r| r.as_str().unwrap().to_owned()).collect()
}

backend_tests! {
    async fn invite_join_leave(backend) {
        let server = TestServer::start(backend).await;
        let alice = server.register("alice").await;
        let bob = server.register("bob").await;
        let room = server.create_room(&alice, json!({"preset": "private_chat"})).await;
        // Invite-only: bob cannot just join.
        assert_error(&server.post(&path(&room, "join"), Some(&bob.access_token), json!({})).await, 403, "M_FORBIDDEN");
        server.invite(&alice, &room, &bob.user_id).await;
        assert_eq!(membership_of(&server, &alice.access_token, &room, &bob.user_id).await.as_deref(), Some("invite"));
        server.join(&bob, &room).await;
        assert_eq!(joined_rooms(&server, &bob.access_token).await, vec![room.clone()]);
        let (_, members) = server.get(&path(&room, "joined_members"), Some(&bob.access_token)).await;
        assert_eq!(members["joined"][&alice.user_id]["display_name"], "alice");
        assert!(members["joined"].get(&bob.user_id).is_some());
        assert_eq!(server.post(&path(&room, "leave"), Some(&bob.access_token), json!({"reason": "bye"})).await.0, 200);
        assert!(joined_rooms(&server, &bob.access_token).await.is_empty());
        let member = server.get(&format!("{}/{}", path(&room, "state/m.room.member"), enc(&bob.user_id)), Some(&alice.access_token)).await.1;
        assert_eq!(member["membership"], "leave");
        assert_eq!(member["reason"], "bye");
        // Leaving again is harmless.
        assert_eq!(server.post(&path(&room, "leave"), Some(&bob.access_token), json!({})).await.0, 200);
    }

    async fn join_by_alias_and_unknown_rooms(backend) {
        let server = TestServer::start(backend).await;
        let alice = server.register("alice").await;
        let bob = server.register("bob").await;
        let room = server.create_room(&alice, json!({"preset": "public_chat", "room_alias_name": "hall"})).await;
        let (status, body) = server.post("/_matrix/client/v3/join/%23hall%3Alocalhost", Some(&bob.access_token), json!({})).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["room_id"], room);
        assert_error(&server.post("/_matrix/client/v3/join/%23nope%3Alocalhost", Some(&bob.access_token), json!({})).await, 404, "M_NOT_FOUND");
        assert_error(&server.post("/_matrix/client/v3/join/%21nope%3Alocalhost", Some(&bob.access_token), json!({})).await, 404, "M_NOT_FOUND");
        assert_error(&server.post("/_matrix/client/v3/join/garbage", Some(&bob.access_token), json!({})).await, 400, "M_INVALID_PARAM");
    }

    async fn kick_ban_unban(backend) {
        let server = TestServer::start(backend).await;
        let alice = server.register("alice").await;
        let bob = server.register("bob").await;
        let carol = server.register("carol").await;
        let room = server.create_room(&alice, json!({"preset": "public_chat"})).await;
        server.join(&bob, &room).await;
        server.join(&carol, &room).await;
        // Carol has no power to kick.
        assert_error(&server.post(&path(&room, "kick"), Some(&carol.access_token), json!({"user_id": bob.user_id})).await, 403, "M_FORBIDDEN");
        assert_eq!(server.post(&path(&room, "kick"), Some(&alice.access_token), json!({"user_id": bob.user_id, "reason": "spam"})).await.0, 200);
        assert_eq!(membership_of(&server, &alice.access_token, &room, &bob.user_id).await.as_deref(), Some("leave"));
        server.join(&bob, &room).await; // kicked users of a public room may come back
        assert_eq!(server.post(&path(&room, "ban"), Some(&alice.access_token), json!({"user_id": bob.user_id})).await.0, 200);
        assert_error(&server.post(&path(&room, "join"), Some(&bob.access_token), json!({})).await, 403, "M_FORBIDDEN");
        assert_error(&server.post(&path(&room, "unban"), Some(&carol.access_token), json!({"user_id": bob.user_id})).await, 403, "M_FORBIDDEN");
        assert_eq!(server.post(&path(&room, "unban"), Some(&alice.access_token), json!({"user_id": bob.user_id})).await.0, 200);
        assert_error(&server.post(&path(&room, "unban"), Some(&alice.access_token), json!({"user_id": bob.user_id})).await, 403, "M_FORBIDDEN");
        server.join(&bob, &room).await;
        assert_error(&server.post(&path(&room, "kick"), Some(&alice.access_token), json!({"user_id": "@ghost:localhost"})).await, 403, "M_FORBIDDEN");
    }

    async fn knocking(backend) {
        let server = TestServer::start(backend).await;
        let alice = server.register("alice").await;
        let bob = server.register("bob").await;
        let room = server.create_room(&alice, json!({"initial_state": [{"type": "m.room.join_rules", "content": {"join_rule": "knock"}}], "name": "Knock knock"})).await;
        let (status, body) = server.post(&format!("/_matrix/client/v3/knock/{}", enc(&room)), Some(&bob.access_token), json!({"reason": "let me in"})).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(membership_of(&server, &alice.access_token, &room, &bob.user_id).await.as_deref(), Some("knock"));
        let (sync, _) = server.sync_until(&bob, None, |s| s["rooms"]["knock"].get(&room).is_some()).await;
        let knock_state = sync["rooms"]["knock"][&room]["knock_state"]["events"].as_array().unwrap();
        assert!(knock_state.iter().any(|e| e["type"] == "m.room.name"));
        server.invite(&alice, &room, &bob.user_id).await;
        server.join(&bob, &room).await;
        // Knocking on a room that does not allow it.
        let closed = server.create_room(&alice, json!({"preset": "private_chat"})).await;
        assert_error(&server.post(&format!("/_matrix/client/v3/knock/{}", enc(&closed)), Some(&bob.access_token), json!({})).await, 403, "M_FORBIDDEN");
    }

    async fn restricted_rooms_admit_members_of_allowed_rooms(backend) {
        let server = TestServer::start(backend).await;
        let alice = server.register("alice").await;
        let bob = server.register("bob").await;
        let carol = server.register("carol").await;
        let space = server.create_room(&alice, json!({"preset": "public_chat"})).await;
        server.join(&bob, &space).await;
        let room = server
            .create_room(&alice, json!({"initial_state": [{"type": "m.room.join_rules", "content": {"join_rule": "restricted", "allow": [{"type": "m.room_membership", "room_id": space}]}}]}))
            .await;
        server.join(&bob, &room).await;
        let member = server.get(&format!("{}/{}", path(&room, "state/m.room.member"), enc(&bob.user_id)), Some(&bob.access_token)).await.1;
        assert_eq!(member["join_authorised_via_users_server"], alice.user_id);
        assert_error(&server.post(&path(&room, "join"), Some(&carol.access_token), json!({})).await, 403, "M_FORBIDDEN");
    }

    async fn members_listing_with_filters(backend) {
        let server = TestServer::start(backend).await;
        let alice = server.register("alice").await;
        let bob = server.register("bob").await;
        let carol = server.register("carol").await;
        let room = server.create_room(&alice, json!({"preset": "public_chat"})).await;
        server.join(&bob, &room).await;
        let at = server.sync(&alice, None, None, 0).await["next_batch"].as_str().unwrap().to_owned();
        server.invite(&alice, &room, &carol.user_id).await;
        let members = |query: &'static str| {
            let server = &server;
            let token = alice.access_token.clone();
            let room = room.clone();
            async move {
                let (status, body) = server.get(&format!("{}?{query}", path(&room, "members")), Some(&token)).await;
                assert_eq!(status, 200, "{body}");
                let mut users: Vec<String> = body["chunk"].as_array().unwrap().iter().map(|e| e["state_key"].as_str().unwrap().to_owned()).collect();
                users.sort();
                users
            }
        };
        assert_eq!(members("").await, vec![alice.user_id.clone(), bob.user_id.clone(), carol.user_id.clone()]);
        assert_eq!(members("membership=invite").await, vec![carol.user_id.clone()]);
        assert_eq!(members("not_membership=invite").await, vec![alice.user_id.clone(), bob.user_id.clone()]);
        let (status, body) = server.get(&format!("{}?at={}", path(&room, "members"), enc(&at)), Some(&alice.access_token)).await;
        assert_eq!(status, 200);
        assert_eq!(body["chunk"].as_array().unwrap().len(), 2, "carol was not a member yet at `at`");
        // Outsiders see nothing.
        let dave = server.register("dave").await;
        let private = server.create_room(&alice, json!({"preset": "private_chat"})).await;
        assert_error(&server.get(&path(&private, "members"), Some(&dave.access_token)).await, 403, "M_FORBIDDEN");
        assert_error(&server.get(&path(&private, "joined_members"), Some(&dave.access_token)).await, 403, "M_FORBIDDEN");
    }

    async fn forget_hides_a_left_room(backend) {
        let server = TestServer::start(backend).await;
        let alice = server.register("alice").await;
        let bob = server.register("bob").await;
        let room = server.create_room(&alice, json!({"preset": "public_chat"})).await;
        server.join(&bob, &room).await;
        assert_error(&server.post(&path(&room, "forget"), Some(&bob.access_token), json!({})).await, 400, "M_UNKNOWN");
        server.post(&path(&room, "leave"), Some(&bob.access_token), json!({})).await;
        let filter = r#"{"room":{"include_leave":true}}"#;
        let sync = server.sync(&bob, None, Some(filter), 0).await;
        assert!(sync["rooms"]["leave"].get(&room).is_some(), "{sync}");
        assert_eq!(server.post(&path(&room, "forget"), Some(&bob.access_token), json!({})).await.0, 200);
        let sync = server.sync(&bob, None, Some(filter), 0).await;
        assert!(sync["rooms"]["leave"].get(&room).is_none(), "{sync}");
    }

    async fn profile_changes_reach_rooms(backend) {
        let server = TestServer::start(backend).await;
        let alice = server.register("alice").await;
        let bob = server.register("bob").await;
        let room = server.create_room(&alice, json!({"preset": "public_chat"})).await;
        server.join(&bob, &room).await;
        let (_, since) = server.sync_until(&bob, None, |_| true).await;
        server.put(&format!("/_matrix/client/v3/profile/{}/displayname", enc(&alice.user_id)), Some(&alice.access_token), json!({"displayname": "Alice W."})).await;
        let (sync, _) = server
            .sync_until(&bob, Some(since), |s| {
                crate::harness::timeline(s, &room).iter().any(|e| e["type"] == "m.room.member" && e["content"]["displayname"] == "Alice W.")
            })
            .await;
        let event = crate::harness::timeline(&sync, &room).into_iter().find(|e| e["type"] == "m.room.member").unwrap().clone();
        assert_eq!(event["unsigned"]["prev_content"]["displayname"], "alice", "{event}");
    }

    async fn deactivated_users_leave_their_rooms(backend) {
        let server = TestServer::start(backend).await;
        let alice = server.register("alice").await;
        let bob = server.register("bob").await;
        let room = server.create_room(&alice, json!({"preset": "public_chat"})).await;
        server.join(&bob, &room).await;
        let (_, challenge) = server.post("/_matrix/client/v3/account/deactivate", Some(&bob.access_token), json!({})).await;
        let auth = json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": "bob"}, "password": bob.password, "session": challenge["session"]});
        assert_eq!(server.post("/_matrix/client/v3/account/deactivate", Some(&bob.access_token), json!({"auth": auth})).await.0, 200);
        assert_eq!(membership_of(&server, &alice.access_token, &room, &bob.user_id).await.as_deref(), Some("leave"));
    }

    async fn state_and_members_are_refused_to_users_who_never_joined(backend) {
        state_and_members_are_refused_to_users_who_never_joined(backend).await
    }

    async fn departed_users_read_state_as_of_their_leave(backend) {
        departed_users_read_state_as_of_their_leave(backend).await
    }

    async fn guests_join_only_rooms_that_allow_guests(backend) {
        let server = TestServer::start_with(backend, "[registration]\nguest_access = true\n").await;
        let alice = server.register("alice").await;
        let (status, guest) = server.post("/_matrix/client/v3/register?kind=guest", None, json!({})).await;
        assert_eq!(status, 200, "{guest}");
        let guest_token = guest["access_token"].as_str().unwrap();
        // A public room without `m.room.guest_access` (the public_chat preset sets none) forbids guests.
        let public = server.create_room(&alice, json!({"preset": "public_chat"})).await;
        let refused = server.post(&format!("/_matrix/client/v3/join/{}", enc(&public)), Some(guest_token), json!({})).await;
        assert_error(&refused, 403, "M_FORBIDDEN");
        let refused = server.post(&format!("/_matrix/client/v3/rooms/{}/join", enc(&public)), Some(guest_token), json!({})).await;
        assert_error(&refused, 403, "M_FORBIDDEN");
        assert_eq!(membership_of(&server, &alice.access_token, &public, guest["user_id"].as_str().unwrap()).await, None);

        let (status, body) = server.set_state(&alice, &public, "m.room.guest_access", "", json!({"guest_access": "can_join"})).await;
        assert_eq!(status, 200, "{body}");
        let joined = server.post(&format!("/_matrix/client/v3/join/{}", enc(&public)), Some(guest_token), json!({})).await;
        assert_eq!(joined.0, 200, "{}", joined.1);
        // Full accounts are not affected by guest_access.
        let other = server.create_room(&alice, json!({"preset": "public_chat"})).await;
        let bob = server.register("bob").await;
        server.join(&bob, &other).await;
    }
}

/// The three reads of a room's state, as `(status, body)`.
async fn state_reads(server: &TestServer, who: &Account, room: &str, owner: &str) -> [(reqwest::StatusCode, Value); 3] {
    let token = Some(who.access_token.as_str());
    [
        server.get(&path(room, "state"), token).await,
        server.get(&format!("{}/{}", path(room, "state/m.room.member"), enc(owner)), token).await,
        server.get(&path(room, "members"), token).await,
    ]
}

/// Invitees and knockers get the stripped state of their sync only; a ban does not make a
/// stranger a former member.
async fn state_and_members_are_refused_to_users_who_never_joined(backend: Backend) {
    let server = TestServer::start(backend).await;
    let alice = server.register("alice").await;
    let knocker = server.register("knocker").await;
    let invitee = server.register("invitee").await;
    let banned = server.register("banned").await;
    let room = server
        .create_room(
            &alice,
            json!({"initial_state": [{"type": "m.room.join_rules", "content": {"join_rule": "knock"}}]}),
        )
        .await;
    server.send_text(&alice, &room, "members only").await;
    let (status, body) =
        server.post(&format!("/_matrix/client/v3/knock/{}", enc(&room)), Some(&knocker.access_token), json!({})).await;
    assert_eq!(status, 200, "{body}");
    server.invite(&alice, &room, &invitee.user_id).await;
    let (status, body) =
        server.post(&path(&room, "ban"), Some(&alice.access_token), json!({"user_id": banned.user_id})).await;
    assert_eq!(status, 200, "{body}");
    for who in [&knocker, &invitee, &banned] {
        for read in state_reads(&server, who, &room, &alice.user_id).await {
            assert_error(&read, 403, "M_FORBIDDEN");
        }
        let messages = server.get(&format!("{}?dir=b", path(&room, "messages")), Some(&who.access_token)).await;
        assert_error(&messages, 403, "M_FORBIDDEN");
    }
    // The invitee still sees the room's stripped state in their sync.
    let (sync, _) = server.sync_until(&invitee, None, |s| s["rooms"]["invite"].get(&room).is_some()).await;
    assert!(
        sync["rooms"]["invite"][&room]["invite_state"]["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["type"] == "m.room.join_rules")
    );
}

fn topic_of(state: &Value) -> Option<&str> {
    state.as_array().unwrap().iter().find(|e| e["type"] == "m.room.topic").and_then(|e| e["content"]["topic"].as_str())
}

fn member_ids(members: &Value) -> Vec<&str> {
    let mut ids: Vec<&str> =
        members["chunk"].as_array().unwrap().iter().map(|e| e["state_key"].as_str().unwrap()).collect();
    ids.sort();
    ids
}

/// A user who left (or was banned after joining) reads the state as it was when their stay
/// ended, not later changes — also after being invited back; after forgetting, nothing.
async fn departed_users_read_state_as_of_their_leave(backend: Backend) {
    let server = TestServer::start(backend).await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let dave = server.register("dave").await;
    let carol = server.register("carol").await;
    let room = server.create_room(&alice, json!({"preset": "public_chat", "topic": "first"})).await;
    server.join(&bob, &room).await;
    server.join(&dave, &room).await;
    assert_eq!(server.post(&path(&room, "leave"), Some(&bob.access_token), json!({})).await.0, 200);
    assert_eq!(
        server.post(&path(&room, "ban"), Some(&alice.access_token), json!({"user_id": dave.user_id})).await.0,
        200
    );
    let (status, body) = server.set_state(&alice, &room, "m.room.topic", "", json!({"topic": "second"})).await;
    assert_eq!(status, 200, "{body}");
    server.join(&carol, &room).await;
    server.invite(&alice, &room, &bob.user_id).await;
    for (who, own) in [(&bob, "leave"), (&dave, "ban")] {
        let [all, alice_member, members] = state_reads(&server, who, &room, &alice.user_id).await;
        assert_eq!(all.0, 200, "{}", all.1);
        assert_eq!(topic_of(&all.1), Some("first"), "{}", all.1);
        assert_eq!(alice_member.0, 200, "{}", alice_member.1);
        let (status, topic) = server.get(&path(&room, "state/m.room.topic"), Some(&who.access_token)).await;
        assert_eq!((status.as_u16(), topic["topic"].as_str()), (200, Some("first")), "{topic}");
        assert_eq!(members.0, 200, "{}", members.1);
        let mut expected = vec![alice.user_id.as_str(), bob.user_id.as_str(), dave.user_id.as_str()];
        expected.sort();
        assert_eq!(member_ids(&members.1), expected, "carol joined after: {}", members.1);
        let own_event = members.1["chunk"].as_array().unwrap().iter().find(|e| e["state_key"] == who.user_id).unwrap();
        assert_eq!(own_event["content"]["membership"], own);
    }
    // Those in the room see the current state.
    let (_, current) = server.get(&path(&room, "state"), Some(&carol.access_token)).await;
    assert_eq!(topic_of(&current), Some("second"));
    // A forgotten room is no longer readable.
    assert_eq!(server.post(&path(&room, "forget"), Some(&dave.access_token), json!({})).await.0, 200);
    for read in state_reads(&server, &dave, &room, &alice.user_id).await {
        assert_error(&read, 403, "M_FORBIDDEN");
    }
}
