//! Inbound transactions (`PUT /_matrix/federation/v1/send/{txnId}`): PDUs from another server,
//! grouped by room and received in order per room through `GapFill::receive` (which fetches what
//! a PDU cites that we lack, then `Rooms::receive_pdu`), with a result per PDU. A transaction is answered once: the answer is stored by origin and transaction ID and a
//! retry gets it again without the PDUs being processed twice. PDUs of rooms this server is not
//! in are dropped (and have no result), and so are those of an origin the room's server ACL denies
//! (with an error as their result). The EDUs follow the PDUs (so a receipt can name an event of the
//! same transaction), through `InboundEdus`, which ignores what the origin may not say; they are
//! applied once too, and never fail the transaction. Signing keys are fetched before each PDU goes
//! to the room graph, so nothing waits on the network under a room's writer lock.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
};

use ruma::{CanonicalJsonObject, CanonicalJsonValue, OwnedEventId, OwnedRoomId, OwnedServerName, RoomId, ServerName};
use serde_json::value::RawValue;

use crate::{
    error::{Error, Result},
    federation::{keys::Keys, outbox::Outbox},
    matrix::pdu::Pdu,
    service::{
        edus::inbound::InboundEdus,
        gap_fill::GapFill,
        now_ms,
        rooms::{Rooms, receive::Outcome},
    },
    storage::Db,
};

/// Bounds of one transaction (Server-Server API, "Transactions").
pub const MAX_PDUS: usize = 50;
pub const MAX_EDUS: usize = 100;

/// How long the answer to an inbound transaction is kept for its retries: a sender retries a
/// transaction for minutes, then moves on to new ones; a day is ample (Synapse keeps a day too).
pub const ANSWER_KEPT_MS: i64 = 24 * 60 * 60 * 1000;
/// How long the IDs of to-device messages from other servers are kept, so a message sent again
/// reaches the devices once: a sender retries a destination for days at most (its backoff is
/// capped), so a week covers every resend; after that the table would only grow.
pub const TO_DEVICE_IDS_KEPT_MS: i64 = 7 * 24 * 60 * 60 * 1000;
/// How often older answers (and idle per-origin locks) are cleared, at most.
const PRUNE_EVERY_MS: i64 = 60 * 60 * 1000;

/// A result per PDU: `Ok` when the event was accepted (or already known), else why not.
pub type PduResults = BTreeMap<OwnedEventId, std::result::Result<(), String>>;

pub struct Transactions {
    db: Db,
    rooms: Arc<Rooms>,
    keys: Arc<Keys>,
    outbox: Arc<Outbox>,
    gap_fill: Arc<GapFill>,
    edus: InboundEdus,
    /// Per origin, the lock its transactions are processed under, so a retry arriving meanwhile
    /// waits for the first answer (a server sends one transaction at a time anyway).
    in_flight: parking_lot::Mutex<HashMap<OwnedServerName, Arc<tokio::sync::Mutex<()>>>>,
    /// When answers were last pruned (ms; 0: not yet in this process).
    last_pruned: std::sync::atomic::AtomicI64,
}

fn room_of(object: &CanonicalJsonObject) -> Option<OwnedRoomId> {
    match object.get("room_id") {
        Some(CanonicalJsonValue::String(room_id)) => RoomId::parse(room_id).ok(),
        _ => None,
    }
}

impl Transactions {
    pub fn new(
        db: Db,
        rooms: Arc<Rooms>,
        keys: Arc<Keys>,
        outbox: Arc<Outbox>,
        gap_fill: Arc<GapFill>,
        edus: InboundEdus,
    ) -> Transactions {
        Transactions {
            db,
            rooms,
            keys,
            outbox,
            gap_fill,
            edus,
            in_flight: parking_lot::Mutex::new(HashMap::new()),
            last_pruned: std::sync::atomic::AtomicI64::new(0),
        }
    }

