//! Joins as the resident server of a room that spans three servers: a join taken in through
//! `send_join` is sent on to the room's other servers; restricted rooms admit members of an
//! allowed room, with our user named and our signature added as authoriser; a server the room's
//! `m.room.server_acl` denies can neither join nor send into the room, and is sent nothing; a
//! `send_join` with `omit_members=true` gets partial state.

use serde_json::{Value, json};

use crate::{
    harness::{Account, Backend, TestServer, enc},
    membership::{eventually, wait_for_message},
    testnet::{Discovered, Peer, TestNet, json as body_of, x_matrix},
};

crate::backend_tests!(
    a_join_through_one_server_reaches_the_rooms_other_servers,
    a_restricted_room_admits_members_of_an_allowed_room_only,
    a_restricted_join_goes_through_the_server_that_can_authorise_it,
    a_server_denied_by_the_acl_cannot_join_or_send_and_is_sent_nothing,
    send_join_with_omit_members_leaves_out_member_events_but_the_heroes,
);

async fn three_peers(backend: Backend) -> (TestNet, Peer, Peer, Peer) {
    let net = TestNet::new().await;
    let a = net.peer(backend, "a.test", Discovered::Srv, "").await.expect("an address for a.test");
    let b = net.peer(backend, "b.test", Discovered::Srv, "").await.expect("an address for b.test");
    let c = net.peer(backend, "c.test", Discovered::Srv, "").await.expect("an address for c.test");
    (net, a, b, c)
}

/// `account` on `peer` joins `room` through a.test.
async fn join_through_a(peer: &Peer, account: &Account, room: &str) -> (u16, Value) {
    let path = format!("/_matrix/client/v3/join/{}?via=a.test", enc(room));
    let (status, body) = peer.server.post(&path, Some(&account.access_token), json!({})).await;
    (status.as_u16(), body)
}

async fn is_joined(server: &TestServer, reader: &Account, room: &str, user_id: &str) -> bool {
    let path = format!("/_matrix/client/v3/rooms/{}/joined_members", enc(room));
    let (status, body) = server.get(&path, Some(&reader.access_token)).await;
    status == 200 && body["joined"][user_id].is_object()
}

/// The room's current member event of `user_id` on `server`, as the PDU stored there.
async fn member_pdu(server: &TestServer, reader: &Account, room: &str, user_id: &str) -> Value {
    let (status, body) =
        server.get(&format!("/_matrix/client/v3/rooms/{}/state", enc(room)), Some(&reader.access_token)).await;
    assert_eq!(status, 200, "{body}");
    let event = body
        .as_array()
        .unwrap()
        .iter()
        .find(|event| event["type"] == "m.room.member" && event["state_key"] == user_id)
        .unwrap_or_else(|| panic!("no member event of {user_id}: {body}"));
    server.stored_pdu(event["event_id"].as_str().unwrap()).await
}

async fn a_join_through_one_server_reaches_the_rooms_other_servers(backend: Backend) {
    let (_net, a, b, c) = three_peers(backend).await;
    let alice = a.server.register("alice").await;
    let bob = b.server.register("bob").await;
    let carol = c.server.register("carol").await;
    let room = a.server.create_room(&alice, json!({"preset": "public_chat"})).await;
    assert_eq!(join_through_a(&b, &bob, &room).await.0, 200);
    let (status, body) = join_through_a(&c, &carol, &room).await;
    assert_eq!(status, 200, "{body}");

    // B never talked to C: it learns of Carol's join only because A sends it on.
    eventually(30, "Carol's join reaches B", || is_joined(&b.server, &bob, &room, &carol.user_id)).await;
    c.server.send_text(&carol, &room, "hello from C").await;
    wait_for_message(&b.server, &bob, &room, "hello from C").await;
    b.server.send_text(&bob, &room, "hello from B").await;
    wait_for_message(&c.server, &carol, &room, "hello from B").await;
    wait_for_message(&a.server, &alice, &room, "hello from B").await;
}

