#!/usr/bin/env python3
"""ms2m benchmark driver (stdlib only). Called by hack/bench.sh, which checks
the prerequisites and sets the BENCH_* environment; see bench.sh for the knobs.

Measures, for containerd-shim-ms2m-v1 and containerd-shim-runc-v2 on the same
containerd, interleaved run by run:
  frozen_ms_<N>mib, freezing_ms, memdump_ms, memwrite_ms, pages_written:
      CRIU's dump statistics (stats-dump in the work path) of a leave-running
      `ctr task checkpoint --image-path --work-path`
  checkpoint_wall_s_<N>mib: wall time of that ctr command
  stop_and_copy_ctr_s_<N>mib: `ctr c checkpoint --task` + `ctr t kill` + wait
      + `ctr t delete` + `ctr c restore --live NEWID`, until the new task runs
  stop_and_copy_cli_s_<N>mib: `ms2m checkpoint --exit --image-path` +
      `ms2m restore`, until the task runs
  shim_rss_mib: VmRSS of the shim serving one idle container
Every restore is checked: the restored counter must continue (>= the value
read before the checkpoint) and advance, or the run is invalid.

`bench.py --cleanup` removes whatever a run with the same BENCH_TOKEN left.
"""

import json
import os
import re
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone

ADDRESS = os.environ.get("MS2M_CONTAINERD_ADDRESS", "/run/ms2m/containerd/containerd.sock")
NAMESPACE = os.environ.get("MS2M_NAMESPACE", "ms2m")
IMAGE = os.environ.get("MS2M_TEST_IMAGE", "docker.io/library/ms2m-test:latest")
TOKEN = os.environ.get("BENCH_TOKEN", "msb%d" % os.getpid())
SHM = os.environ.get("BENCH_SHM", "/dev/shm/ms2m-bench")
SHM_RUN = os.path.join(SHM, TOKEN)
OUT = os.environ.get("BENCH_OUT", "target/bench")
RUNS = int(os.environ.get("BENCH_RUNS", "5"))
SIZES = [int(s) for s in os.environ.get("BENCH_SIZES", "16 256").split()]
RUNTIMES = os.environ.get("BENCH_RUNTIMES", "ms2m runc-v2").split()
FIGURES = os.environ.get("BENCH_FIGURES", "leave ctr cli rss").split()
STRICT = os.environ.get("BENCH_STRICT", "") == "1"

RUNTIME_TYPES = {
    "ms2m": ("io.containerd.ms2m.v1", "containerd-shim-ms2m-v1"),
    "runc-v2": ("io.containerd.runc.v2", "containerd-shim-runc-v2"),
    # An earlier ms2m build, to compare before/after a change in one run:
    # install it as containerd-shim-ms2mbefore-v1 on PATH and add
    # "ms2m-before" to BENCH_RUNTIMES.
    "ms2m-before": ("io.containerd.ms2mbefore.v1", "containerd-shim-ms2mbefore-v1"),
}
WORKLOAD = "/usr/local/bin/memcounter"
CKPT_REF_PREFIX = "ms2m-bench/" + TOKEN + "/"
WARM_COUNTER = 10  # counter value (x100 ms) a container reaches before it is measured
RSS_SAMPLE_AFTER_S = 3.0
SHIM_RSS_TARGET_MIB = 10.0

CTR = ["ctr", "--address", ADDRESS, "--namespace", NAMESPACE]
MS2M = ["ms2m", "--address", ADDRESS, "--namespace", NAMESPACE]


class BenchError(Exception):
    pass


def log(msg):
    print("[bench %s] %s" % (time.strftime("%H:%M:%S"), msg), file=sys.stderr, flush=True)


def run(cmd, timeout=120, check=True):
    """Runs cmd, returns (stdout, stderr, seconds). Raises BenchError with the
    command and its stderr when it fails and check is set."""
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


# ---------------------------------------------------------------- containerd
def tasks():
    """{id: (pid, status)} from `ctr task ls`."""
    out, _, _ = run(CTR + ["task", "ls"])
    res = {}
    for line in out.splitlines()[1:]:
        f = line.split()
        if len(f) >= 3:
            res[f[0]] = (int(f[1]), f[2])
    return res


def task(cid):
    return tasks().get(cid)


def list_images():
    out, _, _ = run(CTR + ["images", "ls", "-q"], check=False)
    return out.split()


def containers():
    out, _, _ = run(CTR + ["containers", "ls"])
    res = {}
    for line in out.splitlines()[1:]:
        f = line.split()
        if len(f) >= 3:
            res[f[0]] = f[2]
        elif f:
            res[f[0]] = ""
    return res


