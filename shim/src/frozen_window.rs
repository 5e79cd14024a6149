//! The frozen window: work that runs while the container is frozen and its
//! images are final (CRIU's `post-dump` notification of a direct dump).
//!
//! A checkpoint runs a [`FrozenWindowSet`]: a list of [`FrozenWindow`]
//! hooks, in order. Each returns a JSON value for the manifest, or an
//! error; the first error aborts the checkpoint (CRIU is told, aborts the
//! dump and lets the container run). The instant, duration and outcome go
//! into the manifest's `frozen_window` section ([`FrozenRecord`]).
//!
//! Hooks today: [`CommandHook`], the command named by the container's
//! `io.ms2m.checkpoint.frozen-hook` annotation. The AMQP tap's ledger
//! capture is the next one (a type implementing [`FrozenWindow`]).

use std::collections::BTreeMap;
use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::exits::ExitHub;

/// What a hook knows about the frozen container.
#[derive(Debug, Clone)]
pub struct FrozenContext {
    /// Container id.
    pub container_id: String,
    /// Host pid of the container's init.
    pub init_pid: i32,
    /// Where the images are.
    pub image_path: PathBuf,
    /// The `criu swrk` holding the container.
    pub criu_pid: u32,
}

/// One piece of work in the frozen window. Must be short: the container
/// does nothing while it runs.
pub trait FrozenWindow: Send + Sync {
    /// What runs, for the manifest and logs.
    fn describe(&self) -> String;
    /// Runs it; `Ok` carries what goes into the manifest, `Err` aborts the
    /// checkpoint with that reason.
    fn run(&self, ctx: &FrozenContext) -> Result<serde_json::Value, String>;
}

/// The manifest's `frozen_window` section.
#[derive(Debug, Clone, Default, Serialize)]
pub struct FrozenRecord {
    /// When the window's hooks started, unix ms.
    pub hook_started_at_unix_ms: u64,
    /// How long they ran, ms.
    pub hook_duration_ms: f64,
    /// What ran (empty: nothing but the timing).
    pub hook: Vec<String>,
    /// Whether every hook succeeded.
    pub ok: bool,
    /// The failure, if one failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Each hook's result, by its description.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub results: BTreeMap<String, serde_json::Value>,
}

/// The hooks of one checkpoint.
#[derive(Default)]
pub struct FrozenWindowSet {
    hooks: Vec<Box<dyn FrozenWindow>>,
}

impl FrozenWindowSet {
    /// Adds a hook (runs after those added before).
    pub fn push(&mut self, hook: Box<dyn FrozenWindow>) {
        self.hooks.push(hook);
    }

    /// Number of hooks.
    pub fn len(&self) -> usize {
        self.hooks.len()
    }

    /// Runs every hook in order, stopping at the first failure.
    pub fn run(&self, ctx: &FrozenContext) -> FrozenRecord {
        let started = SystemTime::now();
        let t0 = Instant::now();
        let mut rec = FrozenRecord {
            hook_started_at_unix_ms: started
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            ok: true,
            ..Default::default()
        };
        for h in &self.hooks {
            let name = h.describe();
            rec.hook.push(name.clone());
            match h.run(ctx) {
                Ok(v) => {
                    if !v.is_null() {
                        rec.results.insert(name, v);
                    }
                }
                Err(e) => {
                    rec.ok = false;
                    rec.error = Some(format!("{name}: {e}"));
                    break;
                }
            }
        }
        rec.hook_duration_ms = t0.elapsed().as_secs_f64() * 1000.0;
        rec
    }
}

/// Runs a command line (split on whitespace, no shell) with
/// `MS2M_CONTAINER_ID`, `MS2M_INIT_PID` and `MS2M_IMAGE_PATH` set; fails
/// when it exits non-zero or outlives `timeout` (it is then killed).
pub struct CommandHook {
    argv: Vec<String>,
    timeout: Duration,
}

impl CommandHook {
    /// A hook for `command_line`; an error when it is empty.
    pub fn new(command_line: &str, timeout: Duration) -> Result<CommandHook, String> {
        let argv: Vec<String> = command_line.split_whitespace().map(String::from).collect();
        if argv.is_empty() {
            return Err("the frozen-window hook command is empty".into());
        }
        Ok(CommandHook { argv, timeout })
    }
}

/// How much of a hook's output is kept.
const OUTPUT_TAIL: usize = 2048;

fn drain<R: Read + Send + 'static>(r: Option<R>) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut tail = Vec::new();
        if let Some(mut r) = r {
            let mut buf = [0u8; 1024];
            while let Ok(n) = r.read(&mut buf) {
                if n == 0 {
                    break;
                }
                tail.extend_from_slice(&buf[..n]);
                if tail.len() > OUTPUT_TAIL {
                    let cut = tail.len() - OUTPUT_TAIL;
                    tail.drain(..cut);
                }
            }
        }
        tail
    })
}

