//! Printing: one JSON object per command with `--json`, else a short text
//! report for a human.

use std::fmt::Write as _;

use criu_bridge::manifest::{describe_dump, describe_restore, Manifest};
use serde::Serialize;

use crate::checkpoint::CheckpointReport;
use crate::inspect::InspectReport;
use crate::restore::RestoreReport;

/// Prints `value` as one line of JSON on stdout.
pub fn print_json<T: Serialize>(value: &T) -> anyhow::Result<()> {
    let line = serde_json::to_string(value)?;
    println!("{line}");
    Ok(())
}

fn ms(v: f64) -> String {
    format!("{v:.1} ms")
}

/// The text report of a checkpoint.
pub fn checkpoint_text(r: &CheckpointReport) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "checkpointed container {} (runtime {}, namespace {})",
        r.container_id, r.runtime, r.namespace
    );
    let default_note = if r.image_path_defaulted {
        " (default location; no --image-path given)"
    } else {
        ""
    };
    let _ = writeln!(s, "  image path:  {}{default_note}", r.image_path);
    let _ = writeln!(s, "  work path:   {}", r.work_path);
    let mut flags = Vec::new();
    if r.tcp_established {
        flags.push("tcp-established");
    }
    if r.file_locks {
        flags.push("file-locks");
    }
    if r.ext_unix_sk {
        flags.push("ext-unix-sk");
    }
    let flags = if flags.is_empty() {
        String::new()
    } else {
        format!(" [{}]", flags.join(", "))
    };
    match r.exit_wait_ms {
        Some(w) => {
            let _ = writeln!(
                s,
                "  mode:        exit{flags}; task {} {} after the dump",
                r.task_status,
                ms(w)
            );
        }
        None => {
            let _ = writeln!(
                s,
                "  mode:        leave-running{flags}; task {}",
                r.task_status
            );
        }
    }
    let _ = writeln!(
        s,
        "  wall time:   {} (Tasks.Checkpoint), {} in all",
        ms(r.checkpoint_ms),
        ms(r.total_ms)
    );
    match (&r.stats, &r.stats_source) {
        (Some(st), src) => {
            let src = src.as_deref().unwrap_or("?");
            let _ = writeln!(s, "  freeze:      {} (from {src})", describe_dump(st));
        }
        (None, _) => {
            let why = r.stats_missing.as_deref().unwrap_or("not found");
            let _ = writeln!(s, "  freeze:      no statistics: {why}");
        }
    }
    if let Some(m) = &r.manifest {
        manifest_lines(&mut s, m, false);
    }
    s
}

/// The text report of a restore.
pub fn restore_text(r: &RestoreReport) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "restored container {} from {} {} (runtime {}, namespace {})",
        r.container_id, r.source_kind, r.source, r.runtime, r.namespace
    );
    if let Some(d) = &r.checkpoint_digest {
        let _ = writeln!(s, "  checkpoint:  {d}");
    }
    if let Some(p) = &r.previous_task {
        let _ = writeln!(s, "  old task:    {p}");
    }
    let _ = writeln!(s, "  task:        pid {}, {}", r.pid, r.task_status);
    let _ = writeln!(
        s,
        "  to running:  {} (Tasks.Create {}, Tasks.Start {}), {} in all",
        ms(r.time_to_running_ms),
        ms(r.create_ms),
        ms(r.start_ms),
        ms(r.total_ms)
    );
    match &r.restore_stats {
        Some(st) => {
            let _ = writeln!(
                s,
                "  restore:     {} (from stats-restore)",
                describe_restore(st)
            );
        }
        None => {
            let why = r.restore_stats_missing.as_deref().unwrap_or("not found");
            let _ = writeln!(s, "  restore:     no statistics: {why}");
        }
    }
    let _ = writeln!(s, "  work path:   {}", r.work_path);
    let _ = writeln!(
        s,
        "  stdio:       stdout/stderr {}, stdin {} (end-of-file)",
        r.log, r.stdin
    );
    if let Some(why) = &r.manifest_missing {
        let _ = writeln!(s, "  manifest:    none ({why})");
    }
    if let Some(m) = &r.manifest {
        let _ = writeln!(
            s,
            "  checkpoint of {} taken {}",
            m.container_id, m.created_at
        );
        if let Some(st) = &m.stats {
            let _ = writeln!(s, "  its freeze:  {}", describe_dump(st));
        }
    }
    s
}

