//! Invites, leaves, knocks, kicks and bans across servers: a user of one Hearth invited into a
//! room on another sees the invite in sync with its stripped state (while the room is not in
//! `/joined_rooms`), accepts it and chats, or rejects it (through the inviting server, or
//! locally when that server is down); bad invites from a peer get Matrix errors; a knock on a
//! remote room shows in sync and the room's admin lets the knocker in; kicks, bans and unbans by
//! either server take effect on both.

use serde_json::{Value, json};

use crate::{
    harness::{Account, Backend, TestServer, enc, timeline},
    testnet::{Discovered, Peer, TestNet, json as body_of, x_matrix},
};

crate::backend_tests!(
    a_remote_invite_shows_in_sync_and_is_accepted,
    a_rejected_remote_invite_leaves_on_both_servers,
    an_invite_is_rejected_locally_when_the_inviting_server_is_down,
    an_invite_the_invitees_server_refuses_is_forbidden,
    bad_invites_from_a_peer_get_matrix_errors,
    a_knock_on_a_remote_room_shows_in_sync_and_is_let_in,
    a_retracted_remote_knock_leaves_the_room_on_both_servers,
    a_withdrawn_invite_and_a_refused_knock_reach_the_users_sync,
    a_remote_admin_kicks_bans_and_unbans_our_user,
    our_admin_bans_a_remote_user_who_then_cannot_send_or_rejoin,
);

async fn two_peers(backend: Backend) -> (TestNet, Peer, Peer) {
    let net = TestNet::new().await;
    let a = net.peer(backend, "a.test", Discovered::Srv, "").await.expect("an address for a.test");
    let b = net.peer(backend, "b.test", Discovered::Srv, "").await.expect("an address for b.test");
    (net, a, b)
}

