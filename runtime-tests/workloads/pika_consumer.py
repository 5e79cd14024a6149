#!/usr/bin/env python3
"""pika_consumer.py: ms2m's third-party-client test workload.

The same behaviour as ms2m's `amqp-consumer` (Rust, lapin), written with a
client that is not ms2m's: Python's pika (Debian's python3-pika,
BlockingConnection). It knows nothing about ms2m.

It consumes numbered messages ({"seq":N,"sent_at_us":T}) from a classic queue
or a RabbitMQ stream. Its state is the running 64-bit FNV-1a digest over the
sequence numbers it processed (each seq as 8 little-endian bytes), the count
and the last seq. For each delivery it computes the new state, publishes a
result {"consumer","seq","count","digest","processed_at_us","sent_at_us"} to
the results queue with publisher confirms (basic_publish blocks until the
broker confirms), then commits the state and acks the delivery.

The state is kept in /tmp/consumer-state (replaced atomically). On connection
loss it reconnects with backoff (100 ms doubling to 1 s) and consumes again
with the configured offset, keeping its in-memory state.

Configuration (arguments --name value, or the environment): AMQP_URL
(default amqp://guest:guest@localhost:5672/%2f), QUEUE (required), QUEUE_TYPE
classic|stream, STREAM_OFFSET (next|first|last|N, default next), PREFETCH
(default 50), RESULTS_QUEUE (default <QUEUE>.results), CONSUMER_NAME (default
the hostname), STATE_FILE (default /tmp/consumer-state), WORK_US (default 0):
simulated work, the consumer sleeps that many microseconds per message after
computing its new state and before publishing the result (so processed_at_us
is taken after the work).

In ms2m's test image (busybox) it runs with the host's /usr bind-mounted:
  ctr run --mount type=bind,src=/usr,dst=/usr,options=rbind:ro ... \
      /usr/bin/python3 /opt/ms2m/pika_consumer.py
"""

import json
import os
import signal
import socket
import sys
import time

import pika
import pika.exceptions

FNV_OFFSET = 0xCBF29CE484222325
FNV_PRIME = 0x100000001B3
MASK = (1 << 64) - 1

KNOWN = ("AMQP_URL", "QUEUE", "QUEUE_TYPE", "STREAM_OFFSET", "PREFETCH",
         "RESULTS_QUEUE", "CONSUMER_NAME", "STATE_FILE", "WORK_US")


def now_us():
    return time.time_ns() // 1000


def log(msg):
    print("%d pika-consumer: %s" % (now_us(), msg), flush=True)


def load_config(argv):
    given = {}
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in ("-h", "--help"):
            print(__doc__)
            sys.exit(0)
        if not a.startswith("--"):
            sys.exit("pika_consumer: unexpected argument %r" % a)
        name = a[2:]
        if "=" in name:
            name, value = name.split("=", 1)
        else:
            i += 1
            if i >= len(argv):
                sys.exit("pika_consumer: --%s needs a value" % name)
            value = argv[i]
        key = name.replace("-", "_").upper()
        if key not in KNOWN:
            sys.exit("pika_consumer: unknown option --%s" % name)
        given[key] = value
        i += 1

    def get(key, default=None):
        v = given.get(key) or os.environ.get(key)
        return v if v else default

    queue = get("QUEUE")
    if not queue:
        sys.exit("pika_consumer: QUEUE is not set")
    qtype = get("QUEUE_TYPE", "classic")
    if qtype not in ("classic", "stream"):
        sys.exit("pika_consumer: QUEUE_TYPE must be classic or stream, not %r" % qtype)
    offset = get("STREAM_OFFSET", "next")
    if offset not in ("next", "first", "last"):
        try:
            offset = int(offset)
        except ValueError:
            sys.exit("pika_consumer: STREAM_OFFSET must be next, first, last or a number")
    try:
        prefetch = int(get("PREFETCH", "50"))
    except ValueError:
        sys.exit("pika_consumer: PREFETCH must be a number")
    try:
        work_us = int(get("WORK_US", "0"))
    except ValueError:
        sys.exit("pika_consumer: WORK_US must be a number of microseconds")
    if work_us < 0:
        sys.exit("pika_consumer: WORK_US must not be negative")
    return {
        "url": get("AMQP_URL", "amqp://guest:guest@localhost:5672/%2f"),
        "queue": queue,
        "type": qtype,
        "offset": offset,
        "prefetch": prefetch,
        "results": get("RESULTS_QUEUE", queue + ".results"),
        "name": get("CONSUMER_NAME", socket.gethostname() or "pika-consumer"),
        "state_file": get("STATE_FILE", "/tmp/consumer-state"),
        "work_us": work_us,
    }


class State:
    def __init__(self):
        self.count = 0
        self.last_seq = 0
        self.digest = FNV_OFFSET
        self.connects = 0

    def after(self, seq):
        d = self.digest
        for b in seq.to_bytes(8, "little"):
            d = ((d ^ b) * FNV_PRIME) & MASK
        n = State()
        n.count, n.last_seq, n.digest, n.connects = self.count + 1, seq, d, self.connects
        return n

    def to_json(self, name):
        return json.dumps({
            "consumer": name, "count": self.count, "last_seq": self.last_seq,
            "digest": "%016x" % self.digest, "connects": self.connects,
            "updated_at_us": now_us(),
        }, separators=(",", ":"))


