//! The graph forks and merges; the checks on receipt of a PDU; soft-failed, rejected, redacted
//! and outlier events.

use hearth::{
    matrix::keys::SigningKey,
    service::rooms::receive::{Outcome, OutlierReport},
};
use ruma::{CanonicalJsonValue, OwnedEventId, RoomVersionId};
use serde_json::json;

use crate::{
    backend_tests,
    harness::{Backend, Fixture, Spec, now},
};

backend_tests!(
    local_events_form_a_chain,
    concurrent_local_and_remote_events_on_one_prev_merge,
    more_than_ten_extremities_are_merged_ten_at_a_time,
    conflicting_topics_resolve_by_state_resolution_in_every_room_version,
    late_side_branch_topic_that_loses_resolution_does_not_become_current,
    limited_sync_after_a_fork_carries_the_resolved_state,
    conflicting_power_levels_resolve_for_the_more_powerful_sender,
    banned_users_late_message_is_soft_failed,
    forged_signature_is_dropped_without_touching_state,
    restricted_join_needs_the_authorising_servers_signature,
    wrong_content_hash_is_stored_and_served_redacted,
    auth_violating_event_is_rejected_and_remembered,
    oversized_event_and_256_byte_type_are_dropped,
    malformed_pdus_are_dropped_never_an_error,
    local_event_with_256_byte_type_is_refused,
    redaction_received_before_its_target_redacts_the_target,
    backfilled_redaction_redacts_a_target_already_held,
    outliers_never_appear_in_sync_or_messages,
);

fn accepted(outcome: &Outcome) -> OwnedEventId {
    match outcome {
        Outcome::Accepted { event_id, .. } => event_id.clone(),
        other => panic!("expected the event to be accepted, got {other:?}"),
    }
}

fn sorted(mut ids: Vec<OwnedEventId>) -> Vec<OwnedEventId> {
    ids.sort();
    ids
}

async fn local_events_form_a_chain(backend: Backend) {
    let f = Fixture::new(backend, RoomVersionId::V12).await;
    let mut prev = f.latest().await;
    let mut depth = f.state.rooms.event(&prev).await.unwrap().unwrap().pdu.depth;
    for i in 0..5 {
        let id = f.send(&format!("message {i}")).await;
        assert_eq!(f.prev_events(&id).await, vec![prev.clone()], "each local event cites the one before");
        let event = f.state.rooms.event(&id).await.unwrap().unwrap();
        assert_eq!(event.pdu.depth, depth + 1);
        depth = event.pdu.depth;
        prev = id;
    }
}

async fn concurrent_local_and_remote_events_on_one_prev_merge(backend: Backend) {
    let f = Fixture::new(backend, RoomVersionId::V12).await;
    let base = f.latest().await;
    let local = f.send("from here").await;
    let remote = f.remote_message("from there", &base, now()).await;
    let remote_id = accepted(&f.receive(&remote).await);
    assert_eq!(f.prev_events(&local).await, vec![base.clone()]);
    assert_eq!(f.prev_events(&remote_id).await, vec![base]);

    // Two forward extremities: the next local event references both.
    let merge = f.send("merging").await;
    assert_eq!(f.prev_events(&merge).await, sorted(vec![local.clone(), remote_id.clone()]));
    let depth = |id: OwnedEventId| {
        let rooms = f.state.rooms.clone();
        async move { rooms.event(&id).await.unwrap().unwrap().pdu.depth }
    };
    let expected = depth(local.clone()).await.max(depth(remote_id.clone()).await) + 1;
    assert_eq!(depth(merge.clone()).await, expected, "depth is one more than the deepest prev event");
    // And the graph is a chain again.
    let after = f.send("after").await;
    assert_eq!(f.prev_events(&after).await, vec![merge]);
    let sync = f.initial_sync().await;
    assert!(sync.contains(remote_id.as_str()) && sync.contains(local.as_str()), "both branches are in the timeline");
}

