//! A CRI client for the tests: containerd's CRI API (`runtime.v1`, what the
//! kubelet speaks) over containerd's unix socket, generated from the vendored
//! `proto/cri/api.proto` (crictl cannot be built on this machine; see
//! docs/kubernetes.md). Blocking calls on a small tokio runtime of their own,
//! each bounded by [`crate::CMD_TIMEOUT`], returning the gRPC status on
//! failure so that tests can check containerd's messages.
//!
//! [`cri_env`] checks the CRI prerequisites loudly (containerd serving CRI,
//! the `ms2m` handler, the sandbox and test images in the CRI namespace, the
//! loopback registry a CRI restore pulls the base image from). [`Pod`] is a
//! host-network pod sandbox that is stopped and removed on drop (with its
//! containers).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use tonic::transport::{Channel, Endpoint};

/// The generated CRI types and clients.
#[allow(clippy::all, missing_docs)]
pub mod api {
    tonic::include_proto!("runtime.v1");
}

use api::image_service_client::ImageServiceClient;
use api::runtime_service_client::RuntimeServiceClient;

/// The runtime handler ms2m's containerd config registers.
pub const HANDLER: &str = "ms2m";
/// CRI's container states, as the API numbers them.
pub const CONTAINER_CREATED: i32 = api::ContainerState::ContainerCreated as i32;
pub const CONTAINER_RUNNING: i32 = api::ContainerState::ContainerRunning as i32;
pub const CONTAINER_EXITED: i32 = api::ContainerState::ContainerExited as i32;

/// What the CRI tests run against (the variables of `hack/lib.sh`).
#[derive(Debug, Clone)]
pub struct CriEnv {
    /// containerd's socket (host A's unless `MS2M_CRI_ADDRESS` names another).
    pub address: String,
    /// The CRI namespace in containerd (`k8s.io`), for `ctr` look-ups.
    pub namespace: String,
    /// The test image under the loopback registry's name.
    pub image: String,
    /// The sandbox image containerd is configured with.
    pub sandbox_image: String,
    /// The loopback registry (`host:port`).
    pub registry: String,
}

fn var(name: &str, default: &str) -> String {
    std::env::var(name)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| default.to_string())
}

impl CriEnv {
    fn from_env() -> CriEnv {
        let registry = var("MS2M_CRI_REGISTRY", "127.0.0.1:5111");
        CriEnv {
            address: var(
                "MS2M_CRI_ADDRESS",
                &var(
                    "MS2M_CONTAINERD_ADDRESS",
                    "/run/ms2m/containerd/containerd.sock",
                ),
            ),
            namespace: var("MS2M_CRI_NAMESPACE", "k8s.io"),
            image: var(
                "MS2M_CRI_TEST_IMAGE",
                &format!("{registry}/ms2m/ms2m-test:latest"),
            ),
            sandbox_image: var(
                "MS2M_CRI_SANDBOX_IMAGE",
                &format!("{registry}/ms2m/pause:1"),
            ),
            registry,
        }
    }
}

const CRI_HINT: &str = "run `sudo hack/setup.sh` (hack/cri-setup.sh: containerd with CRI on, \
the sandbox and test images in the CRI namespace, the loopback registry)";

/// The checked CRI environment: the first call checks every CRI
/// prerequisite (after the general ones of [`crate::env`]) and panics with
/// the complete list of what is missing.
pub fn cri_env() -> &'static CriEnv {
    static ENV: OnceLock<CriEnv> = OnceLock::new();
    ENV.get_or_init(|| {
        crate::env();
        let env = CriEnv::from_env();
        let mut missing = Vec::new();
        match Cri::connect(&env.address) {
            Err(e) => missing.push(format!("cannot connect to {}: {e}", env.address)),
            Ok(cri) => {
                match cri.version() {
                    Ok(v) => eprintln!(
                        "ms2m CRI tests: {} {} (CRI {}) at {}",
                        v.runtime_name, v.runtime_version, v.runtime_api_version, env.address
                    ),
                    Err(e) => missing.push(format!(
                        "containerd at {} does not serve CRI ({}): its config must enable the \
                         CRI plugins",
                        env.address,
                        e.message()
                    )),
                }
                if missing.is_empty() {
                    match cri.runtime_handlers() {
                        Ok(h) if h.iter().any(|n| n == HANDLER) => {}
                        Ok(h) => missing.push(format!(
                            "containerd has no CRI runtime handler {HANDLER:?} (it has {h:?})"
                        )),
                        Err(e) => missing.push(format!("CRI Status failed: {}", e.message())),
                    }
                    for img in [&env.image, &env.sandbox_image] {
                        match cri.image_present(img) {
                            Ok(true) => {}
                            Ok(false) => missing.push(format!(
                                "image {img} is not in containerd's CRI namespace {}",
                                env.namespace
                            )),
                            Err(e) => missing
                                .push(format!("CRI ImageStatus {img} failed: {}", e.message())),
                        }
                    }
                }
            }
        }
        if let Err(e) = registry_answers(&env.registry) {
            missing.push(format!(
                "the loopback registry http://{}/v2/ does not answer ({e}); a CRI restore \
                 pulls the checkpoint's base image from it",
                env.registry
            ));
        }
        if !missing.is_empty() {
            panic!(
                "ms2m CRI test prerequisites are missing:\n  - {}\nTo fix: {CRI_HINT}.",
                missing.join("\n  - ")
            );
        }
        env
    })
}