def read_counter(pid):
    try:
        with open("/proc/%d/root/tmp/counter" % pid) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def wait_counter(cid, at_least, timeout=20.0):
    """Waits until the task of cid runs and its counter is >= at_least.
    Returns (pid, value)."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        t = task(cid)
        if t and t[1] == "RUNNING" and t[0] > 0:
            v = read_counter(t[0])
            last = v
            if v is not None and v >= at_least:
                return t[0], v
        time.sleep(0.1)
    raise BenchError("%s: counter did not reach %d within %.0fs (task %s, counter %s)"
                     % (cid, at_least, timeout, task(cid), last))


def wait_advancing(cid, timeout=10.0):
    """Waits until the task of cid has a counter file that changes. Returns
    (pid, first value seen, later value)."""
    deadline = time.monotonic() + timeout
    first = None
    pid = None
    while time.monotonic() < deadline:
        t = task(cid)
        if t and t[1] == "RUNNING":
            if pid != t[0]:
                pid, first = t[0], None
            v = read_counter(pid)
            if v is not None:
                if first is None:
                    first = v
                elif v != first:
                    return pid, first, v
        time.sleep(0.05)
    raise BenchError("%s: counter not advancing within %.0fs (task %s, first value %s)"
                     % (cid, timeout, task(cid), first))


def start_container(cid, runtime, mib):
    rt_type = RUNTIME_TYPES[runtime][0]
    run(CTR + ["run", "-d", "--runtime", rt_type, IMAGE, cid, WORKLOAD, "--mib", str(mib)])
    t0 = time.monotonic()
    pid, v = wait_counter(cid, WARM_COUNTER)
    return pid, t0


def wait_stopped(cid, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        t = task(cid)
        if t is None or t[1] == "STOPPED":
            return
        time.sleep(0.01)
    raise BenchError("%s: task did not stop within %.0fs (%s)" % (cid, timeout, task(cid)))


def wait_running(cid, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        t = task(cid)
        if t and t[1] == "RUNNING":
            return
        if t and t[1] == "STOPPED":
            raise BenchError("%s: restored task is STOPPED" % cid)
        time.sleep(0.01)
    raise BenchError("%s: task not RUNNING within %.0fs (%s)" % (cid, timeout, task(cid)))


def remove_container(cid):
    run(CTR + ["task", "rm", "-f", cid], check=False, timeout=60)
    run(CTR + ["containers", "rm", cid], check=False, timeout=60)


def shim_pid(cid, shim_name):
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open("/proc/%s/cmdline" % d, "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        argv = [a.decode(errors="replace") for a in argv if a]
        if not argv or os.path.basename(argv[0]) != shim_name:
            continue
        for i, a in enumerate(argv[:-1]):
            if a in ("-id", "--id") and argv[i + 1] == cid:
                return int(d)
    return None


def vm_rss_kib(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise BenchError("no VmRSS in /proc/%d/status" % pid)


class Events:
    """Collects containerd's task events (`ctr events`) for the whole run, so
    the pause window around a checkpoint can be read from the /tasks/paused and
    /tasks/resumed events' timestamps."""

    def __init__(self):
        self.lock = threading.Lock()
        self.by_cid = {}  # cid -> [(topic, epoch seconds)]
        self.raw = []     # the bench's own events, as ctr printed them
        self.proc = subprocess.Popen(["ctr", "--address", ADDRESS, "events"], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        for line in self.proc.stdout:
            if TOKEN in line:
                with self.lock:
                    self.raw.append(line)
            # 2026-11-28 01:52:52.145299663 +0000 UTC ms2m /tasks/paused {"container_id":"x"}
            f = line.rstrip("\n").split(" ", 6)
            if len(f) < 7 or f[4] != NAMESPACE or not f[5].startswith("/tasks/"):
                continue
            try:
                cid = json.loads(f[6]).get("container_id")
                hms, _, frac = f[1].partition(".")
                t = datetime.strptime(f[0] + " " + hms, "%Y-%m-%d %H:%M:%S").replace(
                    tzinfo=timezone.utc).timestamp() + float("0." + (frac or "0"))
            except (ValueError, AttributeError):
                continue
            with self.lock:
                self.by_cid.setdefault(cid, []).append((f[5], t))

    def pause_window(self, cid, timeout=2.0):
        """Seconds between the first /tasks/paused and the next /tasks/resumed
        event of cid, or None if they did not both arrive."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                ev = list(self.by_cid.get(cid, []))
            paused = [t for topic, t in ev if topic == "/tasks/paused"]
            if paused:
                resumed = [t for topic, t in ev if topic == "/tasks/resumed" and t >= paused[0]]
                if resumed:
                    return resumed[0] - paused[0]
            time.sleep(0.05)
        return None

    def stop(self, save_to=None):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        if save_to:
            with self.lock, open(save_to, "w") as f:
                f.writelines(self.raw)


EVENTS = [None]


# ---------------------------------------------------------------- CRIU files
STATS_MAGIC = (0x55105940, 0x57093306)
DUMP_STATS_FIELDS = {1: "freezing_time_us", 2: "frozen_time_us", 3: "memdump_time_us",
                     4: "memwrite_time_us", 5: "pages_scanned", 6: "pages_skipped_parent",
                     7: "pages_written", 8: "irmap_resolve_us", 9: "pages_lazy",
                     10: "page_pipes", 11: "page_pipe_bufs"}


def _varint(buf, i):
    shift = val = 0
    while True:
        if i >= len(buf):
            raise BenchError("truncated varint in stats-dump")
        b = buf[i]
        i += 1
        val |= (b & 0x7F) << shift
        if not b & 0x80:
            return val, i
        shift += 7


def _fields(buf):
    """Decodes a protobuf message into {field number: [values]} (varint and
    length-delimited only, which is all stats_entry uses; others skipped)."""
    i, out = 0, {}
    while i < len(buf):
        key, i = _varint(buf, i)
        num, wt = key >> 3, key & 7
        if wt == 0:
            v, i = _varint(buf, i)
        elif wt == 2:
            n, i = _varint(buf, i)
            v, i = buf[i:i + n], i + n
        elif wt == 1:
            v, i = buf[i:i + 8], i + 8
        elif wt == 5:
            v, i = buf[i:i + 4], i + 4
        else:
            raise BenchError("unsupported protobuf wire type %d in stats-dump" % wt)
        out.setdefault(num, []).append(v)
    return out


def read_dump_stats(path):
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 12:
        raise BenchError("%s: %d bytes, too short for a CRIU stats file" % (path, len(data)))
    m0, m1, n = struct.unpack_from("<III", data, 0)
    if (m0, m1) != STATS_MAGIC:
        raise BenchError("%s: bad magic %#x %#x" % (path, m0, m1))
    entry = _fields(data[12:12 + n])
    if 1 not in entry:
        raise BenchError("%s: no dump entry in stats file" % path)
    dump = _fields(entry[1][0])
    return {name: dump[num][0] for num, name in DUMP_STATS_FIELDS.items() if num in dump}


def find_file(name, *dirs):
    for d in dirs:
        p = os.path.join(d, name)
        if os.path.isfile(p):
            return p
    return None


# Markers in CRIU's dump.log, in order, that split the frozen window into phases.
PROFILE_MARKERS = [
    ("frozen", ("freezer.state=FROZEN", "Freezing tasks", "freezing cgroup")),
    ("pages", ("Dumping pages",)),
    ("core", ("Dumping core",)),
    ("mounts", ("mnt: Dumping mountpoints",)),
    ("netns", ("net: Dumping netns links",)),
    ("ns_done", ("Namespaces dump complete",)),
    ("post_dump", ("Running post-dump scripts",)),
    ("net_unlock", ("Running network-unlock scripts",)),
    ("unfreeze", ("Unfreezing tasks",)),
]
PROFILE_PHASES = [  # (name, from marker, to marker)
    ("seize_lock_ms", "frozen", "pages"),      # seize, network lock + notify, mount tree, parasite
    ("memory_ms", "pages", "core"),            # page dump (memdump + memwrite)
    ("core_cgroups_ms", "core", "mounts"),     # core images, cgroup properties
    ("mounts_ms", "mounts", "netns"),          # mount namespace dump
    ("netns_ms", "netns", "ns_done"),          # net namespace dump (links, iptables/nft save)
    ("post_dump_ms", "ns_done", "net_unlock"), # inventory, post-dump notify round trip
    ("net_unlock_ms", "net_unlock", "unfreeze"),  # network-unlock notify + CRIU's unlock
    ("window_ms", "frozen", "unfreeze"),
]
TS_RE = re.compile(r"^\((\d+\.\d+)\)\s?(.*)")


def dump_log_profile(path):
    """Phase durations (ms) of the frozen window from CRIU's dump.log timestamps.
    Each marker is searched after the previous one found; a missing marker is
    skipped (its phases are then left out)."""
    lines = []
    with open(path, errors="replace") as f:
        for line in f:
            m = TS_RE.match(line)
            if m:
                lines.append((float(m.group(1)), m.group(2)))
    marks, pos = {}, 0
    for name, pats in PROFILE_MARKERS:
        for i in range(pos, len(lines)):
            if any(p in lines[i][1] for p in pats):
                marks[name] = lines[i][0]
                pos = i + 1
                break
    prof = {}
    for phase, a, b in PROFILE_PHASES:
        if a in marks and b in marks:
            prof[phase] = round((marks[b] - marks[a]) * 1000.0, 2)
    return prof


# ---------------------------------------------------------------- measurements
class Results:
    def __init__(self):
        self.values = {}    # (name, runtime) -> [values]
        self.units = {}
        self.invalid = {}   # (name, runtime) -> [messages]
        self.profiles = {}  # (size, runtime) -> [profile dicts]

    def add(self, name, runtime, unit, value):
        self.values.setdefault((name, runtime), []).append(value)
        self.units[name] = unit

    def fail(self, names, runtime, unit, msg):
        for name in names:
            self.invalid.setdefault((name, runtime), []).append(msg)
            self.units.setdefault(name, unit)
            self.values.setdefault((name, runtime), [])


R = Results()
SEQ = [0]


def new_id(kind, runtime, mib, run_no):
    SEQ[0] += 1
    return "%s-%s-%s-%d-r%d-%d" % (TOKEN, kind, runtime, mib, run_no, SEQ[0])


def shm_dir(cid):
    d = os.path.join(SHM_RUN, cid)
    os.makedirs(d, exist_ok=True)
    return d


def measure_leave(runtime, mib, run_no, logdir):
    """Leave-running checkpoint: frozen/freezing/memdump/memwrite, wall time;
    shim RSS for the smallest size."""
    names = ["frozen_ms_%dmib" % mib, "checkpoint_wall_s_%dmib" % mib]
    cid = new_id("leave", runtime, mib, run_no)
    try:
        pid, t_start = start_container(cid, runtime, mib)
        if "rss" in FIGURES and mib == min(SIZES):
            spid = shim_pid(cid, RUNTIME_TYPES[runtime][1])
            if spid is None:
                R.fail(["shim_rss_mib"], runtime, "MiB",
                       "run %d: no %s process with -id %s" % (run_no, RUNTIME_TYPES[runtime][1], cid))
            else:
                time.sleep(max(0.0, t_start + RSS_SAMPLE_AFTER_S - time.monotonic()))
                R.add("shim_rss_mib", runtime, "MiB", round(vm_rss_kib(spid) / 1024.0, 2))
        if "leave" not in FIGURES:
            return
        d = shm_dir(cid)
        img, work = os.path.join(d, "img"), os.path.join(d, "work")
        _, _, wall = run(CTR + ["task", "checkpoint", "--image-path", img, "--work-path", work, cid])
        # The container must still run and count after a leave-running checkpoint.
        t = task(cid)
        if not t or t[1] != "RUNNING":
            raise BenchError("task %s after a leave-running checkpoint (expected RUNNING)" % (t,))
        wait_advancing(cid)
        stats_path = find_file("stats-dump", work, img)
        if not stats_path:
            raise BenchError("no stats-dump in %s or %s" % (work, img))
        st = read_dump_stats(stats_path)
        if "frozen_time_us" not in st:
            raise BenchError("stats-dump has no frozen_time: %s" % st)
        R.add(names[0], runtime, "ms", st["frozen_time_us"] / 1000.0)
        R.add(names[1], runtime, "s", round(wall, 4))
        pw = EVENTS[0].pause_window(cid) if EVENTS[0] else None
        if pw is not None:
            R.add("paused_window_ms_%dmib" % mib, runtime, "ms", round(pw * 1000.0, 1))
        # containerd's client writes a checkpoint image to the content store
        # unless it knows the runtime honours --image-path (it only knows runc).
        leaked = [r for r in list_images() if r.startswith("containerd.io/checkpoint/%s:" % cid)]
        for r in leaked:
            run(CTR + ["images", "rm", r], check=False)
        R.add("ctr_wrote_content_image_%dmib" % mib, runtime, "count", len(leaked))
        for k, n in (("freezing_time_us", "freezing_ms"), ("memdump_time_us", "memdump_ms"),
                     ("memwrite_time_us", "memwrite_ms")):
            if k in st:
                R.add("%s_%dmib" % (n, mib), runtime, "ms", st[k] / 1000.0)
        if "pages_written" in st:
            R.add("pages_written_%dmib" % mib, runtime, "pages", st["pages_written"])
        log_path = find_file("dump.log", work, img)
        prof = {}
        if log_path:
            shutil.copy(log_path, os.path.join(logdir, "dump-%s-%dmib-run%d.log" % (runtime, mib, run_no)))
            prof = dump_log_profile(log_path)
            if prof:
                R.profiles.setdefault((mib, runtime), []).append(prof)
            else:
                prof = {"profile": "n/a (dump.log has no timestamps of the frozen window: CRIU log level < 4?)"}
        log("leave  %-7s %3d MiB run %d: frozen %.1f ms, freezing %.1f ms, memdump %.1f ms, "
            "memwrite %.1f ms, wall %.3f s, paused window %s ms, pages %s%s | %s"
            % (runtime, mib, run_no, st["frozen_time_us"] / 1000.0,
               st.get("freezing_time_us", 0) / 1000.0, st.get("memdump_time_us", 0) / 1000.0,
               st.get("memwrite_time_us", 0) / 1000.0, wall,
               "%.1f" % (pw * 1000.0) if pw is not None else "n/a", st.get("pages_written"),
               ", ctr wrote a content-store image" if leaked else "",
               " ".join("%s=%s" % kv for kv in prof.items())))
    except BenchError as e:
        log("leave  %-7s %3d MiB run %d: INVALID: %s" % (runtime, mib, run_no, e))
        R.fail(names if "leave" in FIGURES else [], runtime, "ms", "run %d: %s" % (run_no, e))
    finally:
        remove_container(cid)
        shutil.rmtree(os.path.join(SHM_RUN, cid), ignore_errors=True)


def verify_continued(cid, before, runtime, what):
    pid, first, later = wait_advancing(cid)
    if later < before:
        raise BenchError("state lost: %s restored counter %d < %d before the checkpoint (%s)"
                         % (cid, later, before, what))
    rt = containers().get(cid)
    want = RUNTIME_TYPES[runtime][0]
    if rt != want:
        raise BenchError("%s restored under runtime %s, expected %s" % (cid, rt, want))
    return later


def step_text(t0, steps):
    parts, prev = [], t0
    for name, t in steps:
        parts.append("%s %.3f" % (name, t - prev))
        prev = t
    return ", ".join(parts)


def measure_ctr(runtime, mib, run_no):
    name = "stop_and_copy_ctr_s_%dmib" % mib
    cid = new_id("ctr", runtime, mib, run_no)
    newid = cid + "-restored"
    ref = CKPT_REF_PREFIX + cid + ":ckpt"
    try:
        pid, _ = start_container(cid, runtime, mib)
        before = read_counter(pid)
        steps = []
        t0 = time.monotonic()
        run(CTR + ["containers", "checkpoint", "--task", cid, ref])
        steps.append(("checkpoint", time.monotonic()))
        run(CTR + ["task", "kill", cid])
        wait_stopped(cid)
        steps.append(("kill+wait", time.monotonic()))
        run(CTR + ["task", "delete", cid])
        steps.append(("delete", time.monotonic()))
        run(CTR + ["containers", "restore", "--live", newid, ref])
        steps.append(("restore", time.monotonic()))
        wait_running(newid)
        steps.append(("running", time.monotonic()))
        dt = time.monotonic() - t0
        after = verify_continued(newid, before, runtime, "ctr c restore --live")
        R.add(name, runtime, "s", round(dt, 4))
        log("ctr    %-7s %3d MiB run %d: stop-and-copy %.3f s (%s; counter %d -> %d)"
            % (runtime, mib, run_no, dt, step_text(t0, steps), before, after))
    except BenchError as e:
        log("ctr    %-7s %3d MiB run %d: INVALID: %s" % (runtime, mib, run_no, e))
        R.fail([name], runtime, "s", "run %d: %s" % (run_no, e))
    finally:
        remove_container(newid)
        remove_container(cid)
        run(CTR + ["images", "rm", ref], check=False)


def measure_cli(runtime, mib, run_no, logdir):
    name = "stop_and_copy_cli_s_%dmib" % mib
    cid = new_id("cli", runtime, mib, run_no)
    try:
        pid, _ = start_container(cid, runtime, mib)
        d = os.path.join(shm_dir(cid), "img")
        before = read_counter(pid)
        cmd1 = MS2M + ["checkpoint", "--exit", "--image-path", d, cid]
        cmd2 = MS2M + ["restore", "--work-path", os.path.join(SHM_RUN, cid, "restore-work"), cid, d]
        t0 = time.monotonic()
        out1, err1, _ = run(cmd1)
        steps = [("checkpoint", time.monotonic())]
        out2, err2, _ = run(cmd2)
        steps.append(("restore", time.monotonic()))
        wait_running(cid)
        steps.append(("running", time.monotonic()))
        dt = time.monotonic() - t0
        with open(os.path.join(logdir, "cli-%s-%dmib-run%d.log" % (runtime, mib, run_no)), "w") as f:
            f.write("$ %s\n%s%s\n$ %s\n%s%s" % (" ".join(cmd1), out1, err1, " ".join(cmd2), out2, err2))
        after = verify_continued(cid, before, runtime, "ms2m restore")
        R.add(name, runtime, "s", round(dt, 4))
        log_path = find_file("dump.log", d + "-work", d)
        if log_path:
            shutil.copy(log_path, os.path.join(logdir, "dump-exit-cli-%s-%dmib-run%d.log" % (runtime, mib, run_no)))
        stats_path = find_file("stats-dump", d + "-work", d)
        if stats_path:
            st = read_dump_stats(stats_path)
            if "frozen_time_us" in st:
                R.add("exit_frozen_cli_ms_%dmib" % mib, runtime, "ms", st["frozen_time_us"] / 1000.0)
        log("cli    %-7s %3d MiB run %d: stop-and-copy %.3f s (%s; counter %d -> %d)"
            % (runtime, mib, run_no, dt, step_text(t0, steps), before, after))
    except BenchError as e:
        log("cli    %-7s %3d MiB run %d: INVALID: %s" % (runtime, mib, run_no, e))
        R.fail([name], runtime, "s", "run %d: %s" % (run_no, e))
    finally:
        remove_container(cid)
        shutil.rmtree(os.path.join(SHM_RUN, cid), ignore_errors=True)


# ---------------------------------------------------------------- report
PRIMARY = ["frozen_ms", "checkpoint_wall_s", "stop_and_copy_ctr_s", "stop_and_copy_cli_s"]


def figure_order():
    names = []
    for base in PRIMARY + ["paused_window_ms", "exit_frozen_cli_ms", "freezing_ms", "memdump_ms", "memwrite_ms", "pages_written",
                           "ctr_wrote_content_image"]:
        for mib in SIZES:
            names.append("%s_%dmib" % (base, mib))
    names.append("shim_rss_mib")
    return [n for n in names if any(k[0] == n for k in R.values)]


def is_primary(name):
    return name == "shim_rss_mib" or any(name.startswith(p + "_") for p in PRIMARY)


def summary(name, runtime):
    vals = R.values.get((name, runtime), [])
    obj = {"name": name, "runtime": runtime, "unit": R.units.get(name, ""),
           "median": None, "min": None, "max": None, "runs": len(vals)}
    if vals:
        obj.update(median=round(statistics.median(vals), 4), min=min(vals), max=max(vals))
    obj["values"] = vals
    bad = R.invalid.get((name, runtime), [])
    if bad:
        obj["invalid_runs"] = len(bad)
        obj["errors"] = bad
    return obj


def report(stamp, meta):
    os.makedirs(OUT, exist_ok=True)
    path = os.path.join(OUT, "results-%s.jsonl" % stamp)
    lines, ratio_lines = [], []
    miss = False
    for name in figure_order():
        for rt in RUNTIMES:
            lines.append(json.dumps(summary(name, rt)))
    for mib in SIZES:
        for rt in RUNTIMES:
            profs = R.profiles.get((mib, rt), [])
            if not profs:
                continue
            med = {}
            for phase, _, _ in PROFILE_PHASES:
                v = [p[phase] for p in profs if phase in p]
                if v:
                    med[phase] = round(statistics.median(v), 2)
            lines.append(json.dumps({"name": "frozen_profile_%dmib" % mib, "runtime": rt,
                                     "unit": "ms", "median_phases": med, "runs": len(profs),
                                     "source": "CRIU dump.log timestamps"}))
    if "ms2m" in RUNTIMES and "runc-v2" in RUNTIMES:
        for name in figure_order():
            if name.startswith("ctr_wrote_content_image"):
                continue
            a, b = summary(name, "ms2m"), summary(name, "runc-v2")
            if a["median"] is None or b["median"] is None or not b["median"]:
                ratio_lines.append("ratio %s: ms2m/runc-v2 = n/a (ms2m %s, runc-v2 %s valid runs)"
                                   % (name, a["runs"], b["runs"]))
                if is_primary(name):
                    miss = True
                continue
            r = a["median"] / b["median"]
            if is_primary(name):
                ok = r <= 1.0
                miss |= not ok
                ratio_lines.append("ratio %s: ms2m/runc-v2 = %.2f (target <= 1.00) %s"
                                   % (name, r, "OK" if ok else "MISS"))
            else:
                ratio_lines.append("ratio %s: ms2m/runc-v2 = %.2f (info)" % (name, r))
    if "ms2m" in RUNTIMES and "ms2m-before" in RUNTIMES:
        for name in figure_order():
            a, b = summary(name, "ms2m"), summary(name, "ms2m-before")
            if a["median"] is not None and b["median"]:
                ratio_lines.append("ratio %s: ms2m/ms2m-before = %.2f (info)" % (name, a["median"] / b["median"]))
    if "ms2m" in RUNTIMES and ("shim_rss_mib", "ms2m") in R.values:
        s = summary("shim_rss_mib", "ms2m")
        if s["median"] is None:
            ratio_lines.append("check shim_rss_mib: ms2m = n/a (target <= %.0f MiB) MISS" % SHIM_RSS_TARGET_MIB)
            miss = True
        else:
            ok = s["median"] <= SHIM_RSS_TARGET_MIB
            miss |= not ok
            ratio_lines.append("check shim_rss_mib: ms2m median = %.2f MiB (target <= %.0f MiB) %s"
                               % (s["median"], SHIM_RSS_TARGET_MIB, "OK" if ok else "MISS"))
    for mib in SIZES:
        counts = {rt: R.values.get(("ctr_wrote_content_image_%dmib" % mib, rt), []) for rt in RUNTIMES}
        if any(sum(v) for v in counts.values()):
            ratio_lines.append(
                "note %d MiB: `ctr task checkpoint --image-path` also wrote a checkpoint image to containerd's "
                "content store (removed by the bench) in %s: containerd's client recognises an image path "
                "only for io.containerd.runc.v2, and does this while the task is still paused"
                % (mib, ", ".join("%d/%d %s runs" % (sum(v), len(v), rt) for rt, v in counts.items())))
    with open(path, "w") as f:
        for line in lines:
            f.write(line + "\n")
    with open(os.path.join(OUT, "results-%s.ratios.txt" % stamp), "w") as f:
        f.write("\n".join(ratio_lines) + "\n")
    with open(os.path.join(OUT, "results-%s.meta.json" % stamp), "w") as f:
        json.dump(meta, f, indent=2)
    for line in lines:
        print(line)
    for line in ratio_lines:
        print(line)
    print("results: %s" % path)
    invalid = sum(len(v) for v in R.invalid.values())
    if invalid:
        print("invalid or failed runs: %d (see \"errors\" in the JSON lines)" % invalid)
    sys.stdout.flush()
    return invalid, miss


def cmd_version(cmd):
    try:
        out, err, _ = run(cmd, check=False, timeout=10)
        return (out or err).strip().splitlines()[0] if (out or err).strip() else ""
    except (BenchError, OSError):
        return ""


def machine_meta(stamp):
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = ""
    try:
        with open("/proc/meminfo") as f:
            mem = f.readline().split(":", 1)[1].strip()
    except OSError:
        pass
    shims = {}
    bins = [(rt, RUNTIME_TYPES[rt][1]) for rt in RUNTIMES]
    if "cli" in FIGURES:
        bins.append(("ms2m-cli", "ms2m"))
    for rt, binary in bins:
        b = shutil.which(binary)
        shims[rt] = {"path": b, "sha256_prefix": None}
        if b:
            out, _, _ = run(["sha256sum", b], check=False)
            shims[rt]["sha256_prefix"] = out.split()[0][:16] if out else None
            shims[rt]["mtime"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(os.path.getmtime(b)))
    return {
        "started_utc": stamp, "runs": RUNS, "sizes_mib": SIZES, "runtimes": RUNTIMES,
        "figures": FIGURES, "kernel": os.uname().release, "cpu": cpu, "nproc": os.cpu_count(),
        "mem_total": mem, "loadavg_start": open("/proc/loadavg").read().strip(),
        "containerd": cmd_version(["containerd", "--version"]),
        "runc": cmd_version(["runc", "--version"]),
        "criu": cmd_version(["criu", "--version"]),
        "ms2m_cli": shutil.which("ms2m"), "shims": shims,
        "git_head": cmd_version(["git", "-C", os.path.dirname(os.path.abspath(__file__)), "rev-parse", "--short", "HEAD"]),
        "image": IMAGE, "shm": SHM,
        "criu_kdat_cache": ("present" if os.path.exists("/run/criu.kdat") or os.path.exists("/run/criu/criu.kdat") else
                            "missing, stale /run/criu.kdat.tmp" if os.path.exists("/run/criu.kdat.tmp")
                            else "missing"),
    }


# ---------------------------------------------------------------- cleanup
def cleanup():
    try:
        for cid in containers():
            if cid.startswith(TOKEN + "-"):
                remove_container(cid)
        for ref in list_images():
            if ref.startswith(CKPT_REF_PREFIX) or ref.startswith("containerd.io/checkpoint/%s-" % TOKEN):
                run(CTR + ["images", "rm", ref], check=False)
    except BenchError as e:
        log("cleanup: %s" % e)
    shutil.rmtree(SHM_RUN, ignore_errors=True)
    try:
        os.rmdir(SHM)
    except OSError:
        pass


def on_term(signum, frame):
    raise KeyboardInterrupt("signal %d" % signum)


def fmt(v, unit=""):
    if v is None:
        return "n/a"
    if unit == "s":
        return "%.3f" % v
    if unit in ("ms", "MiB"):
        return "%.1f" % v
    if isinstance(v, float) and v != int(v):
        return "%.2f" % v
    return "%d" % v


def table(path):
    """Prints a Markdown table of a results file (for docs/benchmarks.md)."""
    rows = {}
    order = []
    with open(path) as f:
        for line in f:
            o = json.loads(line)
            if "median" not in o:
                continue
            if o["name"] not in rows:
                order.append(o["name"])
            rows.setdefault(o["name"], {})[o["runtime"]] = o
    print("| figure | unit | ms2m median (min-max) | runc-v2 median (min-max) | ms2m/runc-v2 |")
    print("|---|---|---|---|---|")
    for name in order:
        cells = []
        unit = ""
        for rt in ("ms2m", "runc-v2"):
            o = rows[name].get(rt)
            if not o:
                cells.append("-")
                continue
            unit = o["unit"]
            bad = " (%d invalid)" % o["invalid_runs"] if o.get("invalid_runs") else ""
            cells.append("%s (%s-%s), n=%d%s" % (fmt(o["median"], unit), fmt(o["min"], unit), fmt(o["max"], unit),
                                                 o["runs"], bad))
        a, b = rows[name].get("ms2m"), rows[name].get("runc-v2")
        ratio = "-"
        if a and b and a["median"] is not None and b["median"]:
            ratio = "%.2f" % (a["median"] / b["median"])
        print("| %s | %s | %s | %s | %s |" % (name, unit, cells[0], cells[1], ratio))
    profs = []
    with open(path) as f:
        for line in f:
            o = json.loads(line)
            if "median_phases" in o:
                profs.append(o)
    if profs:
        phases = [p for p, _, _ in PROFILE_PHASES]
        print()
        print("| frozen window (dump.log, median ms) | runs | " + " | ".join(p[:-3] for p in phases) + " |")
        print("|---|---|" + "---|" * len(phases))
        for o in profs:
            print("| %s %s | %d | %s |" % (o["name"].replace("frozen_profile_", ""), o["runtime"], o["runs"],
                                          " | ".join("%.1f" % o["median_phases"][p] if p in o["median_phases"] else "n/a" for p in phases)))
    return 0


def main():
    if sys.argv[1:] == ["--cleanup"]:
        cleanup()
        return 0
    if len(sys.argv) == 3 and sys.argv[1] == "--table":
        return table(sys.argv[2])
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if inherited as ignored
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    logdir = os.path.join(OUT, "logs-%s" % stamp)
    os.makedirs(logdir, exist_ok=True)
    os.makedirs(SHM_RUN, exist_ok=True)
    meta = machine_meta(stamp)
    log("runs=%d sizes=%s runtimes=%s figures=%s token=%s"
        % (RUNS, SIZES, RUNTIMES, FIGURES, TOKEN))
    t_begin = time.monotonic()
    EVENTS[0] = Events()
    try:
        for run_no in range(1, RUNS + 1):
            # Alternate which runtime goes first, so drift hits both alike.
            order = RUNTIMES if run_no % 2 else list(reversed(RUNTIMES))
            for mib in SIZES:
                if "leave" in FIGURES or ("rss" in FIGURES and mib == min(SIZES)):
                    for rt in order:
                        measure_leave(rt, mib, run_no, logdir)
                if "ctr" in FIGURES:
                    for rt in order:
                        measure_ctr(rt, mib, run_no)
                if "cli" in FIGURES:
                    for rt in order:
                        measure_cli(rt, mib, run_no, logdir)
    except KeyboardInterrupt as e:
        log("interrupted (%s): cleaning up" % (str(e) or "SIGINT"))
        cleanup()
        return 130
    finally:
        EVENTS[0].stop(os.path.join(logdir, "events.txt"))
        cleanup()
    meta["duration_s"] = round(time.monotonic() - t_begin, 1)
    end = machine_meta(stamp)
    if end["shims"] != meta["shims"] or end["ms2m_cli"] != meta["ms2m_cli"]:
        log("WARNING: a shim binary changed during the run: %s -> %s" % (meta["shims"], end["shims"]))
        meta["shims_changed_during_run"] = end["shims"]
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
