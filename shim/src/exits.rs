//! Routing of child exits.
//!
//! The containerd-shim crate reaps every child (`waitpid(-1)` on SIGCHLD,
//! the shim is a subreaper) and notifies `monitor` subscribers. This module
//! holds the one subscription of the shim and routes each exit:
//!
//! - to a waiter registered for that pid (a runc command the shim runs and
//!   waits for), or
//! - to the task service (a container process: init or exec), through the
//!   channel given to [`ExitHub::start`].
//!
//! A container process can exit before the shim knows its pid (runc writes
//! the pid file, then the process may die before the shim reads it). Such
//! exits are kept in [`Unclaimed`] until the pid becomes known.

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};
use std::time::{Duration, Instant};

use containerd_shim::monitor::{monitor_subscribe, Subject, Topic};
use tokio::sync::{mpsc, oneshot};

/// An exit reported by the reaper.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    /// The process that exited.
    pub pid: i32,
    /// Its exit status (128 + signal when killed by a signal).
    pub status: i32,
}

/// Waiters for exits of processes the shim spawned itself (runc commands).
pub struct ExitHub {
    waiters: Mutex<HashMap<i32, oneshot::Sender<i32>>>,
}

static HUB: LazyLock<ExitHub> = LazyLock::new(|| ExitHub {
    waiters: Mutex::new(HashMap::new()),
});

impl ExitHub {
    /// The process-wide hub.
    pub fn global() -> &'static ExitHub {
        &HUB
    }

    /// Subscribes to the reaper's exits and starts routing them. Exits no
    /// waiter claims go to `others` (dropped when `None`). Call once, before
    /// the first child is spawned.
    pub async fn start(others: Option<mpsc::UnboundedSender<Exit>>) -> std::io::Result<()> {
        let mut sub = monitor_subscribe(Topic::Pid)
            .await
            .map_err(|e| std::io::Error::other(format!("subscribe to process exits: {e}")))?;
        tokio::spawn(async move {
            while let Some(ev) = sub.rx.recv().await {
                let Subject::Pid(pid) = ev.subject else {
                    continue;
                };
                let exit = Exit {
                    pid,
                    status: ev.exit_code,
                };
                if HUB.claim(exit) {
                    continue;
                }
                if let Some(tx) = &others {
                    if tx.send(exit).is_err() {
                        tracing::warn!(pid, "exit of pid {pid} dropped: service gone");
                    }
                }
            }
        });
        Ok(())
    }

    /// Registers interest in the exit of `pid`. Must be called right after
    /// spawning, before the next await point, so the exit cannot be routed
    /// elsewhere first.
    pub fn register(&self, pid: i32) -> oneshot::Receiver<i32> {
        let (tx, rx) = oneshot::channel();
        self.lock().insert(pid, tx);
        rx
    }

    /// Forgets a registration (the waiter gave up).
    pub fn unregister(&self, pid: i32) {
        self.lock().remove(&pid);
    }

    fn claim(&self, exit: Exit) -> bool {
        match self.lock().remove(&exit.pid) {
            Some(tx) => {
                let _ = tx.send(exit.status);
                true
            }
            None => false,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<i32, oneshot::Sender<i32>>> {
        // A poisoned map is still a valid map.
        self.waiters.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Exits of pids nobody knew yet, kept for a while in case a process with
/// that pid is being registered right now.
#[derive(Debug, Default)]
pub struct Unclaimed {
    entries: HashMap<i32, (i32, Instant)>,
}

impl Unclaimed {
    /// How long an unclaimed exit is kept.
    const TTL: Duration = Duration::from_secs(120);
    /// At most this many are kept (orphans reparented to the shim add up).
    const MAX: usize = 4096;

    /// Keeps an exit nobody claimed.
    pub fn insert(&mut self, exit: Exit) {
        self.insert_at(exit, Instant::now());
    }

    fn insert_at(&mut self, exit: Exit, now: Instant) {
        self.entries
            .retain(|_, (_, at)| now.saturating_duration_since(*at) < Self::TTL);
        if self.entries.len() >= Self::MAX {
            if let Some(oldest) = self
                .entries
                .iter()
                .min_by_key(|(_, (_, at))| *at)
                .map(|(pid, _)| *pid)
            {
                self.entries.remove(&oldest);
            }
        }
        self.entries.insert(exit.pid, (exit.status, now));
    }

    /// Takes the exit status of `pid`, if it already exited.
    pub fn take(&mut self, pid: i32) -> Option<i32> {
        self.entries.remove(&pid).map(|(status, _)| status)
    }

    /// Number of exits kept.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unclaimed_exit_is_taken_once() {
        let mut u = Unclaimed::default();
        u.insert(Exit { pid: 42, status: 3 });
        assert_eq!(u.take(42), Some(3));
        assert_eq!(u.take(42), None);
    }

    #[test]
    fn unclaimed_exits_expire() {
        let mut u = Unclaimed::default();
        let t0 = Instant::now();
        u.insert_at(Exit { pid: 1, status: 0 }, t0);
        u.insert_at(
            Exit { pid: 2, status: 0 },
            t0 + Unclaimed::TTL + Duration::from_secs(1),
        );
        assert_eq!(u.len(), 1);
        assert_eq!(u.take(1), None);
        assert_eq!(u.take(2), Some(0));
    }

    #[test]
    fn hub_delivers_to_waiter() {
        let hub = ExitHub {
            waiters: Mutex::new(HashMap::new()),
        };
        let mut rx = hub.register(7);
        assert!(!hub.claim(Exit { pid: 8, status: 1 }));
        assert!(hub.claim(Exit { pid: 7, status: 2 }));
        assert_eq!(rx.try_recv().ok(), Some(2));
    }
}
