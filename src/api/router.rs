//! The route table. Every Matrix endpoint is registered from its ruma request type, so each gets
//! all of the spec's path variants (`r0`, `v3`, …) and its exact method; anything else is a Matrix
//! `M_UNRECOGNIZED` error (404 for unknown paths, 405 for a known path with the wrong method).

use axum::{
    Router,
    handler::Handler,
    middleware::{from_fn, from_fn_with_state},
    response::IntoResponse,
    routing::{self, MethodFilter, MethodRouter, get, on},
};
use ruma::api::{IncomingRequest, Metadata, path_builder::PathBuilder};
use std::{sync::Arc, time::Duration};

use axum::error_handling::HandleErrorLayer;
use tokio::sync::Semaphore;
use tower::limit::GlobalConcurrencyLimitLayer;
use tower_http::catch_panic::CatchPanicLayer;

use crate::{
    api::{AppState, client, federation, middleware},
    error::Error,
};

/// Adds `handler` for every path variant of the endpoint `T`.
fn endpoint<T, H, X>(router: Router<AppState>, handler: H) -> Router<AppState>
where
    T: IncomingRequest,
    H: Handler<X, AppState>,
    X: 'static,
{
    endpoint_with::<T>(router, on(method_filter::<T>(), handler))
}

fn endpoint_with<T: IncomingRequest>(
    mut router: Router<AppState>,
    method_router: MethodRouter<AppState>,
) -> Router<AppState> {
    for path in T::PATH_BUILDER.all_paths() {
        router = router.route(path, method_router.clone());
    }
    router
}

/// Like [`endpoint`], for paths ending in `/{state_key}`: the spec allows an empty state key, which
/// clients send as a trailing slash (or leave off), and a router cannot match an empty segment.
fn state_endpoint<T, H, X>(mut router: Router<AppState>, handler: H) -> Router<AppState>
where
    T: IncomingRequest,
    H: Handler<X, AppState>,
    X: 'static,
{
    let method_router = on(method_filter::<T>(), handler);
    for path in T::PATH_BUILDER.all_paths() {
        router = router.route(path, method_router.clone());
        if let Some(prefix) = path.strip_suffix("/{state_key}") {
            router = router.route(prefix, method_router.clone()).route(&format!("{prefix}/"), method_router.clone());
        }
    }
    router
}

fn method_filter<T: Metadata>() -> MethodFilter {
    MethodFilter::try_from(T::METHOD).expect("Matrix endpoints use standard methods")
}

