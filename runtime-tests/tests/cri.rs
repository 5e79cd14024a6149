//! ms2m under containerd's CRI plugin, driven the way the kubelet drives it
//! (runtime-tests/src/cri.rs; crictl cannot be built here): pods run under
//! the `ms2m` runtime handler (host network, no CNI), `CheckpointContainer`
//! (the kubelet checkpoint API's path) writes an archive that carries ms2m's
//! manifest and, for a tapped consumer, the broker cut, and `CreateContainer`
//! given that archive restores it. Error paths: an unknown handler, a
//! checkpoint of a stopped container, corrupt and foreign archives, an
//! archive written by another ms2m version.
//!
//! Needs host A's containerd with CRI on, the CRI images and the loopback
//! registry (`hack/cri-setup.sh`, run by `hack/setup.sh`).

use std::time::{Duration, Instant};

use ms2m_runtime_tests::amqp::{
    collect_results, digest_of, queue_cut, rabbitmq_available, Checker, Client, ConsumerState,
    Producer, ProducerConfig, QueueKind, TestQueues, STATE_FILE,
};
use ms2m_runtime_tests::cri::{
    archive_manifest, counter, cri_env, runtime_of, tar_list, wait_counter_above, ContainerSpec,
    Cri, Pod, ARCHIVE_MANIFEST, CONTAINER_EXITED, CONTAINER_RUNNING, HANDLER,
};
use ms2m_runtime_tests::{env, wait_until, TestDir, MS2M_RUNTIME};

fn path_str(p: &std::path::Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

#[test]
fn pod_lifecycle_under_the_ms2m_handler() {
    let td = TestDir::new("cri-life");
    let cri = Cri::new();
    let pod = Pod::run(&cri, "life", HANDLER, &td.path);
    let st = cri.pod_status(&pod.id).expect("PodSandboxStatus");
    assert_eq!(st.runtime_handler, HANDLER, "{st:?}");
    assert_eq!(runtime_of(&pod.id), MS2M_RUNTIME, "the sandbox's runtime");

    let id = pod.start(&ContainerSpec::memcounter("mc", 1, 20));
    assert_eq!(runtime_of(&id), MS2M_RUNTIME, "the container's runtime");
    let st = cri.container_status(&id).expect("ContainerStatus");
    assert_eq!(st.state, CONTAINER_RUNNING, "{st:?}");
    assert_eq!(
        st.image.as_ref().map(|i| i.image.as_str()),
        Some(cri_env().image.as_str())
    );
    wait_counter_above(&cri, &id, 3, Duration::from_secs(10));

    // ExecSync: stdout, stderr and the exit code come back apart.
    let r = cri
        .exec_sync(&id, &["sh", "-c", "echo out; echo err >&2; exit 3"], 10)
        .expect("ExecSync");
    assert_eq!(
        (
            String::from_utf8_lossy(&r.stdout).as_ref(),
            String::from_utf8_lossy(&r.stderr).as_ref(),
            r.exit_code
        ),
        ("out\n", "err\n", 3)
    );

    // Logs: CRI's log format (time, stream, tag, line) with memcounter's
    // counter lines.
    let log = pod.log_path("mc");
    let text = std::fs::read_to_string(&log).unwrap_or_else(|e| panic!("{}: {e}", log.display()));
    let line = text
        .lines()
        .next()
        .unwrap_or_else(|| panic!("{} is empty", log.display()));
    let fields: Vec<&str> = line.splitn(4, ' ').collect();
    assert_eq!(fields.len(), 4, "CRI log line {line:?}");
    assert_eq!(
        (fields[1], fields[2]),
        ("stdout", "F"),
        "CRI log line {line:?}"
    );
    assert!(
        fields[3].trim().parse::<u64>().is_ok(),
        "CRI log line {line:?}"
    );

    let t0 = Instant::now();
    cri.stop_container(&id, 10).expect("StopContainer");
    let st = cri.container_status(&id).expect("ContainerStatus");
    assert_eq!((st.state, st.exit_code), (CONTAINER_EXITED, 0), "{st:?}");
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "memcounter stops on SIGTERM"
    );
    cri.remove_container(&id).expect("RemoveContainer");
    let e = cri
        .container_status(&id)
        .expect_err("a removed container has no status");
    assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");
}

