//! Other servers' signing keys: fetched from the server itself (`GET /_matrix/key/v2/server`) or
//! through the configured notaries (`federation.trusted_key_servers`, asked first), each document
//! verified against its own signature (and the notary's) before it is stored, cached in the
//! database for its validity window. Also answers notary queries about other servers.
//!
//! [`Keys::public_key_map`] is what signature checks use: it returns the keys it has and fetches
//! what is missing or no longer valid, holding no lock while it does.

use std::{
    collections::{BTreeMap, BTreeSet},
    num::NonZeroUsize,
    sync::Arc,
    time::{Duration, Instant},
};

use lru::LruCache;
use parking_lot::Mutex;
use ruma::{
    CanonicalJsonObject, CanonicalJsonValue, MilliSecondsSinceUnixEpoch, OwnedServerName, OwnedServerSigningKeyId,
    ServerName, UInt,
    api::federation::discovery::{ServerSigningKeys, get_remote_server_keys_batch::v2::QueryCriteria, get_server_keys},
    room_version_rules::SignaturesRules,
    serde::{Base64, Raw},
    signatures::{PublicKeyMap, PublicKeySet, required_server_signatures_to_verify_event},
};

use crate::{
    federation::{FederationError, client::FederationClient},
    matrix::keys::{VerifiedServerKeys, verify_server_keys, verify_signed_by},
    service::{now_ms, server_keys::ServerKeys},
    storage::{
        Db,
        server_keys::{NewKeyDocument, ServerKeyRow},
    },
};

/// After a failed fetch, a server's keys are not asked for again for this long (a flood of
/// requests claiming to come from an unreachable server must not become a flood of our own).
const FETCH_FAILURE_BACKOFF: Duration = Duration::from_secs(60);
/// After a successful fetch, the same server is asked again this soon only for a key ID we do not
/// have (a notary query wanting validity further out than any document gives cannot make us
/// fetch on every request).
const REFRESH_MIN_INTERVAL: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy)]
struct Attempt {
    at: Instant,
    succeeded: bool,
}
/// Servers one notary request may ask about.
pub const MAX_NOTARY_SERVERS: usize = 100;

pub struct Keys {
    db: Db,
    client: Arc<FederationClient>,
    own: Arc<ServerKeys>,
    trusted_key_servers: Vec<OwnedServerName>,
    attempts: Mutex<LruCache<OwnedServerName, Attempt>>,
}

/// One server asked about in a notary query.
pub struct NotaryRequest {
    pub server: OwnedServerName,
    /// Key IDs wanted; empty means any.
    pub key_ids: BTreeSet<String>,
    /// When the keys must still be valid (ms); default now.
    pub minimum_valid_until_ts: Option<i64>,
}

/// Key IDs wanted of one server; empty means "any current key".
pub type WantedKeys = BTreeMap<OwnedServerName, BTreeSet<String>>;

fn is_usable(row: &ServerKeyRow, valid_at: i64) -> bool {
    row.valid_until_ts >= valid_at
}

fn satisfies(rows: &[ServerKeyRow], wanted: &BTreeSet<String>, valid_at: i64) -> bool {
    if wanted.is_empty() {
        rows.iter().any(|row| row.expired_ts.is_none() && is_usable(row, valid_at))
    } else {
        wanted.iter().all(|id| rows.iter().any(|row| &row.key_id == id && is_usable(row, valid_at)))
    }
}

fn key_set(rows: &[ServerKeyRow], valid_at: i64) -> PublicKeySet {
    rows.iter()
        .filter(|row| is_usable(row, valid_at))
        .filter_map(|row| Some((row.key_id.clone(), Base64::parse(&row.public_key).ok()?)))
        .collect()
}

fn rows_of(verified: &VerifiedServerKeys) -> Vec<ServerKeyRow> {
    let current = verified.verify_keys.iter().map(|(key_id, public_key)| ServerKeyRow {
        key_id: key_id.clone(),
        public_key: public_key.clone(),
        valid_until_ts: verified.valid_until_ts,
        expired_ts: None,
    });
    let old = verified.old_verify_keys.iter().map(|old| ServerKeyRow {
        key_id: old.key_id.clone(),
        public_key: old.public_key.clone(),
        valid_until_ts: old.expired_ts,
        expired_ts: Some(old.expired_ts),
    });
    current.chain(old).collect()
}

fn to_object(raw: &Raw<ServerSigningKeys>) -> Result<CanonicalJsonObject, String> {
    serde_json::from_str(raw.json().get()).map_err(|err| format!("not a JSON object: {err}"))
}

