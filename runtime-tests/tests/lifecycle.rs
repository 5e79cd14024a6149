//! The task lifecycle through `ctr`: run, state, exec (with and without a
//! terminal), ps, pause/resume, metrics, kill (one process and --all),
//! delete, and the events containerd publishes for all of that.

use std::time::Duration;

use ms2m_runtime_tests::{
    ctr, env, run_cmd, unique_id, CmdOut, Container, Events, RunOpts, TestDir, MEMCOUNTER,
};

const T: Duration = Duration::from_secs(20);

/// `ctr task exec -d` of `sleep 1000` in `c` (a second process).
fn exec_sleep(c: &Container) {
    let exec_id = c.exec_id("sleep");
    ctr(&[
        "task",
        "exec",
        "-d",
        "--exec-id",
        &exec_id,
        &c.id,
        "sleep",
        "1000",
    ])
    .ok();
}

/// `ctr task ps` of `c` (which must succeed) and the pids it lists.
fn task_ps(c: &Container) -> (CmdOut, Vec<u32>) {
    let out = ctr(&["task", "ps", &c.id]).ok();
    let pids = out
        .stdout
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect();
    (out, pids)
}

/// Runs under events: run with a log file, exec, pause, resume, checkpoint,
/// SIGTERM, delete; every step is checked and so is the event it publishes.
#[test]
fn lifecycle_with_events() {
    let td = TestDir::new("lifecycle");
    let events = Events::start();
    let c = Container::run("life", RunOpts::memcounter(0, 50));
    c.wait_status("RUNNING", T);
    events.wait_for("/tasks/create", &c.id, T);
    events.wait_for("/tasks/start", &c.id, T);

    // exec publishes exec-added, exec-started and an exit for the exec.
    let exec_id = unique_id("ev");
    let out = ctr(&[
        "task",
        "exec",
        "--exec-id",
        &exec_id,
        &c.id,
        "cat",
        "/tmp/counter",
    ])
    .ok();
    assert!(out.stdout.trim().parse::<u64>().is_ok(), "{out}");
    let added = events.wait_for("/tasks/exec-added", &c.id, T);
    assert_eq!(added.payload["exec_id"], exec_id.as_str(), "{added:?}");
    let started = events.wait_for("/tasks/exec-started", &c.id, T);
    assert_eq!(started.payload["exec_id"], exec_id.as_str(), "{started:?}");
    assert!(
        started.payload["pid"].as_u64().unwrap_or(0) > 0,
        "{started:?}"
    );

    // pause: PAUSED, frozen cgroup, the counter stands still.
    ctr(&["task", "pause", &c.id]).ok();
    c.wait_status("PAUSED", T);
    events.wait_for("/tasks/paused", &c.id, T);
    if let Some(state) = c.freezer_state() {
        assert_eq!(state, "FROZEN", "freezer state of a paused task");
    }
    let v1 = c
        .host_counter()
        .expect("counter readable through /proc/PID/root");
    // A negative can only be observed over time: 6 intervals of the workload.
    std::thread::sleep(Duration::from_millis(300));
    let v2 = c
        .host_counter()
        .expect("counter readable through /proc/PID/root");
    assert_eq!(v1, v2, "the counter advanced while the task was paused");

    // resume: RUNNING again, the counter moves on from where it stood.
    ctr(&["task", "resume", &c.id]).ok();
    c.wait_status("RUNNING", T);
    events.wait_for("/tasks/resumed", &c.id, T);
    if let Some(state) = c.freezer_state() {
        assert_eq!(state, "THAWED", "freezer state of a resumed task");
    }
    let v3 = c.wait_counter_above(v2, T);
    assert!(v3 > v2);

    // A leave-running checkpoint publishes /tasks/checkpointed.
    let img = td.join("img");
    let work = td.join("work");
    c.ctr_checkpoint(&[
        "--image-path",
        img.to_str().unwrap_or_default(),
        "--work-path",
        work.to_str().unwrap_or_default(),
    ])
    .ok();
    // containerd's runc shim publishes no /tasks/checkpointed for this
    // path; ms2m must.
    if env().is_ms2m() {
        events.wait_for("/tasks/checkpointed", &c.id, T);
    }
    c.wait_status("RUNNING", T);

    // SIGTERM (ctr's default signal): memcounter exits 0, the task stops.
    let pid = c.pid();
    ctr(&["task", "kill", &c.id]).ok();
    c.wait_status("STOPPED", T);
    let exit = events.wait_for_init_exit(&c.id, T);
    assert_eq!(
        exit.payload["pid"].as_u64(),
        Some(u64::from(pid)),
        "{exit:?}"
    );
    // Protobuf JSON leaves out a zero exit status.
    assert_eq!(
        exit.payload["exit_status"].as_u64().unwrap_or(0),
        0,
        "{exit:?}"
    );
    assert!(exit.payload.get("exited_at").is_some(), "{exit:?}");

    // delete: the task is gone and /tasks/delete reports the exit.
    let out = ctr(&["task", "delete", &c.id]).ok();
    assert!(c.task().is_none(), "task still listed after delete: {out}");
    // containerd's runc shim sometimes loses its /tasks/delete (it exits
    // right after the delete, racing its event forwarder: seen once in eight
    // runs here); ms2m's shim must always deliver it.
    let must_delete = env().is_ms2m();
    if must_delete {
        let del = events.wait_for("/tasks/delete", &c.id, T);
        assert_eq!(del.payload["pid"].as_u64(), Some(u64::from(pid)), "{del:?}");
    }

    // The exec's exit was reported too (id = exec id).
    assert!(
        events
            .for_container(&c.id)
            .iter()
            .any(|e| e.topic == "/tasks/exit" && e.payload["id"] == exec_id.as_str()),
        "no /tasks/exit for exec {exec_id}: {:#?}",
        events.for_container(&c.id)
    );
    let topics: Vec<String> = events
        .for_container(&c.id)
        .into_iter()
        .map(|e| e.topic)
        .collect();
    for t in [
        "/tasks/create",
        "/tasks/start",
        "/tasks/exec-added",
        "/tasks/exec-started",
        "/tasks/paused",
        "/tasks/resumed",
        "/tasks/exit",
    ] {
        assert!(topics.iter().any(|x| x == t), "missing {t} in {topics:?}");
    }
    // Order of the main lifecycle events.
    let pos = |t: &str| topics.iter().position(|x| x == t);
    assert!(pos("/tasks/create") < pos("/tasks/start"), "{topics:?}");
    assert!(pos("/tasks/paused") < pos("/tasks/resumed"), "{topics:?}");
    if must_delete {
        assert!(
            topics.iter().rposition(|x| x == "/tasks/exit") < pos("/tasks/delete"),
            "{topics:?}"
        );
    }
}

