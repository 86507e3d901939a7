//! History fetched from other servers (`/backfill`): [`Rooms::receive_backfilled`] places an
//! event older than what we hold through the checks on receipt (format, signatures, hash, auth
//! events, the state before it) and stores it below everything else.
//!
//! A backfilled event gets a negative stream position from a counter that only goes down, so
//! it sorts before what we had, is never after a sync token (no `/sync` or WebSocket frame
//! shows it as new), and is written without the stream writer's views and wake-ups. It never
//! becomes a forward extremity, never changes the room's current state and is never sent to
//! other servers (nothing queues it).

use std::sync::Arc;

use ruma::{
    CanonicalJsonObject, OwnedEventId, RoomId, ServerName, events::TimelineEventType, signatures::PublicKeyMap,
};

use super::{
    RoomHandle, Rooms, StateMap, StoredEvent,
    graph::GroupState,
    receive::{Checked, Outcome},
    relation_of,
};
use crate::{
    error::{Error, Result},
    matrix::{auth, pdu::Pdu, state_res::EventMap},
    storage::stream::{EventWrite, NewStateGroup, StreamWrite},
};

impl Rooms {
    /// Places a backfilled PDU of `room_id`. `state_before` is the state before it when its
    /// prev events are not all in the graph (the oldest of a batch): fetched by the caller,
    /// whose events are stored as outliers already; without it such an event comes back as
    /// [`Outcome::MissingEvents`].
    pub async fn receive_backfilled(
        &self,
        origin: &ServerName,
        room_id: &RoomId,
        pdu: CanonicalJsonObject,
        keys: &PublicKeyMap,
        state_before: Option<StateMap>,
    ) -> Result<Outcome> {
        let handle = self.handle(room_id).await?;
        let checked = match self.check_up_to_auth_events(origin, room_id, &handle, pdu, keys).await? {
            Ok(checked) => checked,
            Err(outcome) => return Ok(outcome),
        };
        // Under the room's writer, so a live event and a backfilled one never race for the same
        // ID; the writer's state itself is left as it is.
        let rooms = self.me.upgrade().ok_or_else(|| Error::Internal("the rooms service has stopped".to_owned()))?;
        tokio::spawn(async move {
            let _writer = handle.writer.lock().await;
            rooms.place_backfilled(&handle, checked, state_before).await
        })
        .await
        .map_err(|err| Error::Internal(format!("backfilling failed: {err}")))?
    }

    /// The state before a backfilled event from its prev events in the graph, or `None` when
    /// some are unknown.
    async fn state_from_prevs(
        &self,
        handle: &RoomHandle,
        pdu: &Pdu,
    ) -> Result<Option<(GroupState, Option<NewStateGroup>)>> {
        let mut groups = Vec::with_capacity(pdu.prev_events.len());
        for prev in &pdu.prev_events {
            if let Some(event) = self.timeline_event(prev).await? {
                groups.push(event.state_after);
            } else if let Some(group) = self.db.rejected(prev).await?.and_then(|r| r.state_group) {
                groups.push(group);
            } else {
                return Ok(None);
            }
        }
        if groups.is_empty() {
            return Ok(None);
        }
        if groups.iter().all(|g| *g == groups[0]) {
            return Ok(Some((self.group_state(groups[0]).await?, None)));
        }
        let mut states = Vec::with_capacity(groups.len());
        for group in &groups {
            states.push(self.state_at(*group).await?);
        }
        let resolved = self.resolve_states(handle, &states, &EventMap::new()).await?;
        let base = self.group_state(groups[0]).await?;
        Ok(Some(self.derive_group(&base, resolved)))
    }

    async fn place_backfilled(
        &self,
        handle: &RoomHandle,
        checked: Checked,
        state_before: Option<StateMap>,
    ) -> Result<Outcome> {
        let Checked { pdu, was_redacted } = checked;
        let event_id = pdu.event_id.clone();
        if self.timeline_event(&event_id).await?.is_some() {
            return Ok(Outcome::AlreadyKnown { event_id });
        }
        let mut new_state_groups = Vec::new();
        let is_create = pdu.event_type == TimelineEventType::RoomCreate && pdu.prev_events.is_empty();
        let before = if is_create {
            GroupState::default()
        } else if let Some((before, resolution)) = self.state_from_prevs(handle, &pdu).await? {
            // A resolution of several prev events' states is a group of its own, written with it.
            new_state_groups.extend(resolution);
            before
        } else if let Some(state) = state_before {
            let (before, group) = self.derive_group(&GroupState::default(), state);
            new_state_groups.extend(group);
            before
        } else {
            let missing: Vec<OwnedEventId> = pdu.prev_events.clone();
            return Ok(Outcome::MissingEvents { event_id, missing });
        };

        // Step 5: against the state before it. There is no step 6: it changes no current state.
        let before_auth = self.auth_state_for(handle, &pdu, &before.map).await?;
        if let Err(why) = auth::check_against_state(&handle.rules.authorization, &pdu, &before_auth) {
            let group = new_state_groups.is_empty().then_some(before.group);
            return self.reject(&pdu, format!("state before it: {why}"), group).await;
        }
        let (after, replaces_state) = self.state_after_placed(&before, &pdu, &mut new_state_groups);

        // A backfilled redaction of an event we hold redacts it; a redaction of this one we hold
        // already (received before its target) applies now.
        let redaction_target = self.redaction_of_held(handle, &pdu, &before.map).await?;
        let (stored_pdu, redacted_by) = self.apply_held_redaction(handle, &Arc::new(pdu)).await?;
        if was_redacted {
            tracing::info!(%event_id, "a backfilled event's content hash did not match; stored redacted");
        }
        let (relates_to, rel_type) = relation_of(&stored_pdu);
        let write = EventWrite {
            pdu: stored_pdu.clone(),
            relates_to,
            rel_type,
            state_before: before.group,
            state_after: after.group,
            replaces_state: replaces_state.clone(),
            new_state_groups,
            current: None,
            forward_extremities: Vec::new(),
            soft_failed: false,
            redacted_by: redacted_by.clone(),
            was_outlier: self.db.is_outlier(&event_id).await?,
            txn: None,
            redaction_target: redaction_target.clone(),
            new_room: None,
            backfilled: true,
        };
        let stream_pos = {
            let mut last = self.backfill_pos.lock().await;
            let pos = *last - 1;
            self.db.commit_stream_batch(pos, &[&StreamWrite::Event(Box::new(write))]).await?;
            *last = pos;
            pos
        };
        if let Some((target, redacted_json)) = &redaction_target {
            self.streams.redacted_outside_stream(&handle.room_id, target, redacted_json, &event_id);
        }
        let mut cache = self.events.lock();
        if let Some((target, _)) = &redaction_target {
            cache.redacted(target);
        }
        cache.insert(Arc::new(StoredEvent {
            pdu: (*stored_pdu).clone(),
            stream_pos,
            redacted_by,
            soft_failed: false,
            state_before: before.group,
            state_after: after.group,
            replaces_state,
            txn: None,
            txn_known: true,
        }));
        Ok(Outcome::Accepted { event_id, stream_pos })
    }
}
