//! Security of ms2m's shim and tap (issue 9):
//!
//! - the tap listens only inside its container's network namespace, on
//!   loopback: from the host and from another container its port is
//!   refused, inside its own container it answers;
//! - credentials of the tap's upstream URL (a real broker user made for the
//!   test) appear nowhere: not in the manifest and its broker cut, the
//!   fence, the CRIU images, `ms2m inspect` (text and JSON), nor
//!   containerd's log (which carries the shim's), through a leave-running
//!   checkpoint with a classic-queue mirror (which logs in with them), a
//!   fence, a kill and a restore;
//! - checkpoint directories (and the parents made for them) are created
//!   0700, by the CLI and by the shim;
//! - the fence and migrate requests travel only through containerd's API:
//!   the shim serves ttrpc on one unix socket only root can connect to, and
//!   opens no TCP listener in the host's network namespace.
//!
//! Needs ms2m's RabbitMQ node for the broker tests (they fail loudly
//! without it).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use ms2m_runtime_tests::amqp::{
    collect_results, rabbitmq_available, rabbitmqctl, start_tapped_consumer, wait_consumer_count,
    Checker, Client, Producer, ProducerConfig, QueueKind, TestQueues,
};
use ms2m_runtime_tests::{env, find_files, ms2m, run_cmd, unique_id, Container, RunOpts, TestDir};

const T: Duration = Duration::from_secs(30);
const APP_URL: &str = "amqp://guest:guest@localhost:5672/%2f";
const UPSTREAM: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

fn path_str(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

/// Runs a shell command in the host's namespaces as root.
fn sh(script: &str) -> ms2m_runtime_tests::CmdOut {
    run_cmd(Command::new("sh").args(["-c", script]), T).unwrap_or_else(|e| panic!("{e}"))
}

/// A TCP connect from the host's network namespace to 127.0.0.1:`port`.
fn host_connect(port: u16) -> std::io::Result<std::net::TcpStream> {
    std::net::TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_secs(2),
    )
}

/// busybox `nc` from inside `c` to 127.0.0.1:`port`: true when it
/// connected (it sends nothing and gives up after 1 s of silence).
fn container_connects(c: &Container, port: u16) -> bool {
    let out = c.exec(&[
        "sh",
        "-c",
        &format!("nc -w 1 127.0.0.1 {port} </dev/null; echo rc=$?"),
    ]);
    let text = format!("{}{}", out.stdout, out.stderr);
    eprintln!("nc to {port} from {}: {}", c.id, text.trim());
    !text.contains("refused") && !text.contains("can't connect")
}

/// The tap's port (not the broker's, so the host side has a clean test:
/// nothing in the host namespace listens there) answers in its own
/// container only: the host and another container are refused; the
/// listeners are on loopback inside the container's namespace, and the
/// host namespace has none of the shim's.
#[test]
fn tap_listens_only_inside_its_container() {
    env();
    rabbitmq_available();
    let td = TestDir::new("sec-tap");
    let q = TestQueues::new("sec-tap", QueueKind::Stream);
    const PORT: u16 = 47321;
    let app_url = format!("amqp://guest:guest@localhost:{PORT}/%2f");
    let c = start_tapped_consumer(
        Client::Lapin,
        &q,
        &td,
        "sec-tap",
        UPSTREAM,
        &app_url,
        &[format!("--annotation=io.ms2m.tap.port={PORT}")],
    );
    let other = Container::run("sec-other", RunOpts::memcounter(0, 50));
    other.wait_status("RUNNING", T);

    // Inside: the app consumes through it, and a second client connects.
    assert!(
        container_connects(&c, PORT),
        "the tap does not answer inside its container"
    );
    // From the host: refused.
    match host_connect(PORT) {
        Err(e) => assert_eq!(
            e.kind(),
            std::io::ErrorKind::ConnectionRefused,
            "host connect: {e}"
        ),
        Ok(_) => panic!("the tap's port {PORT} answers in the host's network namespace"),
    }
    // From another container (its own network namespace): refused.
    assert!(
        !container_connects(&other, PORT),
        "another container reaches the tap"
    );

    // Where the listeners are: loopback only, in the container's namespace.
    let pid = c.pid();
    let tap_lines = listeners(
        &format!("nsenter -t {pid} -n ss -Hltn"),
        &format!(":{PORT}"),
    );
    for l in &tap_lines {
        assert!(
            l.contains(&format!("127.0.0.1:{PORT}")) || l.contains(&format!("[::1]:{PORT}")),
            "a tap listener not on loopback: {l}"
        );
    }
    let shim = c.shim_pid().expect("the container's shim");
    let host = sh("ss -Hltnp").ok();
    assert!(
        !host.stdout.contains(&format!("pid={shim},")),
        "the shim (pid {shim}) listens on TCP in the host's namespace: {host}"
    );
    assert!(!host.stdout.contains(&format!(":{PORT} ")), "{host}");
    // The consumer was not disturbed by any of it.
    let s = wait_consumer_count(&c, 0, T);
    assert_eq!(s.connects, 1, "{s:?}");
}

