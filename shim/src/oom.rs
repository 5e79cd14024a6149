//! OOM notification for cgroup v1: an eventfd registered on the
//! container's `memory.oom_control` through `cgroup.event_control`.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use nix::sys::eventfd::{EfdFlags, EventFd};
use tokio::io::unix::AsyncFd;

/// The v1 memory cgroup directory of `pid`, from `/proc/PID/cgroup`.
pub fn memory_cgroup_dir(pid: i32) -> Option<PathBuf> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    parse_memory_cgroup(&text).map(|rel| Path::new("/sys/fs/cgroup/memory").join(rel))
}

fn parse_memory_cgroup(text: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let _id = parts.next()?;
        let controllers = parts.next()?;
        let path = parts.next()?;
        controllers
            .split(',')
            .any(|c| c == "memory")
            .then(|| path.trim_start_matches('/').to_string())
    })
}

/// Starts watching the memory cgroup of `pid`; `on_oom` runs for each OOM
/// event while the cgroup exists. Returns `None` (after logging why) when
/// there is nothing to watch, e.g. on a cgroup v2 only host.
pub fn watch<F>(id: &str, pid: i32, on_oom: F) -> Option<tokio::task::AbortHandle>
where
    F: Fn() + Send + 'static,
{
    let dir = memory_cgroup_dir(pid)?;
    match register(&dir) {
        Ok((efd, control)) => {
            let id = id.to_string();
            let task = tokio::spawn(async move {
                let _control = control;
                loop {
                    let mut guard = match efd.readable().await {
                        Ok(g) => g,
                        Err(e) => {
                            tracing::warn!(id = %id, "OOM watch ended: {e}");
                            return;
                        }
                    };
                    match guard.try_io(|fd| fd.get_ref().read().map_err(std::io::Error::from)) {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => {
                            tracing::warn!(id = %id, "OOM watch ended: {e}");
                            return;
                        }
                        Err(_would_block) => continue,
                    }
                    // The eventfd also fires when the cgroup is removed.
                    if !dir.join("memory.oom_control").exists() {
                        return;
                    }
                    tracing::warn!(id = %id, "container ran out of memory");
                    on_oom();
                }
            });
            Some(task.abort_handle())
        }
        Err(e) => {
            tracing::warn!(id, cgroup = %dir.display(), "no OOM events: {e}");
            None
        }
    }
}

fn register(dir: &Path) -> std::io::Result<(AsyncFd<EventFd>, File)> {
    let control = File::open(dir.join("memory.oom_control"))?;
    let efd = EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
        .map_err(std::io::Error::from)?;
    let line = format!("{} {}", efd.as_raw_fd(), control.as_raw_fd());
    std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join("cgroup.event_control"))?
        .write_all(line.as_bytes())?;
    // SAFETY: the EventFd owns its descriptor, which stays open and the same
    // until the AsyncFd (which owns the EventFd) is dropped.
    let efd = unsafe { AsyncFd::register(efd) }.map_err(std::io::Error::from)?;
    Ok((efd, control))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_memory_controller() {
        let text = "12:pids:/ms2m/c1\n5:cpu,cpuacct:/ms2m/c1\n4:memory:/ms2m/c1\n0::/\n";
        assert_eq!(parse_memory_cgroup(text).as_deref(), Some("ms2m/c1"));
        assert_eq!(parse_memory_cgroup("0::/user.slice\n"), None);
    }
}