async fn a_restricted_room_admits_members_of_an_allowed_room_only(backend: Backend) {
    let net = TestNet::new().await;
    let a = net.peer(backend, "a.test", Discovered::Srv, "").await.expect("an address for a.test");
    let b = net.peer(backend, "b.test", Discovered::Srv, "").await.expect("an address for b.test");
    let alice = a.server.register("alice").await;
    let member = b.server.register("member").await;
    let outsider = b.server.register("outsider").await;
    // The space-like room whose members may join the restricted rooms.
    let space = a.server.create_room(&alice, json!({"preset": "public_chat"})).await;
    assert_eq!(join_through_a(&b, &member, &space).await.0, 200);

    for version in ["10", "11", "12"] {
        let room = a
            .server
            .create_room(
                &alice,
                json!({
                    "preset": "private_chat",
                    "room_version": version,
                    "initial_state": [{
                        "type": "m.room.join_rules",
                        "state_key": "",
                        "content": {
                            "join_rule": "restricted",
                            "allow": [{"type": "m.room_membership", "room_id": space}],
                        },
                    }],
                }),
            )
            .await;

        let (status, body) = join_through_a(&b, &member, &room).await;
        assert_eq!(status, 200, "v{version}: a member of the allowed room joins: {body}");
        // A named Alice as authoriser and signed the join; B keeps the join A signed.
        for (server, reader) in [(&a.server, &alice), (&b.server, &member)] {
            let join = member_pdu(server, reader, &room, &member.user_id).await;
            assert_eq!(join["content"]["join_authorised_via_users_server"], alice.user_id.as_str(), "v{version}");
            assert!(join["signatures"]["a.test"].is_object(), "v{version}: {join}");
            assert!(join["signatures"]["b.test"].is_object(), "v{version}: {join}");
        }
        b.server.send_text(&member, &room, &format!("in v{version}")).await;
        wait_for_message(&a.server, &alice, &room, &format!("in v{version}")).await;

        let (status, body) = join_through_a(&b, &outsider, &room).await;
        assert_eq!((status, body["errcode"].as_str()), (403, Some("M_FORBIDDEN")), "v{version}: {body}");
        assert!(!is_joined(&a.server, &alice, &room, &outsider.user_id).await);
    }

    // A room restricted to a room A is not in: A cannot tell, and says so.
    let elsewhere = "!elsewhere:c.test";
    let unknown_to_a = a
        .server
        .create_room(
            &alice,
            json!({
                "preset": "private_chat",
                "initial_state": [{
                    "type": "m.room.join_rules",
                    "state_key": "",
                    "content": {"join_rule": "restricted", "allow": [{"type": "m.room_membership", "room_id": elsewhere}]},
                }],
            }),
        )
        .await;
    let (client, base) = net.client_for(&a);
    let uri = format!(
        "/_matrix/federation/v1/make_join/{}/{}?ver=10&ver=11&ver=12",
        enc(&unknown_to_a),
        enc(&outsider.user_id)
    );
    let auth = x_matrix(&b.signing_key(), "b.test", "a.test", "GET", &uri, None);
    let (status, body) =
        body_of(client.get(format!("{base}{uri}")).header("Authorization", auth).send().await.unwrap()).await;
    assert_eq!((status, body["errcode"].as_str()), (400, Some("M_UNABLE_TO_AUTHORISE_JOIN")), "{body}");

    // A restricted join that names Alice but lacks A's signature, handed over in a transaction
    // rather than through send_join, is refused and does not join.
    let room = a
        .server
        .create_room(
            &alice,
            json!({
                "preset": "private_chat",
                "initial_state": [{
                    "type": "m.room.join_rules",
                    "state_key": "",
                    "content": {"join_rule": "restricted", "allow": [{"type": "m.room_membership", "room_id": space}]},
                }],
            }),
        )
        .await;
    let content = json!({"membership": "join", "join_authorised_via_users_server": alice.user_id});
    let join = join_signed_by_b(&net, &a, &b, &room, &member.user_id, content).await;
    let txn = json!({"origin": "b.test", "origin_server_ts": 1, "pdus": [serde_json::from_str::<Value>(&join.json).unwrap()]});
    let uri = "/_matrix/federation/v1/send/unsigned-restricted-join";
    let auth = x_matrix(&b.signing_key(), "b.test", "a.test", "PUT", uri, Some(&txn));
    let (status, body) =
        body_of(client.put(format!("{base}{uri}")).header("Authorization", auth).json(&txn).send().await.unwrap())
            .await;
    assert_eq!(status, 200, "{body}");
    let error = body["pdus"][join.event_id.as_str()]["error"].as_str().unwrap_or_else(|| panic!("{body}"));
    assert!(error.contains("signature"), "{body}");
    assert!(!is_joined(&a.server, &alice, &room, &member.user_id).await);
}