/// `ctr run --log-uri file://...`: the task's stdout lands in the file, and
/// such a task can still be checkpointed and restored (containerd's runc
/// shim copies the output through pipes, so CRIU never sees the host file).
#[test]
fn log_uri_file_output_and_checkpoint() {
    let td = TestDir::new("logfile");
    let log = td.join("stdout.log");
    let c = Container::run(
        "logf",
        RunOpts::memcounter(0, 50).log_uri(&format!("file://{}", log.display())),
    );
    c.wait_status("RUNNING", T);
    let lines = || -> Vec<u64> {
        std::fs::read_to_string(&log)
            .map(|t| t.lines().filter_map(|l| l.trim().parse().ok()).collect())
            .unwrap_or_default()
    };
    ms2m_runtime_tests::wait_until(
        "memcounter's output in the task's log file",
        T,
        Duration::from_millis(50),
        || {
            let nums = lines();
            (nums.len() >= 3 && nums[..3] == [1, 2, 3]).then_some(())
        },
    );
    let img = td.join("img");
    let work = td.join("work");
    c.ctr_checkpoint(&[
        "--exit",
        "--image-path",
        img.to_str().unwrap_or_default(),
        "--work-path",
        work.to_str().unwrap_or_default(),
    ])
    .ok();
    c.wait_status("STOPPED", T);
    let before = lines().last().copied().unwrap_or(0);
    ctr(&["task", "delete", &c.id]).ok();
    ms2m_runtime_tests::ms2m(&[
        "restore",
        "--log",
        log.to_str().unwrap_or_default(),
        &c.id,
        img.to_str().unwrap_or_default(),
    ])
    .ok();
    c.wait_status("RUNNING", T);
    // The restored task keeps writing to the log, continuing the count.
    ms2m_runtime_tests::wait_until(
        "the restored task's output in the log file",
        T,
        Duration::from_millis(50),
        || (lines().last().copied().unwrap_or(0) > before + 2).then_some(()),
    );
    let nums = lines();
    assert!(
        nums.windows(2).all(|w| w[1] == w[0] + 1),
        "the count in the log restarted or skipped: {nums:?}"
    );
}

