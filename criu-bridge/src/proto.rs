//! Rust types for CRIU's own message definitions, generated at build time
//! (see `build.rs`) from the vendored `proto/rpc.proto` and
//! `proto/stats.proto` of CRIU 4.2.1: `rpc` for the RPC protocol
//! (`criu swrk`), `stats` for the `stats-dump` and `stats-restore` images.

include!(concat!(env!("OUT_DIR"), "/criu_proto/mod.rs"));
