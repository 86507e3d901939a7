//! Micro-benchmarks of the hot paths a message takes: building a PDU (canonical JSON, content
//! hash, signature, event ID), checking it against the auth rules, and building a `/sync`
//! response for a user in 100 rooms.
//!
//! Run with `cargo bench --bench hot_paths`. The fixtures are real: an SQLite database in a
//! temporary directory, filled through the same services the HTTP API uses.

use std::sync::{Arc, OnceLock};

use divan::{Bencher, black_box};
use hearth::{
    api::AppState,
    config::Config,
    matrix::{
        auth::{self, AuthState},
        keys::SigningKey,
        pdu::{EventTemplate, Pdu, Placement},
        room_version,
    },
    service::{
        rooms::{create::CreateRoom, send::Sender},
        stream::StreamToken,
        sync::SyncRequest,
    },
};
use ruma::{
    CanonicalJsonValue, MilliSecondsSinceUnixEpoch, OwnedEventId, OwnedRoomId, OwnedUserId, events::StateEventType,
    server_name,
};
use serde_json::json;

/// Rooms the syncing user is in, and messages already in each.
const ROOMS: usize = 100;
const MESSAGES_PER_ROOM: usize = 10;

fn main() {
    divan::main();
}

/// A server's services on a fresh SQLite database: alice and bob share [`ROOMS`] rooms.
struct Fixture {
    runtime: tokio::runtime::Runtime,
    state: AppState,
    alice: OwnedUserId,
    bob: OwnedUserId,
    rooms: Vec<OwnedRoomId>,
    _dir: tempfile::TempDir,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
        let dir = tempfile::tempdir().expect("temporary directory");
        let config = Config { data_dir: dir.path().to_owned(), ..Config::default() };
        let (state, alice, bob, rooms) = runtime.block_on(async {
            let db = hearth::app::open_database(&config).await.expect("database");
            let state = hearth::app::build_state(&config, db, "http://127.0.0.1/".to_owned()).await.expect("services");
            let alice = state.users.operator_create_user("alice", "bench-password", false).await.expect("alice");
            let bob = state.users.operator_create_user("bob", "bench-password", false).await.expect("bob");
            let mut rooms = Vec::new();
            for i in 0..ROOMS {
                let request = CreateRoom { name: Some(format!("room {i}")), ..CreateRoom::default() };
                let room = state.rooms.create_room(&alice, request).await.expect("create room");
                state.rooms.invite(&alice, &room, &bob, None, false).await.expect("invite");
                state.rooms.join(&bob, false, &room, None).await.expect("join");
                for m in 0..MESSAGES_PER_ROOM {
                    let sender = if m % 2 == 0 { &alice } else { &bob };
                    send(&state, sender, &room, &format!("message {m} in room {i}")).await;
                }
                rooms.push(room);
            }
            (state, alice, bob, rooms)
        });
        Fixture { runtime, state, alice, bob, rooms, _dir: dir }
    })
}

async fn send(state: &AppState, user: &OwnedUserId, room: &OwnedRoomId, body: &str) {
    let sender = Sender { user_id: user, device_id: None, txn_id: None };
    let content = json!({"msgtype": "m.text", "body": body});
    state.rooms.send_message(&sender, room, "m.room.message", content).await.expect("send");
}

fn sync_request(user: &OwnedUserId, since: Option<StreamToken>) -> SyncRequest {
    let filter = serde_json::from_value(json!({"room": {"timeline": {"limit": 10}}})).expect("filter");
    SyncRequest { user_id: user.clone(), device_id: "BENCH".to_owned(), since, filter, full_state: false }
}

/// A first `/sync` (no `since`) for a user in 100 rooms: state and the last 10 events of each.
#[divan::bench(sample_count = 30)]
fn sync_initial_100_rooms(bencher: Bencher) {
    let fixture = fixture();
    bencher.bench(|| {
        let response = fixture.runtime.block_on(fixture.state.sync.changes(&sync_request(&fixture.alice, None)));
        black_box(response.expect("sync"))
    });
}