/// exec without a terminal: stdout and stderr captured separately, the exit
/// code propagated, a missing binary is an error.
#[test]
fn exec_output_and_exit_codes() {
    let c = Container::run("exec", RunOpts::memcounter(0, 100));
    c.wait_status("RUNNING", T);

    let out = c.exec(&["sh", "-c", "echo to-stdout; echo to-stderr >&2; exit 3"]);
    assert_eq!(out.code, Some(3), "{out}");
    assert_eq!(out.stdout.trim(), "to-stdout", "{out}");
    assert!(out.stderr.contains("to-stderr"), "{out}");

    let out = c.exec(&["sh", "-c", "exit 0"]);
    assert_eq!(out.code, Some(0), "{out}");

    // Larger output than a pipe buffer comes through whole.
    let out = c.exec(&["sh", "-c", "seq 1 20000"]).ok();
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 20000, "exec output truncated");
    assert_eq!(lines.last().copied(), Some("20000"));

    let out = c.exec(&["/no/such/binary"]);
    assert!(!out.success(), "exec of a missing binary succeeded: {out}");

    // The task is unaffected by all of that.
    let v = c.counter();
    c.wait_counter_above(v, T);
}

/// exec with -t: the process gets a terminal (ctr needs one itself, which
/// `script` provides), output comes through, the exit code is propagated.
#[test]
fn exec_with_tty() {
    let script = ms2m_runtime_tests::which("script")
        .expect("`script` (util-linux/bsdutils) is needed to give ctr a terminal");
    let e = env();
    let c = Container::run("tty", RunOpts::memcounter(0, 100));
    c.wait_status("RUNNING", T);
    let exec_id = unique_id("tty");
    let cmdline = format!(
        "{} --address {} --namespace {} task exec -t --exec-id {} {} sh -c 'tty; echo tty-ok; exit 5'",
        e.ctr.display(),
        e.address,
        e.namespace,
        exec_id,
        c.id
    );
    let out = run_cmd(
        std::process::Command::new(script).args(["-qec", &cmdline, "/dev/null"]),
        Duration::from_secs(60),
    )
    .unwrap_or_else(|err| panic!("{err}"));
    assert_eq!(out.code, Some(5), "{out}");
    assert!(
        out.stdout.contains("/dev/pts/"),
        "no terminal in the exec: {out}"
    );
    assert!(out.stdout.contains("tty-ok"), "{out}");
}

/// `ctr run` in the foreground: output through the FIFOs, the task's exit
/// code is ctr's exit code (wait works), and a task started with -t has a
/// terminal.
#[test]
fn foreground_run_exit_code_and_output() {
    let e = env();
    let id = unique_id("fg");
    let c = Container::adopt(&id);
    let out = ctr(&[
        "run",
        "--rm",
        "--runtime",
        &e.runtime,
        &e.image,
        &id,
        "sh",
        "-c",
        "echo fg-out; echo fg-err >&2; exit 4",
    ]);
    assert_eq!(out.code, Some(4), "{out}");
    assert_eq!(out.stdout.trim(), "fg-out", "{out}");
    assert!(out.stderr.contains("fg-err"), "{out}");
    // --rm removed the container.
    let list = ctr(&["containers", "ls", "-q"]).ok();
    assert!(!list.stdout.lines().any(|l| l.trim() == id), "{list}");
    drop(c);
}

/// `ctr task ps` lists the init process and exec'd processes.
#[test]
fn ps_lists_processes() {
    let c = Container::run("ps", RunOpts::memcounter(0, 100));
    c.wait_status("RUNNING", T);
    let pid = c.pid();
    let (out, pids) = task_ps(&c);
    assert_eq!(pids, vec![pid], "{out}");

    exec_sleep(&c);
    let pids = ms2m_runtime_tests::wait_until(
        "two processes in `ctr task ps`",
        T,
        Duration::from_millis(50),
        || {
            let (_, pids) = task_ps(&c);
            (pids.len() == 2).then_some(pids)
        },
    );
    assert!(pids.contains(&pid), "{pids:?}");
}

