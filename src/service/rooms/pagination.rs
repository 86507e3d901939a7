//! `/messages` and `/context`: pages of a room's timeline in its topological order — depth, then
//! stream position — so events that arrive late (from other servers, or backfilled history)
//! take their place in the graph instead of their place in arrival order.
//!
//! Pagination tokens are `t{depth}_{stream}` ([`PageToken`]); a stream token `s…` (a sync's
//! `prev_batch`) is accepted and converted to the topological position of that stream position.
//! Nothing here writes.

use std::sync::Arc;

use ruma::{EventId, OwnedEventId, RoomId, UserId, api::client::filter::RoomEventFilter};

use super::{Rooms, StoredEvent, history::ReadAccess};
use crate::{
    error::{Error, Result},
    service::{filter, stream::StreamToken},
    storage::rooms::{Dir, TopoPos},
};

/// A pagination token as a client hands it back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageToken {
    /// `t{depth}_{stream}`: a place in the room's topological order.
    Topological(TopoPos),
    /// `s…`: a stream position (sync's `prev_batch`, older tokens).
    Stream(i64),
}

impl PageToken {
    pub fn parse(token: &str) -> Result<PageToken> {
        let Some(body) = token.strip_prefix('t') else {
            return Ok(PageToken::Stream(StreamToken::parse(token)?.stream));
        };
        let invalid = || Error::InvalidParam(format!("invalid token: {token}"));
        let (depth, stream) = body.split_once('_').ok_or_else(invalid)?;
        let depth: i64 = depth.parse().map_err(|_| invalid())?;
        // Backfilled events have negative stream positions.
        let stream: i64 = stream.parse().map_err(|_| invalid())?;
        Ok(PageToken::Topological(TopoPos { depth, stream }))
    }

    pub fn format(pos: TopoPos) -> String {
        format!("t{}_{}", pos.depth, pos.stream)
    }
}

/// The topological position of an event: the point just after it.
pub fn position_of(event: &StoredEvent) -> TopoPos {
    TopoPos { depth: event.pdu.depth as i64, stream: event.stream_pos }
}

/// The point just before an event.
pub fn position_before(event: &StoredEvent) -> TopoPos {
    TopoPos { depth: event.pdu.depth as i64, stream: event.stream_pos - 1 }
}

/// A page of the timeline in topological order.
pub struct HistoryPage {
    pub events: Vec<Arc<StoredEvent>>,
    /// Where to continue from, when there may be more.
    pub next: Option<TopoPos>,
    /// The viewer's read bound the page was read under: what is served with its events (bundled
    /// edits, thread summaries) stops there too.
    pub upto: i64,
}

/// `/context`: the event, the pages around it, the state group its state comes from and the
/// viewer's read bound.
pub struct Context {
    pub event: Arc<StoredEvent>,
    pub before: HistoryPage,
    pub after: HistoryPage,
    pub state_group: i64,
    pub upto: i64,
}

impl Rooms {
    /// Where a client's token points in the room's topological order. A stream position becomes
    /// the greatest depth reached at or before it, with that position, as Synapse converts one.
    pub async fn topological_position(&self, room_id: &RoomId, token: PageToken) -> Result<TopoPos> {
        match token {
            PageToken::Topological(pos) => Ok(pos),
            PageToken::Stream(stream) => Ok(self.db.topological_at_stream(room_id, stream).await?),
        }
    }

    /// The room's backward extremities (where the history we hold stops): (a timeline event, a
    /// prev event of it we do not hold), deepest first, at most `limit`. A room joined over
    /// federation has at least its join there until its history is backfilled.
    pub async fn gaps(&self, room_id: &RoomId, limit: usize) -> Result<Vec<(OwnedEventId, OwnedEventId)>> {
        Ok(self.db.backward_extremities(room_id, limit as i64).await?)
    }

    /// Whether `events` reach a gap: one of them has prev events we do not hold.
    pub async fn reaches_gap(&self, events: &[Arc<StoredEvent>]) -> Result<bool> {
        let ids: Vec<&EventId> = events.iter().map(|e| &*e.pdu.event_id).collect();
        Ok(self.db.has_backward_extremity(&ids).await?)
    }