/// The keys needed to check an event's signatures (Server-Server API, "Validating hashes and
/// signatures on received events"): the key IDs each required server signed it with, and the
/// time they must be valid at (its `origin_server_ts`).
pub fn wanted_for_event(pdu: &CanonicalJsonObject, rules: &SignaturesRules) -> Result<(WantedKeys, i64), String> {
    let servers = required_server_signatures_to_verify_event(pdu, rules).map_err(|err| err.to_string())?;
    let signatures = match pdu.get("signatures") {
        Some(CanonicalJsonValue::Object(signatures)) => signatures,
        _ => return Err("the event is not signed".to_owned()),
    };
    let mut wanted = WantedKeys::new();
    for server in servers {
        let key_ids = match signatures.get(server.as_str()) {
            Some(CanonicalJsonValue::Object(keys)) => keys.keys().cloned().collect(),
            _ => return Err(format!("the event carries no signature of {server}")),
        };
        wanted.insert(server, key_ids);
    }
    let origin_server_ts = match pdu.get("origin_server_ts") {
        Some(CanonicalJsonValue::Integer(ts)) => i64::from(*ts),
        _ => return Err("the event has no origin_server_ts".to_owned()),
    };
    Ok((wanted, origin_server_ts))
}

impl Keys {
    /// The public keys that verify `pdu`'s signatures, fetched when missing: hand the map to
    /// ruma's `verify_event`. A server whose keys cannot be had is absent, so verification fails.
    pub async fn public_key_map_for_event(
        &self,
        pdu: &CanonicalJsonObject,
        rules: &SignaturesRules,
    ) -> Result<PublicKeyMap, String> {
        let (wanted, valid_at) = wanted_for_event(pdu, rules)?;
        Ok(self.public_key_map(&wanted, valid_at).await)
    }

    pub fn new(
        db: Db,
        client: Arc<FederationClient>,
        own: Arc<ServerKeys>,
        trusted_key_servers: Vec<OwnedServerName>,
    ) -> Keys {
        Keys {
            db,
            client,
            own,
            trusted_key_servers,
            attempts: Mutex::new(LruCache::new(NonZeroUsize::new(10_000).expect("non-zero"))),
        }
    }

    /// Our own keys, current and old, as a key set.
    fn own_key_set(&self) -> PublicKeySet {
        let key = self.own.key();
        let mut set = PublicKeySet::new();
        if let Ok(public) = Base64::parse(key.public_key_base64()) {
            set.insert(key.key_id(), public);
        }
        for old in self.own.old_keys() {
            if let Ok(public) = Base64::parse(&old.public_key) {
                set.insert(old.key_id.clone(), public);
            }
        }
        set
    }

    /// The public keys of the wanted servers that are valid at `valid_at` (ms), fetching those
    /// missing or expired first. Servers whose keys cannot be had are left out (so a signature
    /// check against the map fails for them).
    pub async fn public_key_map(&self, wanted: &WantedKeys, valid_at: i64) -> PublicKeyMap {
        let lookups = wanted.iter().map(|(server, key_ids)| async move {
            match self.key_set_of(server, key_ids, valid_at).await {
                Ok(set) => Some((server.to_string(), set)),
                Err(err) => {
                    tracing::info!(%server, %err, "cannot get the server's signing keys");
                    None
                }
            }
        });
        futures_util::future::join_all(lookups).await.into_iter().flatten().collect()
    }

    async fn key_set_of(
        &self,
        server: &ServerName,
        key_ids: &BTreeSet<String>,
        valid_at: i64,
    ) -> Result<PublicKeySet, FederationError> {
        if server == self.own.server_name() {
            return Ok(self.own_key_set());
        }
        let rows = self.db.server_keys(server).await?;
        if satisfies(&rows, key_ids, valid_at) {
            return Ok(key_set(&rows, valid_at));
        }
        let has_every_key_id = !rows.is_empty() && key_ids.iter().all(|id| rows.iter().any(|row| &row.key_id == id));
        let last = self.attempts.lock().get(server).copied();
        if let Some(last) = last {
            let is_quiet = if last.succeeded {
                has_every_key_id && last.at.elapsed() < REFRESH_MIN_INTERVAL
            } else {
                last.at.elapsed() < FETCH_FAILURE_BACKOFF
            };
            if is_quiet {
                return Ok(key_set(&rows, valid_at));
            }
        }
        let fetched = self.fetch(server, key_ids, valid_at).await;
        self.attempts.lock().put(server.to_owned(), Attempt { at: Instant::now(), succeeded: fetched.is_ok() });
        match fetched {
            Ok(()) => {}
            Err(err) => {
                if rows.is_empty() {
                    return Err(err);
                }
                tracing::info!(%server, %err, "could not refresh the server's keys; using those stored");
            }
        }
        let rows = self.db.server_keys(server).await?;
        Ok(key_set(&rows, valid_at))
    }