async fn a_restricted_join_goes_through_the_server_that_can_authorise_it(backend: Backend) {
    let (_net, a, b, c) = three_peers(backend).await;
    let alice = a.server.register("alice").await;
    let bob = b.server.register("bob").await;
    let carol = c.server.register("carol").await;
    // The allowed room lives on C; A is not in it, so A cannot tell who is.
    let space = c.server.create_room(&carol, json!({"preset": "public_chat"})).await;
    let path = format!("/_matrix/client/v3/join/{}?via=c.test", enc(&space));
    let (status, body) = b.server.post(&path, Some(&bob.access_token), json!({})).await;
    assert_eq!(status, 200, "{body}");
    let room = a.server.create_room(&alice, json!({"preset": "public_chat"})).await;
    assert_eq!(join_through_a(&c, &carol, &room).await.0, 200);
    let levels_path = format!("/_matrix/client/v3/rooms/{}/state/m.room.power_levels", enc(&room));
    let (status, mut levels) = a.server.get(&levels_path, Some(&alice.access_token)).await;
    assert_eq!(status, 200, "{levels}");
    levels["users"][&carol.user_id] = json!(100);
    let (status, body) = a.server.set_state(&alice, &room, "m.room.power_levels", "", levels).await;
    assert_eq!(status, 200, "{body}");
    let rule = json!({"join_rule": "restricted", "allow": [{"type": "m.room_membership", "room_id": space}]});
    let (status, body) = a.server.set_state(&alice, &room, "m.room.join_rules", "", rule).await;
    assert_eq!(status, 200, "{body}");
    let rule_path = format!("/_matrix/client/v3/rooms/{}/state/m.room.join_rules", enc(&room));
    eventually(30, "the join rule reaches C", || async {
        let (status, body) = c.server.get(&rule_path, Some(&carol.access_token)).await;
        status == 200 && body["join_rule"] == "restricted"
    })
    .await;

    // A answers M_UNABLE_TO_AUTHORISE_JOIN; B tries C, whose Carol may invite (the power levels
    // reached C before the join rule did) and vouches.
    let path = format!("/_matrix/client/v3/join/{}?via=a.test&via=c.test", enc(&room));
    let (status, body) = b.server.post(&path, Some(&bob.access_token), json!({})).await;
    assert_eq!(status, 200, "{body}");
    eventually(30, "Bob's join reaches A", || is_joined(&a.server, &alice, &room, &bob.user_id)).await;
    let join = member_pdu(&a.server, &alice, &room, &bob.user_id).await;
    assert_eq!(join["content"]["join_authorised_via_users_server"], carol.user_id.as_str(), "{join}");
    assert!(join["signatures"]["c.test"].is_object(), "{join}");
    b.server.send_text(&bob, &room, "in through C").await;
    wait_for_message(&a.server, &alice, &room, "in through C").await;
}

