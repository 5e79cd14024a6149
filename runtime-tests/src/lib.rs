//! Helpers for ms2m's integration tests.
//!
//! The tests drive a real containerd (ms2m's own instance, see `hack/lib.sh`)
//! through `ctr`, with the runtime named by `MS2M_TEST_RUNTIME` (default
//! `io.containerd.ms2m.v1`; `io.containerd.runc.v2` runs the same tests
//! against containerd's own shim as a baseline).
//!
//! - [`env`] checks the prerequisites once and panics with what is missing and
//!   how to get it: tests never skip silently.
//! - [`Container`] runs the test workload (`memcounter`) and kills and deletes
//!   task and container when dropped, also when the test panics.
//! - [`wait_until`] polls instead of sleeping for a fixed time.
//! - [`Events`] records `ctr events` in the background.
//! - [`TestDir`] gives each test its own directory under /dev/shm/ms2m-tests.

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Host-side AMQP helpers: producer, result collector, checker (broker tests).
pub mod amqp;
pub mod cri;
pub mod host_b;
/// The soak: hours of load with checkpoints and restores (issue 9).
pub mod soak;

/// The runtime of containerd's own runc shim: the baseline.
pub const RUNC_RUNTIME: &str = "io.containerd.runc.v2";
/// ms2m's runtime type.
pub const MS2M_RUNTIME: &str = "io.containerd.ms2m.v1";
/// Where tests put their checkpoint images and work dirs (tmpfs, for speed).
pub const TEST_ROOT: &str = "/dev/shm/ms2m-tests";
/// The workload inside the test image.
pub const MEMCOUNTER: &str = "/usr/local/bin/memcounter";
/// Timeout for one `ctr` or `ms2m` invocation: a hung shim must fail the test,
/// not hang the suite.
pub const CMD_TIMEOUT: Duration = Duration::from_secs(90);

const SETUP_HINT: &str = "run `sudo hack/setup.sh` from the repository root (it installs CRIU, \
containerd, runc, builds and installs ms2m's shim and CLI, starts containerd and imports the \
test image)";

/// What the tests run against, read from the environment (the same variables
/// as `hack/lib.sh`).
#[derive(Debug, Clone)]
pub struct TestEnv {
    pub address: String,
    pub namespace: String,
    pub runtime: String,
    pub image: String,
    pub ctr: PathBuf,
}

impl TestEnv {
    fn from_env() -> TestEnv {
        let var = |name: &str, default: &str| {
            std::env::var(name)
                .ok()
                .filter(|v| !v.is_empty())
                .unwrap_or_else(|| default.to_string())
        };
        TestEnv {
            address: var(
                "MS2M_CONTAINERD_ADDRESS",
                "/run/ms2m/containerd/containerd.sock",
            ),
            namespace: var("MS2M_NAMESPACE", "ms2m"),
            runtime: var("MS2M_TEST_RUNTIME", MS2M_RUNTIME),
            image: var("MS2M_TEST_IMAGE", "docker.io/library/ms2m-test:latest"),
            ctr: which("ctr").unwrap_or_else(|| PathBuf::from("ctr")),
        }
    }

    /// True when the tests run against ms2m's shim (not the runc baseline).
    pub fn is_ms2m(&self) -> bool {
        self.runtime == MS2M_RUNTIME || self.runtime.ends_with("/containerd-shim-ms2m-v1")
    }
}

/// The checked test environment. The first call checks every prerequisite and
/// panics with the complete list of what is missing.
pub fn env() -> &'static TestEnv {
    static ENV: OnceLock<TestEnv> = OnceLock::new();
    ENV.get_or_init(|| {
        let env = TestEnv::from_env();
        let missing = check_prerequisites(&env);
        if !missing.is_empty() {
            panic!(
                "ms2m integration test prerequisites are missing:\n  - {}\nTo fix: {SETUP_HINT}.",
                missing.join("\n  - ")
            );
        }
        eprintln!(
            "ms2m tests: runtime {} on containerd {} (namespace {})",
            env.runtime, env.address, env.namespace
        );
        env
    })
}

/// The `ms2m` CLI, checked: panics if it is not installed.
pub fn ms2m_cli() -> PathBuf {
    env();
    match which("ms2m") {
        Some(p) => p,
        None => panic!(
            "the `ms2m` CLI is not installed (expected on PATH or in /usr/local/bin). \
             To fix: {SETUP_HINT}, or `cargo build --release -p ms2m-cli && \
             install -m755 target/release/ms2m /usr/local/bin/`."
        ),
    }
}

