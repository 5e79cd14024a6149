//! Where a container's freeze goes, and which options shorten it.
//!
//! Runs memcounter containers on ms2m's containerd with containerd's runc-v2
//! shim and checkpoints them leave-running, side by side in rounds:
//!
//! - `runc`: `ctr task checkpoint` (containerd -> shim -> `runc checkpoint`);
//! - `runc+skip`: the same, the container started with the annotation
//!   `org.criu.config` naming a file with `network-lock skip`;
//! - `direct ...`: [`RuncContainer::dump`] with the knobs named;
//! - `... netns-path`: the container joined a named network namespace
//!   (`ip netns add`), which runc and the bridge declare external.
//!
//! Prints CRIU's `frozen_time` (median of `--runs`, default 5) and the
//! request's wall time per configuration and size, then, per
//! configuration, where the freeze of one extra run at log level 4 went
//! (time between consecutive lines of `dump.log`, by what the later line
//! is about).
//!
//! ```text
//! cargo run --release -p ms2m-criu-bridge --example freeze_profile -- [--runs 5] [--mib 16,256]
//! ```
//! Run as root, with ms2m's containerd up and the test image imported.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use criu_bridge::container::{Cgroups, DumpKnobs, Freeze, RuncContainer};
use criu_bridge::rpc::CriuClient;
use criu_bridge::stats::read_dump_stats;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

const ADDRESS: &str = "/run/ms2m/containerd/containerd.sock";
const NAMESPACE: &str = "ms2m";
const IMAGE: &str = "docker.io/library/ms2m-test:latest";
const BASE: &str = "/dev/shm/ms2m-freeze-profile";

