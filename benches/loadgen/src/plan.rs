//! Scenarios and the shape of the world each one builds.

use clap::ValueEnum;
use serde::Serialize;

/// Hard cap on accounts per run.
pub const MAX_USERS: usize = 20_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    /// Direct chats between pairs of users; both members send (open loop).
    Dm,
    /// Several public rooms; every member sends in turn (open loop).
    Rooms,
    /// One room; `--senders` members each send as fast as the server answers (closed loop).
    Closed,
    /// Users only long-poll /sync; measures server memory per syncing user.
    Idle,
    /// One very large room at a low message rate (open loop).
    Bigroom,
    /// Users only hold one subscribed WebSocket each; measures server memory per open socket.
    Sockets,
}

impl Scenario {
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Dm => "dm",
            Scenario::Rooms => "rooms",
            Scenario::Closed => "closed",
            Scenario::Idle => "idle",
            Scenario::Bigroom => "bigroom",
            Scenario::Sockets => "sockets",
        }
    }
}

/// A room to create: `members[0]` creates it, the rest join.
#[derive(Debug, Clone)]
pub struct RoomSpec {
    pub members: Vec<usize>,
    /// a direct chat (trusted_private_chat + invite + is_direct) rather than a public room
    pub direct: bool,
}

#[derive(Debug, Clone)]
pub struct Plan {
    pub scenario: Scenario,
    pub users: usize,
    pub rooms: Vec<RoomSpec>,
    /// open-loop messages per second over all senders
    pub rate: Option<f64>,
    /// closed-loop senders
    pub senders: usize,
    /// room size as asked for (rooms/closed/bigroom) or 2 (dm)
    pub room_size: usize,
}

/// What the command line asked for; `None` takes the scenario's default.
#[derive(Debug, Clone, Default)]
pub struct Ask {
    pub users: Option<usize>,
    pub rooms: Option<usize>,
    pub room_size: Option<usize>,
    pub rate: Option<f64>,
    pub senders: Option<usize>,
}

fn check_users(n: usize) -> Result<usize, String> {
    if n == 0 || n > MAX_USERS {
        return Err(format!("the run needs {n} users; allowed: 1..={MAX_USERS}"));
    }
    Ok(n)
}

fn check_rate(rate: f64) -> Result<f64, String> {
    if !(rate.is_finite() && rate > 0.0 && rate <= 100_000.0) {
        return Err(format!("--rate {rate}: must be > 0 and <= 100000 messages per second"));
    }
    Ok(rate)
}

