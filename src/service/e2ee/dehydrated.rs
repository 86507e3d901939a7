//! Dehydrated devices (MSC3814, `/_matrix/client/unstable/org.matrix.msc3814.v1/…`): a device
//! whose encrypted account pickle the server keeps, so other users' clients can send it room
//! keys while all of its user's devices are offline; a new device of the user later fetches its
//! to-device messages and takes over. At most one per user. The device has no access token.

use std::collections::BTreeMap;

use ruma::{DeviceId, OwnedDeviceId, UserId};
use serde_json::{Value, json, value::RawValue};

use super::E2ee;
use crate::{
    error::{Error, Result},
    storage::e2e::DehydratedDevice,
};

/// To-device messages per `/dehydrated_device/{id}/events` answer.
const EVENTS_PER_PAGE: i64 = 100;

/// What a new dehydrated device comes with.
pub struct NewDehydratedDevice<'a> {
    pub device_id: &'a DeviceId,
    pub display_name: Option<&'a str>,
    pub device_data: &'a RawValue,
    pub device_keys: &'a RawValue,
    pub one_time_keys: &'a BTreeMap<String, Box<RawValue>>,
    pub fallback_keys: &'a BTreeMap<String, Box<RawValue>>,
}

impl E2ee {
    /// `PUT …/dehydrated_device`: replaces the user's dehydrated device (the old one, its keys
    /// and its messages go) with a new device holding these keys.
    pub async fn put_dehydrated_device(&self, user: &UserId, new: NewDehydratedDevice<'_>) -> Result<OwnedDeviceId> {
        let data: Value =
            serde_json::from_str(new.device_data.get()).map_err(|err| Error::BadJson(format!("device_data: {err}")))?;
        if !data.get("algorithm").is_some_and(Value::is_string) {
            return Err(Error::BadJson("device_data.algorithm must be a string".to_owned()));
        }
        let previous = self.db.dehydrated_device(user).await?;
        let is_previous = previous.as_ref().is_some_and(|p| p.device_id == new.device_id.as_str());
        if !is_previous && self.db.device(user, new.device_id).await?.is_some() {
            return Err(Error::InvalidParam("A device with this ID already exists".to_owned()));
        }
        if let Some(previous) = previous {
            let id = OwnedDeviceId::from(previous.device_id);
            self.users.remove_devices_without_auth(user, std::slice::from_ref(&id)).await?;
        }
        self.users.create_tokenless_device(user, new.device_id, new.display_name).await?;
        let uploaded =
            self.upload_keys(user, new.device_id, Some(new.device_keys), new.one_time_keys, new.fallback_keys).await;
        if let Err(err) = uploaded {
            // Keys that do not check out leave no half-made device behind.
            self.users.remove_devices_without_auth(user, &[new.device_id.to_owned()]).await?;
            return Err(err);
        }
        let device = DehydratedDevice { device_id: new.device_id.to_string(), device_data: data.to_string() };
        self.db.set_dehydrated_device(user, &device).await?;
        Ok(new.device_id.to_owned())
    }

    /// `GET …/dehydrated_device`: (device ID, device data).
    pub async fn dehydrated_device(&self, user: &UserId) -> Result<(OwnedDeviceId, Value)> {
        let device = self.db.dehydrated_device(user).await?.ok_or_else(|| Error::not_found("No dehydrated device"))?;
        let data = serde_json::from_str(&device.device_data).unwrap_or_default();
        Ok((OwnedDeviceId::from(device.device_id), data))
    }

    /// `DELETE …/dehydrated_device`: the device and everything it held.
    pub async fn delete_dehydrated_device(&self, user: &UserId) -> Result<OwnedDeviceId> {
        let device = self.db.dehydrated_device(user).await?.ok_or_else(|| Error::not_found("No dehydrated device"))?;
        let id = OwnedDeviceId::from(device.device_id);
        self.users.remove_devices_without_auth(user, std::slice::from_ref(&id)).await?;
        Ok(id)
    }

    /// `POST …/dehydrated_device/{deviceId}/events`: the dehydrated device's to-device messages
    /// after `next_batch` (the previous answer's, which confirms and deletes what it delivered),
    /// a page at a time. Returns the events and the token for the next page.
    pub async fn dehydrated_events(
        &self,
        user: &UserId,
        device_id: &DeviceId,
        next_batch: Option<&str>,
    ) -> Result<(Vec<Value>, String)> {
        let device = self.db.dehydrated_device(user).await?.ok_or_else(|| Error::not_found("No dehydrated device"))?;
        if device.device_id != device_id.as_str() {
            return Err(Error::forbidden("This is not the user's dehydrated device"));
        }
        let after = match next_batch {
            Some(token) => {
                token.parse::<i64>().map_err(|_| Error::InvalidParam("next_batch is not a token".to_owned()))?
            }
            None => 0,
        };
        if after > 0 {
            self.db.delete_to_device_upto(user, device_id.as_str(), after).await?;
        }
        let upto = self.streams.position();
        let messages = self.db.to_device_since(user, device_id.as_str(), after, upto, EVENTS_PER_PAGE).await?;
        let next = messages.last().map_or(after.max(0), |m| m.stream_pos);
        let events = messages
            .into_iter()
            .map(|m| {
                let content: Value = serde_json::from_str(&m.content).unwrap_or_else(|_| json!({}));
                json!({"type": m.event_type, "sender": m.sender, "content": content})
            })
            .collect();
        Ok((events, next.to_string()))
    }
}
