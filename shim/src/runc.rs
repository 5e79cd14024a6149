//! A small driver for the runc command line.
//!
//! Every command runs as a child of the shim; its exit is collected through
//! [`ExitHub`] (the shim's reaper owns `waitpid`). Errors say which runc
//! command failed for which container, with runc's own message taken from
//! its stderr or, for commands whose stdio belong to the container, from
//! runc's JSON log file.

use std::ffi::{OsStr, OsString};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::OnceCell;

use crate::error::{Error, Result};
use crate::exits::ExitHub;

/// runc's default binary.
pub const DEFAULT_RUNC: &str = "runc";

/// The stdio a container process gets from the runc command that starts it.
#[derive(Debug, Default)]
pub struct ProcessStdio {
    /// Standard input (`/dev/null` when `None`).
    pub stdin: Option<OwnedFd>,
    /// Standard output (`/dev/null` when `None`).
    pub stdout: Option<OwnedFd>,
    /// Standard error (`/dev/null` when `None`).
    pub stderr: Option<OwnedFd>,
}

/// How a runc command's own stdio are wired.
enum CommandIo {
    /// Capture stdout and stderr; feed `input` on stdin.
    Capture { input: Option<Vec<u8>> },
    /// The stdio of the container process being created.
    Process(ProcessStdio),
}

/// What a captured command printed.
struct Output {
    stdout: Vec<u8>,
}

/// Options of `runc create`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CreateArgs {
    /// `--bundle`.
    pub bundle: PathBuf,
    /// `--pid-file`.
    pub pid_file: PathBuf,
    /// `--console-socket`.
    pub console_socket: Option<PathBuf>,
    /// `--no-pivot`.
    pub no_pivot: bool,
    /// `--no-new-keyring`.
    pub no_new_keyring: bool,
}

/// Options of `runc checkpoint`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckpointArgs {
    /// `--image-path`.
    pub image_path: PathBuf,
    /// `--work-path`.
    pub work_path: PathBuf,
    /// `--parent-path`.
    pub parent_path: Option<PathBuf>,
    /// `--leave-running`.
    pub leave_running: bool,
    /// `--tcp-established`.
    pub tcp_established: bool,
    /// `--ext-unix-sk`.
    pub external_unix_sockets: bool,
    /// `--shell-job`.
    pub shell_job: bool,
    /// `--file-locks`.
    pub file_locks: bool,
    /// `--empty-ns` (one per namespace).
    pub empty_namespaces: Vec<String>,
    /// `--manage-cgroups-mode`.
    pub cgroups_mode: Option<String>,
}

/// Appends `flag value` when there is a value.
fn push_value(a: &mut Vec<OsString>, flag: &str, value: Option<impl AsRef<OsStr>>) {
    if let Some(v) = value {
        a.push(flag.into());
        a.push(v.as_ref().to_os_string());
    }
}

/// Appends each flag that is on.
fn push_flags<const N: usize>(a: &mut Vec<OsString>, flags: [(bool, &str); N]) {
    for (on, flag) in flags {
        if on {
            a.push(flag.into());
        }
    }
}

impl CheckpointArgs {
    /// The argument list after `checkpoint`, without the container id.
    pub fn to_args(&self) -> Vec<OsString> {
        let mut a: Vec<OsString> = vec![
            "--image-path".into(),
            self.image_path.clone().into(),
            "--work-path".into(),
            self.work_path.clone().into(),
        ];
        push_value(&mut a, "--parent-path", self.parent_path.as_ref());
        push_flags(
            &mut a,
            [
                (self.leave_running, "--leave-running"),
                (self.tcp_established, "--tcp-established"),
                (self.external_unix_sockets, "--ext-unix-sk"),
                (self.shell_job, "--shell-job"),
                (self.file_locks, "--file-locks"),
            ],
        );
        for ns in &self.empty_namespaces {
            push_value(&mut a, "--empty-ns", Some(ns));
        }
        push_value(&mut a, "--manage-cgroups-mode", self.cgroups_mode.as_ref());
        a
    }
}

