//! The task API's read-only calls: State, Pids, Stats, Wait and Connect.
//! They change nothing and publish no event.

use std::collections::HashMap;
use std::time::SystemTime;

use containerd_shim::cgroup::{collect_metrics, get_cgroup};
use containerd_shim::util::convert_to_any;
use containerd_shim_protos::api;
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::{Message, MessageField};
use containerd_shim_protos::shim::oci::ProcessDetails;

use super::Inner;
use crate::container;
use crate::error::{Error, Result};
use crate::process::{to_timestamp, ExitInfo, Status};

impl Inner {
    pub(super) async fn state(&self, req: api::StateRequest) -> Result<api::StateResponse> {
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

    pub(super) async fn pids(&self, req: api::PidsRequest) -> Result<api::PidsResponse> {
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

    pub(super) async fn stats(&self, req: api::StatsRequest) -> Result<api::StatsResponse> {
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

    pub(super) async fn wait(&self, req: api::WaitRequest) -> Result<api::WaitResponse> {
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

    pub(super) async fn connect(&self, req: api::ConnectRequest) -> Result<api::ConnectResponse> {
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
}