async fn more_than_ten_extremities_are_merged_ten_at_a_time(backend: Backend) {
    let f = Fixture::new(backend, RoomVersionId::V12).await;
    let base = f.latest().await;
    let mut forks = Vec::new();
    for i in 0..12 {
        let fork = f.remote_message(&format!("fork {i}"), &base, now() + i).await;
        forks.push(accepted(&f.receive(&fork).await));
    }
    let first = f.send("merging ten").await;
    let cited = f.prev_events(&first).await;
    assert_eq!(cited.len(), 10, "at most ten prev events");
    assert!(cited.iter().all(|id| forks.contains(id)));
    let second = f.send("merging the rest").await;
    let mut expected: Vec<OwnedEventId> = forks.into_iter().filter(|id| !cited.contains(id)).collect();
    expected.push(first);
    assert_eq!(f.prev_events(&second).await, sorted(expected), "the ones left out, and the first merge");
    let third = f.send("a chain again").await;
    assert_eq!(f.prev_events(&third).await, vec![second]);
}

/// Two topics set concurrently, one by alice here and one by bob there, with the same power:
/// state resolution v2 orders them by (mainline position, origin_server_ts, event ID), so the
/// later one is applied last and wins.
async fn conflicting_topics_resolve_by_state_resolution_in_every_room_version(backend: Backend) {
    for version in [RoomVersionId::V10, RoomVersionId::V11, RoomVersionId::V12] {
        let f = Fixture::new(backend, version.clone()).await;
        let bob = f.remote.user.clone();
        f.set_power(&bob, 50).await;
        let base = f.latest().await;
        let local = f.send_state("m.room.topic", "", json!({"topic": "local"})).await;
        let remote = f
            .remote_event(Spec {
                sender: &bob,
                event_type: "m.room.topic",
                state_key: Some(""),
                content: json!({"topic": "remote"}),
                prev_events: vec![base.clone()],
                auth_from: base,
                ts: now() + 10_000,
                redacts: None,
            })
            .await;
        let remote_id = accepted(&f.receive(&remote).await);
        assert_eq!(f.current("m.room.topic", "").await, Some(remote_id.clone()), "room version {version}");
        // The merge event's state before is the same resolution.
        let merge = f.send("merge").await;
        assert_eq!(f.prev_events(&merge).await, sorted(vec![local, remote_id.clone()]));
        assert_eq!(f.state_after(&merge).await.get(&("m.room.topic".into(), String::new())), Some(&remote_id));
        assert_eq!(f.current("m.room.topic", "").await, Some(remote_id));
    }
}

async fn late_side_branch_topic_that_loses_resolution_does_not_become_current(backend: Backend) {
    let f = Fixture::new(backend, RoomVersionId::V12).await;
    let bob = f.remote.user.clone();
    f.set_power(&bob, 50).await;
    let base = f.latest().await;
    let local = f.send_state("m.room.topic", "", json!({"topic": "local"})).await;
    // Sent before alice's change but received after it: the newest event by stream position,
    // yet ordered first by resolution, so alice's topic stays.
    let late = f
        .remote_event(Spec {
            sender: &bob,
            event_type: "m.room.topic",
            state_key: Some(""),
            content: json!({"topic": "late"}),
            prev_events: vec![base.clone()],
            auth_from: base,
            ts: now() - 30_000,
            redacts: None,
        })
        .await;
    let late_id = accepted(&f.receive(&late).await);
    assert_eq!(f.current("m.room.topic", "").await, Some(local.clone()), "the late side-branch topic lost");
    assert_eq!(
        f.state_after(&late_id).await.get(&("m.room.topic".into(), String::new())),
        Some(&late_id),
        "its own branch has it"
    );
    let merge = f.send("merge").await;
    assert_eq!(f.prev_events(&merge).await, sorted(vec![local.clone(), late_id]));
    assert_eq!(f.current("m.room.topic", "").await, Some(local));
}

async fn limited_sync_after_a_fork_carries_the_resolved_state(backend: Backend) {
    let f = Fixture::new(backend, RoomVersionId::V12).await;
    let bob = f.remote.user.clone();
    f.set_power(&bob, 50).await;
    let since = f.state.rooms.streams.position();
    let base = f.latest().await;
    let local = f.send_state("m.room.topic", "", json!({"topic": "local"})).await;
    let late = f
        .remote_event(Spec {
            sender: &bob,
            event_type: "m.room.topic",
            state_key: Some(""),
            content: json!({"topic": "late"}),
            prev_events: vec![base.clone()],
            auth_from: base,
            ts: now() - 30_000,
            redacts: None,
        })
        .await;
    let late_id = accepted(&f.receive(&late).await);
    for i in 0..12 {
        f.send(&format!("after the fork {i}")).await;
    }
    let sync = f.sync_since(since, 5).await;
    let room = &sync["rooms"]["join"][f.room.as_str()];
    assert_eq!(room["timeline"]["limited"], json!(true));
    let state: Vec<&str> =
        room["state"]["events"].as_array().unwrap().iter().filter_map(|e| e["event_id"].as_str()).collect();
    assert!(state.contains(&local.as_str()), "the resolved topic is in the state delta: {state:?}");
    assert!(!state.contains(&late_id.as_str()), "the losing side-branch topic is not");
}

