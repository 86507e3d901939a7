//! A Hearth server's services on a fresh database, a room on it, and a remote server that signs
//! PDUs for that room.

use hearth::{
    api::AppState,
    config::Config,
    matrix::{
        auth,
        keys::SigningKey,
        pdu::{EventTemplate, Pdu, Placement, canonical_content},
    },
    service::{
        rooms::{
            StateMap,
            create::{CreateRoom, Preset},
            send::Sender,
        },
        sync::SyncRequest,
    },
    storage::rooms::{Dir, TopoPos},
};
use ruma::{
    CanonicalJsonObject, MilliSecondsSinceUnixEpoch, OwnedEventId, OwnedRoomId, OwnedServerName, OwnedUserId,
    RoomVersionId, UInt,
    events::StateEventType,
    room_version_rules::RoomVersionRules,
    signatures::{PublicKeyMap, PublicKeySet},
};
use serde_json::{Value, json};

// Backends and throwaway PostgreSQL databases: the API tests' harness has them.
use crate::api_harness::PgDatabase;
pub use crate::api_harness::{Backend, postgres_available};

/// The other server: its name, signing key and the key map a receiver checks with.
pub struct Remote {
    pub server: OwnedServerName,
    pub key: SigningKey,
    pub keys: PublicKeyMap,
    pub user: OwnedUserId,
}

impl Remote {
    fn new() -> Remote {
        let key = SigningKey::from_file(&SigningKey::generate_file()).expect("key");
        let server: OwnedServerName = "remote.test".try_into().unwrap();
        let mut set = PublicKeySet::new();
        set.insert(key.key_id(), ruma::serde::Base64::parse(key.public_key_base64()).unwrap());
        let mut keys = PublicKeyMap::new();
        keys.insert(server.to_string(), set);
        let user = "@bob:remote.test".try_into().unwrap();
        Remote { server, key, keys, user }
    }
}

/// A server with alice's public room, which bob of remote.test has joined through a PDU.
pub struct Fixture {
    pub state: AppState,
    pub alice: OwnedUserId,
    pub room: OwnedRoomId,
    pub rules: RoomVersionRules,
    pub remote: Remote,
    /// Bob's join.
    pub bob_join: OwnedEventId,
    _dir: tempfile::TempDir,
    _pg: Option<PgDatabase>,
}

/// What a remote event says and where it goes.
pub struct Spec<'a> {
    pub sender: &'a OwnedUserId,
    pub event_type: &'a str,
    pub state_key: Option<&'a str>,
    pub content: Value,
    pub prev_events: Vec<OwnedEventId>,
    /// Auth events are selected from the state after this event.
    pub auth_from: OwnedEventId,
    pub ts: u64,
    pub redacts: Option<OwnedEventId>,
}

impl Fixture {
    pub async fn new(backend: Backend, version: RoomVersionId) -> Fixture {
        let dir = tempfile::tempdir().expect("temporary directory");
        let pg = match backend {
            Backend::Sqlite => None,
            Backend::Postgres => Some(PgDatabase::create().await),
        };
        let mut config = Config { data_dir: dir.path().to_owned(), ..Config::default() };
        config.database.url = pg.as_ref().map(PgDatabase::url);
        let db = hearth::app::open_database(&config).await.expect("database");
        let state = hearth::app::build_state(&config, db, "http://127.0.0.1/".to_owned()).await.expect("services");
        let alice = state.users.operator_create_user("alice", "dag-test-password", false).await.expect("alice");
        let request = CreateRoom {
            preset: Some(Preset::PublicChat),
            room_version: Some(version.clone()),
            ..CreateRoom::default()
        };
        let room = state.rooms.create_room(&alice, request).await.expect("create room");
        let rules = version.rules().expect("rules");
        let mut fixture = Fixture {
            state,
            alice,
            room,

            rules,
            remote: Remote::new(),
            bob_join: ruma::owned_event_id!("$none"),
            _dir: dir,
            _pg: pg,
        };
        let tip = fixture.latest().await;
        let bob = fixture.remote.user.clone();
        let join = fixture
            .remote_event(Spec {
                sender: &bob,
                event_type: "m.room.member",
                state_key: Some(bob.as_str()),
                content: json!({"membership": "join", "displayname": "Bob"}),
                prev_events: vec![tip.clone()],
                auth_from: tip,
                ts: now() - 60_000,
                redacts: None,
            })
            .await;
        let outcome = fixture.receive(&join).await;
        assert!(matches!(outcome, hearth::service::rooms::receive::Outcome::Accepted { .. }), "{outcome:?}");
        fixture.bob_join = join.event_id.clone();
        fixture
    }