/// The complete application: every endpoint plus the middleware that applies to all of them.
pub fn build(state: AppState) -> Router {
    use ruma::api::client::{account, device, discovery, profile, session};

    let register_limit = from_fn_with_state(state.rate_limits.clone(), middleware::limit_register);
    let login_limit = from_fn_with_state(state.rate_limits.clone(), middleware::limit_login);

    let trusted_proxies = state.info.trusted_proxies.clone();
    let mut router = Router::new();
    router = endpoint::<discovery::get_supported_versions::Request, _, _>(router, client::discovery::versions);
    router = endpoint::<discovery::discover_homeserver::Request, _, _>(router, client::discovery::well_known_client);
    router = endpoint::<discovery::get_capabilities::v3::Request, _, _>(router, client::capabilities::capabilities);

    router = endpoint_with::<account::register::v3::Request>(
        router,
        on(method_filter::<account::register::v3::Request>(), client::registration::register)
            .route_layer(register_limit),
    );
    router = endpoint::<account::get_username_availability::v3::Request, _, _>(router, client::registration::available);
    router = endpoint::<account::check_registration_token_validity::v1::Request, _, _>(
        router,
        client::registration::token_validity,
    );

    router = endpoint::<session::get_login_types::v3::Request, _, _>(router, client::session::login_types);
    router = endpoint_with::<session::login::v3::Request>(
        router,
        on(method_filter::<session::login::v3::Request>(), client::session::login).route_layer(login_limit),
    );
    router = endpoint::<session::refresh_token::v3::Request, _, _>(router, client::session::refresh);
    router = endpoint::<session::logout::v3::Request, _, _>(router, client::session::logout);
    router = endpoint::<session::logout_all::v3::Request, _, _>(router, client::session::logout_all);

    router = endpoint::<account::whoami::v3::Request, _, _>(router, client::account::whoami);
    router = endpoint::<account::change_password::v3::Request, _, _>(router, client::account::change_password);
    router = endpoint::<account::deactivate::v3::Request, _, _>(router, client::account::deactivate);

    router = endpoint::<device::get_devices::v3::Request, _, _>(router, client::devices::list);
    router = endpoint::<device::get_device::v3::Request, _, _>(router, client::devices::get);
    router = endpoint::<device::update_device::v3::Request, _, _>(router, client::devices::update);
    router = endpoint::<device::delete_device::v3::Request, _, _>(router, client::devices::delete);
    router = endpoint::<device::delete_devices::v3::Request, _, _>(router, client::devices::delete_many);

    router = endpoint::<profile::get_profile::v3::Request, _, _>(router, client::profile::get);
    router = endpoint::<profile::get_display_name::v3::Request, _, _>(router, client::profile::get_displayname);
    router = endpoint::<profile::set_display_name::v3::Request, _, _>(router, client::profile::set_displayname);
    router = endpoint::<profile::get_avatar_url::v3::Request, _, _>(router, client::profile::get_avatar_url);
    router = endpoint::<profile::set_avatar_url::v3::Request, _, _>(router, client::profile::set_avatar_url);

    router = push_routes(router);
    router = room_routes(router);
    router = e2ee_routes(router);
    router = router.route("/_matrix/key/v2/server", get(federation::keys::server_keys));
    router = endpoint::<ruma::api::federation::discovery::discover_homeserver::Request, _, _>(
        router,
        federation::discovery::well_known_server,
    );
    router = router.fallback(unrecognized).method_not_allowed_fallback(method_not_allowed);

    // Everything above is bounded in time and in number at once; what follows is added after the
    // layer and is not: a long-poll `/sync` waits by design (it gets its own, longer, deadline),
    // a WebSocket upgrade becomes a connection with limits of its own, and `/health` must answer
    // even when the server is saturated.
    router = media_routes(router);
    let semaphore = Arc::new(Semaphore::new(state.info.max_concurrent_requests));
    router = router.layer(request_limits(state.info.request_timeout, Some(semaphore.clone())));
    // Transfers: an upload streams its body, and a download may first wait for an upload or
    // fetch a file from another server; both get `media.max_upload_secs` (and the in-flight cap).
    router = transfer_routes(router, state.media.transfer_deadline(), semaphore);
    let sync_deadline = state.info.request_timeout + client::sync::MAX_TIMEOUT;
    router = endpoint_with::<ruma::api::client::sync::sync_events::v3::Request>(
        router,
        on(method_filter::<ruma::api::client::sync::sync_events::v3::Request>(), client::sync::sync)
            .route_layer(request_limits(sync_deadline, None)),
    );
    router = router.route("/_matrix/client/unstable/org.hearth.ws/v1/connect", get(crate::api::ws::connect));
    router = router.route("/health", get(health));

    router
        .with_state(state)
        .layer(CatchPanicLayer::custom(|_| Error::Internal("handler panicked".to_owned()).into_response()))
        .layer(from_fn(middleware::cors))
        .layer(from_fn_with_state(trusted_proxies, middleware::client_ip))
        .layer(from_fn(middleware::log_requests))
}

/// A deadline on each request (504 once it passes) and, with a semaphore, a cap on requests in
/// flight: over it a request is refused at once (load shedding) instead of queueing behind the
/// others, which would only make every one of them late.
fn request_limits(
    deadline: Duration,
    in_flight: Option<Arc<Semaphore>>,
) -> impl tower::Layer<
    axum::routing::Route,
    Service: tower::Service<
        axum::extract::Request,
        Response = axum::response::Response,
        Error = std::convert::Infallible,
        Future: Send + 'static,
    > + Clone
                 + Send
                 + Sync
                 + 'static,
> + Clone
+ Send
+ Sync
+ 'static {
    tower::ServiceBuilder::new()
        .layer(HandleErrorLayer::new(refuse_request))
        .load_shed()
        .option_layer(in_flight.map(GlobalConcurrencyLimitLayer::with_semaphore))
        .timeout(deadline)
}

async fn refuse_request(err: tower::BoxError) -> Error {
    if err.is::<tower::timeout::error::Elapsed>() {
        Error::TimedOut
    } else if err.is::<tower::load_shed::error::Overloaded>() {
        Error::Overloaded
    } else {
        Error::Internal(format!("request layer: {err}"))
    }
}

