//! Wiring: the only module that sees every layer. Opens storage, builds the services and the
//! router, binds the listeners and runs until SIGINT/SIGTERM, then shuts down in order (stop
//! accepting, let in-flight requests finish, close the database).

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::{net::TcpListener, sync::watch};

use crate::{
    api::{AppState, RateLimits, ServerInfo, federation::listener::TlsListener, router, ws::WsHub},
    config::Config,
    federation::{client::FederationClient, discovery::Discovery, keys::Keys, outbox::Outbox, tls},
    service::{
        account_data::AccountData,
        aliases::Aliases,
        backfill::Backfill,
        edus::{Edus, inbound::InboundEdus},
        ephemeral::{Presence, Typing},
        gap_fill::GapFill,
        joins::Joins,
        notifications::Notifications,
        profiles::Profiles,
        rate_limit::{KeyedLimit, UserLimits},
        receipts::Receipts,
        remote_membership::RemoteMembership,
        rooms::Rooms,
        server_keys::ServerKeys,
        stream::Streams,
        sync::Sync,
        transactions::Transactions,
        users::Users,
    },
    storage::{
        Db, DbOptions,
        lock::{LockError, ServerLock},
    },
};

/// How long in-flight requests get to finish after a shutdown signal.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// How often periodic upkeep runs.
const HOUSEKEEPING_INTERVAL: Duration = Duration::from_secs(600);

/// A start-up or run-time failure, already phrased for the operator.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct AppError(pub String);

/// Opens (and migrates) the configured database.
pub async fn open_database(config: &Config) -> Result<Db, AppError> {
    std::fs::create_dir_all(&config.data_dir)
        .map_err(|err| AppError(format!("cannot create data directory {}: {err}", config.data_dir.display())))?;
    let url = config.database_url();
    let options = DbOptions {
        url: url.clone(),
        max_connections: config.database.max_connections,
        connect_timeout: Duration::from_secs(config.database.connect_timeout_secs),
    };
    Db::open(&options).await.map_err(|err| AppError(format!("cannot open database {}: {err}", redact_url(&url))))
}

