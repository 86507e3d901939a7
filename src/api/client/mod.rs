//! Client-Server API endpoints, one file per spec section.

pub mod account;
pub mod account_data;
pub mod backup;
pub mod capabilities;
pub mod dehydrated;
pub mod devices;
pub mod directory;
pub mod discovery;
pub mod keys;
pub mod media;
pub mod membership;
pub mod message;
pub mod presence;
pub mod profile;
pub mod push;
pub mod receipts;
pub mod registration;
pub mod relations;
pub mod room;
pub mod search;
pub mod session;
pub mod state;
pub mod sync;
pub mod to_device;
pub mod typing;
