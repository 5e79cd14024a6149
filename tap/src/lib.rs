//! ms2m's AMQP 0-9-1 tap.
//!
//! A transparent per-container proxy: the shim binds listeners inside the
//! container's network namespace ([`Tap::listen_in_netns`]) and runs a
//! [`Tap`] that forwards every connection to the real broker. The tap keeps a
//! [`ledger`] of consumers, deliveries and their acks, can hold deliveries
//! ([`Tap::quiesce`]) so the container's state stops changing, captures the
//! broker position as a [`Cut`] while the container is frozen
//! ([`Tap::capture_cut`]), and, started again with that cut after a restore,
//! rewrites the app's stream consumers to resume exactly at the cut. For a
//! migration after a leave-running checkpoint it also fences the source
//! ([`Tap::fence`]: how many publishes it made after the cut) and has the
//! restored tap suppress that many of the restored app's first publishes
//! ([`Tap::start_with`], [`Resume`]; see [`fence`]).
//!
//! Data flow per connection: client socket → [`codec::FrameReader`] → only
//! method frames (and the content header following a delivery) are decoded →
//! [`ledger::Ledger`] → bytes forwarded unchanged (except a resumed
//! basic.consume and a clamped connection.tune frame_max) → upstream; and
//! the same in the other direction.
//!
//! # Checkpoint sequence (what the shim does)
//!
//! ```text
//! let q = tap.quiesce(cfg.quiesce_timeout).await;   // before freezing
//! /* CRIU dump; in the frozen-window hook: */
//! let cut = tap.capture_cut(&q);                     // sync, cheap
//! manifest.extensions.insert("broker", serde_json::to_value(&cut)?);
//! /* after the dump: */
//! tap.release().await;          // leave-running
//! tap.close_for_exit().await;   // exit checkpoint (or on container exit)
//! ```
//! On any checkpoint failure call [`Tap::release`]: holding must never
//! outlive the checkpoint. On restore: make listeners in the *new* network
//! namespace before the app runs and `Tap::start(config, listeners,
//! Some(cut))`.
//!
//! # Migration after a leave-running checkpoint (the MS2M fence)
//!
//! ```text
//! /* source, leave-running checkpoint as above: capture_cut restarts the
//!    publish count (Tap::publishes_since_cut); the source goes on */
//! /* later, to stop the source for good: */
//! let fence = tap.fence(cfg.quiesce_timeout).await;  // quiesce + count; stays held
//! /* or: let q = tap.quiesce(..).await; ...; let fence = tap.fence_now(&q); */
//! /* kill the source container, then: */
//! tap.close_for_exit().await;
//! /* ship the fence with the checkpoint; on the target: */
//! let resume = Resume::after_fence(cut, &fence)?;    // checks fence ↔ cut
//! Tap::start_with(config, listeners, resume).await?;
//! ```
//! The restored app re-processes the messages from the cut on; the restored
//! tap drops its first `fence.publishes_after_cut` basic.publish commands
//! (over all connections, in arrival order), acking confirm-mode ones to the
//! app itself and shifting the broker's confirm tags after them (see
//! [`fence`] for the rule). Downstream then sees each result once.
//!
//! # Guarantees and their limits
//!
//! - Quiesce holds deliveries (basic.deliver and basic.get-ok, and whatever
//!   follows a held delivery on its channel, so per-channel order is kept)
//!   and waits until every delivery already handed to the app is settled.
//!   "Exactly once" across a checkpoint rests on the app acking *after*
//!   processing and on the quiesce completing; when it times out the cut
//!   lists the unsettled deliveries as `in_doubt`.
//! - A stream's `next_offset` is the highest *acked* offset + 1 over all of
//!   the container's consumers of that queue (nacks/rejects do not advance
//!   it). If nothing was ever acked, the cut records the consumer's own
//!   offset spec instead, which for `"next"` cannot name a position.
//! - Resume: the first basic.consume on each stream queue of the cut is
//!   rewritten to the cut, whatever offset the app asked for. Later consumes
//!   on that queue (the app reconnecting) that ask for `"next"`/`"last"` or
//!   give no offset are rewritten to the tap's own progress (highest acked +
//!   1 since the restore, else the cut), so a reconnect does not skip what
//!   arrived meanwhile; explicit positions (`"first"`, a number, a
//!   timestamp) on later consumes are left as the app asked. RabbitMQ starts
//!   a stream consumer at the exact offset requested (verified by the
//!   resume test), so nothing before the cut is re-delivered. Classic queues
//!   need no rewrite: the broker redelivers what was not acked when the old
//!   connection closed.
//! - Fence and suppression rest on the app being deterministic: fed the same
//!   input sequence from the cut on, the restored instance makes the same
//!   publishes in the same order (over all its connections) as the source
//!   did, and its first `P` publishes are exactly the source's `P` publishes
//!   after the cut. Nothing checks the contents: a restored instance that
//!   publishes in a different order, publishes a different number of
//!   messages per input, publishes on its own (timers, start-up messages)
//!   or retries publishes has the *wrong* publishes suppressed (lost
//!   downstream) or duplicates left. A publish counts when the tap reads its
//!   method frame: the count is exact when the app publishes a result
//!   before acking its input on the same connection and the quiesce before
//!   the cut and before the fence completed; publishes read after the fence
//!   are forwarded and not counted (stop the source promptly). A checkpoint
//!   of a restored container taken while [`Tap::suppress_remaining`] is not
//!   0 must add it to the next restore's suppression (the cut does not carry
//!   it). Publishes inside transactions (tx.select) are dropped like any
//!   other; the app's tx.commit then commits fewer messages.
//! - Malformed or oversized frames from either side close that connection
//!   pair with one warning; other connections are unaffected. Frame size is
//!   capped by [`TapConfig::max_frame`] before tuning and by the negotiated
//!   frame_max after; the broker's connection.tune frame_max is clamped to
//!   the cap.

