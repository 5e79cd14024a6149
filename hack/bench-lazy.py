#!/usr/bin/env python3
"""ms2m benchmark, issue 3: restore to running with lazy pages (post-copy)
against an eager restore, as the container's memory grows.

  sudo hack/bench-lazy.py                          full run (5 runs per figure)
  BENCH_LAZY_RUNS=2 sudo hack/bench-lazy.py        quicker run

For each size N (memcounter --mib N) and variant:
  lazy     io.containerd.ms2m.v1, annotation io.ms2m.restore.lazy-pages=always
  eager    io.containerd.ms2m.v1, annotation io.ms2m.restore.lazy-pages=never
  runc-v2  io.containerd.runc.v2 (containerd's own shim; no lazy pages there)
one run is: `ctr run` the container, wait until its counter runs,
`ms2m checkpoint --exit --image-path /dev/shm/... ID`, then
`ms2m restore --json ID DIR`, whose `time_to_running_ms` (Tasks.Create +
Tasks.Start, as the CLI measured them) is the figure. The run is valid only
if the restored counter continues (>= the value read before the checkpoint)
and advances; a lazy run must also have restored only a few pages eagerly
(CRIU's stats-restore `pages_restored`), else lazy pages were not in effect.
The images of each run are deleted as soon as the run ends (1 GiB each).

Knobs (environment):
  BENCH_LAZY_RUNS=5                 runs per (size, variant)
  BENCH_LAZY_SIZES="256 512 1024"   MiB
  BENCH_LAZY_VARIANTS="lazy eager runc-v2"
  BENCH_LAZY_INTERVAL_MS=20         memcounter --interval-ms (resolution of time_to_progress)
  BENCH_SHM=/dev/shm/ms2m-bench     where the images go (tmpfs)
  BENCH_OUT=target/bench            results-lazy-<UTC time>.jsonl (+ .meta.json, logs)
  BENCH_STRICT=1                    exit 2 when a target is missed

Output (stdout): one JSON object per (figure, variant)
{"name","runtime","unit","median","min","max","runs",...}, then `target ...`
and `ratio ...` lines. Progress goes to stderr.
Exit status: 0 all runs valid, 1 some run invalid, 2 strict miss.
`bench-lazy.py --cleanup` removes what a run with the same BENCH_TOKEN left.
"""

import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
ADDRESS = os.environ.get("MS2M_CONTAINERD_ADDRESS", "/run/ms2m/containerd/containerd.sock")
NAMESPACE = os.environ.get("MS2M_NAMESPACE", "ms2m")
IMAGE = os.environ.get("MS2M_TEST_IMAGE", "docker.io/library/ms2m-test:latest")
CONTAINERD_LOG = "/var/log/ms2m/containerd.log"
TOKEN = os.environ.get("BENCH_TOKEN", "mbl%d" % os.getpid())
SHM = os.environ.get("BENCH_SHM", "/dev/shm/ms2m-bench")
SHM_RUN = os.path.join(SHM, TOKEN)
OUT = os.environ.get("BENCH_OUT", os.path.join(ROOT, "target", "bench"))
RUNS = int(os.environ.get("BENCH_LAZY_RUNS", "5"))
SIZES = [int(s) for s in os.environ.get("BENCH_LAZY_SIZES", "256 512 1024").split()]
VARIANTS = os.environ.get("BENCH_LAZY_VARIANTS", "lazy eager runc-v2").split()
INTERVAL_MS = int(os.environ.get("BENCH_LAZY_INTERVAL_MS", "20"))
STRICT = os.environ.get("BENCH_STRICT", "") == "1"

VARIANT_RUNTIME = {
    "lazy": ("io.containerd.ms2m.v1", "always"),
    "eager": ("io.containerd.ms2m.v1", "never"),
    "runc-v2": ("io.containerd.runc.v2", None),
}
LAZY_ANNOTATION = "io.ms2m.restore.lazy-pages"
WORKLOAD = "/usr/local/bin/memcounter"
WARM_TICKS = 5          # counter value reached before the checkpoint
TARGET_LAZY_256_S = 0.30
TARGET_FLAT_RATIO = 1.5  # "flat": lazy 1024 MiB / 256 MiB median; see docs/benchmarks-freeze-broker.md
LAZY_MAX_EAGER_PAGES_FRACTION = 0.05

CTR = ["ctr", "--address", ADDRESS, "--namespace", NAMESPACE]
MS2M = ["ms2m", "--address", ADDRESS, "--namespace", NAMESPACE]


class BenchError(Exception):
    pass


