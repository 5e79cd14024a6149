//! `criu-bridge`: what ms2m knows about CRIU, kept apart from the shim.
//!
//! - [`manifest`]: the versioned ms2m checkpoint manifest written beside
//!   CRIU's images (`ms2m-manifest.json`).
//! - [`stats`]: CRIU's dump and restore statistics (`stats-dump`,
//!   `stats-restore`), decoded from CRIU's image format.
//! - [`criu`]: facts about the installed CRIU binary (its version).
//! - [`rpc`]: a client for CRIU's RPC protocol (`criu swrk`): dump,
//!   pre-dump, restore, page server, feature check, with notification
//!   callbacks and the frozen-window (`post-dump`) hook.
//! - [`features`]: what this kernel and CRIU can do (detected once).
//! - [`strategy`]: which checkpoint strategy to use, and why.
//! - [`container`]: dumping a runc container directly (restorable by
//!   `runc restore`), with the options that shorten its freeze.
//! - [`config`]: CRIU configuration files (runc hands them to CRIU through
//!   the `org.criu.config` annotation) and the choices behind them, such as
//!   whether a network lock is needed at all.
//! - [`netlock`]: CRIU's network lock left in a container's network
//!   namespace by a CRIU that died mid-dump, found and removed.
//!
//! The shim uses this crate on its checkpoint and restore paths; the `ms2m`
//! CLI uses it to show what a checkpoint contains.

pub mod config;
pub mod container;
pub mod criu;
mod error;
pub mod features;
pub mod manifest;
pub mod netlock;
mod proto;
pub mod rpc;
pub mod stats;
pub mod strategy;

pub use error::Error;