def parse_message(body):
    try:
        v = json.loads(body)
    except ValueError:
        text = body.decode("utf-8", "replace").strip()
        if text.startswith("seq="):
            text = text[4:]
        try:
            return int(text), None
        except ValueError:
            return None
    if isinstance(v, dict) and isinstance(v.get("seq"), int):
        return v["seq"], v.get("sent_at_us")
    if isinstance(v, int):
        return v, None
    return None


def redact(url):
    s = url.find("://")
    at = url.rfind("@")
    if s >= 0 and at > s:
        user = url[s + 3:at].split(":")[0]
        return url[:s + 3] + user + ":***" + url[at:]
    return url


class Stop(Exception):
    pass


class Consumer:
    def __init__(self, cfg):
        self.cfg = cfg
        self.state = State()

    def persist(self):
        path = self.cfg["state_file"]
        tmp = path + ".tmp"
        try:
            with open(tmp, "w") as f:
                f.write(self.state.to_json(self.cfg["name"]) + "\n")
            os.replace(tmp, path)
        except OSError as e:
            log("cannot write %s: %s" % (path, e))

    def session(self):
        cfg = self.cfg
        params = pika.URLParameters(cfg["url"])
        params.client_properties = {"connection_name": "pika-consumer " + cfg["name"]}
        conn = pika.BlockingConnection(params)
        try:
            ch = conn.channel()
            pub = conn.channel()
            qargs = {"x-queue-type": "stream"} if cfg["type"] == "stream" else None
            ch.queue_declare(cfg["queue"], durable=True, arguments=qargs)
            pub.queue_declare(cfg["results"], durable=True)
            pub.confirm_delivery()
            ch.basic_qos(prefetch_count=cfg["prefetch"])
            cargs = {"x-stream-offset": cfg["offset"]} if cfg["type"] == "stream" else None
            first = [True]

            def on_message(channel, method, props, body):
                parsed = parse_message(body)
                if parsed is None:
                    log("dropping a message that is not a numbered message (%d bytes)" % len(body))
                    channel.basic_ack(method.delivery_tag)
                    return
                seq, sent_at_us = parsed
                if first[0]:
                    first[0] = False
                    offset = (props.headers or {}).get("x-stream-offset")
                    log("first delivery on this connection: seq=%d redelivered=%s offset=%s"
                        % (seq, method.redelivered, offset))
                nxt = self.state.after(seq)
                if cfg["work_us"]:
                    time.sleep(cfg["work_us"] / 1e6)
                result = json.dumps({
                    "consumer": cfg["name"], "seq": seq, "count": nxt.count,
                    "digest": "%016x" % nxt.digest, "processed_at_us": now_us(),
                    "sent_at_us": sent_at_us,
                }, separators=(",", ":"))
                # With confirm_delivery, basic_publish returns once the broker
                # confirmed and raises on a nack.
                pub.basic_publish("", cfg["results"], result.encode(),
                                  pika.BasicProperties(delivery_mode=2,
                                                       content_type="application/json"))
                self.state = nxt
                self.persist()
                channel.basic_ack(method.delivery_tag)

            ch.basic_consume(cfg["queue"], on_message, arguments=cargs,
                             consumer_tag="pika-consumer-" + cfg["name"])
            self.state.connects += 1
            self.persist()
            log("consuming %s (%s%s, prefetch %d), results to %s, connection #%d, "
                "state count=%d last_seq=%d"
                % (cfg["queue"], cfg["type"],
                   ", offset %s" % cfg["offset"] if cfg["type"] == "stream" else "",
                   cfg["prefetch"], cfg["results"], self.state.connects,
                   self.state.count, self.state.last_seq))
            ch.start_consuming()
            return "the consumer was cancelled"
        finally:
            try:
                if conn.is_open:
                    conn.close()
            except Exception:  # noqa: BLE001 - closing a broken connection
                pass

    def run(self):
        cfg = self.cfg
        log("starting: %s queue=%s type=%s results=%s name=%s state=%s pika=%s"
            % (redact(cfg["url"]), cfg["queue"], cfg["type"], cfg["results"],
               cfg["name"], cfg["state_file"], pika.__version__))
        self.persist()
        backoff = 0.1
        while True:
            connects = self.state.connects
            try:
                why = self.session()
                log("connection lost: %s" % why)
            except Stop:
                log("exiting with count=%d last_seq=%d" % (self.state.count, self.state.last_seq))
                return 0
            except (pika.exceptions.AMQPError, OSError) as e:
                log("connection lost: %s: %s" % (type(e).__name__, e))
            if self.state.connects > connects:
                backoff = 0.1
            log("reconnecting in %d ms" % (backoff * 1000))
            time.sleep(backoff)
            backoff = min(backoff * 2, 1.0)


def main():
    cfg = load_config(sys.argv[1:])

    def on_signal(signum, _frame):
        raise Stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        return Consumer(cfg).run()
    except Stop:
        return 0


if __name__ == "__main__":
    sys.exit(main())