/// The Server-Server API, served on the federation listener: every `/_matrix/federation/*` and
/// `/_matrix/key/*` endpoint, and `/.well-known/matrix/server`. Bodies are buffered first, so the
/// `Origin` extractor can verify the signature over them.
pub fn build_federation(state: AppState) -> Router {
    use ruma::api::federation::{discovery, query};

    let mut router = Router::new();
    router = endpoint::<discovery::get_server_version::v1::Request, _, _>(router, federation::discovery::version);
    router =
        endpoint::<discovery::discover_homeserver::Request, _, _>(router, federation::discovery::well_known_server);
    router = endpoint::<discovery::get_server_keys::v2::Request, _, _>(router, federation::keys::server_keys);
    router =
        endpoint::<discovery::get_remote_server_keys_batch::v2::Request, _, _>(router, federation::keys::query_batch);
    router = endpoint::<discovery::get_remote_server_keys::v2::Request, _, _>(router, federation::keys::query);
    router = endpoint::<query::get_profile_information::v1::Request, _, _>(router, federation::query::profile);
    router = endpoint::<query::get_room_information::v1::Request, _, _>(router, federation::query::directory);
    router = endpoint::<ruma::api::federation::directory::get_public_rooms::v1::Request, _, _>(
        router,
        federation::query::public_rooms,
    );
    router = endpoint::<ruma::api::federation::directory::get_public_rooms_filtered::v1::Request, _, _>(
        router,
        federation::query::public_rooms_filtered,
    );
    router = graph_routes(router);
    // Joins and transactions.
    {
        use ruma::api::federation::{membership as fm, transactions as ft};
        router = endpoint::<fm::prepare_join_event::v1::Request, _, _>(router, federation::membership::make_join);
        router = endpoint::<fm::create_join_event::v2::Request, _, _>(router, federation::membership::send_join);
        router = endpoint::<ft::send_transaction_message::v1::Request, _, _>(router, federation::transactions::send);
    }
    router = invite_routes(router);
    router = router
        .route("/_matrix/federation/v1/media/download/{media_id}", get(federation::media::download))
        .route("/_matrix/federation/v1/media/thumbnail/{media_id}", get(federation::media::thumbnail));

    router = router.fallback(unrecognized).method_not_allowed_fallback(method_not_allowed);
    // Other servers get the same deadline and an in-flight cap of their own, so a flood of
    // federation traffic cannot take the slots of the server's own users.
    let semaphore = Arc::new(Semaphore::new(state.info.max_concurrent_requests));
    router = router.layer(request_limits(state.info.request_timeout, Some(semaphore)));

    let info = state.info.clone();
    router
        .with_state(state)
        .layer(CatchPanicLayer::custom(|_| Error::Internal("handler panicked".to_owned()).into_response()))
        .layer(from_fn_with_state(info, middleware::buffer_body))
        .layer(from_fn(middleware::cors))
        .layer(from_fn(middleware::log_requests))
}

/// Invites, leaves and knocks from other servers (`federation::invites`).
fn invite_routes(mut router: Router<AppState>) -> Router<AppState> {
    use ruma::api::federation::membership as fm;

    router = endpoint::<fm::create_invite::v2::Request, _, _>(router, federation::invites::invite);
    router = endpoint::<fm::prepare_leave_event::v1::Request, _, _>(router, federation::invites::make_leave);
    router = endpoint::<fm::create_leave_event::v2::Request, _, _>(router, federation::invites::send_leave);
    router = endpoint::<fm::prepare_knock_event::v1::Request, _, _>(router, federation::invites::make_knock);
    router = endpoint::<fm::create_knock_event::v1::Request, _, _>(router, federation::invites::send_knock);
    router
}

/// Serving the room graph to other servers (`federation::events`), and users' device lists.
fn graph_routes(mut router: Router<AppState>) -> Router<AppState> {
    use ruma::api::federation::{authorization::get_event_authorization, event};

    router = endpoint::<event::get_event::v1::Request, _, _>(router, federation::events::event);
    router = endpoint::<event::get_room_state::v1::Request, _, _>(router, federation::events::state);
    router = endpoint::<event::get_room_state_ids::v1::Request, _, _>(router, federation::events::state_ids);
    router = endpoint::<get_event_authorization::v1::Request, _, _>(router, federation::events::event_auth);
    router = endpoint::<ruma::api::federation::backfill::get_backfill::v1::Request, _, _>(
        router,
        federation::events::backfill,
    );
    router = endpoint::<event::get_missing_events::v1::Request, _, _>(router, federation::events::missing_events);
    router =
        endpoint::<ruma::api::federation::device::get_devices::v1::Request, _, _>(router, federation::device::devices);
    router = endpoint::<ruma::api::federation::keys::get_keys::v1::Request, _, _>(router, federation::user_keys::query);
    router =
        endpoint::<ruma::api::federation::keys::claim_keys::v1::Request, _, _>(router, federation::user_keys::claim);
    router
}