/// Options of `runc restore`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RestoreArgs {
    /// `--image-path`.
    pub image_path: PathBuf,
    /// `--work-path`.
    pub work_path: PathBuf,
    /// `--bundle`.
    pub bundle: PathBuf,
    /// `--pid-file`.
    pub pid_file: PathBuf,
    /// `--console-socket`.
    pub console_socket: Option<PathBuf>,
    /// `--tcp-established`.
    pub tcp_established: bool,
    /// `--ext-unix-sk`.
    pub external_unix_sockets: bool,
    /// `--shell-job`.
    pub shell_job: bool,
    /// `--file-locks`.
    pub file_locks: bool,
    /// `--no-pivot`.
    pub no_pivot: bool,
    /// `--manage-cgroups-mode`.
    pub cgroups_mode: Option<String>,
    /// `--lazy-pages` (a lazy-pages daemon serves the work dir).
    pub lazy_pages: bool,
}

impl RestoreArgs {
    /// The argument list after `restore`, without the container id.
    pub fn to_args(&self) -> Vec<OsString> {
        let mut a: Vec<OsString> = vec![
            "--detach".into(),
            "--no-subreaper".into(),
            "--image-path".into(),
            self.image_path.clone().into(),
            "--work-path".into(),
            self.work_path.clone().into(),
            "--bundle".into(),
            self.bundle.clone().into(),
            "--pid-file".into(),
            self.pid_file.clone().into(),
        ];
        push_value(&mut a, "--console-socket", self.console_socket.as_ref());
        push_flags(
            &mut a,
            [
                (self.tcp_established, "--tcp-established"),
                (self.external_unix_sockets, "--ext-unix-sk"),
                (self.shell_job, "--shell-job"),
                (self.file_locks, "--file-locks"),
                (self.no_pivot, "--no-pivot"),
                (self.lazy_pages, "--lazy-pages"),
            ],
        );
        push_value(&mut a, "--manage-cgroups-mode", self.cgroups_mode.as_ref());
        a
    }
}

/// runc, configured for one container's bundle.
#[derive(Debug, Clone)]
pub struct Runc {
    binary: PathBuf,
    root: PathBuf,
    log: PathBuf,
    systemd_cgroup: bool,
    /// `--criu`: the CRIU binary of the shim's configuration, for
    /// checkpoint and restore (see [`Runc::with_criu`]).
    criu: Option<PathBuf>,
}

impl Runc {
    /// runc's state directory (`--root`).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// A driver for `binary` (empty: `runc` on PATH) with state under
    /// `root`, logging to `<bundle>/log.json`.
    pub fn new(binary: &str, root: &Path, bundle: &Path, systemd_cgroup: bool) -> Self {
        Runc {
            binary: PathBuf::from(if binary.is_empty() {
                DEFAULT_RUNC
            } else {
                binary
            }),
            root: root.to_path_buf(),
            log: bundle.join("log.json"),
            systemd_cgroup,
            criu: None,
        }
    }

    /// The same runc, running `criu` for checkpoint and restore (runc's
    /// global `--criu`; without it runc runs `criu` from its PATH, not the
    /// binary the shim's `[criu] binary` names). runc 1.2 and later ignore
    /// the flag and always look `criu` up on PATH.
    pub fn with_criu(&self, criu: &Path) -> Runc {
        Runc {
            criu: Some(criu.to_path_buf()),
            ..self.clone()
        }
    }

    /// `runc create`.
    pub async fn create(&self, id: &str, args: &CreateArgs, stdio: ProcessStdio) -> Result<()> {
        let mut a: Vec<OsString> = vec![
            "create".into(),
            "--bundle".into(),
            args.bundle.clone().into(),
            "--pid-file".into(),
            args.pid_file.clone().into(),
        ];
        if let Some(s) = &args.console_socket {
            a.push("--console-socket".into());
            a.push(s.clone().into());
        }
        if args.no_pivot {
            a.push("--no-pivot".into());
        }
        if args.no_new_keyring {
            a.push("--no-new-keyring".into());
        }
        a.push(id.into());
        self.run("create", id, a, CommandIo::Process(stdio))
            .await
            .map(drop)
    }