/// `ctr task metrics` returns cgroup data: memory usage, pids.
#[test]
fn metrics_report_memory() {
    let c = Container::run("metrics", RunOpts::memcounter(16, 100));
    c.wait_status("RUNNING", T);
    c.wait_counter_above(1, T);
    let out = ctr(&["task", "metrics", "--format", "json", &c.id]).ok();
    let m: serde_json::Value = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("metrics are not JSON ({e}): {out}"));
    let mem = &m["memory"];
    assert!(mem.is_object(), "no memory section in metrics: {out}");
    // cgroup v1 (this machine): memory.usage.usage; cgroup v2: memory.usage.
    let usage = mem["usage"]["usage"]
        .as_u64()
        .or_else(|| mem["usage"].as_u64())
        .unwrap_or(0);
    assert!(
        usage >= 16 << 20,
        "memory usage {usage} below the workload's 16 MiB: {out}"
    );
    let pids = m["pids"]["current"].as_u64().unwrap_or(0);
    assert!(pids >= 1, "pids.current missing: {out}");
    // The table form works too.
    let out = ctr(&["task", "metrics", &c.id]).ok();
    assert!(out.stdout.contains("memory"), "{out}");
}

/// kill with a signal the init process handles: its exit status is reported.
#[test]
fn kill_reports_exit_status() {
    let events = Events::start();
    let c = Container::run(
        "kill",
        RunOpts::command(&[
            "sh",
            "-c",
            "trap 'exit 7' TERM; touch /tmp/ready; while :; do sleep 0.05; done",
        ]),
    );
    c.wait_status("RUNNING", T);
    ms2m_runtime_tests::wait_until("the trap to be set", T, Duration::from_millis(50), || {
        c.exec(&["test", "-e", "/tmp/ready"])
            .success()
            .then_some(())
    });
    ctr(&["task", "kill", "--signal", "SIGTERM", &c.id]).ok();
    c.wait_status("STOPPED", T);
    let exit = events.wait_for_init_exit(&c.id, T);
    assert_eq!(exit.payload["exit_status"].as_u64(), Some(7), "{exit:?}");
    // Killing a stopped task is an error, not a hang.
    let out = ctr(&["task", "kill", "--signal", "SIGKILL", &c.id]);
    assert!(!out.success(), "kill of a stopped task succeeded: {out}");
    ctr(&["task", "delete", &c.id]).ok();
    assert!(c.task().is_none());
    ctr(&["containers", "delete", &c.id]).ok();
}

/// kill --all reaches every process in the container, not only init.
#[test]
fn kill_all_reaches_every_process() {
    let events = Events::start();
    // init ignores SIGTERM, so only --all with SIGKILL ends it; the exec'd
    // sleep must die as well.
    let c = Container::run(
        "killall",
        RunOpts::command(&["sh", "-c", "trap '' TERM; while :; do sleep 0.05; done"]),
    );
    c.wait_status("RUNNING", T);
    exec_sleep(&c);
    let sleeper = events.wait_for("/tasks/exec-started", &c.id, T);
    let sleeper_pid = sleeper.payload["pid"].as_u64().expect("exec pid") as u32;

    ctr(&["task", "kill", "--all", "--signal", "SIGKILL", &c.id]).ok();
    c.wait_status("STOPPED", T);
    let init = events.wait_for_init_exit(&c.id, T);
    ms2m_runtime_tests::wait_until(
        "the exec'd process to be gone",
        T,
        Duration::from_millis(20),
        || (!std::path::Path::new(&format!("/proc/{sleeper_pid}")).exists()).then_some(()),
    );
    assert_eq!(init.payload["exit_status"].as_u64(), Some(137), "{init:?}");
    ctr(&["task", "delete", &c.id]).ok();
    ctr(&["containers", "delete", &c.id]).ok();
}

/// The memcounter binary in the image is what the tests expect.
#[test]
fn image_has_the_workload() {
    let c = Container::run("image", RunOpts::memcounter(0, 100));
    c.wait_status("RUNNING", T);
    let out = c
        .exec(&["ls", "-l", MEMCOUNTER, "/bin/busybox", "/lib", "/lib64"])
        .ok();
    assert!(out.stdout.contains("lib -> usr/lib"), "{out}");
    let v = c.wait_counter_above(2, T);
    assert!(v > 2);
}

