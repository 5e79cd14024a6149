//! The task service (containerd's task API v3 over ttrpc): one method per
//! RPC, each run inside a tracing span naming the operation and container,
//! with its duration logged at the end. Task events are published from
//! here; container and process state lives in [`crate::container`] and
//! [`crate::process`].

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::{Instant, SystemTime};

use async_trait::async_trait;
use containerd_shim::asynchronous::ExitSignal;
use containerd_shim::cgroup::{collect_metrics, get_cgroup};
use containerd_shim::event::Event;
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::util::convert_to_any;
use containerd_shim::{Task, TtrpcContext, TtrpcResult};
use containerd_shim_protos::api;
use containerd_shim_protos::events::task::{
    TaskCheckpointed, TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO,
    TaskOOM, TaskPaused, TaskResumed, TaskStart,
};
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::{Message, MessageField};
use containerd_shim_protos::shim::oci::ProcessDetails;
use containerd_shim_protos::ttrpc;
use tokio::sync::{mpsc, Mutex};
use tracing::Instrument;

use crate::checkpoint;
use crate::container::{self, console_socket_dir, read_pid, Container};
use crate::error::{Error, Result};
use crate::exits::{Exit, ExitHub, Unclaimed};
use crate::oom;
use crate::process::{check_checkpoint, check_pause_resume, to_timestamp, ExitInfo, Status};
use crate::restore;
use crate::runc::ProcessStdio;
use crate::stdio::{self, ConsoleSocket};

/// The ms2m task service.
#[derive(Clone)]
pub struct Service {
    inner: Arc<Inner>,
}

struct Inner {
    state: Mutex<State>,
    publisher: RemotePublisher,
    namespace: String,
    exit: Arc<ExitSignal>,
}

#[derive(Default)]
struct State {
    containers: HashMap<String, Container>,
    unclaimed: Unclaimed,
}

impl State {
    fn get(&self, id: &str) -> Result<&Container> {
        self.containers
            .get(id)
            .ok_or_else(|| Error::NotFound(format!("container {id} not found")))
    }

    fn get_mut(&mut self, id: &str) -> Result<&mut Container> {
        self.containers
            .get_mut(id)
            .ok_or_else(|| Error::NotFound(format!("container {id} not found")))
    }
}

impl Service {
    /// A service publishing events through `publisher` for `namespace`;
    /// `exit` is signalled when the shim should exit.
    pub async fn new(publisher: RemotePublisher, namespace: &str, exit: Arc<ExitSignal>) -> Self {
        let (tx, mut rx) = mpsc::unbounded_channel::<Exit>();
        if let Err(e) = ExitHub::start(Some(tx)).await {
            tracing::error!("{e}: exits will not be reported");
        }
        let inner = Arc::new(Inner {
            state: Mutex::new(State::default()),
            publisher,
            namespace: namespace.to_string(),
            exit,
        });
        let weak = Arc::downgrade(&inner);
        tokio::spawn(async move {
            while let Some(exit) = rx.recv().await {
                let Some(inner) = weak.upgrade() else { return };
                inner.on_exit(exit).await;
            }
        });
        Service { inner }
    }
}

/// Runs one task API operation inside a span and logs how it went.
async fn step<T, F>(
    op: &'static str,
    id: &str,
    exec_id: &str,
    quiet: bool,
    fut: F,
) -> TtrpcResult<T>
where
    F: Future<Output = Result<T>>,
{
    let span = tracing::info_span!("task", op, id, exec_id);
    let started = Instant::now();
    let result = fut.instrument(span.clone()).await;
    let elapsed_ms = (started.elapsed().as_secs_f64() * 1e6).round() / 1e3;
    let _entered = span.enter();
    match &result {
        Ok(_) if quiet => tracing::debug!(elapsed_ms, "{op} done"),
        Ok(_) => tracing::info!(elapsed_ms, "{op} done"),
        Err(Error::NotFound(e)) if quiet => tracing::debug!(elapsed_ms, "{op} failed: {e}"),
        Err(e) => tracing::warn!(elapsed_ms, "{op} failed: {e}"),
    }
    result.map_err(ttrpc::Error::from)
}

fn exit_event(cid: &str, exec_id: &str, pid: i32, info: ExitInfo) -> TaskExit {
    TaskExit {
        container_id: cid.to_string(),
        id: if exec_id.is_empty() {
            cid.to_string()
        } else {
            exec_id.to_string()
        },
        pid: pid.max(0) as u32,
        exit_status: info.status,
        exited_at: MessageField::some(info.timestamp()),
        ..Default::default()
    }
}

