//! niix: exchange of non-intrusive inspection (NII) scans between scanners,
//! image analysts and partner customs administrations.
//!
//! The path of a scan through this crate is one straight line:
//! [`ingest`] (gRPC push, validation) -> [`store`] (SQLite + blobs) ->
//! [`analysis`] (the queue, and the `niix_inference` tensor core) ->
//! [`findings`] (what officers query). [`server`] wires the services
//! together; [`cli`] is the `niix` command line; [`web`] is the officer
//! console in the browser.
//!
//! Modules form layers that import only downwards, with no import circle
//! (checked by `scripts/layers.py` in `make test`): domain types ([`limits`],
//! [`digest`], [`scope`], [`material`]) -> the store ([`store`], [`audit`], [`error`]) ->
//! what services share ([`header`], [`events`], [`plane`], [`overlay`]) ->
//! the services -> the edges. See docs/architecture.md.

pub mod adjudication;
pub mod analysis;
pub mod audit;
pub mod auth;
pub mod cli;
pub mod client;
pub mod config;
pub mod conn;
pub mod digest;
pub mod error;
pub mod events;
pub mod exchange;
pub mod findings;
pub mod header;
pub mod health;
pub mod ingest;
pub mod iso6346;
pub mod limits;
pub mod material;
pub mod metrics;
pub mod model_choice;
pub mod oip;
pub mod overlay;
pub mod plane;
pub mod reflection;
pub mod scope;
pub mod server;
pub mod store;
pub mod tdr;
pub mod web;
