//! The task service (containerd's task API v3 over ttrpc): one method per
//! RPC, each run inside a tracing span naming the operation and container,
//! with its duration logged at the end. Task events are published from
//! here; container and process state lives in [`crate::container`] and
//! [`crate::process`].
//!
//! This file holds what every call shares (the state, event publishing,
//! the routing of exits and OOM events) and the `Task` trait, which only
//! dispatches; the calls themselves are grouped by what they do:
//! - [`lifecycle`]: Create, Start (including the restore of a task created
//!   from a checkpoint), Exec, Kill, Pause/Resume, CloseIO, ResizePty,
//!   Delete, Shutdown;
//! - [`checkpoint`]: the Checkpoint call;
//! - [`update`]: Update, and the `ms2m fence` and `ms2m migrate`
//!   (`ms2m.io/migrate.v1`) requests that travel as an Update;
//! - [`queries`]: State, Pids, Stats, Wait, Connect.

mod checkpoint;
mod lifecycle;
mod queries;
mod update;

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Weak};
use std::time::Instant;

use async_trait::async_trait;
use containerd_shim::asynchronous::ExitSignal;
use containerd_shim::event::Event;
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{Task, TtrpcContext, TtrpcResult};
use containerd_shim_protos::api;
use containerd_shim_protos::events::task::{TaskExit, TaskOOM};
use containerd_shim_protos::protobuf::MessageField;
use containerd_shim_protos::ttrpc;
use tokio::sync::{mpsc, Mutex};
use tracing::Instrument;

use crate::container::Container;
use crate::error::{Error, Result};
use crate::exits::{Exit, ExitHub, Unclaimed};
use crate::oom;
use crate::process::ExitInfo;

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

    /// The container `id` with the unclaimed exits, at the end of a start;
    /// `gone` says how it went missing meanwhile.
    fn get_mut_with_unclaimed(
        &mut self,
        id: &str,
        gone: &str,
    ) -> Result<(&mut Container, &mut Unclaimed)> {
        let State {
            containers,
            unclaimed,
        } = self;
        let c = containers
            .get_mut(id)
            .ok_or_else(|| Error::NotFound(format!("container {id} {gone}")))?;
        Ok((c, unclaimed))
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
