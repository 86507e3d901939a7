//! The room graph: forward extremities, the state before and after each event, and the room's
//! current state (the resolved state of the forward extremities).
//!
//! State lives in state groups (`state_groups`): a snapshot or a delta on another group. The
//! state before an event is the state after its single prev event, or the resolution (ruma's
//! state resolution v2, `matrix::state_res`) of the states after each of its prev events. The
//! room's current state is a group too, and `room_state_changes` logs which group it was from
//! which stream position on, so readers ask "the room's state at position P" without ever taking
//! "the state after the newest event" (a late side-branch event need not change it).
//!
//! Everything here runs under the room's writer lock and does no network IO: events it needs are
//! in the database already (the timeline or the outliers).

use std::{collections::HashMap, sync::Arc};

use ruma::{EventId, OwnedEventId, events::StateEventType};

use super::{MAX_SNAPSHOT_INTERVAL, RoomHandle, Rooms, SNAPSHOT_INTERVAL, StateMap, membership_change};
use crate::{
    error::{Error, Result},
    matrix::{
        pdu::Pdu,
        state_res::{self, EventMap},
    },
    storage::stream::{CurrentStateChange, MembershipChange, NewStateGroup},
};

/// At most this many prev events for a new local event (the spec's format allows 20; fewer
/// keeps events small and resolutions cheap). With more forward extremities, the deepest are
/// referenced and the others stay extremities for the next event.
pub const MAX_PREV_EVENTS: usize = 10;

/// A state as the writer holds it: its group, the group's chain length and the full map.
#[derive(Clone, Default)]
pub(super) struct GroupState {
    pub group: i64,
    pub chain_len: i64,
    pub map: Arc<StateMap>,
}

/// The prev events of a new local event: every forward extremity, or the [`MAX_PREV_EVENTS`]
/// deepest (ties by event ID, so the choice is deterministic).
pub(super) fn choose_prev_events(extremities: &[(OwnedEventId, u64)]) -> Vec<(OwnedEventId, u64)> {
    let mut chosen = extremities.to_vec();
    chosen.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    chosen.truncate(MAX_PREV_EVENTS);
    chosen
}

/// The extremities after `event` joins the graph pointing at `prevs`: the prevs it references
/// are no longer extremities, it is one.
pub(super) fn extremities_after(
    extremities: &[(OwnedEventId, u64)],
    prevs: &[OwnedEventId],
    event: (OwnedEventId, u64),
) -> Vec<(OwnedEventId, u64)> {
    let mut after: Vec<(OwnedEventId, u64)> =
        extremities.iter().filter(|(id, _)| !prevs.contains(id)).cloned().collect();
    after.push(event);
    after
}

fn ruma_map(map: &StateMap) -> state_res::StateMap {
    map.iter().map(|((t, k), e)| ((StateEventType::from(t.as_str()), k.clone()), e.clone())).collect()
}

impl Rooms {
    /// A state group as a [`GroupState`].
    pub(super) async fn group_state(&self, group: i64) -> Result<GroupState> {
        let chain_len = if group == 0 { 0 } else { self.group(group).await?.chain_len };
        Ok(GroupState { group, chain_len, map: self.state_at(group).await? })
    }

    /// Events by ID from the timeline or the outliers, for the checks on receipt and state
    /// resolution (never served to clients). Unknown IDs are left out.
    pub(super) async fn pdus_by_id(&self, ids: &[&EventId]) -> Result<EventMap> {
        let mut found = EventMap::new();
        let mut wanted = Vec::new();
        {
            let mut cache = self.events.lock();
            for id in ids {
                match cache.get(id) {
                    Some(event) => {
                        found.insert(event.pdu.event_id.clone(), Arc::new(event.pdu.clone()));
                    }
                    None => wanted.push(*id),
                }
            }
        }
        if !wanted.is_empty() {
            for (event_id, room_id, json) in self.db.pdus(&wanted).await? {
                let pdu = Pdu::from_json(json, room_id, event_id).map_err(Error::Internal)?;
                found.insert(pdu.event_id.clone(), Arc::new(pdu));
            }
        }
        Ok(found)
    }