/// A message of `sender` (a user of `peer`) following `previous_id` in `room`, signed by `peer`.
async fn next_message(
    peer: &Peer,
    previous_id: &str,
    room: &str,
    sender: &str,
    body: &str,
) -> hearth::matrix::pdu::Pdu {
    let previous = peer.server.stored_pdu(previous_id).await;
    let auth_events: Vec<ruma::OwnedEventId> =
        previous["auth_events"].as_array().unwrap().iter().map(|id| id.as_str().unwrap().try_into().unwrap()).collect();
    let template = hearth::matrix::pdu::EventTemplate {
        event_type: "m.room.message".to_owned(),
        state_key: None,
        content: hearth::matrix::pdu::canonical_content(json!({"msgtype": "m.text", "body": body})).unwrap(),
        redacts: None,
    };
    let room_id: ruma::OwnedRoomId = room.try_into().unwrap();
    let sender: ruma::OwnedUserId = sender.try_into().unwrap();
    let prev = vec![ruma::OwnedEventId::try_from(previous_id).unwrap()];
    let placement = hearth::matrix::pdu::Placement {
        room_id: Some(&room_id),
        sender: &sender,
        prev_events: &prev,
        auth_events: &auth_events,
        depth: previous["depth"].as_u64().unwrap() + 1,
        origin_server_ts: ruma::MilliSecondsSinceUnixEpoch::now(),
    };
    let rules = ruma::RoomVersionId::V12.rules().unwrap();
    let server_name: &ruma::ServerName = sender.server_name();
    hearth::matrix::pdu::Pdu::build(template, &placement, &rules, server_name, &peer.signing_key()).unwrap()
}

async fn a_server_denied_by_the_acl_cannot_join_or_send_and_is_sent_nothing(backend: Backend) {
    let (net, a, b, c) = three_peers(backend).await;
    let alice = a.server.register("alice").await;
    let bob = b.server.register("bob").await;
    let carol = c.server.register("carol").await;
    let room = a.server.create_room(&alice, json!({"preset": "public_chat"})).await;
    let other_room = a.server.create_room(&alice, json!({"preset": "public_chat"})).await;
    assert_eq!(join_through_a(&b, &bob, &room).await.0, 200);
    assert_eq!(join_through_a(&c, &carol, &room).await.0, 200);
    assert_eq!(join_through_a(&c, &carol, &other_room).await.0, 200);
    let before = c.server.send_text(&carol, &room, "before the ACL").await;
    wait_for_message(&a.server, &alice, &room, "before the ACL").await;

    let acl = json!({"allow": ["*"], "deny": ["c.test"], "allow_ip_literals": false});
    let (status, body) = a.server.set_state(&alice, &room, "m.room.server_acl", "", acl).await;
    assert_eq!(status, 200, "{body}");

    // Outbound: A's queue for C is one ordered queue, so once C has a later message of another
    // room, anything queued for it before would have arrived too.
    a.server.send_text(&alice, &room, "not for C").await;
    a.server.send_text(&alice, &other_room, "after the ACL").await;
    wait_for_message(&b.server, &bob, &room, "not for C").await;
    wait_for_message(&c.server, &carol, &other_room, "after the ACL").await;
    let (status, body) = c
        .server
        .get(&format!("/_matrix/client/v3/rooms/{}/messages?dir=b&limit=50", enc(&room)), Some(&carol.access_token))
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(body["chunk"].as_array().unwrap().iter().all(|e| e["content"]["body"] != "not for C"), "{body}");

    // Inbound: C's PDUs for the room are refused one by one, and nothing of them reaches A.
    let pdu = next_message(&c, &before, &room, &carol.user_id, "after the ACL, from C").await;
    let txn = json!({
        "origin": "c.test",
        "origin_server_ts": 1,
        "pdus": [serde_json::from_str::<Value>(&pdu.json).unwrap()],
    });
    let (client, base) = net.client_for(&a);
    let uri = "/_matrix/federation/v1/send/acl-txn-1";
    let auth = x_matrix(&c.signing_key(), "c.test", "a.test", "PUT", uri, Some(&txn));
    let (status, body) =
        body_of(client.put(format!("{base}{uri}")).header("Authorization", auth).json(&txn).send().await.unwrap())
            .await;
    assert_eq!(status, 200, "{body}");
    assert!(body["pdus"][pdu.event_id.as_str()]["error"].is_string(), "{body}");
    let path = format!("/_matrix/client/v3/rooms/{}/event/{}", enc(&room), enc(pdu.event_id.as_str()));
    let (status, body) = a.server.get(&path, Some(&alice.access_token)).await;
    assert_eq!(status, 404, "{body}");

    // Joins of C's users are refused at both steps, before anything else about them is looked
    // at (so any event will do for `send_join`).
    let dave = "@dave:c.test";
    let uri = format!("/_matrix/federation/v1/make_join/{}/{}?ver=12", enc(&room), enc(dave));
    let auth = x_matrix(&c.signing_key(), "c.test", "a.test", "GET", &uri, None);
    let (status, body) =
        body_of(client.get(format!("{base}{uri}")).header("Authorization", auth).send().await.unwrap()).await;
    assert_eq!((status, body["errcode"].as_str()), (403, Some("M_FORBIDDEN")), "{body}");
    let uri = format!("/_matrix/federation/v2/send_join/{}/{}", enc(&room), enc(pdu.event_id.as_str()));
    let event: Value = serde_json::from_str(&pdu.json).unwrap();
    let auth = x_matrix(&c.signing_key(), "c.test", "a.test", "PUT", &uri, Some(&event));
    let (status, body) =
        body_of(client.put(format!("{base}{uri}")).header("Authorization", auth).json(&event).send().await.unwrap())
            .await;
    assert_eq!((status, body["errcode"].as_str()), (403, Some("M_FORBIDDEN")), "{body}");
}

