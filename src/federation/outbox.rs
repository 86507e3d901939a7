//! The outbound queue: PDUs and EDUs for other servers, delivered by one sender task per
//! destination as transactions (`PUT /_matrix/federation/v1/send/{txnId}`, at most 50 PDUs and
//! 100 EDUs each). PDUs and the EDUs that must not be lost (to-device messages, receipts,
//! device-list updates) are kept in the database per destination (`storage::federation`,
//! `storage::federation_edus`); typing and presence live in memory, coalesced so that only the
//! latest state per (room, user) or user is sent, and are lost on restart (they expire anyway).
//!
//! A transaction's ID names the first and last queue rows it carries, so a transaction resent
//! after a failure or a restart keeps its ID and the receiver, which remembers transactions by
//! origin and ID, does not process it twice. A transaction that failed is resent exactly as it
//! was (with the same in-memory EDUs) until it is answered; only then are its rows deleted and
//! the next one built.
//! A failing destination is retried with exponential backoff (1 s doubling, capped at 10 min);
//! a request from that server ([`Outbox::peer_seen`]) ends the wait at once. This module must not
//! know about rooms: its caller decides the destinations.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use parking_lot::Mutex;
use ruma::{
    MilliSecondsSinceUnixEpoch, OwnedRoomId, OwnedServerName, OwnedTransactionId, OwnedUserId, ServerName,
    api::federation::transactions::send_transaction_message,
};
use serde_json::{Value, json, value::RawValue};
use tokio::sync::Notify;

use crate::{federation::client::FederationClient, storage::Db};

/// PDUs per transaction (Server-Server API, "Transactions").
pub const MAX_PDUS_PER_TXN: i64 = 50;
/// EDUs per transaction (Server-Server API, "Transactions").
pub const MAX_EDUS_PER_TXN: usize = 100;
/// Presence updates carried by one `m.presence` EDU.
const PRESENCE_PER_EDU: usize = 100;
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

/// The latest typing and presence state not yet sent to one destination.
#[derive(Default)]
struct Ephemeral {
    /// Per (room, user): whether typing, and the serial it was set at (a later serial wins, so
    /// updates queued out of order cannot bring back an older state).
    typing: BTreeMap<(OwnedRoomId, OwnedUserId), (bool, i64)>,
    /// Per user: the `m.presence` update, and its serial.
    presence: BTreeMap<OwnedUserId, (Value, i64)>,
}

impl Ephemeral {
    fn is_empty(&self) -> bool {
        self.typing.is_empty() && self.presence.is_empty()
    }

    /// Takes up to `room` EDUs' worth of the state, oldest keys first.
    fn take(&mut self, room: usize) -> Vec<Value> {
        let mut edus = Vec::new();
        while edus.len() < room {
            let Some(((room_id, user_id), (typing, _))) = self.typing.pop_first() else { break };
            edus.push(
                json!({"edu_type": "m.typing", "content": {"room_id": room_id, "user_id": user_id, "typing": typing}}),
            );
        }
        while edus.len() < room && !self.presence.is_empty() {
            let mut push = Vec::new();
            while push.len() < PRESENCE_PER_EDU {
                let Some((_, (update, _))) = self.presence.pop_first() else { break };
                push.push(update);
            }
            edus.push(json!({"edu_type": "m.presence", "content": {"push": push}}));
        }
        edus
    }
}

/// A transaction built and not yet answered: resent as it is.
struct Pending {
    txn_id: OwnedTransactionId,
    pdus: Vec<Box<RawValue>>,
    edus: Vec<Box<RawValue>>,
    /// The last PDU and durable EDU rows it carries (deleted once answered).
    last_pdu: Option<i64>,
    last_edu: Option<i64>,
}