    /// Reads a page of a room's events from `from` in `dir` (down to, or up to, `to`), keeping
    /// only events that pass `filter` and visibility and that lie within the viewer's read
    /// bound, fetching more while the page is short.
    #[allow(clippy::too_many_arguments)] // Mirrors the pagination parameters of the spec endpoints.
    pub async fn page(
        &self,
        viewer: &UserId,
        room_id: &RoomId,
        from: TopoPos,
        to: Option<TopoPos>,
        dir: Dir,
        limit: usize,
        filter: Option<&RoomEventFilter>,
        access: &ReadAccess,
    ) -> Result<HistoryPage> {
        let ignored = self.ignored_users(viewer).await?;
        let mut events = Vec::new();
        let (mut after, mut upto) = match dir {
            Dir::Backward => (to.unwrap_or(TopoPos::START), from),
            Dir::Forward => (from, to.unwrap_or(TopoPos::END)),
        };
        let batch = (limit as i64 + 1).clamp(2, 1000);
        let mut exhausted = false;
        for _ in 0..20 {
            if after >= upto {
                exhausted = true;
                break;
            }
            let rows = self.db.room_events_topological(room_id, after, upto, access.upto, dir, batch).await?;
            let fetched = rows.len() as i64;
            let candidates = self.events_from_rows(rows)?;
            let Some(last) = candidates.last() else {
                exhausted = true;
                break;
            };
            match dir {
                Dir::Backward => upto = position_before(last),
                Dir::Forward => after = position_of(last),
            }
            let candidates: Vec<_> = candidates
                .into_iter()
                .filter(|e| filter.is_none_or(|f| filter::room_event_matches(f, &e.pdu)))
                .collect();
            let visible = self.filter_visible(viewer, candidates, &ignored).await?;
            for event in visible {
                if events.len() == limit {
                    break;
                }
                events.push(event);
            }
            if events.len() == limit {
                break;
            }
            if fetched < batch {
                exhausted = true;
                break;
            }
        }
        let next = if exhausted && events.len() < limit {
            None
        } else {
            events.last().map(|e| match dir {
                Dir::Backward => position_before(e),
                Dir::Forward => position_of(e),
            })
        };
        Ok(HistoryPage { events, next, upto: access.upto })
    }

    /// `GET /rooms/{roomId}/context/{eventId}`: the event, events around it and the state at the
    /// last returned event.
    pub async fn context(
        &self,
        viewer: &UserId,
        room_id: &RoomId,
        event_id: &EventId,
        limit: usize,
        filter: Option<&RoomEventFilter>,
    ) -> Result<Context> {
        let (event, access) = self.visible_event_with_access(viewer, room_id, event_id).await?;
        let before_limit = limit / 2;
        let after_limit = limit - before_limit;
        let before = self
            .page(viewer, room_id, position_before(&event), None, Dir::Backward, before_limit, filter, &access)
            .await?;
        let after =
            self.page(viewer, room_id, position_of(&event), None, Dir::Forward, after_limit, filter, &access).await?;
        let state_group = after.events.last().map_or(event.state_after, |e| e.state_after);
        Ok(Context { event, before, after, state_group, upto: access.upto })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topological_tokens_round_trip_and_stream_tokens_are_accepted() {
        let pos = TopoPos { depth: 12, stream: -40 };
        assert_eq!(PageToken::parse(&PageToken::format(pos)).unwrap(), PageToken::Topological(pos));
        assert_eq!(PageToken::parse("s17_3").unwrap(), PageToken::Stream(17));
        assert_eq!(PageToken::parse("17").unwrap(), PageToken::Stream(17));
        for bad in ["t", "t12", "t_1", "t1_x", "t1_2_3", "tx_1", "s-1", ""] {
            assert!(PageToken::parse(bad).is_err(), "{bad}");
        }
    }
}