fn check_prerequisites(env: &TestEnv) -> Vec<String> {
    let mut missing = Vec::new();
    for (bin, what) in [
        ("ctr", "containerd's ctr (containerd 2.x)"),
        ("runc", "runc"),
        ("criu", "CRIU >= 4.2"),
    ] {
        if which(bin).is_none() {
            missing.push(format!("`{bin}` not found on PATH: {what}"));
        }
    }
    if let Some(criu) = which("criu") {
        match run_cmd(
            Command::new(&criu).arg("--version"),
            Duration::from_secs(10),
        ) {
            Ok(out) => match criu_version_of(&out.stdout) {
                Some(v) if version_at_least(&v, &[4, 2]) => {}
                Some(v) => missing.push(format!(
                    "CRIU {v} at {} is too old: this kernel needs CRIU >= 4.2",
                    criu.display()
                )),
                None => missing.push(format!(
                    "`{} --version` printed no version: {}",
                    criu.display(),
                    out.stdout.trim()
                )),
            },
            Err(e) => missing.push(format!("cannot run {}: {e}", criu.display())),
        }
    }
    if env.runtime.starts_with("io.containerd.") {
        let shim = shim_binary_name(&env.runtime);
        if which(&shim).is_none() {
            missing.push(format!(
                "shim `{shim}` for runtime {} not found on PATH (install it to /usr/local/bin)",
                env.runtime
            ));
        }
    }
    if which("ctr").is_some() {
        match run_cmd(
            Command::new(&env.ctr)
                .args(["--address", &env.address])
                .arg("version"),
            Duration::from_secs(10),
        ) {
            Ok(out) if out.success() => {
                match run_cmd(
                    Command::new(&env.ctr)
                        .args(["--address", &env.address, "--namespace", &env.namespace])
                        .args(["images", "ls", "-q"]),
                    Duration::from_secs(10),
                ) {
                    Ok(out) if out.stdout.lines().any(|l| l.trim() == env.image) => {}
                    Ok(_) => missing.push(format!(
                        "image {} is not in containerd (namespace {}): run hack/build-image.sh",
                        env.image, env.namespace
                    )),
                    Err(e) => missing.push(format!("cannot list images: {e}")),
                }
            }
            Ok(out) => missing.push(format!(
                "containerd is not reachable at {} ({}): run hack/start-containerd.sh",
                env.address,
                out.stderr.trim()
            )),
            Err(e) => missing.push(format!("cannot run ctr: {e}")),
        }
    }
    missing
}

/// `io.containerd.ms2m.v1` -> `containerd-shim-ms2m-v1`.
pub fn shim_binary_name(runtime: &str) -> String {
    let rest = runtime.strip_prefix("io.containerd.").unwrap_or(runtime);
    let mut parts = rest.rsplitn(2, '.');
    let version = parts.next().unwrap_or_default();
    match parts.next() {
        Some(name) => format!("containerd-shim-{name}-{version}"),
        None => format!("containerd-shim-{version}"),
    }
}

/// Parses `criu --version` output ("Version: 4.2.1").
pub fn criu_version_of(output: &str) -> Option<String> {
    output.lines().find_map(|l| {
        l.trim()
            .strip_prefix("Version:")
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
    })
}

/// True when dotted version `v` is at least `min` (numeric components).
pub fn version_at_least(v: &str, min: &[u64]) -> bool {
    let parts: Vec<u64> = v
        .split(['.', '-', '+'])
        .map_while(|p| p.parse::<u64>().ok())
        .collect();
    for (i, want) in min.iter().enumerate() {
        let have = parts.get(i).copied().unwrap_or(0);
        if have != *want {
            return have > *want;
        }
    }
    true
}

/// Finds a binary on PATH or in the usual system directories (the test
/// harness's PATH may lack /usr/local/sbin, where CRIU lives).
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let extra = [
        "/usr/local/sbin",
        "/usr/local/bin",
        "/usr/sbin",
        "/usr/bin",
        "/sbin",
        "/bin",
    ];
    std::env::split_paths(&path)
        .chain(extra.iter().map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// The outcome of one command.
#[derive(Debug, Clone)]
pub struct CmdOut {
    /// The command line, for messages.
    pub cmd: String,
    /// Exit code; `None` when killed by a signal.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl CmdOut {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    /// Panics with everything the command printed unless it succeeded.
    pub fn ok(self) -> CmdOut {
        if !self.success() {
            panic!("command failed: {self}");
        }
        self
    }
}

impl std::fmt::Display for CmdOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "`{}` exited with {:?} after {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.cmd,
            self.code,
            self.elapsed,
            self.stdout.trim_end(),
            self.stderr.trim_end()
        )
    }
}

