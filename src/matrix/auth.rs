//! Authorization rules, applied through ruma's implementation of the spec's rules
//! (`ruma::state_res`), never hand-written.

use std::{collections::HashMap, sync::Arc};

use ruma::{
    EventId, UserId,
    events::{StateEventType, TimelineEventType},
    room_version_rules::AuthorizationRules,
    state_res::{check_state_dependent_auth_rules, check_state_independent_auth_rules},
};

use crate::matrix::pdu::{EventTemplate, Pdu};

/// A state key: event type and state key.
pub type StateKey = (StateEventType, String);

/// The state an event is checked against: the events at the keys the auth rules look at.
pub type AuthState = HashMap<StateKey, Arc<Pdu>>;

/// The keys whose current state events become a new event's `auth_events` (Server-Server API,
/// "Auth events selection"). For room versions that drop the create event from `auth_events`,
/// the create event is still needed for the checks, so it is added to the returned list.
pub fn auth_state_keys(
    template: &EventTemplate,
    sender: &UserId,
    rules: &AuthorizationRules,
) -> Result<Vec<StateKey>, String> {
    let content = serde_json::value::to_raw_value(&template.content).map_err(|e| e.to_string())?;
    let event_type = TimelineEventType::from(template.event_type.as_str());
    let mut keys =
        ruma::state_res::auth_types_for_event(&event_type, sender, template.state_key.as_deref(), &content, rules)?;
    let create = (StateEventType::RoomCreate, String::new());
    if !keys.contains(&create) {
        keys.push(create);
    }
    Ok(keys)
}

/// Whether `event_type` is the create event (which goes in no other event's `auth_events` from
/// room version 12 on).
pub fn belongs_in_auth_events(event: &Pdu, rules: &AuthorizationRules) -> bool {
    event.event_type != TimelineEventType::RoomCreate || !rules.room_create_event_id_as_room_id
}

/// Checks `pdu` against its auth events and the state it was built on (for a locally created event
/// these are the same state, so one pass covers both checks of the spec).
pub fn check(rules: &AuthorizationRules, pdu: &Pdu, state: &AuthState) -> Result<(), String> {
    let by_id: HashMap<&EventId, &Pdu> = state.values().map(|event| (&*event.event_id, event.as_ref())).collect();
    check_state_independent_auth_rules(rules, pdu, |id: &EventId| by_id.get(id).copied())?;
    check_state_dependent_auth_rules(rules, pdu, |event_type: &StateEventType, state_key: &str| {
        state.get(&(event_type.clone(), state_key.to_owned())).map(|event| event.as_ref())
    })
}

/// Checks a received event against its own `auth_events` (step 4 of the checks on receipt):
/// the state-independent rules (the list itself: same room, expected keys, no duplicates,
/// nothing rejected) and then the state-dependent rules with those events as the state.
/// `auth_events` holds the events it cites and, from room version 12, the create event.
pub fn check_against_auth_events(
    rules: &AuthorizationRules,
    pdu: &Pdu,
    auth_events: &HashMap<ruma::OwnedEventId, Arc<Pdu>>,
) -> Result<(), String> {
    check_state_independent_auth_rules(rules, pdu, |id: &EventId| auth_events.get(id).map(|e| e.as_ref()))?;
    let mut state = AuthState::new();
    for event in auth_events.values() {
        if let Some(state_key) = &event.state_key {
            state.insert((event.event_type.to_string().into(), state_key.clone()), event.clone());
        }
    }
    check_against_state(rules, pdu, &state)
}

/// Checks a received event against a room state (steps 5 and 6 of the checks on receipt: the
/// state before it, then the current state). Only the state-dependent rules: the others do not
/// change with the state and ran once, in [`check_against_auth_events`].
pub fn check_against_state(rules: &AuthorizationRules, pdu: &Pdu, state: &AuthState) -> Result<(), String> {
    check_state_dependent_auth_rules(rules, pdu, |event_type: &StateEventType, state_key: &str| {
        state.get(&(event_type.clone(), state_key.to_owned())).map(|event| event.as_ref())
    })
}

/// The keys of the state the auth rules look at for a received event (ruma's auth event
/// selection), with the create event.
pub fn auth_state_keys_of(pdu: &Pdu, rules: &AuthorizationRules) -> Result<Vec<StateKey>, String> {
    let mut keys = ruma::state_res::auth_types_for_event(
        &pdu.event_type,
        &pdu.sender,
        pdu.state_key.as_deref(),
        &pdu.content,
        rules,
    )?;
    let create = (StateEventType::RoomCreate, String::new());
    if !keys.contains(&create) {
        keys.push(create);
    }
    Ok(keys)
}
