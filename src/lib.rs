//! lotecache: a caching reverse proxy that serves saved batch results from a verified
//! on-disk store. README.md is the manual; docs/architecture.md maps these modules.
//!
//! The modules depend one way, top to bottom (`tests/layering.rs` keeps it so):
//! the commands and the server; the configuration that builds every module's settings; the
//! admin API; the request service (`proxy`); the route rules; the cache (its fills, shared and
//! local stores, verified reads); the origin client and its connection pool; and the leaves
//! (headers, clock, file fingerprints, framing, bodies, errors, metrics).

pub mod access_log;
pub mod admin;
pub mod body;
pub mod cache;
pub mod cachectl;
pub mod clock;
pub mod config;
pub mod demo;
pub mod error;
pub mod fingerprint;
pub mod framing;
pub mod headers;
pub mod log_escape;
pub mod logging;
pub mod metrics;
pub mod origin;
pub mod pool;
pub mod proxy;
pub mod rules;
pub mod sample_origin;
pub mod sendfile;
pub mod server;

pub use config::Config;
pub use server::RunningProxy;
