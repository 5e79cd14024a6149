//! Host-side AMQP helpers for the broker tests: a rate-controlled producer, a
//! collector of the consumers' results, the checker that compares the two,
//! and queue/stream housekeeping. They talk to ms2m's RabbitMQ node directly
//! (default `amqp://guest:guest@127.0.0.1:5672/%2f`, overridable with
//! `MS2M_AMQP_URL`), never through a tap.
//!
//! Message formats (shared with `workloads/amqp-consumer` and
//! `workloads/pika_consumer.py`):
//! - producer → queue: `{"seq":N,"sent_at_us":T}`, persistent, `message_id`
//!   = `N`, content type `application/json`;
//! - consumer → results queue: `{"consumer":NAME,"seq":N,"count":C,
//!   "digest":"16 hex digits","processed_at_us":T,"sent_at_us":T}` where
//!   `count` and `digest` are the consumer's state after processing `N`;
//! - the consumer's state file (`/tmp/consumer-state` in the container):
//!   `{"consumer":NAME,"count":C,"last_seq":N,"digest":"…","connects":K,
//!   "updated_at_us":T}`.
//!
//! The digest is 64-bit FNV-1a chained over each processed `seq` as 8
//! little-endian bytes ([`digest_of`]).

use futures_lite::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Connection, ConnectionProperties, PublisherConfirm};
use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The broker the tests use unless `MS2M_AMQP_URL` says otherwise.
pub const DEFAULT_BROKER_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
/// The RabbitMQ node `hack/start-rabbitmq.sh` starts.
pub const RABBITMQ_NODE: &str = "ms2m@localhost";
/// The consumer binary inside the test image.
pub const AMQP_CONSUMER: &str = "/usr/local/bin/amqp-consumer";
/// The pika consumer script inside the test image (run with the host's /usr
/// bind-mounted, see [`PIKA_MOUNT`]).
pub const PIKA_CONSUMER: &str = "/opt/ms2m/pika_consumer.py";
/// The `ctr run --mount` value that makes the host's Python (and pika)
/// available in the busybox test image.
pub const PIKA_MOUNT: &str = "type=bind,src=/usr,dst=/usr,options=rbind:ro";
/// The consumers' state file inside the container.
pub const STATE_FILE: &str = "/tmp/consumer-state";

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// The broker URL for host-side helpers.
pub fn broker_url() -> String {
    std::env::var("MS2M_AMQP_URL")
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| DEFAULT_BROKER_URL.to_string())
}

/// The consumers' digest after processing `seqs` in this order.
pub fn digest_of(seqs: impl IntoIterator<Item = u64>) -> u64 {
    let mut d = FNV_OFFSET;
    for s in seqs {
        for b in s.to_le_bytes() {
            d ^= u64::from(b);
            d = d.wrapping_mul(FNV_PRIME);
        }
    }
    d
}

/// Wall-clock microseconds since the epoch (the messages' timestamps).
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Runs a future to completion on a fresh current-thread tokio runtime.
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt.block_on(f),
        Err(e) => panic!("cannot start a tokio runtime: {e}"),
    }
}

async fn connect(name: &str) -> Result<Connection, String> {
    let url = broker_url();
    let props = ConnectionProperties::default()
        .with_connection_name(LongString::from(format!("ms2m-tests {name}")));
    match tokio::time::timeout(Duration::from_secs(10), Connection::connect(&url, props)).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err(format!("connecting to the broker at {url}: {e}")),
        Err(_) => Err(format!(
            "connecting to the broker at {url}: no answer within 10 s"
        )),
    }
}

/// Panics loudly unless ms2m's RabbitMQ node answers AMQP: the broker tests
/// never skip silently.
pub fn rabbitmq_available() {
    static CHECKED: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    let res = CHECKED.get_or_init(|| {
        block_on(async {
            let c = connect("probe").await?;
            let _ = c.close(200, "probe done".into()).await;
            Ok(())
        })
    });
    if let Err(e) = res {
        panic!(
            "RabbitMQ is not reachable ({e}). The broker tests need ms2m's RabbitMQ node: \
             run `sudo hack/start-rabbitmq.sh` from the repository root."
        );
    }
}

/// A classic queue or a RabbitMQ stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueKind {
    Classic,
    Stream,
}

