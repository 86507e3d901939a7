//! The outbound queue: PDUs for other servers, kept in the database per destination
//! (`storage::federation`) and delivered by one sender task per destination as transactions
//! (`PUT /_matrix/federation/v1/send/{txnId}`, at most 50 PDUs each).
//!
//! A transaction's ID names the first and last queue rows it carries, so a transaction resent
//! after a failure or a restart keeps its ID and the receiver, which remembers transactions by
//! origin and ID, does not process it twice. Rows are deleted only once the destination answered.
//! A failing destination is retried with exponential backoff (1 s doubling, capped at 10 min);
//! a request from that server ([`Outbox::peer_seen`]) ends the wait at once. This module must not
//! know about rooms: its caller decides the destinations.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use parking_lot::Mutex;
use ruma::{
    MilliSecondsSinceUnixEpoch, OwnedServerName, OwnedTransactionId, ServerName,
    api::federation::transactions::send_transaction_message,
};
use tokio::sync::Notify;

use crate::{federation::client::FederationClient, storage::Db};

/// PDUs per transaction (Server-Server API, "Transactions").
pub const MAX_PDUS_PER_TXN: i64 = 50;
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(600);
/// An idle sender looks at its queue this often even without a wake-up.
const IDLE_RECHECK: Duration = Duration::from_secs(60);

/// What wakes a destination's sender.
#[derive(Default)]
struct Wakers {
    /// Something new was queued.
    work: Notify,
    /// The destination contacted us: it is up again, so a backoff ends.
    peer_up: Notify,
    /// Its last transaction failed: the queue may be growing past its bound.
    failing: AtomicBool,
}

pub struct Outbox {
    db: Db,
    client: Arc<FederationClient>,
    senders: Mutex<HashMap<OwnedServerName, Arc<Wakers>>>,
    /// PDUs an unreachable destination's queue holds before it is cut down to the newest PDU of
    /// each room (catch-up: the destination pulls the rest with get_missing_events/backfill).
    max_queued: i64,
}

/// The `room_id` of a PDU's JSON.
fn room_of(pdu_json: &str) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct RoomOnly {
        room_id: String,
    }
    serde_json::from_str::<RoomOnly>(pdu_json).ok().map(|pdu| pdu.room_id)
}

impl Outbox {
    pub fn new(db: Db, client: Arc<FederationClient>, max_queued: usize) -> Arc<Outbox> {
        Arc::new(Outbox {
            db,
            client,
            senders: Mutex::new(HashMap::new()),
            max_queued: i64::try_from(max_queued).unwrap_or(i64::MAX),
        })
    }

    /// Cuts an unreachable destination's queue down to the newest PDU of each room once it
    /// holds more than the bound: a server gone for long must not make ours grow without end.
    async fn bound_queue(&self, destination: &ServerName) {
        match self.db.outbound_count(destination.as_str()).await {
            Ok(count) if count > self.max_queued => match self.db.compact_outbound(destination.as_str()).await {
                Ok(dropped) => {
                    tracing::info!(%destination, queued = count, dropped, "catch-up: kept the newest event per room")
                }
                Err(err) => tracing::warn!(%destination, %err, "cannot cut down the federation queue"),
            },
            Ok(_) => {}
            Err(err) => tracing::warn!(%destination, %err, "cannot count the federation queue"),
        }
    }

    /// Starts a sender for every destination that still has PDUs queued (after a restart).
    pub async fn resume(self: &Arc<Self>) {
        match self.db.outbound_destinations().await {
            Ok(destinations) => {
                for destination in destinations {
                    if let Ok(destination) = ServerName::parse(&destination) {
                        self.wakers(&destination).work.notify_one();
                    }
                }
            }
            Err(err) => tracing::error!(%err, "cannot read the federation queue"),
        }
    }