/// The CRI checkpoint of a 16 MiB memcounter: the archive, its manifest,
/// the source still running; then a restore into a new pod from the archive.
#[test]
fn checkpoint_and_restore_through_cri() {
    let td = TestDir::new("cri-ck");
    let cri = Cri::new();
    let src_pod = Pod::run(&cri, "ck-src", HANDLER, &td.path);
    let spec = ContainerSpec::memcounter("mc", 16, 20);
    let id = src_pod.start(&spec);
    let before = wait_counter_above(&cri, &id, 30, Duration::from_secs(10));

    let archive = td.join("mc.tar");
    let t0 = Instant::now();
    cri.checkpoint(&id, &archive, 60)
        .unwrap_or_else(|e| panic!("CheckpointContainer {id}: {e:?}"));
    let ck_wall = t0.elapsed();
    let after = counter(&cri, &id).expect("counter after the checkpoint");
    assert_eq!(
        cri.container_state(&id).unwrap(),
        CONTAINER_RUNNING,
        "left running"
    );
    wait_counter_above(&cri, &id, after, Duration::from_secs(5));

    let entries = tar_list(&archive);
    for want in [
        ARCHIVE_MANIFEST,
        "checkpoint/inventory.img",
        "spec.dump",
        "config.dump",
    ] {
        assert!(
            entries.iter().any(|e| e == want),
            "{want} not in {entries:?}"
        );
    }
    let m = archive_manifest(&archive);
    assert_eq!(m["schema"], "ms2m.checkpoint", "{m}");
    assert_eq!(m["runtime"]["shim"], "containerd-shim-ms2m-v1", "{m}");
    assert_eq!(
        m["options"]["exit"], false,
        "CRI checkpoints leave the container running: {m}"
    );
    assert!(m.get("broker").is_none(), "no tap, no cut: {m}");
    eprintln!(
        "CRI checkpoint of a 16 MiB container: {:.0} ms wall, strategy {}, frozen {} us",
        ck_wall.as_secs_f64() * 1000.0,
        m["strategy"]["name"],
        m["stats"]["frozen_time_us"]
    );
    drop(src_pod);

    // The restore: a new pod, CreateContainer with the archive as image.
    let dst_pod = Pod::run(&cri, "ck-dst", HANDLER, &td.path);
    let mut restore = spec.clone();
    restore.image = path_str(&archive).to_string();
    let t0 = Instant::now();
    let rid = dst_pod
        .try_create(&restore)
        .unwrap_or_else(|e| panic!("CreateContainer from {}: {e:?}", archive.display()));
    cri.start_container(&rid)
        .unwrap_or_else(|e| panic!("StartContainer (restore) {rid}: {e:?}"));
    let restore_wall = t0.elapsed();
    assert_eq!(cri.container_state(&rid).unwrap(), CONTAINER_RUNNING);
    assert_eq!(runtime_of(&rid), MS2M_RUNTIME);
    let first = counter(&cri, &rid).expect("the restored counter");
    // Counting on from the checkpoint's value (a restart would start at 1),
    // perhaps a little further by the time of the read.
    assert!(
        first >= before && first <= after + 25,
        "restored counter {first}: expected the checkpoint's ({before}..={after})"
    );
    wait_counter_above(&cri, &rid, first, Duration::from_secs(5));
    eprintln!(
        "CRI restore of a 16 MiB container: {:.0} ms from CreateContainer to running; counter {first} \
         (checkpoint between {before} and {after})",
        restore_wall.as_secs_f64() * 1000.0
    );
}

/// The real broker, as the shim (host network namespace) reaches it.
const UPSTREAM: &str = "amqp://127.0.0.1:5672/%2f";

/// A free TCP port on loopback for a tap: the pods share the host's
/// network namespace, where RabbitMQ itself holds 5672.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("no free loopback port: {e}"))
}

/// The consumer's state through ExecSync; `None` until it is there.
fn consumer_state(cri: &Cri, id: &str) -> Option<ConsumerState> {
    ms2m_runtime_tests::cri::cat(cri, id, STATE_FILE).and_then(|s| ConsumerState::parse(&s))
}

fn wait_consumer(
    cri: &Cri,
    id: &str,
    what: &str,
    ok: impl Fn(&ConsumerState) -> bool,
) -> ConsumerState {
    wait_until(
        &format!("CRI consumer {id}: {what}"),
        Duration::from_secs(30),
        Duration::from_millis(20),
        || consumer_state(cri, id).filter(|s| ok(s)),
    )
}

