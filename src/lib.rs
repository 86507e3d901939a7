//! Hearth, a Matrix homeserver.
//!
//! Layers depend one way: `api → service → federation → storage → matrix`; only [`app`] wires them together.
//! See `ARCHITECTURE.md` for the map.

pub mod api;
pub mod app;
pub mod config;
pub mod error;
pub mod federation;
pub mod matrix;
pub mod service;
pub mod storage;
