//! What an idle client costs the server is mostly the future its request waits in: a future is
//! as big as its biggest state, so a long-poll that computed a sync inline would park with the
//! space of that whole computation. These sizes are kept small by boxing the work around the
//! wait; a change that puts it back inline fails here rather than in a memory benchmark.

use std::time::Duration;

use hearth::service::{stream::StreamToken, sync::SyncRequest};
use ruma::RoomVersionId;

use crate::harness::{Backend, Fixture};

/// Bytes a parked long-poll's future may take (release builds make it smaller still).
const PARKED_LONG_POLL: usize = 1024;
/// `/sync`'s `wait`: the long-poll plus acknowledging the previous response.
const PARKED_SYNC_WAIT: usize = 2048;

#[tokio::test]
async fn a_parked_long_poll_holds_little_more_than_its_wake_up() {
    let fixture = Fixture::new(Backend::Sqlite, RoomVersionId::V11).await;
    let request = SyncRequest {
        user_id: fixture.alice.clone(),
        device_id: "DAGTEST".to_owned(),
        since: Some(StreamToken::new(1, 0)),
        filter: Default::default(),
        full_state: false,
    };
    let poll = fixture.state.sync.long_poll(&request, Duration::from_millis(10));
    let wait = fixture.state.sync.wait(&request, Duration::from_millis(10));
    let (poll_size, wait_size) = (std::mem::size_of_val(&poll), std::mem::size_of_val(&wait));
    println!("long_poll future: {poll_size} bytes, wait future: {wait_size} bytes");
    assert!(poll_size <= PARKED_LONG_POLL, "long_poll's future is {poll_size} bytes");
    assert!(wait_size <= PARKED_SYNC_WAIT, "wait's future is {wait_size} bytes");
    // And they still work.
    poll.await.expect("long-poll");
    wait.await.expect("sync");
}