    /// Receives a transaction of `origin`.
    pub async fn receive(
        &self,
        origin: &ServerName,
        txn_id: &str,
        pdus: &[Box<RawValue>],
        edus: &[Box<RawValue>],
    ) -> Result<PduResults> {
        self.outbox.peer_seen(origin);
        if pdus.len() > MAX_PDUS || edus.len() > MAX_EDUS {
            return Err(Error::TooLarge(
                format!("A transaction carries at most {MAX_PDUS} PDUs and {MAX_EDUS} EDUs").into(),
            ));
        }
        // One transaction per origin at a time: a retry racing its original must not process it
        // again. Other origins are not held up.
        let lock = self.in_flight.lock().entry(origin.to_owned()).or_default().clone();
        let _guard = lock.lock().await;
        if let Some(answer) = self.db.inbound_txn(origin.as_str(), txn_id).await? {
            return serde_json::from_str::<BTreeMap<OwnedEventId, Option<String>>>(&answer)
                .map(|stored| stored.into_iter().map(|(id, err)| (id, err.map_or(Ok(()), Err))).collect())
                .map_err(|err| Error::Internal(format!("stored transaction answer: {err}")));
        }
        // Grouped by room, in the order of the transaction within each room.
        let mut rooms: Vec<(OwnedRoomId, Vec<CanonicalJsonObject>)> = Vec::new();
        for raw in pdus {
            let Ok(object) = serde_json::from_str::<CanonicalJsonObject>(raw.get()) else { continue };
            let Some(room_id) = room_of(&object) else { continue };
            match rooms.iter_mut().find(|(id, _)| *id == room_id) {
                Some((_, list)) => list.push(object),
                None => rooms.push((room_id, vec![object])),
            }
        }
        let mut results = PduResults::new();
        for (room_id, objects) in rooms {
            if self.rooms.handle(&room_id).await.is_err() || !self.rooms.has_local_member(&room_id) {
                for object in objects {
                    self.receive_out_of_band(origin, &room_id, object).await;
                }
                continue;
            }
            let handle = self.rooms.handle(&room_id).await?;
            // Spec "Server Access Control Lists": a denied origin's PDUs for the room are refused,
            // each with its error, and none of them touches the room.
            let is_denied = !self.rooms.is_server_allowed(&room_id, origin).await?;
            for object in objects {
                let Ok(pdu) = Pdu::from_received(&object, &handle.rules) else { continue };
                if is_denied {
                    results.insert(pdu.event_id, Err("denied by the room's server ACL".to_owned()));
                    continue;
                }
                let result = self.receive_one(origin, &room_id, object).await;
                results.insert(pdu.event_id, result);
            }
        }
        self.edus.receive(origin, edus).await;
        let stored: BTreeMap<&OwnedEventId, Option<&String>> =
            results.iter().map(|(id, result)| (id, result.as_ref().err())).collect();
        let answer = serde_json::to_string(&stored).map_err(|err| Error::Internal(err.to_string()))?;
        let now = now_ms();
        self.db.record_inbound_txn(origin.as_str(), txn_id, &answer, now).await?;
        drop(_guard);
        self.prune_if_due(now).await;
        Ok(results)
    }

    /// At most once per `PRUNE_EVERY_MS`: forgets answers older than `ANSWER_KEPT_MS`, to-device
    /// message IDs older than `TO_DEVICE_IDS_KEPT_MS` and the locks of origins with no
    /// transaction in flight, so none of them grows with the server's age.
    async fn prune_if_due(&self, now: i64) {
        use std::sync::atomic::Ordering;
        let last = self.last_pruned.load(Ordering::Relaxed);
        if now - last < PRUNE_EVERY_MS
            || self.last_pruned.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_err()
        {
            return;
        }
        if let Err(err) = self.prune_answers(now - ANSWER_KEPT_MS).await {
            tracing::warn!(%err, "could not prune the answers to inbound transactions");
        }
        if let Err(err) = self.prune_to_device_ids(now - TO_DEVICE_IDS_KEPT_MS).await {
            tracing::warn!(%err, "could not prune the IDs of inbound to-device messages");
        }
    }

