//! `containerd-shim-ms2m-v1`: the ms2m containerd runtime shim (runtime type
//! `io.containerd.ms2m.v1`). It implements containerd's task API by driving
//! runc, with checkpoint and restore through CRIU.
//!
//! Module map:
//! - [`shim`]: start/delete/serve, as containerd drives a shim binary.
//! - [`service`]: the task API (one method per RPC, a file per group of
//!   calls) and task events.
//! - [`container`], [`process`]: container and process state, status
//!   transitions, exit status and waiters.
//! - [`exits`]: routing of reaped child exits (runc commands vs. container
//!   processes), exits that arrive before their pid is known.
//! - [`runc`]: the runc command driver.
//! - [`stdio`]: FIFOs, pipes and pty between containerd and a process.
//! - [`checkpoint`], [`restore`], [`criu_conf`], [`criu_log`]: the CRIU
//!   paths (strategy choice, direct CRIU dumps through criu-bridge or `runc
//!   checkpoint`, `runc restore` with lazy pages), the CRIU configuration
//!   file runc hands to CRIU, and CRIU's error lines in our errors.
//! - [`frozen_window`]: hooks run while the container is frozen.
//! - [`after_checkpoint`]: whether a tap keeps holding deliveries after a
//!   leave-running checkpoint (`io.ms2m.tap.after-checkpoint`).
//! - [`source_cgroups`]: the source's cgroups, recorded at checkpoint and
//!   stood in for at a restore under a new id.
//! - [`broker`]: the per-container AMQP tap (crate `ms2m-tap`): started at
//!   create and restore, quiesced and cut at checkpoint.
//! - [`inflight`]: dumps in flight; SIGTERM/SIGINT aborts them and thaws.
//! - [`config`]: the shim's TOML configuration and per-container
//!   annotations.
//! - [`options`]: containerd's option messages (protobuf `Any`) decoded.
//! - [`netns`]: brings `lo` up in a restored container.
//! - [`oom`]: cgroup v1 OOM events.
//! - [`logging`]: tracing to containerd's shim log FIFO.
//! - [`error`]: errors and their ttrpc codes.
//!
//! Dependencies run one way: `service` → `container` → `checkpoint` /
//! `restore` → `broker`, `config` → `options` (the whole map is in
//! docs/architecture.md).

mod after_checkpoint;
mod broker;
mod checkpoint;
mod config;
mod container;
mod criu_conf;
mod criu_log;
mod error;
mod exits;
mod frozen_window;
mod inflight;
mod logging;
mod netns;
mod oom;
mod options;
mod process;
mod restore;
mod runc;
mod service;
mod shim;
mod source_cgroups;
mod stdio;

/// The runtime type containerd knows this shim by.
pub const RUNTIME_ID: &str = "io.containerd.ms2m.v1";

/// The shim binary's name.
pub const SHIM_BINARY: &str = "containerd-shim-ms2m-v1";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args
        .iter()
        .any(|a| a == "-v" || a == "-version" || a == "--version")
    {
        println!("{SHIM_BINARY}:");
        println!("  Version:  {}", env!("CARGO_PKG_VERSION"));
        println!("  Runtime:  {RUNTIME_ID}");
        return;
    }
    // One thread: the shim is mostly idle, and its reaper, runc commands
    // and copies all fit on one; it keeps the shim's memory small.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{SHIM_BINARY}: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    let config = containerd_shim::Config {
        no_setup_logger: true,
        ..Default::default()
    };
    runtime.block_on(containerd_shim::asynchronous::run::<shim::Ms2mShim>(
        RUNTIME_ID,
        Some(config),
    ));
}
