//! gangway: an edge reverse proxy for Docker Compose stacks.
//!
//! The library takes a validated [`config::Config`] and a bound listener; the `gangway`
//! binary reads files, sets up logging and maps errors to exit codes.
#![forbid(unsafe_code)]

pub mod acme;
pub mod admin;
pub mod config;
pub mod deadline;
pub mod demo;
pub mod load;
pub mod proxy;
pub mod server;
pub mod tls;
pub mod upstream;
