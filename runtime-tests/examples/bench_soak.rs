//! The soak of issue 9, driven by `hack/bench-soak.sh` (`hack/bench.sh
//! soak`), which checks the prerequisites and cleans up after a kill.
//!
//! ```text
//! bench_soak capacity SECONDS        the consumer's ceiling, behind the tap and direct
//! bench_soak soak MINUTES RATE       ms2m + tap, leave-running checkpoint every 10 s,
//!                                    exit checkpoint + restore every 60 s
//! bench_soak baseline MINUTES RATE   containerd-shim-runc-v2, the consumer straight
//!                                    to the broker, no checkpoints (RSS reference)
//! bench_soak cleanup                 remove what a killed run with this BENCH_TOKEN left
//! ```
//!
//! Output: one JSON object per measurement on stdout (see
//! `ms2m_runtime_tests::soak::SoakReport::json`); progress on stderr. Exit
//! status 1 when a soak was not exact (lost, duplicated, out of order, a
//! failed checkpoint or restore), 101 on a setup failure.
//!
//! Container ids, queue names and directories start with `BENCH_TOKEN`
//! (default `bs<pid>`); CRIU dump logs and the consumer's log go to
//! `BENCH_LOGDIR` when set.

use std::path::PathBuf;
use std::time::Duration;

use ms2m_runtime_tests::soak::{capacity, cleanup, run, Mode, SoakConfig};

fn arg(args: &[String], i: usize, what: &str) -> u64 {
    args.get(i)
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("argument {i} ({what}) missing or not a number: {args:?}"))
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let token = std::env::var("BENCH_TOKEN")
        .ok()
        .filter(|t| !t.is_empty())
        .unwrap_or_else(|| format!("bs{}", std::process::id()));
    // The consumer's BATCH (see the workload's docs); 1 by default.
    let batch: usize = std::env::var("SOAK_BATCH")
        .ok()
        .map(|b| {
            b.parse()
                .unwrap_or_else(|_| panic!("SOAK_BATCH {b:?} is not a number"))
        })
        .unwrap_or(1);
    let soak = |mode: Mode| {
        let minutes = arg(&args, 2, "minutes");
        let rate = arg(&args, 3, "rate");
        let mut cfg = SoakConfig::new(mode, Duration::from_secs(minutes * 60), rate, &token);
        cfg.keep_logs = std::env::var_os("BENCH_LOGDIR").map(PathBuf::from);
        cfg.batch = batch;
        let report = run(&cfg);
        println!("{}", report.json());
        report.exact()
    };
    let exact = match args.get(1).map(String::as_str) {
        Some("capacity") => {
            let secs = arg(&args, 2, "seconds");
            for mode in [Mode::Ms2mTapped, Mode::RuncDirect] {
                let (producer, consumer) = capacity(mode, secs, batch, &token);
                println!(
                    "{}",
                    serde_json::json!({
                        "name": "soak_capacity_msgs", "runtime": mode.name(), "unit": "msg/s",
                        "seconds": secs, "batch": batch, "producer": producer.round(), "consumer": consumer.round(),
                        "what": "producer unthrottled for 5 s (publisher confirms, 512 in flight), then the consumer's results per second working through that backlog alone",
                    })
                );
            }
            true
        }
        Some("soak") => soak(Mode::Ms2mTapped),
        Some("cleanup") => {
            cleanup(&token);
            true
        }
        Some("baseline") => soak(Mode::RuncDirect),
        _ => {
            eprintln!(
                "usage: bench_soak capacity SECONDS | soak MINUTES RATE | baseline MINUTES RATE"
            );
            std::process::exit(2);
        }
    };
    if !exact {
        std::process::exit(1);
    }
}
