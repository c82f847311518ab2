//! gangway: an edge reverse proxy for Docker Compose stacks.
#![forbid(unsafe_code)]

pub mod config;