    /// `runc start`.
    pub async fn start(&self, id: &str) -> Result<()> {
        self.captured("start", id, vec!["start".into(), id.into()])
            .await
            .map(drop)
    }

    /// `runc exec --detach` of the process described in `process_json`.
    pub async fn exec(
        &self,
        id: &str,
        process_json: &Path,
        pid_file: &Path,
        console_socket: Option<&Path>,
        stdio: ProcessStdio,
    ) -> Result<()> {
        let mut a: Vec<OsString> = vec![
            "exec".into(),
            "--detach".into(),
            "--process".into(),
            process_json.into(),
            "--pid-file".into(),
            pid_file.into(),
        ];
        if let Some(s) = console_socket {
            a.push("--console-socket".into());
            a.push(s.into());
        }
        a.push(id.into());
        self.run("exec", id, a, CommandIo::Process(stdio))
            .await
            .map(drop)
    }

    /// `runc kill [--all] ID SIGNAL`.
    pub async fn kill(&self, id: &str, signal: u32, all: bool) -> Result<()> {
        let mut a: Vec<OsString> = vec!["kill".into()];
        if all {
            a.push("--all".into());
        }
        a.push(id.into());
        a.push(signal.to_string().into());
        self.captured("kill", id, a).await.map(drop)
    }

    /// `runc delete [--force]`.
    pub async fn delete(&self, id: &str, force: bool) -> Result<()> {
        let mut a: Vec<OsString> = vec!["delete".into()];
        if force {
            a.push("--force".into());
        }
        a.push(id.into());
        self.captured("delete", id, a).await.map(drop)
    }

    /// `runc pause`.
    pub async fn pause(&self, id: &str) -> Result<()> {
        self.captured("pause", id, vec!["pause".into(), id.into()])
            .await
            .map(drop)
    }

    /// `runc resume`.
    pub async fn resume(&self, id: &str) -> Result<()> {
        self.captured("resume", id, vec!["resume".into(), id.into()])
            .await
            .map(drop)
    }

    /// `runc ps --format json`: the pids of the container's processes.
    pub async fn ps(&self, id: &str) -> Result<Vec<i32>> {
        let out = self
            .captured(
                "ps",
                id,
                vec!["ps".into(), "--format".into(), "json".into(), id.into()],
            )
            .await?;
        parse_ps(&out.stdout).map_err(|e| Error::internal(format!("runc ps of container {id}"), e))
    }

