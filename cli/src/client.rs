//! The connection to containerd: a gRPC channel over its Unix socket and the
//! `containerd-namespace` metadata header every request carries.

use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::services::v1::{
    containers_client::ContainersClient, content_client::ContentClient,
    images_client::ImagesClient, tasks_client::TasksClient,
};
use containerd_client::tonic::metadata::{Ascii, MetadataValue};
use containerd_client::tonic::transport::Channel;
use containerd_client::tonic::{Code, Request, Status};

/// Name of the gRPC metadata header containerd reads the namespace from.
pub const NAMESPACE_HEADER: &str = "containerd-namespace";

/// A connected containerd client bound to one namespace.
pub struct Containerd {
    client: containerd_client::Client,
    namespace: String,
    namespace_header: MetadataValue<Ascii>,
}

impl Containerd {
    /// Connects to containerd's socket at `address` for `namespace`.
    pub async fn connect(address: &Path, namespace: &str) -> Result<Containerd> {
        let namespace_header = MetadataValue::try_from(namespace)
            .with_context(|| format!("invalid namespace {namespace:?}"))?;
        if !address.exists() {
            anyhow::bail!(
                "containerd socket {} does not exist (is containerd running? set --address or CONTAINERD_ADDRESS)",
                address.display()
            );
        }
        let client = containerd_client::Client::from_path(address)
            .await
            .with_context(|| format!("cannot connect to containerd at {}", address.display()))?;
        Ok(Containerd {
            client,
            namespace: namespace.to_string(),
            namespace_header,
        })
    }

    /// The namespace requests are made in.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// Wraps `msg` in a request carrying the namespace header.
    pub fn request<T>(&self, msg: T) -> Request<T> {
        let mut req = Request::new(msg);
        req.metadata_mut()
            .insert(NAMESPACE_HEADER, self.namespace_header.clone());
        req
    }

    /// The Tasks service.
    pub fn tasks(&self) -> TasksClient<Channel> {
        self.client.tasks()
    }

    /// The Containers service.
    pub fn containers(&self) -> ContainersClient<Channel> {
        self.client.containers()
    }

    /// The Images service.
    pub fn images(&self) -> ImagesClient<Channel> {
        self.client.images()
    }

    /// The Content service.
    pub fn content(&self) -> ContentClient<Channel> {
        // Checkpoint blobs can be large; lift tonic's 4 MiB decode limit.
        self.client.content().max_decoding_message_size(usize::MAX)
    }

    /// The Snapshots service.
    pub fn snapshots(&self) -> SnapshotsClient<Channel> {
        self.client.snapshots()
    }
}

/// A gRPC error from containerd, shown as `code: message` (tonic's own
/// `Display` adds metadata and details a user does not need).
#[derive(Debug)]
pub struct GrpcError {
    /// The method that failed, e.g. `Tasks.Checkpoint`.
    pub method: &'static str,
    /// The gRPC status code.
    pub code: Code,
    /// containerd's message.
    pub message: String,
}

impl fmt::Display for GrpcError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "containerd {} returned {:?}", self.method, self.code)?;
        if !self.message.is_empty() {
            write!(f, ": {}", self.message)?;
        }
        Ok(())
    }
}

impl std::error::Error for GrpcError {}

/// Converts a tonic status from `method` into an error with a readable message.
pub fn grpc(method: &'static str) -> impl FnOnce(Status) -> anyhow::Error {
    move |status| {
        anyhow::Error::new(GrpcError {
            method,
            code: status.code(),
            message: status.message().to_string(),
        })
    }
}

/// Makes `path` absolute against the current directory (the shim runs
/// elsewhere, so containerd must get absolute paths).
pub fn absolute(path: &Path) -> Result<PathBuf> {
    std::path::absolute(path).with_context(|| format!("cannot make {} absolute", path.display()))
}

/// Fetches container `id`; a missing container is an error that says so.
pub async fn get_container(
    cd: &Containerd,
    id: &str,
) -> Result<containerd_client::services::v1::Container> {
    use containerd_client::services::v1::GetContainerRequest;
    let resp = cd
        .containers()
        .get(cd.request(GetContainerRequest { id: id.to_string() }))
        .await;
    match resp {
        Ok(r) => r
            .into_inner()
            .container
            .with_context(|| format!("containerd returned no record for container {id}")),
        Err(s) if s.code() == Code::NotFound => anyhow::bail!(
            "container {id} does not exist in namespace {}",
            cd.namespace()
        ),
        Err(s) => Err(grpc("Containers.Get")(s)),
    }
}

/// The state of container `id`'s task, or `None` when it has no task.
pub async fn get_task(
    cd: &Containerd,
    id: &str,
) -> Result<Option<containerd_client::types::v1::Process>> {
    use containerd_client::services::v1::GetRequest;
    let resp = cd
        .tasks()
        .get(cd.request(GetRequest {
            container_id: id.to_string(),
            exec_id: String::new(),
        }))
        .await;
    match resp {
        Ok(r) => Ok(r.into_inner().process),
        Err(s) if s.code() == Code::NotFound => Ok(None),
        Err(s) => Err(grpc("Tasks.Get")(s)),
    }
}

/// Lower-case name of a task status, as `ctr task ls` shows it.
pub fn status_name(status: i32) -> &'static str {
    use containerd_client::types::v1::Status;
    match Status::try_from(status) {
        Ok(Status::Created) => "created",
        Ok(Status::Running) => "running",
        Ok(Status::Stopped) => "stopped",
        Ok(Status::Paused) => "paused",
        Ok(Status::Pausing) => "pausing",
        Ok(Status::Unknown) | Err(_) => "unknown",
    }
}

/// Deletes container `id`'s (stopped) task, the container and its snapshot,
/// as `ctr containers delete` does. What is already gone is not an error.
pub async fn remove_stopped_container(cd: &Containerd, id: &str) -> Result<()> {
    use containerd_client::services::v1::snapshots::RemoveSnapshotRequest;
    use containerd_client::services::v1::{DeleteContainerRequest, DeleteTaskRequest};
    let c = get_container(cd, id).await?;
    match cd
        .tasks()
        .delete(cd.request(DeleteTaskRequest {
            container_id: id.to_string(),
        }))
        .await
    {
        Ok(_) => {}
        Err(s) if s.code() == Code::NotFound => {}
        Err(s) => return Err(grpc("Tasks.Delete")(s)),
    }
    match cd
        .containers()
        .delete(cd.request(DeleteContainerRequest { id: id.to_string() }))
        .await
    {
        Ok(_) => {}
        Err(s) if s.code() == Code::NotFound => {}
        Err(s) => return Err(grpc("Containers.Delete")(s)),
    }
    if !c.snapshot_key.is_empty() {
        match cd
            .snapshots()
            .remove(cd.request(RemoveSnapshotRequest {
                snapshotter: c.snapshotter.clone(),
                key: c.snapshot_key.clone(),
            }))
            .await
        {
            Ok(_) => {}
            Err(s) if s.code() == Code::NotFound => {}
            Err(s) => return Err(grpc("Snapshots.Remove")(s)),
        }
    }
    Ok(())
}