/// The content repository's quick endpoints (`client::media`), under the usual request limits.
fn media_routes(mut router: Router<AppState>) -> Router<AppState> {
    use client::media;
    use routing::post;

    router = router.route("/_matrix/media/v1/create", post(media::create));
    for path in ["/_matrix/client/v1/media/config", "/_matrix/media/v3/config", "/_matrix/media/r0/config"] {
        router = router.route(path, get(media::config));
    }
    for path in
        ["/_matrix/client/v1/media/preview_url", "/_matrix/media/v3/preview_url", "/_matrix/media/r0/preview_url"]
    {
        router = router.route(path, get(media::preview_url));
    }
    router
}

/// Uploads and downloads, under `limits` (their own deadline): see [`build`].
fn transfer_routes(mut router: Router<AppState>, deadline: Duration, in_flight: Arc<Semaphore>) -> Router<AppState> {
    use client::media;
    use routing::{post, put};

    let limits = request_limits(deadline, Some(in_flight));
    for version in ["v3", "r0"] {
        router = router
            .route(&format!("/_matrix/media/{version}/upload"), post(media::upload).route_layer(limits.clone()))
            .route(
                &format!("/_matrix/media/{version}/download/{{server_name}}/{{media_id}}"),
                get(media::legacy_download).route_layer(limits.clone()),
            )
            .route(
                &format!("/_matrix/media/{version}/download/{{server_name}}/{{media_id}}/{{file_name}}"),
                get(media::legacy_download).route_layer(limits.clone()),
            )
            .route(
                &format!("/_matrix/media/{version}/thumbnail/{{server_name}}/{{media_id}}"),
                get(media::legacy_thumbnail).route_layer(limits.clone()),
            );
    }
    router
        .route("/_matrix/media/v3/upload/{server_name}/{media_id}", put(media::upload_to).route_layer(limits.clone()))
        .route(
            "/_matrix/client/v1/media/download/{server_name}/{media_id}",
            get(media::download).route_layer(limits.clone()),
        )
        .route(
            "/_matrix/client/v1/media/download/{server_name}/{media_id}/{file_name}",
            get(media::download).route_layer(limits.clone()),
        )
        .route("/_matrix/client/v1/media/thumbnail/{server_name}/{media_id}", get(media::thumbnail).route_layer(limits))
}

/// Push rules, pushers, the notification list and search.
fn push_routes(mut router: Router<AppState>) -> Router<AppState> {
    use ruma::api::client::push;

    router = endpoint::<push::get_pushrules_all::v3::Request, _, _>(router, client::push::all);
    router = endpoint::<push::get_pushrules_global_scope::v3::Request, _, _>(router, client::push::global);
    router = endpoint::<push::get_pushrule::v3::Request, _, _>(router, client::push::rule);
    router = endpoint::<push::get_pushrule_enabled::v3::Request, _, _>(router, client::push::enabled);
    router = endpoint::<push::get_pushrule_actions::v3::Request, _, _>(router, client::push::actions);
    router = endpoint::<push::get_pushers::v3::Request, _, _>(router, client::push::pushers);
    router = endpoint::<push::set_pushrule::v3::Request, _, _>(router, client::push::set_rule);
    router = endpoint::<push::delete_pushrule::v3::Request, _, _>(router, client::push::delete_rule);
    router = endpoint::<push::set_pushrule_enabled::v3::Request, _, _>(router, client::push::set_enabled);
    router = endpoint::<push::set_pushrule_actions::v3::Request, _, _>(router, client::push::set_actions);
    router = endpoint::<push::set_pusher::v3::Request, _, _>(router, client::push::set_pusher);
    router = endpoint::<push::get_notifications::v3::Request, _, _>(router, client::push::notifications);
    router = endpoint::<ruma::api::client::search::search_events::v3::Request, _, _>(router, client::search::search);
    router
}