/// Hides a password in a database URL before it is shown.
fn redact_url(url: &str) -> String {
    match (url.find("://"), url.find('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let credentials = &url[scheme_end + 3..at];
            match credentials.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme_end + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

/// Runs the homeserver until a shutdown signal.
pub async fn run(config: Config) -> Result<(), AppError> {
    let started = std::time::Instant::now();
    // Before the database is opened (and migrated): a second server must not touch it.
    std::fs::create_dir_all(&config.data_dir)
        .map_err(|err| AppError(format!("cannot create data directory {}: {err}", config.data_dir.display())))?;
    let url = config.database_url();
    let connect_timeout = Duration::from_secs(config.database.connect_timeout_secs);
    let mut lock = ServerLock::acquire(&url, &config.data_dir, connect_timeout).await.map_err(|err| match err {
        LockError::Unreachable(err) => AppError(format!("cannot open database {}: {err}", redact_url(&url))),
        LockError::Refused(reason) => AppError(reason),
    })?;
    let db = open_database(&config).await?;
    let result = serve(&config, db.clone(), started, &mut lock).await;
    db.close().await;
    drop(lock);
    tracing::info!("database closed; goodbye");
    result
}

async fn serve(config: &Config, db: Db, started: std::time::Instant, lock: &mut ServerLock) -> Result<(), AppError> {
    let mut listeners = Vec::new();
    for addr in &config.listen {
        let listener =
            TcpListener::bind(addr).await.map_err(|err| AppError(format!("cannot listen on {addr}: {err}")))?;
        listeners.push(listener);
    }
    let bound: Vec<SocketAddr> = listeners.iter().filter_map(|l| l.local_addr().ok()).collect();
    let public_baseurl = config.public_baseurl(bound[0]);
    let federation_listeners = bind_federation(config).await?;
    let federation_bound: Vec<SocketAddr> =
        federation_listeners.iter().filter_map(|(l, _)| l.local_addr().ok()).collect();
    let state = build_state(config, db.clone(), public_baseurl.clone()).await?;
    let app = router::build(state.clone());

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let header_timeout = Duration::from_secs(config.limits.header_read_timeout_secs);
    let mut servers = tokio::task::JoinSet::new();
    for listener in listeners {
        let app = app.clone();
        let mut shutdown = shutdown_rx.clone();
        servers.spawn(async move {
            let stop = async move {
                let _ = shutdown.wait_for(|stop| *stop).await;
            };
            crate::api::serve::serve(listener, app, true, header_timeout, stop).await
        });
    }
    let federation_app = router::build_federation(state.clone());
    for (listener, tls) in federation_listeners {
        let app = federation_app.clone();
        let mut shutdown = shutdown_rx.clone();
        let stop = async move {
            let _ = shutdown.wait_for(|stop| *stop).await;
        };
        match tls {
            Some(tls) => {
                let listener = TlsListener::new(listener, tls)
                    .map_err(|err| AppError(format!("cannot listen for federation: {err}")))?;
                servers
                    .spawn(async move { crate::api::serve::serve(listener, app, false, header_timeout, stop).await });
            }
            None => {
                servers
                    .spawn(async move { crate::api::serve::serve(listener, app, false, header_timeout, stop).await });
            }
        }
    }
    let housekeeping = tokio::spawn(housekeeping(state.clone()));
    let presence_sweeper = tokio::spawn(sweep_presence(state.clone()));
    // Operators may deactivate users with the CLI while the server is down or running; their
    // room memberships are cleaned up here.
    tokio::spawn(remove_deactivated_members(state.clone()));

    tracing::info!(
        url = %public_baseurl.trim_end_matches('/'),
        local_address = %bound[0],
        listen = ?bound,
        federation_listen = ?federation_bound,
        server_name = %config.server_name,
        registration = config.registration_mode().as_str(),
        database = db.backend_name(),
        startup_ms = started.elapsed().as_millis() as u64,
        "Hearth {} is ready: point a Matrix client at {}",
        env!("CARGO_PKG_VERSION"),
        public_baseurl.trim_end_matches('/'),
    );

    let outcome = tokio::select! {
        signal = shutdown_signal() => {
            tracing::info!(signal, "shutting down: finishing in-flight requests");
            Ok(())
        }
        reason = lock.lost() => {
            tracing::error!(%reason, "shutting down");
            Err(AppError(reason))
        }
        Some(result) = servers.join_next() => {
            match result {
                Ok(Ok(())) => Ok(()),
                Ok(Err(err)) => Err(AppError(format!("listener failed: {err}"))),
                Err(err) => Err(AppError(format!("listener task failed: {err}"))),
            }
        }
    };
    let _ = shutdown_tx.send(true);
    // Long-polls return now rather than at their timeout; sockets are told where to resume.
    state.rooms.streams.shut_down();
    state.ws.shut_down();
    housekeeping.abort();
    presence_sweeper.abort();
    if tokio::time::timeout(SHUTDOWN_GRACE, async { while servers.join_next().await.is_some() {} }).await.is_err() {
        tracing::warn!("in-flight requests did not finish within {SHUTDOWN_GRACE:?}; closing anyway");
        servers.abort_all();
    }
    // Upgraded WebSockets are no longer the listeners' connections: wait for their close frames
    // (each tells its client where to resume) before the process ends.
    if !state.ws.wait_closed(SHUTDOWN_GRACE).await {
        tracing::warn!("WebSocket connections did not close within {SHUTDOWN_GRACE:?}; closing anyway");
    }
    outcome
}

/// Binds the Server-Server API listeners (none when federation is off), each with its TLS
/// configuration, or none for plain HTTP behind a TLS-terminating proxy.
async fn bind_federation(config: &Config) -> Result<Vec<(TcpListener, Option<Arc<rustls::ServerConfig>>)>, AppError> {
    if !config.is_federation_enabled() {
        return Ok(Vec::new());
    }
    let federation = &config.federation;
    let tls = match (&federation.tls_certificate, &federation.tls_private_key) {
        (Some(certificate), Some(key)) => Some(tls::server_config(certificate, key).map_err(AppError)?),
        _ => None,
    };
    let mut listeners = Vec::new();
    for addr in &federation.listen {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|err| AppError(format!("config key `federation.listen`: cannot listen on {addr}: {err}")))?;
        if tls.is_some() {
            tracing::info!(%addr, "federation listener: TLS");
        } else {
            tracing::warn!(
                %addr,
                "federation listener: plain HTTP (no federation.tls_certificate): put a TLS-terminating proxy in front"
            );
        }
        listeners.push((listener, tls.clone()));
    }
    Ok(listeners)
}

/// The outbound side of federation: discovery and the signing HTTP client. With federation off
/// nothing is ever sent, so missing system CA certificates or DNS configuration do not matter.
fn build_federation_client(config: &Config, server_keys: Arc<ServerKeys>) -> Result<Arc<FederationClient>, AppError> {
    let mut federation = config.federation.clone();
    let tls = if config.is_federation_enabled() {
        tls::client_config(&federation.extra_ca_certificates).map_err(AppError)?
    } else {
        // Trusts nothing and asks no DNS server: it is never used, and a machine without CA
        // certificates or /etc/resolv.conf still starts.
        federation.dns_servers = vec![crate::config::DnsServer(SocketAddr::from(([127, 0, 0, 1], 53)))];
        rustls::ClientConfig::builder_with_provider(tls::provider())
            .with_safe_default_protocol_versions()
            .map_err(|err| AppError(format!("TLS: {err}")))?
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth()
    };
    let discovery = Discovery::new(&federation, tls.clone()).map_err(AppError)?;
    Ok(Arc::new(FederationClient::new(server_keys, Arc::new(discovery), tls)))
}

/// Builds the services and the state the API layer serves from, on an open database (also used
/// by the benchmarks, which drive the services without HTTP).
pub async fn build_state(config: &Config, db: Db, public_baseurl: String) -> Result<AppState, AppError> {
    let server_keys =
        Arc::new(ServerKeys::load_or_create(&config.data_dir, config.server_name.clone()).map_err(AppError)?);
    let fail = |what: &str, err: crate::error::Error| AppError(format!("cannot start {what}: {err}"));
    let streams = Streams::start(db.clone(), &config.server_name).await.map_err(|e| fail("the stream writer", e))?;
    let users = Arc::new(Users::new(db.clone(), config).with_streams(streams.clone()));
    let rooms = Rooms::new(
        db.clone(),
        config.server_name.clone(),
        server_keys.clone(),
        streams.clone(),
        config.rooms.max_loaded_rooms,
    )
    .await
    .map_err(|e| fail("rooms", e))?;
    let typing = Typing::new(streams.clone());
    let presence_config = &config.presence;
    let presence = Presence::new(
        streams.clone(),
        presence_config.enabled,
        Duration::from_secs(presence_config.idle_after_secs),
        Duration::from_secs(presence_config.offline_after_secs),
    );
    let push_rules = Arc::new(crate::service::push::rules::PushRules::new(db.clone(), streams.clone()));
    let notifications = Arc::new(Notifications::new(rooms.clone(), push_rules.clone()));
    let receipts = Arc::new(Receipts::new(rooms.clone(), streams.clone(), &config.delivered_receipts));
    let sync =
        Arc::new(Sync::new(rooms.clone(), typing.clone(), presence.clone(), notifications.clone(), receipts.clone()));
    let push =
        crate::service::push::Push::new(db.clone(), rooms.clone(), notifications, sync.clone(), push_rules, config)
            .await
            .map_err(AppError)?;
    push.start();
    let account_data = Arc::new(AccountData::new(db.clone(), streams.clone()));
    let federation_client = build_federation_client(config, server_keys.clone())?;
    let keys = Arc::new(Keys::new(
        db.clone(),
        federation_client.clone(),
        server_keys.clone(),
        config.federation.trusted_key_servers.clone(),
    ));
    let profiles = Arc::new(Profiles::new(users.clone(), federation_client.clone(), config.is_federation_enabled()));
    let aliases = Arc::new(Aliases::new(rooms.clone(), federation_client.clone(), config.is_federation_enabled()));
    let outbox = Outbox::new(db.clone(), federation_client.clone(), config.federation.max_queued_per_destination);
    let edus = Edus::new(rooms.clone());
    typing.set_edus(edus.clone());
    presence.set_edus(edus.clone());
    receipts.set_edus(edus.clone());
    account_data.set_edus(edus.clone());
    users.set_edus(edus.clone());
    let e2ee = crate::service::e2ee::E2ee::new(
        db.clone(),
        users.clone(),
        streams.clone(),
        federation_client.clone(),
        config.is_federation_enabled(),
    );
    e2ee.set_edus(edus.clone());
    if config.is_federation_enabled() {
        // Our events and EDUs reach the other servers; what was queued before a restart is
        // sent again.
        rooms.set_outbox(outbox.clone());
        edus.enable(outbox.clone());
        outbox.resume().await;
    }
    let remote_membership = Arc::new(RemoteMembership::new(
        rooms.clone(),
        federation_client.clone(),
        keys.clone(),
        server_keys.clone(),
        outbox.clone(),
        config.is_federation_enabled(),
    ));
    let backfill =
        Arc::new(Backfill::new(rooms.clone(), keys.clone(), federation_client.clone(), config.is_federation_enabled()));
    let joins = Arc::new(Joins::new(
        rooms.clone(),
        aliases.clone(),
        federation_client.clone(),
        keys.clone(),
        server_keys.clone(),
        outbox.clone(),
        config.is_federation_enabled(),
    ));
    let gap_fill = Arc::new(GapFill::new(rooms.clone(), keys.clone(), federation_client.clone()));
    let inbound_edus = InboundEdus::new(
        rooms.clone(),
        typing.clone(),
        presence.clone(),
        receipts.clone(),
        account_data.clone(),
        federation_client.clone(),
    );
    let transactions =
        Arc::new(Transactions::new(db.clone(), rooms.clone(), keys.clone(), outbox, gap_fill, inbound_edus));

    let media =
        crate::service::media::Media::new(db.clone(), config, Some(federation_client.clone())).map_err(AppError)?;

    let rooms_for_search = rooms.clone();
    let limits = &config.rate_limits;
    let enabled = |limit| limits.enabled.then_some(limit);
    let state = AppState {
        info: Arc::new(ServerInfo {
            server_name: config.server_name.clone(),
            public_baseurl,
            max_request_body_bytes: config.limits.max_request_body_bytes,
            request_timeout: Duration::from_secs(config.limits.request_timeout_secs),
            max_concurrent_requests: config.limits.max_concurrent_requests,
            trusted_proxies: Arc::new(config.trusted_proxies.clone()),
            unstable_features: [
                (config.websocket.enabled, "org.hearth.ws"),
                (config.delivered_receipts.enabled, "org.hearth.delivered_receipts"),
                // Threads (bundled summaries, `/threads`, `/relations` both ways), threaded read
                // receipts and per-thread unread counts — all in v1.3/v1.4, which Hearth does not
                // claim as a whole: how clients know to use them.
                (true, "org.matrix.msc3440.stable"),
                (true, "org.matrix.msc3856.stable"),
                (true, "org.matrix.msc3715.stable"),
                (true, "org.matrix.msc3771"),
                (true, "org.matrix.msc3773"),
            ]
            .into_iter()
            .filter_map(|(enabled, feature)| enabled.then_some(feature))
            .collect(),
            well_known_server: config.federation.well_known_server.clone(),
        }),
        users: users.clone(),
        server_keys,
        rate_limits: Arc::new(RateLimits {
            register: KeyedLimit::new(enabled(limits.register)),
            login: KeyedLimit::new(enabled(limits.login)),
            user: UserLimits::new(limits),
        }),
        rooms,
        sync,
        typing,
        presence,
        receipts,
        account_data,
        ws: Arc::new(WsHub::new(config.websocket.clone(), limits.enabled.then_some(limits.websocket_ops))),
        keys,
        profiles,
        aliases,
        joins,
        transactions,
        remote_membership,
        backfill,
        media,
        e2ee,
        push,
        search: Arc::new(crate::service::search::Search::new(rooms_for_search, config.search.clone())),
    };
    Ok(state)
}

async fn housekeeping(state: AppState) {
    let mut interval = tokio::time::interval(HOUSEKEEPING_INTERVAL);
    interval.tick().await;
    loop {
        interval.tick().await;
        if let Err(err) = state.users.housekeeping().await {
            tracing::warn!(%err, "housekeeping failed");
        }
        state.rate_limits.register.forget_idle_keys();
        state.rate_limits.login.forget_idle_keys();
        state.rate_limits.user.forget_idle_keys();
        state.rooms.streams.notifier.prune();
        remove_deactivated_members(state.clone()).await;
        if let Err(err) = state.media.housekeeping().await {
            tracing::warn!(%err, "media housekeeping failed");
        }
    }
}

async fn sweep_presence(state: AppState) {
    let mut interval = tokio::time::interval(Duration::from_secs(5));
    loop {
        interval.tick().await;
        state.presence.sweep();
    }
}

async fn remove_deactivated_members(state: AppState) {
    let users = match state.users.deactivated_users().await {
        Ok(users) => users,
        Err(err) => {
            tracing::warn!(%err, "could not list deactivated users");
            return;
        }
    };
    for user in users {
        if let Err(err) = state.rooms.leave_all(&user).await {
            tracing::warn!(%user, %err, "could not remove a deactivated user from their rooms");
        }
    }
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM, naming the signal.
async fn shutdown_signal() -> &'static str {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
        "SIGINT"
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
        "SIGTERM"
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<&'static str>();
    tokio::select! {
        name = ctrl_c => name,
        name = terminate => name,
    }
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn database_passwords_are_never_shown() {
        assert_eq!(redact_url("postgres://hearth:secret@db/hearth"), "postgres://hearth:***@db/hearth");
        assert_eq!(redact_url("postgres://hearth@db/hearth"), "postgres://hearth@db/hearth");
        assert_eq!(redact_url("sqlite://./hearth-data/hearth.db"), "sqlite://./hearth-data/hearth.db");
    }
}
