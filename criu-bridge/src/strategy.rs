//! Checkpoint strategy: pure policy, no I/O. Given what this machine can do
//! ([`Features`]) and what the container is ([`ContainerFacts`]), choose how
//! to checkpoint, and say why (the reason goes into the manifest).
//!
//! - [`Strategy::Dump`]: one dump, with only the options the container needs
//!   (no network lock when it has no TCP socket).
//! - [`Strategy::PreCopy`]: iterative pre-copy where the kernel tracks dirty
//!   memory: pre-dump rounds while the container runs, until the dirty set
//!   stops shrinking or a bound is hit ([`PreCopyLimits::next_round`]), then
//!   a final dump writing only what changed.
//! - [`Strategy::LazyRestore`]: for stop-and-copy of large containers where
//!   userfaultfd works: a plain dump, restored with lazy pages so the task
//!   runs while its memory is served on demand.
//!
//! A user may force one by name ([`StrategyKind`], parsed from `dump`,
//! `pre-copy`, `lazy`). A forced strategy this machine cannot run falls back
//! to a plain dump, and the reason says so.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::features::Features;
use crate::rpc::NetworkLockMethod;

const MIB: u64 = 1024 * 1024;

/// A strategy's name, as users write it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StrategyKind {
    /// `dump`.
    Dump,
    /// `pre-copy`.
    PreCopy,
    /// `lazy`.
    Lazy,
}

impl StrategyKind {
    /// The name users write and the manifest records.
    pub fn as_str(self) -> &'static str {
        match self {
            StrategyKind::Dump => "dump",
            StrategyKind::PreCopy => "pre-copy",
            StrategyKind::Lazy => "lazy",
        }
    }

    /// Parses a user override: `auto` or an empty string mean "no
    /// override"; otherwise as [`FromStr`].
    pub fn parse_override(s: &str) -> Result<Option<StrategyKind>, String> {
        match s.trim() {
            "" | "auto" => Ok(None),
            other => other.parse().map(Some),
        }
    }
}

impl fmt::Display for StrategyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for StrategyKind {
    type Err = String;

    /// `dump`, `pre-copy` (or `precopy`), `lazy` (or `lazy-pages`), any
    /// case; anything else is an error listing the valid names.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "dump" => Ok(StrategyKind::Dump),
            "pre-copy" | "precopy" => Ok(StrategyKind::PreCopy),
            "lazy" | "lazy-pages" => Ok(StrategyKind::Lazy),
            _ => Err(format!(
                "unknown checkpoint strategy {s:?}: expected one of dump, pre-copy, lazy (or auto)"
            )),
        }
    }
}

/// What is known about the container being checkpointed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ContainerFacts {
    /// Resident memory of the container's processes, bytes.
    pub rss_bytes: u64,
    /// Its network namespace has a TCP socket.
    pub has_tcp: bool,
    /// The checkpoint stops the container (stop-and-copy); otherwise it
    /// keeps running (leave-running).
    pub exit: bool,
    /// The user's forced strategy, if any.
    pub forced: Option<StrategyKind>,
}

/// When iterative pre-copy stops and does its final dump.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PreCopyLimits {
    /// At most this many pre-dump rounds.
    pub max_rounds: u32,
    /// Another round only if the last one wrote at least this fraction fewer
    /// pages than the one before (0.25 = shrank by 25 %).
    pub min_shrink_ratio: f64,
    /// A dirty set this small (pages) is cheap to dump frozen: stop.
    pub small_enough_pages: u64,
    /// Stop once the rounds together took this long, ms.
    pub max_total_ms: u64,
}

impl Default for PreCopyLimits {
    fn default() -> Self {
        PreCopyLimits {
            max_rounds: 6,
            min_shrink_ratio: 0.25,
            small_enough_pages: 256,
            max_total_ms: 10_000,
        }
    }
}

