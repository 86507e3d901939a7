//! API tests: the real `hearth` binary over real HTTP on loopback, once on SQLite and once on
//! PostgreSQL for every test written with `backend_tests!`.

mod harness;

mod account;
mod bad_input;
mod cli;
mod concurrency;
mod devices;
mod directory;
mod durability;
mod e2ee;
mod foundation;
mod login;
mod media;
mod media_s3;
mod membership;
mod messaging;
mod profile;
mod push;
mod rate_limits;
mod registration;
mod rooms;
mod scale;
mod sdk;
mod sdk_venv;
mod search;
mod slow_clients;
mod startup;
mod sync;
mod websocket;