    /// Another remote.test user joins (through a PDU on the room's newest event).
    pub async fn remote_join(&self, localpart: &str) -> OwnedUserId {
        let user: OwnedUserId = format!("@{localpart}:remote.test").try_into().unwrap();
        let tip = self.latest().await;
        let join = self
            .remote_event(Spec {
                sender: &user,
                event_type: "m.room.member",
                state_key: Some(user.as_str()),
                content: json!({"membership": "join"}),
                prev_events: vec![tip.clone()],
                auth_from: tip,
                ts: now(),
                redacts: None,
            })
            .await;
        let outcome = self.receive(&join).await;
        assert!(matches!(outcome, hearth::service::rooms::receive::Outcome::Accepted { .. }), "{outcome:?}");
        user
    }

    /// Alice sets a user's power level.
    pub async fn set_power(&self, user: &OwnedUserId, level: i64) -> OwnedEventId {
        let mut content =
            self.state.rooms.current_state_content(&self.room, "m.room.power_levels", "").await.unwrap().unwrap();
        content["users"][user.as_str()] = json!(level);
        self.send_state("m.room.power_levels", "", content).await
    }

    /// The newest event of the room (by stream position).
    pub async fn latest(&self) -> OwnedEventId {
        let access = self.state.rooms.read_access(&self.alice, &self.room).await.expect("access");
        let page = self
            .state
            .rooms
            .page(&self.alice, &self.room, TopoPos::END, None, Dir::Backward, 1, None, &access)
            .await
            .expect("page");
        page.events[0].pdu.event_id.clone()
    }

    /// The state after an event, as stored.
    pub async fn state_after(&self, event_id: &OwnedEventId) -> StateMap {
        let event = self.state.rooms.event(event_id).await.expect("read").expect("event stored");
        (*self.state.rooms.state_at(event.state_after).await.expect("state")).clone()
    }

    /// A PDU built and signed by remote.test.
    pub async fn remote_event(&self, spec: Spec<'_>) -> Pdu {
        self.remote_event_signed_with(spec, &self.remote.key).await
    }

    /// A PDU of remote.test signed with `key` (a forgery unless it is remote.test's key).
    pub async fn remote_event_signed_with(&self, spec: Spec<'_>, key: &SigningKey) -> Pdu {
        let template = EventTemplate {
            event_type: spec.event_type.to_owned(),
            state_key: spec.state_key.map(str::to_owned),
            content: canonical_content(spec.content).expect("content"),
            redacts: spec.redacts,
        };
        let state = self.state_after(&spec.auth_from).await;
        let keys = auth::auth_state_keys(&template, spec.sender, &self.rules.authorization).expect("auth keys");
        let auth_events: Vec<OwnedEventId> = keys
            .iter()
            .filter(|(t, _)| {
                *t != StateEventType::RoomCreate || !self.rules.authorization.room_create_event_id_as_room_id
            })
            .filter_map(|(t, k)| state.get(&(t.to_string(), k.clone())).cloned())
            .collect();
        let mut depth = 0;
        for prev in &spec.prev_events {
            let event = self.state.rooms.event(prev).await.expect("read").expect("prev stored");
            depth = depth.max(event.pdu.depth);
        }
        let placement = Placement {
            room_id: Some(&self.room),
            sender: spec.sender,
            prev_events: &spec.prev_events,
            auth_events: &auth_events,
            depth: depth + 1,
            origin_server_ts: MilliSecondsSinceUnixEpoch(UInt::new(spec.ts).unwrap()),
        };
        Pdu::build(template, &placement, &self.rules, &self.remote.server, key).expect("build")
    }