    /// Resolves the states after several branches (state resolution v2 of the room version):
    /// loads the states' events and their auth chains, then hands them to ruma. `batch` has
    /// events not committed yet (the one being received or appended): an event ruma cannot
    /// fetch is left out of the resolution.
    pub(super) async fn resolve_states(
        &self,
        handle: &RoomHandle,
        states: &[Arc<StateMap>],
        batch: &EventMap,
    ) -> Result<StateMap> {
        let mut distinct: Vec<Arc<StateMap>> = Vec::new();
        for state in states {
            if !distinct.iter().any(|d| Arc::ptr_eq(d, state) || **d == **state) {
                distinct.push(state.clone());
            }
        }
        if distinct.len() == 1 {
            return Ok((*distinct[0]).clone());
        }
        let mut ids: Vec<&EventId> =
            distinct.iter().flat_map(|s| s.values().map(|id| &**id)).filter(|id| !batch.contains_key(*id)).collect();
        ids.sort();
        ids.dedup();
        let mut events = self.pdus_by_id(&ids).await?;
        events.extend(batch.iter().map(|(id, pdu)| (id.clone(), pdu.clone())));
        // Auth chains, a level at a time; bounded, so a corrupt cycle cannot loop forever.
        for _ in 0..10_000 {
            let roots: Vec<OwnedEventId> = events.keys().cloned().collect();
            let missing = state_res::missing_auth_events(roots.iter(), &events);
            if missing.is_empty() {
                break;
            }
            let missing: Vec<&EventId> = missing.iter().map(|id| &**id).collect();
            let loaded = self.pdus_by_id(&missing).await?;
            if loaded.is_empty() {
                // Not stored (a gap the federation layer has to fill); ruma leaves them out.
                break;
            }
            events.extend(loaded);
        }
        let maps: Vec<Arc<state_res::StateMap>> = distinct.iter().map(|s| Arc::new(ruma_map(s))).collect();
        let resolved = state_res::resolve(&handle.rules, &maps, &events).map_err(|why| {
            tracing::warn!(room_id = %handle.room_id, %why, "state resolution failed");
            Error::Internal(format!("state resolution failed: {why}"))
        })?;
        Ok(resolved.into_iter().map(|((t, k), e)| ((t.to_string(), k), e)).collect())
    }

    /// A group for `map`, built on `base`: `base` itself when they are equal, else a delta on
    /// it, or a snapshot when keys left the state or the chain is long enough.
    pub(super) fn derive_group(&self, base: &GroupState, map: StateMap) -> (GroupState, Option<NewStateGroup>) {
        if *base.map == map {
            return (base.clone(), None);
        }
        let removed = base.map.keys().filter(|k| !map.contains_key(*k)).count();
        let changed: Vec<(String, String, OwnedEventId)> = map
            .iter()
            .filter(|(k, v)| base.map.get(*k) != Some(*v))
            .map(|((t, k), e)| (t.clone(), k.clone(), e.clone()))
            .collect();
        let interval = SNAPSHOT_INTERVAL.max((map.len() as i64 / 10).min(MAX_SNAPSHOT_INTERVAL));
        // A delta can add and replace entries, not remove them.
        let snapshot = base.group == 0 || removed > 0 || base.chain_len + 1 >= interval;
        let id = self.next_group_id();
        let (chain_len, entries) = if snapshot {
            (0, map.iter().map(|((t, k), e)| (t.clone(), k.clone(), e.clone())).collect())
        } else {
            (base.chain_len + 1, changed)
        };
        let group = NewStateGroup { id, prev_group: (base.group != 0).then_some(base.group), chain_len, entries };
        (GroupState { group: id, chain_len, map: Arc::new(map) }, Some(group))
    }

    /// The change from current state `old` to `new`, compared key by key, with the membership
    /// rows that follow it (`resolved`: more than one event's own entry changed).
    pub(super) async fn current_change(
        &self,
        old: &StateMap,
        new: &GroupState,
        batch: &HashMap<OwnedEventId, Arc<Pdu>>,
    ) -> Result<Option<CurrentStateChange>> {
        let mut delta: Vec<(String, String, Option<OwnedEventId>)> = new
            .map
            .iter()
            .filter(|(k, v)| old.get(*k) != Some(*v))
            .map(|((t, k), e)| (t.clone(), k.clone(), Some(e.clone())))
            .collect();
        delta.extend(old.keys().filter(|k| !new.map.contains_key(*k)).map(|(t, k)| (t.clone(), k.clone(), None)));
        if delta.is_empty() {
            return Ok(None);
        }
        let mut memberships = Vec::new();
        for (event_type, _, event_id) in &delta {
            let Some(event_id) = event_id.as_ref().filter(|_| event_type == "m.room.member") else { continue };
            let pdu = match batch.get(event_id) {
                Some(pdu) => pdu.clone(),
                None => match self.pdus_by_id(&[event_id]).await?.remove(event_id) {
                    Some(pdu) => pdu,
                    None => continue,
                },
            };
            memberships.extend(membership_change(&pdu));
        }
        Ok(Some(CurrentStateChange { group: new.group, delta, memberships, resolved: true }))
    }

    /// The change of current state a single state event makes on top of the current state
    /// (the common, linear case: no comparison of whole states).
    pub(super) fn linear_change(pdu: &Pdu, group: i64) -> Option<CurrentStateChange> {
        let state_key = pdu.state_key.as_ref()?;
        Some(CurrentStateChange {
            group,
            delta: vec![(pdu.event_type.to_string(), state_key.clone(), Some(pdu.event_id.clone()))],
            memberships: membership_change(pdu).into_iter().collect::<Vec<MembershipChange>>(),
            resolved: false,
        })
    }
}
