"""One model across several machines: `ollama.py worker` (llama.cpp's rpc-server) and serve with
OLLAMA_RPC_SERVERS, on loopback, with the real engine and Gemma 3 270M."""
import contextlib
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import ollama
from test_inference import import_gguf, post

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def rpc_bin(llama_server_bin):
    exe = Path(llama_server_bin).with_name("rpc-server")
    if not os.access(str(exe), os.X_OK):
        pytest.fail("no rpc-server beside %s: build_llama.sh builds it unless --no-rpc" % llama_server_bin)
    return exe


@contextlib.contextmanager
def worker(llama_server_bin, port, home):
    """`ollama.py worker --port PORT` as a user runs it; yields (process, its stderr file)."""
    env = dict(os.environ, HOME=str(home), OLLAMA_LLAMA_SERVER=str(llama_server_bin))
    err = open(str(home / ("worker-%d.log" % port)), "w+")
    proc = subprocess.Popen([sys.executable, str(ROOT / "ollama.py"), "worker", "--port", str(port),
                             "--threads", "1"], env=env, stdin=subprocess.DEVNULL, stdout=err, stderr=err)
    try:
        deadline = time.monotonic() + 60          # give up, not a performance assertion
        while not ollama.rpc_worker_answers("127.0.0.1:%d" % port, 0.2):
            assert proc.poll() is None, open(err.name).read()
            assert time.monotonic() < deadline, "the worker never listened"
            time.sleep(0.05)
        yield proc, err.name
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
        err.close()


@pytest.fixture
def gemma(server, gemma_gguf, llama_server_bin, rpc_bin):
    server.scheduler.exe = str(llama_server_bin)
    server.config.llama_server = str(llama_server_bin)
    import_gguf(server.store, "gemma3:270m", gemma_gguf)
    return "gemma3:270m"


GREEDY = {"temperature": 0, "seed": 42, "num_predict": 24}


def generate(server, model, prompt="The three primary colours are", **options):
    status, lines = post(server, "/api/generate", {"model": model, "prompt": prompt, "keep_alive": 0,
                                                    "options": dict(GREEDY, **options)})
    assert status == 200, lines
    return "".join(x.get("response", "") for x in lines), lines[-1]


def test_two_workers_give_the_local_answer_token_for_token(server, gemma, llama_server_bin, ollama_home):
    local_text, local = generate(server, gemma)
    ports = [ollama.free_port(), ollama.free_port()]
    with worker(llama_server_bin, ports[0], ollama_home), worker(llama_server_bin, ports[1], ollama_home):
        server.config.rpc_servers = ["127.0.0.1:%d" % p for p in ports]
        status, lines = post(server, "/api/generate", {"model": gemma, "prompt": "The three primary colours are",
                                                        "options": GREEDY, "stream": False})
        assert status == 200
        split = lines[-1]
        conn = http.client.HTTPConnection("127.0.0.1", server.server_port, timeout=30)
        conn.request("GET", "/api/ps")
        ps = json.loads(conn.getresponse().read())["models"]
        conn.close()
        running = server.scheduler.running()
        assert running and running[0].runner.rpc == server.config.rpc_servers
        runner_log = Path(running[0].runner.log_path).read_text(errors="replace")
        cli = subprocess.run([sys.executable, str(ROOT / "ollama.py"), "ps"], capture_output=True, text=True,
                             timeout=60, env=dict(os.environ, OLLAMA_HOST="127.0.0.1:%d" % server.server_port))
        server.scheduler.expire(gemma)
    assert split["response"] == local_text and split["context"] == local["context"]   # token for token
    assert ps[0]["rpc_servers"] == ["127.0.0.1:%d" % p for p in ports]
    for port in ports:                                # llama.cpp put layers on both workers
        assert re.search(r"load_tensors: RPC\d+\[127\.0\.0\.1:%d\] model buffer size = +[1-9]" % port, runner_log)
    assert "CPU + RPC 127.0.0.1:%d,127.0.0.1:%d" % tuple(ports) in cli.stdout


PROMPTS = ("Question: Why is the sky blue? Answer:", "The capital of France is", "def fibonacci(n):",
           "Once upon a time, in a small village,", "In 1969, the first man to walk on the moon was",
           "import numpy as np\nx = np.")


def top5(runner, prompt):
    """The next token's top-5 {token: logprob} after `prompt`, from a started Runner."""
    out = runner.call("/completion", {"prompt": prompt, "n_predict": 1, "n_probs": 5, "temperature": 0})
    return {p["token"]: p["logprob"] for p in out["completion_probabilities"][0]["top_logprobs"]}


def gap(runs, a, b):
    """The largest logprob difference over the tokens both top-5s name, over all prompts (nats)."""
    return max(abs(x[t] - y[t]) for x, y in zip(runs[a], runs[b]) for t in set(x) & set(y))