/// `GET /v2/` on the registry: `Ok` on HTTP 200.
fn registry_answers(registry: &str) -> Result<(), String> {
    use std::io::{Read, Write};
    let addr: std::net::SocketAddr = registry
        .parse()
        .map_err(|e| format!("bad address {registry}: {e}"))?;
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(|e| e.to_string())?;
    write!(
        s,
        "GET /v2/ HTTP/1.0\r\nHost: {registry}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head).map_err(|e| e.to_string())?;
    let head = String::from_utf8_lossy(&head);
    if head.ends_with(" 200") {
        Ok(())
    } else {
        Err(format!("answered {head:?}"))
    }
}

/// A CRI connection (RuntimeService and ImageService).
pub struct Cri {
    rt: tokio::runtime::Runtime,
    runtime: RuntimeServiceClient<Channel>,
    images: ImageServiceClient<Channel>,
}

/// A CRI call's result: the reply, or containerd's gRPC status.
pub type CriResult<T> = Result<T, tonic::Status>;

impl Cri {
    /// Connects to containerd's socket at `address`.
    pub fn connect(address: &str) -> Result<Cri, String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("tokio runtime: {e}"))?;
        let path = PathBuf::from(address);
        let channel = rt
            .block_on(async move {
                // The URI is a placeholder: the connector dials the socket.
                Endpoint::try_from("http://[::]:50051")?
                    .connect_with_connector(tower::service_fn(move |_| {
                        let path = path.clone();
                        async move {
                            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                                tokio::net::UnixStream::connect(path).await?,
                            ))
                        }
                    }))
                    .await
            })
            .map_err(|e| format!("connecting to {address}: {e}"))?;
        Ok(Cri {
            rt,
            runtime: RuntimeServiceClient::new(channel.clone()),
            images: ImageServiceClient::new(channel),
        })
    }

    /// Connects to the checked environment's containerd (panics on failure).
    pub fn new() -> Arc<Cri> {
        let env = cri_env();
        Arc::new(Cri::connect(&env.address).unwrap_or_else(|e| panic!("{e}")))
    }

    fn call<T, F>(&self, f: F) -> CriResult<T>
    where
        F: std::future::Future<Output = CriResult<tonic::Response<T>>>,
    {
        self.rt.block_on(async {
            match tokio::time::timeout(crate::CMD_TIMEOUT, f).await {
                Ok(r) => r.map(tonic::Response::into_inner),
                Err(_) => Err(tonic::Status::deadline_exceeded(format!(
                    "no answer within {:?}",
                    crate::CMD_TIMEOUT
                ))),
            }
        })
    }

    pub fn version(&self) -> CriResult<api::VersionResponse> {
        let mut c = self.runtime.clone();
        self.call(c.version(api::VersionRequest::default()))
    }

    /// The runtime handlers CRI reports (`Status` with `verbose`).
    pub fn runtime_handlers(&self) -> CriResult<Vec<String>> {
        let mut c = self.runtime.clone();
        let st = self.call(c.status(api::StatusRequest { verbose: false }))?;
        Ok(st.runtime_handlers.into_iter().map(|h| h.name).collect())
    }

    /// Whether containerd's CRI image service knows `image`.
    pub fn image_present(&self, image: &str) -> CriResult<bool> {
        let mut c = self.images.clone();
        let st = self.call(c.image_status(api::ImageStatusRequest {
            image: Some(image_spec(image)),
            verbose: false,
        }))?;
        Ok(st.image.is_some())
    }

    pub fn run_pod(&self, config: &api::PodSandboxConfig, handler: &str) -> CriResult<String> {
        let mut c = self.runtime.clone();
        self.call(c.run_pod_sandbox(api::RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: handler.to_string(),
        }))
        .map(|r| r.pod_sandbox_id)
    }

    pub fn pod_status(&self, id: &str) -> CriResult<api::PodSandboxStatus> {
        let mut c = self.runtime.clone();
        self.call(c.pod_sandbox_status(api::PodSandboxStatusRequest {
            pod_sandbox_id: id.to_string(),
            verbose: false,
        }))
        .and_then(|r| {
            r.status
                .ok_or_else(|| tonic::Status::not_found(format!("pod {id}: no status")))
        })
    }

    pub fn stop_pod(&self, id: &str) -> CriResult<()> {
        let mut c = self.runtime.clone();
        self.call(c.stop_pod_sandbox(api::StopPodSandboxRequest {
            pod_sandbox_id: id.to_string(),
        }))
        .map(drop)
    }

    pub fn remove_pod(&self, id: &str) -> CriResult<()> {
        let mut c = self.runtime.clone();
        self.call(c.remove_pod_sandbox(api::RemovePodSandboxRequest {
            pod_sandbox_id: id.to_string(),
        }))
        .map(drop)
    }

    pub fn create_container(
        &self,
        pod_id: &str,
        config: &api::ContainerConfig,
        pod_config: &api::PodSandboxConfig,
    ) -> CriResult<String> {
        let mut c = self.runtime.clone();
        self.call(c.create_container(api::CreateContainerRequest {
            pod_sandbox_id: pod_id.to_string(),
            config: Some(config.clone()),
            sandbox_config: Some(pod_config.clone()),
        }))
        .map(|r| r.container_id)
    }

    pub fn start_container(&self, id: &str) -> CriResult<()> {
        let mut c = self.runtime.clone();
        self.call(c.start_container(api::StartContainerRequest {
            container_id: id.to_string(),
        }))
        .map(drop)
    }

    pub fn stop_container(&self, id: &str, timeout_s: i64) -> CriResult<()> {
        let mut c = self.runtime.clone();
        self.call(c.stop_container(api::StopContainerRequest {
            container_id: id.to_string(),
            timeout: timeout_s,
        }))
        .map(drop)
    }

    pub fn remove_container(&self, id: &str) -> CriResult<()> {
        let mut c = self.runtime.clone();
        self.call(c.remove_container(api::RemoveContainerRequest {
            container_id: id.to_string(),
        }))
        .map(drop)
    }

    pub fn container_status(&self, id: &str) -> CriResult<api::ContainerStatus> {
        let mut c = self.runtime.clone();
        self.call(c.container_status(api::ContainerStatusRequest {
            container_id: id.to_string(),
            verbose: false,
        }))
        .and_then(|r| {
            r.status
                .ok_or_else(|| tonic::Status::not_found(format!("container {id}: no status")))
        })
    }

    /// The container's state (`CONTAINER_RUNNING`, ...).
    pub fn container_state(&self, id: &str) -> CriResult<i32> {
        self.container_status(id).map(|s| s.state)
    }

    pub fn exec_sync(
        &self,
        id: &str,
        cmd: &[&str],
        timeout_s: i64,
    ) -> CriResult<api::ExecSyncResponse> {
        let mut c = self.runtime.clone();
        self.call(c.exec_sync(api::ExecSyncRequest {
            container_id: id.to_string(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            timeout: timeout_s,
        }))
    }

    /// `CheckpointContainer`: what the kubelet's checkpoint API calls; the
    /// archive lands at `location`.
    pub fn checkpoint(&self, id: &str, location: &Path, timeout_s: i64) -> CriResult<()> {
        let mut c = self.runtime.clone();
        self.call(c.checkpoint_container(api::CheckpointContainerRequest {
            container_id: id.to_string(),
            location: location.display().to_string(),
            timeout: timeout_s,
        }))
        .map(drop)
    }
}

