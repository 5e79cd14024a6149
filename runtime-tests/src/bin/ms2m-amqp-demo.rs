//! The producer and the checker of the broker demo (`hack/demo.sh`), as a
//! command: the demo script runs the container operations in between.
//!
//! ```text
//! ms2m-amqp-demo produce QUEUE COUNT RATE CONFIRMED_FILE   publish seq 1..=COUNT at RATE msg/s
//! ms2m-amqp-demo check RESULTS_QUEUE CONFIRMED_FILE        compare with what the consumer published
//! ```
//!
//! Both talk to the broker directly (`MS2M_AMQP_URL`, default
//! amqp://guest:guest@127.0.0.1:5672/%2f), not through a tap.

use std::process::ExitCode;
use std::time::Duration;

use ms2m_runtime_tests::amqp::{collect_results, Checker, Producer, ProducerConfig};

fn usage() -> ExitCode {
    eprintln!(
        "usage: ms2m-amqp-demo produce QUEUE COUNT RATE CONFIRMED_FILE\n       ms2m-amqp-demo check RESULTS_QUEUE CONFIRMED_FILE"
    );
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["produce", queue, count, rate, file] => {
            let (Ok(count), Ok(rate)) = (count.parse::<u64>(), rate.parse::<u64>()) else {
                return usage();
            };
            let report = Producer::run(ProducerConfig::new(queue, count, rate));
            let list: Vec<String> = report.confirmed.iter().map(u64::to_string).collect();
            if let Err(e) = std::fs::write(file, list.join("\n")) {
                eprintln!("error: write {file}: {e}");
                return ExitCode::FAILURE;
            }
            println!(
                "producer: {} messages confirmed by the broker in {:.1} s",
                report.confirmed.len(),
                report.elapsed.as_secs_f64()
            );
            ExitCode::SUCCESS
        }
        ["check", results, file] => {
            let text = match std::fs::read_to_string(file) {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("error: read {file}: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let produced: Vec<u64> = text.lines().filter_map(|l| l.trim().parse().ok()).collect();
            let got = collect_results(results, produced.len(), Duration::from_secs(30));
            let report = Checker::new(produced).check(&got);
            println!("checker: {report}");
            // The consumer's own processing timestamps: the longest it
            // processed nothing while messages were waiting.
            let mut at: Vec<u64> = got.iter().map(|r| r.processed_at_us).collect();
            at.sort_unstable();
            let gap = at.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
            println!(
                "largest gap between two processed messages: {:.1} ms",
                gap as f64 / 1000.0
            );
            if report.is_clean() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        _ => usage(),
    }
}
