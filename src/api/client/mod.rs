//! Client-Server API endpoints, one file per spec section.

pub mod account;
pub mod capabilities;
pub mod devices;
pub mod discovery;
pub mod profile;
pub mod registration;
pub mod session;