/// A memory limit the workload exceeds: the kernel kills it, the shim
/// publishes /tasks/oom and the exit (137).
#[test]
fn oom_is_reported() {
    let events = Events::start();
    let c = Container::run(
        "oom",
        RunOpts::memcounter(128, 100).flag("--memory-limit=67108864"),
    );
    events.wait_for("/tasks/oom", &c.id, T);
    c.wait_status("STOPPED", T);
    let exit = events.wait_for_init_exit(&c.id, T);
    assert_eq!(exit.payload["exit_status"].as_u64(), Some(137), "{exit:?}");
}

/// The shim reaps what it starts (no zombies after execs) and exits once its
/// container is deleted.
#[test]
fn shim_reaps_and_exits_after_delete() {
    let c = Container::run("shim", RunOpts::memcounter(0, 100));
    c.wait_status("RUNNING", T);
    let shim = c.shim_pid().expect("a shim process with -id <container>");
    for i in 0..5 {
        let out = c.exec(&["sh", "-c", &format!("exit {i}")]);
        assert_eq!(out.code, Some(i), "{out}");
    }
    // Exec'd processes are the shim's (or runc's) children until reaped:
    // give the reaper a moment, then there must be no zombie left.
    ms2m_runtime_tests::wait_until(
        "no zombie children of the shim",
        T,
        Duration::from_millis(50),
        || {
            let kids = ms2m_runtime_tests::child_states(shim);
            (!kids.iter().any(|(_, s)| *s == 'Z')).then_some(())
        },
    );
    ctr(&["task", "kill", "--signal", "SIGKILL", &c.id]).ok();
    c.wait_status("STOPPED", T);
    ctr(&["task", "delete", &c.id]).ok();
    ctr(&["containers", "delete", &c.id]).ok();
    ms2m_runtime_tests::wait_until(
        "the shim process to exit after the container was deleted",
        T,
        Duration::from_millis(50),
        || {
            let alive = std::fs::read_to_string(format!("/proc/{shim}/stat"))
                .ok()
                .and_then(|s| ms2m_runtime_tests::proc_stat_state(&s))
                .is_some_and(|s| s != 'Z');
            (!alive).then_some(())
        },
    );
}

/// `ctr run -t` in the foreground: the init process has a terminal, output
/// comes through it, the exit code is ctr's.
#[test]
fn foreground_run_with_tty() {
    let script = ms2m_runtime_tests::which("script")
        .expect("`script` (util-linux/bsdutils) is needed to give ctr a terminal");
    let e = env();
    let id = unique_id("fgtty");
    let _guard = Container::adopt(&id);
    let cmdline = format!(
        "{} --address {} --namespace {} run --rm -t --runtime {} {} {} sh -c 'tty; echo tty-run-ok; exit 3'",
        e.ctr.display(),
        e.address,
        e.namespace,
        e.runtime,
        e.image,
        id
    );
    let out = run_cmd(
        std::process::Command::new(script).args(["-qec", &cmdline, "/dev/null"]),
        Duration::from_secs(60),
    )
    .unwrap_or_else(|err| panic!("{err}"));
    assert_eq!(out.code, Some(3), "{out}");
    assert!(out.stdout.contains("/dev/pts/"), "no terminal: {out}");
    assert!(out.stdout.contains("tty-run-ok"), "{out}");
}

/// Many execs at once: each reports its own exit code and output (no exit
/// lost or given to the wrong process).
#[test]
fn concurrent_execs_keep_their_exit_codes() {
    let c = Container::run("conc", RunOpts::memcounter(0, 100));
    c.wait_status("RUNNING", T);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..16)
            .map(|i| {
                let c = &c;
                s.spawn(move || {
                    let script = format!("echo out-{i}; sleep 0.{}; exit {}", i % 3, i + 10);
                    (i, c.exec(&["sh", "-c", &script]))
                })
            })
            .collect();
        for h in handles {
            let (i, out) = h.join().expect("exec thread");
            assert_eq!(out.code, Some(i + 10), "exec {i}: {out}");
            assert_eq!(out.stdout.trim(), format!("out-{i}"), "exec {i}: {out}");
        }
    });
    assert_eq!(c.status().as_deref(), Some("RUNNING"));
}