/// File names for an exec's process spec and pid file, unique per shim.
fn exec_files(bundle: &Path) -> (PathBuf, PathBuf) {
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    (
        bundle.join(format!("exec-{n}-process.json")),
        bundle.join(format!("exec-{n}.pid")),
    )
}

/// runc's way of saying the process is gone.
fn is_gone(e: &Error) -> bool {
    let s = e.to_string();
    s.contains("not running") || s.contains("does not exist") || s.contains("no such process")
}

impl Inner {
    async fn publish<M: Event + 'static>(&self, event: M) {
        let topic = event.topic();
        if let Err(e) = self
            .publisher
            .publish(
                ttrpc::context::with_timeout(0),
                &topic,
                &self.namespace,
                Box::new(event),
            )
            .await
        {
            tracing::warn!(topic = %topic, "publish event: {e}");
        }
    }

    /// An exit the reaper saw that no runc command claimed.
    async fn on_exit(&self, exit: Exit) {
        let event = {
            let mut st = self.state.lock().await;
            let mut event = None;
            for (cid, c) in st.containers.iter_mut() {
                let tap = c.tap.clone();
                if let Some(p) = c.process_by_pid_mut(exit.pid) {
                    if p.starting {
                        p.deferred_exit = Some(exit.status);
                        return;
                    }
                    let info = p.set_exited(exit.status);
                    tracing::info!(id = %cid, exec_id = %p.exec_id, pid = exit.pid, status = exit.status, "process exited");
                    if p.exec_id.is_empty() {
                        if let Some(tap) = &tap {
                            // A live migration's shadow tells the room at
                            // once instead of reporting for a dead app.
                            tap.container_exited();
                        }
                    }
                    event = Some(exit_event(cid, &p.exec_id, p.pid, info));
                    break;
                }
            }
            match event {
                Some(e) => e,
                None => {
                    st.unclaimed.insert(exit);
                    return;
                }
            }
        };
        self.publish(event).await;
    }

    fn watch_oom(self: &Arc<Self>, id: &str, pid: i32) -> Option<tokio::task::AbortHandle> {
        let weak: Weak<Inner> = Arc::downgrade(self);
        let cid = id.to_string();
        oom::watch(id, pid, move || {
            if let Some(inner) = weak.upgrade() {
                let cid = cid.clone();
                tokio::spawn(async move {
                    let ev = TaskOOM {
                        container_id: cid,
                        ..Default::default()
                    };
                    inner.publish(ev).await;
                });
            }
        })
    }

    async fn op_lock(&self, id: &str) -> Result<Arc<Mutex<()>>> {
        Ok(self.state.lock().await.get(id)?.op.clone())
    }

    async fn create(
        self: &Arc<Self>,
        req: api::CreateTaskRequest,
    ) -> Result<api::CreateTaskResponse> {
        if req.id.is_empty() {
            return Err(Error::InvalidArgument("container id is empty".into()));
        }
        if self.state.lock().await.containers.contains_key(&req.id) {
            return Err(Error::AlreadyExists(format!(
                "container {} already exists",
                req.id
            )));
        }
        let mut c = container::create(&req, &self.namespace).await?;
        // Detect the checkpoint features now, off the request path, so the
        // first checkpoint does not pay for it.
        let criu = c.config.criu_binary();
        tokio::task::spawn_blocking(move || {
            criu_bridge::features::Features::cached(&criu);
        });
        // Likewise runc's version, which every manifest records.
        let runc = c.runc.clone();
        tokio::spawn(async move {
            crate::checkpoint::runc_version(&runc).await;
        });
        let pid = c.init.pid;
        let early_exit = {
            let mut st = self.state.lock().await;
            if st.containers.contains_key(&req.id) {
                return Err(Error::AlreadyExists(format!(
                    "container {} already exists",
                    req.id
                )));
            }
            let early = if pid > 0 {
                st.unclaimed.take(pid).map(|s| c.init.set_exited(s))
            } else {
                None
            };
            if pid > 0 && early.is_none() {
                c.oom = self.watch_oom(&req.id, pid);
            }
            st.containers.insert(req.id.clone(), c);
            early
        };
        self.publish(TaskCreate {
            container_id: req.id.clone(),
            bundle: req.bundle.clone(),
            rootfs: req.rootfs.clone(),
            io: MessageField::some(TaskIO {
                stdin: req.stdin.clone(),
                stdout: req.stdout.clone(),
                stderr: req.stderr.clone(),
                terminal: req.terminal,
                ..Default::default()
            }),
            checkpoint: req.checkpoint.clone(),
            pid: pid.max(0) as u32,
            ..Default::default()
        })
        .await;
        if let Some(info) = early_exit {
            self.publish(exit_event(&req.id, "", pid, info)).await;
        }
        Ok(api::CreateTaskResponse {
            pid: pid.max(0) as u32,
            ..Default::default()
        })
    }

    async fn start(self: &Arc<Self>, req: api::StartRequest) -> Result<api::StartResponse> {
        let op = self.op_lock(&req.id).await?;
        let _op = op.lock().await;
        let pid = if req.exec_id.is_empty() {
            self.start_init(&req.id).await?
        } else {
            self.start_exec(&req.id, &req.exec_id).await?
        };
        Ok(api::StartResponse {
            pid: pid as u32,
            ..Default::default()
        })
    }

    async fn start_init(self: &Arc<Self>, id: &str) -> Result<i32> {
        let (runc, restore_from, stdio, bundle, no_pivot, criu_conf, config, overrides, tap_config) = {
            let mut st = self.state.lock().await;
            let c = st.get_mut(id)?;
            let what = c.describe("");
            c.init.begin_start(&what)?;
            (
                c.runc.clone(),
                c.restore_from.clone(),
                c.init.stdio.clone(),
                c.bundle.clone(),
                c.options.no_pivot_root,
                c.criu_conf.clone(),
                c.config.clone(),
                c.overrides.clone(),
                c.tap_config.clone(),
            )
        };
        let result = match &restore_from {
            None => runc.start(id).await.map(|()| None),
            Some(from) => {
                let target = restore::Target {
                    id,
                    bundle: &bundle,
                    runc: &runc,
                    stdio: &stdio,
                    no_pivot,
                    criu_conf: criu_conf.as_deref(),
                    config: &config,
                    overrides: &overrides,
                    tap: tap_config.as_ref(),
                };
                restore::restore(&target, from).await.map(Some)
            }
        };

        let pid = {
            let mut st = self.state.lock().await;
            let State {
                containers,
                unclaimed,
            } = &mut *st;
            let c = containers.get_mut(id).ok_or_else(|| {
                Error::NotFound(format!("container {id} was deleted while starting"))
            })?;
            match result {
                Ok(restored) => {
                    if let Some((pid, io, lazy, tap)) = restored {
                        c.init.pid = pid;
                        c.lazy = lazy;
                        c.tap = tap;
                        if c.init.stdin_closed {
                            io.close_stdin();
                        }
                        c.init.io = Some(io);
                        c.restore_from = None;
                        if let Some(s) = unclaimed.take(pid) {
                            c.init.deferred_exit = Some(s);
                        }
                    }
                    c.init.status = Status::Running;
                    c.init.pid
                }
                Err(e) => {
                    let deferred = c.init.end_start(false);
                    if let Some(s) = deferred {
                        let info = c.init.set_exited(s);
                        let ev = exit_event(id, "", c.init.pid, info);
                        drop(st);
                        self.publish(ev).await;
                    }
                    return Err(e);
                }
            }
        };
        if restore_from.is_some() {
            let oom = self.watch_oom(id, pid);
            if let Ok(c) = self.state.lock().await.get_mut(id) {
                c.oom = oom;
            }
        }
        self.publish(TaskStart {
            container_id: id.to_string(),
            pid: pid as u32,
            ..Default::default()
        })
        .await;
        self.finish_start(id, "").await;
        Ok(pid)
    }

    /// Ends a start after its event went out: delivers an exit that came
    /// meanwhile.
    async fn finish_start(&self, id: &str, exec_id: &str) {
        let event = {
            let mut st = self.state.lock().await;
            let Ok(c) = st.get_mut(id) else { return };
            let Ok(p) = c.process_mut(exec_id) else {
                return;
            };
            p.end_start(true)
                .map(|s| exit_event(id, exec_id, p.pid, p.set_exited(s)))
        };
        if let Some(ev) = event {
            self.publish(ev).await;
        }
    }

    async fn start_exec(&self, id: &str, exec_id: &str) -> Result<i32> {
        let (runc, spec, stdio, bundle) = {
            let mut st = self.state.lock().await;
            let c = st.get_mut(id)?;
            if c.init.status != Status::Running {
                return Err(Error::FailedPrecondition(format!(
                    "cannot start {}: the container is not running",
                    c.describe(exec_id)
                )));
            }
            let what = c.describe(exec_id);
            let runc = c.runc.clone();
            let bundle = c.bundle.clone();
            let p = c.process_mut(exec_id)?;
            p.begin_start(&what)?;
            (
                runc,
                p.spec.clone().unwrap_or_default(),
                p.stdio.clone(),
                bundle,
            )
        };
        let result = self
            .run_exec(id, exec_id, &runc, &spec, &stdio, &bundle)
            .await;
        let pid = {
            let mut st = self.state.lock().await;
            let State {
                containers,
                unclaimed,
            } = &mut *st;
            let c = containers
                .get_mut(id)
                .ok_or_else(|| Error::NotFound(format!("container {id} was deleted")))?;
            let p = c.process_mut(exec_id)?;
            match result {
                Ok((pid, io)) => {
                    p.pid = pid;
                    if p.stdin_closed {
                        io.close_stdin();
                    }
                    p.io = Some(io);
                    p.status = Status::Running;
                    if let Some(s) = unclaimed.take(pid) {
                        p.deferred_exit = Some(s);
                    }
                    pid
                }
                Err(e) => {
                    p.end_start(false);
                    // Nothing runs: waiters must not hang.
                    p.set_exited(255);
                    return Err(e);
                }
            }
        };
        self.publish(TaskExecStarted {
            container_id: id.to_string(),
            exec_id: exec_id.to_string(),
            pid: pid as u32,
            ..Default::default()
        })
        .await;
        self.finish_start(id, exec_id).await;
        Ok(pid)
    }

    async fn run_exec(
        &self,
        id: &str,
        exec_id: &str,
        runc: &crate::runc::Runc,
        spec: &[u8],
        stdio: &stdio::StdioPaths,
        bundle: &Path,
    ) -> Result<(i32, stdio::ProcessIo)> {
        let what = container::describe(id, exec_id);
        let (spec_file, pid_file) = exec_files(bundle);
        std::fs::write(&spec_file, spec)
            .map_err(|e| Error::internal(format!("{what}: write {}", spec_file.display()), e))?;
        let result = async {
            if stdio.terminal {
                let socket = ConsoleSocket::new(&console_socket_dir())?;
                runc.exec(
                    id,
                    &spec_file,
                    &pid_file,
                    Some(socket.path()),
                    ProcessStdio::default(),
                )
                .await?;
                let master = socket.receive_master().await?;
                stdio::attach_console(stdio, master)
            } else {
                let (child, io) = stdio::pipes(stdio)?;
                if let Err(e) = runc.exec(id, &spec_file, &pid_file, None, child).await {
                    io.tasks.abort().await;
                    return Err(e);
                }
                Ok(io)
            }
        }
        .await;
        let _ = std::fs::remove_file(&spec_file);
        let io = result?;
        let pid = read_pid(&pid_file);
        let _ = std::fs::remove_file(&pid_file);
        Ok((pid?, io))
    }

    async fn delete(&self, req: api::DeleteRequest) -> Result<api::DeleteResponse> {
        if !req.exec_id.is_empty() {
            let p = {
                let mut st = self.state.lock().await;
                let c = st.get_mut(&req.id)?;
                let what = c.describe(&req.exec_id);
                c.process(&req.exec_id)?.check_delete(&what)?;
                c.execs.remove(&req.exec_id)
            };
            let Some(p) = p else {
                return Err(Error::NotFound(format!("exec {} not found", req.exec_id)));
            };
            if let Some(io) = &p.io {
                io.shutdown().await;
            }
            let exit = p.exit.unwrap_or(ExitInfo {
                status: 0,
                at: SystemTime::now(),
            });
            return Ok(api::DeleteResponse {
                pid: p.pid.max(0) as u32,
                exit_status: exit.status,
                exited_at: MessageField::some(exit.timestamp()),
                ..Default::default()
            });
        }

        let op = self.op_lock(&req.id).await?;
        let _op = op.lock().await;
        let (runc, status, restoring) = {
            let st = self.state.lock().await;
            let c = st.get(&req.id)?;
            c.init.check_delete(&c.describe(""))?;
            (c.runc.clone(), c.init.status, c.restore_from.is_some())
        };
        if !restoring {
            if let Err(e) = runc.delete(&req.id, status != Status::Stopped).await {
                if !is_gone(&e) {
                    return Err(e);
                }
                tracing::debug!(id = %req.id, "runc has no such container any more: {e}");
            }
        }
        let c = {
            let mut st = self.state.lock().await;
            st.containers
                .remove(&req.id)
                .ok_or_else(|| Error::NotFound(format!("container {} not found", req.id)))?
        };
        if let Some(oom) = &c.oom {
            oom.abort();
        }
        if let Some(tap) = &c.tap {
            tap.shutdown().await;
        }
        for p in c.execs.values() {
            if let Some(io) = &p.io {
                io.tasks.abort().await;
            }
        }
        if let Some(io) = &c.init.io {
            io.shutdown().await;
        }
        if let Some(rootfs) = &c.rootfs {
            container::unmount(rootfs);
        }
        let exit = c.init.exit.unwrap_or(ExitInfo {
            status: 0,
            at: SystemTime::now(),
        });
        let pid = c.init.pid.max(0) as u32;
        self.publish(TaskDelete {
            container_id: req.id.clone(),
            pid,
            exit_status: exit.status,
            exited_at: MessageField::some(exit.timestamp()),
            id: req.id.clone(),
            ..Default::default()
        })
        .await;
        Ok(api::DeleteResponse {
            pid,
            exit_status: exit.status,
            exited_at: MessageField::some(exit.timestamp()),
            ..Default::default()
        })
    }

    async fn exec(&self, req: api::ExecProcessRequest) -> Result<()> {
        if req.exec_id.is_empty() {
            return Err(Error::InvalidArgument("exec id is empty".into()));
        }
        {
            let mut st = self.state.lock().await;
            let c = st.get_mut(&req.id)?;
            let what = c.describe(&req.exec_id);
            if c.execs.contains_key(&req.exec_id) {
                return Err(Error::AlreadyExists(format!("{what} already exists")));
            }
            if c.init.status == Status::Stopped {
                return Err(Error::FailedPrecondition(format!(
                    "cannot add {what}: the container has stopped"
                )));
            }
            let spec = req
                .spec
                .as_ref()
                .map(|a| a.value.clone())
                .filter(|v| !v.is_empty())
                .ok_or_else(|| Error::InvalidArgument(format!("{what}: no process spec")))?;
            serde_json::from_slice::<serde_json::Value>(&spec).map_err(|e| {
                Error::InvalidArgument(format!("{what}: process spec is not JSON: {e}"))
            })?;
            let mut p = crate::process::Process::new(
                &req.exec_id,
                stdio::StdioPaths {
                    stdin: req.stdin.clone(),
                    stdout: req.stdout.clone(),
                    stderr: req.stderr.clone(),
                    terminal: req.terminal,
                },
            );
            p.spec = Some(spec);
            c.execs.insert(req.exec_id.clone(), p);
        }
        self.publish(TaskExecAdded {
            container_id: req.id.clone(),
            exec_id: req.exec_id.clone(),
            ..Default::default()
        })
        .await;
        Ok(())
    }

    async fn kill(&self, req: api::KillRequest) -> Result<()> {
        let (runc, pid, restoring) = {
            let mut st = self.state.lock().await;
            let c = st.get_mut(&req.id)?;
            let what = c.describe(&req.exec_id);
            let restoring = c.restore_from.is_some();
            let p = c.process(&req.exec_id)?;
            if req.exec_id.is_empty() && req.all && p.status == Status::Stopped {
                // Nothing left to signal.
                return Ok(());
            }
            p.check_kill(&what)?;
            (c.runc.clone(), p.pid, restoring)
        };
        if req.exec_id.is_empty() {
            if restoring {
                // Never restored: nothing runs; the task just ends.
                let ev = {
                    let mut st = self.state.lock().await;
                    let c = st.get_mut(&req.id)?;
                    let info = c.init.set_exited(128 + req.signal as i32);
                    exit_event(&req.id, "", 0, info)
                };
                self.publish(ev).await;
                return Ok(());
            }
            return runc.kill(&req.id, req.signal, req.all).await.map_err(|e| {
                if is_gone(&e) {
                    Error::NotFound(format!("container {}: process already finished", req.id))
                } else {
                    e
                }
            });
        }
        if pid <= 0 {
            return Err(Error::FailedPrecondition(format!(
                "{}: not started",
                container::describe(&req.id, &req.exec_id)
            )));
        }
        let sig = nix::sys::signal::Signal::try_from(req.signal as i32)
            .map_err(|e| Error::InvalidArgument(format!("signal {}: {e}", req.signal)))?;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig).map_err(|e| {
            if e == nix::errno::Errno::ESRCH {
                Error::NotFound(format!(
                    "{}: process already finished",
                    container::describe(&req.id, &req.exec_id)
                ))
            } else {
                Error::internal(
                    format!(
                        "signal {} to {}",
                        req.signal,
                        container::describe(&req.id, &req.exec_id)
                    ),
                    e,
                )
            }
        })
    }

    async fn state(&self, req: api::StateRequest) -> Result<api::StateResponse> {
        let st = self.state.lock().await;
        let c = st.get(&req.id)?;
        let p = c.process(&req.exec_id)?;
        Ok(api::StateResponse {
            id: if req.exec_id.is_empty() {
                req.id.clone()
            } else {
                req.exec_id.clone()
            },
            bundle: c.bundle.display().to_string(),
            pid: p.pid.max(0) as u32,
            status: p.status.to_proto().into(),
            stdin: p.stdio.stdin.clone(),
            stdout: p.stdio.stdout.clone(),
            stderr: p.stdio.stderr.clone(),
            terminal: p.stdio.terminal,
            exit_status: p.exit.map(|e| e.status).unwrap_or(0),
            exited_at: p
                .exit
                .map(|e| MessageField::some(e.timestamp()))
                .unwrap_or_default(),
            exec_id: req.exec_id.clone(),
            ..Default::default()
        })
    }

    async fn pids(&self, req: api::PidsRequest) -> Result<api::PidsResponse> {
        let (runc, execs) = {
            let st = self.state.lock().await;
            let c = st.get(&req.id)?;
            let execs: HashMap<i32, String> = c
                .execs
                .values()
                .filter(|p| p.pid > 0)
                .map(|p| (p.pid, p.exec_id.clone()))
                .collect();
            (c.runc.clone(), execs)
        };
        let pids = runc.ps(&req.id).await?;
        let mut processes = Vec::with_capacity(pids.len());
        for pid in pids {
            let mut info = api::ProcessInfo {
                pid: pid.max(0) as u32,
                ..Default::default()
            };
            if let Some(exec_id) = execs.get(&pid) {
                let details = ProcessDetails {
                    exec_id: exec_id.clone(),
                    ..Default::default()
                };
                info.info = MessageField::some(Any {
                    type_url: "containerd.runc.v1.ProcessDetails".to_string(),
                    value: details
                        .write_to_bytes()
                        .map_err(|e| Error::internal("encode process details", e))?,
                    ..Default::default()
                });
            }
            processes.push(info);
        }
        Ok(api::PidsResponse {
            processes,
            ..Default::default()
        })
    }

    async fn pause_resume(&self, id: &str, pause: bool) -> Result<()> {
        let op = self.op_lock(id).await?;
        let _op = op.lock().await;
        let runc = {
            let st = self.state.lock().await;
            let c = st.get(id)?;
            check_pause_resume(c.init.status, pause, &c.describe(""))?;
            c.runc.clone()
        };
        if pause {
            runc.pause(id).await?;
        } else {
            runc.resume(id).await?;
        }
        {
            let mut st = self.state.lock().await;
            let c = st.get_mut(id)?;
            if c.init.status != Status::Stopped {
                c.init.status = if pause {
                    Status::Paused
                } else {
                    Status::Running
                };
            }
        }
        if pause {
            let ev = TaskPaused {
                container_id: id.to_string(),
                ..Default::default()
            };
            self.publish(ev).await;
        } else {
            let ev = TaskResumed {
                container_id: id.to_string(),
                ..Default::default()
            };
            self.publish(ev).await;
        }
        Ok(())
    }

    async fn checkpoint(&self, req: api::CheckpointTaskRequest) -> Result<()> {
        let opts = checkpoint::parse_options(req.options.as_ref())?;
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
            checkpoint::Target {
                id: req.id.clone(),
                namespace: self.namespace.clone(),
                bundle: c.bundle.clone(),
                runc: c.runc.clone(),
                runc_root: c.runc_root.clone(),
                init_pid: c.init.pid,
                was_paused: c.init.status == Status::Paused,
                criu_conf: c.criu_conf.clone(),
                config: c.config.clone(),
                overrides: c.overrides.clone(),
                tap: c.tap.clone().zip(c.tap_config.clone()),
                void_fence: c.fence_file.take(),
            }
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

    async fn stats(&self, req: api::StatsRequest) -> Result<api::StatsResponse> {
        let pid = {
            let st = self.state.lock().await;
            let c = st.get(&req.id)?;
            if c.init.pid <= 0 || c.init.status == Status::Stopped {
                return Err(Error::NotFound(format!(
                    "container {}: no running process to collect stats of",
                    req.id
                )));
            }
            c.init.pid
        };
        let what = format!("stats of container {}", req.id);
        let cgroup = get_cgroup(pid as u32).map_err(|e| Error::internal(&what, e))?;
        let metrics = collect_metrics(&cgroup).map_err(|e| Error::internal(&what, e))?;
        let any = convert_to_any(Box::new(metrics)).map_err(|e| Error::internal(&what, e))?;
        Ok(api::StatsResponse {
            stats: MessageField::some(any),
            ..Default::default()
        })
    }

    async fn update(&self, req: api::UpdateTaskRequest) -> Result<()> {
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
        let file = crate::broker::fence(id, &tap, &config, Path::new(&req.image_path)).await?;
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
                    let link = crate::broker::migrate_start(
                        id,
                        &tap,
                        Path::new(&image_path),
                        &migration_id,
                    )
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
                    let r = link.fence(&tap, timeout).await;
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
                    link.abort(&tap, &reason).await;
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
                crate::config::TAP_UPSTREAM_ANNOTATION
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

    async fn close_io(&self, req: api::CloseIORequest) -> Result<()> {
        let mut st = self.state.lock().await;
        let p = st.get_mut(&req.id)?.process_mut(&req.exec_id)?;
        if req.stdin {
            // Before start there are no copies yet: remembered for then.
            p.stdin_closed = true;
            if let Some(io) = &p.io {
                io.close_stdin();
            }
        }
        Ok(())
    }

    async fn resize_pty(&self, req: api::ResizePtyRequest) -> Result<()> {
        let st = self.state.lock().await;
        let c = st.get(&req.id)?;
        let p = c.process(&req.exec_id)?;
        match &p.io {
            Some(io) => io
                .resize(req.width, req.height)
                .map_err(|e| Error::internal(format!("resize {}", c.describe(&req.exec_id)), e)),
            None => Err(Error::FailedPrecondition(format!(
                "{}: not started",
                c.describe(&req.exec_id)
            ))),
        }
    }

    async fn wait(&self, req: api::WaitRequest) -> Result<api::WaitResponse> {
        let mut rx = {
            let st = self.state.lock().await;
            st.get(&req.id)?.process(&req.exec_id)?.exit_watch()
        };
        let info = rx
            .wait_for(|e| e.is_some())
            .await
            .map_err(|_| {
                Error::NotFound(format!(
                    "{} was deleted while waited for",
                    container::describe(&req.id, &req.exec_id)
                ))
            })?
            .unwrap_or(ExitInfo {
                status: 0,
                at: SystemTime::now(),
            });
        Ok(api::WaitResponse {
            exit_status: info.status,
            exited_at: MessageField::some(to_timestamp(info.at)),
            ..Default::default()
        })
    }

    async fn connect(&self, req: api::ConnectRequest) -> Result<api::ConnectResponse> {
        let st = self.state.lock().await;
        let task_pid = st
            .containers
            .get(&req.id)
            .map(|c| c.init.pid.max(0) as u32)
            .unwrap_or(0);
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: env!("CARGO_PKG_VERSION").to_string(),
            ..Default::default()
        })
    }

    async fn shutdown(&self) -> Result<()> {
        let st = self.state.lock().await;
        if st.containers.is_empty() {
            tracing::info!("no containers left: shim exits");
            self.exit.signal();
        }
        Ok(())
    }
}

