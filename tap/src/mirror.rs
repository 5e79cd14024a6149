//! The classic-queue mirror: how a consumer of a classic queue moves live.
//!
//! A classic queue forgets a message once it is acked, so a target restored
//! from the source's leave-running checkpoint could not re-read what the
//! source processed after the cut. The source's tap therefore *mirrors*
//! every classic delivery its app settles after the cut into a RabbitMQ
//! stream of the migration's own (`ms2m.mirror.<migration>.<queue>`), and
//! the target replays that stream before it takes over the queue itself:
//!
//! ```text
//! source tap                                   target tap (shadow)
//! Check (before the checkpoint): arm; from now
//!   on keep the content of classic deliveries
//! cut (frozen window): mirror from here on
//! app acks a classic delivery: publish its
//!   content to the mirror, wait for the
//!   broker's confirm, then forward the ack     app's basic.consume(Q) is rewritten
//!   (so the mirror holds exactly what the        to consume(mirror, x-stream-offset 0);
//!   broker forgot, in settle order)              replay, gated like a stream
//! fence: hold, wait for acks; cancel the app's
//!   consumers of Q and requeue the deliveries
//!   held (they never reached the app); the
//!   Fence carries the mirror's length as Q's
//!   position                                   caught up to it: cancel the mirror
//!                                                consumer, consume Q with the app's
//!                                                consumer tag (nowait), go live
//! ```
//!
//! A message the app nacks or rejects is not mirrored: requeued, it goes
//! back to the queue (and may come back to the source, which then mirrors
//! it when it acks it); dropped or dead-lettered, the target never sees it.
//! During the replay the target's app sees the mirror's delivery fields
//! (exchange `""`, routing key = the mirror's name, not redelivered) and an
//! `x-stream-offset` header; the message properties and body are the
//! original's. A no-ack consumer of a classic queue cannot be mirrored (the
//! broker forgets its messages on delivery): the check refuses it.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use amq_protocol::protocol::basic::AMQPProperties;
use amq_protocol::types::{AMQPValue, FieldTable};
use tracing::{info, warn};

use crate::link::LinkConfig;
use crate::TapError;

/// Prefix of every mirror stream's name.
pub const MIRROR_PREFIX: &str = "ms2m.mirror.";
/// How long the broker keeps a mirror stream's messages at most (a
/// migration that never finishes does not fill the broker).
pub const MIRROR_MAX_AGE: &str = "1h";
/// Header of the end marker a restore appends to a mirror stream.
pub const END_MARKER_HEADER: &str = "x-ms2m-mirror-end";

/// Whether a message is a mirror's end marker.
pub fn is_end_marker(p: &AMQPProperties) -> bool {
    p.headers()
        .as_ref()
        .is_some_and(|h| h.inner().contains_key(END_MARKER_HEADER))
}

/// The mirror stream of classic queue `queue` in migration `migration_id`.
/// Queue names make it longer than AMQP's 255-byte limit are shortened to
/// a digest.
pub fn mirror_stream_name(migration_id: &str, queue: &str) -> String {
    let full = format!("{MIRROR_PREFIX}{migration_id}.{queue}");
    if full.len() <= 255 {
        return full;
    }
    // FNV-1a: stable across builds and hosts (both sides compute it).
    let mut h: u64 = 0xcbf29ce484222325;
    for b in queue.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    format!("{MIRROR_PREFIX}{migration_id}.{h:016x}")
}

/// Where a source's classic-queue mirror stands ([`crate::Tap::mirror_status`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MirrorStatus {
    /// The migration it is armed for (`None`: not armed).
    pub migration_id: Option<String>,
    /// The cut it copies from (`None`: armed, no cut yet).
    pub cut_taken_at_unix_ms: Option<u64>,
    /// Why it is incomplete (a copy failed): the migration must not cut over.
    pub broken: Option<String>,
    /// Mirror stream per classic queue.
    pub streams: BTreeMap<String, String>,
    /// Armed and waiting for its cut (not copying yet).
    pub pending: bool,
    /// Armed by a live migration (its `check`), not by a checkpoint.
    pub for_migration: bool,
}