impl FrozenWindow for CommandHook {
    fn describe(&self) -> String {
        format!("command {}", self.argv.join(" "))
    }

    fn run(&self, ctx: &FrozenContext) -> Result<serde_json::Value, String> {
        let t0 = Instant::now();
        let mut child = Command::new(&self.argv[0])
            .args(&self.argv[1..])
            .env("MS2M_CONTAINER_ID", &ctx.container_id)
            .env("MS2M_INIT_PID", ctx.init_pid.to_string())
            .env("MS2M_IMAGE_PATH", &ctx.image_path)
            .env("MS2M_CRIU_PID", ctx.criu_pid.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", self.argv[0]))?;
        let pid = child.id() as i32;
        // The shim's reaper may reap the child before `try_wait` does:
        // its exit status then arrives through the hub.
        let mut hub = ExitHub::global().register(pid);
        let out = drain(child.stdout.take());
        let err = drain(child.stderr.take());
        let deadline = t0 + self.timeout;
        let status: Result<i32, String> = loop {
            if let Ok(s) = hub.try_recv() {
                break Ok(s);
            }
            match child.try_wait() {
                Ok(Some(s)) => {
                    ExitHub::global().unregister(pid);
                    use std::os::unix::process::ExitStatusExt;
                    break Ok(s.code().unwrap_or_else(|| 128 + s.signal().unwrap_or(0)));
                }
                Ok(None) | Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(1));
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.try_wait();
                    ExitHub::global().unregister(pid);
                    break Err(format!(
                        "did not finish within {} ms: killed",
                        self.timeout.as_millis()
                    ));
                }
            }
        };
        let text = |h: std::thread::JoinHandle<Vec<u8>>| {
            // A grandchild may hold the pipe open: do not wait for it.
            let until = Instant::now() + Duration::from_millis(20);
            while !h.is_finished() && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(1));
            }
            if h.is_finished() {
                h.join()
                    .map(|b| String::from_utf8_lossy(&b).trim().to_string())
                    .unwrap_or_default()
            } else {
                String::new()
            }
        };
        let stdout = text(out);
        let stderr = text(err);
        let ms = t0.elapsed().as_secs_f64() * 1000.0;
        match status {
            Ok(0) => Ok(serde_json::json!({
                "exit_status": 0,
                "duration_ms": ms,
                "stdout": stdout,
            })),
            Ok(code) => Err(format!(
                "exited with status {code}{}",
                if stderr.is_empty() {
                    String::new()
                } else {
                    format!("; stderr: {stderr}")
                }
            )),
            Err(e) => Err(format!(
                "{e}{}",
                if stderr.is_empty() {
                    String::new()
                } else {
                    format!("; stderr: {stderr}")
                }
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> FrozenContext {
        FrozenContext {
            container_id: "c1".into(),
            init_pid: 1,
            image_path: "/tmp/x".into(),
            criu_pid: 0,
        }
    }

    struct Fixed(Result<serde_json::Value, String>);
    impl FrozenWindow for Fixed {
        fn describe(&self) -> String {
            "fixed".into()
        }
        fn run(&self, _: &FrozenContext) -> Result<serde_json::Value, String> {
            self.0.clone()
        }
    }

    #[test]
    fn set_records_and_stops_at_failure() {
        let mut s = FrozenWindowSet::default();
        let r = s.run(&ctx());
        assert!(r.ok && r.hook.is_empty());
        s.push(Box::new(Fixed(Ok(serde_json::json!(1)))));
        s.push(Box::new(Fixed(Err("boom".into()))));
        s.push(Box::new(Fixed(Ok(serde_json::json!(2)))));
        let r = s.run(&ctx());
        assert!(!r.ok);
        assert_eq!(r.hook.len(), 2);
        assert_eq!(r.error.as_deref(), Some("fixed: boom"));
        assert!(r.hook_started_at_unix_ms > 0);
    }

    #[test]
    fn command_hook_runs_with_env() {
        let h = CommandHook::new("/bin/sh -c true", Duration::from_secs(5)).unwrap();
        assert!(h.describe().contains("/bin/sh"));
        // printenv, not env: the output keeps only its tail, and a large
        // environment (CI's) would push the variable out of it.
        let ok = CommandHook::new(
            "/usr/bin/printenv MS2M_CONTAINER_ID",
            Duration::from_secs(5),
        )
        .unwrap()
        .run(&ctx())
        .unwrap();
        assert_eq!(ok["stdout"].as_str(), Some("c1"), "{ok}");
        let e = CommandHook::new("/bin/false", Duration::from_secs(5))
            .unwrap()
            .run(&ctx())
            .unwrap_err();
        assert!(e.contains("status 1"), "{e}");
        let e = CommandHook::new("/bin/sleep 5", Duration::from_millis(100))
            .unwrap()
            .run(&ctx())
            .unwrap_err();
        assert!(e.contains("did not finish"), "{e}");
        assert!(CommandHook::new("  ", Duration::from_secs(1)).is_err());
    }
}
