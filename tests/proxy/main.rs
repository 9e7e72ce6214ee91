//! Integration tests: real servers on 127.0.0.1 ephemeral ports, one module per behaviour
//! family, one binary (one link) for all of them.

mod support;

mod access;
mod cli;
mod compression;
mod fault_model;
mod faults;
mod hardening;
mod index_load;
mod integrity;
mod miss_hit;
mod observability;
mod operations;
mod passthrough;
mod range;
mod routing;
mod security;
mod shared_store;
mod single_flight;
mod warm;