/// The content of a classic delivery kept until the app settles it.
#[derive(Debug, Clone)]
pub(crate) struct Retained {
    /// The queue it came from.
    pub queue: String,
    /// Its properties, unchanged.
    pub properties: AMQPProperties,
    /// Its body.
    pub body: Vec<u8>,
}

/// The source's mirror: armed by [`crate::Tap::prepare_mirror`], publishing
/// from the next cut on.
#[derive(Debug, Default)]
pub(crate) struct MirrorState {
    /// Keep the content of classic deliveries (armed).
    pub capture: AtomicBool,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    migration_id: Option<String>,
    /// Classic queue → its mirror stream.
    streams: BTreeMap<String, String>,
    publisher: Option<Arc<Publisher>>,
    /// Armed for the next cut (not publishing yet).
    pending: bool,
    /// Armed by a live migration's check (not by a checkpoint).
    for_migration: bool,
    /// Publishing (from the cut on), and which cut.
    active_cut_ms: Option<u64>,
    /// A migration's fence handed the queues over: the target owns the
    /// mirror now.
    handed_over: bool,
    /// Kept content by (connection, channel, delivery tag).
    retained: HashMap<(u64, u16, u64), Retained>,
    /// Confirmed mirror publishes per queue since the cut.
    counts: BTreeMap<String, u64>,
    /// A mirror publish failed: the mirror is incomplete.
    broken: Option<String>,
}

/// What [`MirrorState::settle`] hands back to publish before an ack.
pub(crate) struct ToMirror {
    pub publisher: Arc<Publisher>,
    pub entries: Vec<(String, Retained)>,
}

