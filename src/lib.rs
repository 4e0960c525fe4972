//! pending-uploads: stages chat file uploads for agent workspaces behind NAT.

pub mod agent;
pub mod api;
pub mod app;
pub mod arena;
pub mod auth;
pub mod backfill;
pub mod batch;
pub mod cli;
pub mod config;
pub mod contract;
pub mod db;
pub mod digest;
pub mod fetched;
pub mod http;
pub mod logfmt;
pub mod longpoll;
pub mod metrics;
pub mod multipart;
pub mod push_target;
pub mod retry;
pub mod sanitize;
pub mod slots;
pub mod spool;
pub mod staging;
pub mod storage;
pub mod sweep;
