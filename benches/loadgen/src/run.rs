//! The measured phase: receivers long-polling /sync, senders on a fixed schedule (open loop) or
//! as fast as answers come (closed loop), and the bookkeeping of every send and delivery.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{Map, Value, json};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use crate::matrix::{Account, Api, BENCH_KEY, Event, ReqError, now_us, truncate};
use crate::setup::Room;

/// Open-loop sends in flight at once; a tick finding none free is skipped (and counted).
pub const MAX_IN_FLIGHT: usize = 10_000;
/// Long-poll timeout of the receivers' /sync.
pub const SYNC_TIMEOUT_MS: u64 = 30_000;
/// Pages of /messages fetched to fill one limited timeline.
const MAX_GAP_PAGES: usize = 100;
const GAP_PAGE: u32 = 100;
/// Error bodies kept for the report.
const MAX_ERROR_SAMPLES: usize = 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SendState {
    InFlight,
    Ok,
    Failed,
}

#[derive(Debug)]
struct Msg {
    /// scheduled inside the measured window (after warm-up, before the end)
    counted: bool,
    /// receivers that should see it: room members minus the sender
    expected: u32,
    /// distinct receivers that saw it
    delivered: u32,
    state: SendState,
}

#[derive(Serialize, Debug, Clone)]
pub struct ErrorSample {
    pub request: String,
    pub error: String,
    pub at_secs: f64,
}

/// Everything counted during the measured phase.
#[derive(Default)]
pub struct Tally {
    msgs: Vec<Msg>,
    pub e2e_us: Vec<u64>,
    pub send_us: Vec<u64>,
    pub duplicated: u64,
    pub gap_fetched: u64,
    pub gap_overlap: u64,
    pub limited_syncs: u64,
    pub syncs: u64,
    pub deliveries_in_window: u64,
    pub sends_ok_in_window: u64,
    pub skipped_in_flight_cap: u64,
    /// how late the open-loop scheduler fired, over all ticks (µs)
    pub schedule_lag_max_us: u64,
    pub schedule_lag_total_us: u64,
    pub ticks: u64,
    pub errors: BTreeMap<String, u64>,
    pub errors_by_request: BTreeMap<String, u64>,
    pub error_samples: Vec<ErrorSample>,
}

/// What the messages of the measured window came to, once the drain is over.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Outcome {
    /// messages scheduled in the window
    pub attempted: u64,
    /// of those, answered 200
    pub sent: u64,
    pub send_failed: u64,
    /// still unanswered when the drain ended
    pub send_unfinished: u64,
    pub expected_deliveries: u64,
    pub delivered: u64,
    pub lost: u64,
    /// deliveries of window messages whose send failed or never finished
    pub delivered_unacknowledged: u64,
}

pub struct Ctx {
    pub api: Arc<Api>,
    pub users: Vec<Account>,
    pub rooms: Vec<Room>,
    pub run_id: String,
    /// each user's percent-encoded sync filter (inline JSON or an uploaded filter's ID)
    pub filters: Vec<String>,
    /// phase start, end of warm-up, end of sending
    window: OnceLock<(Instant, Instant, Instant)>,
    tally: Mutex<Tally>,
    in_flight: AtomicUsize,
    pub first_polls: AtomicUsize,
}

#[derive(Clone, Copy)]
enum Source {
    Sync,
    Gap,
}

impl Ctx {
    pub fn new(api: Arc<Api>, users: Vec<Account>, rooms: Vec<Room>, run_id: String, filters: Vec<String>) -> Self {
        Ctx {
            api,
            users,
            rooms,
            run_id,
            filters,
            window: OnceLock::new(),
            tally: Mutex::new(Tally::default()),
            in_flight: AtomicUsize::new(0),
            first_polls: AtomicUsize::new(0),
        }
    }

    pub fn tally(&self) -> MutexGuard<'_, Tally> {
        self.tally.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn set_window(&self, start: Instant, warm_end: Instant, end: Instant) {
        let _ = self.window.set((start, warm_end, end));
    }