/// Alice demotes bob while bob, concurrently, changes the power levels. Bob's change arrives
/// after the demotion, so it is soft-failed; when carol later merges both branches, state
/// resolution puts the more powerful sender's change first, and bob's fails against it.
async fn conflicting_power_levels_resolve_for_the_more_powerful_sender(backend: Backend) {
    let f = Fixture::new(backend, RoomVersionId::V12).await;
    let bob = f.remote.user.clone();
    let carol = f.remote_join("carol").await;
    // Enough to change the power levels (which need 100), less than alice, the creator.
    f.set_power(&bob, 100).await;
    let base = f.latest().await;
    let demotion = f.set_power(&bob, 0).await;
    let mut content = f.state.rooms.current_state_content(&f.room, "m.room.power_levels", "").await.unwrap().unwrap();
    content["users"][bob.as_str()] = json!(100);
    content["events_default"] = json!(5);
    let bobs = f
        .remote_event(Spec {
            sender: &bob,
            event_type: "m.room.power_levels",
            state_key: Some(""),
            content,
            prev_events: vec![base.clone()],
            auth_from: base,
            ts: now() + 10_000,
            redacts: None,
        })
        .await;
    let outcome = f.receive(&bobs).await;
    assert!(matches!(outcome, Outcome::SoftFailed { .. }), "{outcome:?}");
    assert_eq!(f.current("m.room.power_levels", "").await, Some(demotion.clone()));

    let merge = f
        .remote_event(Spec {
            sender: &carol,
            event_type: "m.room.message",
            state_key: None,
            content: json!({"msgtype": "m.text", "body": "merging"}),
            prev_events: vec![demotion.clone(), bobs.event_id.clone()],
            auth_from: demotion.clone(),
            ts: now() + 20_000,
            redacts: None,
        })
        .await;
    let merge_id = accepted(&f.receive(&merge).await);
    let levels = ("m.room.power_levels".to_owned(), String::new());
    assert_eq!(f.state_after(&merge_id).await.get(&levels), Some(&demotion), "the demotion wins the resolution");
    assert_eq!(f.current("m.room.power_levels", "").await, Some(demotion));
}

async fn banned_users_late_message_is_soft_failed(backend: Backend) {
    let f = Fixture::new(backend, RoomVersionId::V12).await;
    let bob = f.remote.user.clone();
    let base = f.latest().await;
    f.state.rooms.ban(&f.alice, &f.room, &bob, Some("spam")).await.expect("ban");
    let ban = f.latest().await;
    let message = f.remote_message("evading the ban", &base, now()).await;
    let outcome = f.receive(&message).await;
    assert!(matches!(outcome, Outcome::SoftFailed { .. }), "{outcome:?}");
    let stored = f.state.rooms.event(&message.event_id).await.unwrap().expect("a soft-failed event is stored");
    assert!(stored.soft_failed);
    assert!(!f.initial_sync().await.contains(message.event_id.as_str()), "not in /sync");
    assert!(!f.messages().await.contains(&message.event_id), "not in /messages");
    let next = f.send("after the ban").await;
    assert_eq!(f.prev_events(&next).await, vec![ban], "a soft-failed event is never a prev event");
    // Receiving it again changes nothing.
    assert!(matches!(f.receive(&message).await, Outcome::AlreadyKnown { .. }));
}

async fn forged_signature_is_dropped_without_touching_state(backend: Backend) {
    let f = Fixture::new(backend, RoomVersionId::V12).await;
    let bob = f.remote.user.clone();
    f.set_power(&bob, 50).await;
    let base = f.latest().await;
    let topic_before = f.current("m.room.topic", "").await;
    let forger = SigningKey::from_file(&SigningKey::generate_file()).unwrap();
    let forged = f
        .remote_event_signed_with(
            Spec {
                sender: &bob,
                event_type: "m.room.topic",
                state_key: Some(""),
                content: json!({"topic": "forged"}),
                prev_events: vec![base.clone()],
                auth_from: base.clone(),
                ts: now(),
                redacts: None,
            },
            &forger,
        )
        .await;
    let outcome = f.receive(&forged).await;
    assert!(matches!(&outcome, Outcome::Dropped { reason } if reason.contains("signature")), "{outcome:?}");
    assert!(f.state.rooms.event(&forged.event_id).await.unwrap().is_none(), "nothing stored");
    assert_eq!(f.current("m.room.topic", "").await, topic_before);
    assert_eq!(f.latest().await, base);
}

