//! One process of a container (its init, or an exec): status, pid, exit
//! status and the notification of waiters. Status transitions are checked
//! here, in one place.

use std::time::SystemTime;

use containerd_shim_protos::api::Status as ProtoStatus;
use containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp;
use tokio::sync::watch;

use crate::error::{Error, Result};
use crate::stdio::{ProcessIo, StdioPaths};

/// Lifecycle status of a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Created (runc create / exec request) but not started.
    Created,
    /// Running.
    Running,
    /// Frozen (init only).
    Paused,
    /// Exited.
    Stopped,
}

impl Status {
    /// The task API's status value.
    pub fn to_proto(self) -> ProtoStatus {
        match self {
            Status::Created => ProtoStatus::CREATED,
            Status::Running => ProtoStatus::RUNNING,
            Status::Paused => ProtoStatus::PAUSED,
            Status::Stopped => ProtoStatus::STOPPED,
        }
    }
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitInfo {
    /// Exit status (128 + signal for a signalled process).
    pub status: u32,
    /// When the shim saw it exit.
    pub at: SystemTime,
}

impl ExitInfo {
    /// The exit time as a protobuf timestamp.
    pub fn timestamp(&self) -> Timestamp {
        to_timestamp(self.at)
    }
}

/// A protobuf timestamp for `t`.
pub fn to_timestamp(t: SystemTime) -> Timestamp {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
        ..Default::default()
    }
}

/// A container process.
pub struct Process {
    /// Exec id; empty for the init process.
    pub exec_id: String,
    /// Pid on the host; 0 until known.
    pub pid: i32,
    /// Current status.
    pub status: Status,
    /// The stdio containerd asked for.
    pub stdio: StdioPaths,
    /// The shim's side of the stdio, once set up.
    pub io: Option<ProcessIo>,
    /// How it ended, once stopped.
    pub exit: Option<ExitInfo>,
    /// The OCI process spec of an exec (JSON).
    pub spec: Option<Vec<u8>>,
    /// A start is in flight: exits are held back until its start event is
    /// published, so containerd sees start before exit.
    pub starting: bool,
    /// An exit that arrived while starting.
    pub deferred_exit: Option<i32>,
    /// containerd closed stdin (possibly before the process started).
    pub stdin_closed: bool,
    exited: watch::Sender<Option<ExitInfo>>,
}

impl Process {
    /// A process that is not started yet.
    pub fn new(exec_id: &str, stdio: StdioPaths) -> Self {
        Process {
            exec_id: exec_id.to_string(),
            pid: 0,
            status: Status::Created,
            stdio,
            io: None,
            exit: None,
            spec: None,
            starting: false,
            deferred_exit: None,
            stdin_closed: false,
            exited: watch::channel(None).0,
        }
    }

    /// Something to await the exit with.
    pub fn exit_watch(&self) -> watch::Receiver<Option<ExitInfo>> {
        self.exited.subscribe()
    }

    /// Records the exit and wakes waiters. Idempotent: a second exit of the
    /// same process keeps the first.
    pub fn set_exited(&mut self, status: i32) -> ExitInfo {
        if let Some(e) = self.exit {
            return e;
        }
        let info = ExitInfo {
            status: status as u32,
            at: SystemTime::now(),
        };
        self.status = Status::Stopped;
        self.exit = Some(info);
        self.exited.send_replace(Some(info));
        info
    }

    /// Marks the start as begun; fails unless the process is created.
    pub fn begin_start(&mut self, what: &str) -> Result<()> {
        match self.status {
            Status::Created if !self.starting => {
                self.starting = true;
                Ok(())
            }
            Status::Created => Err(Error::FailedPrecondition(format!(
                "{what} is already being started"
            ))),
            s => Err(Error::FailedPrecondition(format!(
                "cannot start {what}: it is {}",
                describe(s)
            ))),
        }
    }