pub struct Outbox {
    db: Db,
    client: Arc<FederationClient>,
    senders: Mutex<HashMap<OwnedServerName, Arc<Wakers>>>,
    ephemeral: Mutex<HashMap<OwnedServerName, Ephemeral>>,
    /// Names the transactions that carry only in-memory EDUs: the process's start time and a
    /// counter, so no ID of an earlier run is reused.
    started_ms: i64,
    ephemeral_txns: AtomicU64,
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
            ephemeral: Mutex::new(HashMap::new()),
            started_ms: crate::service::now_ms(),
            ephemeral_txns: AtomicU64::new(0),
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

    /// Starts a sender for every destination that still has PDUs or EDUs queued (after a restart).
    pub async fn resume(self: &Arc<Self>) {
        for destinations in [self.db.outbound_destinations().await, self.db.outbound_edu_destinations().await] {
            match destinations {
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
    }

    /// Queues an EDU that must not be lost (`{"edu_type", "content"}`) for each destination.
    pub async fn enqueue_edu(self: &Arc<Self>, destinations: &[OwnedServerName], edu: &Value) {
        if destinations.is_empty() {
            return;
        }
        let names: Vec<String> = destinations.iter().map(|d| d.to_string()).collect();
        let json = edu.to_string();
        if let Err(err) = self.db.enqueue_outbound_edu(&names, &json, crate::service::now_ms()).await {
            tracing::error!(%err, edu_type = %edu["edu_type"], "cannot queue an EDU for other servers");
            return;
        }
        for destination in destinations {
            self.wakers(destination).work.notify_one();
        }
    }

    /// Queues `user`'s typing state in `room_id` for each destination, replacing an unsent
    /// older one. `serial` orders the updates.
    pub fn queue_typing(
        self: &Arc<Self>,
        destinations: &[OwnedServerName],
        room_id: &ruma::RoomId,
        user: &ruma::UserId,
        typing: bool,
        serial: i64,
    ) {
        self.queue_ephemeral(destinations, |state| {
            let entry = state.typing.entry((room_id.to_owned(), user.to_owned())).or_insert((typing, serial));
            if entry.1 <= serial {
                *entry = (typing, serial);
            }
        });
    }

    /// Queues a presence update (`m.presence`'s `push` item) of `user` for each destination,
    /// replacing an unsent older one.
    pub fn queue_presence(
        self: &Arc<Self>,
        destinations: &[OwnedServerName],
        user: &ruma::UserId,
        update: Value,
        serial: i64,
    ) {
        self.queue_ephemeral(destinations, |state| {
            let entry = state.presence.entry(user.to_owned()).or_insert((Value::Null, serial));
            if entry.1 <= serial {
                *entry = (update.clone(), serial);
            }
        });
    }

    fn queue_ephemeral(self: &Arc<Self>, destinations: &[OwnedServerName], mut change: impl FnMut(&mut Ephemeral)) {
        {
            let mut ephemeral = self.ephemeral.lock();
            for destination in destinations {
                change(ephemeral.entry(destination.clone()).or_default());
            }
        }
        for destination in destinations {
            self.wakers(destination).work.notify_one();
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

    /// The next transaction for `destination`: the oldest queued PDUs and durable EDUs, then as
    /// much of the in-memory typing and presence as fits. `None` when there is nothing to send.
    async fn next_transaction(&self, destination: &ServerName) -> Result<Option<Pending>, String> {
        let pdu_rows =
            self.db.outbound_batch(destination.as_str(), MAX_PDUS_PER_TXN).await.map_err(|e| e.to_string())?;
        let edu_rows = self
            .db
            .outbound_edu_batch(destination.as_str(), MAX_EDUS_PER_TXN as i64)
            .await
            .map_err(|e| e.to_string())?;
        let mut pdus = Vec::with_capacity(pdu_rows.len());
        for row in &pdu_rows {
            match RawValue::from_string(row.pdu_json.clone()) {
                Ok(raw) => pdus.push(raw),
                Err(err) => tracing::error!(%err, event_id = %row.event_id, "a queued PDU is not JSON; skipped"),
            }
        }
        let mut edus = Vec::new();
        for row in &edu_rows {
            match RawValue::from_string(row.edu_json.clone()) {
                Ok(raw) => edus.push(raw),
                Err(err) => tracing::error!(%err, "a queued EDU is not JSON; skipped"),
            }
        }
        let ephemeral = {
            let mut all = self.ephemeral.lock();
            let taken = all.get_mut(destination).map(|state| state.take(MAX_EDUS_PER_TXN - edu_rows.len()));
            if all.get(destination).is_some_and(Ephemeral::is_empty) {
                all.remove(destination);
            }
            taken.unwrap_or_default()
        };
        for edu in ephemeral {
            if let Ok(raw) = serde_json::value::to_raw_value(&edu) {
                edus.push(raw);
            }
        }
        if pdu_rows.is_empty() && edu_rows.is_empty() && edus.is_empty() {
            return Ok(None);
        }
        let span = |first: Option<i64>, last: Option<i64>| format!("{}-{}", first.unwrap_or(0), last.unwrap_or(0));
        let (first_pdu, last_pdu) = (pdu_rows.first().map(|r| r.id), pdu_rows.last().map(|r| r.id));
        let (first_edu, last_edu) = (edu_rows.first().map(|r| r.id), edu_rows.last().map(|r| r.id));
        // Named after the durable rows, so a retry after a restart keeps the ID; PDU-only ones
        // keep the form they had before EDUs were sent.
        let txn_id = match (pdu_rows.is_empty(), edu_rows.is_empty()) {
            (false, true) => span(first_pdu, last_pdu),
            (_, false) => format!("{}.e{}", span(first_pdu, last_pdu), span(first_edu, last_edu)),
            (true, true) => format!("m{}.{}", self.started_ms, self.ephemeral_txns.fetch_add(1, Ordering::Relaxed)),
        };
        Ok(Some(Pending { txn_id: txn_id.into(), pdus, edus, last_pdu, last_edu }))
    }

    /// Sends `pending` to `destination`; once it is answered, forgets its rows.
    async fn send_transaction(&self, destination: &ServerName, pending: &Pending) -> Result<(), String> {
        let mut request = send_transaction_message::v1::Request::new(
            pending.txn_id.clone(),
            self.client.server_name().to_owned(),
            MilliSecondsSinceUnixEpoch::now(),
        );
        request.pdus = pending.pdus.clone();
        request.edus = pending.edus.iter().map(|raw| ruma::serde::Raw::from_json(raw.clone())).collect();
        let response = self.client.send(destination, request).await.map_err(|e| e.to_string())?;
        for (event_id, result) in &response.pdus {
            if let Err(why) = result {
                tracing::info!(%destination, %event_id, %why, "the destination did not accept an event");
            }
        }
        tracing::debug!(%destination, txn_id = %pending.txn_id, pdus = pending.pdus.len(), edus = pending.edus.len(), "transaction delivered");
        if let Some(last) = pending.last_pdu {
            self.db.delete_outbound(destination.as_str(), last).await.map_err(|e| e.to_string())?;
        }
        if let Some(last) = pending.last_edu {
            self.db.delete_outbound_edus(destination.as_str(), last).await.map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

/// One destination's sender: delivers its queue, backs off on failure, sleeps when idle.
async fn run_sender(outbox: Arc<Outbox>, destination: OwnedServerName, wakers: Arc<Wakers>) {
    let mut backoff = FIRST_BACKOFF;
    let mut pending: Option<Pending> = None;
    loop {
        if pending.is_none() {
            match outbox.next_transaction(&destination).await {
                Ok(Some(next)) => pending = Some(next),
                Ok(None) => {
                    let _ = tokio::time::timeout(IDLE_RECHECK, wakers.work.notified()).await;
                    continue;
                }
                Err(err) => {
                    tracing::error!(%destination, %err, "cannot read the federation queue");
                    let _ = tokio::time::timeout(backoff, wakers.work.notified()).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
            }
        }
        let Some(transaction) = &pending else { continue };
        match outbox.send_transaction(&destination, transaction).await {
            Ok(()) => {
                pending = None;
                backoff = FIRST_BACKOFF;
                wakers.failing.store(false, Ordering::Relaxed);
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