pub fn image_spec(image: &str) -> api::ImageSpec {
    api::ImageSpec {
        image: image.to_string(),
        ..Default::default()
    }
}

/// A host-network pod's sandbox config: no CNI plugin is needed (the
/// sandbox and its containers share the host's network namespace).
pub fn pod_config(name: &str, log_dir: &Path) -> api::PodSandboxConfig {
    let uid = crate::unique_id(name);
    api::PodSandboxConfig {
        metadata: Some(api::PodSandboxMetadata {
            name: name.to_string(),
            uid: uid.clone(),
            namespace: "ms2m-tests".to_string(),
            attempt: 0,
        }),
        hostname: String::new(),
        log_directory: log_dir.display().to_string(),
        linux: Some(api::LinuxPodSandboxConfig {
            security_context: Some(api::LinuxSandboxSecurityContext {
                namespace_options: Some(host_network()),
                ..Default::default()
            }),
            ..Default::default()
        }),
        labels: HashMap::from([("ms2m-test".to_string(), uid)]),
        ..Default::default()
    }
}

fn host_network() -> api::NamespaceOption {
    api::NamespaceOption {
        network: api::NamespaceMode::Node as i32,
        pid: api::NamespaceMode::Container as i32,
        ipc: api::NamespaceMode::Pod as i32,
        ..Default::default()
    }
}

