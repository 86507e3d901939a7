//! A room of another server enters the graph from a `send_join` response: its state as
//! outliers, the join placed on it.

use hearth::{
    matrix::{
        keys::SigningKey,
        pdu::{EventTemplate, Pdu, Placement, canonical_content},
    },
    service::rooms::receive::Outcome,
    storage::rooms::{Dir, TopoPos},
};
use ruma::{
    MilliSecondsSinceUnixEpoch, OwnedEventId, OwnedRoomId, RoomId, RoomVersionId, ServerName, UInt, UserId,
    signatures::PublicKeySet,
};
use serde_json::{Value, json};

use crate::{
    backend_tests,
    harness::{Backend, Fixture, now},
};

backend_tests!(
    a_remote_room_enters_the_graph_from_the_state_of_a_join,
    a_refused_join_leaves_no_trace_of_the_remote_room,
);

/// The start of a public room of the remote server, room version 12: its create event, bob's
/// join, power levels and join rules.
fn public_remote_room(f: &Fixture) -> [Pdu; 4] {
    let (remote, key) = (f.remote.server.clone(), &f.remote.key);
    let bob = f.remote.user.clone();
    let create = event(None, &bob, "m.room.create", Some(""), json!({"room_version": "12"}), &[], &[], 1, &remote, key);
    let room = create.room_id.clone();
    let r = Some(&*room);
    let bob_join = event(
        r,
        &bob,
        "m.room.member",
        Some(bob.as_str()),
        json!({"membership": "join"}),
        std::slice::from_ref(&create.event_id),
        &[],
        2,
        &remote,
        key,
    );
    let levels = event(
        r,
        &bob,
        "m.room.power_levels",
        Some(""),
        json!({"users": {}}),
        std::slice::from_ref(&bob_join.event_id),
        std::slice::from_ref(&bob_join.event_id),
        3,
        &remote,
        key,
    );
    let rules = event(
        r,
        &bob,
        "m.room.join_rules",
        Some(""),
        json!({"join_rule": "public"}),
        std::slice::from_ref(&levels.event_id),
        &[levels.event_id.clone(), bob_join.event_id.clone()],
        4,
        &remote,
        key,
    );
    [create, bob_join, levels, rules]
}

/// An event of room version 12, signed by `server` with `key`.
#[allow(clippy::too_many_arguments)] // An event's fields, spelled out for the test.
fn event(
    room: Option<&RoomId>,
    sender: &UserId,
    event_type: &str,
    state_key: Option<&str>,
    content: Value,
    prev_events: &[OwnedEventId],
    auth_events: &[OwnedEventId],
    depth: u64,
    server: &ServerName,
    key: &SigningKey,
) -> Pdu {
    let rules = RoomVersionId::V12.rules().unwrap();
    let template = EventTemplate {
        event_type: event_type.to_owned(),
        state_key: state_key.map(str::to_owned),
        content: canonical_content(content).unwrap(),
        redacts: None,
    };
    let placement = Placement {
        room_id: room,
        sender,
        prev_events,
        auth_events,
        depth,
        origin_server_ts: MilliSecondsSinceUnixEpoch(UInt::new(now() + depth).unwrap()),
    };
    Pdu::build(template, &placement, &rules, server, key).unwrap()
}