/// The text report of `ms2m fence`.
pub fn fence_text(r: &crate::fence::FenceReport) -> String {
    let mut s = String::new();
    let f = &r.fence;
    let _ = writeln!(
        s,
        "fenced container {} for {}",
        r.container_id, r.image_path
    );
    let _ = writeln!(
        s,
        "  publishes after the cut: {} (a restore of this checkpoint suppresses them)",
        f["publishes_after_cut"]
    );
    let _ = writeln!(
        s,
        "  quiesce:     complete {}, waited {} ms, unsettled {}",
        f["quiesce"]["complete"], f["quiesce"]["waited_ms"], f["quiesce"]["unsettled"]
    );
    let _ = writeln!(
        s,
        "  source:      {}",
        if r.killed {
            "killed"
        } else {
            "running, deliveries held: stop it before the restore goes live"
        }
    );
    s
}

/// The text report of `ms2m inspect`.
pub fn inspect_text(r: &InspectReport) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "checkpoint {}", r.image_path);
    match &r.manifest {
        Some(m) => manifest_lines(&mut s, m, true),
        None => {
            let _ = writeln!(s, "  manifest:    none (not taken by the ms2m shim)");
            match &r.stats {
                Some(st) => {
                    let src = r.stats_source.as_deref().unwrap_or("?");
                    let _ = writeln!(s, "  freeze:      {} (from {src})", describe_dump(st));
                }
                None => {
                    let _ = writeln!(s, "  freeze:      no CRIU stats-dump found");
                }
            }
        }
    }
    if let Some(f) = &r.fence {
        let _ = writeln!(
            s,
            "  fence:       {} publishes after the cut (taken {}); a restore suppresses them",
            f["publishes_after_cut"],
            f["taken_at"].as_str().unwrap_or("?")
        );
    }
    s
}

/// Lines describing a manifest; `full` adds what a checkpoint report
/// already shows.
fn manifest_lines(s: &mut String, m: &Manifest, full: bool) {
    if full {
        let ns = m.namespace.as_deref().unwrap_or("?");
        let _ = writeln!(s, "  container:   {} (namespace {ns})", m.container_id);
        let _ = writeln!(s, "  taken:       {}", m.created_at);
        let _ = writeln!(s, "  manifest:    {} v{}", m.schema, m.version);
    }
    let rt = &m.runtime;
    let _ = writeln!(
        s,
        "  runtime:     {} {}, {} {}, CRIU {}",
        rt.shim,
        rt.shim_version,
        rt.oci_runtime,
        rt.oci_runtime_version.as_deref().unwrap_or("?"),
        rt.criu_version.as_deref().unwrap_or("?")
    );
    if !m.strategy.name.is_empty() {
        let _ = writeln!(
            s,
            "  strategy:    {}: {}",
            m.strategy.name, m.strategy.reason
        );
    }
    if full {
        let o = &m.options;
        let mut flags = vec![if o.exit { "exit" } else { "leave-running" }.to_string()];
        for (on, name) in [
            (o.tcp_established, "tcp-established"),
            (o.tcp_close, "tcp-close"),
            (o.external_unix_sockets, "ext-unix-sk"),
            (o.shell_job, "shell-job"),
            (o.file_locks, "file-locks"),
        ] {
            if on {
                flags.push(name.to_string());
            }
        }
        if !o.network_lock.is_empty() {
            flags.push(format!("network-lock {}", o.network_lock));
        }
        let _ = writeln!(s, "  options:     {}", flags.join(", "));
        let _ = writeln!(s, "  image path:  {}", o.image_path);
        if let Some(w) = &o.work_path {
            let _ = writeln!(s, "  work path:   {w}");
        }
        match &m.stats {
            Some(st) => {
                let _ = writeln!(s, "  freeze:      {}", describe_dump(st));
            }
            None => {
                let _ = writeln!(s, "  freeze:      no statistics recorded");
            }
        }
    }
    let _ = writeln!(
        s,
        "  shim timing: dump {}, checkpoint {} in all",
        ms(m.timings.dump_ms),
        ms(m.timings.total_ms)
    );
    if !m.extensions.is_empty() {
        let keys: Vec<&str> = m.extensions.keys().map(String::as_str).collect();
        let _ = writeln!(s, "  sections:    {}", keys.join(", "));
    }
}