/// A tapped consumer (its pod opts in with annotations; it holds its
/// deliveries after a checkpoint) moved through CRI the way a Kubernetes
/// operator would: kubelet checkpoint (CheckpointContainer), the source pod
/// deleted, a new pod whose container is created from the archive. The
/// archive carries the broker cut; the restored tap resumes there: every
/// result downstream exactly once, in order, the restored state that of
/// 1..N.
fn consumer_moved_through_cri(client: Client, kind: QueueKind) {
    env();
    rabbitmq_available();
    let name = format!("cri-{}-{}", client.name(), kind.as_str());
    let td = TestDir::new(&name);
    let q = TestQueues::new(&name, kind);
    let cri = Cri::new();
    let port = free_port().to_string();
    let mut spec = ContainerSpec::new(&name, &client.command())
        .env(
            "AMQP_URL",
            &format!("amqp://guest:guest@localhost:{port}/%2f"),
        )
        .env("QUEUE", &q.queue)
        .env("QUEUE_TYPE", kind.as_str())
        .env("RESULTS_QUEUE", &q.results)
        .env("CONSUMER_NAME", &name)
        .annotation("io.ms2m.tap.upstream", UPSTREAM)
        .annotation("io.ms2m.tap.port", &port)
        .annotation("io.ms2m.tap.after-checkpoint", "hold");
    if client == Client::Pika {
        // The host's python3 and python3-pika (see amqp::PIKA_MOUNT).
        spec = spec.mount_ro("/usr", "/usr");
    }
    let src_pod = Pod::run(&cri, &format!("{name}-src"), HANDLER, &td.path);
    let id = src_pod.start(&spec);
    // Consuming before the first message (pika's stream offset is "next").
    wait_consumer(&cri, &id, "consuming", |s| s.connects >= 1);
    const N: u64 = 900;
    let producer = Producer::start(ProducerConfig::new(&q.queue, N, 300));
    wait_consumer(&cri, &id, "200 processed", |s| s.count >= 200);

    let archive = td.join("consumer.tar");
    let t0 = Instant::now();
    cri.checkpoint(&id, &archive, 60)
        .unwrap_or_else(|e| panic!("CheckpointContainer {id}: {e:?}"));
    let ck_ms = t0.elapsed().as_secs_f64() * 1000.0;
    assert_eq!(
        cri.container_state(&id).unwrap(),
        CONTAINER_RUNNING,
        "left running"
    );
    let m = archive_manifest(&archive);
    let broker = &m["broker"];
    assert_eq!(broker["after_checkpoint"], "held", "{broker}");
    assert_eq!(broker["quiesce"]["complete"], true, "{broker}");
    assert!(
        !broker.to_string().contains("guest:guest"),
        "credentials in the manifest: {broker}"
    );
    let qc = queue_cut(&m, &q.queue);
    assert_eq!(qc["kind"], kind.as_str(), "{qc}");
    assert_eq!(qc["in_flight"], 0, "{qc}");

    // Held: the source runs on but processes nothing past the cut.
    let held = wait_consumer(&cri, &id, "its state", |_| true);
    std::thread::sleep(Duration::from_millis(500));
    let later = wait_consumer(&cri, &id, "its state", |_| true);
    assert_eq!(
        held.count, later.count,
        "the held source went on processing"
    );
    assert_eq!(
        qc["acked"].as_u64(),
        Some(held.count),
        "the cut is the held state: {qc}"
    );
    if kind == QueueKind::Stream {
        // A fresh stream starts at offset 0: offset k holds seq k + 1.
        assert_eq!(qc["next_offset"].as_u64(), Some(held.count), "{qc}");
    }
    drop(src_pod);

    let dst_pod = Pod::run(&cri, &format!("{name}-dst"), HANDLER, &td.path);
    let mut restore = spec.clone();
    restore.image = archive.display().to_string();
    let t0 = Instant::now();
    let rid = dst_pod
        .try_create(&restore)
        .unwrap_or_else(|e| panic!("CreateContainer from {}: {e:?}", archive.display()));
    cri.start_container(&rid)
        .unwrap_or_else(|e| panic!("StartContainer (restore) {rid}: {e:?}"));
    let restore_ms = t0.elapsed().as_secs_f64() * 1000.0;

    let rep = producer.join().unwrap_or_else(|e| panic!("producer: {e}"));
    assert_eq!(rep.confirmed.len() as u64, N);
    let state = wait_consumer(&cri, &rid, &format!("{N} processed"), |s| s.count >= N);
    let results = collect_results(&q.results, N as usize, Duration::from_secs(30));
    let report = Checker::new(rep.confirmed.iter().copied()).check(&results);
    eprintln!(
        "{name}: CRI checkpoint {ck_ms:.0} ms (frozen {:.1} ms), cut at {}, CRI restore {restore_ms:.0} ms; {report}",
        m["stats"]["frozen_time_us"].as_f64().unwrap_or(f64::NAN) / 1000.0,
        held.count
    );
    assert!(report.is_clean(), "{name}: {report}");
    assert_eq!(state.count, N, "restored state {state:?}");
    assert_eq!(state.digest, digest_of(1..=N), "restored state {state:?}");
}