impl Plan {
    pub fn new(scenario: Scenario, ask: &Ask) -> Result<Plan, String> {
        let reject = |flag: &str| -> Result<(), String> {
            Err(format!("{flag} does not apply to scenario {}", scenario.name()))
        };
        match scenario {
            Scenario::Dm => {
                if ask.room_size.is_some_and(|s| s != 2) {
                    reject("--room-size")?;
                }
                if ask.senders.is_some() {
                    reject("--senders")?;
                }
                let users = match (ask.users, ask.rooms) {
                    (Some(u), Some(r)) if u != 2 * r => {
                        return Err(format!("dm: --users {u} must be twice --rooms {r} (one DM per pair)"));
                    }
                    (Some(u), _) => u,
                    (None, Some(r)) => 2 * r,
                    (None, None) => 100,
                };
                if users < 2 || users % 2 != 0 {
                    return Err(format!("dm: --users {users} must be even and at least 2"));
                }
                let users = check_users(users)?;
                let rooms =
                    (0..users / 2).map(|i| RoomSpec { members: vec![2 * i, 2 * i + 1], direct: true }).collect();
                Ok(Plan {
                    scenario,
                    users,
                    rooms,
                    rate: Some(check_rate(ask.rate.unwrap_or(20.0))?),
                    senders: 0,
                    room_size: 2,
                })
            }
            Scenario::Rooms => {
                if ask.senders.is_some() {
                    reject("--senders")?;
                }
                let n_rooms = ask.rooms.unwrap_or(10);
                let size = ask.room_size.unwrap_or(20);
                if n_rooms == 0 || size < 2 {
                    return Err("rooms: needs --rooms >= 1 and --room-size >= 2".into());
                }
                let users = check_users(ask.users.unwrap_or(n_rooms.saturating_mul(size)))?;
                if users < size {
                    return Err(format!("rooms: --users {users} is smaller than --room-size {size}"));
                }
                // Room r takes `size` consecutive users, wrapping around: with fewer users than
                // rooms × size, users are shared between rooms, never repeated within one.
                let rooms = (0..n_rooms)
                    .map(|r| RoomSpec { members: (0..size).map(|j| (r * size + j) % users).collect(), direct: false })
                    .collect();
                Ok(Plan {
                    scenario,
                    users,
                    rooms,
                    rate: Some(check_rate(ask.rate.unwrap_or(50.0))?),
                    senders: 0,
                    room_size: size,
                })
            }
            Scenario::Closed | Scenario::Bigroom => {
                if ask.users.is_some() {
                    reject("--users (use --room-size)")?;
                }
                if ask.rooms.is_some_and(|r| r != 1) {
                    reject("--rooms")?;
                }
                let closed = scenario == Scenario::Closed;
                let size = ask.room_size.unwrap_or(if closed { 10 } else { 2000 });
                if size < 2 {
                    return Err("--room-size must be at least 2".into());
                }
                let users = check_users(size)?;
                let rooms = vec![RoomSpec { members: (0..size).collect(), direct: false }];
                if closed {
                    if ask.rate.is_some() {
                        reject("--rate (closed loop; use --senders)")?;
                    }
                    let senders = ask.senders.unwrap_or(8);
                    if senders == 0 || senders > size {
                        return Err(format!("closed: --senders {senders} must be in 1..=--room-size {size}"));
                    }
                    Ok(Plan { scenario, users, rooms, rate: None, senders, room_size: size })
                } else {
                    if ask.senders.is_some() {
                        reject("--senders")?;
                    }
                    let rate = Some(check_rate(ask.rate.unwrap_or(2.0))?);
                    Ok(Plan { scenario, users, rooms, rate, senders: 0, room_size: size })
                }
            }
            Scenario::Idle | Scenario::Sockets => {
                for (flag, set) in [
                    ("--rooms", ask.rooms.is_some()),
                    ("--room-size", ask.room_size.is_some()),
                    ("--rate", ask.rate.is_some()),
                    ("--senders", ask.senders.is_some()),
                ] {
                    if set {
                        reject(flag)?;
                    }
                }
                let default_users = if scenario == Scenario::Idle { 1000 } else { 10_000 };
                let users = check_users(ask.users.unwrap_or(default_users))?;
                Ok(Plan { scenario, users, rooms: vec![], rate: None, senders: 0, room_size: 0 })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults() {
        let p = Plan::new(Scenario::Dm, &Ask::default()).unwrap();
        assert_eq!((p.users, p.rooms.len(), p.rate), (100, 50, Some(20.0)));
        assert!(p.rooms.iter().all(|r| r.direct && r.members.len() == 2));
        let p = Plan::new(Scenario::Rooms, &Ask::default()).unwrap();
        assert_eq!((p.users, p.rooms.len(), p.rooms[9].members.len(), p.rate), (200, 10, 20, Some(50.0)));
        let p = Plan::new(Scenario::Closed, &Ask::default()).unwrap();
        assert_eq!((p.users, p.senders, p.rate), (10, 8, None));
        let p = Plan::new(Scenario::Idle, &Ask::default()).unwrap();
        assert_eq!((p.users, p.rooms.len()), (1000, 0));
        let p = Plan::new(Scenario::Sockets, &Ask::default()).unwrap();
        assert_eq!((p.users, p.rooms.len(), p.rate), (10_000, 0, None));
        let p = Plan::new(Scenario::Bigroom, &Ask::default()).unwrap();
        assert_eq!((p.users, p.rooms[0].members.len(), p.rate), (2000, 2000, Some(2.0)));
    }

    #[test]
    fn shared_users_never_repeat_within_a_room() {
        let ask = Ask { users: Some(25), rooms: Some(4), room_size: Some(10), ..Ask::default() };
        let p = Plan::new(Scenario::Rooms, &ask).unwrap();
        for r in &p.rooms {
            let mut m = r.members.clone();
            m.sort_unstable();
            m.dedup();
            assert_eq!(m.len(), 10);
            assert!(m.iter().all(|&u| u < 25));
        }
    }

    #[test]
    fn bounds() {
        assert!(Plan::new(Scenario::Idle, &Ask { users: Some(20_001), ..Ask::default() }).is_err());
        assert!(Plan::new(Scenario::Dm, &Ask { users: Some(3), ..Ask::default() }).is_err());
        assert!(Plan::new(Scenario::Closed, &Ask { senders: Some(11), ..Ask::default() }).is_err());
        assert!(Plan::new(Scenario::Rooms, &Ask { rate: Some(0.0), ..Ask::default() }).is_err());
        assert!(Plan::new(Scenario::Idle, &Ask { rate: Some(1.0), ..Ask::default() }).is_err());
        assert!(Plan::new(Scenario::Sockets, &Ask { rooms: Some(1), ..Ask::default() }).is_err());
    }
}