    /// Queues `pdu_json` (canonical JSON) for each destination and wakes their senders.
    pub async fn enqueue(self: &Arc<Self>, destinations: &[OwnedServerName], event_id: &str, pdu_json: &str) {
        if destinations.is_empty() {
            return;
        }
        let names: Vec<String> = destinations.iter().map(|d| d.to_string()).collect();
        let room_id = room_of(pdu_json);
        let now = crate::service::now_ms();
        if let Err(err) = self.db.enqueue_outbound(&names, room_id.as_deref(), event_id, pdu_json, now).await {
            tracing::error!(%err, %event_id, "cannot queue an event for other servers");
            return;
        }
        for destination in destinations {
            let wakers = self.wakers(destination);
            if wakers.failing.load(Ordering::Relaxed) {
                self.bound_queue(destination).await;
            }
            wakers.work.notify_one();
        }
    }

    /// `origin` just made a request to us: if its sender is backing off, it retries now.
    pub fn peer_seen(&self, origin: &ServerName) {
        if let Some(wakers) = self.senders.lock().get(origin) {
            wakers.peer_up.notify_one();
        }
    }

    /// The wakers of `destination`'s sender, starting the sender if there is none.
    fn wakers(self: &Arc<Self>, destination: &ServerName) -> Arc<Wakers> {
        let mut senders = self.senders.lock();
        if let Some(wakers) = senders.get(destination) {
            return wakers.clone();
        }
        let wakers = Arc::new(Wakers::default());
        senders.insert(destination.to_owned(), wakers.clone());
        tokio::spawn(run_sender(self.clone(), destination.to_owned(), wakers.clone()));
        wakers
    }

    /// Sends the oldest queued PDUs of `destination` as one transaction. `Ok(false)` when the
    /// queue is empty.
    async fn send_batch(&self, destination: &ServerName) -> Result<bool, String> {
        let rows = self.db.outbound_batch(destination.as_str(), MAX_PDUS_PER_TXN).await.map_err(|e| e.to_string())?;
        let (Some(first), Some(last)) = (rows.first(), rows.last()) else { return Ok(false) };
        let txn_id = OwnedTransactionId::from(format!("{}-{}", first.id, last.id));
        let mut request = send_transaction_message::v1::Request::new(
            txn_id.clone(),
            self.client.server_name().to_owned(),
            MilliSecondsSinceUnixEpoch::now(),
        );
        for row in &rows {
            match serde_json::value::RawValue::from_string(row.pdu_json.clone()) {
                Ok(raw) => request.pdus.push(raw),
                Err(err) => tracing::error!(%err, event_id = %row.event_id, "a queued PDU is not JSON; skipped"),
            }
        }
        let response = self.client.send(destination, request).await.map_err(|e| e.to_string())?;
        for (event_id, result) in &response.pdus {
            if let Err(why) = result {
                tracing::info!(%destination, %event_id, %why, "the destination did not accept an event");
            }
        }
        tracing::debug!(%destination, %txn_id, pdus = rows.len(), "transaction delivered");
        self.db.delete_outbound(destination.as_str(), last.id).await.map_err(|e| e.to_string())?;
        Ok(true)
    }
}

/// One destination's sender: delivers its queue, backs off on failure, sleeps when idle.
async fn run_sender(outbox: Arc<Outbox>, destination: OwnedServerName, wakers: Arc<Wakers>) {
    let mut backoff = FIRST_BACKOFF;
    loop {
        match outbox.send_batch(&destination).await {
            Ok(true) => {
                backoff = FIRST_BACKOFF;
                wakers.failing.store(false, Ordering::Relaxed);
            }
            Ok(false) => {
                wakers.failing.store(false, Ordering::Relaxed);
                let _ = tokio::time::timeout(IDLE_RECHECK, wakers.work.notified()).await;
            }
            Err(err) => {
                tracing::info!(%destination, %err, retry_in_ms = backoff.as_millis() as u64, "transaction failed");
                wakers.failing.store(true, Ordering::Relaxed);
                outbox.bound_queue(&destination).await;
                let _ = tokio::time::timeout(backoff, wakers.peer_up.notified()).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}
