"""`ollama.py serve` as a user runs it: a subprocess, its logs and key, and a clean shutdown."""
import contextlib
import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import ollama
from test_inference import import_gguf

ROOT = Path(__file__).resolve().parent.parent


def start_serve(home, env_extra=None, script=ROOT / "ollama.py"):
    port = ollama.free_port()
    env = dict(os.environ, HOME=str(home), OLLAMA_HOST="127.0.0.1:%d" % port,
               OLLAMA_MODELS=str(home / ".ollama" / "models"), **(env_extra or {}))
    proc = subprocess.Popen([sys.executable, str(script), "serve"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            conn.request("GET", "/")
            if conn.getresponse().read() == b"Ollama is running":
                return proc, port
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise AssertionError("serve did not start: %s" % proc.stderr.read().decode())


def test_serve_on_a_port_in_use_says_so_as_ollama_does(ollama_home):
    import socket
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = dict(os.environ, HOME=str(ollama_home), OLLAMA_HOST="127.0.0.1:%d" % port)
        done = subprocess.run([sys.executable, str(ROOT / "ollama.py"), "serve"], env=env, capture_output=True,
                              text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr.splitlines()[-1] == "Error: listen tcp 127.0.0.1:%d: bind: address already in use" % port


def _post(port, path, body):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request("POST", path, body=json.dumps(body))
    resp = conn.getresponse()
    return resp.status, resp.read()


def test_serve_keeps_partials_and_young_blobs_removes_temps_creates_its_key_and_log_then_stops_its_runners_on_sigterm(
        ollama_home, llama_server_bin, gemma_gguf):
    store = ollama.Store(ollama_home / ".ollama" / "models")
    import_gguf(store, "gemma3:270m", gemma_gguf)
    partial = store.blobs / ("sha256-" + "ab" * 32 + "-partial")     # an interrupted pull's data
    partial.write_bytes(b"half a blob")
    stray, _ = store.write_blob_bytes(b"unreferenced, uploaded just now")
    leftover = store.blobs / "sha256-tmp-of-a-killed-upload"
    leftover.write_bytes(b"no live request owns this")
    proc, port = start_serve(ollama_home, {"OLLAMA_LLAMA_SERVER": str(llama_server_bin)})
    assert partial.read_bytes() == b"half a blob", "serve must not prune partial downloads"
    assert store.has_blob(stray), "an unreferenced blob younger than BLOB_GRACE waits for its create"
    assert not leftover.exists()
    try:
        status, data = _post(port, "/api/generate", {"model": "gemma3:270m", "prompt": "Hi", "stream": False,
                                                     "options": {"num_predict": 2}})
        assert status == 200 and json.loads(data)["done"]
        runner_pids = [int(p) for p in subprocess.run(["pgrep", "-f", "llama-server.*--port"], capture_output=True,
                                                      text=True).stdout.split()]
        mine = [p for p in runner_pids if os.getpgid(p) != os.getpgid(0) and _parent(p) == proc.pid]
        assert len(mine) == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert not _alive(mine[0]), "the runner must not outlive serve"
    key = ollama_home / ".ollama" / "id_ed25519"
    assert key.stat().st_mode & 0o777 == 0o600
    assert b"Generating new private key" in out
    log = (ollama_home / ".ollama" / "logs" / "server.log").read_text()
    assert "Listening on 127.0.0.1:%d" % port in log and "POST" in log


def _parent(pid):
    with open("/proc/%d/stat" % pid) as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open("/proc/%d/stat" % pid) as f:
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


def _children(pid):
    """(pid, start time) of each live child of `pid`."""
    kids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if _parent(int(d)) == pid and _alive(int(d)):
                    kids.append((int(d), ollama.process_start(int(d))))
            except OSError:
                pass
    return kids


def _gone_by(procs, seconds):
    """Wait up to `seconds` for every (pid, start time) to be gone; the ones still there."""
    deadline = time.monotonic() + seconds
    while True:
        left = [p for p in procs if ollama.process_start(p[0]) == p[1]]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.02)


def test_sigkill_of_serve_with_two_models_loaded_leaves_no_runner(ollama_home, llama_server_bin, tiny_gguf,
                                                                   tiny_f32_gguf):
    store = ollama.Store(ollama_home / ".ollama" / "models")
    import_gguf(store, "one", tiny_gguf)
    import_gguf(store, "two", tiny_f32_gguf)             # other weights: a runner of its own
    proc, port = start_serve(ollama_home, {"OLLAMA_LLAMA_SERVER": str(llama_server_bin)})
    try:
        for name in ("one", "two"):          # from two connections, so two request threads
            status, _ = _post(port, "/api/generate", {"model": name, "prompt": "Hi", "stream": False,
                                                      "options": {"num_predict": 1}})
            assert status == 200
        runners = _children(proc.pid)
        assert len(runners) == 2
    finally:
        proc.kill()
        proc.communicate(timeout=30)
    assert _gone_by(runners, 1.0) == []


def test_names_for_one_blob_share_one_llama_server_and_each_answers(ollama_home, llama_server_bin, tiny_gguf):
    """A `cp` and a create that only adds a TEMPLATE, a SYSTEM and a parameter hold the weights once."""
    store = ollama.Store(ollama_home / ".ollama" / "models")
    import_gguf(store, "one", tiny_gguf)
    proc, port = start_serve(ollama_home, {"OLLAMA_LLAMA_SERVER": str(llama_server_bin)})
    try:
        assert _post(port, "/api/copy", {"source": "one", "destination": "copy"})[0] == 200
        status, data = _post(port, "/api/create", {"model": "terse", "from": "one", "system": "Be terse.",
                                                   "template": "{{ .System }} {{ .Prompt }}",
                                                   "parameters": {"temperature": 0.2}, "stream": False})
        assert status == 200, data
        counts = {}
        for name in ("one", "copy", "terse"):
            status, data = _post(port, "/api/generate", {"model": name, "prompt": "Hi", "stream": False,
                                                         "options": {"num_predict": 2}})
            assert status == 200 and json.loads(data)["done"], data
            counts[name] = json.loads(data)["prompt_eval_count"]
        assert len(_children(proc.pid)) == 1
        assert counts["terse"] > counts["one"]               # its SYSTEM is in its prompt, per request
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", "/api/ps")
        names = [m["name"] for m in json.loads(conn.getresponse().read())["models"]]
        assert names == ["one:latest", "copy:latest", "terse:latest"]
        assert _post(port, "/api/generate", {"model": "copy", "keep_alive": 0})[0] == 200   # `ollama stop copy`
        assert _gone_by(_children(proc.pid), 10.0) == []
    finally:
        proc.kill()
        proc.communicate(timeout=30)


def test_sigterm_during_a_model_load_leaves_no_runner(ollama_home, tiny_gguf, tmp_path):
    engine = tmp_path / "llama-server"             # fault injection: an engine that never gets ready
    engine.write_text("#!/bin/sh\nexec sleep 600\n")
    engine.chmod(0o755)
    store = ollama.Store(ollama_home / ".ollama" / "models")
    import_gguf(store, "tiny", tiny_gguf)
    proc, port = start_serve(ollama_home, {"OLLAMA_LLAMA_SERVER": str(engine)})
    def load():
        with contextlib.suppress(OSError, http.client.HTTPException):     # serve stops mid-request
            _post(port, "/api/generate", {"model": "tiny", "prompt": "Hi"})

    loading = threading.Thread(target=load, daemon=True)
    loading.start()
    deadline = time.monotonic() + 20
    while not _children(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    runners = _children(proc.pid)
    assert len(runners) == 1
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert _gone_by(runners, 1.0) == []


def test_serve_reaps_the_runners_a_dead_serve_left_behind_by_pid_and_start_time(ollama_home):
    orphan = subprocess.Popen(["sleep", "600"])      # stands for a runner whose serve was killed
    other = subprocess.Popen(["sleep", "600"])       # recorded with a start time that is not its own
    mine = subprocess.Popen(["sleep", "600"])        # the runner of a serve that is still running
    dead = subprocess.Popen(["true"])
    dead.wait()
    records = ollama_home / ".ollama" / "runners"
    records.mkdir(parents=True)
    (records / "serve-1.json").write_text(json.dumps(
        {"serve": [dead.pid, 12345], "runners": [[orphan.pid, ollama.process_start(orphan.pid)],
                                                 [other.pid, ollama.process_start(other.pid) + 1]]}))
    (records / "serve-2.json").write_text(json.dumps(
        {"serve": [os.getpid(), ollama.process_start(os.getpid())],
         "runners": [[mine.pid, ollama.process_start(mine.pid)]]}))
    proc, port = start_serve(ollama_home)
    try:
        assert orphan.wait(5) == -signal.SIGKILL
        assert other.poll() is None and mine.poll() is None
        assert sorted(os.listdir(records)) == ["serve-2.json"]
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        for p in (orphan, other, mine):
            p.kill()
            p.wait()
    assert "killed runner pid %d left behind by serve pid %d" % (orphan.pid, dead.pid) in err.decode()


def test_script_serve_carries_on_from_fresh_bytecode_else_as_it_is(ollama_home, tmp_path):
    """`python3 ollama.py serve` execs itself as `import ollama` (same pid) when the bytecode cache is
    fresh, so the compiler's memory is not kept for serve's lifetime; stale, missing or unwritable
    (PYTHONDONTWRITEBYTECODE), it serves as the script."""
    import py_compile
    for cached in (True, False):
        here = tmp_path / ("cached" if cached else "plain")
        here.mkdir()
        shutil.copy(str(ROOT / "ollama.py"), str(here / "ollama.py"))
        if cached:
            py_compile.compile(str(here / "ollama.py"), doraise=True)
        proc, port = start_serve(ollama_home, {"PYTHONDONTWRITEBYTECODE": "1"}, script=here / "ollama.py")
        try:
            with open("/proc/%d/cmdline" % proc.pid, "rb") as f:
                argv = f.read().split(b"\0")
            assert (b"-c" in argv) == cached and argv[-2:] == [b"serve", b""]
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            conn.request("GET", "/api/tags")
            assert conn.getresponse().status == 200
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=30)
        assert proc.returncode == 0 and (here / "__pycache__").exists() == cached


def test_serve_from_bytecode_still_shows_ollama_py_serve_in_ps(ollama_home, tmp_path):
    import py_compile
    shutil.copy(str(ROOT / "ollama.py"), str(tmp_path / "ollama.py"))
    py_compile.compile(str(tmp_path / "ollama.py"), doraise=True)
    proc, port = start_serve(ollama_home, {"PYTHONDONTWRITEBYTECODE": "1"}, script=tmp_path / "ollama.py")
    try:
        with open("/proc/%d/cmdline" % proc.pid, "rb") as f:
            argv = f.read().split(b"\0")
        assert b"-c" in argv                                     # it did carry on from the bytecode
        assert (" ".join(a.decode() for a in argv)).rstrip().endswith(str(tmp_path / "ollama.py") + " serve")
        if shutil.which("pgrep"):
            found = subprocess.run(["pgrep", "-f", str(tmp_path / "ollama.py") + " serve"], capture_output=True,
                                   text=True, timeout=30)
            assert str(proc.pid) in found.stdout.split()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)


def test_version_runs_without_site_packages():
    out = subprocess.run([sys.executable, "-S", "-I", str(ROOT / "ollama.py"), "--version"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and out.stdout.splitlines() == [
        "ollama version is %s" % ollama.__version__, "Ollama API version is %s" % ollama.API_VERSION]


def test_cli_without_a_server_says_how_to_start_one(ollama_home):
    env = dict(os.environ, HOME=str(ollama_home), OLLAMA_HOST="127.0.0.1:%d" % ollama.free_port())
    out = subprocess.run([sys.executable, str(ROOT / "ollama.py"), "ps"], env=env, capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 1
    assert out.stderr.strip() == "Error: could not connect to ollama server, run 'ollama.py serve' to start it"


def test_an_engine_for_another_cpu_is_explained_by_the_api_run_and_server_log(ollama_home, llama_server_bin, tmp_path):
    # A binary built for another CPU, for real: this machine's AVX-512 build under qemu-x86_64, which
    # has no AVX-512. Elsewhere a stand-in that raises SIGILL on itself (fault injection).
    engine = tmp_path / "llama-server"
    flags = open("/proc/cpuinfo").read().split() if os.path.exists("/proc/cpuinfo") else []
    if "avx512f" in flags and shutil.which("qemu-x86_64"):
        engine.write_text('#!/bin/sh\nexec qemu-x86_64 "%s" "$@"\n' % llama_server_bin)
    else:
        engine.write_text("#!%s\nimport os, signal\nos.kill(os.getpid(), signal.SIGILL)\n" % sys.executable)
    engine.chmod(0o755)
    store = ollama.Store(ollama_home / ".ollama" / "models")
    import_gguf(store, "check:latest", ollama.engine_check_model(str(tmp_path / "check.gguf")))
    said = ("llama-server process has terminated: SIGILL (illegal instruction): the engine uses CPU instructions "
            "this machine cannot run; rebuild it with ./build_llama.sh (with --portable if the binary came from "
            "another machine)")
    proc, port = start_serve(ollama_home, {"OLLAMA_LLAMA_SERVER": str(engine)})
    try:
        status, data = _post(port, "/api/generate", {"model": "check", "prompt": "Hi", "stream": False})
        assert (status, json.loads(data)) == (500, {"error": said})
        env = dict(os.environ, HOME=str(ollama_home), OLLAMA_HOST="127.0.0.1:%d" % port)
        run = subprocess.run([sys.executable, str(ROOT / "ollama.py"), "run", "check", "Hi"], env=env,
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 1 and run.stderr.strip().endswith("Error: " + said)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    assert "level=ERROR msg=" + said in (ollama_home / ".ollama" / "logs" / "server.log").read_text()
