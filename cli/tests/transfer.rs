//! End to end: a leave-running checkpoint of a memcounter container on
//! ms2m's containerd (A), sent with [`transfer::TargetSession`] to an
//! `ms2m agent` (this build, as a child process) pointed at the same
//! containerd with its own runc root, restored there under another id, then
//! aborted; and a corrupted transfer the agent must refuse, leaving nothing.
//!
//! Needs root, containerd A (`sudo hack/setup.sh`) and the test image: the
//! harness panics with a hint when they are missing (no silent skip).
//! `MS2M_XFER_MIB` sets the workload's resident MiB (default 16).

#[path = "../src/transfer.rs"]
mod transfer;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use ms2m_runtime_tests::{
    ctr, env, parse_task_ls, run_cmd, unique_id, wait_until, Container, RunOpts, TestDir,
    CMD_TIMEOUT,
};
use transfer::{Conn, Message, Offer, TargetSession};

const MS2M: &str = env!("CARGO_BIN_EXE_ms2m");

/// `ms2m agent` on a loopback port; killed on drop.
struct Agent {
    child: Child,
    addr: String,
    dir: PathBuf,
}

impl Agent {
    fn start(td: &TestDir) -> Agent {
        Agent::start_with(td, None)
    }

    /// An agent that requires `token` (through `--token-file`) when given.
    fn start_with(td: &TestDir, token: Option<&str>) -> Agent {
        let env = env();
        let dir = td.join("incoming");
        let mut cmd = Command::new(MS2M);
        cmd.args(["--address", &env.address, "--namespace", &env.namespace])
            .args(["agent", "--listen", "127.0.0.1:0", "--dir"])
            .arg(&dir)
            .arg("--runc-root")
            .arg(td.join("runc-b"));
        if let Some(t) = token {
            let f = td.join("token");
            std::fs::write(&f, format!("{t}\n")).unwrap();
            cmd.arg("--token-file").arg(f);
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {MS2M} agent: {e}"));
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[agent] {line}");
                if let Some(rest) = line.split("listening on ").nth(1) {
                    let _ = tx.send(rest.split_whitespace().next().unwrap_or("").to_string());
                }
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(a) => a,
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "ms2m agent did not start listening (is containerd A at {} reachable? run `sudo hack/setup.sh`)",
                    env.address
                );
            }
        };
        Agent { child, addr, dir }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// The offer for container `src`, to be restored as `dst`, from `ctr c info`.
fn offer_for(src: &str, dst: &str, mid: &str) -> Offer {
    let out = ctr(&["container", "info", src]).ok();
    let info: serde_json::Value = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("ctr container info {src}: {e}: {}", out.stdout));
    let s = |p: &str| {
        info.pointer(p)
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_string()
    };
    Offer {
        migration_id: mid.to_string(),
        container_id: dst.to_string(),
        image: s("/Image"),
        snapshotter: s("/Snapshotter"),
        runtime: s("/Runtime/Name"),
        spec: info["Spec"].clone(),
        labels: serde_json::from_value(info["Labels"].clone()).unwrap_or_default(),
    }
}

fn container_exists(id: &str) -> bool {
    ctr(&["container", "ls", "-q"])
        .ok()
        .stdout
        .lines()
        .any(|l| l.trim() == id)
}

fn snapshot_exists(id: &str) -> bool {
    ctr(&["snapshot", "ls"])
        .ok()
        .stdout
        .lines()
        .any(|l| l.split_whitespace().next() == Some(id))
}