impl QueueKind {
    /// The consumers' `QUEUE_TYPE` value.
    pub fn as_str(self) -> &'static str {
        match self {
            QueueKind::Classic => "classic",
            QueueKind::Stream => "stream",
        }
    }

    fn args(self) -> FieldTable {
        let mut t = FieldTable::default();
        if self == QueueKind::Stream {
            t.insert(
                "x-queue-type".into(),
                AMQPValue::LongString(LongString::from("stream")),
            );
        }
        t
    }
}

async fn declare_on(c: &Connection, name: &str, kind: QueueKind) -> Result<(), String> {
    let ch = c
        .create_channel()
        .await
        .map_err(|e| format!("opening a channel: {e}"))?;
    ch.queue_declare(
        ShortString::from(name),
        QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        },
        kind.args(),
    )
    .await
    .map_err(|e| format!("declaring {} {name}: {e}", kind.as_str()))?;
    let _ = ch.close(200, "ok".into()).await;
    Ok(())
}

/// Declares a durable classic queue or stream (the same arguments the
/// consumers use, so their own declarations agree).
pub fn declare_queue(name: &str, kind: QueueKind) {
    block_on(async {
        let c = connect("declare").await?;
        let r = declare_on(&c, name, kind).await;
        let _ = c.close(200, "ok".into()).await;
        r
    })
    .unwrap_or_else(|e| panic!("{e}"));
}

/// Deletes a queue or stream (no error when it does not exist).
pub fn delete_queue(name: &str) -> Result<(), String> {
    block_on(async {
        let c = connect("delete").await?;
        let ch = c
            .create_channel()
            .await
            .map_err(|e| format!("opening a channel: {e}"))?;
        let r = ch
            .queue_delete(ShortString::from(name), QueueDeleteOptions::default())
            .await
            .map(|_| ())
            .map_err(|e| format!("deleting queue {name}: {e}"));
        let _ = c.close(200, "ok".into()).await;
        r
    })
}

/// Queues (and streams) a test uses: declared on creation, deleted on drop.
pub struct TestQueues {
    /// The consumed queue or stream.
    pub queue: String,
    /// Its kind.
    pub kind: QueueKind,
    /// The classic queue the consumers publish their results to.
    pub results: String,
}

impl TestQueues {
    /// `ms2m-t-<unique>` of `kind` and its `.results` classic queue.
    pub fn new(prefix: &str, kind: QueueKind) -> TestQueues {
        let queue = crate::unique_id(&format!("ms2m-t-{prefix}"));
        let results = format!("{queue}.results");
        declare_queue(&queue, kind);
        declare_queue(&results, QueueKind::Classic);
        TestQueues {
            queue,
            kind,
            results,
        }
    }
}

impl Drop for TestQueues {
    fn drop(&mut self) {
        for q in [&self.queue, &self.results] {
            if let Err(e) = delete_queue(q) {
                eprintln!("cleanup: {e}");
            }
        }
    }
}

/// What a [`Producer`] publishes.
#[derive(Debug, Clone)]
pub struct ProducerConfig {
    /// Target queue or stream (published through the default exchange).
    pub queue: String,
    /// The first sequence number.
    pub first_seq: u64,
    /// How many messages (`first_seq..first_seq+count`).
    pub count: u64,
    /// Messages per second (0: as fast as confirms allow).
    pub rate: u64,
}

impl ProducerConfig {
    /// `seq` 1..=`count` at `rate` msg/s to `queue`.
    pub fn new(queue: &str, count: u64, rate: u64) -> ProducerConfig {
        ProducerConfig {
            queue: queue.to_string(),
            first_seq: 1,
            count,
            rate,
        }
    }

    /// Starts at `first` instead of 1.
    pub fn starting_at(mut self, first: u64) -> ProducerConfig {
        self.first_seq = first;
        self
    }
}

/// What a producer did.
#[derive(Debug, Clone, Default)]
pub struct ProducerReport {
    /// Sequence numbers the broker confirmed, in publish order.
    pub confirmed: Vec<u64>,
    /// Wall time from the first publish to the last confirm.
    pub elapsed: Duration,
    /// True when it stopped early on request.
    pub stopped: bool,
}

