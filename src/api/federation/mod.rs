//! Server-Server API endpoints. Only key publication exists so far; the rest arrives with
//! federation.

pub mod keys;