fn ctr(args: &[&str]) -> Res<String> {
    let out = Command::new("ctr")
        .args(["--address", ADDRESS, "--namespace", NAMESPACE])
        .args(args)
        .stdin(Stdio::null())
        .output()?;
    if !out.status.success() {
        return Err(format!(
            "ctr {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )
        .into());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Kind {
    Runc,
    RuncSkip,
    Direct,
}

#[derive(Clone)]
struct Config {
    name: &'static str,
    kind: Kind,
    netns_path: bool,
    knobs: DumpKnobs,
}

fn configs() -> Vec<Config> {
    let d = DumpKnobs::default();
    let ignore = DumpKnobs {
        cgroups: Cgroups::Ignore,
        ..d.clone()
    };
    vec![
        Config {
            name: "runc (ctr task checkpoint)",
            kind: Kind::Runc,
            netns_path: false,
            knobs: d.clone(),
        },
        Config {
            name: "runc + network-lock skip config",
            kind: Kind::RuncSkip,
            netns_path: false,
            knobs: d.clone(),
        },
        Config {
            name: "direct, like runc (iptables lock, log 4)",
            kind: Kind::Direct,
            netns_path: false,
            knobs: DumpKnobs::like_runc(),
        },
        Config {
            name: "direct, default but netns dumped in full",
            kind: Kind::Direct,
            netns_path: false,
            knobs: DumpKnobs {
                empty_netns: false,
                ..d.clone()
            },
        },
        Config {
            name: "direct, default (lock skip: no TCP, log 2)",
            kind: Kind::Direct,
            netns_path: false,
            knobs: d.clone(),
        },
        Config {
            name: "direct, default + cgroups ignore",
            kind: Kind::Direct,
            netns_path: false,
            knobs: ignore.clone(),
        },
        Config {
            name: "direct, default + cgroups ignore + ptrace freeze",
            kind: Kind::Direct,
            netns_path: false,
            knobs: DumpKnobs {
                freeze: Freeze::Ptrace,
                ..ignore.clone()
            },
        },
        Config {
            name: "runc + skip config, netns-path",
            kind: Kind::RuncSkip,
            netns_path: true,
            knobs: d.clone(),
        },
        Config {
            name: "direct, default + cgroups ignore, netns-path (external)",
            kind: Kind::Direct,
            netns_path: true,
            knobs: ignore,
        },
    ]
}

/// A running container for one configuration group.
struct Running {
    id: String,
    netns: Option<String>,
}

impl Running {
    fn start(tag: &str, mib: u32, annotate_skip: bool, netns_path: bool) -> Res<Running> {
        let id = format!("fp-{tag}-{mib}-{}", std::process::id());
        let mut r = Running { id, netns: None };
        let mut args: Vec<String> = vec![
            "run".into(),
            "-d".into(),
            "--runtime".into(),
            "io.containerd.runc.v2".into(),
        ];
        if annotate_skip {
            args.push("--annotation".into());
            args.push(format!("org.criu.config={BASE}/skip.conf"));
        }
        if netns_path {
            let n = r.id.clone();
            Command::new("ip").args(["netns", "add", &n]).status()?;
            Command::new("ip")
                .args(["-n", &n, "link", "set", "lo", "up"])
                .status()?;
            r.netns = Some(n.clone());
            args.push("--with-ns".into());
            args.push(format!("network:/run/netns/{n}"));
        }
        args.extend([
            IMAGE.into(),
            r.id.clone(),
            "/usr/local/bin/memcounter".into(),
            "--mib".into(),
            mib.to_string(),
        ]);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        ctr(&refs)?;
        // Let it allocate and touch its memory.
        std::thread::sleep(std::time::Duration::from_millis(300 + 4 * mib as u64));
        Ok(r)
    }

    fn runc(&self) -> Res<RuncContainer> {
        Ok(RuncContainer::load(
            &Path::new("/run/containerd/runc").join(NAMESPACE),
            &self.id,
        )?)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = ctr(&["tasks", "kill", "-s", "KILL", &self.id]);
        std::thread::sleep(std::time::Duration::from_millis(200));
        let _ = ctr(&["tasks", "rm", "-f", &self.id]);
        let _ = ctr(&["containers", "rm", &self.id]);
        if let Some(n) = &self.netns {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

/// One leave-running checkpoint; returns (frozen ms, wall ms, work dir).
fn checkpoint(
    cfg: &Config,
    c: &Running,
    client: &CriuClient,
    dir: &Path,
    log4: bool,
) -> Res<(f64, f64, PathBuf)> {
    let _ = std::fs::remove_dir_all(dir);
    let work = dir.with_extension("work");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    match cfg.kind {
        Kind::Runc | Kind::RuncSkip => {
            let t0 = Instant::now();
            ctr(&[
                "tasks",
                "checkpoint",
                "--image-path",
                &dir.to_string_lossy(),
                "--work-path",
                &work.to_string_lossy(),
                &c.id,
            ])?;
            let wall = t0.elapsed().as_secs_f64() * 1000.0;
            let s = read_dump_stats(&work)?;
            Ok((s.frozen_time_us as f64 / 1000.0, wall, work))
        }
        Kind::Direct => {
            let mut knobs = cfg.knobs.clone();
            knobs.work_dir = Some(work.clone());
            if log4 {
                knobs.log_level = 4;
            }
            let r = c.runc()?;
            let d = r.dump(client, dir, &knobs, None)?;
            let s = d.stats.ok_or("no stats-dump")?;
            Ok((s.frozen_time_us as f64 / 1000.0, d.outcome.wall_ms, work))
        }
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    }
}

/// What CRIU is doing after logging `line` (the time until the next line
/// is spent on it).
fn category(line: &str) -> &'static str {
    let body = line.split_once(") ").map_or(line, |(_, b)| b);
    let l = body.trim_start();
    if l.contains("scripts") || l.contains("Unlock network") {
        "network lock/unlock, notifications"
    } else if l.starts_with("mnt:") || l.contains("tmpfs") {
        "mounts (tmpfs tar)"
    } else if l.starts_with("net")
        || l.contains("iptables")
        || l.contains("nftables")
        || l.contains("conf/")
        || l.contains("stable_secret")
        || l.starts_with("Dump NET")
    {
        "netns (tools, sysctls, conntrack)"
    } else if l.starts_with("cg:") || l.starts_with("cg-prop") {
        "cgroups"
    } else if l.starts_with("page-xfer")
        || l.starts_with("PPB")
        || l.starts_with("Pagemap")
        || l.starts_with("pagemap")
        || l.starts_with("page-pipe")
        || l.contains("ack ")
        || l.contains("daemon")
        || l.contains("parasite")
        || l.contains("Parasite")
    {
        "memory + parasite"
    } else if l.starts_with("IPC")
        || l.starts_with("Dump IPC")
        || l.starts_with("Dump UTS")
        || l.contains("namespaces")
    {
        "ipc/uts ns (helper forks)"
    } else {
        "other"
    }
}

/// Splits the frozen window of a level-4 dump.log by category.
fn profile(log: &Path) -> Res<(f64, BTreeMap<&'static str, f64>)> {
    let text = std::fs::read_to_string(log)?;
    let mut out: BTreeMap<&'static str, f64> = BTreeMap::new();
    let mut prev: Option<f64> = None;
    let mut prev_line: Option<&str> = None;
    let mut start = None;
    let mut end = None;
    for l in text.lines() {
        let Some(t) = l
            .strip_prefix('(')
            .and_then(|r| r.split_once(')'))
            .and_then(|(t, _)| t.trim().parse::<f64>().ok())
        else {
            continue;
        };
        let t = t * 1000.0;
        if start.is_none()
            && (l.contains("freezing cgroup") || l.contains("SEIZE ") || l.contains("Seized task"))
        {
            start = Some(t);
            prev = Some(t);
            prev_line = Some(l);
            continue;
        }
        if start.is_some() && end.is_none() {
            if let (Some(p), Some(pl)) = (prev, prev_line) {
                *out.entry(category(pl)).or_default() += t - p;
            }
            prev = Some(t);
            prev_line = Some(l);
            if l.contains("Unfreezing tasks") {
                end = Some(t);
            }
        }
    }
    let total = match (start, end) {
        (Some(s), Some(e)) => e - s,
        _ => return Err(format!("{}: no freeze window found", log.display()).into()),
    };
    Ok((total, out))
}

fn main() -> Res<()> {
    let mut runs = 5usize;
    let mut sizes = vec![16u32, 256];
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        match args[i].as_str() {
            "--runs" => {
                runs = args.get(i + 1).ok_or("--runs N")?.parse()?;
                i += 1;
            }
            "--mib" => {
                sizes = args
                    .get(i + 1)
                    .ok_or("--mib 16,256")?
                    .split(',')
                    .map(str::parse)
                    .collect::<Result<_, _>>()?;
                i += 1;
            }
            other => return Err(format!("unknown argument {other}").into()),
        }
        i += 1;
    }
    std::fs::create_dir_all(BASE)?;
    std::fs::write(format!("{BASE}/skip.conf"), "network-lock skip\n")?;
    let client = CriuClient::new("/usr/local/sbin/criu");
    let cfgs = configs();
    println!(
        "CRIU frozen_time, leave-running, median of {runs} (wall time of the request in brackets), ms"
    );
    let mut profiles: Vec<(String, f64, BTreeMap<&'static str, f64>)> = Vec::new();
    for &mib in &sizes {
        // One container per (kind, netns) group: runc's annotation and the
        // netns path are fixed at start.
        let mut groups: BTreeMap<(Kind, bool), Running> = BTreeMap::new();
        for c in &cfgs {
            let key = (
                if c.kind == Kind::Direct {
                    Kind::Runc
                } else {
                    c.kind
                },
                c.netns_path,
            );
            if let std::collections::btree_map::Entry::Vacant(e) = groups.entry(key) {
                let tag = format!(
                    "{}{}",
                    if key.0 == Kind::RuncSkip { "s" } else { "p" },
                    if key.1 { "n" } else { "" }
                );
                e.insert(Running::start(&tag, mib, key.0 == Kind::RuncSkip, key.1)?);
            }
        }
        let group = |c: &Config| -> &Running {
            let key = (
                if c.kind == Kind::Direct {
                    Kind::Runc
                } else {
                    c.kind
                },
                c.netns_path,
            );
            &groups[&key]
        };
        let mut frozen: Vec<Vec<f64>> = vec![Vec::new(); cfgs.len()];
        let mut wall: Vec<Vec<f64>> = vec![Vec::new(); cfgs.len()];
        for round in 0..runs {
            for (k, c) in cfgs.iter().enumerate() {
                let dir = PathBuf::from(format!("{BASE}/{mib}-{k}-{round}"));
                let (f, w, work) = checkpoint(c, group(c), &client, &dir, false)
                    .map_err(|e| format!("{} ({mib} MiB): {e}", c.name))?;
                frozen[k].push(f);
                wall[k].push(w);
                let _ = std::fs::remove_dir_all(&dir);
                let _ = std::fs::remove_dir_all(&work);
            }
        }
        println!("\n{mib} MiB");
        for (k, c) in cfgs.iter().enumerate() {
            println!(
                "  {:<58} {:>7.1}  [{:>6.1}]",
                c.name,
                median(&mut frozen[k]),
                median(&mut wall[k])
            );
        }
        // One level-4 run per direct configuration (runc's are level 4
        // already) for the profile.
        for (k, c) in cfgs.iter().enumerate() {
            let dir = PathBuf::from(format!("{BASE}/{mib}-{k}-profile"));
            let (_, _, work) = checkpoint(c, group(c), &client, &dir, true)?;
            let (total, cats) = profile(&work.join("dump.log"))?;
            profiles.push((format!("{mib} MiB, {}", c.name), total, cats));
            let _ = std::fs::remove_dir_all(&dir);
            let _ = std::fs::remove_dir_all(&work);
        }
    }
    println!("\nWhere the freeze goes (one run at CRIU log level 4; ms between 'freezing' and 'Unfreezing' in dump.log)");
    for (name, total, cats) in profiles {
        let parts: Vec<String> = cats
            .iter()
            .filter(|(_, v)| **v >= 0.5)
            .map(|(k, v)| format!("{k} {v:.1}"))
            .collect();
        println!("  {name}: {total:.1} = {}", parts.join(", "));
    }
    Ok(())
}