/// The producer message body for `seq`.
pub fn message_body(seq: u64, sent_at_us: u64) -> String {
    format!("{{\"seq\":{seq},\"sent_at_us\":{sent_at_us}}}")
}

/// Publishes `cfg.count` numbered messages at `cfg.rate` with publisher
/// confirms; stops early when `stop` is set. Errors (connection lost, a nack)
/// end it with what was confirmed so far in the error text.
pub async fn produce(cfg: &ProducerConfig, stop: &AtomicBool) -> Result<ProducerReport, String> {
    let conn = connect("producer").await?;
    let ch = conn
        .create_channel()
        .await
        .map_err(|e| format!("opening a channel: {e}"))?;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|e| format!("enabling publisher confirms: {e}"))?;
    let mut pending: VecDeque<(u64, PublisherConfirm)> = VecDeque::new();
    let mut report = ProducerReport::default();
    let start = Instant::now();
    let start_tokio = tokio::time::Instant::now();
    let q = ShortString::from(cfg.queue.as_str());
    async fn settle(
        pending: &mut VecDeque<(u64, PublisherConfirm)>,
        keep: usize,
        report: &mut ProducerReport,
    ) -> Result<(), String> {
        while pending.len() > keep {
            let Some((seq, confirm)) = pending.pop_front() else {
                break;
            };
            match confirm.await {
                Ok(c) if c.is_ack() => report.confirmed.push(seq),
                Ok(_) => return Err(format!("the broker nacked seq {seq}")),
                Err(e) => return Err(format!("waiting for the confirm of seq {seq}: {e}")),
            }
        }
        Ok(())
    }
    for i in 0..cfg.count {
        if stop.load(Ordering::Relaxed) {
            report.stopped = true;
            break;
        }
        if let Some(us) = (i * 1_000_000).checked_div(cfg.rate) {
            tokio::time::sleep_until(start_tokio + Duration::from_micros(us)).await;
        }
        let seq = cfg.first_seq + i;
        let body = message_body(seq, now_us());
        let confirm = ch
            .basic_publish(
                ShortString::from(""),
                q.clone(),
                BasicPublishOptions::default(),
                body.as_bytes(),
                BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_message_id(ShortString::from(seq.to_string()))
                    .with_content_type(ShortString::from("application/json")),
            )
            .await
            .map_err(|e| {
                format!(
                    "publishing seq {seq} to {} ({} confirmed before): {e}",
                    cfg.queue,
                    report.confirmed.len()
                )
            })?;
        pending.push_back((seq, confirm));
        settle(&mut pending, 512, &mut report).await?;
    }
    settle(&mut pending, 0, &mut report).await?;
    report.elapsed = start.elapsed();
    let _ = conn.close(200, "producer done".into()).await;
    Ok(report)
}

/// A [`produce`] running on its own thread.
pub struct Producer {
    stop: Arc<AtomicBool>,
    handle: thread::JoinHandle<Result<ProducerReport, String>>,
}

impl Producer {
    /// Starts publishing in the background.
    pub fn start(cfg: ProducerConfig) -> Producer {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let handle = thread::spawn(move || block_on(produce(&cfg, &flag)));
        Producer { stop, handle }
    }

    /// Asks the producer to stop after the current message.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    /// True once it has finished (done, stopped or failed).
    pub fn is_finished(&self) -> bool {
        self.handle.is_finished()
    }

    /// Waits for it to finish.
    pub fn join(self) -> Result<ProducerReport, String> {
        self.handle
            .join()
            .unwrap_or_else(|_| Err("the producer thread panicked".into()))
    }

    /// Publishes `cfg` and waits; panics on failure.
    pub fn run(cfg: ProducerConfig) -> ProducerReport {
        let what = format!("producing {} messages to {}", cfg.count, cfg.queue);
        Producer::start(cfg)
            .join()
            .unwrap_or_else(|e| panic!("{what}: {e}"))
    }
}

/// One consumer result (see the module docs for the JSON).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResultMsg {
    pub consumer: String,
    pub seq: u64,
    pub count: u64,
    pub digest: u64,
    pub processed_at_us: u64,
    pub sent_at_us: Option<u64>,
}