    fn in_window(&self, t: Instant) -> bool {
        self.window.get().is_some_and(|&(_, a, b)| t >= a && t < b)
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    fn record_error(&self, request: &str, e: &ReqError) {
        let key = e.key();
        let at_secs = self.window.get().map(|w| w.0.elapsed().as_secs_f64()).unwrap_or(0.0);
        let mut t = self.tally();
        *t.errors.entry(key.clone()).or_default() += 1;
        let kind = request.split_whitespace().next().unwrap_or(request);
        *t.errors_by_request.entry(format!("{kind} {key}")).or_default() += 1;
        if t.error_samples.len() < MAX_ERROR_SAMPLES {
            t.error_samples.push(ErrorSample {
                request: request.to_string(),
                error: truncate(&e.to_string(), 1000).to_string(),
                at_secs,
            });
        }
    }

    fn new_msg(&self, room: usize, counted: bool) -> u64 {
        let expected = self.rooms[room].members.len().saturating_sub(1) as u32;
        let mut t = self.tally();
        t.msgs.push(Msg { counted, expected, delivered: 0, state: SendState::InFlight });
        (t.msgs.len() - 1) as u64
    }

    /// Sends message `id` in `room` as user `member`; the caller has counted it in flight.
    async fn send(&self, id: u64, room: usize, member: usize, counted: bool) {
        let user = &self.users[member];
        let room_id = &self.rooms[room].room_id;
        let sent_at_us = now_us();
        let mut content = Map::new();
        content.insert("msgtype".into(), json!("m.text"));
        content.insert("body".into(), json!(format!("bench {id}")));
        content.insert(
            BENCH_KEY.into(),
            json!({"id": id, "sent_at_us": sent_at_us, "sender": user.user_id, "run": self.run_id}),
        );
        let txn_id = format!("{}-{id}", self.run_id);
        let started = Instant::now();
        let result = self.api.send_message(&user.access_token, room_id, &txn_id, &Value::Object(content)).await;
        let took = started.elapsed();
        let now = Instant::now();
        if let Err(e) = &result {
            self.record_error(
                &format!("send PUT /rooms/{room_id}/send/m.room.message/{txn_id} as {}", user.user_id),
                e,
            );
        }
        {
            let mut t = self.tally();
            let ok = result.is_ok();
            t.msgs[id as usize].state = if ok { SendState::Ok } else { SendState::Failed };
            if ok {
                if counted {
                    t.send_us.push(took.as_micros() as u64);
                }
                if self.in_window(now) {
                    t.sends_ok_in_window += 1;
                }
            }
        }
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
    }

    /// Benchmark messages of this run in `events` that `me` has not seen yet: (id, latency µs).
    fn collect(&self, me: usize, events: &[Event], arrived_us: u64, seen: &mut HashSet<u64>) -> (Vec<(u64, u64)>, u64) {
        let my_id = &self.users[me].user_id;
        let mut fresh = Vec::new();
        let mut repeats = 0;
        for ev in events {
            if &ev.sender == my_id {
                continue;
            }
            let Some(mark) = ev.bench() else { continue };
            if mark.run != self.run_id {
                continue;
            }
            if seen.insert(mark.id) {
                fresh.push((mark.id, arrived_us.saturating_sub(mark.sent_at_us)));
            } else {
                repeats += 1;
            }
        }
        (fresh, repeats)
    }

    fn record_deliveries(&self, fresh: &[(u64, u64)], repeats: u64, source: Source) {
        if fresh.is_empty() && repeats == 0 {
            return;
        }
        let now = Instant::now();
        let in_window = self.in_window(now);
        let mut t = self.tally();
        for &(id, latency) in fresh {
            let Some(m) = t.msgs.get_mut(id as usize) else { continue };
            m.delivered += 1;
            if m.counted {
                t.e2e_us.push(latency);
            }
        }
        if in_window {
            t.deliveries_in_window += fresh.len() as u64;
        }
        match source {
            Source::Sync => t.duplicated += repeats,
            Source::Gap => {
                t.gap_fetched += fresh.len() as u64;
                t.gap_overlap += repeats;
            }
        }
    }

    /// Fetches the events a limited timeline left out: back from `prev_batch` to the `since` token
    /// the sync started from.
    async fn fill_gap(&self, me: usize, room_id: &str, prev_batch: &str, since: &str, seen: &mut HashSet<u64>) {
        let token = &self.users[me].access_token;
        let mut from = prev_batch.to_string();
        for _ in 0..MAX_GAP_PAGES {
            match self.api.messages_back(token, room_id, &from, since, GAP_PAGE).await {
                Ok((page, arrived)) => {
                    let (fresh, repeats) = self.collect(me, &page.chunk, arrived, seen);
                    self.record_deliveries(&fresh, repeats, Source::Gap);
                    match page.end {
                        Some(end) if !page.chunk.is_empty() && end != from => from = end,
                        _ => break,
                    }
                }
                Err(e) => {
                    let req = format!("messages GET /rooms/{room_id}/messages?dir=b&from={from}&to={since}");
                    self.record_error(&req, &e);
                    break;
                }
            }
        }
    }

    /// One user's long-poll loop; runs until aborted.
    pub async fn receiver(self: Arc<Self>, me: usize, mut since: String) {
        let token = self.users[me].access_token.clone();
        let filter = self.filters[me].clone();
        let mut seen: HashSet<u64> = HashSet::new();
        let mut failures: u32 = 0;
        self.first_polls.fetch_add(1, Ordering::SeqCst);
        loop {
            match self.api.sync(&token, &filter, Some(&since), SYNC_TIMEOUT_MS).await {
                Ok((resp, arrived)) => {
                    failures = 0;
                    let mut limited = false;
                    for (room_id, room) in &resp.rooms.join {
                        let (fresh, repeats) = self.collect(me, &room.timeline.events, arrived, &mut seen);
                        self.record_deliveries(&fresh, repeats, Source::Sync);
                        if room.timeline.limited {
                            limited = true;
                            if let Some(prev_batch) = &room.timeline.prev_batch {
                                self.fill_gap(me, room_id, prev_batch, &since, &mut seen).await;
                            }
                        }
                    }
                    {
                        let mut t = self.tally();
                        t.syncs += 1;
                        if limited {
                            t.limited_syncs += 1;
                        }
                    }
                    since = resp.next_batch;
                }
                Err(e) => {
                    self.record_error(&format!("sync GET /sync?since={since} as {}", self.users[me].user_id), &e);
                    failures += 1;
                    let backoff = Duration::from_millis(100u64 << failures.min(6)).min(Duration::from_secs(5));
                    tokio::time::sleep(e.retry_after().unwrap_or(backoff).min(Duration::from_secs(10))).await;
                }
            }
        }
    }

    /// Open loop: message k is due at `start + k / rate`, whatever became of the earlier ones.
    /// Tick k goes to room k mod R, and within it to member (k div R) mod size.
    pub async fn open_loop(self: Arc<Self>, rate: f64) {
        let Some(&(start, warm_end, end)) = self.window.get() else { return };
        let permits = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
        let n_rooms = self.rooms.len();
        let mut k: u64 = 0;
        loop {
            let due = start + Duration::from_secs_f64(k as f64 / rate);
            if due >= end {
                break;
            }
            tokio::time::sleep_until(due.into()).await;
            let lag = Instant::now().saturating_duration_since(due).as_micros() as u64;
            let room = k as usize % n_rooms;
            let members = &self.rooms[room].members;
            let member = members[(k as usize / n_rooms) % members.len()];
            let counted = due >= warm_end;
            {
                let mut t = self.tally();
                t.ticks += 1;
                t.schedule_lag_total_us += lag;
                t.schedule_lag_max_us = t.schedule_lag_max_us.max(lag);
            }
            match permits.clone().try_acquire_owned() {
                Ok(permit) => {
                    let id = self.new_msg(room, counted);
                    self.in_flight.fetch_add(1, Ordering::SeqCst);
                    let ctx = self.clone();
                    tokio::spawn(async move {
                        let _permit: OwnedSemaphorePermit = permit;
                        ctx.send(id, room, member, counted).await;
                    });
                }
                Err(_) => {
                    if counted {
                        self.tally().skipped_in_flight_cap += 1;
                    }
                }
            }
            k += 1;
        }
    }

    /// Closed loop: `senders` members of room 0 each send, wait for the answer, and send again.
    pub async fn closed_loop(self: Arc<Self>, senders: usize) {
        let Some(&(_, warm_end, end)) = self.window.get() else { return };
        let mut set = JoinSet::new();
        for s in 0..senders {
            let ctx = self.clone();
            set.spawn(async move {
                let member = ctx.rooms[0].members[s];
                loop {
                    let now = Instant::now();
                    if now >= end {
                        break;
                    }
                    let counted = now >= warm_end;
                    let id = ctx.new_msg(0, counted);
                    ctx.in_flight.fetch_add(1, Ordering::SeqCst);
                    ctx.send(id, 0, member, counted).await;
                    if ctx.tally().msgs[id as usize].state == SendState::Failed {
                        // Do not spin on a failing server.
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            });
        }
        while set.join_next().await.is_some() {}
    }

    /// True once every successfully sent window message has reached all its receivers.
    pub fn all_delivered(&self) -> bool {
        let t = self.tally();
        t.msgs.iter().filter(|m| m.counted && m.state == SendState::Ok).all(|m| m.delivered >= m.expected)
    }

    pub fn outcome(&self) -> Outcome {
        let t = self.tally();
        let mut o = Outcome::default();
        for m in t.msgs.iter().filter(|m| m.counted) {
            o.attempted += 1;
            match m.state {
                SendState::Ok => {
                    o.sent += 1;
                    o.expected_deliveries += u64::from(m.expected);
                    o.delivered += u64::from(m.delivered.min(m.expected));
                }
                SendState::Failed => {
                    o.send_failed += 1;
                    o.delivered_unacknowledged += u64::from(m.delivered);
                }
                SendState::InFlight => {
                    o.send_unfinished += 1;
                    o.delivered_unacknowledged += u64::from(m.delivered);
                }
            }
        }
        o.lost = o.expected_deliveries - o.delivered;
        o
    }
}
