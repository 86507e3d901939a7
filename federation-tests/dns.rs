//! A small authoritative DNS server on loopback that the tests fill with records, so discovery
//! (A/AAAA, SRV) runs for real without ever asking the machine's resolver. UDP only: the answers
//! are small, and hickory falls back to TCP only for truncated ones.
//!
//! Written with hickory-proto's message types rather than hickory-server: a zone store, catalog
//! and authority set-up would be more code than this one loop over a map.

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddr},
    sync::{Arc, Mutex},
};

use hickory_proto::{
    op::{Message, MessageType, OpCode, ResponseCode},
    rr::{
        Name, RData, Record, RecordType,
        rdata::{A, SRV},
    },
};
use tokio::net::UdpSocket;

type Zone = HashMap<String, Vec<Record>>;

pub struct DnsServer {
    pub addr: SocketAddr,
    zone: Arc<Mutex<Zone>>,
    task: tokio::task::JoinHandle<()>,
}

fn key(name: &str) -> String {
    let name = name.to_ascii_lowercase();
    if name.ends_with('.') { name } else { format!("{name}.") }
}

impl DnsServer {
    pub async fn start() -> DnsServer {
        let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind the test DNS server");
        let addr = socket.local_addr().unwrap();
        let zone: Arc<Mutex<Zone>> = Arc::default();
        let served = zone.clone();
        let task = tokio::spawn(async move {
            let mut buffer = vec![0u8; 4096];
            loop {
                let Ok((len, peer)) = socket.recv_from(&mut buffer).await else { return };
                let Ok(query) = Message::from_vec(&buffer[..len]) else { continue };
                let response = answer(&served.lock().unwrap(), &query);
                if let Ok(bytes) = response.to_vec() {
                    let _ = socket.send_to(&bytes, peer).await;
                }
            }
        });
        DnsServer { addr, zone, task }
    }

    fn add(&self, name: &str, data: RData) {
        let record = Record::from_rdata(Name::from_ascii(key(name)).unwrap(), 60, data);
        self.zone.lock().unwrap().entry(key(name)).or_default().push(record);
    }

    pub fn a(&self, name: &str, ip: Ipv4Addr) {
        self.add(name, RData::A(A(ip)));
    }

    /// `name` (e.g. `_matrix-fed._tcp.example.org`) → `target:port`.
    pub fn srv(&self, name: &str, target: &str, port: u16) {
        self.add(name, RData::SRV(SRV::new(10, 5, port, Name::from_ascii(key(target)).unwrap())));
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn answer(zone: &Zone, query: &Message) -> Message {
    let mut response = Message::new(query.metadata.id, MessageType::Response, OpCode::Query);
    response.metadata.authoritative = true;
    response.metadata.recursion_desired = query.metadata.recursion_desired;
    response.metadata.recursion_available = true;
    for question in &query.queries {
        response.add_query(question.clone());
        match zone.get(&key(&question.name().to_ascii())) {
            // A name we know, perhaps without records of this type: NOERROR, no answers.
            Some(records) => {
                let wanted = question.query_type();
                response.add_answers(
                    records
                        .iter()
                        .filter(|record| record.record_type() == wanted || wanted == RecordType::ANY)
                        .cloned(),
                );
            }
            None => response.metadata.response_code = ResponseCode::NXDomain,
        }
    }
    response
}
