//! A network partition: c.test is cut off from a.test and b.test by TCP proxies the test
//! controls (every connection to or from C passes one), while people on both sides go on
//! chatting and changing state. When the proxies let traffic through again, the three servers
//! converge: the same events, the same state, and the next message of each side merges the
//! branches.
//!
//! C resolves the other servers through a DNS server of its own that points at the proxies in
//! front of them; A and B find C through the shared DNS server, which points at C's proxy.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use serde_json::json;
use tokio::net::{TcpListener, TcpStream};

use crate::{
    dns::DnsServer,
    gaps::history,
    harness::{Account, Backend, TestServer, enc},
    hostile::state_ids,
    membership::wait_for_message,
    testnet::{Discovered, Peer, TestNet, free_address, ip4},
};

crate::backend_tests!(a_partitioned_server_converges_with_the_others_once_healed);

/// A TCP proxy to `target` that can be cut (open connections dropped, new ones refused) and healed.
struct Proxy {
    addr: SocketAddr,
    cut: Arc<AtomicBool>,
    connections: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    async fn start(listen: SocketAddr, target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind(listen).await.unwrap();
        let cut = Arc::new(AtomicBool::new(false));
        let connections: Arc<Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let task = {
            let (cut, connections) = (cut.clone(), connections.clone());
            tokio::spawn(async move {
                loop {
                    let Ok((mut inbound, _)) = listener.accept().await else { return };
                    if cut.load(Ordering::SeqCst) {
                        continue;
                    }
                    let relay = tokio::spawn(async move {
                        if let Ok(mut outbound) = TcpStream::connect(target).await {
                            let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }
                    });
                    let mut open = connections.lock().unwrap();
                    open.retain(|handle| !handle.is_finished());
                    open.push(relay.abort_handle());
                }
            })
        };
        Proxy { addr: listen, cut, connections, task }
    }

    fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for handle in self.connections.lock().unwrap().drain(..) {
            handle.abort();
        }
    }

    fn heal(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
        self.task.abort();
    }
}

/// Starts a Hearth named `name` found by port 8448, behind a proxy: the shared DNS points its
/// name at the proxy, and its own DNS server is `dns`. Returns the peer and its proxy.
async fn behind_proxy(net: &TestNet, backend: Backend, name: &str, dns: &DnsServer) -> (Peer, Proxy) {
    let real = free_address(8448).expect("a free address for port 8448");
    let front = free_address(8448).expect("a free address for port 8448");
    let certificate = net.certificate(name, &[name]);
    let config = net
        .config(name, &[real], &certificate, "")
        .replace(&format!("dns_servers = [\"{}\"]", net.dns.addr), &format!("dns_servers = [\"{}\"]", dns.addr));
    net.dns.a(name, ip4(front));
    let proxy = Proxy::start(front, real).await;
    let server = TestServer::start_with(backend, &config).await;
    (Peer { server, name: name.to_owned(), federation: vec![front] }, proxy)
}

/// The IDs of every event in a room's history on a server (messages, state, memberships), sorted.
async fn event_set(server: &TestServer, account: &Account, room: &str) -> Vec<String> {
    let (status, body) = server
        .get(&format!("/_matrix/client/v3/rooms/{}/messages?dir=b&limit=1000", enc(room)), Some(&account.access_token))
        .await;
    assert_eq!(status, 200, "{body}");
    let mut ids: Vec<String> =
        body["chunk"].as_array().unwrap().iter().map(|e| e["event_id"].as_str().unwrap().to_owned()).collect();
    ids.sort();
    ids
}