/// End-to-end encryption: keys, key backups, dehydrated devices.
fn e2ee_routes(mut router: Router<AppState>) -> Router<AppState> {
    use client::{backup as bk, dehydrated as dh, keys as k};
    use ruma::api::client::{backup, dehydrated_device as dd, keys};

    router = endpoint::<keys::upload_keys::v3::Request, _, _>(router, k::upload);
    router = endpoint::<keys::get_keys::v3::Request, _, _>(router, k::query);
    router = endpoint::<keys::claim_keys::v3::Request, _, _>(router, k::claim);
    router = endpoint::<keys::get_key_changes::v3::Request, _, _>(router, k::changes);
    router = endpoint::<keys::upload_signing_keys::v3::Request, _, _>(router, k::upload_signing);
    router = endpoint::<keys::upload_signatures::v3::Request, _, _>(router, k::upload_signatures);

    router = endpoint::<backup::create_backup_version::v3::Request, _, _>(router, bk::create_version);
    router = endpoint::<backup::get_latest_backup_info::v3::Request, _, _>(router, bk::latest_version);
    router = endpoint::<backup::get_backup_info::v3::Request, _, _>(router, bk::version);
    router = endpoint::<backup::update_backup_version::v3::Request, _, _>(router, bk::update_version);
    router = endpoint::<backup::delete_backup_version::v3::Request, _, _>(router, bk::delete_version);
    router = endpoint::<backup::add_backup_keys::v3::Request, _, _>(router, bk::put_keys);
    router = endpoint::<backup::add_backup_keys_for_room::v3::Request, _, _>(router, bk::put_room_keys);
    router = endpoint::<backup::add_backup_keys_for_session::v3::Request, _, _>(router, bk::put_session_key);
    router = endpoint::<backup::get_backup_keys::v3::Request, _, _>(router, bk::keys);
    router = endpoint::<backup::get_backup_keys_for_room::v3::Request, _, _>(router, bk::room_keys);
    router = endpoint::<backup::get_backup_keys_for_session::v3::Request, _, _>(router, bk::session_key);
    router = endpoint::<backup::delete_backup_keys::v3::Request, _, _>(router, bk::delete_keys);
    router = endpoint::<backup::delete_backup_keys_for_room::v3::Request, _, _>(router, bk::delete_room_keys);
    router = endpoint::<backup::delete_backup_keys_for_session::v3::Request, _, _>(router, bk::delete_session_key);

    router = endpoint::<dd::put_dehydrated_device::unstable::Request, _, _>(router, dh::put);
    router = endpoint::<dd::get_dehydrated_device::unstable::Request, _, _>(router, dh::get);
    router = endpoint::<dd::delete_dehydrated_device::unstable::Request, _, _>(router, dh::delete);
    router = endpoint::<dd::get_events::unstable::Request, _, _>(router, dh::events);
    router
}