impl ResultMsg {
    /// Parses one result body.
    pub fn parse(body: &[u8]) -> Result<ResultMsg, String> {
        let v: serde_json::Value = serde_json::from_slice(body).map_err(|e| {
            format!(
                "result is not JSON ({e}): {}",
                String::from_utf8_lossy(body)
            )
        })?;
        let num = |k: &str| {
            v.get(k)
                .and_then(|x| x.as_u64())
                .ok_or_else(|| format!("result lacks numeric {k:?}: {v}"))
        };
        let digest = v
            .get("digest")
            .and_then(|d| d.as_str())
            .and_then(|d| u64::from_str_radix(d, 16).ok())
            .ok_or_else(|| format!("result lacks a hex \"digest\": {v}"))?;
        Ok(ResultMsg {
            consumer: v
                .get("consumer")
                .and_then(|c| c.as_str())
                .unwrap_or("")
                .to_string(),
            seq: num("seq")?,
            count: num("count")?,
            digest,
            processed_at_us: num("processed_at_us")?,
            sent_at_us: v.get("sent_at_us").and_then(|x| x.as_u64()),
        })
    }
}

/// Consumes `results_queue` (auto-ack) until `expected` results arrived, then
/// lingers briefly (300 ms) to catch surplus (duplicate) results; returns
/// whatever arrived by `timeout`. Results that are not valid JSON panic.
pub fn collect_results(results_queue: &str, expected: usize, timeout: Duration) -> Vec<ResultMsg> {
    block_on(collect_results_async(results_queue, expected, timeout))
        .unwrap_or_else(|e| panic!("collecting results from {results_queue}: {e}"))
}

/// The async form of [`collect_results`].
pub async fn collect_results_async(
    results_queue: &str,
    expected: usize,
    timeout: Duration,
) -> Result<Vec<ResultMsg>, String> {
    let goal = ResultsGoal::new(expected, timeout);
    let mut out = Vec::new();
    consume_results(results_queue, &goal, |r| out.push(r)).await?;
    Ok(out)
}

/// When [`consume_results`] stops: once `expected` results arrived (plus
/// 300 ms for surplus ones), or at the deadline. Either may change while it
/// runs (a soak learns how many to expect only when its producer stops).
pub struct ResultsGoal(std::sync::Mutex<(usize, Instant)>);

impl ResultsGoal {
    /// `expected` results within `timeout` from now.
    pub fn new(expected: usize, timeout: Duration) -> ResultsGoal {
        ResultsGoal(std::sync::Mutex::new((expected, Instant::now() + timeout)))
    }

    /// Sets a new goal: `expected` results within `timeout` from now.
    pub fn set(&self, expected: usize, timeout: Duration) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = (expected, Instant::now() + timeout);
    }

    fn get(&self) -> (usize, Instant) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Consumes `results_queue` (auto-ack), handing each result to `sink`,
/// until `goal` is met or its deadline passes; returns how many arrived.
pub async fn consume_results(
    results_queue: &str,
    goal: &ResultsGoal,
    mut sink: impl FnMut(ResultMsg),
) -> Result<usize, String> {
    let conn = connect("collector").await?;
    let ch = conn
        .create_channel()
        .await
        .map_err(|e| format!("opening a channel: {e}"))?;
    let mut consumer = ch
        .basic_consume(
            ShortString::from(results_queue),
            ShortString::from(""),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|e| format!("consuming: {e}"))?;
    let mut n = 0;
    let mut linger_until: Option<tokio::time::Instant> = None;
    loop {
        let (expected, deadline) = goal.get();
        let deadline = tokio::time::Instant::from_std(deadline);
        let now = tokio::time::Instant::now();
        if n >= expected && linger_until.is_none() {
            linger_until = Some(now + Duration::from_millis(300));
        }
        let stop_at = linger_until.map_or(deadline, |l| l.min(deadline));
        if now >= stop_at {
            break;
        }
        // Wake up now and then: the goal may change meanwhile.
        let until = stop_at.min(now + Duration::from_millis(250));
        match tokio::time::timeout_at(until, consumer.next()).await {
            Err(_) => {}
            Ok(None) => return Err("the results consumer was cancelled".into()),
            Ok(Some(Err(e))) => return Err(format!("receiving: {e}")),
            Ok(Some(Ok(d))) => {
                sink(ResultMsg::parse(&d.data)?);
                n += 1;
            }
        }
    }
    let _ = conn.close(200, "collector done".into()).await;
    Ok(n)
}