async fn a_partitioned_server_converges_with_the_others_once_healed(backend: Backend) {
    let net = TestNet::new().await;
    let a = net.peer(backend, "a.test", Discovered::Port8448, "").await.expect("port 8448 free");
    let b = net.peer(backend, "b.test", Discovered::Port8448, "").await.expect("port 8448 free");
    // C's view of the network: A and B behind proxies of their own.
    let c_dns = DnsServer::start().await;
    let to_a = Proxy::start(free_address(8448).unwrap(), a.federation[0]).await;
    let to_b = Proxy::start(free_address(8448).unwrap(), b.federation[0]).await;
    c_dns.a("a.test", ip4(to_a.addr));
    c_dns.a("b.test", ip4(to_b.addr));
    let (c, to_c) = behind_proxy(&net, backend, "c.test", &c_dns).await;

    let alice = a.server.register("alice").await;
    let bob = b.server.register("bob").await;
    let carol = c.server.register("carol").await;
    let room = a.server.create_room(&alice, json!({"preset": "public_chat"})).await;
    for (peer, account) in [(&b, &bob), (&c, &carol)] {
        let join = format!("/_matrix/client/v3/join/{}?via=a.test", enc(&room));
        let (status, body) = peer.server.post(&join, Some(&account.access_token), json!({})).await;
        assert_eq!(status, 200, "{} joins: {body}", peer.name);
    }
    a.server.send_text(&alice, &room, "all together").await;
    wait_for_message(&c.server, &carol, &room, "all together").await;
    wait_for_message(&b.server, &bob, &room, "all together").await;

    // The partition: C can reach nobody and nobody can reach C.
    for proxy in [&to_a, &to_b, &to_c] {
        proxy.cut();
    }
    for i in 0..10 {
        let text = format!("a and b, {i}");
        let (server, account, other, reader) = if i % 2 == 0 { (&a, &alice, &b, &bob) } else { (&b, &bob, &a, &alice) };
        server.server.send_text(account, &room, &text).await;
        wait_for_message(&other.server, reader, &room, &text).await;
        c.server.send_text(&carol, &room, &format!("carol alone, {i}")).await;
    }
    let (status, body) = a.server.set_state(&alice, &room, "m.room.name", "", json!({"name": "from A"})).await;
    assert_eq!(status, 200, "{body}");
    // State changes on both sides: the room's name on A, Carol's display name on C.
    let (status, body) = c
        .server
        .set_state(
            &carol,
            &room,
            "m.room.member",
            &carol.user_id,
            json!({"membership": "join", "displayname": "Carol (cut off)"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");

    // Healed: the queues on both sides get through, and the servers agree.
    for proxy in [&to_a, &to_b, &to_c] {
        proxy.heal();
    }
    // Each side's queue backs off while the other is unreachable (doubling from 1 s), so the
    // wait after healing can be about as long as the partition lasted.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(240);
    loop {
        let sets = [
            event_set(&a.server, &alice, &room).await,
            event_set(&b.server, &bob, &room).await,
            event_set(&c.server, &carol, &room).await,
        ];
        let states =
            [state_ids(&a, &alice, &room).await, state_ids(&b, &bob, &room).await, state_ids(&c, &carol, &room).await];
        if sets[0] == sets[1] && sets[0] == sets[2] && states[0] == states[1] && states[0] == states[2] {
            break;
        }
        if std::time::Instant::now() > deadline {
            let only =
                |x: &Vec<String>, y: &Vec<String>| x.iter().filter(|e| !y.contains(e)).cloned().collect::<Vec<_>>();
            panic!(
                "the servers did not converge:\nevents A {} B {} C {}; on A not C {:?}; on C not A {:?}; on A not B {:?}\nstate A {:?}\nstate B {:?}\nstate C {:?}",
                sets[0].len(),
                sets[1].len(),
                sets[2].len(),
                only(&sets[0], &sets[2]),
                only(&sets[2], &sets[0]),
                only(&sets[0], &sets[1]),
                states[0],
                states[1],
                states[2]
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    // Each side's messages are in the order they were sent, on every server. (Between the two
    // branches there is no order to agree on: they were concurrent.)
    let chain = |history: &[String], prefix: &str| -> Vec<String> {
        history.iter().filter(|text| text.starts_with(prefix)).cloned().collect()
    };
    let a_and_b: Vec<String> = (0..10).map(|i| format!("a and b, {i}")).collect();
    let carol_alone: Vec<String> = (0..10).map(|i| format!("carol alone, {i}")).collect();
    for (server, account) in [(&a, &alice), (&b, &bob), (&c, &carol)] {
        let everything = history(&server.server, account, &room).await;
        assert_eq!(chain(&everything, "a and b, "), a_and_b, "on {}", server.name);
        assert_eq!(chain(&everything, "carol alone, "), carol_alone, "on {}", server.name);
    }
    // One more message from each side merges the branches everywhere.
    c.server.send_text(&carol, &room, "merged from c").await;
    wait_for_message(&a.server, &alice, &room, "merged from c").await;
    wait_for_message(&b.server, &bob, &room, "merged from c").await;
    a.server.send_text(&alice, &room, "merged from a").await;
    wait_for_message(&c.server, &carol, &room, "merged from a").await;
    assert_eq!(state_ids(&a, &alice, &room).await, state_ids(&c, &carol, &room).await);
}