impl MirrorState {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Arms the mirror `mirror_id` for `streams` (classic queue → mirror
    /// stream) with an open publisher, for the next cut. A previous mirror
    /// is closed and its streams deleted (a restore of its checkpoint could
    /// no longer be exact: it lacks what is mirrored from the new cut on).
    pub fn arm(
        &self,
        mirror_id: &str,
        streams: BTreeMap<String, String>,
        p: Publisher,
        for_migration: bool,
    ) {
        let old = {
            let mut g = self.lock();
            let old = g.publisher.take();
            let old_streams: Vec<String> = g
                .streams
                .values()
                .filter(|s| !streams.values().any(|n| n == *s))
                .cloned()
                .collect();
            *g = Inner {
                migration_id: Some(mirror_id.to_string()),
                streams,
                publisher: Some(Arc::new(p)),
                pending: true,
                for_migration,
                ..Inner::default()
            };
            old.map(|o| (o, old_streams))
        };
        self.capture.store(true, Ordering::SeqCst);
        if let Some((old, streams)) = old {
            tokio::spawn(async move {
                old.delete(&streams).await;
                old.close().await
            });
        }
    }

    /// The cut was captured (frozen window): a mirror armed for it
    /// publishes from now on, counting from zero; returns its streams for
    /// the cut. A mirror of an earlier cut goes on as it was (an exit
    /// checkpoint's cut does not name it).
    pub fn cut_taken(&self, cut_ms: u64) -> BTreeMap<String, String> {
        let mut g = self.lock();
        if !g.pending || g.publisher.is_none() {
            return BTreeMap::new();
        }
        g.pending = false;
        g.active_cut_ms = Some(cut_ms);
        g.counts = g.streams.keys().map(|q| (q.clone(), 0)).collect();
        g.broken = None;
        g.streams.clone()
    }

    /// A migration's fence handed the queues over to its target.
    pub fn handed_over(&self) {
        self.lock().handed_over = true;
    }

    /// The container exited: a mirror handed over to a migration's target
    /// (which has replayed it) is deleted; any other is kept for a restore
    /// of its checkpoint (the broker drops it after [`MIRROR_MAX_AGE`]).
    pub fn container_exited(&self) {
        let delete = self.lock().handed_over;
        self.disarm(delete);
    }

    /// Whether `queue` is mirrored.
    pub fn mirrors(&self, queue: &str) -> bool {
        self.lock().streams.contains_key(queue)
    }

    /// Keeps the content of a classic delivery until it is settled.
    pub fn retain(&self, conn: u64, ch: u16, tag: u64, r: Retained) {
        let mut g = self.lock();
        if g.streams.contains_key(&r.queue) {
            g.retained.insert((conn, ch, tag), r);
        }
    }

    /// The app settled `tag` (and below, with `multiple`) on a channel.
    /// With `ack` and the mirror publishing, the kept contents to publish
    /// before the ack is forwarded, in delivery-tag order; else they are
    /// forgotten and `None` is returned.
    pub fn settle(
        &self,
        conn: u64,
        ch: u16,
        tag: u64,
        multiple: bool,
        ack: bool,
    ) -> Option<ToMirror> {
        let mut guard = self.lock();
        let g = &mut *guard;
        let mut keys: Vec<u64> = g
            .retained
            .keys()
            .filter(|(c, h, t)| {
                *c == conn && *h == ch && (*t == tag || multiple && (tag == 0 || *t <= tag))
            })
            .map(|k| k.2)
            .collect();
        keys.sort_unstable();
        let (retained, streams) = (&mut g.retained, &g.streams);
        let entries: Vec<(String, Retained)> = keys
            .into_iter()
            .filter_map(|t| retained.remove(&(conn, ch, t)))
            .filter_map(|r| streams.get(&r.queue).cloned().map(|s| (s, r)))
            .collect();
        if !ack || entries.is_empty() || g.active_cut_ms.is_none() {
            return None;
        }
        let publisher = g.publisher.clone()?;
        Some(ToMirror { publisher, entries })
    }

    /// A mirror publish of `queue` was confirmed.
    pub fn confirmed(&self, queue: &str) {
        *self.lock().counts.entry(queue.to_string()).or_default() += 1;
    }

    /// A mirror publish failed: the migration cannot be exact any more.
    pub fn fail(&self, why: String) {
        warn!("ms2m tap: mirror publish failed, the migration will be refused: {why}");
        self.lock().broken.get_or_insert(why);
    }

    /// Forgets the kept content of a closed channel (`None`: the whole
    /// connection): the broker requeues those deliveries.
    pub fn forget(&self, conn: u64, ch: Option<u16>) {
        let mut g = self.lock();
        if !g.retained.is_empty() {
            g.retained
                .retain(|(c, h, _), _| *c != conn || ch.is_some_and(|ch| ch != *h));
        }
    }

    /// Mirrored messages per queue since the cut (the target's positions on
    /// the mirror streams).
    pub fn counts(&self) -> BTreeMap<String, u64> {
        self.lock().counts.clone()
    }

    /// Where the mirror stands.
    pub fn status(&self) -> MirrorStatus {
        let g = self.lock();
        MirrorStatus {
            migration_id: g.migration_id.clone(),
            cut_taken_at_unix_ms: g.active_cut_ms,
            broken: g.broken.clone(),
            streams: g.streams.clone(),
            pending: g.pending,
            for_migration: g.for_migration,
        }
    }

    /// Disarms: stops keeping content, and deletes the mirror streams
    /// (`delete`) after closing the publisher.
    pub fn disarm(&self, delete: bool) {
        self.capture.store(false, Ordering::SeqCst);
        let (p, streams) = {
            let mut g = self.lock();
            let p = g.publisher.take();
            let streams: Vec<String> = g.streams.values().cloned().collect();
            *g = Inner::default();
            (p, streams)
        };
        if let Some(p) = p {
            tokio::spawn(async move {
                if delete {
                    p.delete(&streams).await;
                }
                p.close().await;
            });
        }
    }
}

/// An error of the mirror's own connection, naming the broker and the step.
fn mirror_error(cfg: &LinkConfig, step: &str, e: &dyn std::fmt::Display) -> TapError {
    TapError::Config(format!(
        "classic-queue mirror on broker {}:{}: {step}: {e}",
        cfg.host, cfg.port
    ))
}

/// Publishes mirror copies with publisher confirms, on the tap's own
/// connection to the broker (the upstream URL's credentials).
pub(crate) struct Publisher {
    conn: lapin::Connection,
    ch: lapin::Channel,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher").finish_non_exhaustive()
    }
}