/// A restricted join names a user of the authorising server; that server's signature is
/// required besides the joining server's.
async fn restricted_join_needs_the_authorising_servers_signature(backend: Backend) {
    let f = Fixture::new(backend, RoomVersionId::V12).await;
    let allow =
        json!({"join_rule": "restricted", "allow": [{"type": "m.room_membership", "room_id": f.room.as_str()}]});
    f.send_state("m.room.join_rules", "", allow).await;
    let carol: ruma::OwnedUserId = "@carol:remote.test".try_into().unwrap();
    let base = f.latest().await;
    let join = f
        .remote_event(Spec {
            sender: &carol,
            event_type: "m.room.member",
            state_key: Some(carol.as_str()),
            content: json!({"membership": "join", "join_authorised_via_users_server": f.alice.as_str()}),
            prev_events: vec![base.clone()],
            auth_from: base.clone(),
            ts: now(),
            redacts: None,
        })
        .await;
    let outcome = f.receive(&join).await;
    assert!(matches!(&outcome, Outcome::Dropped { reason } if reason.contains("signature")), "{outcome:?}");
    assert_eq!(f.latest().await, base);

    // Countersigned by this server (as its make_join/send_join would), it is accepted.
    let local_key = f.state.server_keys.key();
    let mut object = join.canonical_object();
    ruma::signatures::hash_and_sign_event(
        f.state.info.server_name.as_str(),
        local_key.key_pair(),
        &mut object,
        &f.rules.redaction,
    )
    .unwrap();
    let mut keys = f.remote.keys.clone();
    let mut set = ruma::signatures::PublicKeySet::new();
    set.insert(local_key.key_id(), ruma::serde::Base64::parse(local_key.public_key_base64()).unwrap());
    keys.insert(f.state.info.server_name.to_string(), set);
    let outcome = f.state.rooms.receive_pdu(&f.remote.server, &f.room, object, &keys, Vec::new()).await.unwrap();
    let id = accepted(&outcome);
    assert_eq!(f.current("m.room.member", carol.as_str()).await, Some(id));
}

async fn wrong_content_hash_is_stored_and_served_redacted(backend: Backend) {
    let f = Fixture::new(backend, RoomVersionId::V12).await;
    let base = f.latest().await;
    let message = f.remote_message("the original", &base, now()).await;
    let mut object = message.canonical_object();
    let Some(CanonicalJsonValue::Object(content)) = object.get_mut("content") else { panic!("content") };
    content.insert("body".into(), CanonicalJsonValue::String("tampered with".into()));
    let id = accepted(&f.receive_object(object).await);
    assert_eq!(id, message.event_id, "the event ID covers the redacted form only");
    let stored = f.state.rooms.event(&id).await.unwrap().unwrap();
    assert_eq!(stored.pdu.content.get(), "{}", "stored redacted");
    let sync = f.initial_sync().await;
    assert!(sync.contains(id.as_str()) && !sync.contains("tampered with") && !sync.contains("the original"));
}

async fn auth_violating_event_is_rejected_and_remembered(backend: Backend) {
    let f = Fixture::new(backend, RoomVersionId::V12).await;
    let bob = f.remote.user.clone();
    let base = f.latest().await;
    let levels_before = f.current("m.room.power_levels", "").await;
    let mut content = f.state.rooms.current_state_content(&f.room, "m.room.power_levels", "").await.unwrap().unwrap();
    content["users"][bob.as_str()] = json!(100);
    let grab = f
        .remote_event(Spec {
            sender: &bob,
            event_type: "m.room.power_levels",
            state_key: Some(""),
            content,
            prev_events: vec![base.clone()],
            auth_from: base.clone(),
            ts: now(),
            redacts: None,
        })
        .await;
    let outcome = f.receive(&grab).await;
    assert!(matches!(outcome, Outcome::Rejected { .. }), "{outcome:?}");
    assert_eq!(f.current("m.room.power_levels", "").await, levels_before);
    assert!(f.state.rooms.event(&grab.event_id).await.unwrap().is_none(), "a rejected event is not in the room");
    assert_eq!(f.latest().await, base);
    // Recorded: the same event is answered from the record.
    assert!(matches!(f.receive(&grab).await, Outcome::Rejected { .. }));
    let next = f.send("still here").await;
    assert_eq!(f.prev_events(&next).await, vec![base]);
}