#[async_trait]
impl Task for Service {
    async fn state(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateRequest,
    ) -> TtrpcResult<api::StateResponse> {
        let (id, exec) = (req.id.clone(), req.exec_id.clone());
        step("state", &id, &exec, true, self.inner.state(req)).await
    }

    async fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        let id = req.id.clone();
        step("create", &id, "", false, self.inner.create(req)).await
    }

    async fn start(
        &self,
        _ctx: &TtrpcContext,
        req: api::StartRequest,
    ) -> TtrpcResult<api::StartResponse> {
        let (id, exec) = (req.id.clone(), req.exec_id.clone());
        step("start", &id, &exec, false, self.inner.start(req)).await
    }

    async fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> TtrpcResult<api::DeleteResponse> {
        let (id, exec) = (req.id.clone(), req.exec_id.clone());
        step("delete", &id, &exec, false, self.inner.delete(req)).await
    }

    async fn pids(
        &self,
        _ctx: &TtrpcContext,
        req: api::PidsRequest,
    ) -> TtrpcResult<api::PidsResponse> {
        let id = req.id.clone();
        step("pids", &id, "", true, self.inner.pids(req)).await
    }

    async fn pause(&self, _ctx: &TtrpcContext, req: api::PauseRequest) -> TtrpcResult<api::Empty> {
        step(
            "pause",
            &req.id,
            "",
            false,
            self.inner.pause_resume(&req.id, true),
        )
        .await
        .map(|()| api::Empty::new())
    }

    async fn resume(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResumeRequest,
    ) -> TtrpcResult<api::Empty> {
        step(
            "resume",
            &req.id,
            "",
            false,
            self.inner.pause_resume(&req.id, false),
        )
        .await
        .map(|()| api::Empty::new())
    }

    async fn checkpoint(
        &self,
        _ctx: &TtrpcContext,
        req: api::CheckpointTaskRequest,
    ) -> TtrpcResult<api::Empty> {
        let id = req.id.clone();
        step("checkpoint", &id, "", false, self.inner.checkpoint(req))
            .await
            .map(|()| api::Empty::new())
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        let (id, exec) = (req.id.clone(), req.exec_id.clone());
        step("kill", &id, &exec, false, self.inner.kill(req))
            .await
            .map(|()| api::Empty::new())
    }

    async fn exec(
        &self,
        _ctx: &TtrpcContext,
        req: api::ExecProcessRequest,
    ) -> TtrpcResult<api::Empty> {
        let (id, exec) = (req.id.clone(), req.exec_id.clone());
        step("exec", &id, &exec, false, self.inner.exec(req))
            .await
            .map(|()| api::Empty::new())
    }

    async fn resize_pty(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResizePtyRequest,
    ) -> TtrpcResult<api::Empty> {
        let (id, exec) = (req.id.clone(), req.exec_id.clone());
        step("resize_pty", &id, &exec, true, self.inner.resize_pty(req))
            .await
            .map(|()| api::Empty::new())
    }

    async fn close_io(
        &self,
        _ctx: &TtrpcContext,
        req: api::CloseIORequest,
    ) -> TtrpcResult<api::Empty> {
        let (id, exec) = (req.id.clone(), req.exec_id.clone());
        step("close_io", &id, &exec, false, self.inner.close_io(req))
            .await
            .map(|()| api::Empty::new())
    }

    async fn update(
        &self,
        _ctx: &TtrpcContext,
        req: api::UpdateTaskRequest,
    ) -> TtrpcResult<api::Empty> {
        let id = req.id.clone();
        step("update", &id, "", false, self.inner.update(req))
            .await
            .map(|()| api::Empty::new())
    }

    async fn wait(
        &self,
        _ctx: &TtrpcContext,
        req: api::WaitRequest,
    ) -> TtrpcResult<api::WaitResponse> {
        let (id, exec) = (req.id.clone(), req.exec_id.clone());
        step("wait", &id, &exec, true, self.inner.wait(req)).await
    }

    async fn stats(
        &self,
        _ctx: &TtrpcContext,
        req: api::StatsRequest,
    ) -> TtrpcResult<api::StatsResponse> {
        let id = req.id.clone();
        step("stats", &id, "", true, self.inner.stats(req)).await
    }

    async fn connect(
        &self,
        _ctx: &TtrpcContext,
        req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        let id = req.id.clone();
        step("connect", &id, "", true, self.inner.connect(req)).await
    }

    async fn shutdown(
        &self,
        _ctx: &TtrpcContext,
        req: api::ShutdownRequest,
    ) -> TtrpcResult<api::Empty> {
        step("shutdown", &req.id, "", false, self.inner.shutdown())
            .await
            .map(|()| api::Empty::new())
    }
}