/// Polls `check` until it holds, for at most `secs` seconds.
async fn eventually<F, Fut>(secs: u64, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        if check().await {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "not within {secs} s: {what}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// Bob on B creates a private room and invites Alice of A (with `/invite`, or with
/// createRoom's `invite` when `at_creation`).
async fn bob_invites_alice_with(a: &Peer, b: &Peer, at_creation: bool) -> (Account, Account, String) {
    let alice = a.server.register("alice").await;
    let bob = b.server.register("bob").await;
    let mut body = json!({"preset": "private_chat", "name": "Bob's den"});
    if at_creation {
        body["invite"] = json!([alice.user_id]);
    }
    let room = b.server.create_room(&bob, body).await;
    if !at_creation {
        b.server.invite(&bob, &room, &alice.user_id).await;
    }
    (alice, bob, room)
}

async fn bob_invites_alice(a: &Peer, b: &Peer) -> (Account, Account, String) {
    bob_invites_alice_with(a, b, false).await
}

/// A user's membership of a room as a server sees it (`None` when it has no member event).
async fn membership_on(server: &TestServer, viewer: &Account, room: &str, user: &str) -> Option<String> {
    let path = format!("/_matrix/client/v3/rooms/{}/state/m.room.member/{}", enc(room), enc(user));
    let (status, body) = server.get(&path, Some(&viewer.access_token)).await;
    (status == 200).then(|| body["membership"].as_str().unwrap_or_default().to_owned())
}

async fn joined_rooms(server: &TestServer, account: &Account) -> Vec<Value> {
    let (status, body) = server.get("/_matrix/client/v3/joined_rooms", Some(&account.access_token)).await;
    assert_eq!(status, 200, "{body}");
    body["joined_rooms"].as_array().unwrap().clone()
}

async fn post(server: &TestServer, account: &Account, path: &str, body: Value) -> (u16, Value) {
    let (status, body) = server.post(path, Some(&account.access_token), body).await;
    (status.as_u16(), body)
}

/// Syncs `account` until its timeline of `room` shows a message with `text`.
async fn wait_for_message(server: &TestServer, account: &Account, room: &str, text: &str) {
    let found = |sync: &Value| timeline(sync, room).iter().any(|e| e["content"]["body"] == text);
    if found(&server.sync(account, None, None, 0).await) {
        return;
    }
    server.sync_until(account, None, found).await;
}

async fn a_remote_invite_shows_in_sync_and_is_accepted(backend: Backend) {
    let (_net, a, b) = two_peers(backend).await;
    let (alice, bob, room) = bob_invites_alice(&a, &b).await;

    // A holds the invite for a room it is not in: sync shows it with the stripped state.
    let (sync, since) = a.server.sync_until(&alice, None, |sync| sync["rooms"]["invite"][&room].is_object()).await;
    let state = sync["rooms"]["invite"][&room]["invite_state"]["events"].as_array().unwrap().clone();
    assert!(state.iter().any(|e| e["type"] == "m.room.create"), "{state:?}");
    assert!(state.iter().any(|e| e["type"] == "m.room.name" && e["content"]["name"] == "Bob's den"), "{state:?}");
    let invite = state.iter().find(|e| e["type"] == "m.room.member").expect("the invite event");
    assert_eq!(invite["state_key"], alice.user_id.as_str());
    assert_eq!(invite["sender"], bob.user_id.as_str());
    assert_eq!(invite["content"]["membership"], "invite");
    assert!(!joined_rooms(&a.server, &alice).await.contains(&json!(room)));
    // The inviting server has the invite in its room, signed by both servers.
    assert_eq!(membership_on(&b.server, &bob, &room, &alice.user_id).await.as_deref(), Some("invite"));

    // Accepting joins through the inviter's server (a v12 room ID names none).
    let (status, body) =
        post(&a.server, &alice, &format!("/_matrix/client/v3/rooms/{}/join", enc(&room)), json!({})).await;
    assert_eq!(status, 200, "accept: {body}");
    let (sync, _) = a.server.sync_until(&alice, Some(since), |sync| sync["rooms"]["join"][&room].is_object()).await;
    assert!(sync["rooms"]["invite"][&room].is_null(), "{sync}");
    assert!(joined_rooms(&a.server, &alice).await.contains(&json!(room)));
    assert_eq!(membership_on(&b.server, &bob, &room, &alice.user_id).await.as_deref(), Some("join"));

    a.server.send_text(&alice, &room, "thanks for the invite").await;
    wait_for_message(&b.server, &bob, &room, "thanks for the invite").await;
    b.server.send_text(&bob, &room, "welcome").await;
    wait_for_message(&a.server, &alice, &room, "welcome").await;
}

async fn a_rejected_remote_invite_leaves_on_both_servers(backend: Backend) {
    let (_net, a, b) = two_peers(backend).await;
    // Invited as the room is created.
    let (alice, bob, room) = bob_invites_alice_with(&a, &b, true).await;
    let (_, since) = a.server.sync_until(&alice, None, |sync| sync["rooms"]["invite"][&room].is_object()).await;

    let (status, body) =
        post(&a.server, &alice, &format!("/_matrix/client/v3/rooms/{}/leave", enc(&room)), json!({"reason": "no"}))
            .await;
    assert_eq!(status, 200, "reject: {body}");
    let (sync, _) = a.server.sync_until(&alice, Some(since), |sync| sync["rooms"]["leave"][&room].is_object()).await;
    let events = sync["rooms"]["leave"][&room]["timeline"]["events"].as_array().unwrap();
    assert!(events.iter().any(|e| e["content"]["membership"] == "leave" && e["state_key"] == alice.user_id.as_str()));
    // An initial sync no longer shows the invite.
    let initial = a.server.sync(&alice, None, None, 0).await;
    assert!(initial["rooms"]["invite"][&room].is_null(), "{initial}");
    // The leave went through B: its room has Alice's rejection.
    assert_eq!(membership_on(&b.server, &bob, &room, &alice.user_id).await.as_deref(), Some("leave"));
}

async fn an_invite_is_rejected_locally_when_the_inviting_server_is_down(backend: Backend) {
    let (_net, a, mut b) = two_peers(backend).await;
    let (alice, _bob, room) = bob_invites_alice(&a, &b).await;
    let (_, since) = a.server.sync_until(&alice, None, |sync| sync["rooms"]["invite"][&room].is_object()).await;
    b.server.stop();

    let (status, body) =
        post(&a.server, &alice, &format!("/_matrix/client/v3/rooms/{}/leave", enc(&room)), json!({})).await;
    assert_eq!(status, 200, "reject: {body}");
    a.server.sync_until(&alice, Some(since), |sync| sync["rooms"]["leave"][&room].is_object()).await;
    let initial = a.server.sync(&alice, None, None, 0).await;
    assert!(initial["rooms"]["invite"][&room].is_null(), "{initial}");
    crate::testnet::log_line(&a.server, "the local-only rejection", |line| line.contains("only recorded here")).await;
}

async fn an_invite_the_invitees_server_refuses_is_forbidden(backend: Backend) {
    let (_net, a, b) = two_peers(backend).await;
    let _alice = a.server.register("alice").await;
    let bob = b.server.register("bob").await;
    let room = b.server.create_room(&bob, json!({"preset": "private_chat"})).await;
    let (status, body) = post(
        &b.server,
        &bob,
        &format!("/_matrix/client/v3/rooms/{}/invite", enc(&room)),
        json!({"user_id": "@nobody:a.test"}),
    )
    .await;
    assert_eq!((status, body["errcode"].as_str()), (403, Some("M_FORBIDDEN")), "{body}");
    // Nothing was committed into the room.
    assert_eq!(membership_on(&b.server, &bob, &room, "@nobody:a.test").await, None);
}

/// An invite event of `sender` (a user of A) for `target`, signed by A's key.
fn invite_pdu(a: &Peer, sender: &str, target: &str, event_type: &str) -> hearth::matrix::pdu::Pdu {
    let rules = ruma::RoomVersionId::V11.rules().unwrap();
    let template = hearth::matrix::pdu::EventTemplate {
        event_type: event_type.to_owned(),
        state_key: Some(target.to_owned()),
        content: hearth::matrix::pdu::canonical_content(json!({"membership": "invite"})).unwrap(),
        redacts: None,
    };
    let room_id: ruma::OwnedRoomId = "!elsewhere:a.test".try_into().unwrap();
    let sender: ruma::OwnedUserId = sender.try_into().unwrap();
    let prev = vec![ruma::OwnedEventId::try_from("$previous").unwrap()];
    let placement = hearth::matrix::pdu::Placement {
        room_id: Some(&room_id),
        sender: &sender,
        prev_events: &prev,
        auth_events: &prev,
        depth: 5,
        origin_server_ts: ruma::MilliSecondsSinceUnixEpoch::now(),
    };
    let server_name: &ruma::ServerName = "a.test".try_into().unwrap();
    hearth::matrix::pdu::Pdu::build(template, &placement, &rules, server_name, &a.signing_key()).unwrap()
}

/// Sends `event` as an invite to B, signed as A.
async fn put_invite(net: &TestNet, a: &Peer, b: &Peer, event_id: &str, event: Value) -> (u16, Value) {
    let uri = format!("/_matrix/federation/v2/invite/{}/{}", enc("!elsewhere:a.test"), enc(event_id));
    let body = json!({"room_version": "11", "event": event, "invite_room_state": []});
    let auth = x_matrix(&a.signing_key(), "a.test", "b.test", "PUT", &uri, Some(&body));
    let (client, base) = net.client_for(b);
    body_of(client.put(format!("{base}{uri}")).header("Authorization", auth).json(&body).send().await.unwrap()).await
}

async fn bad_invites_from_a_peer_get_matrix_errors(backend: Backend) {
    let (net, a, b) = two_peers(backend).await;
    let bob = b.server.register("bob").await;
    let as_json = |pdu: &hearth::matrix::pdu::Pdu| serde_json::from_str::<Value>(&pdu.json).unwrap();

    let good = invite_pdu(&a, "@alice:a.test", &bob.user_id, "m.room.member");
    let (status, body) = put_invite(&net, &a, &b, good.event_id.as_str(), as_json(&good)).await;
    assert_eq!(status, 200, "a good invite: {body}");
    assert!(body["event"]["signatures"]["b.test"].is_object(), "countersigned: {body}");

    let not_member = invite_pdu(&a, "@alice:a.test", &bob.user_id, "m.room.topic");
    let (status, body) = put_invite(&net, &a, &b, not_member.event_id.as_str(), as_json(&not_member)).await;
    assert_eq!((status, body["errcode"].as_str()), (400, Some("M_BAD_JSON")), "{body}");

    let not_ours = invite_pdu(&a, "@alice:a.test", "@carol:c.test", "m.room.member");
    let (status, body) = put_invite(&net, &a, &b, not_ours.event_id.as_str(), as_json(&not_ours)).await;
    assert_eq!((status, body["errcode"].as_str()), (403, Some("M_FORBIDDEN")), "{body}");

    let unknown = invite_pdu(&a, "@alice:a.test", "@nobody:b.test", "m.room.member");
    let (status, body) = put_invite(&net, &a, &b, unknown.event_id.as_str(), as_json(&unknown)).await;
    assert_eq!((status, body["errcode"].as_str()), (404, Some("M_NOT_FOUND")), "{body}");

    let other_origin = invite_pdu(&a, "@mallory:c.test", &bob.user_id, "m.room.member");
    let (status, body) = put_invite(&net, &a, &b, other_origin.event_id.as_str(), as_json(&other_origin)).await;
    assert_eq!((status, body["errcode"].as_str()), (403, Some("M_FORBIDDEN")), "{body}");

    // A signature that does not cover the event: the content was changed after signing (the
    // event ID is a hash of the redacted event, so the ID still matches).
    let forged = invite_pdu(&a, "@alice:a.test", &bob.user_id, "m.room.member");
    let mut forged_json = as_json(&forged);
    let signature = forged_json["signatures"]["a.test"].as_object().unwrap().keys().next().unwrap().clone();
    forged_json["signatures"]["a.test"][&signature] = json!("AAAA".repeat(21) + "AA");
    let (status, body) = put_invite(&net, &a, &b, forged.event_id.as_str(), forged_json).await;
    assert_eq!((status, body["errcode"].as_str()), (403, Some("M_FORBIDDEN")), "{body}");

    // None of the refused invites shows; the good one does.
    let sync = b.server.sync(&bob, None, None, 0).await;
    let invites = sync["rooms"]["invite"].as_object().unwrap();
    assert_eq!(invites.len(), 1, "{sync}");
}

/// Bob on B creates a room with the `knock` join rule.
async fn knock_room(b: &Peer) -> (Account, String) {
    let bob = b.server.register("bob").await;
    let room = b
        .server
        .create_room(
            &bob,
            json!({"preset": "private_chat", "name": "Knock here",
                   "initial_state": [{"type": "m.room.join_rules", "state_key": "", "content": {"join_rule": "knock"}}]}),
        )
        .await;
    (bob, room)
}

async fn a_knock_on_a_remote_room_shows_in_sync_and_is_let_in(backend: Backend) {
    let (_net, a, b) = two_peers(backend).await;
    let alice = a.server.register("alice").await;
    let (bob, room) = knock_room(&b).await;

    let (status, body) = post(
        &a.server,
        &alice,
        &format!("/_matrix/client/v3/knock/{}?via=b.test", enc(&room)),
        json!({"reason": "hi"}),
    )
    .await;
    assert_eq!(status, 200, "knock: {body}");
    let (sync, since) = a.server.sync_until(&alice, None, |sync| sync["rooms"]["knock"][&room].is_object()).await;
    let state = sync["rooms"]["knock"][&room]["knock_state"]["events"].as_array().unwrap();
    assert!(state.iter().any(|e| e["type"] == "m.room.name" && e["content"]["name"] == "Knock here"), "{sync}");
    assert_eq!(membership_on(&b.server, &bob, &room, &alice.user_id).await.as_deref(), Some("knock"));

    // Bob lets her in with an invite, which reaches A by /v2/invite; she accepts.
    b.server.invite(&bob, &room, &alice.user_id).await;
    let (_, since) = a.server.sync_until(&alice, Some(since), |sync| sync["rooms"]["invite"][&room].is_object()).await;
    let (status, body) =
        post(&a.server, &alice, &format!("/_matrix/client/v3/rooms/{}/join", enc(&room)), json!({})).await;
    assert_eq!(status, 200, "accept: {body}");
    a.server.sync_until(&alice, Some(since), |sync| sync["rooms"]["join"][&room].is_object()).await;
    assert_eq!(membership_on(&b.server, &bob, &room, &alice.user_id).await.as_deref(), Some("join"));
}

async fn a_retracted_remote_knock_leaves_the_room_on_both_servers(backend: Backend) {
    let (_net, a, b) = two_peers(backend).await;
    let alice = a.server.register("alice").await;
    let (bob, room) = knock_room(&b).await;
    let (status, body) =
        post(&a.server, &alice, &format!("/_matrix/client/v3/knock/{}?via=b.test", enc(&room)), json!({})).await;
    assert_eq!(status, 200, "knock: {body}");
    let (_, since) = a.server.sync_until(&alice, None, |sync| sync["rooms"]["knock"][&room].is_object()).await;
    let (status, body) =
        post(&a.server, &alice, &format!("/_matrix/client/v3/rooms/{}/leave", enc(&room)), json!({})).await;
    assert_eq!(status, 200, "retract: {body}");
    a.server.sync_until(&alice, Some(since), |sync| sync["rooms"]["leave"][&room].is_object()).await;
    assert_eq!(membership_on(&b.server, &bob, &room, &alice.user_id).await.as_deref(), Some("leave"));
}

async fn a_withdrawn_invite_and_a_refused_knock_reach_the_users_sync(backend: Backend) {
    let (_net, a, b) = two_peers(backend).await;
    let (alice, bob, room) = bob_invites_alice(&a, &b).await;
    let (_, since) = a.server.sync_until(&alice, None, |sync| sync["rooms"]["invite"][&room].is_object()).await;
    // Bob withdraws the invite: the leave reaches A by /send although A is not in the room.
    let kick = |room: &str| format!("/_matrix/client/v3/rooms/{}/kick", enc(room));
    let (status, body) = post(&b.server, &bob, &kick(&room), json!({"user_id": alice.user_id})).await;
    assert_eq!(status, 200, "withdraw: {body}");
    let (sync, since) =
        a.server.sync_until(&alice, Some(since), |sync| sync["rooms"]["leave"][&room].is_object()).await;
    let events = sync["rooms"]["leave"][&room]["timeline"]["events"].as_array().unwrap();
    assert!(events.iter().any(|e| e["sender"] == bob.user_id.as_str() && e["content"]["membership"] == "leave"));
    let (status, body) =
        post(&a.server, &alice, &format!("/_matrix/client/v3/rooms/{}/join", enc(&room)), json!({})).await;
    assert_eq!(status, 403, "a withdrawn invite does not let her in: {body}");

    // A knock Bob refuses.
    let (_, knock_room) = {
        let room = b
            .server
            .create_room(
                &bob,
                json!({"preset": "private_chat",
                       "initial_state": [{"type": "m.room.join_rules", "state_key": "", "content": {"join_rule": "knock"}}]}),
            )
            .await;
        ((), room)
    };
    let path = format!("/_matrix/client/v3/knock/{}?via=b.test", enc(&knock_room));
    let (status, body) = post(&a.server, &alice, &path, json!({})).await;
    assert_eq!(status, 200, "knock: {body}");
    let (_, since) =
        a.server.sync_until(&alice, Some(since), |sync| sync["rooms"]["knock"][&knock_room].is_object()).await;
    let (status, body) = post(&b.server, &bob, &kick(&knock_room), json!({"user_id": alice.user_id})).await;
    assert_eq!(status, 200, "refuse the knock: {body}");
    a.server.sync_until(&alice, Some(since), |sync| sync["rooms"]["leave"][&knock_room].is_object()).await;
}

/// Bob on B creates a public room; Alice on A joins it through B.
async fn alice_joins_bobs_room(a: &Peer, b: &Peer) -> (Account, Account, String) {
    let alice = a.server.register("alice").await;
    let bob = b.server.register("bob").await;
    let room = b.server.create_room(&bob, json!({"preset": "public_chat"})).await;
    let path = format!("/_matrix/client/v3/join/{}?via={}", enc(&room), b.name);
    let (status, body) = post(&a.server, &alice, &path, json!({})).await;
    assert_eq!(status, 200, "remote join: {body}");
    (alice, bob, room)
}

async fn a_remote_admin_kicks_bans_and_unbans_our_user(backend: Backend) {
    let (_net, a, b) = two_peers(backend).await;
    let (alice, bob, room) = alice_joins_bobs_room(&a, &b).await;
    let (_, since) = a.server.sync_until(&alice, None, |sync| sync["rooms"]["join"][&room].is_object()).await;
    let rooms_path = |action: &str| format!("/_matrix/client/v3/rooms/{}/{action}", enc(&room));

    // Kicked: the room moves to `leave` in Alice's sync and A is no longer in it.
    let (status, body) = post(&b.server, &bob, &rooms_path("kick"), json!({"user_id": alice.user_id})).await;
    assert_eq!(status, 200, "kick: {body}");
    let (_, since) = a.server.sync_until(&alice, Some(since), |sync| sync["rooms"]["leave"][&room].is_object()).await;
    assert!(!joined_rooms(&a.server, &alice).await.contains(&json!(room)));

    // She may rejoin after a kick; then Bob bans her.
    let (status, body) =
        post(&a.server, &alice, &format!("/_matrix/client/v3/join/{}?via=b.test", enc(&room)), json!({})).await;
    assert_eq!(status, 200, "rejoin after a kick: {body}");
    let (_, since) = a.server.sync_until(&alice, Some(since), |sync| sync["rooms"]["join"][&room].is_object()).await;
    let (status, body) = post(&b.server, &bob, &rooms_path("ban"), json!({"user_id": alice.user_id})).await;
    assert_eq!(status, 200, "ban: {body}");
    a.server.sync_until(&alice, Some(since), |sync| sync["rooms"]["leave"][&room].is_object()).await;
    assert_eq!(membership_on(&b.server, &bob, &room, &alice.user_id).await.as_deref(), Some("ban"));

    // Banned: neither rejoining nor sending works.
    let (status, body) =
        post(&a.server, &alice, &format!("/_matrix/client/v3/join/{}?via=b.test", enc(&room)), json!({})).await;
    assert_eq!((status, body["errcode"].as_str()), (403, Some("M_FORBIDDEN")), "join while banned: {body}");
    let path = format!("/_matrix/client/v3/rooms/{}/send/m.room.message/banned-1", enc(&room));
    let (status, body) =
        a.server.put(&path, Some(&alice.access_token), json!({"msgtype": "m.text", "body": "let me in"})).await;
    assert_eq!(status.as_u16(), 403, "send while banned: {body}");

    // Unbanned: she can join again.
    let (status, body) = post(&b.server, &bob, &rooms_path("unban"), json!({"user_id": alice.user_id})).await;
    assert_eq!(status, 200, "unban: {body}");
    let (status, body) =
        post(&a.server, &alice, &format!("/_matrix/client/v3/join/{}?via=b.test", enc(&room)), json!({})).await;
    assert_eq!(status, 200, "rejoin after the unban: {body}");
    a.server.send_text(&alice, &room, "back again").await;
    wait_for_message(&b.server, &bob, &room, "back again").await;
}

async fn our_admin_bans_a_remote_user_who_then_cannot_send_or_rejoin(backend: Backend) {
    let (_net, a, b) = two_peers(backend).await;
    // The room is on A this time: its admin is A's, the visitor B's.
    let (visitor, admin, room) = alice_joins_bobs_room(&b, &a).await;
    let rooms_path = |action: &str| format!("/_matrix/client/v3/rooms/{}/{action}", enc(&room));
    b.server.send_text(&visitor, &room, "hello").await;
    wait_for_message(&a.server, &admin, &room, "hello").await;

    // The visitor has no power to ban; the admin bans the visitor.
    let (status, body) = post(&b.server, &visitor, &rooms_path("ban"), json!({"user_id": admin.user_id})).await;
    assert_eq!(status, 403, "a member without power cannot ban: {body}");
    let (_, since) = b.server.sync_until(&visitor, None, |sync| sync["rooms"]["join"][&room].is_object()).await;
    let (status, body) = post(&a.server, &admin, &rooms_path("ban"), json!({"user_id": visitor.user_id})).await;
    assert_eq!(status, 200, "ban: {body}");
    b.server.sync_until(&visitor, Some(since), |sync| sync["rooms"]["leave"][&room].is_object()).await;
    eventually(20, "B no longer lists the room as joined", || async {
        !joined_rooms(&b.server, &visitor).await.contains(&json!(room))
    })
    .await;
    assert_eq!(membership_on(&a.server, &admin, &room, &visitor.user_id).await.as_deref(), Some("ban"));
    // Sending and rejoining are refused.
    let path = format!("/_matrix/client/v3/rooms/{}/send/m.room.message/late-1", enc(&room));
    let (status, body) =
        b.server.put(&path, Some(&visitor.access_token), json!({"msgtype": "m.text", "body": "late"})).await;
    assert_eq!(status.as_u16(), 403, "{body}");
    let (status, body) =
        post(&b.server, &visitor, &format!("/_matrix/client/v3/join/{}?via=a.test", enc(&room)), json!({})).await;
    assert_eq!(status, 403, "rejoin while banned: {body}");

    // Unbanned, the visitor comes back and is heard.
    let (status, body) = post(&a.server, &admin, &rooms_path("unban"), json!({"user_id": visitor.user_id})).await;
    assert_eq!(status, 200, "unban: {body}");
    let (status, body) =
        post(&b.server, &visitor, &format!("/_matrix/client/v3/join/{}?via=a.test", enc(&room)), json!({})).await;
    assert_eq!(status, 200, "rejoin after the unban: {body}");
    b.server.send_text(&visitor, &room, "back").await;
    wait_for_message(&a.server, &admin, &room, "back").await;
}