    /// Ends a start; returns an exit that arrived meanwhile.
    pub fn end_start(&mut self, started: bool) -> Option<i32> {
        self.starting = false;
        if started && self.status == Status::Created {
            self.status = Status::Running;
        }
        self.deferred_exit.take()
    }

    /// Checks that a signal can be delivered.
    pub fn check_kill(&self, what: &str) -> Result<()> {
        match self.status {
            Status::Stopped => Err(Error::NotFound(format!("{what}: process already finished"))),
            _ => Ok(()),
        }
    }

    /// Checks that the process can be deleted.
    pub fn check_delete(&self, what: &str) -> Result<()> {
        match self.status {
            Status::Running | Status::Paused => Err(Error::FailedPrecondition(format!(
                "cannot delete {what}: it is {}",
                describe(self.status)
            ))),
            _ => Ok(()),
        }
    }
}

/// Checks a pause (`to_paused`) or resume transition of an init process.
pub fn check_pause_resume(status: Status, to_paused: bool, what: &str) -> Result<()> {
    match (status, to_paused) {
        (Status::Running, true) | (Status::Paused, false) => Ok(()),
        (s, true) => Err(Error::FailedPrecondition(format!(
            "cannot pause {what}: it is {}",
            describe(s)
        ))),
        (s, false) => Err(Error::FailedPrecondition(format!(
            "cannot resume {what}: it is {}",
            describe(s)
        ))),
    }
}

/// Checks that a checkpoint can be taken in `status`.
pub fn check_checkpoint(status: Status, what: &str) -> Result<()> {
    match status {
        Status::Running | Status::Paused => Ok(()),
        s => Err(Error::FailedPrecondition(format!(
            "cannot checkpoint {what}: it is {}",
            describe(s)
        ))),
    }
}

fn describe(s: Status) -> &'static str {
    match s {
        Status::Created => "created, not started",
        Status::Running => "running",
        Status::Paused => "paused",
        Status::Stopped => "stopped",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_then_run() {
        let mut p = Process::new("", StdioPaths::default());
        p.begin_start("c1").unwrap();
        assert!(p.begin_start("c1").is_err(), "double start");
        assert_eq!(p.end_start(true), None);
        assert_eq!(p.status, Status::Running);
        assert!(p.begin_start("c1").is_err(), "start of running");
    }

    #[test]
    fn exit_during_start_is_deferred() {
        let mut p = Process::new("e1", StdioPaths::default());
        p.begin_start("e1").unwrap();
        p.deferred_exit = Some(3);
        assert_eq!(p.end_start(true), Some(3));
        let e = p.set_exited(3);
        assert_eq!(e.status, 3);
        assert_eq!(p.status, Status::Stopped);
    }

    #[test]
    fn exit_is_recorded_once_and_wakes_waiters() {
        let mut p = Process::new("", StdioPaths::default());
        let w = p.exit_watch();
        let first = p.set_exited(137);
        let second = p.set_exited(0);
        assert_eq!(first, second);
        assert_eq!(w.borrow().map(|e| e.status), Some(137));
    }

    #[test]
    fn transitions() {
        assert!(check_pause_resume(Status::Running, true, "c").is_ok());
        assert!(check_pause_resume(Status::Paused, true, "c").is_err());
        assert!(check_pause_resume(Status::Paused, false, "c").is_ok());
        assert!(check_pause_resume(Status::Stopped, false, "c").is_err());
        assert!(check_checkpoint(Status::Paused, "c").is_ok());
        assert!(check_checkpoint(Status::Created, "c").is_err());

        let mut p = Process::new("", StdioPaths::default());
        assert!(p.check_delete("c").is_ok());
        p.status = Status::Running;
        assert!(matches!(
            p.check_delete("c"),
            Err(Error::FailedPrecondition(_))
        ));
        p.set_exited(0);
        assert!(matches!(p.check_kill("c"), Err(Error::NotFound(_))));
        assert!(p.check_delete("c").is_ok());
    }
}