    /// Fetches `server`'s keys: from the trusted notaries first, then from the server itself when
    /// they did not have what is wanted. Every document found is stored.
    async fn fetch(
        &self,
        server: &ServerName,
        key_ids: &BTreeSet<String>,
        valid_at: i64,
    ) -> Result<(), FederationError> {
        let now = now_ms();
        let mut last_error = None;
        for notary in &self.trusted_key_servers {
            if notary == server || notary == self.own.server_name() {
                continue;
            }
            match self.fetch_from_notary(notary, server, key_ids, valid_at, now).await {
                Ok(documents) => {
                    let mut rows = Vec::new();
                    for verified in &documents {
                        self.store(verified, now).await?;
                        rows.extend(rows_of(verified));
                    }
                    if satisfies(&rows, key_ids, valid_at) {
                        return Ok(());
                    }
                }
                Err(err) => {
                    tracing::info!(%notary, %server, %err, "the notary did not give the server's keys");
                    last_error = Some(err);
                }
            }
        }
        match self.fetch_direct(server, now).await {
            Ok(verified) => self.store(&verified, now).await,
            Err(err) => Err(match last_error {
                Some(notary_err) => FederationError::Unreachable(format!("{notary_err}; and directly: {err}")),
                None => err,
            }),
        }
    }

    async fn store(&self, verified: &VerifiedServerKeys, now: i64) -> Result<(), FederationError> {
        let json =
            serde_json::to_string(&verified.document).map_err(|err| FederationError::BadResponse(err.to_string()))?;
        let rows = rows_of(verified);
        self.db
            .store_server_keys(
                &NewKeyDocument {
                    server_name: &verified.server_name,
                    json: &json,
                    valid_until_ts: verified.valid_until_ts,
                    keys: &rows,
                },
                now,
            )
            .await?;
        Ok(())
    }

    /// `GET /_matrix/key/v2/server` on the server itself.
    async fn fetch_direct(&self, server: &ServerName, now: i64) -> Result<VerifiedServerKeys, FederationError> {
        let response = self.client.send(server, get_server_keys::v2::Request::new()).await?;
        let document = to_object(&response.server_key).map_err(FederationError::BadResponse)?;
        verify_server_keys(document, server, now)
            .map_err(|err| FederationError::BadResponse(format!("key document of {server}: {err}")))
    }

    /// The notary's own keys, stored or fetched from it directly (never through another notary).
    async fn notary_keys(&self, notary: &ServerName, now: i64) -> Result<PublicKeySet, FederationError> {
        let rows = self.db.server_keys(notary).await?;
        if satisfies(&rows, &BTreeSet::new(), now) {
            return Ok(key_set(&rows, now));
        }
        let verified = self.fetch_direct(notary, now).await?;
        self.store(&verified, now).await?;
        Ok(key_set(&rows_of(&verified), now))
    }

    /// `POST /_matrix/key/v2/query` to a notary, keeping only documents of `server` that carry
    /// both its own valid signature and the notary's.
    async fn fetch_from_notary(
        &self,
        notary: &ServerName,
        server: &ServerName,
        key_ids: &BTreeSet<String>,
        valid_at: i64,
        now: i64,
    ) -> Result<Vec<VerifiedServerKeys>, FederationError> {
        use ruma::api::federation::discovery::get_remote_server_keys_batch::v2::Request;
        let mut criteria = QueryCriteria::new();
        criteria.minimum_valid_until_ts =
            Some(MilliSecondsSinceUnixEpoch(UInt::try_from(valid_at.max(0)).unwrap_or(UInt::MAX)));
        let wanted: BTreeMap<OwnedServerSigningKeyId, QueryCriteria> = key_ids
            .iter()
            .filter_map(|id| Some((OwnedServerSigningKeyId::try_from(id.as_str()).ok()?, criteria.clone())))
            .collect();
        let request = Request::new(BTreeMap::from([(server.to_owned(), wanted)]));
        let response = self.client.send(notary, request).await?;
        let notary_keys = self.notary_keys(notary, now).await?;
        let mut documents = Vec::new();
        for raw in &response.server_keys {
            let checked = to_object(raw).and_then(|document| {
                verify_signed_by(&document, notary.as_str(), notary_keys.clone())?;
                verify_server_keys(document, server, now)
            });
            match checked {
                Ok(verified) => documents.push(verified),
                Err(err) => tracing::info!(%notary, %server, %err, "ignoring a key document from a notary"),
            }
        }
        Ok(documents)
    }

