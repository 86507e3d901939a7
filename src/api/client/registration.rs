//! Account registration: `POST /register`, `GET /register/available` and registration-token
//! validity.

use std::sync::Arc;

use axum::extract::State;
use ruma::api::client::account::{
    check_registration_token_validity, get_username_availability, register, register::RegistrationKind,
};

use crate::{
    api::{
        extract::{ClientIp, Ruma},
        respond::ApiResult,
    },
    service::users::{Registered, Registration, Users},
};

/// `POST /_matrix/client/v3/register`
pub async fn register(
    State(users): State<Arc<Users>>,
    ClientIp(ip): ClientIp,
    Ruma(req): Ruma<register::v3::Request>,
) -> ApiResult<register::v3::Response> {
    let registration = Registration {
        username: req.username,
        password: req.password,
        device_id: req.device_id,
        initial_device_display_name: req.initial_device_display_name,
        inhibit_login: req.inhibit_login,
        refresh_token: req.refresh_token,
        is_guest: req.kind == RegistrationKind::Guest,
        auth: req.auth,
    };
    let response = match users.register(registration, ip).await? {
        Registered::AccountOnly(user_id) => register::v3::Response::new(user_id),
        Registered::LoggedIn(session) => {
            let mut response = register::v3::Response::new(session.user_id);
            response.access_token = Some(session.access_token);
            response.device_id = Some(session.device_id);
            response.refresh_token = session.refresh_token;
            response.expires_in = session.expires_in;
            response
        }
    };
    Ok(response.into())
}

/// `GET /_matrix/client/v3/register/available`
pub async fn available(
    State(users): State<Arc<Users>>,
    Ruma(req): Ruma<get_username_availability::v3::Request>,
) -> ApiResult<get_username_availability::v3::Response> {
    users.check_username_available(&req.username).await?;
    Ok(get_username_availability::v3::Response::new(true).into())
}

/// `GET /_matrix/client/v1/register/m.login.registration_token/validity`
pub async fn token_validity(
    State(users): State<Arc<Users>>,
    Ruma(req): Ruma<check_registration_token_validity::v1::Request>,
) -> ApiResult<check_registration_token_validity::v1::Response> {
    let valid = users.registration_token_is_valid(&req.token).await?;
    Ok(check_registration_token_validity::v1::Response::new(valid).into())
}
