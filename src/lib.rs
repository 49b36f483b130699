//! pgmux: a PostgreSQL connection pooler.
//!
//! Follow a query through the crate: [`client`] reads it from the app, [`pool`] lends a
//! server connection for the transaction, [`server`] owns that connection, and
//! [`protocol`] frames every message on the way.

// Nothing from a client, a server or a config file may panic pgmux: no indexing, slicing,
// unwrap or expect outside tests. Where an index is bounded by construction, the `allow`
// next to it says why.
#![cfg_attr(
    not(test),
    deny(
        clippy::indexing_slicing,
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::string_slice
    )
)]

pub mod admin;
pub mod auth;
pub mod cancel;
pub mod client;
pub mod clients;
pub mod config;
pub mod drain;
#[doc(hidden)]
pub mod fuzz;
pub mod listener;
pub mod logging;
pub mod notify;
pub mod pool;
pub mod pooler;
pub mod prepared;
pub mod protocol;
pub mod sd_notify;
pub mod server;
pub mod stats;
pub mod upgrade;
pub mod workers;
