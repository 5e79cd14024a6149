//! The task API's Update: a container's resources (`runc update`), and
//! two ms2m operations that travel as an Update whose resources carry
//! their own type URL, because containerd's task API has no call for them:
//! - `ms2m fence` ([`criu_bridge::manifest::FENCE_REQUEST_TYPE_URL`]): the
//!   source's fence after a leave-running checkpoint;
//! - `ms2m migrate` ([`criu_bridge::manifest::MIGRATE_REQUEST_TYPE_URL`],
//!   `ms2m.io/migrate.v1`): the source's part of a live migration (check,
//!   start, cutover, abort).
//!
//! Both take the container's operation lock, so no checkpoint moves the
//! broker cut or releases the tap's hold meanwhile; the tap work itself is
//! in [`crate::broker`].

use std::path::Path;

use containerd_shim_protos::api;
use tracing::Instrument;

use super::Inner;
use crate::broker;
use crate::config::TAP_UPSTREAM_ANNOTATION;
use crate::error::{Error, Result};

impl Inner {
    pub(super) async fn update(&self, req: api::UpdateTaskRequest) -> Result<()> {
        if let Some(any) = req.resources.as_ref() {
            if any.type_url == criu_bridge::manifest::FENCE_REQUEST_TYPE_URL {
                return self.fence(&req.id, &any.value).await;
            }
            if any.type_url == criu_bridge::manifest::MIGRATE_REQUEST_TYPE_URL {
                return self.migrate(&req.id, &any.value).await;
            }
        }
        let runc = self.state.lock().await.get(&req.id)?.runc.clone();
        let resources = req
            .resources
            .as_ref()
            .map(|a| a.value.clone())
            .filter(|v| !v.is_empty())
            .ok_or_else(|| {
                Error::InvalidArgument(format!("update of container {}: no resources", req.id))
            })?;
        runc.update(&req.id, resources).await
    }

    /// `ms2m fence`: the task `Update` whose resources are a
    /// [`criu_bridge::manifest::FenceRequest`] (see [`crate::broker::fence`]).
    async fn fence(&self, id: &str, body: &[u8]) -> Result<()> {
        let req: criu_bridge::manifest::FenceRequest =
            serde_json::from_slice(body).map_err(|e| {
                Error::InvalidArgument(format!("fence of container {id}: bad request: {e}"))
            })?;
        // No checkpoint may move the cut or release the hold meanwhile.
        let op = self.op_lock(id).await?;
        let _op = op.lock().await;
        let (tap, config) = self.tap_of(id, "fence").await?;
        let file = broker::fence(id, &tap, &config, Path::new(&req.image_path)).await?;
        if let Ok(c) = self.state.lock().await.get_mut(id) {
            c.fence_file = Some(file);
        }
        Ok(())
    }

    /// `ms2m migrate`, the source's part: the task `Update` whose resources
    /// are a [`criu_bridge::manifest::MigrateRequest`] (see
    /// [`crate::broker::migrate_start`] and docs/migration.md).
    async fn migrate(&self, id: &str, body: &[u8]) -> Result<()> {
        use criu_bridge::manifest::MigrateRequest;
        let req: MigrateRequest = serde_json::from_slice(body).map_err(|e| {
            Error::InvalidArgument(format!("migration of container {id}: bad request: {e}"))
        })?;
        // No checkpoint may move the cut or release the hold meanwhile.
        let op = self.op_lock(id).await?;
        let _op = op.lock().await;
        let (tap, config) = self.tap_of(id, "migration").await?;
        let op_name = match &req {
            MigrateRequest::Check { .. } => "check",
            MigrateRequest::Start { .. } => "start",
            MigrateRequest::Cutover { .. } => "cutover",
            MigrateRequest::Abort { .. } => "abort",
        };
        let span = tracing::info_span!("migrate", id, op = op_name);
        let t0 = std::time::Instant::now();
        let r = async {
            match req {
                MigrateRequest::Check { migration_id } => {
                    // Classic queues move through the mirror, armed now so
                    // that it copies from the coming checkpoint's cut on.
                    let classic = tap.prepare_mirror(&migration_id).await.map_err(|e| {
                        Error::FailedPrecondition(format!(
                            "migration {migration_id} of container {id}: {e}. The container \
                             keeps running."
                        ))
                    })?;
                    if !classic.is_empty() {
                        tracing::info!(id, migration_id, queues = ?classic, "classic-queue mirror armed");
                    }
                    Ok(())
                }
                MigrateRequest::Start {
                    migration_id,
                    image_path,
                } => {
                    let link =
                        broker::migrate_start(id, &tap, Path::new(&image_path), &migration_id)
                            .await?;
                    let mut st = self.state.lock().await;
                    st.get_mut(id)?.migration = Some(link);
                    Ok(())
                }
                MigrateRequest::Cutover {
                    migration_id,
                    timeout_ms,
                } => {
                    let link = self.take_migration(id, &migration_id).await?;
                    let timeout = std::time::Duration::from_millis(timeout_ms).min(
                        config
                            .quiesce_timeout
                            .max(std::time::Duration::from_secs(10)),
                    );
                    let r = link.fence(timeout).await;
                    // Kept either way: an abort after a failed or a
                    // successful fence releases through it.
                    self.state.lock().await.get_mut(id)?.migration = Some(link);
                    r.map(|_| ()).map_err(|e| {
                        Error::FailedPrecondition(format!(
                            "migration {migration_id} of container {id}: fence: {e}"
                        ))
                    })
                }
                MigrateRequest::Abort {
                    migration_id,
                    reason,
                } => {
                    let started = self.state.lock().await.get(id)?.migration.is_some();
                    if !started && tap.mirror_status().migration_id.as_deref() == Some(&migration_id)
                    {
                        // Aborted between `check` and `start`: only the
                        // mirror was armed.
                        tap.disarm_mirror();
                        return Ok(());
                    }
                    let link = self.take_migration(id, &migration_id).await?;
                    link.abort(&reason).await;
                    Ok(())
                }
            }
        }
        .instrument(span)
        .await;
        tracing::info!(
            id,
            op = op_name,
            ok = r.is_ok(),
            elapsed_ms = t0.elapsed().as_secs_f64() * 1000.0,
            "migrate done"
        );
        r
    }

    /// The container's running tap and its configuration; `what` (the
    /// operation) names the error when it has none.
    async fn tap_of(&self, id: &str, what: &str) -> Result<(ms2m_tap::Tap, ms2m_tap::TapConfig)> {
        let st = self.state.lock().await;
        let c = st.get(id)?;
        match (c.tap.clone(), c.tap_config.clone()) {
            (Some(t), Some(tc)) => Ok((t, tc)),
            _ => Err(Error::FailedPrecondition(format!(
                "{what} of container {id}: it has no AMQP tap ({})",
                TAP_UPSTREAM_ANNOTATION
            ))),
        }
    }

    /// The container's migration link, checked against `migration_id`.
    async fn take_migration(&self, id: &str, migration_id: &str) -> Result<ms2m_tap::SourceLink> {
        let mut st = self.state.lock().await;
        let c = st.get_mut(id)?;
        match c.migration.take() {
            Some(l) if l.ticket().migration_id == migration_id => Ok(l),
            Some(l) => {
                let other = l.ticket().migration_id.clone();
                c.migration = Some(l);
                Err(Error::FailedPrecondition(format!(
                    "container {id} is the source of migration {other}, not {migration_id}"
                )))
            }
            None => Err(Error::FailedPrecondition(format!(
                "container {id} is not the source of migration {migration_id} (no `start`)"
            ))),
        }
    }
}