async fn oversized_event_and_256_byte_type_are_dropped(backend: Backend) {
    let f = Fixture::new(backend, RoomVersionId::V12).await;
    let base = f.latest().await;
    let message = f.remote_message("small", &base, now()).await;

    let mut big = message.canonical_object();
    let Some(CanonicalJsonValue::Object(content)) = big.get_mut("content") else { panic!("content") };
    content.insert("body".into(), CanonicalJsonValue::String("x".repeat(70_000)));
    let outcome = f.receive_object(big).await;
    assert!(matches!(&outcome, Outcome::Dropped { reason } if reason.contains("larger")), "{outcome:?}");

    let mut long_type = message.canonical_object();
    long_type.insert("type".into(), CanonicalJsonValue::String("t".repeat(256)));
    let outcome = f.receive_object(long_type).await;
    assert!(matches!(&outcome, Outcome::Dropped { reason } if reason.contains("type")), "{outcome:?}");

    assert_eq!(f.latest().await, base, "the room did not change");
    // The well-formed original is still accepted.
    accepted(&f.receive(&message).await);
}

async fn malformed_pdus_are_dropped_never_an_error(backend: Backend) {
    let f = Fixture::new(backend, RoomVersionId::V12).await;
    let base = f.latest().await;
    let good = f.remote_message("fine", &base, now()).await.canonical_object();
    let with = |field: &str, value: serde_json::Value| {
        let mut object = good.clone();
        object.insert(field.to_owned(), CanonicalJsonValue::try_from(value).unwrap());
        object
    };
    let without = |field: &str| {
        let mut object = good.clone();
        object.remove(field);
        object
    };
    let cases = vec![
        ruma::CanonicalJsonObject::new(),
        with("type", json!(5)),
        with("depth", json!("deep")),
        with("depth", json!(-1)),
        with("prev_events", json!("$not-a-list")),
        with("auth_events", json!([1, 2])),
        with("sender", json!("not a user id")),
        with("room_id", json!("!another:remote.test")),
        with("prev_events", json!((0..21).map(|i| format!("$e{i}")).collect::<Vec<_>>())),
        with("content", json!("not an object")),
        with("prev_events", json!([])),
        without("signatures"),
        without("hashes"),
        without("sender"),
    ];
    for (i, object) in cases.into_iter().enumerate() {
        let outcome = f.receive_object(object).await;
        assert!(matches!(outcome, Outcome::Dropped { .. }), "case {i}: {outcome:?}");
    }
    assert_eq!(f.latest().await, base);
}

async fn local_event_with_256_byte_type_is_refused(backend: Backend) {
    let f = Fixture::new(backend, RoomVersionId::V12).await;
    let base = f.latest().await;
    let sender = hearth::service::rooms::send::Sender { user_id: &f.alice, device_id: None, txn_id: None };
    let err = f
        .state
        .rooms
        .send_message(&sender, &f.room, &"t".repeat(256), json!({"body": "x"}))
        .await
        .expect_err("a 256-byte type breaks the event format");
    assert!(matches!(err, hearth::error::Error::BadJson(_)), "{err:?}");
    assert_eq!(f.latest().await, base);
}

async fn redaction_received_before_its_target_redacts_the_target(backend: Backend) {
    let f = Fixture::new(backend, RoomVersionId::V12).await;
    let bob = f.remote.user.clone();
    let base = f.latest().await;
    let target = f.remote_message("regrettable", &base, now()).await;
    let redaction = f
        .remote_event(Spec {
            sender: &bob,
            event_type: "m.room.redaction",
            state_key: None,
            content: json!({"reason": "oops"}),
            prev_events: vec![base.clone()],
            auth_from: base.clone(),
            ts: now() + 1,
            redacts: Some(target.event_id.clone()),
        })
        .await;
    let redaction_id = accepted(&f.receive(&redaction).await);
    let target_id = accepted(&f.receive(&target).await);
    let stored = f.state.rooms.event(&target_id).await.unwrap().unwrap();
    assert_eq!(stored.pdu.content.get(), "{}", "stored redacted on arrival");
    assert_eq!(stored.redacted_by.as_ref(), Some(&redaction_id));
    assert!(!f.initial_sync().await.contains("regrettable"));
}