impl Publisher {
    /// Connects, selects confirms and declares every stream (durable,
    /// `x-max-age` [`MIRROR_MAX_AGE`]). A stream left from an earlier
    /// attempt of the same migration id is deleted first: positions count
    /// from an empty stream.
    pub async fn open(cfg: &LinkConfig, streams: &[String]) -> Result<Publisher, TapError> {
        use lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
        let p = Publisher::connect(cfg).await?;
        let what = |step: &str, e: &dyn std::fmt::Display| mirror_error(cfg, step, e);
        let ch = &p.ch;
        for s in streams {
            ch.queue_delete(s.as_str().into(), QueueDeleteOptions::default())
                .await
                .map_err(|e| what(&format!("clearing stream {s}"), &e))?;
            let mut args = FieldTable::default();
            args.insert(
                "x-queue-type".into(),
                AMQPValue::LongString("stream".into()),
            );
            args.insert(
                "x-max-age".into(),
                AMQPValue::LongString(MIRROR_MAX_AGE.into()),
            );
            ch.queue_declare(
                s.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                args,
            )
            .await
            .map_err(|e| what(&format!("declaring stream {s}"), &e))?;
        }
        info!(streams = ?streams, "ms2m tap: classic-queue mirror ready");
        Ok(p)
    }

    /// Connects and selects publisher confirms.
    async fn connect(cfg: &LinkConfig) -> Result<Publisher, TapError> {
        use lapin::options::ConfirmSelectOptions;
        let what = |step: &str, e: &dyn std::fmt::Display| mirror_error(cfg, step, e);
        let url = cfg.amqp_url();
        let connect = lapin::Connection::connect(
            &url,
            lapin::ConnectionProperties::default().with_connection_name("ms2m tap mirror".into()),
        );
        let conn = tokio::time::timeout(cfg.connect_timeout, connect)
            .await
            .map_err(|_| what("connecting", &"timed out"))?
            .map_err(|e| what("connecting", &e))?;
        let ch = conn
            .create_channel()
            .await
            .map_err(|e| what("opening a channel", &e))?;
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| what("confirm.select", &e))?;
        Ok(Publisher { conn, ch })
    }

    /// Publishes the copies, in order, then waits for every confirm.
    pub async fn publish_all(&self, entries: &[(String, Retained)]) -> Result<(), String> {
        let mut confirms = Vec::with_capacity(entries.len());
        for (stream, r) in entries {
            let c = self
                .ch
                .basic_publish(
                    "".into(),
                    stream.as_str().into(),
                    lapin::options::BasicPublishOptions::default(),
                    &r.body,
                    r.properties.clone(),
                )
                .await
                .map_err(|e| format!("publishing to {stream}: {e}"))?;
            confirms.push((stream, c));
        }
        for (stream, c) in confirms {
            let confirm = c
                .await
                .map_err(|e| format!("waiting for the confirm from {stream}: {e}"))?;
            if confirm.is_nack() {
                return Err(format!("the broker nacked a copy to {stream}"));
            }
        }
        Ok(())
    }

    /// Deletes the mirror streams (best effort).
    pub async fn delete(&self, streams: &[String]) {
        for s in streams {
            if let Err(e) = self
                .ch
                .queue_delete(s.as_str().into(), Default::default())
                .await
            {
                warn!(stream = %s, "ms2m tap: cannot delete mirror stream: {e}");
            }
        }
    }

    /// Closes the connection (best effort).
    pub async fn close(&self) {
        let _ = self.conn.close(200, "ms2m mirror done".into()).await;
    }
}

