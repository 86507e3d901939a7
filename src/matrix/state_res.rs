//! State resolution between forks of a room's graph: ruma's implementation of the v2 algorithm
//! (with the v12 rules where the room version has them), never hand-written.
//!
//! This module only prepares what `ruma::state_res::resolve` asks of its caller — the auth chain
//! of each state, and from room version 12 the conflicted state subgraph — from events the
//! caller loaded. No IO: the caller gathers every event reachable through `auth_events` from the
//! states (see [`missing_auth_events`]), then calls [`resolve`].

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
};

use ruma::{EventId, OwnedEventId, room_version_rules::RoomVersionRules, state_res::utils::event_id_set::EventIdSet};

use crate::matrix::{auth::StateKey, pdu::Pdu};

/// Events by ID, as loaded for a resolution.
pub type EventMap = HashMap<OwnedEventId, Arc<Pdu>>;

/// A room state keyed the way ruma keys it.
pub type StateMap = HashMap<StateKey, OwnedEventId>;

/// Event IDs cited (`auth_events`) by events in `events` that `events` lacks, starting from
/// `roots`: the caller loads these and asks again until nothing is missing.
pub fn missing_auth_events<'a>(
    roots: impl IntoIterator<Item = &'a OwnedEventId>,
    events: &EventMap,
) -> HashSet<OwnedEventId> {
    let mut missing = HashSet::new();
    let mut seen: HashSet<&EventId> = HashSet::new();
    let mut stack: Vec<&EventId> = roots.into_iter().map(|id| &**id).collect();
    while let Some(id) = stack.pop() {
        if !seen.insert(id) {
            continue;
        }
        match events.get(id) {
            Some(event) => stack.extend(event.auth_events.iter().map(|id| &**id)),
            None => {
                missing.insert(id.to_owned());
            }
        }
    }
    missing
}

/// The auth chain of a set of events: everything reachable through `auth_events`, the events
/// themselves excluded unless another one cites them. Memoised per event in `chains`.
fn auth_chain_of<'a>(
    roots: impl IntoIterator<Item = &'a OwnedEventId>,
    events: &EventMap,
    chains: &mut HashMap<OwnedEventId, Arc<HashSet<OwnedEventId>>>,
) -> HashSet<OwnedEventId> {
    let mut chain = HashSet::new();
    for root in roots {
        chain.extend(event_chain(root, events, chains).iter().cloned());
    }
    chain
}

/// The auth chain of one event (iterative, so deep chains do not overflow the stack).
fn event_chain(
    root: &EventId,
    events: &EventMap,
    chains: &mut HashMap<OwnedEventId, Arc<HashSet<OwnedEventId>>>,
) -> Arc<HashSet<OwnedEventId>> {
    if let Some(chain) = chains.get(root) {
        return chain.clone();
    }
    // Post-order over the auth DAG: an event's chain is its auth events and their chains.
    let mut stack: Vec<(OwnedEventId, bool)> = vec![(root.to_owned(), false)];
    while let Some((id, expanded)) = stack.pop() {
        if chains.contains_key(&id) {
            continue;
        }
        let auth_events = events.get(&id).map(|e| e.auth_events.clone()).unwrap_or_default();
        if expanded {
            let mut chain = HashSet::new();
            for auth in &auth_events {
                chain.insert(auth.clone());
                if let Some(sub) = chains.get(auth) {
                    chain.extend(sub.iter().cloned());
                }
            }
            chains.insert(id, Arc::new(chain));
        } else {
            stack.push((id.clone(), true));
            for auth in auth_events {
                if !chains.contains_key(&auth) {
                    stack.push((auth, false));
                }
            }
        }
    }
    chains.get(root).cloned().unwrap_or_default()
}

