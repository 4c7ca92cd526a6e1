"""`ollama.py serve` as a user runs it: a subprocess, its logs and key, and a clean shutdown."""
import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import ollama
from test_inference import import_gguf

ROOT = Path(__file__).resolve().parent.parent


def start_serve(home, env_extra=None):
    port = ollama.free_port()
    env = dict(os.environ, HOME=str(home), OLLAMA_HOST="127.0.0.1:%d" % port,
               OLLAMA_MODELS=str(home / ".ollama" / "models"), **(env_extra or {}))
    proc = subprocess.Popen([sys.executable, str(ROOT / "ollama.py"), "serve"], env=env,
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


def _post(port, path, body):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request("POST", path, body=json.dumps(body))
    resp = conn.getresponse()
    return resp.status, resp.read()


def test_serve_keeps_partials_creates_its_key_and_log_then_stops_its_runners_on_sigterm(ollama_home, llama_server_bin, gemma_gguf):
    store = ollama.Store(ollama_home / ".ollama" / "models")
    import_gguf(store, "gemma3:270m", gemma_gguf)
    partial = store.blobs / ("sha256-" + "ab" * 32 + "-partial")     # an interrupted pull's data
    partial.write_bytes(b"half a blob")
    stray, _ = store.write_blob_bytes(b"unreferenced, older than an hour")
    os.utime(store.blob_path(stray), (time.time() - 7200,) * 2)
    proc, port = start_serve(ollama_home, {"OLLAMA_LLAMA_SERVER": str(llama_server_bin)})
    assert partial.read_bytes() == b"half a blob", "serve must not prune partial downloads"
    assert store.has_blob(stray), "serve must not prune at startup"
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


def test_version_runs_without_site_packages():
    out = subprocess.run([sys.executable, "-S", "-I", str(ROOT / "ollama.py"), "--version"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and out.stdout.strip() == "ollama version is %s" % ollama.__version__


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
