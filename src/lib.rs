//! pending-uploads: stages chat file uploads for agent workspaces behind NAT.

pub mod agent;
pub mod app;
pub mod auth;
pub mod backfill;
pub mod cli;
pub mod config;
pub mod db;
pub mod http;
pub mod metrics;
pub mod sanitize;
pub mod spool;
pub mod storage;
pub mod sweep;
