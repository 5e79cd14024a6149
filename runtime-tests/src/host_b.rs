//! Host B: the second containerd of ms2m's own on this machine, the target of
//! live-migration tests (set up by `hack/host-b.sh start`, which
//! `hack/setup.sh` runs).
//!
//! Host B is a separate containerd process in its own network namespace
//! (`ms2m-b`, address [`HOST_B_IP`]; the host is [`HOST_B_HOST_IP`] from
//! inside) and its own mount namespace ([`HOST_B_MNTNS`]), with its own root,
//! state and socket ([`HOST_B_ADDRESS`]), the same containerd namespace as A
//! (`ms2m`) and the same test image. Inside B's mount namespace runc's default
//! roots are bind mounts of [`HOST_B_RUNC_ROOT`], so a container on B never
//! collides with one of the same id on A, whether or not the client passes a
//! runc root. The migration agent listens on [`HOST_B_AGENT`].
//!
//! - [`require_host_b`] / [`require_containerd_b`] panic with how to fix it
//!   when B is not up (tests never skip silently).
//! - [`ctr_b`] is [`crate::ctr`] against B.
//! - [`kill_containerd_b`] and [`start_containerd_b`] for fault tests: B's
//!   shims and containers survive the kill, a restarted containerd B
//!   reconnects to them.
//! - [`netns_exec`] runs a command "on host B" (its network and mount
//!   namespaces), e.g. to reach the broker as B sees it.

use crate::{env, run_cmd, CmdOut, CMD_TIMEOUT};
use std::ffi::OsStr;
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

/// containerd B's gRPC socket.
pub const HOST_B_ADDRESS: &str = "/run/ms2m-b/containerd/containerd.sock";
/// The migration agent inside host B.
pub const HOST_B_AGENT: &str = "10.88.0.2:7100";
/// Host B's address (its end of the veth).
pub const HOST_B_IP: &str = "10.88.0.2";
/// The host (A, the broker) as host B reaches it.
pub const HOST_B_HOST_IP: &str = "10.88.0.1";
/// The broker as seen from inside host B (for `io.ms2m.tap.upstream` on B).
pub const HOST_B_TAP_UPSTREAM: &str = "amqp://guest:guest@10.88.0.1:5672/%2f";
/// Host B's network namespace (`/run/netns/ms2m-b`).
pub const HOST_B_NETNS: &str = "ms2m-b";
/// Host B's pinned mount namespace.
pub const HOST_B_MNTNS: &str = "/run/ms2m-b/ns/mnt";
/// runc's root on host B (seen from the host; inside B it is also what
/// runc's default roots show).
pub const HOST_B_RUNC_ROOT: &str = "/run/ms2m-b/runc";
/// containerd B's pid file (written by `hack/host-b.sh start`).
pub const HOST_B_PIDFILE: &str = "/run/ms2m-b/containerd/containerd.pid";

const HOST_B_HINT: &str = "run `sudo hack/host-b.sh start` from the repository root \
(`hack/host-b.sh status` shows what runs; logs: /var/log/ms2m/containerd-b.log, \
/var/log/ms2m/agent-b.log)";

/// `hack/host-b.sh` in this checkout.
pub fn host_b_script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../hack/host-b.sh")
}

/// Runs `ctr --address HOST_B_ADDRESS --namespace N ARGS...` with the same
/// timeout as [`crate::ctr`]; check the result yourself, or call `.ok()`.
pub fn ctr_b<S: AsRef<OsStr>>(args: &[S]) -> CmdOut {
    let env = env();
    let mut cmd = Command::new(&env.ctr);
    cmd.args(["--address", HOST_B_ADDRESS, "--namespace", &env.namespace])
        .args(args);
    run_cmd(&mut cmd, CMD_TIMEOUT).unwrap_or_else(|e| panic!("{e}"))
}

/// Runs ARGS inside host B's network and mount namespaces (`nsenter`, not
/// `ip netns exec`, which would hide /sys/fs/cgroup).
pub fn netns_exec<S: AsRef<OsStr>>(args: &[S]) -> CmdOut {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--mount={HOST_B_MNTNS}"))
        .arg(format!("--net=/run/netns/{HOST_B_NETNS}"))
        .arg("--")
        .args(args);
    run_cmd(&mut cmd, CMD_TIMEOUT).unwrap_or_else(|e| panic!("{e}"))
}

/// True if containerd B answers `ctr version` within a few seconds.
pub fn containerd_b_answers() -> bool {
    let env = env();
    let mut cmd = Command::new(&env.ctr);
    cmd.args(["--address", HOST_B_ADDRESS, "version"]);
    run_cmd(&mut cmd, Duration::from_secs(5)).is_ok_and(|o| o.success())
}

/// True if something accepts TCP connections on [`HOST_B_AGENT`].
pub fn agent_answers() -> bool {
    let addr: SocketAddr = HOST_B_AGENT.parse().expect("HOST_B_AGENT is an address");
    TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_ok()
}

/// Panics, with how to fix it, unless containerd B answers.
pub fn require_containerd_b() {
    if !containerd_b_answers() {
        panic!("host B's containerd does not answer at {HOST_B_ADDRESS}. To fix: {HOST_B_HINT}.");
    }
}

/// Panics, with how to fix it, unless containerd B answers and the migration
/// agent accepts connections on [`HOST_B_AGENT`].
pub fn require_host_b() {
    require_containerd_b();
    if !agent_answers() {
        panic!(
            "host B's migration agent does not answer on {HOST_B_AGENT} (it starts only if \
             the installed `ms2m agent --help` works: install a CLI that has it). \
             To fix: {HOST_B_HINT}."
        );
    }
}

/// containerd B's pid, from its pid file, if that process is alive and is
/// containerd B.
pub fn containerd_b_pid() -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(HOST_B_PIDFILE)
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    String::from_utf8_lossy(&cmdline)
        .contains("containerd-b.toml")
        .then_some(pid)
}

/// Kills containerd B with SIGKILL (its shims and containers live on) and
/// waits until it is gone. Panics if it is not running.
pub fn kill_containerd_b() {
    let pid = containerd_b_pid()
        .unwrap_or_else(|| panic!("containerd B is not running ({HOST_B_PIDFILE}). {HOST_B_HINT}"));
    let out = run_cmd(
        Command::new("kill").args(["-9", &pid.to_string()]),
        Duration::from_secs(5),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(out.success(), "kill -9 containerd B: {out}");
    let start = Instant::now();
    while std::path::Path::new(&format!("/proc/{pid}")).exists() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "containerd B (pid {pid}) still there 10 s after SIGKILL"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Starts containerd B again (`hack/host-b.sh start`: idempotent, also starts
/// the agent if it is down); panics with the script's output if it fails.
pub fn start_containerd_b() {
    let script = host_b_script();
    let out = run_cmd(Command::new(&script).arg("start"), Duration::from_secs(180))
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(out.success(), "hack/host-b.sh start failed: {out}");
    require_containerd_b();
}