/// Per-consumer summary in a [`Report`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConsumerTally {
    /// Results from this consumer.
    pub results: usize,
    /// The last result's seq, count and digest.
    pub last_seq: u64,
    pub last_count: u64,
    pub last_digest: u64,
}

/// The checker's verdict.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Messages the producer had confirmed.
    pub produced: usize,
    /// Distinct produced seqs that appear in the results.
    pub processed_unique: usize,
    /// Produced but never in the results (sorted).
    pub lost: Vec<u64>,
    /// In the results more than once (sorted, each listed once).
    pub duplicated: Vec<u64>,
    /// Results whose seq is not above the previous result of the same
    /// consumer.
    pub out_of_order: usize,
    /// Results for seqs the producer never confirmed (sorted).
    pub unexpected: Vec<u64>,
    /// Per consumer name.
    pub by_consumer: BTreeMap<String, ConsumerTally>,
}

impl Report {
    /// No loss, no duplicate, nothing out of order or unexpected.
    pub fn is_clean(&self) -> bool {
        self.lost.is_empty()
            && self.duplicated.is_empty()
            && self.out_of_order == 0
            && self.unexpected.is_empty()
    }
}

fn few(v: &[u64]) -> String {
    if v.len() <= 20 {
        format!("{v:?}")
    } else {
        format!("{:?} … ({} in all)", &v[..20], v.len())
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "produced {}, processed {} unique, lost {}, duplicated {}, out of order {}, unexpected {}",
            self.produced,
            self.processed_unique,
            self.lost.len(),
            self.duplicated.len(),
            self.out_of_order,
            self.unexpected.len()
        )?;
        if !self.lost.is_empty() {
            write!(f, "\n  lost: {}", few(&self.lost))?;
        }
        if !self.duplicated.is_empty() {
            write!(f, "\n  duplicated: {}", few(&self.duplicated))?;
        }
        if !self.unexpected.is_empty() {
            write!(f, "\n  unexpected: {}", few(&self.unexpected))?;
        }
        for (name, t) in &self.by_consumer {
            write!(
                f,
                "\n  consumer {name}: {} results, last seq {} count {} digest {:016x}",
                t.results, t.last_seq, t.last_count, t.last_digest
            )?;
        }
        Ok(())
    }
}

/// Compares what the producer published with what the consumers processed.
#[derive(Debug, Clone, Default)]
pub struct Checker {
    produced: Vec<u64>,
}

impl Checker {
    /// A checker for these produced (confirmed) seqs.
    pub fn new(produced: impl IntoIterator<Item = u64>) -> Checker {
        Checker {
            produced: produced.into_iter().collect(),
        }
    }

    /// Adds more produced seqs (a second producer run).
    pub fn produced(&mut self, more: impl IntoIterator<Item = u64>) {
        self.produced.extend(more);
    }

    /// The verdict over `results` in the order they were received.
    pub fn check(&self, results: &[ResultMsg]) -> Report {
        let mut tally = Tally::default();
        for r in results {
            tally.push(r);
        }
        self.verdict(&tally)
    }

    /// The verdict over a [`Tally`] kept while the results arrived.
    pub fn verdict(&self, tally: &Tally) -> Report {
        let seen = &tally.seen;
        let produced: std::collections::BTreeSet<u64> = self.produced.iter().copied().collect();
        let lost: Vec<u64> = produced
            .iter()
            .copied()
            .filter(|s| !seen.contains_key(s))
            .collect();
        let duplicated = seen
            .iter()
            .filter(|(_, n)| **n > 1)
            .map(|(s, _)| *s)
            .collect();
        let unexpected = seen
            .keys()
            .copied()
            .filter(|s| !produced.contains(s))
            .collect();
        Report {
            produced: produced.len(),
            processed_unique: produced.len() - lost.len(),
            lost,
            duplicated,
            out_of_order: tally.out_of_order,
            unexpected,
            by_consumer: tally.by_consumer.clone(),
        }
    }
}

/// What the [`Checker`] needs from the results, kept one result at a time
/// (a soak's millions of results need not be held as [`ResultMsg`]s).
#[derive(Debug, Clone, Default)]
pub struct Tally {
    seen: BTreeMap<u64, usize>,
    by_consumer: BTreeMap<String, ConsumerTally>,
    out_of_order: usize,
    results: usize,
}

