"""Inference through the real engine: /api/generate, /api/chat, /api/ps, keep_alive, the scheduler."""
import http.client
import json
import re
import threading
import time

import pytest

import ollama


def import_gguf(store, name, gguf, template=None, params=None, system=None):
    """Put a GGUF into the store as a model, the way create does, without the create API."""
    with open(gguf, "rb") as f:
        digest, size = store.write_blob(f)
    layers = [{"mediaType": ollama.MEDIA_PREFIX + "model", "digest": digest, "size": size}]
    for kind, text in (("template", template), ("system", system),
                       ("params", json.dumps(params) if params else None)):
        if text is not None:
            d, s = store.write_blob_bytes(text.encode())
            layers.append({"mediaType": ollama.MEDIA_PREFIX + kind, "digest": d, "size": s})
    cfg = json.dumps({"model_format": "gguf", "model_family": "gemma3", "model_families": ["gemma3"],
                      "model_type": "268M", "file_type": "Q4_K_M"}).encode()
    cd, cs = store.write_blob_bytes(cfg)
    manifest = {"schemaVersion": 2, "mediaType": ollama.MEDIA_MANIFEST,
                "config": {"mediaType": ollama.MEDIA_CONFIG, "digest": cd, "size": cs}, "layers": layers}
    store.write_manifest(ollama.Name.parse(name), manifest)


def post(server, path, body, raw=False):
    conn = http.client.HTTPConnection("127.0.0.1", server.server_port, timeout=120)
    conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    if raw:
        return resp.status, data
    lines = [json.loads(x) for x in data.splitlines() if x.strip()]
    return resp.status, lines


@pytest.fixture
def gemma(server, gemma_gguf, llama_server_bin):
    server.scheduler.exe = str(llama_server_bin)
    import_gguf(server.store, "gemma3:270m", gemma_gguf, params={"stop": ["<end_of_turn>"]})
    return "gemma3:270m"


def test_generate_streams_ndjson_and_ends_with_metrics(server, gemma):
    status, lines = post(server, "/api/generate", {"model": gemma, "prompt": "The capital of France is",
                                                   "options": {"num_predict": 8, "temperature": 0}})
    assert status == 200
    assert all(not x["done"] for x in lines[:-1]) and lines[-1]["done"]
    final = lines[-1]
    assert final["done_reason"] == "length"
    assert final["eval_count"] == 8
    assert final["prompt_eval_count"] > 0 and final["total_duration"] >= final["load_duration"] > 0
    assert isinstance(final["context"], list) and len(final["context"]) > 8
    text = "".join(x["response"] for x in lines)
    assert text.strip()


def test_generate_non_streaming_is_one_object(server, gemma):
    status, lines = post(server, "/api/generate", {"model": gemma, "prompt": "Hello", "stream": False,
                                                   "options": {"num_predict": 4}})
    assert status == 200 and len(lines) == 1 and lines[0]["done"] and lines[0]["response"]


def test_generate_is_deterministic_with_seed_and_zero_temperature(server, gemma):
    body = {"model": gemma, "prompt": "Once upon a time", "stream": False,
            "options": {"num_predict": 16, "temperature": 0, "seed": 42}}
    a = post(server, "/api/generate", body)[1][0]["response"]
    b = post(server, "/api/generate", body)[1][0]["response"]
    assert a == b and a



def test_context_is_the_tokens_of_prompt_and_answer_without_a_round_trip_after_the_stream(
        server, gemma, monkeypatch):
    """`context` is what tokenizing prompt+answer gives (as in Ollama); from the prompt's tokens, asked
    as the stream starts, and the stream's own, so nothing is tokenized after the last token - except
    where a stop word cut the answer (its tokens are not the answer's): then prompt+answer is."""
    calls = []
    tokenize = ollama.Runner.tokenize
    monkeypatch.setattr(ollama.Runner, "tokenize", lambda self, text, add_special=False: calls.append(text)
                        or tokenize(self, text, add_special))

    def generate(prompt, **options):
        body = {"model": gemma, "prompt": prompt, "stream": False, "options": dict(temperature=0, **options)}
        out = post(server, "/api/generate", body)[1][0]
        rendered = post(server, "/api/generate", dict(body, _debug_render_only=True))[1][0]
        calls_during = len(calls)
        expected = post(server, "/api/tokenize", {"model": gemma, "text": rendered["_debug_info"]["rendered_template"]
                                                  + out["response"]})[1][0]["tokens"]
        return out, expected, calls_during

    out, expected, n = generate("Once upon a time", num_predict=12)
    assert out["done_reason"] == "length" and out["context"] == expected and n == 0
    word = out["response"].split()[2]
    calls.clear()
    out, expected, n = generate("Once upon a time", num_predict=12, stop=[word])
    assert word not in out["response"] and out["context"] == expected and n == 1