/// After a pre-dump round: go on, or do the final dump.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "next", rename_all = "kebab-case")]
pub enum RoundDecision {
    /// Run another pre-dump round.
    AnotherRound {
        /// Why.
        reason: String,
    },
    /// Do the final dump now.
    FinalDump {
        /// Why.
        reason: String,
    },
}

impl RoundDecision {
    /// True for [`RoundDecision::FinalDump`].
    pub fn is_final(&self) -> bool {
        matches!(self, RoundDecision::FinalDump { .. })
    }

    /// The reason.
    pub fn reason(&self) -> &str {
        match self {
            RoundDecision::AnotherRound { reason } | RoundDecision::FinalDump { reason } => reason,
        }
    }
}

impl PreCopyLimits {
    /// The convergence policy. `pages_written[i]` is what pre-dump round `i`
    /// wrote (CRIU's `stats-dump` `pages_written`), `elapsed` the time all
    /// rounds took. Stops when a bound is hit, when the dirty set is small
    /// enough, or when it no longer shrinks by at least
    /// [`min_shrink_ratio`](Self::min_shrink_ratio) (a growing set stops at
    /// once: more rounds would only chase the writer).
    pub fn next_round(&self, pages_written: &[u64], elapsed: Duration) -> RoundDecision {
        let n = pages_written.len();
        let Some(&last) = pages_written.last() else {
            return RoundDecision::AnotherRound {
                reason: "no pre-dump round yet".into(),
            };
        };
        if n as u64 >= u64::from(self.max_rounds) {
            return RoundDecision::FinalDump {
                reason: format!("round bound reached: {n} of {} rounds", self.max_rounds),
            };
        }
        let elapsed_ms = elapsed.as_millis();
        if elapsed_ms >= u128::from(self.max_total_ms) {
            return RoundDecision::FinalDump {
                reason: format!(
                    "time bound reached: {elapsed_ms} ms of {} ms",
                    self.max_total_ms
                ),
            };
        }
        if last <= self.small_enough_pages {
            return RoundDecision::FinalDump {
                reason: format!(
                    "dirty set down to {last} pages (<= {}): cheap to dump frozen",
                    self.small_enough_pages
                ),
            };
        }
        if n >= 2 {
            let prev = pages_written[n - 2];
            if last >= prev {
                return RoundDecision::FinalDump {
                    reason: format!(
                        "dirty set stopped shrinking: {prev} -> {last} pages in round {n}"
                    ),
                };
            }
            let shrink = 1.0 - last as f64 / prev as f64;
            if shrink < self.min_shrink_ratio {
                return RoundDecision::FinalDump {
                    reason: format!(
                        "dirty set shrank only {:.1}% ({prev} -> {last} pages) in round {n}, \
                         below the {:.0}% a round must gain",
                        shrink * 100.0,
                        self.min_shrink_ratio * 100.0
                    ),
                };
            }
            return RoundDecision::AnotherRound {
                reason: format!(
                    "dirty set shrank {:.1}% ({prev} -> {last} pages) in round {n}",
                    shrink * 100.0
                ),
            };
        }
        RoundDecision::AnotherRound {
            reason: format!("first round wrote {last} pages; see whether the dirty set shrinks"),
        }
    }
}

/// A chosen strategy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "name", rename_all = "kebab-case")]
pub enum Strategy {
    /// One dump.
    Dump,
    /// Iterative pre-copy, then a final dump.
    PreCopy(PreCopyLimits),
    /// A plain dump, restored with lazy pages (userfaultfd).
    LazyRestore,
}

impl Strategy {
    /// The strategy's name ([`StrategyKind::as_str`]).
    pub fn kind(&self) -> StrategyKind {
        match self {
            Strategy::Dump => StrategyKind::Dump,
            Strategy::PreCopy(_) => StrategyKind::PreCopy,
            Strategy::LazyRestore => StrategyKind::Lazy,
        }
    }
}