#[test]
fn lapin_stream_consumer_moved_through_cri() {
    consumer_moved_through_cri(Client::Lapin, QueueKind::Stream);
}

#[test]
fn pika_stream_consumer_moved_through_cri() {
    consumer_moved_through_cri(Client::Pika, QueueKind::Stream);
}

#[test]
fn lapin_classic_consumer_moved_through_cri() {
    consumer_moved_through_cri(Client::Lapin, QueueKind::Classic);
}

#[test]
fn pika_classic_consumer_moved_through_cri() {
    consumer_moved_through_cri(Client::Pika, QueueKind::Classic);
}

/// A running ms2m pod with a memcounter, for the error paths: each must
/// leave it running and counting.
struct Bystander {
    pod: Pod,
    id: String,
    spec: ContainerSpec,
}

impl Bystander {
    fn start(cri: &std::sync::Arc<Cri>, td: &TestDir, name: &str) -> Bystander {
        let pod = Pod::run(cri, name, HANDLER, &td.path);
        let spec = ContainerSpec::memcounter("mc", 1, 20);
        let id = pod.start(&spec);
        wait_counter_above(cri, &id, 2, Duration::from_secs(10));
        Bystander { pod, id, spec }
    }

    /// Panics unless the container is still running and counting.
    fn assert_running(&self, after: &str) {
        let cri = &self.pod.cri;
        assert_eq!(
            cri.container_state(&self.id).unwrap(),
            CONTAINER_RUNNING,
            "after {after}"
        );
        let c = counter(cri, &self.id).expect("counter");
        wait_counter_above(cri, &self.id, c, Duration::from_secs(5));
    }

    /// A CRI checkpoint archive of it at `archive`.
    fn checkpoint(&self, archive: &std::path::Path) {
        self.pod
            .cri
            .checkpoint(&self.id, archive, 60)
            .unwrap_or_else(|e| panic!("CheckpointContainer {}: {e:?}", self.id));
    }
}

/// Creates and starts a container from `archive` in `pod`: containerd's
/// error message (create or start), or panics if it was restored.
fn restore_error(pod: &Pod, spec: &ContainerSpec, archive: &std::path::Path) -> String {
    let mut restore = spec.clone();
    restore.image = archive.display().to_string();
    let id = match pod.try_create(&restore) {
        Err(e) => return format!("CreateContainer: {}", e.message()),
        Ok(id) => id,
    };
    match pod.cri.start_container(&id) {
        Err(e) => format!("StartContainer: {}", e.message()),
        Ok(()) => panic!(
            "a container was restored from {} (state {:?})",
            archive.display(),
            pod.cri.container_state(&id)
        ),
    }
}

#[test]
fn unknown_handler_is_refused() {
    let td = TestDir::new("cri-handler");
    let cri = Cri::new();
    let b = Bystander::start(&cri, &td, "handler-ok");
    let e = cri
        .run_pod(
            &ms2m_runtime_tests::cri::pod_config("nope", &td.path),
            "no-such-handler",
        )
        .expect_err("a pod under an unknown handler");
    eprintln!("unknown handler: {e:?}");
    assert!(
        e.message().contains("no-such-handler") && e.message().contains("no runtime"),
        "{e:?}"
    );
    b.assert_running("a pod refused for its handler");
}

#[test]
fn checkpoint_of_a_stopped_container_is_refused() {
    let td = TestDir::new("cri-stopped");
    let cri = Cri::new();
    let b = Bystander::start(&cri, &td, "stopped");
    let stopped = b.pod.start(&ContainerSpec::memcounter("mc2", 1, 20));
    cri.stop_container(&stopped, 10).expect("StopContainer");
    let archive = td.join("stopped.tar");
    let e = cri
        .checkpoint(&stopped, &archive, 60)
        .expect_err("the checkpoint of a stopped container");
    eprintln!("checkpoint of a stopped container: {e:?}");
    assert!(
        e.message().contains("CONTAINER_EXITED") && e.message().contains("only CONTAINER_RUNNING"),
        "{e:?}"
    );
    assert!(
        !archive.exists(),
        "an archive was written for a stopped container"
    );
    assert_eq!(cri.container_state(&stopped).unwrap(), CONTAINER_EXITED);
    b.assert_running("a refused checkpoint of its stopped neighbour");
}