    /// `runc state`: the container's status as runc sees it
    /// (`created`, `running`, `paused`, `stopped`).
    pub async fn status(&self, id: &str) -> Result<String> {
        let out = self
            .captured("state", id, vec!["state".into(), id.into()])
            .await?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)
            .map_err(|e| Error::internal(format!("parse runc state of container {id}"), e))?;
        Ok(v.get("status")
            .and_then(|s| s.as_str())
            .unwrap_or("unknown")
            .to_string())
    }

    /// `runc update --resources -` with the LinuxResources JSON on stdin.
    pub async fn update(&self, id: &str, resources_json: Vec<u8>) -> Result<()> {
        self.run(
            "update",
            id,
            vec!["update".into(), "--resources".into(), "-".into(), id.into()],
            CommandIo::Capture {
                input: Some(resources_json),
            },
        )
        .await
        .map(drop)
    }

    /// `runc checkpoint`.
    pub async fn checkpoint(&self, id: &str, args: &CheckpointArgs) -> Result<()> {
        let mut a: Vec<OsString> = vec!["checkpoint".into()];
        a.extend(args.to_args());
        a.push(id.into());
        self.captured("checkpoint", id, a).await.map(drop)
    }

    /// `runc restore --detach`: the restored process gets `stdio`.
    pub async fn restore(&self, id: &str, args: &RestoreArgs, stdio: ProcessStdio) -> Result<()> {
        let mut a: Vec<OsString> = vec!["restore".into()];
        a.extend(args.to_args());
        a.push(id.into());
        self.run("restore", id, a, CommandIo::Process(stdio))
            .await
            .map(drop)
    }

    /// `runc --version`, first line's version number.
    pub async fn version(&self) -> Result<String> {
        let out = self
            .run(
                "--version",
                "-",
                vec!["--version".into()],
                CommandIo::Capture { input: None },
            )
            .await?;
        let text = String::from_utf8_lossy(&out.stdout);
        Ok(text
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("runc version "))
            .unwrap_or("unknown")
            .trim()
            .to_string())
    }

    async fn captured(&self, what: &str, id: &str, args: Vec<OsString>) -> Result<Output> {
        self.run(what, id, args, CommandIo::Capture { input: None })
            .await
    }

    async fn run(
        &self,
        what: &str,
        id: &str,
        args: Vec<OsString>,
        io: CommandIo,
    ) -> Result<Output> {
        let mut cmd = std::process::Command::new(&self.binary);
        cmd.arg("--root")
            .arg(&self.root)
            .arg("--log")
            .arg(&self.log)
            .arg("--log-format")
            .arg("json");
        if self.systemd_cgroup {
            cmd.arg("--systemd-cgroup");
        }
        if let Some(c) = &self.criu {
            cmd.arg("--criu").arg(c);
        }
        cmd.args(&args);
        let (capture, input) = match io {
            CommandIo::Capture { input } => {
                cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
                cmd.stdin(if input.is_some() {
                    Stdio::piped()
                } else {
                    Stdio::null()
                });
                (true, input)
            }
            CommandIo::Process(p) => {
                cmd.stdin(p.stdin.map(Stdio::from).unwrap_or_else(Stdio::null));
                cmd.stdout(p.stdout.map(Stdio::from).unwrap_or_else(Stdio::null));
                cmd.stderr(p.stderr.map(Stdio::from).unwrap_or_else(Stdio::null));
                (false, None)
            }
        };
        let log_offset = std::fs::metadata(&self.log).map(|m| m.len()).unwrap_or(0);
        let context = || format!("runc {what} of container {id}");

        let mut child = cmd.spawn().map_err(|e| {
            Error::internal(format!("{}: start {}", context(), self.binary.display()), e)
        })?;
        // Register before any await: the reaper runs on this same thread.
        let pid = child.id() as i32;
        let exited = ExitHub::global().register(pid);
        // The command owns the container's stdio now; ours must go so the
        // container's pipes see EOF when it exits.
        drop(cmd);

        let mut stdout = Vec::new();
        let mut stderr = Vec::new();
        if capture {
            let out = child.stdout.take().map(OwnedFd::from);
            let err = child.stderr.take().map(OwnedFd::from);
            let inp = child.stdin.take().map(OwnedFd::from);
            let feed = async {
                if let (Some(fd), Some(data)) = (inp, input) {
                    if let Ok(mut w) = pipe::Sender::from_owned_fd(fd) {
                        let _ = w.write_all(&data).await;
                    }
                }
            };
            let (r1, r2, ()) = tokio::join!(read_all(out), read_all(err), feed);
            stdout = r1;
            stderr = r2;
        }
        drop(child);

        let status = match exited.await {
            Ok(s) => s,
            Err(_) => {
                ExitHub::global().unregister(pid);
                return Err(Error::Internal(format!(
                    "{}: lost track of runc (pid {pid})",
                    context()
                )));
            }
        };
        if status != 0 {
            // One line: the message ends up in containerd's line-based log.
            let detail = error_detail(&stderr, &self.log, log_offset).replace('\n', "; ");
            return Err(Error::Internal(format!(
                "{} failed (exit status {status}): {detail}",
                context()
            )));
        }
        Ok(Output { stdout })
    }
}

async fn read_all(fd: Option<OwnedFd>) -> Vec<u8> {
    let mut buf = Vec::new();
    if let Some(fd) = fd {
        if let Ok(mut r) = pipe::Receiver::from_owned_fd(fd) {
            let _ = r.read_to_end(&mut buf).await;
        }
    }
    buf
}