#![deny(missing_docs)]

pub mod codec;
mod control;
pub mod cut;
pub mod fence;
pub mod ledger;
pub mod link;
mod listener;
pub mod migration;
pub mod mirror;
mod proxy;
mod state;
pub mod ticket;

use std::fmt;
use std::time::Duration;

pub use control::{Quiesce, Tap, TapStats};
pub use cut::{Cut, InDoubt, OffsetSpec, QueueCut, QueueKind, QuiesceReport};
pub use fence::{Fence, Resume, FENCE_SCHEMA};
pub use migration::SourceLink;
pub use ticket::{Shadow, Ticket};

/// Default absolute cap on frame size (1 MiB; RabbitMQ negotiates 128 KiB).
pub const DEFAULT_MAX_FRAME: u32 = 1024 * 1024;
/// Default AMQP port.
pub const DEFAULT_PORT: u16 = 5672;

/// Errors of the tap's control API.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// A bad upstream URL or configuration value.
    #[error("tap configuration: {0}")]
    Config(String),
    /// An I/O error, with what was being done.
    #[error("{what}: {source}")]
    Io {
        /// What the tap was doing.
        what: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

impl TapError {
    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        TapError::Io {
            what: what.into(),
            source,
        }
    }
}

/// The real broker the tap forwards to. Credentials in the URL are dropped:
/// the app's own connection negotiation and authentication pass through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    /// Host name or IP address.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// Virtual host named in the URL (informational: the app chooses its
    /// vhost in connection.open).
    pub vhost: String,
}

impl Upstream {
    /// Parse an `amqp://[user[:pass]@]host[:port][/vhost]` URL.
    pub fn parse(url: &str) -> Result<Upstream, TapError> {
        let rest = url
            .strip_prefix("amqp://")
            .ok_or_else(|| TapError::Config("upstream URL must start with amqp://".into()))?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, ""),
        };
        let hostport = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
        let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
            let (h, after) = v6
                .split_once(']')
                .ok_or_else(|| TapError::Config("upstream URL: unterminated [IPv6]".into()))?;
            (h.to_string(), after.strip_prefix(':'))
        } else {
            match hostport.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), Some(p)),
                None => (hostport.to_string(), None),
            }
        };
        if host.is_empty() {
            return Err(TapError::Config("upstream URL has no host".into()));
        }
        let port = match port {
            Some(p) => p
                .parse::<u16>()
                .map_err(|_| TapError::Config("upstream URL: bad port".to_string()))?,
            None => DEFAULT_PORT,
        };
        let vhost = if path.is_empty() {
            "/".to_string()
        } else {
            percent_decode(path)
        };
        Ok(Upstream { host, port, vhost })
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = |c: u8| (c as char).to_digit(16);
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl fmt::Display for Upstream {
    /// `amqp://host:port/vhost` (vhost percent-encoded), never credentials.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        let mut vhost = String::new();
        for c in self.vhost.bytes() {
            if c.is_ascii_alphanumeric() || b"-._~".contains(&c) {
                vhost.push(c as char);
            } else {
                vhost.push_str(&format!("%{c:02x}"));
            }
        }
        write!(f, "amqp://{host}:{}/{vhost}", self.port)
    }
}

/// Configuration of a tap.
#[derive(Debug, Clone)]
pub struct TapConfig {
    /// The real broker.
    pub upstream: Upstream,
    /// Port the listeners use inside the container (informational for
    /// [`Tap::start`], which takes bound listeners).
    pub listen_port: u16,
    /// Absolute cap on frame size, both directions; connection.tune's
    /// frame_max is clamped to it.
    pub max_frame: u32,
    /// Default quiesce bound.
    pub quiesce_timeout: Duration,
    /// Bound on connecting to the upstream broker.
    pub connect_timeout: Duration,
    /// The tap's own connection to the broker (live migration signals),
    /// with the upstream URL's credentials (never printed).
    pub control: Option<link::LinkConfig>,
}

impl TapConfig {
    /// Defaults (port 5672, 1 MiB frames, 2 s quiesce, 5 s connect) for an upstream URL.
    pub fn new(upstream_url: &str) -> Result<TapConfig, TapError> {
        Ok(TapConfig {
            upstream: Upstream::parse(upstream_url)?,
            control: Some(link::LinkConfig::from_url(
                upstream_url,
                Duration::from_secs(5),
            )?),
            listen_port: DEFAULT_PORT,
            max_frame: DEFAULT_MAX_FRAME,
            quiesce_timeout: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(5),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_url() {
        let u = Upstream::parse("amqp://guest:secret@10.0.0.1:5673/%2f").unwrap();
        assert_eq!(
            u,
            Upstream {
                host: "10.0.0.1".into(),
                port: 5673,
                vhost: "/".into()
            }
        );
        assert_eq!(u.to_string(), "amqp://10.0.0.1:5673/%2f");
        assert!(!u.to_string().contains("secret"));
        let u = Upstream::parse("amqp://[::1]").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.vhost.as_str()),
            ("::1", 5672, "/")
        );
        let u = Upstream::parse("amqp://broker/prod").unwrap();
        assert_eq!(u.to_string(), "amqp://broker:5672/prod");
        assert!(Upstream::parse("http://x").is_err());
        assert!(Upstream::parse("amqp://h:99999").is_err());
    }
}
