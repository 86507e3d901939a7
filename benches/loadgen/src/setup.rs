//! The unmeasured setup phase: accounts, rooms, memberships and each user's starting sync token.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinSet;

use serde_json::Value;

use crate::matrix::{Account, Api, ReqError};
use crate::plan::Plan;

/// Gives up on one setup step after this many attempts or this long, whichever comes first.
const SETUP_ATTEMPTS: u32 = 8;
const SETUP_STEP_DEADLINE: Duration = Duration::from_secs(300);

/// A room as created on the server.
#[derive(Debug, Clone)]
pub struct Room {
    pub room_id: String,
    /// indexes into the user list
    pub members: Vec<usize>,
}

pub struct World {
    pub users: Vec<Account>,
    pub rooms: Vec<Room>,
    /// `next_batch` of each user's initial sync
    pub since: Vec<String>,
    pub timings: Vec<(String, f64)>,
}

/// Retries `f` on rate limits, overload and transport errors.
pub async fn retrying<T, F, Fut>(what: &str, mut f: F) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, ReqError>>,
{
    let deadline = Instant::now() + SETUP_STEP_DEADLINE;
    let mut attempt = 0;
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) if e.transient() && attempt + 1 < SETUP_ATTEMPTS && Instant::now() < deadline => {
                let backoff = Duration::from_millis(200u64 << attempt.min(5));
                tokio::time::sleep(e.retry_after().unwrap_or(backoff).min(Duration::from_secs(10))).await;
                attempt += 1;
            }
            Err(e) => return Err(format!("{what}: {e}")),
        }
    }
}

/// Runs `f(0..n)` with at most `concurrency` at a time; stops at the first error.
async fn run_all<T, F, Fut>(what: &str, n: usize, concurrency: usize, f: F) -> Result<Vec<T>, String>
where
    T: Send + 'static,
    F: Fn(usize) -> Fut,
    Fut: Future<Output = Result<T, String>> + Send + 'static,
{
    let started = Instant::now();
    let mut results: Vec<Option<T>> = (0..n).map(|_| None).collect();
    let mut set = JoinSet::new();
    let mut next = 0;
    let mut done = 0;
    let mut reported = Instant::now();
    while done < n {
        while next < n && set.len() < concurrency.max(1) {
            let fut = f(next);
            let i = next;
            set.spawn(async move { (i, fut.await) });
            next += 1;
        }
        let Some(joined) = set.join_next().await else { break };
        match joined {
            Ok((i, Ok(v))) => results[i] = Some(v),
            Ok((_, Err(e))) => {
                set.abort_all();
                return Err(e);
            }
            Err(e) => {
                set.abort_all();
                return Err(format!("{what}: task failed: {e}"));
            }
        }
        done += 1;
        if reported.elapsed() >= Duration::from_secs(5) && done < n {
            eprintln!("  {what}: {done}/{n} ({:.0} s)", started.elapsed().as_secs_f64());
            reported = Instant::now();
        }
    }
    results.into_iter().enumerate().map(|(i, r)| r.ok_or_else(|| format!("{what}: item {i} never finished"))).collect()
}

