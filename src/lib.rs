//! lotecache: a caching reverse proxy that serves saved batch results from a verified
//! on-disk store. See README.md for the request path and the guarantees.

pub mod access_log;
pub mod admin;
pub mod body;
pub mod cache;
pub mod cachectl;
pub mod config;
pub mod error;
pub mod log_escape;
pub mod metrics;
pub mod origin;
pub mod proxy;
pub mod rules;
pub mod sample_origin;
pub mod sendfile;
pub mod server;
pub mod strict;
pub mod upstream;
pub mod worker_cpu;

pub use config::Config;
pub use server::RunningProxy;
