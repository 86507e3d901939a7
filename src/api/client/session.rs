//! Login, token refresh and logout (spec "Client Authentication").

use std::sync::Arc;

use axum::extract::State;
use ruma::api::client::{
    session::{get_login_types, login, logout, logout_all, refresh_token},
    uiaa::UserIdentifier,
};

use crate::{
    api::{
        ServerInfo,
        extract::{ClientIp, GuestOrUser, Ruma},
        respond::ApiResult,
    },
    error::Error,
    service::users::Users,
};

/// `GET /_matrix/client/v3/login`
pub async fn login_types(Ruma(_): Ruma<get_login_types::v3::Request>) -> ApiResult<get_login_types::v3::Response> {
    let password = get_login_types::v3::LoginType::Password(get_login_types::v3::PasswordLoginType::new());
    Ok(get_login_types::v3::Response::new(vec![password]).into())
}

/// `POST /_matrix/client/v3/login`
#[allow(deprecated)] // `user` is the pre-r0.4 way to name the account; old clients still send it.
pub async fn login(
    State(users): State<Arc<Users>>,
    State(info): State<Arc<ServerInfo>>,
    ClientIp(ip): ClientIp,
    Ruma(req): Ruma<login::v3::Request>,
) -> ApiResult<login::v3::Response> {
    let login::v3::LoginInfo::Password(password) = &req.login_info else {
        return Err(Error::Unknown("Unknown login type; this server offers m.login.password".to_owned()));
    };
    let identifier = match (&password.identifier, &password.user) {
        (Some(UserIdentifier::Matrix(id)), _) => id.user.as_str(),
        (Some(_), _) => return Err(Error::forbidden("Only m.id.user identifiers are supported")),
        (None, Some(user)) => user.as_str(),
        (None, None) => return Err(Error::MissingParam("identifier is required".to_owned())),
    };
    let session = users
        .login_with_password(
            identifier,
            &password.password,
            req.device_id.clone(),
            req.initial_device_display_name.as_deref(),
            req.refresh_token,
            ip,
        )
        .await?;
    let mut response = login::v3::Response::new(session.user_id, session.access_token, session.device_id);
    response.home_server = Some(info.server_name.clone());
    response.well_known = Some(login::v3::DiscoveryInfo::new(login::v3::HomeserverInfo::new(
        info.public_baseurl.trim_end_matches('/').to_owned(),
    )));
    response.refresh_token = session.refresh_token;
    response.expires_in = session.expires_in;
    Ok(response.into())
}

/// `POST /_matrix/client/v3/refresh`
pub async fn refresh(
    State(users): State<Arc<Users>>,
    Ruma(req): Ruma<refresh_token::v3::Request>,
) -> ApiResult<refresh_token::v3::Response> {
    let session = users.refresh(&req.refresh_token).await?;
    let mut response = refresh_token::v3::Response::new(session.access_token);
    response.refresh_token = session.refresh_token;
    response.expires_in_ms = session.expires_in;
    Ok(response.into())
}

/// `POST /_matrix/client/v3/logout`
pub async fn logout(
    State(users): State<Arc<Users>>,
    GuestOrUser(authed): GuestOrUser,
    Ruma(_): Ruma<logout::v3::Request>,
) -> ApiResult<logout::v3::Response> {
    users.logout(&authed).await?;
    Ok(logout::v3::Response::new().into())
}

/// `POST /_matrix/client/v3/logout/all`
pub async fn logout_all(
    State(users): State<Arc<Users>>,
    GuestOrUser(authed): GuestOrUser,
    Ruma(_): Ruma<logout_all::v3::Request>,
) -> ApiResult<logout_all::v3::Response> {
    users.logout_all(&authed.user_id).await?;
    Ok(logout_all::v3::Response::new().into())
}