/// An incremental `/sync` for a user in 100 rooms, after one new message in one of them — the
/// sync every member does for every message.
#[divan::bench(sample_count = 200)]
fn sync_incremental_one_message(bencher: Bencher) {
    let fixture = fixture();
    let (before, _) = fixture.runtime.block_on(async {
        let before = fixture.state.rooms.streams.position();
        send(&fixture.state, &fixture.bob, &fixture.rooms[ROOMS / 2], "one more").await;
        (before, ())
    });
    let since = StreamToken::new(before, fixture.state.rooms.streams.ephemeral_position());
    bencher.bench(|| {
        let response = fixture.runtime.block_on(fixture.state.sync.changes(&sync_request(&fixture.alice, Some(since))));
        let response = response.expect("sync");
        assert_eq!(response.rooms.join.len(), 1, "exactly the room with the new message");
        black_box(response)
    });
}

/// Signing material and the state of one room, as PDUs, for the event-level benchmarks.
struct RoomState {
    key: SigningKey,
    room_id: OwnedRoomId,
    sender: OwnedUserId,
    auth_state: AuthState,
    auth_events: Vec<OwnedEventId>,
    prev_events: Vec<OwnedEventId>,
}

fn room_state() -> &'static RoomState {
    static STATE: OnceLock<RoomState> = OnceLock::new();
    STATE.get_or_init(|| {
        let fixture = fixture();
        let room_id = fixture.rooms[0].clone();
        let events =
            fixture.runtime.block_on(fixture.state.rooms.full_state_for(&fixture.alice, &room_id)).expect("room state");
        let mut auth_state = AuthState::new();
        for event in &events {
            let key = (
                StateEventType::from(event.pdu.event_type.to_string()),
                event.pdu.state_key.clone().unwrap_or_default(),
            );
            auth_state.insert(key, Arc::new(event.pdu.clone()));
        }
        let rules = room_version::rules(&room_version::DEFAULT).expect("rules");
        let template = message_template();
        let auth_events = auth::auth_state_keys(&template, &fixture.alice, &rules.authorization)
            .expect("auth keys")
            .iter()
            .filter_map(|key| auth_state.get(key))
            .filter(|pdu| auth::belongs_in_auth_events(pdu, &rules.authorization))
            .map(|pdu| pdu.event_id.clone())
            .collect();
        let latest = events.iter().max_by_key(|event| event.stream_pos).expect("state events");
        RoomState {
            key: SigningKey::from_file(&SigningKey::generate_file()).expect("key"),
            room_id,
            sender: fixture.alice.clone(),
            auth_state,
            auth_events,
            prev_events: vec![latest.pdu.event_id.clone()],
        }
    })
}

fn message_template() -> EventTemplate {
    let mut content = ruma::CanonicalJsonObject::new();
    content.insert("msgtype".into(), CanonicalJsonValue::String("m.text".into()));
    content.insert("body".into(), CanonicalJsonValue::String("Hello from the benchmark 👋".into()));
    EventTemplate { event_type: "m.room.message".into(), state_key: None, content, redacts: None }
}

fn build_message(state: &RoomState) -> Pdu {
    let rules = room_version::rules(&room_version::DEFAULT).expect("rules");
    let placement = Placement {
        room_id: Some(&state.room_id),
        sender: &state.sender,
        prev_events: &state.prev_events,
        auth_events: &state.auth_events,
        depth: 100,
        origin_server_ts: MilliSecondsSinceUnixEpoch::now(),
    };
    Pdu::build(message_template(), &placement, &rules, server_name!("localhost"), &state.key).expect("build")
}

/// Canonical JSON, content hash, ed25519 signature and reference hash (event ID) of a message.
#[divan::bench]
fn pdu_build_and_sign(bencher: Bencher) {
    let state = room_state();
    bencher.bench(|| black_box(build_message(state)));
}

/// The spec's authorization rules for a message against its room's state (ruma's state_res).
#[divan::bench]
fn auth_check_message(bencher: Bencher) {
    let state = room_state();
    let rules = room_version::rules(&room_version::DEFAULT).expect("rules");
    let pdu = build_message(state);
    auth::check(&rules.authorization, &pdu, &state.auth_state).expect("the message is allowed");
    bencher.bench(|| black_box(auth::check(&rules.authorization, black_box(&pdu), &state.auth_state)));
}