impl Tally {
    /// Counts one result (results in the order they were received).
    pub fn push(&mut self, r: &ResultMsg) {
        self.results += 1;
        *self.seen.entry(r.seq).or_default() += 1;
        let t = match self.by_consumer.get_mut(&r.consumer) {
            Some(t) => t,
            None => self.by_consumer.entry(r.consumer.clone()).or_default(),
        };
        if t.results > 0 && r.seq <= t.last_seq {
            self.out_of_order += 1;
        }
        t.results += 1;
        t.last_seq = r.seq;
        t.last_count = r.count;
        t.last_digest = r.digest;
    }

    /// Results counted so far.
    pub fn results(&self) -> usize {
        self.results
    }
}

/// A consumer's state file (`/tmp/consumer-state`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerState {
    pub consumer: String,
    pub count: u64,
    pub last_seq: u64,
    pub digest: u64,
    /// Times it reached basic.consume (1 + reconnections).
    pub connects: u64,
}

impl ConsumerState {
    /// Parses the state file's JSON; `None` if it is not a state.
    pub fn parse(text: &str) -> Option<ConsumerState> {
        let v: serde_json::Value = serde_json::from_str(text.trim()).ok()?;
        Some(ConsumerState {
            consumer: v.get("consumer")?.as_str()?.to_string(),
            count: v.get("count")?.as_u64()?,
            last_seq: v.get("last_seq")?.as_u64()?,
            digest: u64::from_str_radix(v.get("digest")?.as_str()?, 16).ok()?,
            connects: v.get("connects")?.as_u64()?,
        })
    }
}

/// The two consumer workloads in the test image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Client {
    /// ms2m's own `amqp-consumer` (lapin, static).
    Lapin,
    /// `pika_consumer.py` with the host's Python (see [`PIKA_MOUNT`]).
    Pika,
}

impl Client {
    pub fn name(self) -> &'static str {
        match self {
            Client::Lapin => "lapin",
            Client::Pika => "pika",
        }
    }

    /// The container's command.
    pub fn command(self) -> Vec<&'static str> {
        match self {
            Client::Lapin => vec![AMQP_CONSUMER],
            Client::Pika => vec!["/usr/bin/python3", PIKA_CONSUMER],
        }
    }
}

/// `ctr run` options for a consumer of `q` called `name` whose stdout and
/// stderr go to the file `log`; `net` are the flags that connect it to the
/// broker (they come first).
pub fn consumer_run_opts(
    client: Client,
    q: &TestQueues,
    name: &str,
    log: &std::path::Path,
    net: &[String],
) -> crate::RunOpts {
    let mut opts = crate::RunOpts::command(&client.command());
    for f in net {
        opts = opts.flag(f);
    }
    opts = opts
        .flag(&format!("--env=QUEUE={}", q.queue))
        .flag(&format!("--env=QUEUE_TYPE={}", q.kind.as_str()))
        .flag(&format!("--env=RESULTS_QUEUE={}", q.results))
        .flag(&format!("--env=CONSUMER_NAME={name}"))
        .log_uri(&format!("file://{}", log.display()));
    if client == Client::Pika {
        opts = opts.flag(&format!("--mount={PIKA_MOUNT}"));
    }
    opts
}

/// The consumer's state file through an exec; `None` until it is there.
pub fn consumer_state(c: &crate::Container) -> Option<ConsumerState> {
    let out = c.exec(&["cat", STATE_FILE]);
    if out.success() {
        ConsumerState::parse(&out.stdout)
    } else {
        None
    }
}

/// How often the consumer waits read its state (one `ctr task exec` each).
const STATE_POLL: Duration = Duration::from_millis(20);

/// Waits until the consumer has reached basic.consume `n` times.
pub fn wait_consumer_connects(c: &crate::Container, n: u64, timeout: Duration) -> ConsumerState {
    crate::wait_until(
        &format!("consumer {} to be consuming (connection #{n})", c.id),
        timeout,
        STATE_POLL,
        || consumer_state(c).filter(|s| s.connects >= n),
    )
}

