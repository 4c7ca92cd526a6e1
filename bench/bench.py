#!/usr/bin/env python3
"""bench.py: measure ollama.py against llama-server itself.

ollama.py sits between the user and llama-server; its job is to add nothing measurable. This script
runs both side by side in one process tree, ALTERNATING them (ollama.py, direct, ollama.py, direct...)
so drift on a shared machine hits both equally, and reports medians (plus, under the table, the
best run of each side, which other load on the machine cannot fake):

  generation   tokens/s of a streamed /api/generate vs the same llama-server binary, started with the
               same flags (read from ollama.py's own "starting llama server:" log line), on /completion
  ttft         time to first token with the model loaded (templated as `run` sends it, and raw)
  agent        a coding agent's turn 2 time to first token against turn 1's, on a ~20k-token prefix (2 runs)
  cold         request -> first token on an unloaded model vs start llama-server, poll /health, request
  concurrency  4 simultaneous chats (OLLAMA_NUM_PARALLEL=4) vs llama-server -np 4, aggregate tokens/s
  footprint    idle RSS of `serve` (as a script, and next to a fresh bytecode cache) vs bare python3; wall
               time of `list` over 50 models and `--version`, as a script and as bin/ollama runs them,
               vs `python3 -c pass`
  pull         MB/s pulling Gemma's blob from a loopback docker-registry vs curl of the same blob URL
  lan          MB/s of a LAN pull: serve B pulls Gemma from serve A's /v2 vs curl of the same blob from A
  create       `ollama.py create` of the 253 MB GGUF vs `sha256sum` + `cp`
  rpc          tokens/s with Gemma split over two `ollama.py worker`s on loopback vs all layers local
  layout       load to first token of Gemma in Ollama's converter layout (translated) vs llama.cpp's file;
               the view's extra disk
  draft        tokens/s with a DRAFT layer vs without (greedy text compared)
  speculative  tokens/s with n-gram speculation (OLLAMA_SPECULATIVE=ngram-mod, ngram-simple) vs off, on a
               copy task (a file rewritten) and on prose, one serve per setting, alternating (greedy text compared)
  repack       prompt and generation tokens/s with OLLAMA_REPACK=0 (llama-server --no-repack, the kernels RPC
               workers run) vs 1 (the CPU backend's repacked ones), one serve each, alternating, on Gemma
               (Q4_K_M), Gemma requantized to Q4_0, and a random 1024-wide llama in Q4_K_M
  interactive  Open WebUI's pattern with one slot busy: a title task (not streamed) then the chat 50 ms later;
               the chat's time to first token vs llama-server by hand (first come, first served)
  promptcache  an agent's ~4k-token prefix (PC_PREFIX): turn 2 vs turn 1 time to first token; the first turn
               after a runner restart with the saved prefix (OLLAMA_PROMPT_CACHE) vs without; the restored
               turn vs llama-server started by hand with the same flags restoring the same file; Gemma 3
               270M (a sliding window, ~2k-token prefix): the first turn after a restart, saved vs none

    python3 bench/bench.py [--json out.json] [--runs N] [--quick] [--only SECTION[,SECTION...]]
                           [--ollama-py PATH] [--keep]

--ollama-py measures another copy of ollama.py (e.g. a branch's), --keep leaves the work dir (logs,
stores) for inspection.

Uses only the project, its test requirements and the engine it builds. Every process it starts is
stopped on exit, on Ctrl+C, on SIGTERM and on error. A metric whose feature is not in this ollama.py
yet is reported as "n/a" with the reason.
"""
import argparse
import hashlib
import http.client
import json
import os
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "tests"))

import ollama as project  # noqa: E402  (the repo's ollama.py, not the pip client: ROOT is first)

SECTIONS = ("generation", "ttft", "agent", "cold", "concurrency", "footprint", "pull", "lan", "create", "rpc",
            "layout", "draft", "speculative", "repack", "promptcache", "interactive")
MODEL = "gemma3:270m"
N_PREDICT = 128                 # tokens per generation run
N_PREDICT_PARALLEL = 64         # tokens per stream in the 4-chat burst (4 x 64 per burst keeps the run short)
SEED = 42
PROMPT = "Write a long, detailed story about a lighthouse keeper who finds a message in a bottle."
CHAT_PROMPTS = ["Tell me a long story about a dragon who learns to bake bread.",
                "Explain in detail how a steam engine works, step by step.",
                "Write a long poem about the sea at night.",
                "Describe a walk through a busy market in a medieval town, in detail."]
POLL = 0.01                     # seconds between /health polls when starting llama-server by hand
FAKE_MODELS = 50


class BenchError(Exception):
    """A measurement could not be taken; the section reports it instead of a number."""


class NotAvailable(Exception):
    """The ollama.py under test lacks the feature a metric needs."""


def loadavg():
    """The 1-minute load average: above the CPU count, other work is competing with the bench."""
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def log(msg):
    print("[bench %s] %s" % (time.strftime("%H:%M:%S"), msg), file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------------------------

class Row:
    """One table line. `kind` decides how `met` is computed:
    "rate" ours/direct >= limit; "latency" ours - direct <= limit (ms); "slower" ours/direct <= limit;
    "max" ours <= limit; "info" no target."""

    def __init__(self, metric, unit, ours=None, direct=None, kind="info", limit=None, note=""):
        self.samples = {}
        if isinstance(ours, list):
            self.samples["ollama_py"], ours = ours, median(ours)
        if isinstance(direct, list):
            self.samples["direct"], direct = direct, median(direct)
        self.metric, self.unit, self.ours, self.direct = metric, unit, ours, direct
        self.kind, self.limit, self.note = kind, limit, note

    def best(self):
        """(ours, direct) of the least disturbed run: highest rate, lowest time; None where not sampled.
        On a shared machine the median can land on a run slowed by other work; the best run cannot."""
        pick = max if self.kind == "rate" or self.unit.endswith("/s") else min    # a rate's best is its highest
        return tuple(pick(self.samples[k]) if self.samples.get(k) else None for k in ("ollama_py", "direct"))

    @property
    def ratio(self):
        if self.ours is None or not self.direct:
            return None
        return self.ours / self.direct

    @property
    def target(self):
        if self.kind == "rate":
            return ">= %.2fx" % self.limit
        if self.kind == "latency":
            return "<= +%g ms" % self.limit
        if self.kind == "slower":
            return "<= %.1fx" % self.limit
        if self.kind == "max":
            return "<= %g %s" % (self.limit, self.unit)
        return "-"

    @property
    def met(self):
        if self.ours is None or self.kind == "info":
            return None
        if self.kind == "max":
            return self.ours <= self.limit
        if self.direct is None:
            return None
        if self.kind == "rate":
            return self.ours / self.direct >= self.limit
        if self.kind == "latency":
            return self.ours - self.direct <= self.limit
        return self.ours / self.direct <= self.limit

    def cells(self):
        ratio = "-" if self.ratio is None else "%.3f" % self.ratio
        if self.kind == "latency" and self.ratio is not None:
            ratio += " (%+.1f ms)" % (self.ours - self.direct)
        met = {True: "yes", False: "NO", None: "-"}[self.met]
        ours = "n/a" if self.ours is None else _num(self.ours)
        return [self.metric + " (%s)" % self.unit, ours, "-" if self.direct is None else _num(self.direct),
                ratio, self.target, met]

    def as_dict(self):
        return {"metric": self.metric, "unit": self.unit, "ollama_py": self.ours, "direct": self.direct,
                "ratio": self.ratio, "target": self.target, "met": self.met, "note": self.note,
                "samples": self.samples, "best": self.best()}


def _num(x):
    return "%.0f" % x if abs(x) >= 1000 else "%.1f" % x if abs(x) >= 10 else "%.2f" % x


HEADER = ["metric", "ollama.py", "direct", "ratio", "target", "met?"]


def render_table(rows):
    lines = [HEADER] + [r.cells() for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(HEADER))]
    out = []
    for n, line in enumerate(lines):
        out.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))))
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    notes = ["  * %s: %s" % (r.metric, r.note) for r in rows if r.note]
    best = ["  %s: ollama.py %s, direct %s" % (r.metric, _num(r.best()[0]), _num(r.best()[1]))
            for r in rows if all(x is not None for x in r.best())]
    if best:
        notes += ["", "best run of each side (least disturbed by other load):"] + best
    return "\n".join(out + ([""] + notes if notes else []))


def median(values):
    return statistics.median(values) if values else None


# ----------------------------------------------------------------------------------------------------------------
# Processes: everything started is tracked and stopped, orphans included
# ----------------------------------------------------------------------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(pid):
    """Every live descendant pid of `pid`, from /proc/<pid>/task/*/children (Linux)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            tasks = os.listdir("/proc/%d/task" % p)
        except OSError:
            continue
        for t in tasks:
            try:
                with open("/proc/%d/task/%s/children" % (p, t)) as f:
                    kids = [int(x) for x in f.read().split()]
            except OSError:
                continue
            out.extend(kids)
            todo.extend(kids)
    return out


def rss_mb(pid):
    """Resident set size (VmRSS) of a process, in MB (10^6 bytes)."""
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024 / 1e6
    raise BenchError("no VmRSS for pid %d" % pid)


def cpu_seconds(pid):
    """User + system CPU time a process has used so far, in seconds (/proc/<pid>/stat)."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _kill(pid, sig):
    try:
        os.kill(pid, sig)
    except OSError:
        pass


