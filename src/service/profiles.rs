//! Profiles of any user: local ones from the accounts, remote ones asked of their server over
//! federation (`GET /_matrix/federation/v1/query/profile`), and the answer we give other servers
//! about our own users.

use std::sync::Arc;

use ruma::{
    OwnedServerName, UserId, api::federation::query::get_profile_information, profile::ProfileFieldName,
    profile::UserProfile,
};
use serde_json::Value;

use crate::{
    error::{Error, Result},
    federation::{FederationError, client::FederationClient},
    service::users::Users,
};

pub struct Profiles {
    users: Arc<Users>,
    client: Arc<FederationClient>,
    server_name: OwnedServerName,
    is_federation_enabled: bool,
}

impl Profiles {
    pub fn new(users: Arc<Users>, client: Arc<FederationClient>, is_federation_enabled: bool) -> Profiles {
        let server_name = client.server_name().to_owned();
        Profiles { users, client, server_name, is_federation_enabled }
    }

    /// The profile of a local user, or only its `field` when one is named.
    pub async fn local(&self, user_id: &UserId, field: Option<&ProfileFieldName>) -> Result<UserProfile> {
        if user_id.server_name() != self.server_name {
            return Err(Error::not_found("User is not on this server"));
        }
        let user = self.users.profile(user_id).await?;
        let mut profile = UserProfile::new();
        for (name, value) in [("displayname", user.displayname), ("avatar_url", user.avatar_url)] {
            if let Some(value) = value
                && field.is_none_or(|field| field.as_str() == name)
            {
                profile.set(name.to_owned(), Value::String(value));
            }
        }
        Ok(profile)
    }

    /// Any user's profile (or one field of it): a remote user's comes from their server.
    pub async fn profile(&self, user_id: &UserId, field: Option<&ProfileFieldName>) -> Result<UserProfile> {
        if user_id.server_name() == self.server_name {
            return self.local(user_id, field).await;
        }
        if !self.is_federation_enabled {
            return Err(Error::forbidden("Federation is disabled on this server"));
        }
        let mut request = get_profile_information::v1::Request::new(user_id.to_owned());
        request.field = field.cloned();
        match self.client.send(user_id.server_name(), request).await {
            Ok(response) => Ok(response.data),
            // Their "no such user" is ours too; any other failure of theirs is a gateway error.
            Err(FederationError::Remote { status: 404, .. }) => Err(Error::not_found("Profile not found")),
            Err(err) => Err(err.into()),
        }
    }
}