/// Garbage, a truncated archive and a foreign tar (an OCI image archive):
/// each refused with containerd's message, the source running on.
#[test]
fn corrupt_and_foreign_archives_are_refused() {
    let td = TestDir::new("cri-corrupt");
    let cri = Cri::new();
    let b = Bystander::start(&cri, &td, "corrupt-src");
    let good = td.join("good.tar");
    b.checkpoint(&good);
    let dst = Pod::run(&cri, "corrupt-dst", HANDLER, &td.path);

    let garbage = td.join("garbage.tar");
    std::fs::write(&garbage, b"this is not a checkpoint archive\n".repeat(100)).unwrap();
    let e = restore_error(&dst, &b.spec, &garbage);
    eprintln!("garbage: {e}");
    assert!(e.contains("unpacking of checkpoint archive"), "{e}");

    let truncated = td.join("truncated.tar");
    let bytes = std::fs::read(&good).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let e = restore_error(&dst, &b.spec, &truncated);
    eprintln!("truncated: {e}");
    assert!(
        e.contains("unexpected EOF") || e.contains("unpacking") || e.contains("failed to read"),
        "{e}"
    );

    let foreign = std::path::Path::new("/opt/ms2m/image/ms2m-test.oci.tar");
    assert!(
        foreign.exists(),
        "{} (hack/build-image.sh) is missing",
        foreign.display()
    );
    let e = restore_error(&dst, &b.spec, foreign);
    eprintln!("foreign: {e}");
    assert!(e.contains("spec.dump"), "{e}");
    b.assert_running("refused restores of corrupt and foreign archives");
}

/// An archive whose ms2m manifest says a version this ms2m does not read:
/// the shim refuses the restore and names the version.
#[test]
fn archive_from_another_ms2m_version_is_refused() {
    let td = TestDir::new("cri-version");
    let cri = Cri::new();
    let b = Bystander::start(&cri, &td, "version-src");
    let good = td.join("good.tar");
    b.checkpoint(&good);

    let dir = td.subdir("unpacked");
    sh(&["tar", "-xf", path_str(&good), "-C", path_str(&dir)]);
    let mpath = dir.join(ARCHIVE_MANIFEST);
    let mut m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&mpath).unwrap()).unwrap();
    m["version"] = serde_json::json!(99);
    std::fs::write(&mpath, m.to_string()).unwrap();
    let newer = td.join("newer.tar");
    let mut args = vec![
        "tar".to_string(),
        "-cf".into(),
        path_str(&newer).into(),
        "-C".into(),
    ];
    args.push(path_str(&dir).into());
    for e in std::fs::read_dir(&dir).unwrap() {
        args.push(e.unwrap().file_name().to_string_lossy().into_owned());
    }
    sh(&args.iter().map(String::as_str).collect::<Vec<_>>());

    let dst = Pod::run(&cri, "version-dst", HANDLER, &td.path);
    let e = restore_error(&dst, &b.spec, &newer);
    eprintln!("newer manifest: {e}");
    assert!(e.contains("manifest version 99 is not supported"), "{e}");
    b.assert_running("a refused restore of a newer ms2m's archive");
}

/// Runs a command (no shell), panicking with its output on failure.
fn sh(args: &[&str]) -> String {
    let out = ms2m_runtime_tests::run_cmd(
        std::process::Command::new(args[0]).args(&args[1..]),
        ms2m_runtime_tests::CMD_TIMEOUT,
    )
    .unwrap_or_else(|e| panic!("{e}"))
    .ok();
    out.stdout
}