def _alive(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


class Procs:
    """The processes this run started. `stop_all()` stops each by pid (SIGTERM, then SIGKILL), then kills
    any process whose command line names the run's private work dir (a runner orphaned by a crash)."""

    def __init__(self, workdir):
        self.workdir = str(workdir)
        self.items = []
        self.logs = []

    def start(self, args, log_path, env=None, cwd=None):
        f = open(str(log_path), "ab")
        self.logs.append(f)
        proc = subprocess.Popen([str(a) for a in args], stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                                env=env, cwd=cwd, start_new_session=True)
        self.items.append(proc)
        return proc

    def stop(self, proc, grace=10.0):
        kids = descendants(proc.pid)
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        deadline = time.monotonic() + grace
        for pid in kids:
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _alive(pid):
                _kill(pid, signal.SIGKILL)
        if proc in self.items:
            self.items.remove(proc)

    def stop_all(self):
        for proc in list(reversed(self.items)):
            try:
                self.stop(proc)
            except Exception as e:              # keep stopping the rest
                log("stopping pid %d: %s" % (proc.pid, e))
        me = os.getpid()
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == me:
                continue
            try:
                with open("/proc/%s/cmdline" % entry, "rb") as f:
                    cmdline = f.read()
            except OSError:
                continue
            if self.workdir.encode() in cmdline:
                _kill(int(entry), signal.SIGKILL)
        for f in self.logs:
            f.close()


def timed_run(args, env=None, cwd=None, timeout=600):
    """Run a command to completion: (wall seconds, CompletedProcess)."""
    t0 = time.perf_counter()
    cp = subprocess.run([str(a) for a in args], env=env, cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True,
                        timeout=timeout)
    return time.perf_counter() - t0, cp


def check_cli(cp, what):
    """Raise NotAvailable when an ollama.py command is still a stub, BenchError when it failed."""
    err = cp.stderr.decode(errors="replace").strip()
    if cp.returncode != 0:
        if "not implemented" in err:
            raise NotAvailable("`%s` not implemented in this ollama.py (n/a until merged)" % what)
        raise BenchError("`%s` exited %d: %s" % (what, cp.returncode, err.splitlines()[-1:] or ""))


# ----------------------------------------------------------------------------------------------------------------
# HTTP
# ----------------------------------------------------------------------------------------------------------------

def http_call(port, method, path, body=None, timeout=120):
    """(status, raw bytes) of one request to 127.0.0.1:port."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = json.dumps(body).encode() if body is not None else None
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"} if data else {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def http_json(port, method, path, body=None, timeout=120):
    status, raw = http_call(port, method, path, body, timeout)
    if status != 200:
        raise BenchError("%s %s -> %d: %s" % (method, path, status, raw[:300].decode(errors="replace")))
    return json.loads(raw) if raw.strip() else None


class Timing:
    """Client-side timing of one streamed answer (perf_counter seconds)."""

    def __init__(self, t0):
        self.t0 = t0
        self.first = self.last = self.end = None
        self.tokens = 0          # token-bearing events (done/stop event excluded)
        self.final = None
        self.pieces = []         # the answer's text, event by event

    @property
    def ttft(self):
        return self.first - self.t0

    @property
    def client_rate(self):
        """Tokens/s between the first and the last token event (prefill excluded)."""
        if self.tokens < 2 or self.last <= self.first:
            return None
        return (self.tokens - 1) / (self.last - self.first)


def stream(port, path, body, sse=False, t0=None, timeout=600):
    """POST `body` and read the streamed answer: NDJSON (ollama.py) or SSE `data:` lines (llama-server),
    noting when each event arrives. `t0` lets a caller start the clock earlier (cold start)."""
    t = Timing(time.perf_counter() if t0 is None else t0)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.connect()
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.request("POST", path, body=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise BenchError("POST %s -> %d: %s" % (path, resp.status, resp.read()[:300].decode(errors="replace")))
        while True:
            line = resp.readline()
            if not line:
                raise BenchError("POST %s: stream ended without a final event" % path)
            now = time.perf_counter()
            if sse:
                if not line.startswith(b"data: "):
                    continue
                line = line[6:]
            if not line.strip():
                continue
            event = json.loads(line)
            if "error" in event:
                raise BenchError("POST %s: %s" % (path, event["error"]))
            if t.first is None:
                t.first = now
            t.pieces.append(event.get("content") or event.get("response") or
                            (event.get("message") or {}).get("content") or "")
            if event.get("stop") if sse else event.get("done"):
                t.end, t.final = now, event
                return t
            t.tokens += 1
            t.last = now
    finally:
        conn.close()


def wait_http(port, path, proc, timeout=120, poll=POLL, ok=lambda status, raw: status == 200):
    """Poll GET path until `ok`, failing early if `proc` exits."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise BenchError("process %s exited with %s while starting" % (proc.args[0], proc.returncode))
        try:
            status, raw = http_call(port, "GET", path, timeout=1)
            if ok(status, raw):
                return
        except (OSError, http.client.HTTPException):
            pass
        if time.monotonic() > deadline:
            raise BenchError("timed out waiting for %s on port %d" % (path, port))
        time.sleep(poll)


def _health_ok(status, raw):
    try:
        return status == 200 and json.loads(raw).get("status") == "ok"
    except ValueError:
        return False


# ----------------------------------------------------------------------------------------------------------------
# The parts: engine, model, ollama.py serve, llama-server by hand
# ----------------------------------------------------------------------------------------------------------------

def find_engine():
    """The llama-server ollama.py runs: tests/fixtures.py's ensure_engine() when present, else
    OLLAMA_LLAMA_SERVER or the cached build."""
    try:
        import fixtures
    except ImportError:
        fixtures = None
    if fixtures is not None and hasattr(fixtures, "ensure_engine"):
        return str(fixtures.ensure_engine())
    for p in (os.environ.get("OLLAMA_LLAMA_SERVER"),
              os.path.expanduser("~/.cache/ollama-py/build/0.3.36-cpu/bin/llama-server")):
        if p and os.path.isfile(p) and os.access(p, os.X_OK):
            return p
    raise BenchError("llama-server not found (set OLLAMA_LLAMA_SERVER)")


def find_gemma():
    try:
        import fixtures
    except ImportError:
        fixtures = None
    if fixtures is not None and hasattr(fixtures, "ensure_gemma"):
        return str(fixtures.ensure_gemma())
    p = os.path.expanduser("~/.cache/ollama-py/gemma/gemma-3-270m-q4_k_m.gguf")
    if not os.path.isfile(p):
        raise BenchError("Gemma 3 270M GGUF not found at %s" % p)
    return p


def import_model(models_dir, name, gguf, template=None, params=None):
    """Put a GGUF into a store as a model without the create API (the tests' import_gguf)."""
    try:
        from test_inference import import_gguf
    except ImportError:
        import_gguf = None
    store = project.Store(models_dir)
    if import_gguf is not None:
        import_gguf(store, name, gguf, template=template, params=params)
        return
    if template is not None:
        raise NotAvailable("needs tests/test_inference.py to import a model with a TEMPLATE")
    with open(gguf, "rb") as f:
        digest, size = store.write_blob(f)
    cd, cs = store.write_blob_bytes(json.dumps({"model_format": "gguf", "model_family": "gemma3"}).encode())
    store.write_manifest(project.Name.parse(name), {
        "schemaVersion": 2, "mediaType": project.MEDIA_MANIFEST,
        "config": {"mediaType": project.MEDIA_CONFIG, "digest": cd, "size": cs},
        "layers": [{"mediaType": project.MEDIA_PREFIX + "model", "digest": digest, "size": size}]})


def clean_env(extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("OLLAMA_")}
    env.update(extra)
    return env


class Serve:
    """`python3 ollama.py serve` on a free loopback port with its own HOME and OLLAMA_MODELS."""

    def __init__(self, bench, name, models=None, env=None):
        self.bench = bench
        self.dir = bench.workdir / name
        self.home = self.dir / "home"
        self.home.mkdir(parents=True, exist_ok=True)
        self.models = Path(models) if models else self.home / ".ollama" / "models"
        self.port = free_port()
        extra = {"OLLAMA_HOST": "127.0.0.1:%d" % self.port, "OLLAMA_MODELS": str(self.models),
                 "HOME": str(self.home)}
        if bench.engine:
            extra["OLLAMA_LLAMA_SERVER"] = bench.engine
        extra.update(env or {})
        self.env = clean_env(extra)
        self.log_path = self.dir / "serve.log"
        self.proc = None

    def start(self):
        self.proc = self.bench.procs.start([sys.executable, self.bench.ollama_py, "serve"], self.log_path,
                                           env=self.env, cwd=str(self.dir))
        wait_http(self.port, "/", self.proc, timeout=60, poll=0.02)
        return self

    def stop(self):
        if self.proc is not None:
            self.bench.procs.stop(self.proc)
            self.proc = None

    def cli(self, *args, timeout=600):
        """Run `python3 ollama.py ARGS` as a client of this server: (wall seconds, CompletedProcess)."""
        return timed_run([sys.executable, self.bench.ollama_py] + list(args), env=self.env, cwd=str(self.dir),
                         timeout=timeout)

    def runner_args(self):
        """The argv ollama.py started its latest llama-server with, from its "starting llama server:" log line."""
        marker = "starting llama server: "
        found = None
        for line in self.log_path.read_text(errors="replace").splitlines():
            if marker in line:
                found = line.split(marker, 1)[1]
        if found is None:
            raise BenchError("no 'starting llama server:' line in %s" % self.log_path)
        return shlex.split(found)

    def runners(self):
        return descendants(self.proc.pid)

    def wait_unloaded(self, timeout=30):
        """Until /api/ps is empty and no runner process is left."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not http_json(self.port, "GET", "/api/ps")["models"] and not any(map(_alive, self.runners())):
                return
            time.sleep(0.01)
        raise BenchError("model did not unload within %ds" % timeout)


class Direct:
    """llama-server started by hand with the argv ollama.py used, on a port of our own."""

    def __init__(self, bench, args, name="direct"):
        self.bench, self.port = bench, free_port()
        args = list(args)
        args[args.index("--port") + 1] = str(self.port)
        self.args = args
        self.log_path = bench.workdir / ("%s.log" % name)
        self.proc = None

    def launch(self):
        self.proc = self.bench.procs.start(self.args, self.log_path)

    def wait_ready(self):
        wait_http(self.port, "/health", self.proc, ok=_health_ok)

    def start(self):
        self.launch()
        self.wait_ready()
        return self

    def stop(self):
        if self.proc is not None:
            self.bench.procs.stop(self.proc)
            self.proc = None


def direct_payload(options, prompt):
    """The /completion body ollama.py sends for these request options: its defaults, its option
    mapping (`_sampling`), the prompt, stream on."""
    opts = dict(getattr(project, "DEFAULT_OPTIONS", {}))
    opts.update(options)
    sampling = getattr(project, "_sampling", None)
    if sampling is not None:
        body = sampling(opts, None)
    else:
        fields = getattr(project, "SAMPLING_FIELDS", {"num_predict": "n_predict", "temperature": "temperature",
                                                      "seed": "seed"})
        body = {f: opts[k] for k, f in fields.items() if opts.get(k) is not None}
        body["cache_prompt"] = True
    body.update(prompt=prompt, stream=True)
    return body


class Rig:
    """ollama.py serve with Gemma loaded, plus llama-server started by hand with the same flags."""

    def __init__(self, bench, parallel=1):
        env = {"OLLAMA_NUM_PARALLEL": str(parallel)} if parallel > 1 else {}
        self.serve = Serve(bench, "serve-np%d" % parallel, env=env)
        self.bench, self.parallel = bench, parallel
        self.direct = None
        self.args = None

    def start(self):
        import_model(self.serve.models, MODEL, self.bench.gemma)
        self.serve.start()
        # an empty prompt loads the model (done_reason "load"): after it the runner's argv is in the log
        http_json(self.serve.port, "POST", "/api/generate", {"model": MODEL, "stream": False})
        self.args = self.serve.runner_args()
        return self

    def start_direct(self):
        if self.direct is None:
            self.direct = Direct(self.bench, self.args, "direct-np%d" % self.parallel).start()
        return self.direct

    def stop_direct(self):
        if self.direct is not None:
            self.direct.stop()
            self.direct = None

    def rendered(self, path, body):
        """The prompt text ollama.py sends to llama-server for this request (its _debug_render_only)."""
        out = http_json(self.serve.port, "POST", path, dict(body, _debug_render_only=True, stream=False))
        return out["_debug_info"]["rendered_template"]

    def stop(self):
        self.stop_direct()
        self.serve.stop()


# ----------------------------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------------------------

def options(n):
    return {"num_predict": n, "temperature": 0, "seed": SEED}


def sec_generation(b):
    rig = b.rig()
    direct = rig.start_direct()
    body = {"model": MODEL, "prompt": PROMPT, "options": options(N_PREDICT)}
    payload = direct_payload(options(N_PREDICT), rig.rendered("/api/generate", body))
    ours, theirs = [], []
    # warm both prompt caches with one token
    stream(rig.serve.port, "/api/generate", dict(body, options=options(1)))
    stream(direct.port, "/completion", dict(payload, n_predict=1), sse=True)
    cpu = 0.0
    for i in range(b.runs):
        c0 = cpu_seconds(rig.serve.proc.pid)
        ours.append(stream(rig.serve.port, "/api/generate", body))
        cpu += cpu_seconds(rig.serve.proc.pid) - c0
        theirs.append(stream(direct.port, "/completion", payload, sse=True))
        log("  run %d: ollama.py %.1f tok/s, direct %.1f tok/s" % (i + 1, ours[-1].client_rate or 0,
                                                                  theirs[-1].client_rate or 0))
    counts = sorted({t.final.get("eval_count") for t in ours} | {t.final["timings"]["predicted_n"] for t in theirs})
    note = "" if counts == [N_PREDICT] else "token counts differ from n_predict=%d: %s" % (N_PREDICT, counts)
    rows = [
        Row("generation, client-timed", "tok/s", [t.client_rate for t in ours],
            [t.client_rate for t in theirs], "rate", 0.99, note),
        Row("generation, engine-reported", "tok/s",
            [t.final["eval_count"] / (t.final["eval_duration"] / 1e9) for t in ours],
            [t.final["timings"]["predicted_per_second"] for t in theirs], "rate", 0.99,
            "ollama.py eval_count/eval_duration vs llama-server timings.predicted_per_second"),
        Row("last token -> end of stream", "ms", [(t.end - t.last) * 1e3 for t in ours],
            [(t.end - t.last) * 1e3 for t in theirs], "latency", 1.0,
            note="the final chunk's extra work (its `context`: the prompt's tokens, asked as the stream started)"),
        Row("serve CPU per token", "ms", cpu * 1e3 / sum(t.final["eval_count"] for t in ours), None, "info",
            note="CPU time of the `serve` process per generated token (it competes with llama-server for cores)"),
        Row("serve RSS after inference", "MB", rss_mb(rig.serve.proc.pid), None, "max", 30.0),
    ]
    return rows


def sec_ttft(b):
    rig = b.rig()
    direct = rig.start_direct()
    n = 1
    body = {"model": MODEL, "prompt": PROMPT, "options": options(n)}
    text = rig.rendered("/api/generate", body)
    raw = {"model": MODEL, "prompt": text, "raw": True, "options": options(n)}
    payload = direct_payload(options(n), text)
    templ, rawt, theirs = [], [], []
    stream(rig.serve.port, "/api/generate", body)
    stream(direct.port, "/completion", payload, sse=True)
    for _i in range(max(b.runs, 5) * 2):
        templ.append(stream(rig.serve.port, "/api/generate", body).ttft * 1e3)
        theirs.append(stream(direct.port, "/completion", payload, sse=True).ttft * 1e3)
        rawt.append(stream(rig.serve.port, "/api/generate", raw).ttft * 1e3)
        theirs.append(stream(direct.port, "/completion", payload, sse=True).ttft * 1e3)
    return [Row("TTFT loaded, as `run` sends it", "ms", templ, theirs, "latency", 5.0,
                "templated /api/generate (prompt rendered by ollama.py) vs /completion of the rendered text"),
            Row("TTFT loaded, raw prompt", "ms", rawt, theirs, "latency", 5.0,
                "/api/generate raw:true with the same rendered text")]


AGENT_PREFIX = 20000            # tokens: a coding agent's system prompt and tool schemas


def _agent_system(port, nonce):
    """A system prompt of about AGENT_PREFIX Gemma tokens shaped like an agent's (rules, then tool
    schemas), opened by `nonce` so that each run's turn 1 finds nothing cached."""
    def tool(i):
        return json.dumps({"name": "tool_%d" % i, "description": "Run step %d of the build and report what failed." % i,
                           "parameters": {"type": "object", "properties": {"path": {"type": "string"},
                                                                           "line": {"type": "integer"}}}})
    lines = ["Session %s. You are a coding agent working in a repository." % nonce]
    per = len(http_json(port, "POST", "/api/tokenize", {"model": MODEL, "text": tool(123)})["tokens"])
    lines += [tool(i) for i in range(AGENT_PREFIX // per)]
    return "\n".join(lines)


def sec_agent(b):
    b.drop_rig()
    serve = Serve(b, "serve-agent", env={"OLLAMA_CONTEXT_LENGTH": "32768"})
    # Gemma's chat template (Ollama's): the system prompt leads the first user turn, every turn is kept.
    template = (ROOT / "tests" / "data" / "templates" / "gemma3-instruct.gotmpl").read_text()
    import_model(serve.models, MODEL, b.gemma, template=template, params={"stop": ["<end_of_turn>"]})
    serve.start()
    try:
        http_json(serve.port, "POST", "/api/generate", {"model": MODEL, "stream": False})
        first, second, prompt = [], [], 0
        for i in range(min(b.runs, 2)):               # turn 1 is a minute or more on 2 cores
            system = _agent_system(serve.port, "%d-%d" % (os.getpid(), i))
            chat = [{"role": "system", "content": system}, {"role": "user", "content": "Which tool runs step 7?"}]
            t1 = stream(serve.port, "/api/chat", {"model": MODEL, "messages": chat, "options": options(8)})
            answer = t1.final.get("message", {}).get("content", "") or "tool_7"
            chat += [{"role": "assistant", "content": answer}, {"role": "user", "content": "And step 9?"}]
            t2 = stream(serve.port, "/api/chat", {"model": MODEL, "messages": chat, "options": options(8)})
            first.append(t1.ttft * 1e3)
            second.append(t2.ttft * 1e3)
            prompt = t2.final.get("prompt_eval_count", 0)
            log("  run %d: turn 1 %.0f ms, turn 2 %.0f ms (%d prompt tokens; engine prompt_eval %s / %s ms)"
                % (i + 1, first[-1], second[-1], prompt, t1.final.get("prompt_eval_duration", 0) // 10**6,
                   t2.final.get("prompt_eval_duration", 0) // 10**6))
    finally:
        serve.stop()
    return [Row("agent turn 1 TTFT, ~%dk-token prefix" % (AGENT_PREFIX // 1000), "ms", first, None, "info",
                note="/api/chat, model loaded, the prefix new to the runner; %d prompt tokens at turn 2" % prompt),
            Row("agent turn 2 TTFT vs turn 1", "ms", second, first, "slower", 0.2,
                note="the same prefix plus turn 1: the runner keeps the shared prefix, so only the new "
                     "tokens are evaluated (the `direct` column is turn 1 here, not llama-server)")]


def sec_cold(b):
    rig = b.rig()
    rig.stop_direct()
    port = rig.serve.port
    body = {"model": MODEL, "prompt": PROMPT, "options": options(1), "keep_alive": 0}
    payload = direct_payload(options(1), rig.rendered("/api/generate", dict(body, keep_alive="5m")))
    http_json(port, "POST", "/api/generate", {"model": MODEL, "keep_alive": 0, "stream": False})
    rig.serve.wait_unloaded()
    ours, theirs = [], []
    for _i in range(b.runs):
        ours.append(stream(port, "/api/generate", body).ttft * 1e3)
        rig.serve.wait_unloaded()
        d = Direct(b, rig.args, "direct-cold")
        t0 = time.perf_counter()
        d.launch()
        try:
            d.wait_ready()
            theirs.append(stream(d.port, "/completion", payload, sse=True, t0=t0).ttft * 1e3)
        finally:
            d.stop()
    return [Row("cold start to first token", "ms", ours, theirs, "latency", 100.0,
                "keep_alive 0 each run vs spawn llama-server, poll /health every %d ms, request" % (POLL * 1e3))]


def sec_concurrency(b):
    b.drop_rig()
    rig = Rig(b, parallel=4)
    rig.start()
    direct = rig.start_direct()
    n = N_PREDICT_PARALLEL
    bodies = [{"model": MODEL, "messages": [{"role": "user", "content": p}], "options": options(n)}
              for p in CHAT_PROMPTS]
    payloads = [direct_payload(options(n), rig.rendered("/api/chat", body)) for body in bodies]

    def burst(port, path, items, sse):
        results = [None] * len(items)
        errors = []
        start = threading.Barrier(len(items) + 1)

        def one(i):
            start.wait()
            try:
                results[i] = stream(port, path, items[i], sse=sse)
            except Exception as e:
                errors.append(e)

        threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(len(items))]
        for t in threads:
            t.start()
        start.wait()
        t0 = time.perf_counter()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        end = max(r.end for r in results)
        tokens = sum(r.final.get("eval_count") or r.final.get("timings", {}).get("predicted_n", 0) for r in results)
        return tokens / (end - t0), tokens

    # warm-up, one token each: fills both prompt caches
    burst(rig.serve.port, "/api/chat", [dict(x, options=options(1)) for x in bodies], False)
    burst(direct.port, "/completion", [dict(x, n_predict=1) for x in payloads], True)
    ours, theirs, counts = [], [], set()
    for i in range(b.runs):
        rate, tokens = burst(rig.serve.port, "/api/chat", bodies, False)
        ours.append(rate)
        counts.add(tokens)
        rate, tokens = burst(direct.port, "/completion", payloads, True)
        theirs.append(rate)
        counts.add(tokens)
        log("  burst %d: ollama.py %.1f tok/s, direct %.1f tok/s" % (i + 1, ours[-1], theirs[-1]))
    note = "4 streams x %d tokens, wall clock from request to the last final event" % n
    if counts != {4 * n}:
        note += "; total tokens per burst: %s" % sorted(counts)
    rig.stop()
    return [Row("4 parallel chats, aggregate", "tok/s", ours, theirs, "rate", 0.95, note)]


def write_fake_models(models_dir, n):
    """n tiny models (a GGUF header without tensors as the 'model' layer plus a config) written with
    Store: listable as a real store's are (list reads each GGUF's header), not loadable."""
    store = project.Store(models_dir)
    Path(models_dir).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        path = Path(models_dir) / ("fake-%d.gguf" % i)
        project.write_gguf(path, [("general.architecture", 8, "llama"), ("general.name", 8, "fake %d" % i),
                                  ("llama.context_length", 4, 2048), ("llama.embedding_length", 4, 64),
                                  ("llama.block_count", 4, 1)], [])
        with open(str(path), "rb") as f:
            digest, size = store.write_blob(f)
        path.unlink()
        cd, cs = store.write_blob_bytes(json.dumps({"model_format": "gguf", "model_family": "llama",
                                                    "model_type": "%dM" % (i + 1), "file_type": "Q4_0"}).encode())
        store.write_manifest(project.Name.parse("bench-model-%02d:latest" % i), {
            "schemaVersion": 2, "mediaType": project.MEDIA_MANIFEST,
            "config": {"mediaType": project.MEDIA_CONFIG, "digest": cd, "size": cs},
            "layers": [{"mediaType": project.MEDIA_PREFIX + "model", "digest": digest, "size": size}]})


LAUNCH = "import sys; sys.path.insert(0, sys.argv.pop(1)); import ollama; sys.exit(ollama.main())"   # bin/ollama's


def sec_footprint(b):
    serve = Serve(b, "serve-footprint")
    write_fake_models(serve.models, FAKE_MODELS)
    serve.start()
    time.sleep(0.5)
    fresh = rss_mb(serve.proc.pid)
    # bare interpreter, for scale
    ref = b.procs.start([sys.executable, "-c", "import time; time.sleep(60)"], b.workdir / "ref.log")
    time.sleep(0.3)
    ref_rss = rss_mb(ref.pid)
    b.procs.stop(ref)
    # a copy with a fresh bytecode cache, as build_llama.sh leaves it (whatever PYTHONDONTWRITEBYTECODE says)
    entry_dir = b.workdir / "entry"
    entry_dir.mkdir()
    shutil.copy(b.ollama_py, str(entry_dir / "ollama.py"))
    subprocess.run([sys.executable, "-c", "import py_compile, sys; py_compile.compile(sys.argv[1], doraise=True)",
                    str(entry_dir / "ollama.py")], check=True)
    cached = Serve(b, "serve-footprint-cached", models=serve.models)
    cached.proc = b.procs.start([sys.executable, str(entry_dir / "ollama.py"), "serve"], cached.log_path,
                                env=cached.env, cwd=str(cached.dir))
    wait_http(cached.port, "/", cached.proc, timeout=60, poll=0.02)
    rows = []
    runs = max(b.runs, 5)
    ours, base, base_s, version, entry, entry_version, note = [], [], [], [], [], [], ""
    timed_run([sys.executable, "-c", "pass"])
    launcher = [sys.executable, "-S", "-c", LAUNCH, str(entry_dir)]
    try:
        wall, cp = serve.cli("list")
        check_cli(cp, "ollama.py list")
        listed = [ln for ln in cp.stdout.decode().splitlines()[1:] if ln.strip()]
        if len(listed) != FAKE_MODELS:
            note = "list printed %d models, expected %d" % (len(listed), FAKE_MODELS)
        check_cli(timed_run(launcher + ["list"], env=serve.env)[1], "bin/ollama list")
        for _i in range(runs):
            ours.append(serve.cli("list")[0] * 1e3)
            base.append(timed_run([sys.executable, "-c", "pass"])[0] * 1e3)
            entry.append(timed_run(launcher + ["list"], env=serve.env)[0] * 1e3)
            version.append(serve.cli("--version")[0] * 1e3)
            base_s.append(timed_run([sys.executable, "-S", "-c", "pass"])[0] * 1e3)
            entry_version.append(timed_run(launcher + ["--version"], env=serve.env)[0] * 1e3)
        rows.append(Row("`list` of %d models, wall" % FAKE_MODELS, "ms", ours, base, "slower", 1.5,
                        note or "`python3 ollama.py list` (a script: compiled at every start) vs `python3 -c pass`"))
        rows.append(Row("`list` via bin/ollama", "ms", median(entry), median(base), "slower", 1.5,
                        note="bin/ollama's command (python3 -S, `import ollama` from a fresh bytecode cache)"))
    except NotAvailable as e:
        for _i in range(runs):
            base.append(timed_run([sys.executable, "-c", "pass"])[0] * 1e3)
            version.append(serve.cli("--version")[0] * 1e3)
            base_s.append(timed_run([sys.executable, "-S", "-c", "pass"])[0] * 1e3)
            entry_version.append(timed_run(launcher + ["--version"], env=serve.env)[0] * 1e3)
        rows.append(Row("`list` of %d models, wall" % FAKE_MODELS, "ms", None, median(base), "slower", 1.5, str(e)))
    rows.append(Row("`--version` wall (import floor)", "ms", median(version), median(base), "info",
                    note="python3 ollama.py --version vs python3 -c pass: the CLI's start-up cost"))
    rows.append(Row("`--version` via bin/ollama", "ms", median(entry_version), median(base), "slower", 1.5,
                    note="as `list` via bin/ollama"))
    rows.append(Row("`python3 -S -c pass` (floor without site)", "ms", median(base_s), median(base), "info",
                    note="what `site` costs this python3 at every start (bin/ollama runs without it)"))
    idle = rss_mb(serve.proc.pid)
    idle_cached = rss_mb(cached.proc.pid)
    rows.insert(0, Row("serve RSS idle", "MB", idle, ref_rss, "slower", 1.6,
                       "`python3 ollama.py serve` after start and %d list calls (%.1f MB fresh); direct = bare "
                       "python3; it carries on from bytecode when the cache is fresh, else compiles" % (runs, fresh)))
    rows.insert(1, Row("serve RSS idle, fresh bytecode cache", "MB", idle_cached, ref_rss, "slower", 1.6,
                       "`python3 ollama.py serve` next to the cache build_llama.sh writes (idle, no calls)"))
    cached.stop()
    serve.stop()
    return rows


def _ensure_registry(b):
    """A loopback docker-registry holding library/gemma3:270m (Gemma's blob, a config, a manifest),
    pushed with the OCI API. Returns (port, blob digest, blob size)."""
    if b.registry is not None:
        return b.registry
    exe = shutil.which("docker-registry") or "/usr/bin/docker-registry"
    if not os.path.exists(exe):
        raise NotAvailable("docker-registry not installed")
    port = free_port()
    root = b.workdir / "registry"
    root.mkdir()
    cfg = root / "config.yml"
    cfg.write_text("version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n"
                   "  filesystem:\n    rootdirectory: %s\n  delete:\n    enabled: true\nhttp:\n"
                   "  addr: 127.0.0.1:%d\n" % (root / "data", port))
    proc = b.procs.start([exe, "serve", cfg], root / "registry.log")
    wait_http(port, "/v2/", proc, timeout=30, poll=0.05)
    base = "http://127.0.0.1:%d/v2/library/gemma3" % port

    def upload(digest, size, data):
        req = urllib.request.Request(base + "/blobs/uploads/", method="POST", data=b"")
        with urllib.request.urlopen(req) as resp:
            loc = urllib.parse.urljoin(base, resp.headers["Location"])
        loc += ("&" if "?" in loc else "?") + "digest=" + urllib.parse.quote(digest)
        req = urllib.request.Request(loc, method="PUT", data=data, headers={
            "Content-Type": "application/octet-stream", "Content-Length": str(size)})
        with urllib.request.urlopen(req) as resp:
            if resp.status != 201:
                raise BenchError("blob upload -> %d" % resp.status)

    h = hashlib.sha256()
    with open(b.gemma, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    digest, size = "sha256:" + h.hexdigest(), os.path.getsize(b.gemma)
    with open(b.gemma, "rb") as f:
        upload(digest, size, f)
    cfg_bytes = json.dumps({"model_format": "gguf", "model_family": "gemma3", "model_families": ["gemma3"],
                            "model_type": "268M", "file_type": "Q4_K_M"}).encode()
    cfg_digest = "sha256:" + hashlib.sha256(cfg_bytes).hexdigest()
    upload(cfg_digest, len(cfg_bytes), cfg_bytes)
    manifest = json.dumps({"schemaVersion": 2, "mediaType": project.MEDIA_MANIFEST,
                           "config": {"mediaType": project.MEDIA_CONFIG, "digest": cfg_digest, "size": len(cfg_bytes)},
                           "layers": [{"mediaType": project.MEDIA_PREFIX + "model", "digest": digest, "size": size}]
                           }).encode()
    req = urllib.request.Request(base + "/manifests/270m", method="PUT", data=manifest,
                                 headers={"Content-Type": project.MEDIA_MANIFEST})
    with urllib.request.urlopen(req) as resp:
        if resp.status != 201:
            raise BenchError("manifest upload -> %d" % resp.status)
    b.registry = (port, digest, size)
    return b.registry


def _store_serve(b):
    if b.store_serve is None:
        b.store_serve = Serve(b, "serve-store").start()
    return b.store_serve


def _wipe_store(serve):
    for sub in ("blobs", "manifests"):
        shutil.rmtree(str(serve.models / sub), ignore_errors=True)


def sec_pull(b):
    port, digest, size = _ensure_registry(b)
    serve = _store_serve(b)
    name = "127.0.0.1:%d/library/gemma3:270m" % port
    url = "http://127.0.0.1:%d/v2/library/gemma3/blobs/%s" % (port, digest)
    curl = shutil.which("curl")
    if curl is None:
        raise NotAvailable("curl not installed")
    _wipe_store(serve)
    wall, cp = serve.cli("pull", name, "--insecure")            # warm-up; also: is pull there at all?
    check_cli(cp, "ollama.py pull --insecure")
    if not (serve.models / "blobs" / digest.replace(":", "-")).is_file():
        raise BenchError("pull exited 0 but the blob is not in the store")
    ours, theirs, floor = [], [], []
    timed_run([curl, "-s", "-o", "/dev/null", url])
    target = b.workdir / "curl.blob"
    # the same work a verified, durable download must do: fetch to a file, hash it, flush it
    hasher = "openssl dgst -sha256" if shutil.which("openssl") else "sha256sum"   # openssl uses SHA-NI
    floor_cmd = ["sh", "-c", 'curl -s -f -o "$1" "$2" && %s "$1" >/dev/null && sync "$1"' % hasher, "sh",
                 target, url]
    for _i in range(b.runs):
        _wipe_store(serve)
        wall, cp = serve.cli("pull", name, "--insecure")
        check_cli(cp, "ollama.py pull")
        ours.append(size / 1e6 / wall)
        wall, cp = timed_run([curl, "-s", "-f", "-o", "/dev/null", url])
        if cp.returncode:
            raise BenchError("curl exited %d" % cp.returncode)
        theirs.append(size / 1e6 / wall)
        wall, cp = timed_run(floor_cmd)
        if cp.returncode:
            raise BenchError("curl + sha256sum exited %d" % cp.returncode)
        floor.append(size / 1e6 / wall)
        target.unlink()
    _wipe_store(serve)
    mb = size // 1e6
    return [Row("pull %d MB blob, loopback registry" % mb, "MB/s", ours, theirs, "rate", 0.8,
                "whole `ollama.py pull` command (manifest, blob to disk, verify) vs `curl -s -o /dev/null`"),
            Row("pull %d MB blob vs curl+sha256+sync" % mb, "MB/s", median(ours), median(floor), "info",
                note="direct = curl to a file, `%s` it, sync it: the floor for a verified, durable pull" % hasher)]


def sec_lan(b):
    """A LAN pull: serve B pulls Gemma from serve A (its /v2 registry) vs curl of the same blob from A."""
    curl = shutil.which("curl")
    if curl is None:
        raise NotAvailable("curl not installed")
    a = Serve(b, "serve-lan-a")
    import_model(a.models, MODEL, b.gemma)
    a.start()
    try:
        url = "http://127.0.0.1:%d/v2/library/%s/manifests/%s" % ((a.port,) + tuple(MODEL.split(":")))
        try:
            with urllib.request.urlopen(url) as resp:
                layer = json.loads(resp.read())["layers"][0]
        except urllib.error.HTTPError as e:
            raise NotAvailable("serve answers no /v2 registry (%d)" % e.code) from None
        digest, size = layer["digest"], layer["size"]
        blob = "http://127.0.0.1:%d/v2/library/%s/blobs/%s" % (a.port, MODEL.split(":")[0], digest)
        serve = _store_serve(b)
        name = "127.0.0.1:%d/library/%s" % (a.port, MODEL)
        _wipe_store(serve)
        wall, cp = serve.cli("pull", "--insecure", name)        # warm-up: A hashes the blob on its first serve
        check_cli(cp, "ollama.py pull --insecure (LAN)")
        timed_run([curl, "-s", "-o", "/dev/null", blob])
        target = b.workdir / "curl-lan.blob"
        hasher = "openssl dgst -sha256" if shutil.which("openssl") else "sha256sum"
        floor_cmd = ["sh", "-c", 'curl -s -f -o "$1" "$2" && %s "$1" >/dev/null && sync "$1"' % hasher, "sh",
                     target, blob]
        ours, theirs, floor = [], [], []
        for _i in range(b.runs):
            _wipe_store(serve)
            wall, cp = serve.cli("pull", "--insecure", name)
            check_cli(cp, "ollama.py pull (LAN)")
            ours.append(size / 1e6 / wall)
            for cmd, out in (([curl, "-s", "-f", "-o", "/dev/null", blob], theirs), (floor_cmd, floor)):
                wall, cp = timed_run(cmd)
                if cp.returncode:
                    raise BenchError("%s exited %d" % (cmd[0], cp.returncode))
                out.append(size / 1e6 / wall)
            target.unlink()
        _wipe_store(serve)
    finally:
        a.stop()
    return [Row("LAN pull %d MB blob, serve A -> serve B" % (size // 1e6), "MB/s", ours, theirs, "rate", 0.8,
                "whole `ollama.py pull --insecure A/library/...` into B (blob to disk, verify) vs `curl -s -o "
                "/dev/null` of the blob from A's /v2"),
            Row("LAN pull %d MB blob vs curl+sha256+sync" % (size // 1e6), "MB/s", median(ours), median(floor),
                "info", note="direct = curl of the blob from A to a file, `%s` it, sync it" % hasher)]


def sec_create(b):
    serve = _store_serve(b)
    modelfile = b.workdir / "Modelfile"
    modelfile.write_text("FROM %s\n" % b.gemma)
    copy = b.workdir / "copy.gguf"
    _wipe_store(serve)
    wall, cp = serve.cli("create", "bench-gemma", "-f", modelfile)
    check_cli(cp, "ollama.py create")
    ours, theirs = [], []
    for _i in range(b.runs):
        _wipe_store(serve)
        wall, cp = serve.cli("create", "bench-gemma", "-f", modelfile)
        check_cli(cp, "ollama.py create")
        ours.append(wall * 1e3)
        t0 = time.perf_counter()
        r1 = subprocess.run(["sha256sum", b.gemma], capture_output=True)
        r2 = subprocess.run(["cp", b.gemma, copy])
        theirs.append((time.perf_counter() - t0) * 1e3)
        copy.unlink()
        if r1.returncode or r2.returncode:
            raise BenchError("sha256sum/cp failed")
    _wipe_store(serve)
    return [Row("create from the 253 MB GGUF", "ms", ours, theirs, "info",
                note="`ollama.py create NAME -f Modelfile` (FROM /path.gguf) vs sha256sum + cp of the file")]


def sec_layout(b):
    """Gemma in Ollama's converter layout (fixtures.write_ollama_gemma3: the same tensors) vs the llama.cpp
    file, both loaded by one serve, alternating, files in the page cache: what translating it costs at load."""
    import fixtures
    theirs_path = b.workdir / "gemma3-ollama.gguf"
    fixtures.write_ollama_gemma3(b.gemma, theirs_path)
    serve = Serve(b, "serve-layout")
    import_model(serve.models, "cpp", b.gemma)
    import_model(serve.models, "ollama", theirs_path)
    serve.start()
    try:
        body = {"prompt": PROMPT, "options": options(1), "keep_alive": 0}
        for name in ("cpp", "ollama"):               # first loads: page cache, bytecode, edits written once
            stream(serve.port, "/api/generate", dict(body, model=name))
            serve.wait_unloaded()
        ours, theirs = [], []
        for _i in range(max(b.runs, 5)):
            for name, out in (("ollama", ours), ("cpp", theirs)):
                out.append(stream(serve.port, "/api/generate", dict(body, model=name)).ttft * 1e3)
                serve.wait_unloaded()
        views = serve.models / ".ollama-py" / "views"
        extra = sum(p.stat().st_size for p in views.rglob("*") if p.is_file() and not p.is_symlink())
    finally:
        serve.stop()
    size = theirs_path.stat().st_size
    return [Row("warm load, Ollama's gemma3 layout", "ms", ours, theirs, "slower", 1.05,
                "load to first token, keep_alive 0 each run: Ollama's layout (translated) vs llama.cpp's file"),
            Row("extra disk for the translation", "bytes", extra, None, "max", size // 100,
                "the view (a link and its .edits sidecar); the limit is 1%% of the %d MB blob" % (size >> 20))]


def sec_draft(b):
    """Gemma with a DRAFT layer (itself: the only model here sharing its vocabulary, so every draft is
    accepted: the mechanism's ceiling) vs without, one serve, alternating; the greedy texts must match."""
    serve = Serve(b, "serve-draft")
    import_model(serve.models, "plain", b.gemma)
    serve.start()
    try:
        modelfile = b.workdir / "Modelfile.draft"
        modelfile.write_text("FROM plain\nDRAFT %s\n" % b.gemma)
        check_cli(serve.cli("create", "drafted", "-f", modelfile)[1], "ollama.py create with DRAFT")
        body = {"prompt": PROMPT, "options": options(N_PREDICT)}
        texts = {}
        for name in ("plain", "drafted"):
            out = http_json(serve.port, "POST", "/api/generate", dict(body, model=name, stream=False))
            texts[name] = out["response"]
        ours, theirs = [], []
        for _i in range(b.runs):
            ours.append(stream(serve.port, "/api/generate", dict(body, model="drafted")).client_rate)
            theirs.append(stream(serve.port, "/api/generate", dict(body, model="plain")).client_rate)
    finally:
        serve.stop()
    same = "greedy text identical" if texts["plain"] == texts["drafted"] else "GREEDY TEXT DIFFERS"
    return [Row("generation with a DRAFT layer", "tok/s", ours, theirs, "info",
                note="%s; draft = the model itself (100%% accepted), plain = no draft, both through serve" % same)]


#: A copy-heavy answer: Gemma 3 270M asked to rewrite a small file gives the file back (it leaves the one
#: change out, but the answer is the file's tokens again, which is what n-gram speculation drafts from).
COPY_FILE = '''import json


def load(path):
    """Read the settings file at `path` and return its values."""
    with open(path) as f:
        return json.load(f)


def save(path, values):
    """Write `values` to the settings file at `path`."""
    with open(path, "w") as f:
        json.dump(values, f, indent=2)


def merge(base, extra):
    """Return `base` updated with `extra`, without changing either."""
    out = dict(base)
    out.update(extra)
    return out
'''
COPY_PROMPT = ("<start_of_turn>user\nRepeat this Python file exactly, with indent=4 instead of indent=2:\n\n"
               "```python\n%s```<end_of_turn>\n<start_of_turn>model\n" % COPY_FILE)
PROSE_PROMPT = "<start_of_turn>user\n%s<end_of_turn>\n<start_of_turn>model\n" % PROMPT
N_COPY = 160                    # tokens: about the file once (Gemma's tokens), so the answer is the copy


def sec_speculative(b):
    """n-gram speculation (llama-server --spec-type, no draft model) vs off: one serve per setting, the same
    Gemma blob, raw prompts, greedy; runs alternate off, ngram-mod, ngram-simple. The copy task is what it
    is for; prose must not get slower (the default is on only where prose stays >= 0.98x)."""
    kinds = ("off", "ngram-mod", "ngram-simple")
    serves = {}
    try:
        for kind in kinds:
            serves[kind] = Serve(b, "serve-spec-" + kind, env={"OLLAMA_SPECULATIVE": kind})
            import_model(serves[kind].models, MODEL, b.gemma)
            serves[kind].start()
        tasks = {"copy": (COPY_PROMPT, N_COPY), "prose": (PROSE_PROMPT, N_PREDICT)}
        texts, rates = {}, {}
        for kind, serve in serves.items():             # load, warm the prompt cache, and the greedy texts
            for task, (prompt, n) in tasks.items():
                body = {"model": MODEL, "prompt": prompt, "raw": True, "stream": False, "options": options(n)}
                texts[kind, task] = http_json(serve.port, "POST", "/api/generate", body, timeout=600)["response"]
        args = {kind: serve.runner_args() for kind, serve in serves.items()}
        for i in range(b.runs):
            for task, (prompt, n) in tasks.items():
                for kind, serve in serves.items():
                    body = {"model": MODEL, "prompt": prompt, "raw": True, "options": options(n)}
                    rates.setdefault((kind, task), []).append(stream(serve.port, "/api/generate", body).client_rate)
                log("  run %d %s: %s" % (i + 1, task, ", ".join("%s %.1f tok/s" % (k, rates[k, task][-1] or 0)
                                                              for k in kinds)))
    finally:
        for serve in serves.values():
            serve.stop()
    rows = []
    for kind in kinds[1:]:
        flags = args[kind][args[kind].index("--spec-type"):][:2] if "--spec-type" in args[kind] else ["(no flag)"]
        for task, limit in (("copy", 1.5), ("prose", 0.98)):
            same = texts[kind, task] == texts["off", task]
            rows.append(Row("%s task, %s vs off" % (task, kind), "tok/s", rates[kind, task], rates["off", task],
                            "rate", limit, "%s; greedy text %s" % (" ".join(flags),
                                                                   "identical" if same else "DIFFERS")))
    return rows


def sec_rpc(b):
    """Gemma split over two `ollama.py worker`s on loopback vs kept local (num_gpu 0), one serve, alternating.
    A loss is expected: every token's activations cross to each worker and back."""
    engine = Path(b.engine)
    if not os.access(str(engine.with_name("rpc-server")), os.X_OK):
        raise NotAvailable("no rpc-server beside %s (build_llama.sh --no-rpc?)" % engine)
    addresses = []
    for i in range(2):
        port = free_port()
        serve_env = clean_env({"HOME": str(b.workdir), "OLLAMA_LLAMA_SERVER": b.engine})
        proc = b.procs.start([sys.executable, b.ollama_py, "worker", "--port", port, "--threads", "1"],
                             b.workdir / ("worker-%d.log" % i), env=serve_env)
        deadline = time.monotonic() + 60
        while not project.rpc_worker_answers("127.0.0.1:%d" % port, 0.2):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise BenchError("worker %d did not start (see worker-%d.log)" % (i, i))
            time.sleep(0.05)
        addresses.append("127.0.0.1:%d" % port)
    serve = Serve(b, "serve-rpc", env={"OLLAMA_RPC_SERVERS": ",".join(addresses)})
    import_model(serve.models, MODEL, b.gemma)
    serve.start()
    local, split = [], []
    try:
        for i in range(b.runs):
            for opts, out in (({"num_gpu": 0}, local), ({}, split)):      # num_gpu is a load option: reloads
                body = {"model": MODEL, "prompt": PROMPT, "options": dict(options(N_PREDICT), **opts)}
                out.append(stream(serve.port, "/api/generate", body).client_rate)
            log("  run %d: split %.1f tok/s, local %.1f tok/s" % (i + 1, split[-1] or 0, local[-1] or 0))
    finally:
        serve.stop()
    return [Row("generation split over 2 loopback RPC workers", "tok/s", split, local, "info",
                note="direct column: the same serve with every layer local (num_gpu 0); info only")]


#: A prompt of about 400 tokens for prompt-processing rates; each run puts its own number first, so no
#: run reuses another's cached prefix.
REPACK_PROMPT = " ".join([PROMPT] * 16)
N_REPACK = 32                   # generated tokens per run
#: One thread: the kernels' cost, without the noise of threads waiting on each other on a shared machine.
REPACK_OPTIONS = dict(options(1), num_thread=1)


def _repack_models(b):
    """(label, GGUF) of the models the repack section runs: Gemma as shipped (Q4_K_M: on x86 only its
    Q4_K matrices, attn_output and half of ffn_down, are repacked), Gemma requantized to Q4_0 (every
    matrix repacked), and a random-weight llama, 1024 wide, in Q4_K_M (nearly every matrix Q4_K, as in
    the 7B Q4_K_M models most users run)."""
    quantize = Path(b.engine).with_name("llama-quantize")
    if not os.access(str(quantize), os.X_OK):
        raise NotAvailable("no llama-quantize beside %s" % b.engine)
    try:
        import fixtures
    except ImportError:
        raise NotAvailable("needs tests/fixtures.py (write_tiny_gguf)") from None
    q4_0 = b.workdir / "gemma-q4_0.gguf"
    wide = b.workdir / "llama-1024-f16.gguf"
    wide_q = b.workdir / "llama-1024-q4_k_m.gguf"
    fixtures.write_tiny_gguf(wide, n_embd=1024, n_layer=8, n_head=8, n_ff=2816, name="llama-1024")
    for src, dst, kind in ((b.gemma, q4_0, "Q4_0"), (wide, wide_q, "Q4_K_M")):
        cp = subprocess.run([str(quantize), "--allow-requantize", str(src), str(dst), kind], capture_output=True,
                            timeout=600)
        if cp.returncode != 0:
            raise BenchError("llama-quantize %s: %s" % (kind, cp.stderr[-300:].decode(errors="replace")))
    wide.unlink()
    return [("gemma3 270M Q4_K_M", b.gemma), ("gemma3 270M Q4_0", str(q4_0)), ("llama 1024x8 Q4_K_M", str(wide_q))]


def sec_repack(b):
    """OLLAMA_REPACK=0 (no repacking: what RPC workers compute with, and the auto default on a serve with
    workers) vs 1 (llama.cpp's default), one serve each over one store, alternating, raw prompts, greedy,
    one thread. The ratio is the cost of computing what a split computes; the engine's own timings."""
    models = _repack_models(b)
    store = b.workdir / "repack-models"
    for i, (_label, gguf) in enumerate(models):
        import_model(store, "m%d" % i, gguf)
    serves = {}
    rates = {}
    try:
        for setting in ("1", "0"):
            serves[setting] = Serve(b, "serve-repack-" + setting, models=store, env={"OLLAMA_REPACK": setting}).start()
        for serve in serves.values():                  # load every model (warm), one token each
            for i in range(len(models)):
                http_json(serve.port, "POST", "/api/generate", {"model": "m%d" % i, "prompt": "Hi", "raw": True,
                                                                 "stream": False, "options": REPACK_OPTIONS})
        flags = {k: "--no-repack" in s.runner_args() for k, s in serves.items()}
        if flags != {"1": False, "0": True}:
            raise BenchError("OLLAMA_REPACK did not decide --no-repack: %s" % flags)
        for run in range(b.runs):
            for i, (label, _gguf) in enumerate(models):
                for setting, serve in serves.items():
                    body = {"model": "m%d" % i, "prompt": "Run %d. %s" % (run, REPACK_PROMPT), "raw": True,
                            "options": dict(REPACK_OPTIONS, num_predict=N_REPACK)}
                    final = stream(serve.port, "/api/generate", body).final
                    rates.setdefault((label, "prompt", setting), []).append(
                        final["prompt_eval_count"] / (final["prompt_eval_duration"] / 1e9))
                    rates.setdefault((label, "generation", setting), []).append(
                        final["eval_count"] / (final["eval_duration"] / 1e9))
                log("  run %d %s: prompt %.0f vs %.0f tok/s, generation %.1f vs %.1f tok/s (no repack vs repack)" % (
                    run + 1, label, rates[label, "prompt", "0"][-1], rates[label, "prompt", "1"][-1],
                    rates[label, "generation", "0"][-1], rates[label, "generation", "1"][-1]))
    finally:
        for serve in serves.values():
            serve.stop()
    rows = []
    for label, _gguf in models:
        for phase in ("prompt", "generation"):
            rows.append(Row("%s %s, no repack vs repack" % (label, phase), "tok/s", rates[label, phase, "0"],
                            rates[label, phase, "1"], "info",
                            "engine timings, 1 thread; direct column = OLLAMA_REPACK=1 (llama.cpp's default)"))
    return rows
PC_PREFIX = 4096                # tokens of agent prefix: ~40 s to compute on 2 busy cores, so a run is ~2 min
PC_MODEL = "pc-llama"
PC_GEMMA = "pc-gemma"           # Gemma 3 270M: a sliding window, cached only by a build_llama.sh engine (swa_reuse)


def _pc_model(b):
    """A Gemma-3-270M-sized llama (640 wide, 18 layers, one KV head; random f16 weights, llama's 32k vocab):
    the same size without Gemma 3's sliding window, whose restored state llama-server reuses only with
    build_llama.sh's swa_reuse fix (the Gemma row of sec_promptcache)."""
    try:
        import fixtures
    except ImportError as e:
        raise BenchError("tests/fixtures.py cannot write the model: %s" % e) from None
    path = b.workdir / "pc-llama-270m.gguf"
    if not path.exists():
        fixtures.write_tiny_gguf(path, n_embd=640, n_layer=18, n_head=4, n_head_kv=1, n_ff=2048,
                                 n_ctx_train=16384, seed=1, name="bench-llama-270m")
    return path


def _pc_turns(port, model=PC_MODEL, prefix=PC_PREFIX):
    """Turn 1's raw prompt: an agent's `prefix`-token system prompt (rules, then tool schemas), unique to this
    run, and a question; each later turn is the one before it plus its answer and a question."""
    def tool(i):
        return json.dumps({"name": "tool_%d" % i, "description": "Run step %d of the build and report what failed." % i,
                           "parameters": {"type": "object", "properties": {"path": {"type": "string"},
                                                                           "line": {"type": "integer"}}}})
    per = len(http_json(port, "POST", "/api/tokenize", {"model": model, "text": tool(123)})["tokens"])
    system = "\n".join(["Session %d-%f. You are a coding agent." % (os.getpid(), time.time())] +
                        [tool(i) for i in range(prefix // per)])
    return system + "\nUser: which tool runs step 7?\nAgent:"


def _pc_wait_unloaded(serve, model=PC_MODEL):
    http_json(serve.port, "POST", "/api/generate", {"model": model, "keep_alive": 0, "stream": False})
    serve.wait_unloaded(timeout=120)              # the runner saves its slot before it stops


def _pc_gemma(b, serve, root, runs):
    """Gemma 3 270M's first turn after a runner restart, saved prefix vs none: (restored ms, cold ms), empty
    where the engine saved nothing (no swa_reuse fix). Half the llama's prefix: still 4x Gemma's
    512-token window, and each cold turn costs ~20 s more on 2 busy cores."""
    body = {"model": PC_GEMMA, "raw": True, "options": options(8)}
    restored, cold = [], []
    for i in range(runs):
        turn1 = _pc_turns(serve.port, PC_GEMMA, PC_PREFIX // 2)
        t1 = stream(serve.port, "/api/generate", dict(body, prompt=turn1))
        turn2 = turn1 + "".join(t1.pieces) + "\nUser: and step 9?\nAgent:"
        _pc_wait_unloaded(serve, PC_GEMMA)
        files = sorted(root.glob("*/*.slot"))
        if not files:
            log("  gemma: nothing saved (the engine has no swa_reuse fix: build_llama.sh): row left out")
            return [], []
        r = stream(serve.port, "/api/generate", dict(body, prompt=turn2))      # runner start + restore
        _pc_wait_unloaded(serve, PC_GEMMA)
        for f in root.glob("*/*.slot"):
            f.unlink()
        c = stream(serve.port, "/api/generate", dict(body, prompt=turn2))      # runner start, all computed
        _pc_wait_unloaded(serve, PC_GEMMA)
        if "".join(r.pieces) != "".join(c.pieces):
            raise BenchError("gemma: the restored turn's text differs from the cold run's")
        restored.append(r.ttft * 1e3)
        cold.append(c.ttft * 1e3)
        log("  gemma run %d: after a restart: saved %.0f ms, none %.0f ms (%d prompt tokens, %.0f MB saved)"
            % (i + 1, restored[-1], cold[-1], c.final.get("prompt_eval_count", 0), files[0].stat().st_size / 1e6))
    return restored, cold


def sec_promptcache(b):
    b.drop_rig()
    serve = Serve(b, "serve-promptcache", env={"OLLAMA_CONTEXT_LENGTH": "8192"})
    import_model(serve.models, PC_MODEL, _pc_model(b))
    import_model(serve.models, PC_GEMMA, b.gemma)
    serve.start()
    body = {"model": PC_MODEL, "raw": True, "options": options(8)}
    t1s, t2s, restored, cold, direct, live, live_direct = [], [], [], [], [], [], []
    saved = b.workdir / "pc-saved.slot"
    try:
        for i in range(min(b.runs, 2)):
            http_json(serve.port, "POST", "/api/generate", {"model": PC_MODEL, "stream": False})
            args = serve.runner_args()
            folder = Path(args[args.index("--slot-save-path") + 1])
            turn1 = _pc_turns(serve.port)
            t1 = stream(serve.port, "/api/generate", dict(body, prompt=turn1))
            turn2 = turn1 + "".join(t1.pieces) + "\nUser: and step 9?\nAgent:"
            t2 = stream(serve.port, "/api/generate", dict(body, prompt=turn2))
            turn3 = turn2 + "".join(t2.pieces) + "\nUser: run it.\nAgent:"
            _pc_wait_unloaded(serve)
            files = sorted(folder.glob("*.slot"))
            if len(files) != 1:
                raise BenchError("expected one saved slot in %s, found %d" % (folder, len(files)))
            shutil.copyfile(str(files[0]), str(saved))
            r = stream(serve.port, "/api/generate", dict(body, prompt=turn3))      # runner start + restore
            _pc_wait_unloaded(serve)
            for f in folder.glob("*.slot"):
                f.unlink()
            c = stream(serve.port, "/api/generate", dict(body, prompt=turn3))      # runner start, all computed
            turn4 = turn3 + "".join(c.pieces) + "\nUser: thanks.\nAgent:"
            live.append(stream(serve.port, "/api/generate", dict(body, prompt=turn4)).ttft * 1e3)
            _pc_wait_unloaded(serve)
            for f in folder.glob("*.slot"):
                f.unlink()
            shutil.copyfile(str(saved), str(folder / "bench-direct.slot"))
            d = Direct(b, args, "direct-promptcache")
            t0 = time.perf_counter()
            d.launch()
            try:
                d.wait_ready()
                status, raw = http_call(d.port, "POST", "/slots/0?action=restore", {"filename": "bench-direct.slot"})
                if status != 200:
                    raise BenchError("llama-server restore: %s %s" % (status, raw[:200]))
                payload = direct_payload(options(8), turn3)
                dr = stream(d.port, "/completion", payload, sse=True, t0=t0)
                direct.append(dr.ttft * 1e3)
                turn4 = turn3 + "".join(dr.pieces) + "\nUser: thanks.\nAgent:"
                live_direct.append(stream(d.port, "/completion", direct_payload(options(8), turn4), sse=True).ttft
                                   * 1e3)
            finally:
                d.stop()
                _unlink_quiet(folder / "bench-direct.slot")
            t1s.append(t1.ttft * 1e3)
            t2s.append(t2.ttft * 1e3)
            restored.append(r.ttft * 1e3)
            cold.append(c.ttft * 1e3)
            log("  run %d: turn 1 %.0f ms, turn 2 %.0f ms; after a restart: saved %.0f ms, none %.0f ms, "
                "direct with the saved file %.0f ms (%d prompt tokens at turn 3, %s saved)"
                % (i + 1, t1s[-1], t2s[-1], restored[-1], cold[-1], direct[-1], c.final.get("prompt_eval_count", 0),
                   "%.0f MB" % (saved.stat().st_size / 1e6)))
        for f in folder.glob("*.slot"):
            f.unlink()
        g_restored, g_cold = _pc_gemma(b, serve, folder.parent, min(b.runs, 2))
    finally:
        serve.stop()
    size = "~%dk-token prefix, a 270M-sized llama" % (PC_PREFIX // 1000)
    return [Row("agent turn 2 TTFT vs turn 1, %s" % size, "ms", t2s, t1s, "slower", 0.2,
                note="live runner: only the new tokens are computed (`direct` is turn 1)"),
            Row("first turn after a runner restart, saved prefix vs none", "ms", restored, cold, "slower", 0.10,
                note="model unloaded after turn 2 (keep_alive 0), then turn 3: runner start + restore of "
                     "OLLAMA_PROMPT_CACHE's file vs the file removed (`direct` is the cold restart)"),
            Row("first turn after a restart with the saved prefix, vs llama-server", "ms", restored, direct,
                "latency", 150.0, note="llama-server by hand with the same argv: launch, poll /health, "
                                       "POST /slots/0?action=restore of the same file, /completion"),
            Row("agent turn 4 TTFT, live runner, vs llama-server", "ms", live, live_direct, "latency", 50.0,
                note="turn 3 plus its answer and a question, on the runner that just answered turn 3")] + (
            [Row("Gemma 3 270M, first turn after a restart, saved prefix vs none", "ms", g_restored, g_cold, "slower",
                 0.2, note="~2k-token prefix (4x the sliding window; half the llama's, so the runner's start "
                           "weighs twice: 0.2x); a window-only file, reused with build_llama.sh's swa_reuse "
                           "fix; greedy text checked equal")] if g_restored else [])


TITLE_TASK = ("Create a concise, 3-5 word title with an emoji summarizing the chat history.\n"
              "<chat_history>\nUSER: %s\n</chat_history>" % PROMPT)      # Open WebUI's title task, shortened
N_TITLE = 160                   # tokens: Open WebUI asks 1000; 160 keeps a run under a minute on 2 busy cores
N_BUSY = 48                     # tokens of the request that holds the slot when both arrive (a follow-up task)


def _interactive_round(port, path, busy, title, chat, sse):
    """Hold the slot with `busy`, send `title` (not streamed) once it runs, the streamed `chat` 50 ms
    later: the chat's Timing, and whether the title was still running when the chat's first token came."""
    done = {}

    def call(name, body):
        http_call(port, "POST", path, dict(body, stream=False), timeout=600)
        done[name] = time.perf_counter()

    threads = [threading.Thread(target=call, args=("busy", busy), daemon=True)]
    threads[0].start()
    time.sleep(0.3)                               # the busy request has the slot
    threads.append(threading.Thread(target=call, args=("title", title), daemon=True))
    threads[1].start()
    time.sleep(0.05)
    t = stream(port, path, chat, sse=sse)
    for th in threads:
        th.join(600)
    return t, done.get("title", float("inf")) > t.first


def sec_interactive(b):
    rig = b.rig()
    direct = rig.start_direct()
    chat = {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}], "options": options(8)}
    title = {"model": MODEL, "messages": [{"role": "user", "content": TITLE_TASK}], "options": options(N_TITLE)}
    busy = {"model": MODEL, "messages": [{"role": "user", "content": CHAT_PROMPTS[0]}], "options": options(N_BUSY)}
    payloads = {k: direct_payload(options(n), rig.rendered("/api/chat", body))
                for k, n, body in (("chat", 8, chat), ("title", N_TITLE, title), ("busy", N_BUSY, busy))}
    ours, theirs, before, cold, alone = [], [], [], [], []
    for i in range(min(b.runs, 2)):
        t, ahead = _interactive_round(rig.serve.port, "/api/chat", busy, title, chat, False)
        ours.append(t.ttft * 1e3)
        before.append(ahead)
        t, _ = _interactive_round(direct.port, "/completion", payloads["busy"], payloads["title"], payloads["chat"],
                                  True)
        theirs.append(t.ttft * 1e3)
        # the case: both arrive while the model is unloaded (the first chat after keep-alive)
        http_json(rig.serve.port, "POST", "/api/generate", {"model": MODEL, "keep_alive": 0, "stream": False})
        rig.serve.wait_unloaded()
        thread = threading.Thread(target=http_call, args=(rig.serve.port, "POST", "/api/chat",
                                                          dict(title, stream=False), 600), daemon=True)
        thread.start()
        time.sleep(0.05)
        cold.append(stream(rig.serve.port, "/api/chat", chat).ttft * 1e3)
        thread.join(600)
        http_json(rig.serve.port, "POST", "/api/generate", {"model": MODEL, "keep_alive": 0, "stream": False})
        rig.serve.wait_unloaded()
        alone.append(stream(rig.serve.port, "/api/chat", chat).ttft * 1e3)
        log("  run %d: chat TTFT %.0f ms (title still running: %s), llama-server FIFO %.0f ms; model unloaded: "
            "with the title task %.0f ms, alone %.0f ms" % (i + 1, ours[-1], ahead, theirs[-1], cold[-1], alone[-1]))
    return [Row("chat TTFT behind a title task, one slot busy", "ms", ours, theirs, "slower", 0.5,
                note="a %d-token request holds the slot; a %d-token title task (stream false), then the streamed "
                     "chat 50 ms later; ollama.py serves the chat first (%d of %d runs before the title ended), "
                     "llama-server in arrival order" % (N_BUSY, N_TITLE, sum(before), len(before))),
            Row("chat TTFT with a title task, model unloaded, vs the chat alone", "ms", cold, alone, "slower", 1.2,
                note="the title task first, the chat 50 ms later, both waiting for the load: the runner it "
                     "loads serves the chat first (`direct` is the chat alone after an unload)")]


def _unlink_quiet(path):
    try:
        os.unlink(str(path))
    except FileNotFoundError:
        pass


# ----------------------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------------------

NEEDS = {"generation": ("engine", "gemma"), "ttft": ("engine", "gemma"), "agent": ("engine", "gemma"),
         "cold": ("engine", "gemma"),
         "concurrency": ("engine", "gemma"), "footprint": (), "pull": ("gemma",), "lan": ("gemma",),
         "create": ("gemma",),
         "rpc": ("engine", "gemma"), "layout": ("engine", "gemma"), "draft": ("engine", "gemma"),
         "speculative": ("engine", "gemma"), "repack": ("engine", "gemma"), "promptcache": ("engine", "gemma"),
         "interactive": ("engine", "gemma")}
FUNCS = {"generation": sec_generation, "ttft": sec_ttft, "agent": sec_agent, "cold": sec_cold,
         "concurrency": sec_concurrency,
         "footprint": sec_footprint, "pull": sec_pull, "lan": sec_lan, "create": sec_create, "rpc": sec_rpc,
         "layout": sec_layout, "draft": sec_draft, "speculative": sec_speculative, "repack": sec_repack,
         "promptcache": sec_promptcache, "interactive": sec_interactive}
TITLES = {"generation": "generation throughput", "ttft": "time to first token", "agent": "agent prefix reuse",
          "cold": "cold start",
          "concurrency": "4 parallel chats", "footprint": "serve footprint / list", "pull": "pull", "lan": "LAN pull",
          "create": "create", "rpc": "RPC split", "layout": "Ollama's layout", "draft": "DRAFT layer",
          "speculative": "n-gram speculation", "repack": "weight repacking",
          "promptcache": "prompt cache across restarts", "interactive": "chat before background tasks"}


class Bench:
    def __init__(self, args, workdir):
        self.runs = args.runs
        self.ollama_py = str(Path(args.ollama_py).resolve())
        self.workdir = workdir
        self.procs = Procs(workdir)
        self.engine = self.gemma = None
        self._rig = None
        self.registry = None
        self.store_serve = None

    def rig(self):
        if self._rig is None:
            self._rig = Rig(self).start()
        return self._rig

    def drop_rig(self):
        if self._rig is not None:
            self._rig.stop()
            self._rig = None

    def run(self, sections):
        rows = []
        for sec in sections:
            log("%s ... (load average %.2f)" % (TITLES[sec], loadavg()))
            t0 = time.monotonic()
            try:
                for need in NEEDS[sec]:
                    if need == "engine" and self.engine is None:
                        self.engine = find_engine()
                    if need == "gemma" and self.gemma is None:
                        self.gemma = find_gemma()
                new = FUNCS[sec](self)
            except (NotAvailable, BenchError) as e:
                log("%s: %s" % (sec, e))
                new = [Row(TITLES[sec], "-", None, None, "info", note="n/a: %s" % e)]
            rows.extend(new)
            log("%s done in %.1f s" % (sec, time.monotonic() - t0))
        return rows

    def close(self):
        self.procs.stop_all()


def _on_sigterm(signum, frame):
    raise KeyboardInterrupt("signal %d" % signum)


def main(argv=None):
    p = argparse.ArgumentParser(description="Measure ollama.py against llama-server itself (see module doc).")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--runs", type=int, default=5, help="measured runs per side (default 5; medians)")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 runs")
    p.add_argument("--only", metavar="SECTIONS", help="comma-separated subset of: " + ",".join(SECTIONS))
    p.add_argument("--ollama-py", default=str(ROOT / "ollama.py"), help="the ollama.py to measure (default: repo)")
    p.add_argument("--keep", action="store_true", help="keep the work dir (logs, stores) for inspection")
    args = p.parse_args(argv)
    if args.quick:
        args.runs = 2
    sections = SECTIONS
    if args.only:
        sections = [s.strip() for s in args.only.split(",") if s.strip()]
        bad = [s for s in sections if s not in SECTIONS]
        if bad:
            p.error("unknown section(s): %s (choose from %s)" % (", ".join(bad), ", ".join(SECTIONS)))
    signal.signal(signal.SIGINT, signal.default_int_handler)     # even when started with SIGINT ignored
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGHUP, _on_sigterm)
    workdir = Path(tempfile.mkdtemp(prefix="ollama-py-bench-"))
    bench = Bench(args, workdir)
    started = time.monotonic()
    load0 = loadavg()
    try:
        rows = bench.run(sections)
    except KeyboardInterrupt:
        log("interrupted: stopping everything this run started")
        return 130
    finally:
        bench.close()
        if args.keep:
            log("work dir kept: %s" % workdir)
        else:
            shutil.rmtree(str(workdir), ignore_errors=True)
    elapsed = time.monotonic() - started
    print("ollama.py vs llama-server: medians of %d runs each, alternating; %d CPUs; load average %.2f at start, "
          "%.2f at end; %.0f s" % (args.runs, os.cpu_count() or 0, load0, loadavg(), elapsed))
    print(render_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"runs": args.runs, "cpus": os.cpu_count(), "seconds": round(elapsed, 1),
                       "loadavg_start": load0, "loadavg_end": loadavg(),
                       "ollama_py": bench.ollama_py, "engine": bench.engine, "sections": list(sections),
                       "rows": [r.as_dict() for r in rows]}, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