/// Thresholds of the automatic choice.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Policy {
    /// Pre-copy only pays when memory dominates the freeze: from this RSS.
    pub precopy_min_rss_bytes: u64,
    /// Lazy restore from this RSS (stop-and-copy only).
    pub lazy_min_rss_bytes: u64,
    /// Limits for pre-copy rounds.
    pub precopy: PreCopyLimits,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            precopy_min_rss_bytes: 64 * MIB,
            lazy_min_rss_bytes: 128 * MIB,
            precopy: PreCopyLimits::default(),
        }
    }
}

/// The decision: strategy, network lock, and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    /// The strategy.
    pub strategy: Strategy,
    /// Network lock for the (final) dump: `Skip` when there is nothing to
    /// lock.
    #[serde(with = "lock_serde")]
    pub network_lock: NetworkLockMethod,
    /// Human-readable reasons, for the manifest.
    pub reason: String,
}

impl Decision {
    /// The strategy's name for the manifest.
    pub fn name(&self) -> &'static str {
        self.strategy.kind().as_str()
    }
}

mod lock_serde {
    use super::NetworkLockMethod;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(m: &NetworkLockMethod, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(match m {
            NetworkLockMethod::Iptables => "iptables",
            NetworkLockMethod::Nftables => "nftables",
            NetworkLockMethod::Skip => "skip",
        })
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<NetworkLockMethod, D::Error> {
        match String::deserialize(d)?.as_str() {
            "iptables" => Ok(NetworkLockMethod::Iptables),
            "nftables" => Ok(NetworkLockMethod::Nftables),
            "skip" => Ok(NetworkLockMethod::Skip),
            other => Err(serde::de::Error::custom(format!(
                "unknown network lock {other:?}"
            ))),
        }
    }
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / MIB as f64)
}

/// Chooses the checkpoint strategy. Pure: same inputs, same decision.
pub fn choose(features: &Features, facts: &ContainerFacts, policy: &Policy) -> Decision {
    let (network_lock, lock_reason) = if !facts.has_tcp {
        (
            NetworkLockMethod::Skip,
            "no network lock: the container has no TCP socket".to_string(),
        )
    } else {
        match features.best_network_lock() {
            Some(m) => (
                m,
                format!(
                    "network lock {}: the container has TCP sockets",
                    match m {
                        NetworkLockMethod::Nftables => "nftables",
                        NetworkLockMethod::Iptables => "iptables",
                        NetworkLockMethod::Skip => "skip",
                    }
                ),
            ),
            None => (
                NetworkLockMethod::Skip,
                "no network lock although the container has TCP sockets: neither \
                 nftables (CRIU) nor iptables-restore is available"
                    .to_string(),
            ),
        }
    };
    let rss = mib(facts.rss_bytes);
    let mode = if facts.exit {
        "stop-and-copy"
    } else {
        "leave-running"
    };
    let no_dirty = || {
        format!(
            "no dirty memory tracking here ({})",
            features.soft_dirty.detail
        )
    };
    let no_lazy = || {
        if !features.userfaultfd.available {
            format!("no userfaultfd here ({})", features.userfaultfd.detail)
        } else {
            "CRIU reports lazy pages unavailable".to_string()
        }
    };

    let (strategy, why) = match facts.forced {
        Some(StrategyKind::Dump) => (Strategy::Dump, "dump forced by the user".to_string()),
        Some(StrategyKind::PreCopy) if features.dirty_tracking() => (
            Strategy::PreCopy(policy.precopy),
            "pre-copy forced by the user".to_string(),
        ),
        Some(StrategyKind::PreCopy) => (
            Strategy::Dump,
            format!(
                "pre-copy was forced but {}; falling back to a plain dump",
                no_dirty()
            ),
        ),
        Some(StrategyKind::Lazy) if features.lazy_pages() => (
            Strategy::LazyRestore,
            "lazy restore forced by the user".to_string(),
        ),
        Some(StrategyKind::Lazy) => (
            Strategy::Dump,
            format!(
                "lazy restore was forced but {}; falling back to a plain dump",
                no_lazy()
            ),
        ),
        None => auto(features, facts, policy, &rss, mode, &no_dirty, &no_lazy),
    };
    Decision {
        strategy,
        network_lock,
        reason: format!("{why}; {lock_reason}"),
    }
}

