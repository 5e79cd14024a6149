//! The shim's lifecycle as containerd drives it (the containerd-shim
//! crate's `Shim` trait): `start` spawns the shim server (one per CRI pod,
//! else one per container), `delete` cleans up after a dead shim, and the
//! server runs the task service until it is told to exit.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use containerd_shim::asynchronous::{spawn, ExitSignal, Shim};
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::util::{read_options, write_str_to_file};
use containerd_shim::{Config, DeleteResponse, Error, Flags, StartOpts};
use containerd_shim_protos::protobuf::MessageField;

use crate::container::{runc_root, unmount};
use crate::exits::ExitHub;
use crate::logging;
use crate::process::to_timestamp;
use crate::runc::Runc;
use crate::service::Service;

/// The annotation CRI puts on every container of a pod.
const SANDBOX_ID_ANNOTATION: &str = "io.kubernetes.cri.sandbox-id";

/// The shim: what containerd starts and stops.
pub struct Ms2mShim {
    exit: Arc<ExitSignal>,
    id: String,
    namespace: String,
    bundle: PathBuf,
}

/// The key shim servers are grouped by: the CRI sandbox of the container
/// when the spec names one, else the container itself.
pub fn grouping(spec_json: Option<&[u8]>, id: &str) -> String {
    spec_json
        .and_then(|s| serde_json::from_slice::<serde_json::Value>(s).ok())
        .and_then(|v| {
            v.get("annotations")?
                .get(SANDBOX_ID_ANNOTATION)?
                .as_str()
                .map(str::to_string)
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| id.to_string())
}

#[async_trait]
impl Shim for Ms2mShim {
    type T = Service;

    async fn new(_runtime_id: &str, args: &Flags, config: &mut Config) -> Self {
        config.no_setup_logger = true;
        if args.action.is_empty() {
            logging::init_server(args.debug);
        } else {
            logging::init_stderr();
        }
        let bundle = if args.bundle.is_empty() {
            std::env::current_dir().unwrap_or_default()
        } else {
            PathBuf::from(&args.bundle)
        };
        Ms2mShim {
            exit: Arc::new(ExitSignal::default()),
            id: args.id.clone(),
            namespace: args.namespace.clone(),
            bundle,
        }
    }

    async fn start_shim(&mut self, opts: StartOpts) -> Result<String, Error> {
        let spec = std::fs::read(self.bundle.join("config.json")).ok();
        let group = grouping(spec.as_deref(), &opts.id);
        let address = spawn(opts, &group, Vec::new()).await?;
        write_str_to_file("address", &address).await?;
        Ok(address)
    }

    async fn delete_shim(&mut self) -> Result<DeleteResponse, Error> {
        ExitHub::start(None)
            .await
            .map_err(|e| Error::Other(e.to_string()))?;
        let options = read_options(&self.bundle).await?;
        let runc = Runc::new(
            &options.binary_name,
            &runc_root(&options, &self.namespace),
            &self.bundle,
            options.systemd_cgroup,
        );
        if let Err(e) = runc.delete(&self.id, true).await {
            tracing::warn!(id = %self.id, "cleanup after the shim: {e}");
        }
        unmount(&self.bundle.join("rootfs"));
        Ok(DeleteResponse {
            exited_at: MessageField::some(to_timestamp(SystemTime::now())),
            exit_status: 128 + libc::SIGKILL as u32,
            ..Default::default()
        })
    }

    async fn wait(&mut self) {
        self.exit.wait().await;
    }

    async fn create_task_service(&self, publisher: RemotePublisher) -> Service {
        crate::inflight::watch_signals();
        Service::new(publisher, &self.namespace, self.exit.clone()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_by_sandbox() {
        let pod = br#"{"annotations":{"io.kubernetes.cri.sandbox-id":"sb1"}}"#;
        assert_eq!(grouping(Some(pod), "c1"), "sb1");
        assert_eq!(grouping(Some(b"{}"), "c1"), "c1");
        assert_eq!(grouping(Some(b"not json"), "c1"), "c1");
        assert_eq!(grouping(None, "c1"), "c1");
    }
}