/// Packs a CRI checkpoint archive as an OCI image whose manifest carries
/// the annotation containerd looks for (`org.criu.checkpoint.container.name`;
/// one uncompressed layer: the archive), and imports it into the CRI
/// namespace as `reference` (unpacked: CRI mounts its rootfs to read it).
fn import_checkpoint_image(td: &TestDir, archive: &std::path::Path, name: &str, reference: &str) {
    let layout = td.subdir("ck-image");
    let blobs = layout.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let put = |bytes: &[u8]| -> (String, usize) {
        let tmp = layout.join("blob.tmp");
        std::fs::write(&tmp, bytes).unwrap();
        let hex = sh(&["sha256sum", path_str(&tmp)])
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_string();
        std::fs::rename(&tmp, blobs.join(&hex)).unwrap();
        (format!("sha256:{hex}"), bytes.len())
    };
    let (layer, layer_size) = put(&std::fs::read(archive).unwrap());
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        a => a,
    };
    let config = serde_json::json!({"architecture": arch, "os": "linux", "config": {},
        "rootfs": {"type": "layers", "diff_ids": [layer]}});
    let (config, config_size) = put(config.to_string().as_bytes());
    let manifest = serde_json::json!({"schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config, "size": config_size},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer, "size": layer_size}],
        "annotations": {"org.criu.checkpoint.container.name": name}});
    let (manifest, manifest_size) = put(manifest.to_string().as_bytes());
    let index = serde_json::json!({"schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest, "size": manifest_size,
            "platform": {"architecture": arch, "os": "linux"},
            "annotations": {"io.containerd.image.name": reference}}]});
    std::fs::write(layout.join("index.json"), index.to_string()).unwrap();
    std::fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
    let tar = td.join("ck-image.tar");
    sh(&[
        "tar",
        "-cf",
        path_str(&tar),
        "-C",
        path_str(&layout),
        "oci-layout",
        "index.json",
        "blobs",
    ]);
    let env = cri_env();
    sh(&[
        path_str(&ms2m_runtime_tests::env().ctr),
        "--address",
        &env.address,
        "--namespace",
        &env.namespace,
        "images",
        "import",
        "--platform",
        &format!("linux/{arch}"),
        path_str(&tar),
    ]);
}

/// Removes an image from the CRI namespace on drop.
struct CriImage(String);

impl Drop for CriImage {
    fn drop(&mut self) {
        let env = cri_env();
        let _ = ms2m_runtime_tests::run_cmd(
            std::process::Command::new(&ms2m_runtime_tests::env().ctr)
                .args(["--address", &env.address, "--namespace", &env.namespace])
                .args(["images", "rm", &self.0]),
            ms2m_runtime_tests::CMD_TIMEOUT,
        );
    }
}

/// The other form containerd restores from: a checkpoint *image* (the
/// archive as an OCI image with containerd's checkpoint annotation, as an
/// operator would push to a registry), named as the container's image.
#[test]
fn restore_from_a_checkpoint_image_through_cri() {
    let td = TestDir::new("cri-ck-image");
    let cri = Cri::new();
    let b = Bystander::start(&cri, &td, "ck-image-src");
    // Far from what a fresh start would count to by the first read.
    let before = wait_counter_above(&cri, &b.id, 30, Duration::from_secs(10));
    let archive = td.join("mc.tar");
    b.checkpoint(&archive);
    let at_checkpoint = counter(&cri, &b.id).expect("counter");
    let reference = format!(
        "localhost/ms2m-checkpoint/{}:1",
        ms2m_runtime_tests::unique_id("mc")
    );
    import_checkpoint_image(&td, &archive, "mc", &reference);
    let _image = CriImage(reference.clone());
    wait_until(
        &format!("CRI to know the image {reference}"),
        Duration::from_secs(10),
        Duration::from_millis(20),
        || cri.image_present(&reference).ok().filter(|p| *p),
    );
    drop(b);

    let dst = Pod::run(&cri, "ck-image-dst", HANDLER, &td.path);
    let mut restore = ContainerSpec::memcounter("mc", 1, 20);
    restore.image = reference.clone();
    let rid = dst
        .try_create(&restore)
        .unwrap_or_else(|e| panic!("CreateContainer from the checkpoint image {reference}: {e:?}"));
    cri.start_container(&rid)
        .unwrap_or_else(|e| panic!("StartContainer (restore from {reference}): {e:?}"));
    assert_eq!(cri.container_state(&rid).unwrap(), CONTAINER_RUNNING);
    assert_eq!(runtime_of(&rid), MS2M_RUNTIME);
    let first = counter(&cri, &rid).expect("the restored counter");
    // The restored process counts on from the checkpoint's value (a
    // restart would start at 1); it may have counted a little by the read.
    assert!(
        first >= before && first <= at_checkpoint + 25,
        "restored counter {first}: the checkpoint was between {before} and {at_checkpoint}"
    );
    wait_counter_above(&cri, &rid, first, Duration::from_secs(5));
}