/// Runs a command with its output captured and a timeout (the child is
/// killed when the timeout passes).
pub fn run_cmd(cmd: &mut Command, timeout: Duration) -> Result<CmdOut, String> {
    let line = format!(
        "{} {}",
        cmd.get_program().to_string_lossy(),
        cmd.get_args()
            .map(OsStr::to_string_lossy)
            .collect::<Vec<_>>()
            .join(" ")
    );
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start `{line}`: {e}"))?;
    let out_reader = drain(child.stdout.take());
    let err_reader = drain(child.stderr.take());
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if start.elapsed() > timeout => {
                let _ = child.kill();
                let _ = child.wait();
                let stdout = out_reader.join().unwrap_or_default();
                let stderr = err_reader.join().unwrap_or_default();
                return Err(format!(
                    "`{line}` did not finish within {timeout:?} (killed)\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}"
                ));
            }
            Ok(None) => thread::sleep(Duration::from_millis(5)),
            Err(e) => return Err(format!("waiting for `{line}`: {e}")),
        }
    };
    Ok(CmdOut {
        cmd: line,
        code: status.code(),
        stdout: out_reader.join().unwrap_or_default(),
        stderr: err_reader.join().unwrap_or_default(),
        elapsed: start.elapsed(),
    })
}

fn drain<R: Read + Send + 'static>(r: Option<R>) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut r) = r {
            let _ = r.read_to_end(&mut buf);
        }
        String::from_utf8_lossy(&buf).into_owned()
    })
}

/// Runs `ctr --address A --namespace N ARGS...`; panics only if ctr cannot be
/// run at all or hangs. Check the result yourself, or call `.ok()`.
pub fn ctr<S: AsRef<OsStr>>(args: &[S]) -> CmdOut {
    let env = env();
    let mut cmd = Command::new(&env.ctr);
    cmd.args(["--address", &env.address, "--namespace", &env.namespace])
        .args(args);
    run_cmd(&mut cmd, CMD_TIMEOUT).unwrap_or_else(|e| panic!("{e}"))
}

/// Runs `ms2m --address A --namespace N ARGS...` (the CLI must be installed).
pub fn ms2m<S: AsRef<OsStr>>(args: &[S]) -> CmdOut {
    let cli = ms2m_cli();
    let env = env();
    let mut cmd = Command::new(cli);
    cmd.args(["--address", &env.address, "--namespace", &env.namespace])
        .args(args);
    run_cmd(&mut cmd, CMD_TIMEOUT).unwrap_or_else(|e| panic!("{e}"))
}

/// A name that no other test (nor an earlier run) uses: `PREFIX-PID-N-RAND`.
/// Valid as a container id, exec id and image reference component.
pub fn unique_id(prefix: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{prefix}-{}-{n}-{:05x}",
        std::process::id(),
        nanos & 0xfffff
    )
}

/// Polls `f` every `interval` until it returns `Some`, or panics after
/// `timeout` saying what was awaited (and the last observation, if any).
pub fn wait_until<T>(
    what: &str,
    timeout: Duration,
    interval: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        thread::sleep(interval);
    }
}

/// Status of one task from `ctr task ls` output (`TASK PID STATUS`):
/// `(pid, status)`.
pub fn parse_task_ls(output: &str, id: &str) -> Option<(u32, String)> {
    output.lines().skip(1).find_map(|l| {
        let mut f = l.split_whitespace();
        if f.next()? != id {
            return None;
        }
        let pid = f.next()?.parse().ok()?;
        let status = f.next()?.to_string();
        Some((pid, status))
    })
}

/// The path of `controller` in a `/proc/PID/cgroup` listing (cgroup v1).
pub fn cgroup_v1_path(proc_cgroup: &str, controller: &str) -> Option<String> {
    proc_cgroup.lines().find_map(|l| {
        let mut f = l.splitn(3, ':');
        let _ = f.next()?;
        let ctrls = f.next()?;
        let path = f.next()?;
        ctrls
            .split(',')
            .any(|c| c == controller)
            .then(|| path.to_string())
    })
}

/// `VmRSS` of process `pid` in KiB (`/proc/<pid>/status`), if it runs.
pub fn vm_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| {
        l.strip_prefix("VmRSS:")?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()
    })
}

/// Pids of shim processes started for container `id`: their command line
/// has `-id ID` (how containerd starts every shim v2).
pub fn shim_pids_for(id: &str) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        if is_shim_cmdline_for(&cmdline, id) {
            out.push(pid);
        }
    }
    out.sort();
    out
}

/// True when a NUL-separated command line is a containerd shim's for `id`.
pub fn is_shim_cmdline_for(cmdline: &[u8], id: &str) -> bool {
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    let is_shim = args
        .first()
        .and_then(|a| std::str::from_utf8(a).ok())
        .is_some_and(|a| {
            a.rsplit('/')
                .next()
                .unwrap_or(a)
                .starts_with("containerd-shim-")
        });
    is_shim
        && args
            .windows(2)
            .any(|w| w[0] == b"-id" && w[1] == id.as_bytes())
}

/// States of the children of process `pid` (`(child pid, state letter)`),
/// from /proc/PID/task/*/children.
pub fn child_states(pid: u32) -> Vec<(u32, char)> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in tasks.flatten() {
        let Ok(children) = std::fs::read_to_string(t.path().join("children")) else {
            continue;
        };
        for c in children
            .split_whitespace()
            .filter_map(|c| c.parse::<u32>().ok())
        {
            let state = std::fs::read_to_string(format!("/proc/{c}/stat"))
                .ok()
                .and_then(|s| proc_stat_state(&s))
                .unwrap_or('?');
            out.push((c, state));
        }
    }
    out
}