/// The event ID of a PDU as JSON (room version 12).
fn event_id_of(pdu: &Value) -> String {
    let object: ruma::CanonicalJsonObject = serde_json::from_value(pdu.clone()).unwrap();
    let rules = ruma::RoomVersionId::V12.rules().unwrap();
    hearth::matrix::pdu::Pdu::from_received(&object, &rules).unwrap().event_id.to_string()
}

/// A join of `user` (of B) into `room` on A with `content`, built on the template of a signed
/// `make_join` the test makes itself, signed with B's key only.
async fn join_signed_by_b(
    net: &TestNet,
    a: &Peer,
    b: &Peer,
    room: &str,
    user: &str,
    content: Value,
) -> hearth::matrix::pdu::Pdu {
    let (client, base) = net.client_for(a);
    let uri = format!("/_matrix/federation/v1/make_join/{}/{}?ver=12", enc(room), enc(user));
    let auth = x_matrix(&b.signing_key(), "b.test", "a.test", "GET", &uri, None);
    let (status, body) =
        body_of(client.get(format!("{base}{uri}")).header("Authorization", auth).send().await.unwrap()).await;
    assert_eq!(status, 200, "{body}");
    let template = &body["event"];
    let ids = |field: &str| -> Vec<ruma::OwnedEventId> {
        template[field].as_array().unwrap().iter().map(|id| id.as_str().unwrap().try_into().unwrap()).collect()
    };
    let (prev_events, auth_events) = (ids("prev_events"), ids("auth_events"));
    let room_id: ruma::OwnedRoomId = room.try_into().unwrap();
    let sender: ruma::OwnedUserId = user.try_into().unwrap();
    hearth::matrix::pdu::Pdu::build(
        hearth::matrix::pdu::EventTemplate {
            event_type: "m.room.member".to_owned(),
            state_key: Some(user.to_owned()),
            content: hearth::matrix::pdu::canonical_content(content).unwrap(),
            redacts: None,
        },
        &hearth::matrix::pdu::Placement {
            room_id: Some(&room_id),
            sender: &sender,
            prev_events: &prev_events,
            auth_events: &auth_events,
            depth: template["depth"].as_u64().unwrap(),
            origin_server_ts: ruma::MilliSecondsSinceUnixEpoch::now(),
        },
        &ruma::RoomVersionId::V12.rules().unwrap(),
        sender.server_name(),
        &b.signing_key(),
    )
    .unwrap()
}

