//! `criu-bridge`: what ms2m knows about CRIU, kept apart from the shim.
//!
//! - [`manifest`]: the versioned ms2m checkpoint manifest written beside
//!   CRIU's images (`ms2m-manifest.json`).
//! - [`stats`]: CRIU's dump and restore statistics (`stats-dump`,
//!   `stats-restore`), decoded from CRIU's image format.
//! - [`criu`]: facts about the installed CRIU binary (its version).
//! - [`config`]: CRIU configuration files (runc hands them to CRIU through
//!   the `org.criu.config` annotation) and the choices behind them, such as
//!   whether a network lock is needed at all.
//!
//! The shim uses this crate on its checkpoint and restore paths; the `ms2m`
//! CLI uses it to show what a checkpoint contains.

pub mod config;
pub mod criu;
mod error;
pub mod manifest;
mod protobuf;
pub mod stats;

pub use error::Error;