async fn backfilled_redaction_redacts_a_target_already_held(backend: Backend) {
    let f = Fixture::new(backend, RoomVersionId::V12).await;
    let bob = f.remote.user.clone();
    let base = f.latest().await;
    let target = f.remote_message("regrettable", &base, now()).await;
    let target_id = accepted(&f.receive(&target).await);
    // A redaction on a side branch, found only by paging back (backfill).
    let redaction = f
        .remote_event(Spec {
            sender: &bob,
            event_type: "m.room.redaction",
            state_key: None,
            content: json!({"reason": "oops"}),
            prev_events: vec![base.clone()],
            auth_from: base.clone(),
            ts: now() + 1,
            redacts: Some(target_id.clone()),
        })
        .await;
    let outcome = f
        .state
        .rooms
        .receive_backfilled(&f.remote.server, &f.room, redaction.canonical_object(), &f.remote.keys, None)
        .await
        .expect("backfilled");
    let redaction_id = match outcome {
        Outcome::Accepted { event_id, stream_pos } => {
            assert!(stream_pos < 0, "backfilled events sort before the live ones: {stream_pos}");
            event_id
        }
        other => panic!("expected the redaction to be accepted, got {other:?}"),
    };
    let stored = f.state.rooms.event(&target_id).await.unwrap().unwrap();
    assert_eq!(stored.pdu.content.get(), "{}", "the held target is redacted");
    assert_eq!(stored.redacted_by.as_ref(), Some(&redaction_id));
    let sync = f.initial_sync().await;
    assert!(!sync.contains("regrettable"), "{sync}");
}

async fn outliers_never_appear_in_sync_or_messages(backend: Backend) {
    let f = Fixture::new(backend, RoomVersionId::V12).await;
    let bob = f.remote.user.clone();
    let base = f.latest().await;
    let renamed = f
        .remote_event(Spec {
            sender: &bob,
            event_type: "m.room.member",
            state_key: Some(bob.as_str()),
            content: json!({"membership": "join", "displayname": "Bob the outlier"}),
            prev_events: vec![base.clone()],
            auth_from: base.clone(),
            ts: now(),
            redacts: None,
        })
        .await;
    let mut levels = f.state.rooms.current_state_content(&f.room, "m.room.power_levels", "").await.unwrap().unwrap();
    levels["users"][bob.as_str()] = json!(100);
    let forged_levels = f
        .remote_event(Spec {
            sender: &bob,
            event_type: "m.room.power_levels",
            state_key: Some(""),
            content: levels,
            prev_events: vec![base.clone()],
            auth_from: base.clone(),
            ts: now(),
            redacts: None,
        })
        .await;
    let report = f
        .state
        .rooms
        .store_outliers(&f.room, vec![renamed.canonical_object(), forged_levels.canonical_object()], &f.remote.keys)
        .await
        .expect("store outliers");
    assert_eq!(report, OutlierReport { stored: 1, already_known: 0, rejected: 1, dropped: 0 });
    let outlier = f.state.rooms.event(&renamed.event_id).await.unwrap().expect("readable by ID, for state");
    assert!(outlier.is_outlier() && f.state.rooms.timeline_event(&renamed.event_id).await.unwrap().is_none());
    assert!(!f.initial_sync().await.contains(renamed.event_id.as_str()), "not in /sync");
    assert!(!f.messages().await.contains(&renamed.event_id), "not in /messages");
    assert_eq!(f.latest().await, base);
    assert_ne!(f.current("m.room.member", bob.as_str()).await, Some(renamed.event_id.clone()));

    // Received later with its place in the graph, it joins the timeline.
    let id = accepted(&f.receive(&renamed).await);
    assert!(f.messages().await.contains(&id));
    assert_eq!(f.current("m.room.member", bob.as_str()).await, Some(id));
    let again = f.state.rooms.store_outliers(&f.room, vec![renamed.canonical_object()], &f.remote.keys).await.unwrap();
    assert_eq!(again.already_known, 1);
}