fn auto(
    features: &Features,
    facts: &ContainerFacts,
    policy: &Policy,
    rss: &str,
    mode: &str,
    no_dirty: &dyn Fn() -> String,
    no_lazy: &dyn Fn() -> String,
) -> (Strategy, String) {
    let big_for_lazy = facts.rss_bytes >= policy.lazy_min_rss_bytes;
    let big_for_precopy = facts.rss_bytes >= policy.precopy_min_rss_bytes;
    if facts.exit && big_for_lazy && features.lazy_pages() {
        return (
            Strategy::LazyRestore,
            format!(
                "{mode} of {rss} (>= {}): lazy restore serves memory on demand, \
                 so restore time does not grow with memory",
                mib(policy.lazy_min_rss_bytes)
            ),
        );
    }
    if big_for_precopy && features.dirty_tracking() {
        return (
            Strategy::PreCopy(policy.precopy),
            format!(
                "{mode} of {rss} (>= {}) with dirty memory tracking: pre-copy rounds \
                 while it runs, then a short final dump",
                mib(policy.precopy_min_rss_bytes)
            ),
        );
    }
    let mut why = vec![format!("plain {mode} dump of {rss}")];
    if big_for_precopy {
        why.push(format!("pre-copy impossible: {}", no_dirty()));
    } else {
        why.push(format!(
            "below the {} where pre-copy pays",
            mib(policy.precopy_min_rss_bytes)
        ));
    }
    if facts.exit {
        if big_for_lazy {
            why.push(format!("lazy restore impossible: {}", no_lazy()));
        } else {
            why.push(format!(
                "below the {} where lazy restore pays",
                mib(policy.lazy_min_rss_bytes)
            ));
        }
    }
    (Strategy::Dump, why.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::features::{NetworkLocks, Probe};
    use crate::rpc::CriuFeatures;

    /// This machine: no soft-dirty, userfaultfd, both locks.
    fn here() -> Features {
        Features {
            criu_version: Some("4.2.1".into()),
            criu_features: Some(CriuFeatures {
                mem_track: false,
                lazy_pages: true,
                pidfd_store: true,
            }),
            soft_dirty: Probe {
                available: false,
                detail: "no soft-dirty bit".into(),
            },
            userfaultfd: Probe {
                available: true,
                detail: "ok".into(),
            },
            network_locks: NetworkLocks {
                iptables: true,
                nftables: true,
            },
            ..Default::default()
        }
    }

    fn everything() -> Features {
        let mut f = here();
        f.soft_dirty.available = true;
        if let Some(c) = f.criu_features.as_mut() {
            c.mem_track = true;
        }
        f
    }

    fn facts(rss_mib: u64, tcp: bool, exit: bool) -> ContainerFacts {
        ContainerFacts {
            rss_bytes: rss_mib * MIB,
            has_tcp: tcp,
            exit,
            forced: None,
        }
    }

    fn decisions(seq: &[u64], limits: &PreCopyLimits) -> Vec<RoundDecision> {
        (0..=seq.len())
            .map(|i| limits.next_round(&seq[..i], Duration::from_millis(100)))
            .collect()
    }

    #[test]
    fn converging_sequence_stops_after_fourth_round() {
        let l = PreCopyLimits::default();
        let d = decisions(&[65536, 9000, 2100, 1900], &l);
        assert!(!d[0].is_final());
        assert!(!d[1].is_final(), "{:?}", d[1]);
        assert!(!d[2].is_final(), "{:?}", d[2]);
        assert!(!d[3].is_final(), "{:?}", d[3]);
        assert!(d[4].is_final());
        assert!(
            d[4].reason().contains("shrank only 9.5%"),
            "{}",
            d[4].reason()
        );
    }

    #[test]
    fn growing_sequence_stops_at_once() {
        let l = PreCopyLimits::default();
        let d = decisions(&[4000, 4500, 5000], &l);
        assert!(!d[1].is_final(), "one round says nothing about the trend");
        assert!(d[2].is_final());
        assert!(
            d[2].reason().contains("stopped shrinking"),
            "{}",
            d[2].reason()
        );
        // a flat set stops too
        assert!(l
            .next_round(&[3000, 3000], Duration::ZERO)
            .reason()
            .contains("stopped shrinking"));
    }

    #[test]
    fn bounds_stop_the_rounds() {
        let l = PreCopyLimits {
            max_rounds: 3,
            ..Default::default()
        };
        // halving forever would go on without the bound
        let d = decisions(&[100_000, 50_000, 25_000, 12_500], &l);
        assert!(!d[2].is_final());
        assert!(d[3].is_final());
        assert!(d[3].reason().contains("round bound"), "{}", d[3].reason());
        let t = PreCopyLimits::default().next_round(&[100_000], Duration::from_secs(11));
        assert!(t.is_final() && t.reason().contains("time bound"), "{t:?}");
        let s = PreCopyLimits::default().next_round(&[100_000, 200], Duration::ZERO);
        assert!(s.is_final() && s.reason().contains("cheap"), "{s:?}");
    }

    #[test]
    fn recorded_sequences() {
        // (pages per round, rounds until the final dump)
        let cases: &[(&[u64], usize)] = &[
            (&[65536, 9000, 2100, 1900], 4),
            (&[262144, 30000, 8000, 7900], 4),
            (&[262144, 30000, 8000, 5000, 4000], 5),
            (&[1000, 1200], 2),
            (&[70000, 300, 100], 3), // 300 pages is not yet "small enough", 100 is
        ];
        let l = PreCopyLimits::default();
        for (seq, rounds) in cases {
            let first_final = (1..=seq.len())
                .find(|&i| l.next_round(&seq[..i], Duration::ZERO).is_final())
                .unwrap_or(usize::MAX);
            assert_eq!(first_final, *rounds, "{seq:?}");
        }
    }

    #[test]
    fn small_leave_running_without_tcp_is_a_plain_dump_without_lock() {
        let d = choose(&here(), &facts(16, false, false), &Policy::default());
        assert_eq!(d.strategy, Strategy::Dump);
        assert_eq!(d.network_lock, NetworkLockMethod::Skip);
        assert!(d.reason.contains("no TCP socket"), "{}", d.reason);
        assert_eq!(d.name(), "dump");
    }

    #[test]
    fn tcp_gets_the_best_lock() {
        let d = choose(&here(), &facts(16, true, false), &Policy::default());
        assert_eq!(d.network_lock, NetworkLockMethod::Nftables);
        let mut f = here();
        f.network_locks.nftables = false;
        let d = choose(&f, &facts(16, true, false), &Policy::default());
        assert_eq!(d.network_lock, NetworkLockMethod::Iptables);
        f.network_locks.iptables = false;
        let d = choose(&f, &facts(16, true, false), &Policy::default());
        assert_eq!(d.network_lock, NetworkLockMethod::Skip);
        assert!(d.reason.contains("neither"), "{}", d.reason);
    }

    #[test]
    fn large_leave_running_here_falls_back_to_dump() {
        let d = choose(&here(), &facts(256, false, false), &Policy::default());
        assert_eq!(d.strategy, Strategy::Dump);
        assert!(d.reason.contains("pre-copy impossible"), "{}", d.reason);
        assert!(d.reason.contains("no soft-dirty bit"), "{}", d.reason);
    }

    #[test]
    fn large_leave_running_with_tracking_pre_copies() {
        let d = choose(&everything(), &facts(256, false, false), &Policy::default());
        assert_eq!(d.strategy, Strategy::PreCopy(PreCopyLimits::default()));
        assert_eq!(d.name(), "pre-copy");
    }

    #[test]
    fn large_stop_and_copy_goes_lazy() {
        let d = choose(&here(), &facts(256, false, true), &Policy::default());
        assert_eq!(d.strategy, Strategy::LazyRestore);
        assert_eq!(d.name(), "lazy");
        let small = choose(&here(), &facts(16, false, true), &Policy::default());
        assert_eq!(small.strategy, Strategy::Dump);
        assert!(
            small.reason.contains("lazy restore pays"),
            "{}",
            small.reason
        );
        let mut f = here();
        f.userfaultfd.available = false;
        let d = choose(&f, &facts(256, false, true), &Policy::default());
        assert_eq!(d.strategy, Strategy::Dump);
        assert!(d.reason.contains("no userfaultfd"), "{}", d.reason);
        // with tracking but without uffd a stop-and-copy pre-copies
        let mut f = everything();
        f.userfaultfd.available = false;
        let d = choose(&f, &facts(256, false, true), &Policy::default());
        assert_eq!(d.strategy.kind(), StrategyKind::PreCopy);
    }

    #[test]
    fn forced_strategies() {
        let mut x = facts(16, false, false);
        x.forced = Some(StrategyKind::PreCopy);
        let d = choose(&here(), &x, &Policy::default());
        assert_eq!(d.strategy, Strategy::Dump);
        assert!(d.reason.contains("pre-copy was forced but"), "{}", d.reason);
        let d = choose(&everything(), &x, &Policy::default());
        assert_eq!(d.strategy.kind(), StrategyKind::PreCopy);
        x.forced = Some(StrategyKind::Lazy);
        assert_eq!(
            choose(&here(), &x, &Policy::default()).strategy,
            Strategy::LazyRestore
        );
        x.forced = Some(StrategyKind::Dump);
        let mut big = x;
        big.rss_bytes = 1 << 40;
        big.exit = true;
        let d = choose(&here(), &big, &Policy::default());
        assert_eq!(d.strategy, Strategy::Dump);
        assert!(d.reason.starts_with("dump forced"), "{}", d.reason);
    }

    #[test]
    fn parse_names() {
        assert_eq!("dump".parse(), Ok(StrategyKind::Dump));
        assert_eq!("Pre-Copy".parse(), Ok(StrategyKind::PreCopy));
        assert_eq!("precopy".parse(), Ok(StrategyKind::PreCopy));
        assert_eq!(" lazy ".parse(), Ok(StrategyKind::Lazy));
        let e = "post-copy".parse::<StrategyKind>().unwrap_err();
        assert!(
            e.contains("\"post-copy\"") && e.contains("dump, pre-copy, lazy"),
            "{e}"
        );
        assert_eq!(StrategyKind::parse_override("auto"), Ok(None));
        assert_eq!(StrategyKind::parse_override(""), Ok(None));
        assert_eq!(
            StrategyKind::parse_override("lazy"),
            Ok(Some(StrategyKind::Lazy))
        );
        assert!(StrategyKind::parse_override("fast").is_err());
        for k in [
            StrategyKind::Dump,
            StrategyKind::PreCopy,
            StrategyKind::Lazy,
        ] {
            assert_eq!(k.as_str().parse(), Ok(k));
        }
    }

    #[test]
    fn decision_serialises_for_the_manifest() {
        let d = choose(&everything(), &facts(256, true, false), &Policy::default());
        let j = serde_json::to_value(&d).unwrap();
        assert_eq!(j["strategy"]["name"], "pre-copy");
        assert_eq!(j["network_lock"], "nftables");
        let back: Decision = serde_json::from_value(j).unwrap();
        assert_eq!(back, d);
    }
}