/// The conflicted state subgraph (room version 12): every event on an `auth_events` path from one
/// conflicted state event to another, endpoints included.
fn conflicted_state_subgraph(
    conflicted: &HashSet<OwnedEventId>,
    events: &EventMap,
    chains: &mut HashMap<OwnedEventId, Arc<HashSet<OwnedEventId>>>,
) -> HashSet<OwnedEventId> {
    // Candidates: the conflicted events and their auth chains (everything reachable from one).
    let mut reachable: HashSet<OwnedEventId> = conflicted.clone();
    for id in conflicted {
        reachable.extend(event_chain(id, events, chains).iter().cloned());
    }
    // Of those, the ones from which a conflicted event is reachable (or that are one).
    reachable
        .into_iter()
        .filter(|id| conflicted.contains(id) || event_chain(id, events, chains).iter().any(|a| conflicted.contains(a)))
        .collect()
}

/// Resolves `states` (the states after each branch) with the room version's algorithm.
/// `events` must hold every event of the states and of their auth chains.
pub fn resolve(rules: &RoomVersionRules, states: &[Arc<StateMap>], events: &EventMap) -> Result<StateMap, String> {
    let state_res_rules =
        rules.state_res.v2_rules().ok_or_else(|| "room version without state resolution v2".to_owned())?;
    let mut chains = HashMap::new();
    let auth_chains: Vec<EventIdSet<OwnedEventId>> =
        states.iter().map(|state| auth_chain_of(state.values(), events, &mut chains).into_iter().collect()).collect();
    let subgraph = |conflicted: &ruma::state_res::StateMap<Vec<OwnedEventId>>| {
        let conflicted: HashSet<OwnedEventId> = conflicted.values().flatten().cloned().collect();
        let mut chains = HashMap::new();
        Some(conflicted_state_subgraph(&conflicted, events, &mut chains).into_iter().collect())
    };
    ruma::state_res::resolve(
        &rules.authorization,
        state_res_rules,
        states.iter().map(|state| &**state),
        auth_chains,
        |id: &EventId| events.get(id).cloned(),
        subgraph,
    )
    .map_err(|err| err.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A state event citing `auth_events`, enough for the graph walks.
    fn event(id: &str, auth_events: &[&str]) -> (OwnedEventId, Arc<Pdu>) {
        let event_id = EventId::parse(id).unwrap();
        let json = serde_json::json!({
            "type": "m.room.member", "state_key": id, "sender": "@a:example.org", "content": {},
            "depth": 1, "origin_server_ts": 1, "prev_events": [], "auth_events": auth_events,
        });
        let pdu = Pdu::from_json(json.to_string(), ruma::owned_room_id!("!r:example.org"), event_id.clone()).unwrap();
        (event_id, Arc::new(pdu))
    }

    fn ids(list: &[&str]) -> HashSet<OwnedEventId> {
        list.iter().map(|id| EventId::parse(*id).unwrap()).collect()
    }

    #[test]
    fn the_conflicted_state_subgraph_is_every_auth_path_between_conflicted_events() {
        // $c → $b → $a (auth edges), $d → $a, $e alone.
        let events: EventMap =
            [event("$a", &[]), event("$b", &["$a"]), event("$c", &["$b"]), event("$d", &["$a"]), event("$e", &[])]
                .into_iter()
                .collect();
        let mut chains = HashMap::new();
        let subgraph = conflicted_state_subgraph(&ids(&["$a", "$c", "$e"]), &events, &mut chains);
        assert_eq!(subgraph, ids(&["$a", "$b", "$c", "$e"]), "$d leads to a conflicted event but none leads to it");
    }

    #[test]
    fn missing_auth_events_are_found_through_the_chain() {
        let events: EventMap = [event("$b", &["$a"]), event("$c", &["$b", "$x"])].into_iter().collect();
        let roots = [EventId::parse("$c").unwrap()];
        assert_eq!(missing_auth_events(roots.iter(), &events), ids(&["$a", "$x"]));
        let mut chains = HashMap::new();
        assert_eq!(auth_chain_of(roots.iter(), &events, &mut chains), ids(&["$a", "$b", "$x"]));
    }
}