class _Asked:
    def __init__(self, tokens):
        self.tokens = tokens

    def json(self):
        return 200, {"tokens": self.tokens}


@pytest.mark.parametrize("stop, streamed, predicted, context", [
    ("limit", [7, 8], 2, [1, 2, 7, 8]),
    ("eos", [7, 8, 2], 3, [1, 2, 7, 8]),             # the end-of-generation token is not the answer's
    ("limit", [7], 2, "tokenized"),                  # an event never came (its token ended mid UTF-8 character)
    ("word", [7, 8], 2, "tokenized"),                # a stop word's tokens came, its text was cut
])
def test_context_from_the_stream_or_tokenized(stop, streamed, predicted, context):
    class Runner:
        def tokenize(self, text):
            assert text == "prompt" + "answer"
            return "tokenized"
    final = {"stop": True, "stop_type": stop, "tokens_predicted": predicted}
    assert ollama._context(Runner(), "prompt", "answer", _Asked([1, 2]), streamed, final) == context
    assert ollama._context(Runner(), "prompt", "answer", None, streamed, final) == "tokenized"


def test_unknown_model_is_404(server):
    status, data = post(server, "/api/generate", {"model": "nope", "prompt": "x"}, raw=True)
    assert status == 404 and json.loads(data) == {"error": "model 'nope' not found"}


def test_empty_prompt_loads_and_keep_alive_zero_unloads(server, gemma):
    status, lines = post(server, "/api/generate", {"model": gemma})
    assert lines[0]["done_reason"] == "load"
    assert [e.model.short_name for e in server.scheduler.running()] == [gemma]
    status, lines = post(server, "/api/generate", {"model": gemma, "keep_alive": 0})
    assert lines[0]["done_reason"] == "unload"
    assert server.scheduler.running() == []


def test_raw_with_template_is_400(server, gemma):
    status, data = post(server, "/api/generate", {"model": gemma, "prompt": "x", "raw": True, "system": "s"},
                        raw=True)
    assert status == 400 and b"raw mode does not support" in data


def test_bad_keep_alive_is_400(server, gemma):
    status, data = post(server, "/api/generate", {"model": gemma, "prompt": "x", "keep_alive": "3600"}, raw=True)
    assert status == 400


def test_chat_streams_assistant_messages(server, gemma):
    status, lines = post(server, "/api/chat", {"model": gemma, "messages": [{"role": "user", "content": "Hi"}],
                                               "options": {"num_predict": 6}})
    assert status == 200
    assert all(x["message"]["role"] == "assistant" for x in lines)
    assert lines[-1]["done"] and lines[-1]["eval_count"] <= 6


def _stream_lines(server, path, body):
    """Open a streaming request; returns (conn, resp) so the test controls reading and closing."""
    conn = http.client.HTTPConnection("127.0.0.1", server.server_port, timeout=120)
    conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
    return conn, conn.getresponse()