pub async fn build(
    api: Arc<Api>,
    plan: &Plan,
    prefix: &str,
    password: &str,
    concurrency: usize,
    initial_filter: &str,
) -> Result<World, String> {
    let mut timings = Vec::new();

    let t = Instant::now();
    let users = {
        let (api, prefix, password) = (api.clone(), prefix.to_string(), password.to_string());
        run_all("register", plan.users, concurrency, move |i| {
            let (api, name, password) = (api.clone(), format!("{prefix}{i}"), password.clone());
            async move { retrying(&format!("register {name}"), || api.register(&name, &password)).await }
        })
        .await?
    };
    let users = Arc::new(users);
    timings.push(("register".to_string(), t.elapsed().as_secs_f64()));
    eprintln!("registered {} users in {:.1} s", users.len(), t.elapsed().as_secs_f64());

    let t = Instant::now();
    let room_ids = {
        let (api, users, specs) = (api.clone(), users.clone(), Arc::new(plan.rooms.clone()));
        let prefix = prefix.to_string();
        run_all("createRoom", plan.rooms.len(), concurrency, move |r| {
            let (api, users, specs, prefix) = (api.clone(), users.clone(), specs.clone(), prefix.clone());
            async move {
                let spec = &specs[r];
                let creator = &users[spec.members[0]];
                let invite: Vec<String> = if spec.direct {
                    spec.members[1..].iter().map(|&m| users[m].user_id.clone()).collect()
                } else {
                    vec![]
                };
                let name = format!("{prefix}room{r}");
                retrying(&format!("createRoom {name}"), || api.create_room(&creator.access_token, &name, &invite)).await
            }
        })
        .await?
    };
    timings.push(("create_rooms".to_string(), t.elapsed().as_secs_f64()));
    if !room_ids.is_empty() {
        eprintln!("created {} rooms in {:.1} s", room_ids.len(), t.elapsed().as_secs_f64());
    }

    let t = Instant::now();
    let joins: Vec<(usize, usize)> =
        plan.rooms.iter().enumerate().flat_map(|(r, spec)| spec.members[1..].iter().map(move |&m| (r, m))).collect();
    {
        let (api, users, room_ids, joins) = (api.clone(), users.clone(), Arc::new(room_ids.clone()), Arc::new(joins));
        run_all("join", joins.len(), concurrency, move |j| {
            let (api, users, room_ids, joins) = (api.clone(), users.clone(), room_ids.clone(), joins.clone());
            async move {
                let (r, m) = joins[j];
                let what = format!("join {} {}", users[m].user_id, room_ids[r]);
                retrying(&what, || api.join(&users[m].access_token, &room_ids[r])).await
            }
        })
        .await?;
    }
    timings.push(("join".to_string(), t.elapsed().as_secs_f64()));
    if !plan.rooms.is_empty() {
        eprintln!("joined in {:.1} s", t.elapsed().as_secs_f64());
    }

    let t = Instant::now();
    let since = {
        let (api, users, filter) = (api.clone(), users.clone(), initial_filter.to_string());
        run_all("initial sync", users.len(), concurrency, move |u| {
            let (api, users, filter) = (api.clone(), users.clone(), filter.clone());
            async move {
                let what = format!("initial sync of {}", users[u].user_id);
                let (resp, _) = retrying(&what, || api.sync(&users[u].access_token, &filter, None, 0)).await?;
                Ok(resp.next_batch)
            }
        })
        .await?
    };
    timings.push(("initial_sync".to_string(), t.elapsed().as_secs_f64()));
    eprintln!("initial syncs in {:.1} s", t.elapsed().as_secs_f64());

    let rooms = plan
        .rooms
        .iter()
        .zip(room_ids)
        .map(|(spec, room_id)| Room { room_id, members: spec.members.clone() })
        .collect();
    let users = Arc::try_unwrap(users).unwrap_or_else(|a| (*a).clone());
    Ok(World { users, rooms, since, timings })
}

/// Uploads `filter` for every user; returns each user's filter ID.
pub async fn upload_filters(
    api: Arc<Api>,
    users: &[Account],
    filter: &Value,
    concurrency: usize,
) -> Result<Vec<String>, String> {
    let (users, filter) = (Arc::new(users.to_vec()), Arc::new(filter.clone()));
    run_all("upload filter", users.len(), concurrency, move |u| {
        let (api, users, filter) = (api.clone(), users.clone(), filter.clone());
        async move {
            let user = &users[u];
            let what = format!("upload filter for {}", user.user_id);
            retrying(&what, || api.upload_filter(&user.access_token, &user.user_id, &filter)).await
        }
    })
    .await
}