/// The state letter of a /proc/PID/stat line (after the parenthesised name).
pub fn proc_stat_state(stat: &str) -> Option<char> {
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

/// Parses the counter file's contents.
pub fn parse_counter(s: &str) -> Option<u64> {
    s.trim().parse().ok()
}

/// Options for running the test workload.
#[derive(Debug, Clone)]
pub struct RunOpts {
    /// Arguments after the image (command and its arguments); empty: the
    /// image's default command (memcounter).
    pub args: Vec<String>,
    /// Extra `ctr run` flags (before the image).
    pub flags: Vec<String>,
    /// `--null-io` unless a log URI or other IO flag is given.
    pub null_io: bool,
}

impl RunOpts {
    /// `memcounter [--mib N] --interval-ms M`.
    pub fn memcounter(mib: u64, interval_ms: u64) -> RunOpts {
        let mut args = vec![MEMCOUNTER.to_string()];
        if mib > 0 {
            args.extend(["--mib".to_string(), mib.to_string()]);
        }
        args.extend(["--interval-ms".to_string(), interval_ms.to_string()]);
        RunOpts {
            args,
            flags: Vec::new(),
            null_io: true,
        }
    }

    /// An arbitrary command.
    pub fn command(args: &[&str]) -> RunOpts {
        RunOpts {
            args: args.iter().map(|s| s.to_string()).collect(),
            flags: Vec::new(),
            null_io: true,
        }
    }

    pub fn flag(mut self, flag: &str) -> RunOpts {
        self.flags.push(flag.to_string());
        self
    }

    pub fn log_uri(mut self, uri: &str) -> RunOpts {
        self.flags.push(format!("--log-uri={uri}"));
        self.null_io = false;
        self
    }
}

/// A container under test. Dropping it kills and deletes its task and
/// deletes the container (snapshot included), also after a failed assertion;
/// after a failure it prints what containerd logged about it.
pub struct Container {
    pub id: String,
    exec_n: AtomicU64,
}

impl Container {
    /// `ctr run -d --runtime R IMAGE ID ARGS...` with a fresh unique id.
    pub fn run(prefix: &str, opts: RunOpts) -> Container {
        let env = env();
        let c = Container::adopt(&unique_id(prefix));
        let mut args: Vec<String> = vec![
            "run".into(),
            "-d".into(),
            "--runtime".into(),
            env.runtime.clone(),
        ];
        if opts.null_io {
            args.push("--null-io".into());
        }
        args.extend(opts.flags);
        args.push(env.image.clone());
        args.push(c.id.clone());
        args.extend(opts.args);
        ctr(&args).ok();
        c
    }

    /// Takes over cleanup of a container made by something else (a restore).
    pub fn adopt(id: &str) -> Container {
        Container {
            id: id.to_string(),
            exec_n: AtomicU64::new(0),
        }
    }

    /// `(pid, status)` from `ctr task ls`; `None` when there is no task.
    pub fn task(&self) -> Option<(u32, String)> {
        parse_task_ls(&ctr(&["task", "ls"]).ok().stdout, &self.id)
    }

    pub fn status(&self) -> Option<String> {
        self.task().map(|(_, s)| s)
    }

    /// The task's pid; panics if there is no task.
    pub fn pid(&self) -> u32 {
        match self.task() {
            Some((pid, _)) => pid,
            None => panic!("container {} has no task", self.id),
        }
    }

    /// Waits until `ctr task ls` shows `status` for this task.
    pub fn wait_status(&self, status: &str, timeout: Duration) {
        let start = Instant::now();
        loop {
            let last = self.status();
            if last.as_deref() == Some(status) {
                return;
            }
            if start.elapsed() > timeout {
                panic!(
                    "timed out after {timeout:?} waiting for task {} to be {status} (it is {last:?})",
                    self.id
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// A fresh exec id.
    pub fn exec_id(&self, what: &str) -> String {
        let n = self.exec_n.fetch_add(1, Ordering::Relaxed);
        unique_id(&format!("{what}{n}"))
    }

    /// `ctr task exec --exec-id <unique> ID ARGS...` (no terminal).
    pub fn exec(&self, args: &[&str]) -> CmdOut {
        let exec_id = self.exec_id("x");
        let mut a = vec!["task", "exec", "--exec-id", &exec_id, &self.id];
        a.extend_from_slice(args);
        ctr(&a)
    }

    /// The counter as the container sees it (`cat /tmp/counter` through an
    /// exec); `None` if the exec fails or the file is not there yet.
    pub fn try_counter(&self) -> Option<u64> {
        let out = self.exec(&["cat", "/tmp/counter"]);
        if out.success() {
            parse_counter(&out.stdout)
        } else {
            None
        }
    }

    /// The counter through an exec; panics with the exec's output on failure.
    pub fn counter(&self) -> u64 {
        let out = self.exec(&["cat", "/tmp/counter"]).ok();
        parse_counter(&out.stdout)
            .unwrap_or_else(|| panic!("counter file of {} holds {:?}", self.id, out.stdout))
    }

    /// The counter read from the host through /proc/PID/root (works while
    /// the task is paused or frozen, where an exec would not).
    pub fn host_counter(&self) -> Option<u64> {
        let (pid, _) = self.task()?;
        std::fs::read_to_string(format!("/proc/{pid}/root/tmp/counter"))
            .ok()
            .and_then(|s| parse_counter(&s))
    }

    /// Waits until the counter (read through exec) exceeds `above`; returns it.
    pub fn wait_counter_above(&self, above: u64, timeout: Duration) -> u64 {
        let start = Instant::now();
        loop {
            let last = self.try_counter();
            if let Some(v) = last.filter(|v| *v > above) {
                return v;
            }
            if start.elapsed() > timeout {
                let task = self.task();
                panic!(
                    "timed out after {timeout:?} waiting for the counter of {} to exceed {above} \
                     (last read {last:?}, task {task:?})",
                    self.id
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// The freezer cgroup state (`THAWED`, `FROZEN`, `FREEZING`) of the task's
    /// init process, read from cgroup v1; `None` where that is not readable.
    pub fn freezer_state(&self) -> Option<String> {
        self.cgroup_v1_file("freezer", "freezer.state")
    }

    /// Contents (trimmed) of `file` in the task's cgroup v1 `controller`
    /// directory; `None` without a task or where that is not readable.
    pub fn cgroup_v1_file(&self, controller: &str, file: &str) -> Option<String> {
        let (pid, _) = self.task()?;
        let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
        let path = cgroup_v1_path(&cg, controller)?;
        std::fs::read_to_string(format!("/sys/fs/cgroup/{controller}{path}/{file}"))
            .ok()
            .map(|s| s.trim().to_string())
    }

    /// Pid of this container's shim process (found by its `-id ID` argument).
    pub fn shim_pid(&self) -> Option<u32> {
        shim_pids_for(&self.id).into_iter().next()
    }

    /// Resident set size of the task's init process in KiB.
    pub fn rss_kib(&self) -> Option<u64> {
        vm_rss_kib(self.task()?.0)
    }

    /// `ctr task checkpoint ARGS... ID`.
    ///
    /// ctr (2.1) records every `ctr task checkpoint` of a runtime other than
    /// `io.containerd.runc.v2` as an image named
    /// `containerd.io/checkpoint/ID:MM-DD-YYYY-HH:MM:SS`, so a second
    /// checkpoint of the same container within the same second fails in ctr
    /// itself ("already exists"), whatever the shim does. This waits for the
    /// next wall-clock second when needed.
    pub fn ctr_checkpoint(&self, args: &[&str]) -> CmdOut {
        static LAST: Mutex<Vec<(String, u64)>> = Mutex::new(Vec::new());
        let now = || {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0)
        };
        let last = LAST
            .lock()
            .ok()
            .and_then(|l| l.iter().find(|(id, _)| *id == self.id).map(|(_, t)| *t));
        if let Some(last) = last {
            while now() <= last {
                thread::sleep(Duration::from_millis(10));
            }
        }
        let mut a = vec!["task", "checkpoint"];
        a.extend_from_slice(args);
        a.push(&self.id);
        let out = ctr(&a);
        if let Ok(mut l) = LAST.lock() {
            l.retain(|(id, _)| *id != self.id);
            l.push((self.id.clone(), now()));
        }
        out
    }

    /// Kills (SIGKILL, all processes) and deletes the task, keeps the container.
    pub fn kill_and_delete_task(&self) {
        if self.task().is_none() {
            return;
        }
        let _ = ctr(&["task", "kill", "--all", "--signal", "SIGKILL", &self.id]);
        let what = format!("task {} to stop after SIGKILL", self.id);
        wait_until(
            &what,
            Duration::from_secs(20),
            Duration::from_millis(20),
            || match self.status() {
                None => Some(()),
                Some(s) if s == "STOPPED" => Some(()),
                Some(_) => None,
            },
        );
        ctr(&["task", "delete", "--force", &self.id]).ok();
    }

    /// Prints containerd's log lines about this container (after a failure).
    pub fn print_log(&self) {
        let log = std::env::var("MS2M_CONTAINERD_LOG")
            .unwrap_or_else(|_| "/var/log/ms2m/containerd.log".into());
        if let Ok(text) = std::fs::read_to_string(&log) {
            let lines: Vec<&str> = text.lines().filter(|l| l.contains(&self.id)).collect();
            let tail = &lines[lines.len().saturating_sub(40)..];
            eprintln!(
                "--- {log}, lines mentioning {} ---\n{}",
                self.id,
                tail.join("\n")
            );
        }
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if thread::panicking() {
            self.print_log();
        }
        // Best effort, never panic in drop.
        let env = env();
        let base = |args: &[&str]| {
            let mut cmd = Command::new(&env.ctr);
            cmd.args(["--address", &env.address, "--namespace", &env.namespace])
                .args(args);
            run_cmd(&mut cmd, Duration::from_secs(30))
        };
        let _ = base(&["task", "kill", "--all", "--signal", "SIGKILL", &self.id]);
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            match base(&["task", "ls"]) {
                Ok(out) => match parse_task_ls(&out.stdout, &self.id) {
                    Some((_, s)) if s != "STOPPED" => thread::sleep(Duration::from_millis(20)),
                    _ => break,
                },
                Err(_) => break,
            }
        }
        let _ = base(&["task", "delete", "--force", &self.id]);
        if let Ok(out) = base(&["container", "delete", &self.id]) {
            if !out.success() && !out.stderr.contains("not found") {
                eprintln!("cleanup of container {}: {out}", self.id);
            }
        }
        // ctr records each `ctr task checkpoint` of a non-runc runtime as an
        // image containerd.io/checkpoint/ID:TIME; do not leave them behind.
        if let Ok(out) = base(&["images", "ls", "-q"]) {
            let prefix = format!("containerd.io/checkpoint/{}:", self.id);
            let stale: Vec<&str> = out
                .stdout
                .lines()
                .map(str::trim)
                .filter(|l| l.starts_with(&prefix))
                .collect();
            if !stale.is_empty() {
                let mut args = vec!["images", "rm"];
                args.extend(stale);
                let _ = base(&args);
            }
        }
    }
}

/// A checkpoint image in containerd's image store, removed on drop.
pub struct ImageRef {
    pub name: String,
}

impl ImageRef {
    /// A unique checkpoint reference, `ms2m-tests/PREFIX:TAG`.
    pub fn unique(prefix: &str) -> ImageRef {
        ImageRef {
            name: format!("ms2m-tests/{prefix}:{}", unique_id("ck")),
        }
    }
}

impl Drop for ImageRef {
    fn drop(&mut self) {
        let env = env();
        let mut cmd = Command::new(&env.ctr);
        cmd.args(["--address", &env.address, "--namespace", &env.namespace])
            .args(["images", "rm", &self.name]);
        let _ = run_cmd(&mut cmd, Duration::from_secs(30));
    }
}

/// A directory of its own for one test under /dev/shm/ms2m-tests, removed on
/// drop (after printing any CRIU logs in it if the test failed). Mounts
/// registered with [`TestDir::mounted`] are unmounted first.
pub struct TestDir {
    pub path: PathBuf,
    mounts: Mutex<Vec<PathBuf>>,
}

impl TestDir {
    pub fn new(test: &str) -> TestDir {
        let path = Path::new(TEST_ROOT).join(unique_id(test));
        std::fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("creating test dir {}: {e}", path.display()));
        TestDir {
            path,
            mounts: Mutex::new(Vec::new()),
        }
    }

    /// `self.path/name` (not created).
    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// `self.path/name`, created.
    pub fn subdir(&self, name: &str) -> PathBuf {
        let p = self.path.join(name);
        std::fs::create_dir_all(&p).unwrap_or_else(|e| panic!("creating {}: {e}", p.display()));
        p
    }

    /// Remembers a mount point to unmount on drop.
    pub fn mounted(&self, p: &Path) {
        if let Ok(mut m) = self.mounts.lock() {
            m.push(p.to_path_buf());
        }
    }

    /// Prints the tail of every `*.log` below the dir (CRIU's dump.log etc.).
    pub fn print_logs(&self) {
        for log in find_files(&self.path, &|p: &Path| {
            p.extension().is_some_and(|e| e == "log")
        }) {
            if let Ok(text) = std::fs::read_to_string(&log) {
                let lines: Vec<&str> = text.lines().collect();
                let tail = &lines[lines.len().saturating_sub(30)..];
                eprintln!("--- {} (tail) ---\n{}", log.display(), tail.join("\n"));
            }
        }
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if thread::panicking() {
            self.print_logs();
        }
        if let Ok(m) = self.mounts.lock() {
            for p in m.iter().rev() {
                let _ = Command::new("umount")
                    .arg("-l")
                    .arg(p)
                    .stderr(Stdio::null())
                    .status();
            }
        }
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// All files below `dir` (recursively) that satisfy `keep`.
pub fn find_files(dir: &Path, keep: &dyn Fn(&Path) -> bool) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            match e.file_type() {
                Ok(t) if t.is_dir() => stack.push(p),
                Ok(t) if t.is_file() && keep(&p) => out.push(p),
                _ => {}
            }
        }
    }
    out.sort();
    out
}

/// File names directly in `dir`.
pub fn file_names(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// One line of `ctr events`.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub namespace: String,
    pub topic: String,
    pub payload: serde_json::Value,
}

impl Event {
    /// Parses `2026-11-28 01:39:21.56 +0000 UTC ms2m /tasks/create {json}`.
    pub fn parse(line: &str) -> Option<Event> {
        let words: Vec<&str> = line.split(' ').collect();
        let ti = words.iter().position(|w| w.starts_with('/'))?;
        let namespace = words.get(ti.checked_sub(1)?)?.to_string();
        let topic = words[ti].to_string();
        let rest = words[ti + 1..].join(" ");
        let payload = if rest.trim().is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_str(rest.trim()).ok()?
        };
        Some(Event {
            namespace,
            topic,
            payload,
        })
    }

    /// The container the event is about (`container_id`, or `id` for
    /// container events).
    pub fn container_id(&self) -> Option<&str> {
        self.payload
            .get("container_id")
            .or_else(|| {
                self.topic
                    .starts_with("/containers/")
                    .then(|| self.payload.get("id"))
                    .flatten()
            })
            .and_then(|v| v.as_str())
    }
}

/// `ctr events` running in the background, its lines collected.
pub struct Events {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Events {
    /// Starts `ctr events` and returns once it demonstrably receives events
    /// (a probe label update on the test image has come through).
    pub fn start() -> Events {
        let env = env();
        let mut child = Command::new(&env.ctr)
            .args([
                "--address",
                &env.address,
                "--namespace",
                &env.namespace,
                "events",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start `ctr events`: {e}"));
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&lines);
        let mut stdout = child.stdout.take();
        thread::spawn(move || {
            use std::io::BufRead;
            if let Some(out) = stdout.take() {
                for line in std::io::BufReader::new(out).lines() {
                    let Ok(line) = line else { break };
                    if let Ok(mut l) = sink.lock() {
                        l.push(line);
                    }
                }
            }
        });
        let events = Events { child, lines };
        let probe = unique_id("probe");
        let start = Instant::now();
        // Label updates publish /images/update; repeat until one arrives.
        loop {
            ctr(&[
                "images",
                "label",
                &env.image,
                &format!("ms2m.test.probe={probe}"),
            ])
            .ok();
            let seen = Instant::now();
            while seen.elapsed() < Duration::from_millis(500) {
                if events.events().iter().any(|e| e.topic == "/images/update") {
                    return events;
                }
                thread::sleep(Duration::from_millis(10));
            }
            if start.elapsed() > Duration::from_secs(10) {
                panic!("`ctr events` received nothing within 10 s");
            }
        }
    }

    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().map(|l| l.clone()).unwrap_or_default()
    }

    pub fn events(&self) -> Vec<Event> {
        self.lines()
            .iter()
            .filter_map(|l| Event::parse(l))
            .collect()
    }

    /// Events about container `id`.
    pub fn for_container(&self, id: &str) -> Vec<Event> {
        self.events()
            .into_iter()
            .filter(|e| e.container_id() == Some(id))
            .collect()
    }

    /// Waits until an event with `topic` about container `id` arrived.
    pub fn wait_for(&self, topic: &str, id: &str, timeout: Duration) -> Event {
        self.wait_for_match(topic, id, timeout, |_| true)
    }

    /// Waits for the `/tasks/exit` of the container's init process (exec'd
    /// processes publish `/tasks/exit` too, with their exec id as `id`).
    pub fn wait_for_init_exit(&self, id: &str, timeout: Duration) -> Event {
        self.wait_for_match("/tasks/exit", id, timeout, |e| e.payload["id"] == id)
    }

    /// Waits until an event with `topic` about container `id` for which
    /// `pred` holds arrived.
    pub fn wait_for_match(
        &self,
        topic: &str,
        id: &str,
        timeout: Duration,
        pred: impl Fn(&Event) -> bool,
    ) -> Event {
        let what = format!("event {topic} for container {id}");
        let start = Instant::now();
        loop {
            if let Some(e) = self
                .for_container(id)
                .into_iter()
                .find(|e| e.topic == topic && pred(e))
            {
                return e;
            }
            if start.elapsed() > timeout {
                panic!(
                    "timed out after {timeout:?} waiting for {what}; events so far:\n{}",
                    self.lines().join("\n")
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Events {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Mounts a read-only tmpfs at `dir` (created), registered with `td` for
/// unmounting.
pub fn mount_readonly_tmpfs(td: &TestDir, dir: &Path) {
    std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    let out = run_cmd(
        Command::new("mount")
            .args(["-t", "tmpfs", "-o", "ro,size=1m", "ms2m-test-ro"])
            .arg(dir),
        Duration::from_secs(10),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    if !out.success() {
        panic!("mounting a read-only tmpfs (needs root): {out}");
    }
    td.mounted(dir);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_task_ls() {
        let out = "TASK    PID      STATUS    \nabc     15584    PAUSED\nabcd    1    RUNNING\n";
        assert_eq!(
            parse_task_ls(out, "abc"),
            Some((15584, "PAUSED".to_string()))
        );
        assert_eq!(parse_task_ls(out, "abcd"), Some((1, "RUNNING".to_string())));
        assert_eq!(parse_task_ls(out, "ab"), None);
        assert_eq!(parse_task_ls("TASK PID STATUS\n", "abc"), None);
    }

    #[test]
    fn parses_events() {
        let line = "2026-11-28 01:39:22.12007514 +0000 UTC ms2m /tasks/exit {\"container_id\":\"c3\",\"id\":\"t1\",\"pid\":15615,\"exit_status\":5}";
        let e = Event::parse(line).expect("parses");
        assert_eq!(e.namespace, "ms2m");
        assert_eq!(e.topic, "/tasks/exit");
        assert_eq!(e.container_id(), Some("c3"));
        assert_eq!(e.payload["exit_status"], 5);

        let c = Event::parse(
            "2026-11-28 01:39:22.84 +0000 UTC ms2m /containers/delete {\"id\":\"c3\"}",
        )
        .expect("parses");
        assert_eq!(c.container_id(), Some("c3"));
        // `id` of a task event is the process, not the container.
        let t = Event::parse("2026-11-28 01:39:22.84 +0000 UTC ms2m /tasks/oom {\"id\":\"x\"}")
            .expect("parses");
        assert_eq!(t.container_id(), None);
        assert!(Event::parse("garbage").is_none());
        assert!(Event::parse("2026-11-28 01:39:22 +0000 UTC ms2m /tasks/exit {broken").is_none());
    }

    #[test]
    fn cgroup_paths() {
        let cg = "12:freezer:/ms2m/abc\n11:memory:/ms2m/abc\n3:cpu,cpuacct:/ms2m/abc\n0::/\n";
        assert_eq!(cgroup_v1_path(cg, "freezer").as_deref(), Some("/ms2m/abc"));
        assert_eq!(cgroup_v1_path(cg, "cpuacct").as_deref(), Some("/ms2m/abc"));
        assert_eq!(cgroup_v1_path(cg, "pids"), None);
    }

    #[test]
    fn shim_cmdlines() {
        let c = b"/usr/local/bin/containerd-shim-ms2m-v1\0-namespace\0ms2m\0-id\0abc\0-address\0/run/x.sock\0";
        assert!(is_shim_cmdline_for(c, "abc"));
        assert!(!is_shim_cmdline_for(c, "ab"));
        assert!(!is_shim_cmdline_for(b"sleep\0-id\0abc\0", "abc"));
    }

    #[test]
    fn stat_states() {
        assert_eq!(proc_stat_state("123 (a) b) Z 1 2 3"), Some('Z'));
        assert_eq!(proc_stat_state("1 (init) S 0"), Some('S'));
        assert_eq!(proc_stat_state("garbage"), None);
    }

    #[test]
    fn parses_counter() {
        assert_eq!(parse_counter("42\n"), Some(42));
        assert_eq!(parse_counter(""), None);
        assert_eq!(parse_counter("4x"), None);
    }

    #[test]
    fn shim_names() {
        assert_eq!(shim_binary_name(MS2M_RUNTIME), "containerd-shim-ms2m-v1");
        assert_eq!(shim_binary_name(RUNC_RUNTIME), "containerd-shim-runc-v2");
    }

    #[test]
    fn criu_versions() {
        let out = "Version: 4.2.1\nGitID: v4.2.1\n";
        assert_eq!(criu_version_of(out).as_deref(), Some("4.2.1"));
        assert!(version_at_least("4.2.1", &[4, 2]));
        assert!(version_at_least("4.2", &[4, 2]));
        assert!(version_at_least("5.0", &[4, 2]));
        assert!(!version_at_least("4.1.1", &[4, 2]));
        assert!(!version_at_least("3.17", &[4, 2]));
        assert_eq!(criu_version_of("nothing"), None);
    }

    #[test]
    fn unique_ids_are_unique_and_valid() {
        let a = unique_id("t");
        let b = unique_id("t");
        assert_ne!(a, b);
        assert!(a
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.'));
    }

    #[test]
    fn timeout_kills_hung_command() {
        let err = run_cmd(Command::new("sleep").arg("5"), Duration::from_millis(100))
            .expect_err("must time out");
        assert!(err.contains("did not finish"), "{err}");
        let out = run_cmd(
            Command::new("sh").args(["-c", "echo out; echo err >&2; exit 3"]),
            Duration::from_secs(5),
        )
        .expect("runs");
        assert_eq!(out.code, Some(3));
        assert_eq!(out.stdout.trim(), "out");
        assert_eq!(out.stderr.trim(), "err");
    }
}
