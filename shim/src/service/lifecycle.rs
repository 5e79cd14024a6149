//! The task API's lifecycle calls: Create, Start (`runc start`, or the
//! restore of a task created from a checkpoint), Exec, Kill, Pause and
//! Resume, CloseIO, ResizePty, Delete and Shutdown. Each changes a
//! container's or a process's state and publishes the matching task event.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use containerd_shim_protos::api;
use containerd_shim_protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskIO, TaskPaused, TaskResumed,
    TaskStart,
};
use containerd_shim_protos::protobuf::MessageField;

use super::{exit_event, Inner};
use crate::container;
use crate::error::{Error, Result};
use crate::process::{check_pause_resume, ExitInfo, Process, Status};
use crate::restore;
use crate::runc::{read_pid, runc_version, ProcessStdio, Runc};
use crate::stdio::{self, console_socket_dir, ConsoleSocket};

impl Inner {
    pub(super) async fn create(
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
            runc_version(&runc).await;
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

    pub(super) async fn start(
        self: &Arc<Self>,
        req: api::StartRequest,
    ) -> Result<api::StartResponse> {
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
        // A task created from a checkpoint is restored instead.
        let (runc, restore) = {
            let mut st = self.state.lock().await;
            let c = st.get_mut(id)?;
            let what = c.describe("");
            c.init.begin_start(&what)?;
            let restore = c
                .restore_from
                .clone()
                .map(|from| (c.restore_target(), from));
            (c.runc.clone(), restore)
        };
        let result = match &restore {
            None => runc.start(id).await.map(|()| None),
            Some((target, from)) => restore::restore(target, from).await.map(Some),
        };

        let pid = {
            let mut st = self.state.lock().await;
            let (c, unclaimed) = st.get_mut_with_unclaimed(id, "was deleted while starting")?;
            match result {
                Ok(restored) => {
                    if let Some(restored) = restored {
                        c.adopt_restored(restored);
                        if let Some(s) = unclaimed.take(c.init.pid) {
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
        if restore.is_some() {
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
            let (c, unclaimed) = st.get_mut_with_unclaimed(id, "was deleted")?;
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
        runc: &Runc,
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

    pub(super) async fn delete(&self, req: api::DeleteRequest) -> Result<api::DeleteResponse> {
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

    pub(super) async fn exec(&self, req: api::ExecProcessRequest) -> Result<()> {
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
            let mut p = Process::new(
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

    pub(super) async fn kill(&self, req: api::KillRequest) -> Result<()> {
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

    pub(super) async fn pause_resume(&self, id: &str, pause: bool) -> Result<()> {
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

    pub(super) async fn close_io(&self, req: api::CloseIORequest) -> Result<()> {
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

    pub(super) async fn resize_pty(&self, req: api::ResizePtyRequest) -> Result<()> {
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

    pub(super) async fn shutdown(&self) -> Result<()> {
        let st = self.state.lock().await;
        if st.containers.is_empty() {
            tracing::info!("no containers left: shim exits");
            self.exit.signal();
        }
        Ok(())
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