/// A plain restore's replay of classic queues from their mirrors (see
/// [`crate::Tap::start_with`]): the restored app consumes each mirror up to
/// the end marker the restore appended, then its queue.
pub(crate) struct Replay {
    /// Classic queue → mirror stream.
    pub streams: BTreeMap<String, String>,
    /// The connection that marked the ends; it deletes the streams after.
    pub publisher: Publisher,
}

impl Replay {
    /// Checks that every mirror stream is still there and appends an end
    /// marker to each (the checkpoint's source is gone: nothing follows).
    pub async fn prepare(
        cfg: &LinkConfig,
        streams: &BTreeMap<String, String>,
    ) -> Result<Replay, TapError> {
        let publisher = Publisher::connect(cfg).await?;
        for (q, s) in streams {
            let exists = publisher
                .ch
                .queue_declare(
                    s.as_str().into(),
                    lapin::options::QueueDeclareOptions {
                        passive: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await;
            if let Err(e) = exists {
                publisher.close().await;
                return Err(TapError::Config(format!(
                    "the mirror stream {s} of classic queue {q} is gone ({e}): what the \
                     checkpoint's source processed after the cut cannot be replayed (it was \
                     restored already, a newer checkpoint replaced it, or it is older than \
                     {MIRROR_MAX_AGE}); restore the newest checkpoint once"
                )));
            }
        }
        let mut headers = FieldTable::default();
        headers.insert(END_MARKER_HEADER.into(), AMQPValue::Boolean(true));
        let marker = Retained {
            queue: String::new(),
            properties: AMQPProperties::default().with_headers(headers),
            body: Vec::new(),
        };
        let entries: Vec<(String, Retained)> = streams
            .values()
            .map(|s| (s.clone(), marker.clone()))
            .collect();
        if let Err(e) = publisher.publish_all(&entries).await {
            publisher.close().await;
            return Err(TapError::Config(format!(
                "cannot mark the end of the classic-queue mirrors: {e}"
            )));
        }
        info!(streams = ?streams, "ms2m tap: replaying classic queues from their mirrors");
        Ok(Replay {
            streams: streams.clone(),
            publisher,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirror_names_are_bounded_and_stable() {
        assert_eq!(mirror_stream_name("m1", "orders"), "ms2m.mirror.m1.orders");
        let long = "q".repeat(300);
        let a = mirror_stream_name("m1", &long);
        assert!(a.len() <= 255, "{a}");
        assert_eq!(a, mirror_stream_name("m1", &long));
        assert_ne!(a, mirror_stream_name("m1", &"r".repeat(300)));
    }

    #[test]
    fn settle_returns_kept_content_in_tag_order_only_when_publishing() {
        let m = MirrorState::default();
        let streams: BTreeMap<String, String> =
            [("q".to_string(), "ms2m.mirror.m.q".to_string())].into();
        {
            let mut g = m.lock();
            g.streams = streams;
        }
        let r = |b: &[u8]| Retained {
            queue: "q".into(),
            properties: AMQPProperties::default(),
            body: b.to_vec(),
        };
        for t in [3, 1, 2, 4] {
            m.retain(7, 1, t, r(&[t as u8]));
        }
        // An unmirrored queue is not kept.
        m.retain(
            7,
            1,
            9,
            Retained {
                queue: "other".into(),
                ..r(b"x")
            },
        );
        // Not publishing yet (no publisher, no cut): forgotten.
        assert!(m.settle(7, 1, 1, false, true).is_none());
        assert_eq!(m.lock().retained.len(), 3);
        // A nack forgets without publishing.
        assert!(m.settle(7, 1, 4, false, false).is_none());
        assert_eq!(m.lock().retained.len(), 2);
        m.forget(7, Some(2));
        assert_eq!(m.lock().retained.len(), 2);
        m.forget(7, Some(1));
        assert!(m.lock().retained.is_empty());
    }
}