/// `@bob:b.test` joins `room` on A as B would, by signed `make_join` and `send_join` requests
/// the test makes itself with B's key, asking `omit_members`; returns the `send_join` answer.
async fn partial_join(net: &TestNet, a: &Peer, b: &Peer, room: &str) -> Value {
    let join = join_signed_by_b(net, a, b, room, "@bob:b.test", json!({"membership": "join"})).await;
    let (client, base) = net.client_for(a);
    let event: Value = serde_json::from_str(&join.json).unwrap();
    let uri =
        format!("/_matrix/federation/v2/send_join/{}/{}?omit_members=true", enc(room), enc(join.event_id.as_str()));
    let auth = x_matrix(&b.signing_key(), "b.test", "a.test", "PUT", &uri, Some(&event));
    let (status, body) =
        body_of(client.put(format!("{base}{uri}")).header("Authorization", auth).json(&event).send().await.unwrap())
            .await;
    assert_eq!(status, 200, "{body}");
    body
}

async fn send_join_with_omit_members_leaves_out_member_events_but_the_heroes(backend: Backend) {
    let net = TestNet::new().await;
    let a = net.peer(backend, "a.test", Discovered::Srv, "").await.expect("an address for a.test");
    let b = net.peer(backend, "b.test", Discovered::Srv, "").await.expect("an address for b.test");
    let alice = a.server.register("alice").await;
    let unnamed = a.server.create_room(&alice, json!({"preset": "public_chat"})).await;
    let named = a.server.create_room(&alice, json!({"preset": "public_chat", "name": "Named"})).await;
    let mut locals = vec![alice.user_id.clone()];
    for name in ["u1", "u2", "u3", "u4", "u5"] {
        let account = a.server.register(name).await;
        a.server.join(&account, &unnamed).await;
        a.server.join(&account, &named).await;
        locals.push(account.user_id.clone());
    }
    locals.sort();

    for (room, expected_members) in [(&unnamed, locals[..5].to_vec()), (&named, Vec::new())] {
        let answer = partial_join(&net, &a, &b, room).await;
        assert_eq!(answer["members_omitted"], true, "{answer}");
        assert_eq!(answer["servers_in_room"], json!(["a.test"]), "{answer}");
        let state = answer["state"].as_array().unwrap();
        let chain = answer["auth_chain"].as_array().unwrap();
        // Only the heroes' member events (the five first members by user ID) in an unnamed
        // room, none in a named one; everything else of the state is there.
        let mut members: Vec<String> = state
            .iter()
            .filter(|e| e["type"] == "m.room.member")
            .map(|e| e["state_key"].as_str().unwrap().to_owned())
            .collect();
        members.sort();
        assert_eq!(members, expected_members, "{answer}");
        for event_type in ["m.room.create", "m.room.power_levels", "m.room.join_rules"] {
            assert!(state.iter().any(|e| e["type"] == event_type), "{event_type} missing: {answer}");
        }
        // The auth chain repeats nothing of the state, and with it covers every auth event.
        let state_ids: Vec<String> = state.iter().map(event_id_of).collect();
        let chain_ids: Vec<String> = chain.iter().map(event_id_of).collect();
        assert!(chain_ids.iter().all(|id| !state_ids.contains(id)), "{answer}");
        for event in state.iter().chain(chain) {
            for id in event["auth_events"].as_array().unwrap() {
                let id = id.as_str().unwrap().to_owned();
                assert!(state_ids.contains(&id) || chain_ids.contains(&id), "{id} is not served: {answer}");
            }
        }
    }
}