    /// Answers a notary query (`POST /_matrix/key/v2/query`, `GET /_matrix/key/v2/query/{server}`):
    /// each server's latest key document we have (fetched first when none is valid at the
    /// requested time, default now), signed by us as well. Servers we know nothing of are left out.
    pub async fn notary_query(&self, servers: Vec<NotaryRequest>) -> Vec<Raw<ServerSigningKeys>> {
        let now = now_ms();
        let answers = servers.into_iter().take(MAX_NOTARY_SERVERS).map(|wanted| async move {
            let minimum = wanted.minimum_valid_until_ts.unwrap_or(now);
            match self.document_for_notary(&wanted.server, wanted.key_ids, minimum, now).await {
                Ok(document) => document,
                Err(err) => {
                    tracing::info!(server = %wanted.server, %err, "notary query: no keys");
                    None
                }
            }
        });
        futures_util::future::join_all(answers).await.into_iter().flatten().collect()
    }

    async fn document_for_notary(
        &self,
        server: &ServerName,
        key_ids: BTreeSet<String>,
        minimum: i64,
        now: i64,
    ) -> Result<Option<Raw<ServerSigningKeys>>, FederationError> {
        let mut document: CanonicalJsonObject = if server == self.own.server_name() {
            self.own.document(now)
        } else {
            let mut stored = self.db.server_key_document(server).await?;
            if stored.as_ref().is_none_or(|(_, valid_until)| *valid_until < minimum) {
                // Fetched keys are stored, so the document is read again below.
                let _ = self.key_set_of(server, &key_ids, minimum).await;
                stored = self.db.server_key_document(server).await?;
            }
            let Some((json, _)) = stored else { return Ok(None) };
            serde_json::from_str(&json).map_err(|err| FederationError::BadResponse(err.to_string()))?
        };
        if server != self.own.server_name() {
            ruma::signatures::sign_json(self.own.server_name().as_str(), self.own.key().key_pair(), &mut document)
                .map_err(|err| FederationError::BadResponse(format!("cannot sign: {err}")))?;
        }
        let json =
            serde_json::value::to_raw_value(&document).map_err(|err| FederationError::BadResponse(err.to_string()))?;
        Ok(Some(Raw::from_json(json)))
    }
}

#[cfg(test)]
mod tests {
    use ruma::room_version_rules::RoomVersionRules;
    use serde_json::json;

    use super::*;

    fn pdu(value: serde_json::Value) -> CanonicalJsonObject {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn an_event_wants_its_senders_keys_at_its_timestamp() {
        let event = pdu(json!({
            "type": "m.room.message",
            "sender": "@alice:a.example",
            "room_id": "!room:a.example",
            "origin_server_ts": 1_234,
            "content": {"body": "hi"},
            "signatures": {"a.example": {"ed25519:k1": "sig"}, "b.example": {"ed25519:k2": "sig"}},
        }));
        let (wanted, valid_at) = wanted_for_event(&event, &RoomVersionRules::V12.signatures).unwrap();
        assert_eq!(valid_at, 1_234);
        let a: OwnedServerName = "a.example".try_into().unwrap();
        assert_eq!(wanted, WantedKeys::from([(a, BTreeSet::from(["ed25519:k1".to_owned()]))]));
    }

    #[test]
    fn a_restricted_join_also_wants_the_authorising_server() {
        let event = pdu(json!({
            "type": "m.room.member",
            "state_key": "@bob:b.example",
            "sender": "@bob:b.example",
            "room_id": "!room:a.example",
            "origin_server_ts": 5,
            "content": {"membership": "join", "join_authorised_via_users_server": "@alice:a.example"},
            "signatures": {"a.example": {"ed25519:k1": "sig"}, "b.example": {"ed25519:k2": "sig"}},
        }));
        let (wanted, _) = wanted_for_event(&event, &RoomVersionRules::V12.signatures).unwrap();
        assert_eq!(wanted.len(), 2);
        let unsigned = pdu(json!({
            "type": "m.room.message", "sender": "@alice:a.example", "origin_server_ts": 5,
            "content": {}, "signatures": {"b.example": {"ed25519:k2": "sig"}},
        }));
        assert!(wanted_for_event(&unsigned, &RoomVersionRules::V12.signatures).unwrap_err().contains("a.example"));
    }
}