async fn a_remote_room_enters_the_graph_from_the_state_of_a_join(backend: Backend) {
    let f = Fixture::new(backend, RoomVersionId::V12).await;
    let (remote, key) = (f.remote.server.clone(), &f.remote.key);
    let bob = f.remote.user.clone();
    let [create, bob_join, levels, rules] = public_remote_room(&f);
    let room: OwnedRoomId = create.room_id.clone();
    let r = Some(&*room);
    // Alice's join, as this server's make_join/send_join would have built it.
    let local = f.state.server_keys.key();
    let server_name = f.state.info.server_name.clone();
    let alice_join = event(
        r,
        &f.alice,
        "m.room.member",
        Some(f.alice.as_str()),
        json!({"membership": "join"}),
        std::slice::from_ref(&rules.event_id),
        &[levels.event_id.clone(), rules.event_id.clone()],
        5,
        &server_name,
        local,
    );
    let mut keys = f.remote.keys.clone();
    let mut set = PublicKeySet::new();
    set.insert(local.key_id(), ruma::serde::Base64::parse(local.public_key_base64()).unwrap());
    keys.insert(server_name.to_string(), set);

    let state = [&create, &bob_join, &levels, &rules].map(|e| e.canonical_object()).to_vec();
    let outcome = f
        .state
        .rooms
        .receive_with_state(
            &remote,
            &room,
            &RoomVersionId::V12,
            alice_join.canonical_object(),
            state,
            Vec::new(),
            &keys,
        )
        .await
        .expect("receive with state");
    assert!(matches!(outcome, Outcome::Accepted { .. }), "{outcome:?}");
    let current = |event_type: &'static str, state_key: String| {
        let rooms = f.state.rooms.clone();
        let room = room.clone();
        async move {
            rooms.current_state_event(&room, event_type, &state_key).await.unwrap().map(|e| e.pdu.event_id.clone())
        }
    };
    assert_eq!(current("m.room.join_rules", String::new()).await, Some(rules.event_id.clone()));
    assert_eq!(current("m.room.member", bob.to_string()).await, Some(bob_join.event_id.clone()));
    assert_eq!(f.state.rooms.streams.membership(&f.alice, &room).as_deref(), Some("join"));

    // The state came in as outliers: only the join is in the timeline.
    let timeline = |rooms: std::sync::Arc<hearth::service::rooms::Rooms>,
                    alice: ruma::OwnedUserId,
                    room: OwnedRoomId| async move {
        let access = rooms.read_access(&alice, &room).await.expect("access");
        let page =
            rooms.page(&alice, &room, TopoPos::END, None, Dir::Backward, 100, None, &access).await.expect("page");
        page.events.iter().map(|e| e.pdu.event_id.clone()).collect::<Vec<_>>()
    };
    assert_eq!(timeline(f.state.rooms.clone(), f.alice.clone(), room.clone()).await, vec![alice_join.event_id.clone()]);
    let sync: serde_json::Value = serde_json::from_str(&f.initial_sync().await).unwrap();
    let ids = |section: &str| -> Vec<String> {
        sync["rooms"]["join"][room.as_str()][section]["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["event_id"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(ids("timeline"), vec![alice_join.event_id.to_string()], "outliers are not in the timeline");
    // The state that came with the join is the room's state where the timeline starts.
    assert!(ids("state").contains(&bob_join.event_id.to_string()), "{sync}");
    assert!(ids("state").contains(&rules.event_id.to_string()), "{sync}");
    // The join is a gap: its prev event is an outlier, history before it unknown.
    let gap = vec![(alice_join.event_id.clone(), rules.event_id.clone())];
    assert_eq!(f.state.rooms.gaps(&room, 10).await.unwrap(), gap);

    // The room goes on from the join.
    let message = event(
        r,
        &bob,
        "m.room.message",
        None,
        json!({"msgtype": "m.text", "body": "welcome"}),
        std::slice::from_ref(&alice_join.event_id),
        &[levels.event_id.clone(), bob_join.event_id.clone()],
        6,
        &remote,
        key,
    );
    let outcome =
        f.state.rooms.receive_pdu(&remote, &room, message.canonical_object(), &keys, Vec::new()).await.unwrap();
    assert!(matches!(outcome, Outcome::Accepted { .. }), "{outcome:?}");
    assert!(f.initial_sync().await.contains("welcome"));
    let Outcome::Accepted { event_id: welcome, .. } = outcome else { unreachable!() };

    // And alice writes into it on top of the remote state (whose events are outliers).
    let sender = hearth::service::rooms::send::Sender { user_id: &f.alice, device_id: None, txn_id: None };
    let reply = f
        .state
        .rooms
        .send_message(&sender, &room, "m.room.message", json!({"msgtype": "m.text", "body": "thanks"}))
        .await
        .expect("send into the joined room");
    // Events on top of known ones open no gap; the join's stays.
    assert_eq!(f.state.rooms.gaps(&room, 10).await.unwrap(), gap);
    assert_eq!(reply.pdu.prev_events, vec![welcome]);
    let auth: std::collections::HashSet<_> = reply.pdu.auth_events.iter().cloned().collect();
    assert_eq!(auth, [levels.event_id.clone(), alice_join.event_id.clone()].into_iter().collect());
}

async fn a_refused_join_leaves_no_trace_of_the_remote_room(backend: Backend) {
    let f = Fixture::new(backend, RoomVersionId::V12).await;
    let (remote, key) = (f.remote.server.clone(), &f.remote.key);
    let bob = f.remote.user.clone();
    let create = event(None, &bob, "m.room.create", Some(""), json!({"room_version": "12"}), &[], &[], 1, &remote, key);
    let room = create.room_id.clone();
    // Alice's join into a room whose state is only the create event: not allowed (the room has
    // no join rules, so it is not public).
    let local = f.state.server_keys.key();
    let server_name = f.state.info.server_name.clone();
    let join = event(
        Some(&room),
        &f.alice,
        "m.room.member",
        Some(f.alice.as_str()),
        json!({"membership": "join"}),
        std::slice::from_ref(&create.event_id),
        &[],
        2,
        &server_name,
        local,
    );
    let mut keys = f.remote.keys.clone();
    let mut set = PublicKeySet::new();
    set.insert(local.key_id(), ruma::serde::Base64::parse(local.public_key_base64()).unwrap());
    keys.insert(server_name.to_string(), set);
    let outcome = f
        .state
        .rooms
        .receive_with_state(
            &remote,
            &room,
            &RoomVersionId::V12,
            join.canonical_object(),
            vec![create.canonical_object()],
            Vec::new(),
            &keys,
        )
        .await
        .expect("receive with state");
    assert!(matches!(outcome, Outcome::Rejected { .. }), "{outcome:?}");
    assert!(f.state.rooms.handle(&room).await.is_err(), "the room is still unknown");
    assert_eq!(f.state.rooms.streams.membership(&f.alice, &room), None);
}

/// Joining a remote room of `MEMBERS` members while alice keeps sending in her own room: the
/// join's outliers are written in bounded transactions outside any room's writer, so her sends
/// keep going. Prints the join time and the slowest send; never asserted (a measurement), so
/// `#[ignore]`d: `cargo test --test dag -- --ignored --nocapture big_join`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn big_join_leaves_other_rooms_writable() {
    const MEMBERS: usize = 2_000;
    let f = std::sync::Arc::new(Fixture::new(Backend::Sqlite, RoomVersionId::V12).await);
    let (remote, key) = (f.remote.server.clone(), &f.remote.key);
    let [create, bob_join, levels, rules] = public_remote_room(&f);
    let room: OwnedRoomId = create.room_id.clone();
    let r = Some(&*room);
    let mut state = vec![create.clone(), bob_join, levels.clone(), rules.clone()];
    let mut prev = rules.event_id.clone();
    for i in 0..MEMBERS {
        let user: ruma::OwnedUserId = format!("@member{i}:remote.test").try_into().unwrap();
        let join = event(
            r,
            &user,
            "m.room.member",
            Some(user.as_str()),
            json!({"membership": "join"}),
            std::slice::from_ref(&prev),
            &[levels.event_id.clone(), rules.event_id.clone()],
            5 + i as u64,
            &remote,
            key,
        );
        prev = join.event_id.clone();
        state.push(join);
    }
    let local = f.state.server_keys.key();
    let server_name = f.state.info.server_name.clone();
    let alice_join = event(
        r,
        &f.alice,
        "m.room.member",
        Some(f.alice.as_str()),
        json!({"membership": "join"}),
        std::slice::from_ref(&prev),
        &[levels.event_id.clone(), rules.event_id.clone()],
        10 + MEMBERS as u64,
        &server_name,
        local,
    );
    let mut keys = f.remote.keys.clone();
    let mut set = PublicKeySet::new();
    set.insert(local.key_id(), ruma::serde::Base64::parse(local.public_key_base64()).unwrap());
    keys.insert(server_name.to_string(), set);

    let joiner = f.clone();
    let objects: Vec<_> = state.iter().map(|e| e.canonical_object()).collect();
    let started = std::time::Instant::now();
    let join = tokio::spawn(async move {
        let outcome = joiner
            .state
            .rooms
            .receive_with_state(
                &remote,
                &room,
                &RoomVersionId::V12,
                alice_join.canonical_object(),
                objects,
                Vec::new(),
                &keys,
            )
            .await
            .expect("join");
        (outcome, started.elapsed())
    });
    let mut slowest = std::time::Duration::ZERO;
    let mut sends = 0;
    while !join.is_finished() && sends < 10_000 {
        let sent = std::time::Instant::now();
        f.send("while joining").await;
        slowest = slowest.max(sent.elapsed());
        sends += 1;
    }
    let (outcome, took) = join.await.unwrap();
    assert!(matches!(outcome, Outcome::Accepted { .. }), "{outcome:?}");
    eprintln!("joined a room of {MEMBERS} members in {took:?}; {sends} local sends meanwhile, the slowest {slowest:?}");
}