    /// A remote message from bob.
    pub async fn remote_message(&self, body: &str, prev: &OwnedEventId, ts: u64) -> Pdu {
        let bob = self.remote.user.clone();
        self.remote_event(Spec {
            sender: &bob,
            event_type: "m.room.message",
            state_key: None,
            content: json!({"msgtype": "m.text", "body": body}),
            prev_events: vec![prev.clone()],
            auth_from: prev.clone(),
            ts,
            redacts: None,
        })
        .await
    }

    pub async fn receive(&self, pdu: &Pdu) -> hearth::service::rooms::receive::Outcome {
        self.receive_object(pdu.canonical_object()).await
    }

    pub async fn receive_object(&self, object: CanonicalJsonObject) -> hearth::service::rooms::receive::Outcome {
        self.state
            .rooms
            .receive_pdu(&self.remote.server, &self.room, object, &self.remote.keys, Vec::new())
            .await
            .expect("receive_pdu never fails on bad input")
    }

    /// Alice sends a message; returns its event ID.
    pub async fn send(&self, body: &str) -> OwnedEventId {
        let sender = Sender { user_id: &self.alice, device_id: None, txn_id: None };
        let content = json!({"msgtype": "m.text", "body": body});
        let event = self.state.rooms.send_message(&sender, &self.room, "m.room.message", content).await.expect("send");
        event.pdu.event_id.clone()
    }

    /// Alice sends a state event; returns its event ID.
    pub async fn send_state(&self, event_type: &str, state_key: &str, content: Value) -> OwnedEventId {
        let event = self
            .state
            .rooms
            .send_state(&self.alice, &self.room, event_type, state_key, content, None)
            .await
            .expect("send state");
        event.pdu.event_id.clone()
    }

    /// The event ID of the room's current state at a key.
    pub async fn current(&self, event_type: &str, state_key: &str) -> Option<OwnedEventId> {
        self.state
            .rooms
            .current_state_event(&self.room, event_type, state_key)
            .await
            .expect("read")
            .map(|e| e.pdu.event_id.clone())
    }

    /// Alice's sync since `since` (a stream position) with a timeline of at most `limit` events.
    pub async fn sync_since(&self, since: i64, limit: u32) -> serde_json::Value {
        let filter = serde_json::from_value(json!({"room": {"timeline": {"limit": limit}}})).unwrap();
        let request = SyncRequest {
            user_id: self.alice.clone(),
            device_id: "DAGTEST".to_owned(),
            since: Some(hearth::service::stream::StreamToken::new(since, 0)),
            filter,
            full_state: false,
        };
        serde_json::to_value(self.state.sync.changes(&request).await.expect("sync")).unwrap()
    }

    /// Alice's initial sync, as JSON text.
    pub async fn initial_sync(&self) -> String {
        let filter = serde_json::from_value(json!({"room": {"timeline": {"limit": 100}}})).unwrap();
        let request = SyncRequest {
            user_id: self.alice.clone(),
            device_id: "DAGTEST".to_owned(),
            since: None,
            filter,
            full_state: false,
        };
        let response = self.state.sync.changes(&request).await.expect("sync");
        serde_json::to_string(&response).unwrap()
    }

    /// The IDs of the room's events alice's `/messages` (backwards, from now) returns.
    pub async fn messages(&self) -> Vec<OwnedEventId> {
        let access = self.state.rooms.read_access(&self.alice, &self.room).await.expect("access");
        let page = self
            .state
            .rooms
            .page(&self.alice, &self.room, TopoPos::END, None, Dir::Backward, 1000, None, &access)
            .await
            .expect("page");
        page.events.iter().map(|e| e.pdu.event_id.clone()).collect()
    }

    /// The prev events of a stored event.
    pub async fn prev_events(&self, event_id: &OwnedEventId) -> Vec<OwnedEventId> {
        let mut prevs = self.state.rooms.event(event_id).await.expect("read").expect("stored").pdu.prev_events.clone();
        prevs.sort();
        prevs
    }
}

pub fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}