/// Waits until the consumer's state count reaches `count`.
pub fn wait_consumer_count(c: &crate::Container, count: u64, timeout: Duration) -> ConsumerState {
    crate::wait_until(
        &format!("consumer {} to have processed {count}", c.id),
        timeout,
        STATE_POLL,
        || consumer_state(c).filter(|s| s.count >= count),
    )
}

/// A checkpoint's `ms2m-manifest.json` as JSON (panics naming the file when
/// it is missing or malformed).
pub fn manifest_json(img: &std::path::Path) -> serde_json::Value {
    let p = img.join("ms2m-manifest.json");
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The `broker` cut of `queue` in a manifest (panics when there is none).
pub fn queue_cut<'a>(m: &'a serde_json::Value, queue: &str) -> &'a serde_json::Value {
    m["broker"]["queues"]
        .as_array()
        .and_then(|qs| qs.iter().find(|q| q["name"] == queue))
        .unwrap_or_else(|| panic!("no cut of {queue} in the manifest's broker section: {m}"))
}

/// The timestamp (µs) of the consumer's log line announcing connection #n.
pub fn connect_logged_at(log: &std::path::Path, n: u64) -> Option<u64> {
    let text = std::fs::read_to_string(log).ok()?;
    let needle = format!("connection #{n},");
    text.lines()
        .filter(|l| l.contains(&needle))
        .find_map(|l| l.split_whitespace().next()?.parse().ok())
}

/// `rabbitmqctl -n ms2m@localhost ARGS...`.
pub fn rabbitmqctl(args: &[&str]) -> crate::CmdOut {
    let mut cmd = std::process::Command::new("rabbitmqctl");
    cmd.args(["-n", RABBITMQ_NODE]).args(args);
    crate::run_cmd(&mut cmd, Duration::from_secs(60)).unwrap_or_else(|e| panic!("{e}"))
}

/// Stops the RabbitMQ application (the node stays up) and starts it again,
/// returning once it accepts AMQP connections. `while_down` runs in between.
pub fn restart_broker_app(while_down: impl FnOnce()) {
    /// Starts the app again if `while_down` panics: a test failure must not
    /// leave the shared broker stopped.
    struct StartOnPanic;
    impl Drop for StartOnPanic {
        fn drop(&mut self) {
            if thread::panicking() {
                let mut cmd = std::process::Command::new("rabbitmqctl");
                cmd.args(["-n", RABBITMQ_NODE, "start_app"]);
                let _ = crate::run_cmd(&mut cmd, Duration::from_secs(60));
            }
        }
    }
    rabbitmqctl(&["stop_app"]).ok();
    let guard = StartOnPanic;
    while_down();
    drop(guard);
    rabbitmqctl(&["start_app"]).ok();
    rabbitmqctl(&["await_startup"]).ok();
    crate::wait_until(
        "the broker to accept AMQP again",
        Duration::from_secs(30),
        Duration::from_millis(100),
        || {
            block_on(async {
                let c = connect("probe").await.ok()?;
                let _ = c.close(200, "probe".into()).await;
                Some(())
            })
        },
    );
}

