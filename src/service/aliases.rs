//! Resolving room aliases of any server: ours from the directory, another server's by asking it
//! (`GET /_matrix/federation/v1/query/directory`).

use std::sync::Arc;

use ruma::{OwnedRoomId, OwnedServerName, RoomAliasId, api::federation::query::get_room_information};

use crate::{
    error::{Error, Result},
    federation::{FederationError, client::FederationClient},
    service::rooms::Rooms,
};

pub struct Aliases {
    rooms: Arc<Rooms>,
    client: Arc<FederationClient>,
    is_federation_enabled: bool,
}

impl Aliases {
    pub fn new(rooms: Arc<Rooms>, client: Arc<FederationClient>, is_federation_enabled: bool) -> Aliases {
        Aliases { rooms, client, is_federation_enabled }
    }

    /// The room an alias names and servers likely to be in it.
    pub async fn resolve(&self, alias: &RoomAliasId) -> Result<(OwnedRoomId, Vec<OwnedServerName>)> {
        if alias.server_name() == self.rooms.server_name() {
            let (room_id, servers) = self.rooms.resolve_alias(alias).await?;
            return Ok((room_id, servers.into_iter().filter_map(|server| server.try_into().ok()).collect()));
        }
        if !self.is_federation_enabled {
            return Err(Error::forbidden("Federation is disabled on this server"));
        }
        let request = get_room_information::v1::Request::new(alias.to_owned());
        match self.client.send(alias.server_name(), request).await {
            Ok(response) => Ok((response.room_id, response.servers)),
            Err(FederationError::Remote { status: 404, .. }) => Err(Error::not_found("Room alias not found")),
            Err(err) => Err(err.into()),
        }
    }
}