/// The lines of `ss_command`'s output that contain `needle`; panics when
/// there is none (the check after it would prove nothing).
fn listeners(ss_command: &str, needle: &str) -> Vec<String> {
    let out = sh(ss_command).ok();
    let lines: Vec<String> = out
        .stdout
        .lines()
        .filter(|l| l.contains(needle))
        .map(str::to_string)
        .collect();
    assert!(
        !lines.is_empty(),
        "`{ss_command}` lists nothing with {needle:?}: {out}"
    );
    lines
}

/// A broker user of the test's own, removed on drop.
struct BrokerUser {
    name: String,
}

impl BrokerUser {
    fn new(name: &str, password: &str) -> BrokerUser {
        rabbitmqctl(&["add_user", name, password]).ok();
        let u = BrokerUser {
            name: name.to_string(),
        };
        rabbitmqctl(&["set_permissions", "-p", "/", name, ".*", ".*", ".*"]).ok();
        u
    }
}

impl Drop for BrokerUser {
    fn drop(&mut self) {
        let _ = rabbitmqctl(&["delete_user", &self.name]);
    }
}

/// Every place a secret could leak to, and whether `needle` is in it.
fn leaks(needle: &str, texts: &[(&str, String)], dirs: &[&Path]) -> Vec<String> {
    let mut found: Vec<String> = texts
        .iter()
        .filter(|(_, t)| t.contains(needle))
        .map(|(w, _)| w.to_string())
        .collect();
    for d in dirs {
        for f in find_files(d, &|_| true) {
            let bytes = std::fs::read(&f).unwrap_or_default();
            if bytes.windows(needle.len()).any(|w| w == needle.as_bytes()) {
                found.push(f.display().to_string());
            }
        }
    }
    found
}

/// The upstream URL's user and password (a real broker user, so the
/// classic-queue mirror logs in with them) appear in no manifest, cut,
/// fence, image file, `ms2m inspect` output or containerd log line, through
/// a leave-running checkpoint, a fence with `--kill` and a restore.
#[test]
fn upstream_credentials_never_leak() {
    env();
    rabbitmq_available();
    let td = TestDir::new("sec-creds");
    let q = TestQueues::new("sec-creds", QueueKind::Classic);
    let user = unique_id("ms2m-sec-user");
    let secret = unique_id("s3cr3t-pw");
    let _u = BrokerUser::new(&user, &secret);
    let upstream = format!("amqp://{user}:{secret}@127.0.0.1:5672/%2f");
    let log_path = std::env::var("MS2M_CONTAINERD_LOG")
        .unwrap_or_else(|_| "/var/log/ms2m/containerd.log".into());
    let log_start = std::fs::metadata(&log_path).map(|m| m.len()).unwrap_or(0);

    let c = start_tapped_consumer(Client::Lapin, &q, &td, "sec-creds", &upstream, APP_URL, &[]);
    let producer = Producer::start(ProducerConfig::new(&q.queue, 300, 300));
    wait_consumer_count(&c, 50, T);
    let img = td.join("img");
    let ck = ms2m(&["checkpoint", "--image-path", path_str(&img), &c.id]).ok();
    let ck_json = ms2m(&[
        "checkpoint",
        "--json",
        "--image-path",
        path_str(&td.join("img2")),
        &c.id,
    ])
    .ok();
    let m: serde_json::Value = serde_json::from_slice(
        &std::fs::read(td.join("img2").join("ms2m-manifest.json")).expect("manifest"),
    )
    .expect("manifest JSON");
    assert!(
        m["broker"]["mirrors"]
            .as_object()
            .is_some_and(|o| !o.is_empty()),
        "no classic-queue mirror was armed, so the upstream credentials were not used: {}",
        m["broker"]
    );
    assert_eq!(m["broker"]["upstream"], "amqp://127.0.0.1:5672/%2f");
    let img2 = td.join("img2");
    let fence = ms2m(&["fence", "--kill", "--image-path", path_str(&img2), &c.id]).ok();
    let restore = ms2m(&["restore", &c.id, path_str(&img2)]).ok();
    let rep = producer.join().unwrap_or_else(|e| panic!("producer: {e}"));
    let results = collect_results(&q.results, 300, T);
    let report = Checker::new(rep.confirmed.iter().copied()).check(&results);
    assert!(report.lost.is_empty(), "{report}");

    let inspect = ms2m(&["inspect", path_str(&img2)]).ok();
    let inspect_json = ms2m(&["inspect", "--json", path_str(&img2)]).ok();
    let log = std::fs::read(&log_path).unwrap_or_default();
    let log = String::from_utf8_lossy(&log[(log_start as usize).min(log.len())..]).into_owned();
    assert!(
        log.contains(&c.id),
        "containerd's log {log_path} has no line of the container: the check would prove nothing"
    );
    let texts = [
        ("ms2m checkpoint", format!("{ck}")),
        ("ms2m checkpoint --json", format!("{ck_json}")),
        ("ms2m fence", format!("{fence}")),
        ("ms2m restore", format!("{restore}")),
        ("ms2m inspect", format!("{inspect}")),
        ("ms2m inspect --json", format!("{inspect_json}")),
        ("containerd log", log),
    ];
    for needle in [secret.as_str(), user.as_str()] {
        let found = leaks(needle, &texts, &[&img, &img2]);
        assert!(found.is_empty(), "{needle:?} leaked into: {found:?}");
    }
}