/// runc's explanation of a failure: the error records runc appended to its
/// JSON log since `offset`, else its stderr.
fn error_detail(stderr: &[u8], log: &Path, offset: u64) -> String {
    let from_log = std::fs::read(log)
        .ok()
        .map(|data| {
            let start = (offset as usize).min(data.len());
            log_errors(&String::from_utf8_lossy(&data[start..]))
        })
        .unwrap_or_default();
    if !from_log.is_empty() {
        return from_log;
    }
    let text = String::from_utf8_lossy(stderr).trim().to_string();
    if text.is_empty() {
        "no error message from runc".to_string()
    } else {
        text
    }
}

/// Messages of the `error`/`fatal` records of a runc JSON log.
fn log_errors(text: &str) -> String {
    let mut msgs = Vec::new();
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let level = v.get("level").and_then(|l| l.as_str()).unwrap_or("");
        if level == "error" || level == "fatal" {
            if let Some(m) = v.get("msg").and_then(|m| m.as_str()) {
                msgs.push(m.trim().to_string());
            }
        }
    }
    msgs.join("; ")
}

fn parse_ps(out: &[u8]) -> std::result::Result<Vec<i32>, String> {
    let text = String::from_utf8_lossy(out);
    let text = text.trim();
    if text.is_empty() || text == "null" {
        return Ok(Vec::new());
    }
    serde_json::from_str::<Vec<i32>>(text).map_err(|e| format!("unexpected output {text:?}: {e}"))
}

/// Reads a pid file runc wrote.
pub fn read_pid(path: &Path) -> Result<i32> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::internal(format!("read pid file {}", path.display()), e))?;
    text.trim()
        .parse::<i32>()
        .map_err(|e| Error::internal(format!("parse pid file {}", path.display()), e))
}

/// runc's version, asked once per shim process.
pub(crate) async fn runc_version(runc: &Runc) -> Option<String> {
    static VERSION: OnceCell<Option<String>> = OnceCell::const_new();
    VERSION
        .get_or_init(|| async {
            runc.version()
                .await
                .map_err(|e| tracing::warn!("runc version unknown: {e}"))
                .ok()
        })
        .await
        .clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoint_args() {
        let a = CheckpointArgs {
            image_path: "/dev/shm/x".into(),
            work_path: "/dev/shm/w".into(),
            leave_running: true,
            tcp_established: true,
            empty_namespaces: vec!["network".into()],
            ..Default::default()
        };
        let s: Vec<String> = a
            .to_args()
            .into_iter()
            .map(|s| s.into_string().unwrap())
            .collect();
        assert_eq!(
            s,
            [
                "--image-path",
                "/dev/shm/x",
                "--work-path",
                "/dev/shm/w",
                "--leave-running",
                "--tcp-established",
                "--empty-ns",
                "network"
            ]
        );
    }

    #[test]
    fn restore_args_detach() {
        let a = RestoreArgs {
            image_path: "/i".into(),
            work_path: "/w".into(),
            bundle: "/b".into(),
            pid_file: "/b/init.pid".into(),
            ..Default::default()
        };
        let s: Vec<String> = a
            .to_args()
            .into_iter()
            .map(|s| s.into_string().unwrap())
            .collect();
        assert_eq!(&s[..2], ["--detach", "--no-subreaper"]);
        assert!(s.contains(&"--pid-file".to_string()));
    }

    #[test]
    fn picks_errors_from_log() {
        let log = r#"{"level":"info","msg":"hello","time":"x"}
{"level":"error","msg":"criu failed: type NOTIFY errno 0\nlog file: /w/dump.log","time":"x"}
not json
"#;
        assert_eq!(
            log_errors(log),
            "criu failed: type NOTIFY errno 0\nlog file: /w/dump.log"
        );
    }

    #[test]
    fn parses_ps() {
        assert_eq!(parse_ps(b"[1,2,3]\n").unwrap(), vec![1, 2, 3]);
        assert_eq!(parse_ps(b"null").unwrap(), Vec::<i32>::new());
        assert!(parse_ps(b"garbage").is_err());
    }
}