/// What a test container runs: image, command, environment, annotations,
/// bind mounts (host path, container path, read-only).
#[derive(Debug, Clone, Default)]
pub struct ContainerSpec {
    pub name: String,
    pub image: String,
    pub command: Vec<String>,
    pub env: Vec<(String, String)>,
    pub annotations: Vec<(String, String)>,
    pub mounts: Vec<(String, String, bool)>,
}

impl ContainerSpec {
    /// `command` in the CRI test image.
    pub fn new(name: &str, command: &[&str]) -> ContainerSpec {
        ContainerSpec {
            name: name.to_string(),
            image: cri_env().image.clone(),
            command: command.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    /// memcounter with `mib` MiB resident, counting every `interval_ms`.
    pub fn memcounter(name: &str, mib: u64, interval_ms: u64) -> ContainerSpec {
        ContainerSpec::new(
            name,
            &[
                crate::MEMCOUNTER,
                "--mib",
                &mib.to_string(),
                "--interval-ms",
                &interval_ms.to_string(),
            ],
        )
    }

    pub fn env(mut self, k: &str, v: &str) -> ContainerSpec {
        self.env.push((k.to_string(), v.to_string()));
        self
    }

    pub fn annotation(mut self, k: &str, v: &str) -> ContainerSpec {
        self.annotations.push((k.to_string(), v.to_string()));
        self
    }

    pub fn mount_ro(mut self, host: &str, container: &str) -> ContainerSpec {
        self.mounts
            .push((host.to_string(), container.to_string(), true));
        self
    }

    /// The CRI config; its log goes to `<pod log dir>/<name>.log`.
    pub fn config(&self) -> api::ContainerConfig {
        api::ContainerConfig {
            metadata: Some(api::ContainerMetadata {
                name: self.name.clone(),
                attempt: 0,
            }),
            image: Some(image_spec(&self.image)),
            command: self.command.clone(),
            envs: self
                .env
                .iter()
                .map(|(k, v)| api::KeyValue {
                    key: k.clone(),
                    value: v.clone(),
                })
                .collect(),
            annotations: self.annotations.iter().cloned().collect(),
            mounts: self
                .mounts
                .iter()
                .map(|(h, c, ro)| api::Mount {
                    host_path: h.clone(),
                    container_path: c.clone(),
                    readonly: *ro,
                    ..Default::default()
                })
                .collect(),
            log_path: format!("{}.log", self.name),
            linux: Some(api::LinuxContainerConfig {
                security_context: Some(api::LinuxContainerSecurityContext {
                    namespace_options: Some(host_network()),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }
}

/// A pod sandbox run under a handler; stopped and removed (with its
/// containers) on drop.
pub struct Pod {
    pub cri: Arc<Cri>,
    pub id: String,
    pub config: api::PodSandboxConfig,
    pub log_dir: PathBuf,
}

impl Pod {
    /// Runs a host-network pod named `name` under `handler`, its logs in
    /// `log_dir`; panics with containerd's message on failure.
    pub fn run(cri: &Arc<Cri>, name: &str, handler: &str, log_dir: &Path) -> Pod {
        let config = pod_config(name, log_dir);
        let id = cri
            .run_pod(&config, handler)
            .unwrap_or_else(|e| panic!("RunPodSandbox {name} (handler {handler}): {e:?}"));
        Pod {
            cri: cri.clone(),
            id,
            config,
            log_dir: log_dir.to_path_buf(),
        }
    }

    /// CreateContainer with `spec`: the container id, or containerd's status.
    pub fn try_create(&self, spec: &ContainerSpec) -> CriResult<String> {
        self.cri
            .create_container(&self.id, &spec.config(), &self.config)
    }

    /// CreateContainer and StartContainer; panics on failure.
    pub fn start(&self, spec: &ContainerSpec) -> String {
        let id = self
            .try_create(spec)
            .unwrap_or_else(|e| panic!("CreateContainer {}: {e:?}", spec.name));
        self.cri
            .start_container(&id)
            .unwrap_or_else(|e| panic!("StartContainer {} ({id}): {e:?}", spec.name));
        id
    }

    /// The log file of the container named `name` in this pod.
    pub fn log_path(&self, name: &str) -> PathBuf {
        self.log_dir.join(format!("{name}.log"))
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        if let Err(e) = self.cri.stop_pod(&self.id) {
            eprintln!("StopPodSandbox {}: {e:?}", self.id);
        }
        if let Err(e) = self.cri.remove_pod(&self.id) {
            eprintln!("RemovePodSandbox {}: {e:?}", self.id);
        }
    }
}

/// ExecSync `cat FILE` in container `id`: its stdout when the exec exits 0.
pub fn cat(cri: &Cri, id: &str, file: &str) -> Option<String> {
    let r = cri.exec_sync(id, &["cat", file], 10).ok()?;
    (r.exit_code == 0).then(|| String::from_utf8_lossy(&r.stdout).into_owned())
}

/// memcounter's counter through ExecSync (`None` until it is written).
pub fn counter(cri: &Cri, id: &str) -> Option<u64> {
    cat(cri, id, "/tmp/counter").and_then(|s| crate::parse_counter(&s))
}

/// Waits until memcounter's counter in `id` exceeds `above`; returns it.
pub fn wait_counter_above(cri: &Cri, id: &str, above: u64, timeout: Duration) -> u64 {
    crate::wait_until(
        &format!("the counter of CRI container {id} to exceed {above}"),
        timeout,
        Duration::from_millis(20),
        || counter(cri, id).filter(|c| *c > above),
    )
}

/// Waits until container `id` is in `state`; returns the elapsed time.
pub fn wait_state(cri: &Cri, id: &str, state: i32, timeout: Duration) -> Duration {
    let t0 = Instant::now();
    crate::wait_until(
        &format!("CRI container {id} to reach state {state}"),
        timeout,
        Duration::from_millis(10),
        || (cri.container_state(id).ok()? == state).then_some(()),
    );
    t0.elapsed()
}

/// The names of the entries of a tar archive (GNU tar).
pub fn tar_list(archive: &Path) -> Vec<String> {
    let out = crate::run_cmd(
        std::process::Command::new("tar").arg("-tf").arg(archive),
        crate::CMD_TIMEOUT,
    )
    .unwrap_or_else(|e| panic!("{e}"))
    .ok();
    out.stdout
        .lines()
        .map(|l| l.trim_start_matches("./").to_string())
        .collect()
}

/// One file of a tar archive (GNU tar; `./` prefixes tolerated).
pub fn tar_read(archive: &Path, name: &str) -> Option<String> {
    let entry = tar_list(archive)
        .into_iter()
        .find(|n| n == name)
        .map(|_| name.to_string())?;
    let with_dot = format!("./{entry}");
    for n in [entry.as_str(), with_dot.as_str()] {
        let out = crate::run_cmd(
            std::process::Command::new("tar")
                .arg("-xOf")
                .arg(archive)
                .arg(n),
            crate::CMD_TIMEOUT,
        )
        .ok()?;
        if out.success() {
            return Some(out.stdout);
        }
    }
    None
}

/// The ms2m manifest inside a CRI checkpoint archive: containerd puts the
/// shim's image directory under `checkpoint/`.
pub const ARCHIVE_MANIFEST: &str = "checkpoint/ms2m-manifest.json";

/// The archive's ms2m manifest as JSON (panics when it is missing).
pub fn archive_manifest(archive: &Path) -> serde_json::Value {
    let text = tar_read(archive, ARCHIVE_MANIFEST).unwrap_or_else(|| {
        panic!(
            "no {ARCHIVE_MANIFEST} in the CRI checkpoint archive {}; entries: {:?}",
            archive.display(),
            tar_list(archive)
        )
    });
    serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{ARCHIVE_MANIFEST} in {}: {e}", archive.display()))
}

/// The runtime (`io.containerd.ms2m.v1`, ...) containerd recorded for a CRI
/// container or sandbox, from `ctr containers info`.
pub fn runtime_of(id: &str) -> String {
    let env = cri_env();
    let out = crate::run_cmd(
        std::process::Command::new(&crate::env().ctr)
            .args(["--address", &env.address, "--namespace", &env.namespace])
            .args(["containers", "info", id]),
        crate::CMD_TIMEOUT,
    )
    .unwrap_or_else(|e| panic!("{e}"))
    .ok();
    let v: serde_json::Value = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("ctr containers info {id}: {e}: {}", out.stdout));
    v["Runtime"]["Name"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}