/// The mode of `p`'s permission bits.
fn mode(p: &Path) -> u32 {
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o777
}

/// Checkpoint directories are 0700 (the images hold the container's
/// memory), and so are the parents made for them: `ms2m checkpoint` with
/// a path and by default, and `ctr task checkpoint` (the shim makes the
/// directory).
#[test]
fn checkpoint_directories_are_created_0700() {
    env();
    let td = TestDir::new("sec-mode");
    let c = Container::run("sec-mode", RunOpts::memcounter(0, 50));
    c.wait_status("RUNNING", T);
    c.wait_counter_above(2, T);

    let cli = td.join("cli/a/img");
    ms2m(&["checkpoint", "--image-path", path_str(&cli), &c.id]).ok();
    let mut dirs: Vec<PathBuf> = vec![
        td.join("cli"),
        td.join("cli/a"),
        cli.clone(),
        td.join("cli/a/img-work"),
    ];

    let out = ms2m(&["checkpoint", "--json", &c.id]).ok();
    let v: serde_json::Value = serde_json::from_str(&out.stdout).expect("--json output");
    let default = PathBuf::from(v["image_path"].as_str().expect("image_path in the JSON"));
    let _cleanup = RemoveOnDrop(default.parent().expect("per-container dir").to_path_buf());
    dirs.push(default.clone());
    dirs.push(default.parent().expect("parent").to_path_buf());

    if env().is_ms2m() {
        let shim = td.join("shim/b/img");
        c.ctr_checkpoint(&["--image-path", path_str(&shim)]).ok();
        dirs.extend([td.join("shim"), td.join("shim/b"), shim]);
    }
    for d in &dirs {
        assert_eq!(mode(d), 0o700, "{} is {:o}", d.display(), mode(d));
    }
    assert_eq!(c.status().as_deref(), Some("RUNNING"));
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `connect(2)` to the unix socket `path` as user nobody: the error
/// message, or "connected".
fn connect_as_nobody(path: &str) -> String {
    let out = sh(&format!(
        "setpriv --reuid=65534 --regid=65534 --clear-groups /usr/bin/python3 -c \
         'import socket,sys; s=socket.socket(socket.AF_UNIX)\n\
try:\n    s.connect(sys.argv[1]); print(\"connected\")\n\
except OSError as e:\n    print(type(e).__name__, e)' {path}"
    ));
    format!("{}{}", out.stdout.trim(), out.stderr.trim())
}

/// The fence (`ms2m.io/fence.v1`) and migrate (`ms2m.io/migrate.v1`)
/// requests are task `Update`s: they reach a shim only over its ttrpc
/// socket, which containerd connects to. That socket (named in the
/// bundle's `address` file) is root's: another user cannot connect, nor to
/// containerd's own socket; and the shim listens on nothing else in the
/// host (its unix listeners are that socket only, no TCP).
#[test]
fn shim_requests_only_through_containerd() {
    env();
    if !env().is_ms2m() {
        return;
    }
    let c = Container::run("sec-ttrpc", RunOpts::memcounter(0, 50));
    c.wait_status("RUNNING", T);
    let bundle = PathBuf::from(format!(
        "/run/ms2m/containerd/io.containerd.runtime.v2.task/{}/{}",
        env().namespace,
        c.id
    ));
    let address =
        std::fs::read_to_string(bundle.join("address")).expect("the bundle's address file");
    let socket = address.trim().trim_start_matches("unix://").to_string();
    let meta = std::fs::metadata(&socket).unwrap_or_else(|e| panic!("{socket}: {e}"));
    use std::os::unix::fs::MetadataExt;
    assert_eq!(meta.uid(), 0, "{socket} is not root's");
    assert_eq!(
        meta.mode() & 0o022,
        0,
        "{socket} is writable by others: {:o}",
        meta.mode()
    );

    // Root connects (containerd does); nobody cannot, to the shim nor to
    // containerd.
    for s in [socket.as_str(), env().address.as_str()] {
        let got = connect_as_nobody(s);
        assert!(
            got.contains("PermissionError"),
            "nobody connecting to {s}: {got}"
        );
    }

    // The shim's listening sockets: its ttrpc socket, nothing else.
    let shim = c.shim_pid().expect("shim pid");
    let mine = listeners("ss -Hxlp", &format!("pid={shim},"));
    for l in &mine {
        assert!(
            l.contains(&socket),
            "the shim listens on another unix socket: {l}"
        );
    }
    let tcp = sh("ss -Hltnp").ok();
    assert!(
        !tcp.stdout.contains(&format!("pid={shim},")),
        "the shim listens on TCP: {tcp}"
    );
}