def log(msg):
    print("[bench-lazy %s] %s" % (time.strftime("%H:%M:%S"), msg), file=sys.stderr, flush=True)


def die(msg):
    print("error: %s" % msg, file=sys.stderr)
    sys.exit(1)


def run(cmd, timeout=180, check=True):
    t0 = time.monotonic()
    try:
        p = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        raise BenchError("timed out after %ds: %s" % (timeout, " ".join(cmd)))
    dt = time.monotonic() - t0
    if check and p.returncode != 0:
        raise BenchError("exit %d: %s: %s" % (p.returncode, " ".join(cmd),
                                              (p.stderr or p.stdout).strip()[-800:]))
    return p.stdout, p.stderr, dt


# ---------------------------------------------------------------- prerequisites
def prerequisites():
    if os.geteuid() != 0:
        die("hack/bench-lazy.py must run as root (containerd, runc and CRIU need it)")
    for binary, fix in [
        ("ctr", "run hack/setup.sh"),
        ("runc", "run hack/setup.sh"),
        ("criu", "run hack/setup.sh (builds CRIU 4.2.1)"),
        ("ms2m", "cargo build --release -p ms2m-cli && install -m755 target/release/ms2m /usr/local/bin/"),
    ]:
        if not shutil.which(binary):
            die("%s not on PATH: %s" % (binary, fix))
    if any(VARIANT_RUNTIME[v][0] == "io.containerd.ms2m.v1" for v in VARIANTS) \
            and not shutil.which("containerd-shim-ms2m-v1"):
        die("containerd-shim-ms2m-v1 not on PATH: cargo build --release -p ms2m-shim && "
            "install -m755 target/release/containerd-shim-ms2m-v1 /usr/local/bin/")
    if "runc-v2" in VARIANTS and not shutil.which("containerd-shim-runc-v2"):
        die("containerd-shim-runc-v2 not on PATH: run hack/setup.sh (or BENCH_LAZY_VARIANTS='lazy eager')")
    for v in VARIANTS:
        if v not in VARIANT_RUNTIME:
            die("unknown variant %r in BENCH_LAZY_VARIANTS (lazy, eager, runc-v2)" % v)
    out, _, _ = run(["criu", "--version"], check=False)
    m = re.search(r"Version:\s*(\d+)\.(\d+)", out)
    if not m or (int(m.group(1)), int(m.group(2))) < (4, 2):
        die("criu >= 4.2 needed on this kernel (found %r): run hack/setup.sh" % out.strip())
    if not os.path.isdir(os.path.dirname(SHM.rstrip("/")) or "/"):
        die("%s does not exist (images go to tmpfs)" % os.path.dirname(SHM))
    # Memory: the largest size lives twice at the peak (container + images).
    need_kib = max(SIZES) * 1024 * 2 + 512 * 1024
    with open("/proc/meminfo") as f:
        avail = next((int(l.split()[1]) for l in f if l.startswith("MemAvailable:")), 0)
    if avail and avail < need_kib:
        die("MemAvailable %d MiB < %d MiB needed for %d MiB containers plus their images on tmpfs "
            "(lower BENCH_LAZY_SIZES)" % (avail // 1024, need_kib // 1024, max(SIZES)))
    try:
        run([os.path.join(HERE, "start-containerd.sh")], timeout=120)
    except BenchError as e:
        die("could not start ms2m's containerd (%s): see %s" % (e, CONTAINERD_LOG))
    out, _, _ = run(CTR + ["images", "ls", "-q"], check=False)
    if IMAGE not in out.split():
        die("test image %s not in ms2m's containerd: run hack/build-image.sh" % IMAGE)


# ---------------------------------------------------------------- containerd helpers
def task(cid):
    out, _, _ = run(CTR + ["task", "ls"], check=False)
    for line in out.splitlines()[1:]:
        f = line.split()
        if len(f) >= 3 and f[0] == cid:
            return int(f[1]), f[2]
    return None


def read_counter(pid):
    try:
        with open("/proc/%d/root/tmp/counter" % pid) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def wait_counter(cid, at_least, timeout=60.0):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        t = task(cid)
        if t and t[1] == "RUNNING" and t[0] > 0:
            last = read_counter(t[0])
            if last is not None and last >= at_least:
                return t[0], last
        time.sleep(0.05)
    raise BenchError("%s: counter did not reach %d within %.0fs (task %s, counter %s)"
                     % (cid, at_least, timeout, task(cid), last))


def remove_container(cid):
    run(CTR + ["task", "rm", "-f", cid], check=False, timeout=60)
    run(CTR + ["containers", "rm", cid], check=False, timeout=60)


def lazy_served_ms(cid, since_offset, timeout=30.0):
    """elapsed_ms of the shim's "lazy-pages daemon has served all pages"
    line for cid, from containerd's log (the shim logs through it)."""
    pat = re.compile(r"lazy-pages daemon (has served all pages and exited|ended abnormally).*id=\"?%s\"?\b.*elapsed_ms=(\d+)"
                     % re.escape(cid))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(CONTAINERD_LOG, "rb") as f:
                f.seek(since_offset)
                text = f.read().decode(errors="replace")
        except OSError:
            return None, "no %s" % CONTAINERD_LOG
        for line in text.splitlines():
            m = pat.search(line)
            if m:
                if m.group(1).startswith("ended"):
                    return None, "lazy-pages daemon ended abnormally: " + line.strip()[-300:]
                return int(m.group(2)), None
        time.sleep(0.1)
    return None, "no 'served all pages' line within %.0fs" % timeout


# ---------------------------------------------------------------- measurement
class Results:
    def __init__(self):
        self.values = {}
        self.units = {}
        self.invalid = {}

    def add(self, name, variant, unit, v):
        self.values.setdefault((name, variant), []).append(v)
        self.units[name] = unit

    def fail(self, name, variant, unit, msg):
        self.units.setdefault(name, unit)
        self.values.setdefault((name, variant), [])
        self.invalid.setdefault((name, variant), []).append(msg)


R = Results()


def measure(variant, mib, run_no, logdir):
    rt, lazy = VARIANT_RUNTIME[variant]
    name = "restore_to_running_ms_%dmib" % mib
    cid = "%s-%s-%d-%d" % (TOKEN, variant, mib, run_no)
    d = os.path.join(SHM_RUN, cid)
    img = os.path.join(d, "img")
    try:
        cmd = CTR + ["run", "-d", "--runtime", rt]
        if lazy:
            cmd += ["--annotation", "%s=%s" % (LAZY_ANNOTATION, lazy)]
        cmd += [IMAGE, cid, WORKLOAD, "--mib", str(mib), "--interval-ms", str(INTERVAL_MS)]
        run(cmd)
        pid, _ = wait_counter(cid, WARM_TICKS)
        before = read_counter(pid)
        out, err, _ = run(MS2M + ["checkpoint", "--exit", "--json", "--image-path", img, cid])
        ck = json.loads(out)
        st = ck.get("stats") or {}
        pages_written = st.get("pages_written")
        if st.get("frozen_time_us") is not None:
            R.add("exit_frozen_ms_%dmib" % mib, variant, "ms", st["frozen_time_us"] / 1000.0)
        R.add("exit_checkpoint_ms_%dmib" % mib, variant, "ms", round(ck.get("total_ms", 0.0), 2))
        log_off = os.path.getsize(CONTAINERD_LOG) if os.path.exists(CONTAINERD_LOG) else 0
        t0 = time.monotonic()
        out, err, wall = run(MS2M + ["restore", "--json", "--work-path", os.path.join(d, "restore-work"),
                                     cid, img])
        rs = json.loads(out)
        # Progress: the first new counter value written by the restored task.
        rpid = rs.get("pid") or 0
        first = None
        deadline = time.monotonic() + 20
        progress_ms = None
        while time.monotonic() < deadline:
            v = read_counter(rpid)
            if v is not None and first is None:
                first = v
            if v is not None and first is not None and v != first:
                progress_ms = (time.monotonic() - t0) * 1000.0
                break
            time.sleep(0.002)
        with open(os.path.join(logdir, "%s.json" % cid), "w") as f:
            json.dump({"checkpoint": ck, "restore": rs}, f, indent=1)
        if progress_ms is None:
            raise BenchError("restored counter did not advance within 20 s (pid %s, value %s)" % (rpid, first))
        _, after = wait_counter(cid, (before or 0) + 1, timeout=10)
        if before is None or after <= before:
            raise BenchError("counter did not continue: before checkpoint %s, after restore %s" % (before, after))
        if first is not None and before is not None and first < before:
            raise BenchError("restored counter %d is below the checkpointed %d: not a restore" % (first, before))
        rstats = rs.get("restore_stats") or {}
        restored_pages = rstats.get("pages_restored")
        if variant == "lazy":
            if restored_pages is None or not pages_written:
                raise BenchError("cannot tell whether lazy pages were in effect (pages_restored %s, pages_written %s)"
                                 % (restored_pages, pages_written))
            if restored_pages > LAZY_MAX_EAGER_PAGES_FRACTION * pages_written:
                raise BenchError("lazy pages not in effect: %d of %d pages restored eagerly"
                                 % (restored_pages, pages_written))
            served, why = lazy_served_ms(cid, log_off)
            if served is None:
                raise BenchError("lazy pages: " + why)
            R.add("lazy_all_pages_served_ms_%dmib" % mib, variant, "ms", served)
        R.add(name, variant, "ms", round(rs["time_to_running_ms"], 2))
        R.add("restore_cli_wall_ms_%dmib" % mib, variant, "ms", round(wall * 1000.0, 2))
        R.add("restore_to_progress_ms_%dmib" % mib, variant, "ms", round(progress_ms, 2))
        if restored_pages is not None:
            R.add("pages_restored_eagerly_%dmib" % mib, variant, "pages", restored_pages)
        log("%-7s %4d MiB run %d: running %.1f ms (create %.1f, start %.1f), progress %.1f ms, "
            "pages restored %s of %s, counter %s -> %s"
            % (variant, mib, run_no, rs["time_to_running_ms"], rs.get("create_ms", 0), rs.get("start_ms", 0),
               progress_ms, restored_pages, pages_written, before, after))
    except (BenchError, ValueError, KeyError) as e:
        log("%-7s %4d MiB run %d: INVALID: %s" % (variant, mib, run_no, e))
        R.fail(name, variant, "ms", "run %d: %s" % (run_no, e))
    finally:
        remove_container(cid)
        shutil.rmtree(d, ignore_errors=True)


# ---------------------------------------------------------------- report
def summary(name, variant):
    vals = R.values.get((name, variant), [])
    obj = {"name": name, "runtime": variant, "unit": R.units.get(name, ""),
           "median": None, "min": None, "max": None, "runs": len(vals)}
    if vals:
        obj.update(median=round(statistics.median(vals), 4), min=min(vals), max=max(vals))
    obj["values"] = vals
    bad = R.invalid.get((name, variant), [])
    if bad:
        obj["invalid_runs"] = len(bad)
        obj["errors"] = bad
    return obj


def report(stamp, meta):
    os.makedirs(OUT, exist_ok=True)
    lines, checks = [], []
    miss = False
    bases = ["restore_to_running_ms", "restore_to_progress_ms", "restore_cli_wall_ms",
             "lazy_all_pages_served_ms", "pages_restored_eagerly", "exit_checkpoint_ms", "exit_frozen_ms"]
    for base in bases:
        for mib in SIZES:
            name = "%s_%dmib" % (base, mib)
            for v in VARIANTS:
                if (name, v) in R.values:
                    lines.append(json.dumps(summary(name, v)))

    def med(name, v):
        return summary(name, v)["median"]

    if "lazy" in VARIANTS and 256 in SIZES:
        m = med("restore_to_running_ms_256mib", "lazy")
        if m is None:
            checks.append("target restore_to_running_ms_256mib lazy: n/a (target <= %.0f ms) MISS"
                          % (TARGET_LAZY_256_S * 1000))
            miss = True
        else:
            ok = m <= TARGET_LAZY_256_S * 1000
            miss |= not ok
            checks.append("target restore_to_running_ms_256mib lazy: %.1f ms (target <= %.0f ms) %s"
                          % (m, TARGET_LAZY_256_S * 1000, "OK" if ok else "MISS"))
    if "lazy" in VARIANTS and len(SIZES) > 1:
        lo, hi = min(SIZES), max(SIZES)
        a, b = med("restore_to_running_ms_%dmib" % hi, "lazy"), med("restore_to_running_ms_%dmib" % lo, "lazy")
        if a is None or not b:
            checks.append("target lazy_flatness restore_to_running %d/%d MiB: n/a (target <= %.2f) MISS"
                          % (hi, lo, TARGET_FLAT_RATIO))
            miss = True
        else:
            ok = a / b <= TARGET_FLAT_RATIO
            miss |= not ok
            checks.append("target lazy_flatness restore_to_running %d/%d MiB: %.2f (target <= %.2f) %s"
                          % (hi, lo, a / b, TARGET_FLAT_RATIO, "OK" if ok else "MISS"))
            mins = [summary("restore_to_running_ms_%dmib" % x, "lazy")["min"]
                    for x in (hi, lo)]
            if mins[0] is not None and mins[1]:
                checks.append("ratio lazy restore_to_running %d/%d MiB of the minima: %.2f (info: least disturbed runs)"
                              % (hi, lo, mins[0] / mins[1]))
        for v in VARIANTS:
            if v == "lazy":
                continue
            a, b = med("restore_to_running_ms_%dmib" % hi, v), med("restore_to_running_ms_%dmib" % lo, v)
            if a is not None and b:
                checks.append("ratio restore_to_running %d/%d MiB %s: %.2f (info)" % (hi, lo, v, a / b))
    for mib in SIZES:
        for other in ("eager", "runc-v2"):
            if "lazy" in VARIANTS and other in VARIANTS:
                a, b = med("restore_to_running_ms_%dmib" % mib, "lazy"), med("restore_to_running_ms_%dmib" % mib, other)
                if a is not None and b:
                    checks.append("ratio restore_to_running_ms_%dmib: lazy/%s = %.2f (info)" % (mib, other, a / b))
        if "eager" in VARIANTS and "runc-v2" in VARIANTS:
            a, b = med("restore_to_running_ms_%dmib" % mib, "eager"), med("restore_to_running_ms_%dmib" % mib, "runc-v2")
            if a is not None and b:
                checks.append("ratio restore_to_running_ms_%dmib: eager/runc-v2 = %.2f (info)" % (mib, a / b))
    path = os.path.join(OUT, "results-lazy-%s.jsonl" % stamp)
    with open(path, "w") as f:
        for line in lines:
            f.write(line + "\n")
    with open(os.path.join(OUT, "results-lazy-%s.ratios.txt" % stamp), "w") as f:
        f.write("\n".join(checks) + "\n")
    with open(os.path.join(OUT, "results-lazy-%s.meta.json" % stamp), "w") as f:
        json.dump(meta, f, indent=2)
    for line in lines + checks:
        print(line)
    print("results: %s" % path)
    invalid = sum(len(v) for v in R.invalid.values())
    if invalid:
        print("invalid or failed runs: %d (see \"errors\" in the JSON lines)" % invalid)
    sys.stdout.flush()
    return invalid, miss


def meta_info(stamp):
    def ver(cmd):
        out, err, _ = run(cmd, check=False, timeout=10)
        t = (out or err).strip()
        return t.splitlines()[0] if t else ""
    bins = {}
    for b in ("containerd-shim-ms2m-v1", "containerd-shim-runc-v2", "ms2m"):
        p = shutil.which(b)
        bins[b] = {"path": p, "mtime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(os.path.getmtime(p))) if p else None}
    return {"started_utc": stamp, "runs": RUNS, "sizes_mib": SIZES, "variants": VARIANTS,
            "interval_ms": INTERVAL_MS, "kernel": os.uname().release, "nproc": os.cpu_count(),
            "loadavg_start": open("/proc/loadavg").read().strip(),
            "criu": ver(["criu", "--version"]), "runc": ver(["runc", "--version"]),
            "containerd": ver(["containerd", "--version"]), "binaries": bins,
            "git_head": ver(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"])}


def cleanup():
    out, _, _ = run(CTR + ["containers", "ls", "-q"], check=False)
    for cid in out.split():
        if cid.startswith(TOKEN + "-"):
            remove_container(cid)
    shutil.rmtree(SHM_RUN, ignore_errors=True)
    try:
        os.rmdir(SHM)
    except OSError:
        pass


def on_term(signum, frame):
    raise KeyboardInterrupt("signal %d" % signum)


def main():
    if sys.argv[1:] == ["--cleanup"]:
        cleanup()
        return 0
    prerequisites()
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    logdir = os.path.join(OUT, "logs-lazy-%s" % stamp)
    os.makedirs(logdir, exist_ok=True)
    os.makedirs(SHM_RUN, exist_ok=True)
    meta = meta_info(stamp)
    log("runs=%d sizes=%s variants=%s token=%s" % (RUNS, SIZES, VARIANTS, TOKEN))
    t_begin = time.monotonic()
    try:
        for run_no in range(1, RUNS + 1):
            order = VARIANTS if run_no % 2 else list(reversed(VARIANTS))
            for mib in SIZES:
                for v in order:
                    measure(v, mib, run_no, logdir)
    except KeyboardInterrupt as e:
        log("interrupted (%s): cleaning up" % (str(e) or "SIGINT"))
        cleanup()
        return 130
    finally:
        cleanup()
    meta["duration_s"] = round(time.monotonic() - t_begin, 1)
    end = meta_info(stamp)["binaries"]
    if end != meta["binaries"]:
        log("WARNING: a shim or CLI binary changed during the run: %s -> %s" % (meta["binaries"], end))
        meta["binaries_changed_during_run"] = end
    meta["loadavg_end"] = open("/proc/loadavg").read().strip()
    meta["logs"] = logdir
    invalid, miss = report(stamp, meta)
    if invalid:
        return 1
    if miss and STRICT:
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
