//! Integration tests over real HTTP against a real PostgreSQL. See common.rs for the harness.

mod activity;
mod agent_platform;
mod attacks;
mod binary;
mod browser;
mod common;
mod compat;
mod cors;
mod deploy;
mod e2e;
mod fetch;
mod fuzz;
mod graceful;
mod openapi;
#[path = "../shared/ports.rs"]
mod ports;
mod push;
mod registry;
mod s3;
mod sweep;
mod uploads;
/// The bench's counting proxy in front of PostgreSQL (round trips on the wire).
#[allow(dead_code)]
#[path = "../../benches/suite/wire.rs"]
mod wire;