def test_two_concurrent_chats_overlap(server, gemma):
    server.config.num_parallel = 2
    spans = {}

    def chat(i):
        conn, resp = _stream_lines(server, "/api/chat", {
            "model": gemma, "messages": [{"role": "user", "content": "Tell me a story %d" % i}],
            "options": {"num_predict": 24, "temperature": 0}})
        first = None
        for _line in resp:
            if first is None:
                first = time.monotonic()
        spans[i] = (first, time.monotonic())
        conn.close()

    post(server, "/api/generate", {"model": gemma})                # load first, so only decoding overlaps
    threads = [threading.Thread(target=chat, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    (a0, a1), (b0, b1) = spans[0], spans[1]
    assert a0 < b1 and b0 < a1, "both must start before either finishes"


def test_full_queue_answers_503(server, gemma):
    server.config.max_queue = 1
    post(server, "/api/generate", {"model": gemma})
    body = {"model": gemma, "prompt": "Count to one hundred:", "options": {"num_predict": 200}}
    busy = _stream_lines(server, "/api/generate", body)             # takes the only slot
    busy[1].readline()
    waiting = threading.Thread(target=post, args=(server, "/api/generate", dict(body, options={"num_predict": 1})))
    waiting.start()                                                  # fills the queue of one
    deadline = time.monotonic() + 10
    while server.scheduler.waiting < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    status, data = post(server, "/api/generate", body, raw=True)
    assert status == 503
    assert json.loads(data)["error"] == "server busy, please try again.  maximum pending requests exceeded"
    busy[0].close()
    waiting.join(60)


def test_client_disconnect_frees_the_slot(server, gemma):
    post(server, "/api/generate", {"model": gemma})
    conn, resp = _stream_lines(server, "/api/generate", {"model": gemma, "prompt": "Once upon a time",
                                                          "options": {"num_predict": 2000}})
    resp.readline()
    conn.sock.shutdown(2)
    conn.close()
    entry = server.scheduler.running()[0]
    deadline = time.monotonic() + 10
    while entry.refs and time.monotonic() < deadline:
        time.sleep(0.05)
    assert entry.refs == 0
    status, lines = post(server, "/api/generate", {"model": gemma, "prompt": "Hi", "options": {"num_predict": 2}})
    assert status == 200 and lines[-1]["done"]


def test_killed_runner_fails_the_request_and_the_next_one_reloads(server, gemma):
    import os
    import signal
    post(server, "/api/generate", {"model": gemma})
    runner = server.scheduler.running()[0].runner
    conn, resp = _stream_lines(server, "/api/generate", {"model": gemma, "prompt": "Once upon a time",
                                                          "options": {"num_predict": 2000}})
    resp.readline()
    os.kill(runner.pid, signal.SIGKILL)
    lines = [json.loads(x) for x in resp.read().splitlines() if x.strip()]
    conn.close()
    assert lines[-1] == {"error": str(ollama.runner_exit_error(-signal.SIGKILL))}     # "...out-of-memory killer..."
    status, lines = post(server, "/api/generate", {"model": gemma, "prompt": "Hi", "options": {"num_predict": 2}})
    assert status == 200 and lines[-1]["done"]
    assert server.scheduler.running()[0].runner is not runner


def test_unloadable_blob_reports_the_engine_reason_once(server, llama_server_bin, tmp_path):
    import gguf
    server.scheduler.exe = str(llama_server_bin)
    alien = tmp_path / "alien.gguf"                  # a valid header for an architecture llama.cpp lacks
    w = gguf.GGUFWriter(str(alien), "nosucharch")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    import_gguf(server.store, "alien", alien)
    started = time.monotonic()
    status, data = post(server, "/api/generate", {"model": "alien", "prompt": "x"}, raw=True)
    err = json.loads(data)["error"]
    assert status == 500 and "llama-server process has terminated" in err and "nosucharch" in err
    assert time.monotonic() - started < 30
    assert server.scheduler.running() == []


def test_corrupt_blob_header_is_a_clear_500(server, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 64)
    import_gguf(server.store, "broken", bad)
    status, data = post(server, "/api/generate", {"model": "broken", "prompt": "x"}, raw=True)
    err = json.loads(data)["error"]
    assert status == 500 and err.startswith("unable to load model ") and "invalid GGUF file" in err


def test_server_close_stops_every_runner(server, gemma):
    post(server, "/api/generate", {"model": gemma})
    runner = server.scheduler.running()[0].runner
    server.scheduler.shutdown()
    assert runner.proc.poll() is not None


def test_keep_alive_expires_an_idle_runner(server, gemma):
    status, lines = post(server, "/api/generate", {"model": gemma, "keep_alive": "1s"})
    entry = server.scheduler.running()[0]
    assert entry.expires - time.time() <= 1.0
    deadline = time.monotonic() + 10
    while server.scheduler.running() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.scheduler.running() == []
    assert entry.runner.proc.wait(10) is not None


def test_negative_keep_alive_keeps_the_model_forever(server, gemma):
    post(server, "/api/generate", {"model": gemma, "keep_alive": -1})
    status, data = _get(server, "/api/ps")
    model = json.loads(data)["models"][0]
    assert model["name"] == gemma and model["expires_at"].startswith("2")
    assert int(model["expires_at"][:4]) > time.gmtime().tm_year + 100


def test_ps_while_a_request_runs_says_when_its_keep_alive_would_end(server, gemma):
    """Not Go's far-off time (the year 2318) as ollama.py said before: now plus the keep-alive, as Ollama."""
    conn = http.client.HTTPConnection("127.0.0.1", server.server_port, timeout=120)
    conn.request("POST", "/api/generate", body=json.dumps({"model": gemma, "prompt": "Count to a hundred:",
                                                           "keep_alive": "10m", "options": {"num_predict": 400}}))
    resp = conn.getresponse()
    resp.readline()                                         # the first token: the request is running
    try:
        _status, data = _get(server, "/api/ps")
        (m,) = json.loads(data)["models"]
        when = ollama._parse_rfc3339(m["expires_at"])
        assert abs(when - (time.time() + 600)) < 60
    finally:
        conn.close()


def _get(server, path):
    conn = http.client.HTTPConnection("127.0.0.1", server.server_port, timeout=30)
    conn.request("GET", path)
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, data


def test_ps_lists_loaded_models_with_ollamas_fields(server, gemma):
    post(server, "/api/generate", {"model": gemma, "options": {"num_ctx": 1024}})
    status, data = _get(server, "/api/ps")
    (m,) = json.loads(data)["models"]
    assert set(m) == {"name", "model", "size", "digest", "details", "expires_at", "size_vram", "context_length"}
    assert m["context_length"] == 1024 and m["size"] > 200_000_000 and len(m["digest"]) == 64


def test_changing_a_load_option_reloads_the_runner(server, gemma):
    post(server, "/api/generate", {"model": gemma, "options": {"num_ctx": 1024}})
    first = server.scheduler.running()[0].runner
    post(server, "/api/generate", {"model": gemma, "options": {"num_ctx": 1024}})
    assert server.scheduler.running()[0].runner is first
    post(server, "/api/generate", {"model": gemma, "options": {"num_ctx": 2048}})
    (entry,) = server.scheduler.running()
    assert entry.runner is not first and entry.runner.num_ctx == 2048


@pytest.mark.parametrize("option, value", [("num_batch", 1 << 31), ("num_gpu", 1 << 31), ("num_thread", -1),
                                           ("num_ctx", 1 << 40)])
def test_an_out_of_range_load_option_is_a_400_and_leaves_the_loaded_runner(server, gemma, option, value):
    post(server, "/api/generate", {"model": gemma})
    first = server.scheduler.running()[0].runner
    status, data = post(server, "/api/generate", {"model": gemma, "options": {option: value}}, raw=True)
    assert status == 400 and json.loads(data)["error"].startswith('option "%s" must be between' % option)
    assert server.scheduler.running()[0].runner is first and first.alive()


def test_max_loaded_models_evicts_the_idle_runner(server, gemma, tiny_gguf):
    server.config.max_loaded_models = 1
    import_gguf(server.store, "other:latest", tiny_gguf)
    post(server, "/api/generate", {"model": gemma})
    post(server, "/api/generate", {"model": "other"})
    assert [e.model.short_name for e in server.scheduler.running()] == ["other:latest"]


def test_a_name_with_its_own_system_and_template_on_the_same_blob_uses_the_loaded_runner(server, gemma, gemma_gguf):
    server.config.max_loaded_models = 1
    import_gguf(server.store, "pirate:latest", gemma_gguf, params={"stop": ["<end_of_turn>"]},
                template="{{ .System }}\n\n{{ .Prompt }}",
                system="You are a pirate. Answer every question as a pirate would.")
    body = {"prompt": "Say hello.", "stream": False, "options": {"num_predict": 8, "temperature": 0}}
    plain = post(server, "/api/generate", dict(body, model=gemma))[1][0]
    runner = server.scheduler.running()[0].runner
    pirate = post(server, "/api/generate", dict(body, model="pirate"))[1][0]
    (entry,) = server.scheduler.running()
    assert entry.runner is runner and runner.alive()
    assert plain["response"] and pirate["response"]
    assert pirate["prompt_eval_count"] > plain["prompt_eval_count"] + 8   # its SYSTEM, per request
    status, data = _get(server, "/api/ps")
    assert [m["name"] for m in json.loads(data)["models"]] == [gemma, "pirate:latest"]


#: A copy-heavy answer: asked to repeat a small file, Gemma 3 270M gives the file back, which n-gram
#: speculation drafts from the prompt.
COPY_FILE = ''.join('def f%d(x):\n    """Return x plus %d."""\n    return x + %d\n\n\n' % (i, i, i) for i in range(6))
COPY_PROMPT = ("<start_of_turn>user\nRepeat this Python file exactly:\n\n```python\n%s```<end_of_turn>\n"
               "<start_of_turn>model\n" % COPY_FILE)


def test_ngram_speculation_drafts_and_leaves_the_greedy_text_unchanged(server, gemma):
    body = {"model": gemma, "prompt": COPY_PROMPT, "raw": True, "stream": False,
            "options": {"num_predict": 96, "temperature": 0, "seed": 1}}
    plain = post(server, "/api/generate", dict(body, options=dict(body["options"], speculative=False)))[1][0]
    assert "--spec-type" not in server.scheduler.running()[0].runner.args
    fast = post(server, "/api/generate", dict(body, options=dict(body["options"], speculative=True)))[1][0]
    again = post(server, "/api/generate", dict(body, options=dict(body["options"], speculative=True)))[1][0]
    assert again["response"] == fast["response"]             # with the n-gram pool the first run filled
    runner = server.scheduler.running()[0].runner
    assert runner.args[runner.args.index("--spec-type") + 1] == "ngram-mod"
    assert "def f1(x)" in plain["response"]                  # it does copy the file
    assert fast["response"] == plain["response"] and fast["eval_count"] == plain["eval_count"]
    log = runner.log_path.read_text(errors="replace")
    accepted = [int(m) for m in re.findall(r"draft acceptance = [0-9.]+ \(\s*(\d+) accepted", log)]
    assert accepted and accepted[-1] > 0                     # it did speculate


def test_prompt_longer_than_the_context_is_a_clear_400(server, gemma):
    status, data = post(server, "/api/generate", {"model": gemma, "prompt": "word " * 400,
                                                  "options": {"num_ctx": 256}}, raw=True)
    assert status == 400
    err = json.loads(data)["error"]
    assert "context window is 256 tokens" in err and "the prompt is 4" in err


def test_gemma_gives_a_real_coherent_answer(server, gemma):
    status, lines = post(server, "/api/generate", {
        "model": gemma, "prompt": "Question: What is the capital of France?\nAnswer:", "stream": False,
        "options": {"num_predict": 8, "temperature": 0, "stop": ["\n"]}})
    assert status == 200 and lines[0]["response"].strip() == "Paris"
    status, lines = post(server, "/api/generate", {
        "model": gemma, "prompt": "Monday, Tuesday, Wednesday,", "stream": False,
        "options": {"num_predict": 3, "temperature": 0}})
    assert lines[0]["response"].split(",")[0].strip() == "Thursday"


def test_official_ollama_client_generate_chat_and_ps(server, gemma):
    from test_embed import official_ollama
    out = official_ollama(server, """
        opts = {"num_predict": 4, "temperature": 0}
        g = client.generate(model=%(m)r, prompt="Question: What is the capital of France?\\nAnswer:", options=opts)
        gs = list(client.generate(model=%(m)r, prompt="Hello", options=opts, stream=True))
        c = client.chat(model=%(m)r, messages=[{"role": "user", "content": "Hi"}], options=opts)
        cs = list(client.chat(model=%(m)r, messages=[{"role": "user", "content": "Hi"}], options=opts, stream=True))
        ps = client.ps()
        print(json.dumps({"g": g.response, "g_done": g.done_reason, "g_eval": g.eval_count,
                          "gs": [x.done for x in gs], "c": c.message.role, "c_done": c.done,
                          "cs": [x.message.role for x in cs], "cs_last": cs[-1].done_reason,
                          "ps": [(m.model, m.context_length) for m in ps.models]}))
    """ % {"m": gemma})
    assert out["g"].strip().startswith("Paris") and out["g_done"] in ("stop", "length") and out["g_eval"] <= 4
    assert out["gs"][-1] is True and not any(out["gs"][:-1])
    assert out["c"] == "assistant" and out["c_done"] is True
    assert set(out["cs"]) == {"assistant"} and out["cs_last"] in ("stop", "length")
    assert out["ps"] == [[gemma, 4096]]
