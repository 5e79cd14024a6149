//! `ms2m`: checkpoint and restore containers through containerd's API.
//!
//! Works with any runtime that implements checkpoint and restore the way
//! containerd's runc shim does: ms2m's `io.containerd.ms2m.v1` or
//! `io.containerd.runc.v2`. It completes the flows `ctr` 2.1 cannot do: a
//! checkpoint with `--exit` or to an image path, then a restore from it.

mod agent;
mod checkpoint;
mod client;
mod fence;
mod inspect;
mod migrate;
mod options;
mod output;
mod restore;
mod transfer;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

use crate::client::Containerd;

/// Checkpoint and restore containers through containerd (any runtime).
#[derive(Debug, Parser)]
#[command(name = "ms2m", version, about)]
struct Cli {
    /// containerd's gRPC socket.
    #[arg(
        long,
        global = true,
        env = "CONTAINERD_ADDRESS",
        default_value = "/run/containerd/containerd.sock"
    )]
    address: PathBuf,
    /// containerd namespace.
    #[arg(
        long,
        global = true,
        env = "CONTAINERD_NAMESPACE",
        default_value = "default"
    )]
    namespace: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Checkpoint a container's task into an image directory and show the
    /// freeze statistics.
    Checkpoint(checkpoint::CheckpointArgs),
    /// Give an existing container a new task restored from a checkpoint
    /// directory or a checkpoint reference, and start it.
    Restore(restore::RestoreArgs),
    /// Show what a checkpoint directory holds (its ms2m manifest).
    Inspect(inspect::InspectArgs),
    /// Fence the source of a leave-running checkpoint (AMQP tap): hold its
    /// deliveries and record in the checkpoint directory what it published
    /// since the cut, for the restore to suppress.
    Fence(fence::FenceArgs),
    /// Move a running, tapped consumer to another containerd host while it
    /// keeps serving (live migration: checkpoint, transfer, shadow restore
    /// and catch-up, cutover at a fence, source stopped).
    Migrate(migrate::MigrateArgs),
    /// Receive migrated checkpoints over TCP and restore them on this
    /// containerd (the target side of a migration).
    Agent(agent::AgentArgs),
}

impl Command {
    fn json(&self) -> bool {
        match self {
            Command::Checkpoint(a) => a.json,
            Command::Restore(a) => a.json,
            Command::Inspect(a) => a.json,
            Command::Fence(a) => a.json,
            Command::Migrate(a) => a.json,
            Command::Agent(_) => false,
        }
    }

    /// What failed, for the first words of an error message.
    fn failure(&self) -> String {
        match self {
            Command::Checkpoint(a) => format!("checkpoint of container {} failed", a.id),
            Command::Restore(a) => {
                format!("restore of container {} from {} failed", a.id, a.from)
            }
            Command::Inspect(a) => format!("inspect of {} failed", a.dir.display()),
            Command::Fence(a) => format!("fence of container {} failed", a.id),
            Command::Migrate(a) => format!("migration of container {} to {} failed", a.id, a.to),
            Command::Agent(a) => format!("agent on {} failed", a.listen),
        }
    }
}

async fn run(cli: &Cli) -> Result<()> {
    let json = cli.command.json();
    match &cli.command {
        Command::Checkpoint(args) => {
            let cd = Containerd::connect(&cli.address, &cli.namespace).await?;
            let report = checkpoint::run(&cd, args).await?;
            if json {
                output::print_json(&report)?;
            } else {
                print!("{}", output::checkpoint_text(&report));
            }
        }
        Command::Restore(args) => {
            let cd = Containerd::connect(&cli.address, &cli.namespace).await?;
            let report = restore::run(&cd, args).await?;
            if json {
                output::print_json(&report)?;
            } else {
                print!("{}", output::restore_text(&report));
            }
        }
        Command::Fence(args) => {
            let cd = Containerd::connect(&cli.address, &cli.namespace).await?;
            let report = fence::run(&cd, args).await?;
            if json {
                output::print_json(&report)?;
            } else {
                print!("{}", output::fence_text(&report));
            }
        }
        Command::Migrate(args) => {
            let cd = Containerd::connect(&cli.address, &cli.namespace).await?;
            let report = migrate::run(&cd, args).await?;
            if json {
                output::print_json(&report)?;
            } else {
                print!("{}", migrate::text(&report));
            }
            if report.outcome != "migrated" && !json {
                anyhow::bail!("{}", report.error.clone().unwrap_or_default());
            }
        }
        Command::Agent(args) => {
            agent::run(&cli.address, &cli.namespace, args).await?;
        }
        Command::Inspect(args) => {
            let report = inspect::run(args)?;
            if json {
                output::print_json(&report)?;
            } else {
                print!("{}", output::inspect_text(&report));
            }
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ms2m: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(&cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            let message = format!("{}: {err:#}", cli.command.failure());
            eprintln!("ms2m: {message}");
            if cli.command.json() {
                let _ = output::print_json(&serde_json::json!({ "error": message }));
            }
            ExitCode::FAILURE
        }
    }
}
