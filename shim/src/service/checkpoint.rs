//! The task API's Checkpoint: the container's state, checked and copied
//! under the state lock, goes to [`crate::checkpoint`], which does the
//! work; `TaskCheckpointed` is published when the manifest is written.
//! (A restore is no RPC of its own: it is the Start of a task created from
//! a checkpoint, see `lifecycle.rs`.)

use std::path::Path;

use containerd_shim_protos::api;
use containerd_shim_protos::events::task::TaskCheckpointed;

use super::Inner;
use crate::checkpoint;
use crate::error::Result;
use crate::options::parse_checkpoint_options;
use crate::process::check_checkpoint;

impl Inner {
    pub(super) async fn checkpoint(&self, req: api::CheckpointTaskRequest) -> Result<()> {
        let opts = parse_checkpoint_options(req.options.as_ref())?;
        let image_path = if req.path.is_empty() {
            opts.image_path.clone()
        } else {
            req.path.clone()
        };
        let op = self.op_lock(&req.id).await?;
        let _op = op.lock().await;
        let target = {
            let mut st = self.state.lock().await;
            let c = st.get_mut(&req.id)?;
            check_checkpoint(c.init.status, &c.describe(""))?;
            c.checkpoint_target(&self.namespace)
        };
        let manifest = checkpoint::checkpoint(&target, Path::new(&image_path), &opts).await?;
        tracing::info!(
            id = %req.id,
            image_path = %image_path,
            exit = opts.exit,
            strategy = %manifest.strategy.name,
            network_lock = %manifest.options.network_lock,
            frozen_ms = manifest.stats.as_ref().map(|s| s.frozen_time_us as f64 / 1000.0),
            hook_ms = manifest
                .extensions
                .get("frozen_window")
                .and_then(|f| f.get("hook_duration_ms"))
                .and_then(|v| v.as_f64()),
            dump_ms = manifest.timings.dump_ms,
            "checkpoint written"
        );
        self.publish(TaskCheckpointed {
            container_id: req.id.clone(),
            checkpoint: image_path,
            ..Default::default()
        })
        .await;
        Ok(())
    }
}
