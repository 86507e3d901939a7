//! HTTP API: routing, request extraction and response shaping for the Client-Server API and the
//! Server-Server API (served on its own listener, `api::federation::listener`).
//!
//! Handlers are thin: parse the ruma request type, check the caller, call one service method,
//! shape the ruma response. No SQL and no business rules live here.

pub mod client;
pub mod extract;
pub mod federation;
pub mod middleware;
pub mod respond;
pub mod router;
pub mod serve;
pub mod ws;

use std::sync::Arc;

use axum::extract::FromRef;

use crate::{
    federation::keys::Keys,
    service::{
        account_data::AccountData,
        aliases::Aliases,
        ephemeral::{Presence, Typing},
        profiles::Profiles,
        rate_limit::{KeyedLimit, UserLimits},
        receipts::Receipts,
        rooms::Rooms,
        server_keys::ServerKeys,
        sync::Sync,
        users::Users,
    },
};

/// Facts about this server that handlers need to answer requests.
pub struct ServerInfo {
    pub server_name: ruma::OwnedServerName,
    /// Base URL advertised to clients, ending in `/`.
    pub public_baseurl: String,
    pub max_request_body_bytes: usize,
    /// `limits.request_timeout_secs`.
    pub request_timeout: std::time::Duration,
    /// `limits.max_concurrent_requests`.
    pub max_concurrent_requests: usize,
    /// Proxies whose forwarding headers name the client (`trusted_proxies`).
    pub trusted_proxies: Arc<Vec<crate::config::IpNet>>,
    /// Hearth extensions advertised in `/versions` `unstable_features`.
    pub unstable_features: Vec<&'static str>,
    /// The `m.server` of `/.well-known/matrix/server`, when delegation is configured.
    pub well_known_server: Option<String>,
}

/// Rate limits the API applies: per address on expensive unauthenticated actions, per user on
/// what a signed-in user does.
pub struct RateLimits {
    pub register: KeyedLimit,
    pub login: KeyedLimit,
    pub user: UserLimits,
}

/// Everything the router hands to handlers; each handler extracts only the parts it uses.
#[derive(Clone)]
pub struct AppState {
    pub info: Arc<ServerInfo>,
    pub users: Arc<Users>,
    pub server_keys: Arc<ServerKeys>,
    pub rate_limits: Arc<RateLimits>,
    pub rooms: Arc<Rooms>,
    pub sync: Arc<Sync>,
    pub typing: Arc<Typing>,
    pub presence: Arc<Presence>,
    pub receipts: Arc<Receipts>,
    pub account_data: Arc<AccountData>,
    pub ws: Arc<ws::WsHub>,
    /// Other servers' signing keys (and the notary answers about them).
    pub keys: Arc<Keys>,
    pub profiles: Arc<Profiles>,
    pub aliases: Arc<Aliases>,
    pub joins: Arc<crate::service::joins::Joins>,
    pub transactions: Arc<crate::service::transactions::Transactions>,
    pub remote_membership: Arc<crate::service::remote_membership::RemoteMembership>,
    /// History fetched from other servers when clients paginate into a gap.
    pub backfill: Arc<crate::service::backfill::Backfill>,
    /// The content repository.
    pub media: Arc<crate::service::media::Media>,
    /// End-to-end encryption keys, key backups and dehydrated devices.
    pub e2ee: Arc<crate::service::e2ee::E2ee>,
    /// Push rules, pushers and the push sender.
    pub push: Arc<crate::service::push::Push>,
    /// Full-text search over room events.
    pub search: Arc<crate::service::search::Search>,
}

macro_rules! substate {
    ($($field:ident: $ty:ty),* $(,)?) => {
        $(impl FromRef<AppState> for Arc<$ty> {
            fn from_ref(state: &AppState) -> Self {
                state.$field.clone()
            }
        })*
    };
}

substate!(
    info: ServerInfo,
    users: Users,
    server_keys: ServerKeys,
    rate_limits: RateLimits,
    rooms: Rooms,
    sync: Sync,
    typing: Typing,
    presence: Presence,
    receipts: Receipts,
    account_data: AccountData,
    ws: ws::WsHub,
    keys: Keys,
    profiles: Profiles,
    aliases: Aliases,
    joins: crate::service::joins::Joins,
    remote_membership: crate::service::remote_membership::RemoteMembership,
    transactions: crate::service::transactions::Transactions,
    backfill: crate::service::backfill::Backfill,
    media: crate::service::media::Media,
    e2ee: crate::service::e2ee::E2ee,
    push: crate::service::push::Push,
    search: crate::service::search::Search,
);
