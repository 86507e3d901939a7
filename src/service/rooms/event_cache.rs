//! The event cache, kept from undoing redactions.
//!
//! A read that began before a redaction committed can come back with the unredacted row after
//! the redaction has already evicted its target; putting that row in the cache would serve the
//! unredacted event (through `/event`, `prev_content`, relations) until it is evicted. Two guards,
//! because a redaction is final:
//! - a generation counter, moved on by every redaction: a read that starts here records it first
//!   and its row is cached only if no redaction happened meanwhile (as the access-token cache in
//!   `users.rs` does);
//! - the IDs of recently redacted events: rows read by callers elsewhere (pagination, timelines)
//!   are never cached unredacted for those, nor may an unredacted entry replace a redacted one.

use std::{num::NonZeroUsize, sync::Arc};

use lru::LruCache;
use ruma::{EventId, OwnedEventId};

use super::StoredEvent;

/// Redaction targets remembered; a read that stays in flight across this many redactions is
/// not a case worth more memory.
const REDACTED_REMEMBERED: usize = 100_000;

pub(crate) struct EventCache {
    entries: LruCache<OwnedEventId, Arc<StoredEvent>>,
    generation: u64,
    redacted: LruCache<OwnedEventId, ()>,
}

impl EventCache {
    pub(crate) fn new(capacity: usize) -> EventCache {
        EventCache {
            entries: LruCache::new(NonZeroUsize::new(capacity).expect("a non-empty cache")),
            generation: 0,
            redacted: LruCache::new(NonZeroUsize::new(REDACTED_REMEMBERED).expect("non-zero")),
        }
    }

    pub(crate) fn get(&mut self, event_id: &EventId) -> Option<Arc<StoredEvent>> {
        self.entries.get(event_id).cloned()
    }

    /// The generation to record before reading an event from the database.
    pub(crate) fn generation(&self) -> u64 {
        self.generation
    }

    /// Caches an event read while the cache was at `generation`; dropped if a redaction happened
    /// since (the row may predate it).
    pub(crate) fn insert_read(&mut self, generation: u64, event: Arc<StoredEvent>) {
        if generation == self.generation || event.redacted_by.is_some() {
            self.insert(event);
        }
    }

    /// Caches an event unless it is a stale unredacted copy of a redacted one.
    pub(crate) fn insert(&mut self, event: Arc<StoredEvent>) {
        if event.redacted_by.is_none() {
            if self.redacted.contains(&event.pdu.event_id) {
                return;
            }
            if self.entries.peek(&event.pdu.event_id).is_some_and(|cached| cached.redacted_by.is_some()) {
                return;
            }
        }
        self.entries.put(event.pdu.event_id.clone(), event);
    }

    /// A redaction of `target` committed: evict it and refuse copies read before.
    pub(crate) fn redacted(&mut self, target: &EventId) {
        self.generation += 1;
        self.entries.pop(target);
        self.redacted.put(target.to_owned(), ());
    }
}

#[cfg(test)]
mod tests {
    use ruma::{MilliSecondsSinceUnixEpoch, UInt, owned_event_id, owned_room_id, owned_user_id};
    use serde_json::value::RawValue;

    use super::*;
    use crate::matrix::pdu::Pdu;

    fn event(redacted_by: Option<OwnedEventId>) -> Arc<StoredEvent> {
        Arc::new(StoredEvent {
            pdu: Pdu {
                event_id: owned_event_id!("$target"),
                room_id: owned_room_id!("!room:localhost"),
                sender: owned_user_id!("@alice:localhost"),
                event_type: "m.room.message".into(),
                state_key: None,
                content: RawValue::from_string("{}".to_owned()).unwrap(),
                prev_events: Vec::new(),
                auth_events: Vec::new(),
                depth: 1,
                origin_server_ts: MilliSecondsSinceUnixEpoch(UInt::MIN),
                redacts: None,
                json: "{}".to_owned(),
                has_room_id: true,
                rejected: false,
            },
            stream_pos: 1,
            redacted_by,
            soft_failed: false,
            state_before: 0,
            state_after: 0,
            replaces_state: None,
            txn: None,
            txn_known: true,
        })
    }

    #[test]
    fn a_read_that_began_before_a_redaction_is_not_cached() {
        let mut cache = EventCache::new(10);
        let target = owned_event_id!("$target");
        // A reader misses, records the generation and reads the unredacted row…
        let generation = cache.generation();
        // …the redaction commits and evicts the target…
        cache.redacted(&target);
        // …and the reader's stale row stays out of the cache.
        cache.insert_read(generation, event(None));
        assert!(cache.get(&target).is_none());
        // Rows read by callers are refused too, and the redacted form is kept.
        cache.insert(event(None));
        assert!(cache.get(&target).is_none());
        cache.insert(event(Some(owned_event_id!("$redaction"))));
        cache.insert(event(None));
        assert!(cache.get(&target).unwrap().redacted_by.is_some());
    }

    #[test]
    fn reads_without_a_redaction_in_between_are_cached() {
        let mut cache = EventCache::new(10);
        let generation = cache.generation();
        cache.insert_read(generation, event(None));
        assert!(cache.get(&owned_event_id!("$target")).is_some());
    }
}