def test_on_a_serve_with_workers_a_model_computes_the_same_split_or_kept_local(server, gemma, llama_server_bin,
                                                                               ollama_home):
    """The must-show of a split: the next token's top-5 logprobs, through /api/generate as a user asks
    them, agree within 0.05 nats on several prompts whether the layers are on two workers or all here
    (num_gpu 0). They agree exactly: OLLAMA_REPACK's auto default runs both with the plain CPU kernels."""
    ports = [ollama.free_port(), ollama.free_port()]
    runs = {}
    with worker(llama_server_bin, ports[0], ollama_home), worker(llama_server_bin, ports[1], ollama_home):
        server.config.rpc_servers = ["127.0.0.1:%d" % p for p in ports]
        for name, opts in (("local", {"num_gpu": 0}), ("split", {})):          # num_gpu reloads: two loads
            runs[name] = []
            for prompt in PROMPTS:
                status, lines = post(server, "/api/generate", {
                    "model": gemma, "prompt": prompt, "raw": True, "stream": False, "logprobs": True,
                    "top_logprobs": 5, "options": dict(opts, temperature=0, num_predict=1)})
                assert status == 200, lines
                runs[name].append({t["token"]: t["logprob"] for t in lines[-1]["logprobs"][0]["top_logprobs"]})
            runner = server.scheduler.running()[0].runner
            assert bool(runner.rpc) == (name == "split")
        server.scheduler.expire(gemma)
    assert all(len(set(x) & set(y)) >= 4 for x, y in zip(runs["local"], runs["split"]))
    assert gap(runs, "local", "split") < 0.05


def test_a_split_computes_what_one_machine_computes_without_weight_repacking(gemma_gguf, llama_server_bin,
                                                                             rpc_bin, ollama_home, tmp_path):
    """Where a split and a repacking local run differ, and why: the local CPU backend repacks quantized
    matrices (here Q4_K) for kernels of its own, RPC workers hold them as stored. Both sum the same
    8-bit-rounded products, in another float order, and each next layer's 8-bit rounding of its input
    makes that difference grow (DEFAULT_REPACK). Without repacking, one machine gives the split's
    logprobs exactly; with it they part by more than 0.05 nats, the must-show's tolerance."""
    ports = [ollama.free_port(), ollama.free_port()]
    runs = {}
    with worker(llama_server_bin, ports[0], ollama_home), worker(llama_server_bin, ports[1], ollama_home):
        for name, kw in (("split", {"rpc": ["127.0.0.1:%d" % p for p in ports]}),
                         ("plain", {"repack": False}), ("repacked", {})):
            runner = ollama.Runner(str(llama_server_bin), gemma_gguf, num_ctx=512, log_path=tmp_path / name,
                                   **kw).start(120)
            try:
                runs[name] = [top5(runner, p) for p in PROMPTS]
            finally:
                runner.stop()
    assert gap(runs, "split", "plain") < 0.01
    assert gap(runs, "split", "repacked") > 0.05     # what docs/engine.md explains; if it ever vanishes, say so there


def test_a_worker_killed_mid_stream_is_named_and_the_next_request_is_served(server, gemma, llama_server_bin,
                                                                            ollama_home, caplog):
    port = ollama.free_port()
    address = "127.0.0.1:%d" % port
    with worker(llama_server_bin, port, ollama_home) as (proc, _):
        server.config.rpc_servers = [address]
        conn = http.client.HTTPConnection("127.0.0.1", server.server_port, timeout=120)
        conn.request("POST", "/api/generate", json.dumps({"model": gemma, "prompt": "Once upon a time",
                                                          "options": {"num_predict": 2000}}))
        resp = conn.getresponse()
        resp.readline()
        proc.kill()                                               # the worker's machine goes away
        lines = [json.loads(x) for x in resp.read().splitlines() if x.strip()]
        conn.close()
    assert "error" in lines[-1] and lines[-1]["error"].endswith("RPC worker %s does not answer" % address)
    text, final = generate(server, gemma, num_predict=4)          # reloads without the worker
    assert final["done"] and final["eval_count"] == 4
    assert "RPC worker %s does not answer: loading without it" % address in caplog.text


def test_keeping_every_layer_here_uses_no_worker(server, gemma):
    server.config.rpc_servers = ["127.0.0.1:%d" % ollama.free_port()]     # nobody listens there
    status, lines = post(server, "/api/generate", {"model": gemma, "prompt": "Hi", "stream": False,
                                                    "options": {"num_predict": 2, "num_gpu": 0}})
    assert status == 200 and server.scheduler.running()[0].runner.rpc == []


def test_worker_warns_binds_loopback_and_stops_on_sigterm(llama_server_bin, rpc_bin, ollama_home):
    port = ollama.free_port()
    with worker(llama_server_bin, port, ollama_home) as (proc, log_name):
        with open("/proc/net/tcp") as f:                  # listening (state 0A) on 127.0.0.1 only
            listening = [ln.split()[1] for ln in f.readlines()[1:] if ln.split()[3] == "0A"]
        assert "0100007F:%04X" % port in listening and "00000000:%04X" % port not in listening
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        said = open(log_name).read()
    assert "WARNING: llama.cpp's RPC protocol has no authentication and no encryption" in said
    assert not ollama.rpc_worker_answers("127.0.0.1:%d" % port, 0.5)
