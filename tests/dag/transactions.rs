//! Inbound transactions' stored answers and to-device IDs: a retry is answered from the store, and answers older
//! than the retention are forgotten (so the table does not grow with the server's age).

use ruma::RoomVersionId;
use serde_json::{json, value::RawValue};

use crate::{
    backend_tests,
    harness::{Backend, Fixture, now},
};

backend_tests!(transaction_answers_serve_retries_until_pruned);

async fn transaction_answers_serve_retries_until_pruned(backend: Backend) {
    let f = Fixture::new(backend, RoomVersionId::V12).await;
    // remote.test denied by the room's ACL: its PDU gets an error result without any key fetch.
    f.send_state("m.room.server_acl", "", json!({"allow": ["*"], "deny": ["remote.test"], "allow_ip_literals": false}))
        .await;
    let tip = f.latest().await;
    let pdu = f.remote_message("from a denied server", &tip, now()).await;
    let raw = RawValue::from_string(pdu.json.clone()).unwrap();
    let transactions = &f.state.transactions;
    let remote = &f.remote.server;

    let first = transactions.receive(remote, "t1", std::slice::from_ref(&raw), &[]).await.expect("first");
    assert!(matches!(first.get(&pdu.event_id), Some(Err(why)) if why.contains("ACL")), "{first:?}");
    // A retry (even with another body) gets the stored answer, not a second processing.
    let retry = transactions.receive(remote, "t1", &[], &[]).await.expect("retry");
    assert_eq!(retry, first);

    // Pruning before the answer's time keeps it; pruning after forgets it.
    assert_eq!(transactions.prune_answers(now() as i64 - 60_000).await.expect("prune"), 0);
    assert_eq!(transactions.receive(remote, "t1", &[], &[]).await.expect("kept"), first);
    assert!(transactions.prune_answers(now() as i64 + 1).await.expect("prune") >= 1);
    let after = transactions.receive(remote, "t1", &[], &[]).await.expect("after pruning");
    assert!(after.is_empty(), "a forgotten transaction is processed as new: {after:?}");
}

backend_tests!(to_device_ids_are_kept_for_resends_then_pruned);

async fn to_device_ids_are_kept_for_resends_then_pruned(backend: Backend) {
    let f = Fixture::new(backend, RoomVersionId::V12).await;
    let origin = &f.remote.server;
    let messages = json!({f.alice.as_str(): {"NODEVICE": {"n": 1}}});
    for _ in 0..2 {
        f.state
            .account_data
            .receive_to_device(origin, &f.remote.user, "org.example.ping", "once-1", messages.as_object().unwrap())
            .await
            .expect("to-device");
    }
    let transactions = &f.state.transactions;
    // Within the retention the ID stays (one row for both sends); past it, it goes.
    assert_eq!(transactions.prune_to_device_ids(now() as i64 - 60_000).await.expect("prune"), 0);
    assert_eq!(transactions.prune_to_device_ids(now() as i64 + 1).await.expect("prune"), 1);
    assert_eq!(transactions.prune_to_device_ids(now() as i64 + 1).await.expect("prune"), 0);
}
