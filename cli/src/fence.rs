//! `ms2m fence`: the cutover of a leave-running checkpoint's source. Asks
//! the container's shim (Tasks.Update with an ms2m fence request, which
//! only ms2m's shim understands) to hold its AMQP tap's deliveries, wait
//! for the app's acks, and write into the checkpoint directory how many
//! results the source published since that checkpoint's cut
//! (`ms2m-fence.json`). A later `ms2m restore` of that directory
//! suppresses exactly those publishes. With `--kill`, the source is then
//! killed and reaped.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use containerd_client::services::v1::{KillRequest, UpdateTaskRequest, WaitRequest};
use containerd_client::tonic::Code;
use criu_bridge::manifest::{FenceRequest, FENCE_FILE, FENCE_REQUEST_TYPE_URL};
use serde::Serialize;

use crate::client::{absolute, grpc, Containerd};

/// How long `--kill` waits for the source to stop.
const KILL_WAIT: Duration = Duration::from_secs(10);

/// Arguments of `ms2m fence`.
#[derive(Debug, Args)]
pub struct FenceArgs {
    /// The checkpoint directory of the container's newest leave-running
    /// checkpoint (the fence is written there).
    #[arg(long, value_name = "DIR")]
    pub image_path: PathBuf,
    /// Kill the container's task (SIGKILL) once fenced, and wait for it.
    #[arg(long)]
    pub kill: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// The source container.
    #[arg(value_name = "ID")]
    pub id: String,
}

/// What a fence did, as printed.
#[derive(Debug, Serialize)]
pub struct FenceReport {
    /// The container.
    pub container_id: String,
    /// The checkpoint directory.
    pub image_path: String,
    /// The fence the shim wrote (`ms2m-fence.json`).
    pub fence: serde_json::Value,
    /// The task was killed and has stopped.
    pub killed: bool,
    /// Wall time of the whole command after connecting, ms.
    pub total_ms: f64,
}

/// Runs `ms2m fence`.
pub async fn run(cd: &Containerd, args: &FenceArgs) -> Result<FenceReport> {
    let t0 = Instant::now();
    let dir = absolute(&args.image_path)?;
    let body = serde_json::to_vec(&FenceRequest {
        image_path: dir.display().to_string(),
    })?;
    let resources = prost_types::Any {
        type_url: FENCE_REQUEST_TYPE_URL.to_string(),
        value: body,
    };
    cd.tasks()
        .update(cd.request(UpdateTaskRequest {
            container_id: args.id.clone(),
            resources: Some(resources),
            annotations: Default::default(),
        }))
        .await
        .map_err(grpc("Tasks.Update (fence)"))?;
    let file = dir.join(FENCE_FILE);
    let text = std::fs::read_to_string(&file).with_context(|| {
        format!(
            "the shim reported the fence written, but {} is not readable",
            file.display()
        )
    })?;
    let fence: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", file.display()))?;
    if args.kill {
        kill_and_wait(cd, &args.id, true).await?;
    }
    Ok(FenceReport {
        container_id: args.id.clone(),
        image_path: dir.display().to_string(),
        fence,
        killed: args.kill,
        total_ms: t0.elapsed().as_secs_f64() * 1000.0,
    })
}

/// SIGKILL to the task's processes (`all`: every process in its cgroup;
/// else its init, which ends its PID namespace), then waits (bounded) until
/// it stopped.
pub async fn kill_and_wait(cd: &Containerd, id: &str, all: bool) -> Result<()> {
    const SIGKILL: u32 = 9;
    match cd
        .tasks()
        .kill(cd.request(KillRequest {
            container_id: id.to_string(),
            exec_id: String::new(),
            signal: SIGKILL,
            all,
        }))
        .await
    {
        Ok(_) => {}
        Err(s) if s.code() == Code::NotFound => return Ok(()),
        Err(s) => return Err(grpc("Tasks.Kill")(s)),
    }
    let mut tasks = cd.tasks();
    let wait = tasks.wait(cd.request(WaitRequest {
        container_id: id.to_string(),
        exec_id: String::new(),
    }));
    match tokio::time::timeout(KILL_WAIT, wait).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(s)) if s.code() == Code::NotFound => Ok(()),
        Ok(Err(s)) => Err(grpc("Tasks.Wait")(s)),
        Err(_) => anyhow::bail!(
            "the killed task did not stop within {}s",
            KILL_WAIT.as_secs()
        ),
    }
}