/// A consumer of `q` called `name` in a container of its own network
/// namespace, behind the tap: upstream `upstream` (as the shim reaches the
/// broker), the app's URL `app_url` (the tap on its own loopback), extra
/// `ctr run` flags in `extra`; its output in `<td>/<name>.log`. Returns
/// once it consumes.
pub fn start_tapped_consumer(
    client: Client,
    q: &TestQueues,
    td: &crate::TestDir,
    name: &str,
    upstream: &str,
    app_url: &str,
    extra: &[String],
) -> crate::Container {
    let log = td.join(&format!("{name}.log"));
    let net = [
        format!("--annotation=io.ms2m.tap.upstream={upstream}"),
        format!("--env=AMQP_URL={app_url}"),
    ];
    let mut opts = consumer_run_opts(client, q, name, &log, &net);
    for f in extra {
        opts = opts.flag(f);
    }
    let c = crate::Container::run(&format!("t-{name}"), opts);
    wait_consumer_connects(&c, 1, Duration::from_secs(30));
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(consumer: &str, seq: u64) -> ResultMsg {
        ResultMsg {
            consumer: consumer.into(),
            seq,
            count: 0,
            digest: 0,
            processed_at_us: 0,
            sent_at_us: None,
        }
    }

    #[test]
    fn clean_run() {
        let results: Vec<_> = (1..=5).map(|s| r("a", s)).collect();
        let rep = Checker::new(1..=5).check(&results);
        assert!(rep.is_clean(), "{rep}");
        assert_eq!(rep.produced, 5);
        assert_eq!(rep.processed_unique, 5);
        assert_eq!(rep.by_consumer["a"].results, 5);
        assert_eq!(rep.by_consumer["a"].last_seq, 5);
    }

    #[test]
    fn lost_duplicated_out_of_order() {
        // 3 never processed, 2 processed twice (a redelivery after a
        // restore), consumer "a" goes back from 4 to 2.
        let results = vec![r("a", 1), r("a", 2), r("a", 4), r("a", 2), r("a", 5)];
        let rep = Checker::new(1..=5).check(&results);
        assert!(!rep.is_clean());
        assert_eq!(rep.lost, vec![3]);
        assert_eq!(rep.duplicated, vec![2]);
        assert_eq!(rep.out_of_order, 1);
        assert_eq!(rep.processed_unique, 4);
        let text = rep.to_string();
        assert!(
            text.contains("lost: [3]") && text.contains("duplicated: [2]"),
            "{text}"
        );
    }

    #[test]
    fn order_is_per_consumer_and_unexpected_counts() {
        // Two consumers interleaved, each increasing: in order. A seq the
        // producer never confirmed is reported, not silently accepted.
        let results = vec![r("a", 1), r("b", 2), r("a", 3), r("b", 4), r("b", 9)];
        let mut c = Checker::new(1..=2);
        c.produced(3..=4);
        let rep = c.check(&results);
        assert_eq!(rep.out_of_order, 0);
        assert!(rep.lost.is_empty() && rep.duplicated.is_empty());
        assert_eq!(rep.unexpected, vec![9]);
        assert!(!rep.is_clean());
        assert_eq!(rep.by_consumer.len(), 2);
        // The same seq at two consumers is a duplicate (processed twice).
        let rep = Checker::new(1..=1).check(&[r("a", 1), r("b", 1)]);
        assert_eq!(rep.duplicated, vec![1]);
        assert_eq!(rep.out_of_order, 0);
    }

    #[test]
    fn empty_results_lose_everything() {
        let rep = Checker::new(1..=3).check(&[]);
        assert_eq!(rep.lost, vec![1, 2, 3]);
        assert_eq!(rep.processed_unique, 0);
    }

    #[test]
    fn digest_matches_consumers() {
        // FNV-1a 64 of the empty input is the offset basis; the value for
        // 1..=2 was computed by the Rust and Python consumers alike.
        assert_eq!(digest_of([]), 0xcbf29ce484222325);
        assert_ne!(digest_of([1, 2]), digest_of([2, 1]));
        let mut h: u64 = 0xcbf29ce484222325;
        for b in 7u64.to_le_bytes() {
            h = (h ^ b as u64).wrapping_mul(0x100000001b3);
        }
        assert_eq!(digest_of([7]), h);
    }

    #[test]
    fn parses_results_and_states() {
        let m = ResultMsg::parse(
            br#"{"consumer":"c1","seq":3,"count":3,"digest":"00000000000000ff","processed_at_us":10,"sent_at_us":9}"#,
        )
        .expect("parses");
        assert_eq!(m.seq, 3);
        assert_eq!(m.digest, 0xff);
        assert_eq!(m.sent_at_us, Some(9));
        let m = ResultMsg::parse(
            br#"{"consumer":"c1","seq":3,"count":3,"digest":"00000000000000ff","processed_at_us":10,"sent_at_us":null}"#,
        )
        .expect("parses");
        assert_eq!(m.sent_at_us, None);
        assert!(ResultMsg::parse(b"nope").is_err());
        assert!(ResultMsg::parse(br#"{"seq":1}"#).is_err());

        let s = ConsumerState::parse(
            r#"{"connects":2,"consumer":"x","count":5,"digest":"cbf29ce484222325","last_seq":5,"updated_at_us":1}"#,
        )
        .expect("parses");
        assert_eq!(s.connects, 2);
        assert_eq!(s.digest, 0xcbf29ce484222325);
        assert!(ConsumerState::parse("").is_none());
        assert_eq!(message_body(4, 5), r#"{"seq":4,"sent_at_us":5}"#);
    }
}