fn checkpoint(id: &str, dir: &Path) {
    let env = env();
    let mut cmd = Command::new(MS2M);
    cmd.args(["--address", &env.address, "--namespace", &env.namespace])
        .arg("checkpoint")
        .arg("--image-path")
        .arg(dir)
        .arg(id);
    run_cmd(&mut cmd, CMD_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"))
        .ok();
}

#[test]
fn checkpoint_moves_to_the_agent_restores_and_aborts_cleanly() {
    let mib: u64 = std::env::var("MS2M_XFER_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(16);
    let td = TestDir::new("xfer");
    let agent = Agent::start(&td);
    let src = Container::run("xfer-src", RunOpts::memcounter(mib, 50));
    let before = src.wait_counter_above(3, Duration::from_secs(30));
    let ck = td.join("ck");
    checkpoint(&src.id, &ck);
    assert_eq!(
        src.status().as_deref(),
        Some("RUNNING"),
        "leave-running checkpoint"
    );

    let dst_id = unique_id("xfer-dst");
    let dst = Container::adopt(&dst_id); // cleans up if an assertion fails
    let mid = unique_id("mig");
    let rt = rt();
    let connect = || {
        rt.block_on(TargetSession::connect(&agent.addr, Duration::from_secs(5)))
            .unwrap()
    };

    // An id that exists on the target is refused, and nothing is left.
    let mut s = connect();
    let e = format!(
        "{:#}",
        rt.block_on(s.send(&offer_for(&src.id, &src.id, &format!("{mid}-x")), &ck))
            .unwrap_err()
    );
    assert!(e.contains("already exists"), "{e}");
    rt.block_on(s.abort("refused")).unwrap();
    assert!(!agent.dir.join(format!("{mid}-x")).exists());

    let mut s = connect();
    let offer = offer_for(&src.id, &dst_id, &mid);
    let report = rt.block_on(s.send(&offer, &ck)).unwrap();
    eprintln!(
        "transfer: {} files, {} bytes ({:.1} MiB) in {:.1} ms = {:.0} MiB/s, set sha256 {}",
        report.files,
        report.bytes,
        report.bytes as f64 / 1048576.0,
        report.elapsed_ms,
        report.mib_per_s,
        report.sha256
    );
    assert!(report.bytes >= mib << 20, "{report:?}");
    assert!(agent.dir.join(&mid).join("inventory.img").exists());

    let restored = rt.block_on(s.restore()).unwrap();
    eprintln!("restore on the target: {restored:?}");
    let ls = ctr(&["task", "ls"]).ok().stdout;
    let (pid, status) = parse_task_ls(&ls, &dst_id)
        .unwrap_or_else(|| panic!("no task {dst_id} in ctr task ls:\n{ls}"));
    assert_eq!(status, "RUNNING");
    assert_eq!(pid, restored.pid);
    let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    eprintln!(
        "restored pid {pid} cgroups: {}",
        cg.lines()
            .filter(|l| l.contains("freezer") || l.starts_with("0::"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    // The restored counter continues from the checkpoint's value.
    let after = dst.wait_counter_above(before, Duration::from_secs(30));
    assert!(after > before);
    assert_eq!(
        src.status().as_deref(),
        Some("RUNNING"),
        "the source is untouched"
    );

    rt.block_on(s.abort("test: abandon the migration")).unwrap();
    assert!(
        !container_exists(&dst_id),
        "container {dst_id} left after abort"
    );
    assert!(
        !snapshot_exists(&dst_id),
        "snapshot {dst_id} left after abort"
    );
    assert!(parse_task_ls(&ctr(&["task", "ls"]).ok().stdout, &dst_id).is_none());
    assert!(
        !agent.dir.join(&mid).exists(),
        "received images left after abort"
    );
    assert_eq!(
        src.status().as_deref(),
        Some("RUNNING"),
        "the source survives the abort"
    );
}

#[test]
fn corrupted_file_is_refused_and_nothing_is_left() {
    let td = TestDir::new("xfer-bad");
    let agent = Agent::start(&td);
    let env = env();
    let dst_id = unique_id("xfer-bad");
    let mid = unique_id("mig-bad");
    let offer = Offer {
        migration_id: mid.clone(),
        container_id: dst_id.clone(),
        image: env.image.clone(),
        snapshotter: "overlayfs".into(),
        runtime: env.runtime.clone(),
        spec: serde_json::json!({"ociVersion": "1.2.0"}),
        labels: Default::default(),
    };
    let data = b"not really CRIU".to_vec();
    let e = rt().block_on(async {
        let stream = tokio::net::TcpStream::connect(&agent.addr).await.unwrap();
        let mut c = Conn::new(stream);
        c.send(&Message::hello()).await.unwrap();
        transfer::check_hello(&c.recv(Duration::from_secs(5)).await.unwrap()).unwrap();
        c.send(&Message::Offer {
            offer,
            files: 1,
            bytes: data.len() as u64,
        })
        .await
        .unwrap();
        assert!(matches!(
            c.recv(Duration::from_secs(5)).await.unwrap(),
            Message::Accepted { .. }
        ));
        let wrong = transfer::sha256_hex(b"something else");
        c.queue(&Message::File {
            path: "inventory.img".into(),
            size: data.len() as u64,
            mode: 0o600,
        })
        .await
        .unwrap();
        c.write_raw(&data).await.unwrap();
        c.queue(&Message::FileDone {
            sha256: wrong.clone(),
        })
        .await
        .unwrap();
        c.send(&Message::End {
            files: 1,
            bytes: data.len() as u64,
            sha256: transfer::set_digest(&[("inventory.img".into(), wrong)]),
        })
        .await
        .unwrap();
        c.recv(Duration::from_secs(10)).await.unwrap()
    });
    match e {
        Message::Error { message } => {
            assert!(
                message.contains("sha256 mismatch for inventory.img"),
                "{message}"
            )
        }
        m => panic!("expected an error, got {m:?}"),
    }
    wait_until(
        "the agent to remove the received directory",
        Duration::from_secs(5),
        Duration::from_millis(20),
        || (!agent.dir.join(&mid).exists()).then_some(()),
    );
    let left: Vec<_> = std::fs::read_dir(&agent.dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "left in {}: {left:?}", agent.dir.display());
    assert!(!container_exists(&dst_id));
}

#[test]
fn agent_with_a_token_refuses_senders_without_it() {
    let td = TestDir::new("xfer-token");
    let agent = Agent::start_with(&td, Some("s3cret-token"));
    rt().block_on(async {
        let e = match TargetSession::connect(&agent.addr, Duration::from_secs(5)).await {
            Ok(_) => panic!("the agent accepted a sender without its token"),
            Err(e) => format!("{e:#}"),
        };
        assert!(e.contains("token"), "{e}");
        assert!(
            !e.contains("s3cret-token"),
            "the error shows the token: {e}"
        );
        let wrong = TargetSession::connect_with_token(
            &agent.addr,
            Duration::from_secs(5),
            Some("x".into()),
        )
        .await;
        assert!(wrong.is_err(), "a wrong token was accepted");
        let ok = TargetSession::connect_with_token(
            &agent.addr,
            Duration::from_secs(5),
            Some("s3cret-token".into()),
        )
        .await;
        assert!(ok.is_ok(), "the right token was refused: {:?}", ok.err());
    });
}
