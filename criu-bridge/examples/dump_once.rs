//! Dumps one runc container directly, once, and prints CRIU's frozen time:
//! `dump_once RUNC_ROOT ID IMAGES_DIR [knob ...]` where a knob is one of
//! `exit`, `ptrace`, `cg-ignore`, `lock-iptables`,
//! `lock-skip`, `log4`, `full-netns`, `no-config`.

use std::path::Path;

use criu_bridge::container::{
    Cgroups, ConfigFile, DumpKnobs, Freeze, LockMethod, NetworkLock, RuncContainer,
};
use criu_bridge::rpc::CriuClient;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 3 {
        return Err("usage: dump_once RUNC_ROOT ID IMAGES_DIR [knob ...]".into());
    }
    let c = RuncContainer::load(Path::new(&args[0]), &args[1])?;
    let mut k = DumpKnobs::default();
    for a in &args[3..] {
        match a.as_str() {
            "exit" => k.leave_running = false,
            "ptrace" => k.freeze = Freeze::Ptrace,
            "cg-ignore" => k.cgroups = Cgroups::Ignore,
            "lock-iptables" => k.network_lock = NetworkLock::Always(LockMethod::Iptables),
            "lock-skip" => k.network_lock = NetworkLock::Always(LockMethod::Skip),
            "log4" => k.log_level = 4,
            "full-netns" => k.empty_netns = false,
            "no-config" => k.config_file = ConfigFile::None,
            other => return Err(format!("unknown knob {other}").into()),
        }
    }
    let client = CriuClient::new(
        std::env::var("MS2M_CRIU").unwrap_or_else(|_| "/usr/local/sbin/criu".into()),
    );
    let d = c.dump(&client, Path::new(&args[2]), &k, None)?;
    println!(
        "frozen_ms={:.1} wall_ms={:.1} prepare_ms={:.2} lock={}",
        d.stats
            .as_ref()
            .map_or(f64::NAN, |s| s.frozen_time_us as f64 / 1000.0),
        d.outcome.wall_ms,
        d.prepare_ms,
        d.network_lock.as_str()
    );
    Ok(())
}