/// Rooms, messaging and delivery.
fn room_routes(mut router: Router<AppState>) -> Router<AppState> {
    use client::{
        account_data as ad, directory as dir, membership as mem, message as msg, presence as pres, receipts as rcpt,
        relations as rel, room as rm, state as st, sync as sy,
    };
    use ruma::api::client::{
        alias, config, context, directory, filter, knock, membership, message, presence, read_marker, receipt, redact,
        relations, room, state, tag, threads, to_device, typing, user_directory,
    };

    router = endpoint::<room::create_room::v3::Request, _, _>(router, rm::create);
    router = endpoint::<room::upgrade_room::v3::Request, _, _>(router, rm::upgrade);
    router = endpoint::<room::get_room_event::v3::Request, _, _>(router, rm::event);
    router = endpoint::<room::get_event_by_timestamp::v1::Request, _, _>(router, rm::timestamp_to_event);
    router = endpoint::<context::get_context::v3::Request, _, _>(router, rm::context);

    router = endpoint::<membership::invite_user::v3::Request, _, _>(router, mem::invite);
    router = endpoint::<membership::join_room_by_id::v3::Request, _, _>(router, mem::join_by_id);
    router = endpoint::<membership::join_room_by_id_or_alias::v3::Request, _, _>(router, mem::join_by_id_or_alias);
    router = endpoint::<knock::knock_room::v3::Request, _, _>(router, mem::knock);
    router = endpoint::<membership::leave_room::v3::Request, _, _>(router, mem::leave);
    router = endpoint::<membership::kick_user::v3::Request, _, _>(router, mem::kick);
    router = endpoint::<membership::ban_user::v3::Request, _, _>(router, mem::ban);
    router = endpoint::<membership::unban_user::v3::Request, _, _>(router, mem::unban);
    router = endpoint::<membership::forget_room::v3::Request, _, _>(router, mem::forget);
    router = endpoint::<membership::joined_rooms::v3::Request, _, _>(router, mem::joined);
    router = endpoint::<membership::get_member_events::v3::Request, _, _>(router, mem::members);
    router = endpoint::<membership::joined_members::v3::Request, _, _>(router, mem::joined_members);

    router = endpoint::<message::send_message_event::v3::Request, _, _>(router, msg::send);
    router = endpoint::<message::get_message_events::v3::Request, _, _>(router, msg::messages);
    router = endpoint::<redact::redact_event::v3::Request, _, _>(router, msg::redact);
    router = state_endpoint::<state::send_state_event::v3::Request, _, _>(router, st::send);
    router = state_endpoint::<state::get_state_event_for_key::v3::Request, _, _>(router, st::get_one);
    router = endpoint::<state::get_state_events::v3::Request, _, _>(router, st::get_all);

    router = endpoint::<relations::get_relating_events::v1::Request, _, _>(router, rel::all);
    router = endpoint::<relations::get_relating_events_with_rel_type::v1::Request, _, _>(router, rel::by_type);
    router = endpoint::<relations::get_relating_events_with_rel_type_and_event_type::v1::Request, _, _>(
        router,
        rel::by_type_and_event_type,
    );
    router = endpoint::<threads::get_threads::v1::Request, _, _>(router, rel::threads);

    router = endpoint::<filter::create_filter::v3::Request, _, _>(router, sy::create_filter);
    router = endpoint::<filter::get_filter::v3::Request, _, _>(router, sy::get_filter);

    router = endpoint::<typing::create_typing_event::v3::Request, _, _>(router, client::typing::typing);
    router = endpoint::<receipt::create_receipt::v3::Request, _, _>(router, rcpt::receipt);
    router = endpoint::<read_marker::set_read_marker::v3::Request, _, _>(router, rcpt::read_markers);
    router = endpoint::<presence::set_presence::v3::Request, _, _>(router, pres::set);
    router = endpoint::<presence::get_presence::v3::Request, _, _>(router, pres::get);

    router = endpoint::<config::set_global_account_data::v3::Request, _, _>(router, ad::set_global);
    router = endpoint::<config::get_global_account_data::v3::Request, _, _>(router, ad::get_global);
    router = endpoint::<config::set_room_account_data::v3::Request, _, _>(router, ad::set_room);
    router = endpoint::<config::get_room_account_data::v3::Request, _, _>(router, ad::get_room);
    router = endpoint::<tag::get_tags::v3::Request, _, _>(router, ad::tags);
    router = endpoint::<tag::create_tag::v3::Request, _, _>(router, ad::set_tag);
    router = endpoint::<tag::delete_tag::v3::Request, _, _>(router, ad::delete_tag);

    router = endpoint::<alias::create_alias::v3::Request, _, _>(router, dir::create);
    router = endpoint::<alias::get_alias::v3::Request, _, _>(router, dir::get);
    router = endpoint::<alias::delete_alias::v3::Request, _, _>(router, dir::delete);
    router = endpoint::<room::aliases::v3::Request, _, _>(router, dir::room_aliases);
    router = endpoint::<directory::get_room_visibility::v3::Request, _, _>(router, dir::visibility);
    router = endpoint::<directory::set_room_visibility::v3::Request, _, _>(router, dir::set_visibility);
    router = endpoint::<directory::get_public_rooms::v3::Request, _, _>(router, dir::public_rooms);
    router = endpoint::<directory::get_public_rooms_filtered::v3::Request, _, _>(router, dir::public_rooms_filtered);
    router = endpoint::<user_directory::search_users::v3::Request, _, _>(router, dir::search_users);

    router = endpoint::<to_device::send_event_to_device::v3::Request, _, _>(router, client::to_device::send);
    router
}

/// `GET /health`: the process is up and serving, and its stream writer (through which every
/// write goes) is running.
async fn health(
    axum::extract::State(rooms): axum::extract::State<std::sync::Arc<crate::service::rooms::Rooms>>,
) -> (http::StatusCode, &'static str) {
    if rooms.streams.is_writer_running() {
        (http::StatusCode::OK, "OK")
    } else {
        (http::StatusCode::SERVICE_UNAVAILABLE, "the stream writer has stopped")
    }
}

async fn unrecognized() -> Error {
    Error::Unrecognized
}

async fn method_not_allowed() -> Error {
    Error::MethodNotAllowed
}