    /// Forgets the IDs of to-device messages received before `before_ts` (ms); how many went.
    pub async fn prune_to_device_ids(&self, before_ts: i64) -> Result<u64> {
        Ok(self.db.prune_inbound_to_device(before_ts).await?)
    }

    /// Forgets the answers to transactions received before `before_ts` (ms), and the per-origin
    /// locks nobody holds; how many answers went.
    pub async fn prune_answers(&self, before_ts: i64) -> Result<u64> {
        // The map's own reference is the only one of an idle origin's lock.
        self.in_flight.lock().retain(|_, lock| Arc::strong_count(lock) > 1);
        Ok(self.db.prune_inbound_txns(before_ts).await?)
    }

    /// A PDU of a room this server is not in is dropped, unless it ends a local user's
    /// out-of-band invite or knock there (the invite withdrawn, the knock refused, a ban): that
    /// one, validly signed, is recorded so the user's sync moves the room to `leave`.
    async fn receive_out_of_band(&self, origin: &ServerName, room_id: &RoomId, object: CanonicalJsonObject) {
        let target = match object.get("state_key") {
            Some(CanonicalJsonValue::String(key)) => ruma::UserId::parse(key).ok(),
            _ => None,
        };
        let held = match &target {
            Some(user) if user.server_name() == self.rooms.server_name() => {
                self.rooms.out_of_band_membership(room_id, user).await.ok().flatten()
            }
            _ => None,
        };
        let Some(held) = held.filter(|row| matches!(row.membership.as_str(), "invite" | "knock")) else {
            tracing::debug!(%origin, %room_id, "dropped a PDU of a room this server is not in");
            return;
        };
        let Some(rules) = ruma::RoomVersionId::try_from(held.room_version.as_str())
            .ok()
            .and_then(|version| crate::matrix::room_version::rules(&version))
        else {
            return;
        };
        let Ok(pdu) = Pdu::from_received(&object, &rules) else { return };
        let membership = pdu.content_value().get("membership").and_then(|m| m.as_str()).map(str::to_owned);
        let ends_it = pdu.event_type == ruma::events::TimelineEventType::RoomMember
            && matches!(membership.as_deref(), Some("leave" | "ban"));
        if !ends_it {
            return;
        }
        let Ok(keys) = self.keys.public_key_map_for_event(&object, &rules.signatures).await else { return };
        if ruma::signatures::verify_event(&keys, &object, &rules).is_err() {
            tracing::info!(%origin, %room_id, "dropped a badly signed member event of a room this server is not in");
            return;
        }
        let row = crate::storage::out_of_band::OutOfBandMembership {
            membership: membership.unwrap_or_default(),
            event_id: pdu.event_id.clone(),
            sender: pdu.sender.clone(),
            event_json: pdu.json.clone(),
            ..held
        };
        if let Err(err) = self.rooms.record_out_of_band(row).await {
            tracing::warn!(%room_id, %err, "could not record the end of an out-of-band membership");
        }
    }

    async fn receive_one(
        &self,
        origin: &ServerName,
        room_id: &RoomId,
        object: CanonicalJsonObject,
    ) -> std::result::Result<(), String> {
        match self.gap_fill.receive(origin, room_id, object).await {
            Ok(Outcome::Accepted { .. } | Outcome::AlreadyKnown { .. }) => Ok(()),
            Ok(Outcome::SoftFailed { .. }) => Err("soft-failed: not allowed by the room's current state".to_owned()),
            Ok(Outcome::Rejected { reason, .. }) => Err(format!("rejected: {reason}")),
            Ok(Outcome::Dropped { reason }) => Err(format!("dropped: {reason}")),
            Ok(Outcome::MissingEvents { missing, .. }) => Err(format!("missing prev or auth events: {missing:?}")),
            Err(err) => Err(err.to_string()),
        }
    }
}
