//! The route table. Every Matrix endpoint is registered from its ruma request type, so each gets
//! all of the spec's path variants (`r0`, `v3`, …) and its exact method; anything else is a Matrix
//! `M_UNRECOGNIZED` error (404 for unknown paths, 405 for a known path with the wrong method).

use axum::{
    Router,
    handler::Handler,
    middleware::{from_fn, from_fn_with_state},
    response::IntoResponse,
    routing::{MethodFilter, MethodRouter, get, on},
};
use ruma::api::{IncomingRequest, Metadata, path_builder::PathBuilder};
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

fn method_filter<T: Metadata>() -> MethodFilter {
    MethodFilter::try_from(T::METHOD).expect("Matrix endpoints use standard methods")
}

/// The complete application: every endpoint plus the middleware that applies to all of them.
pub fn build(state: AppState) -> Router {
    use ruma::api::client::{account, device, discovery, profile, session};

    let register_limit = from_fn_with_state(state.rate_limits.clone(), middleware::limit_register);
    let login_limit = from_fn_with_state(state.rate_limits.clone(), middleware::limit_login);

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

    router = router.route("/_matrix/key/v2/server", get(federation::keys::server_keys)).route("/health", get(health));

    router
        .fallback(unrecognized)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
        .layer(CatchPanicLayer::custom(|_| Error::Internal("handler panicked".to_owned()).into_response()))
        .layer(from_fn(middleware::cors))
        .layer(from_fn(middleware::log_requests))
}

/// `GET /health`: the process is up and serving.
async fn health() -> &'static str {
    "OK"
}

async fn unrecognized() -> Error {
    Error::Unrecognized
}

async fn method_not_allowed() -> Error {
    Error::MethodNotAllowed
}
