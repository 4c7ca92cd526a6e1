"""The runner layer against the real llama-server: load, generate, stop reasons, timings, tokenize."""
import os
import shutil
import signal
import sys

import pytest

import ollama


@pytest.fixture
def runner(llama_server_bin, gemma_gguf, tmp_path):
    r = ollama.Runner(str(llama_server_bin), gemma_gguf, num_ctx=512, log_path=tmp_path / "runner.log")
    r.start(60)
    try:
        yield r
    finally:
        r.stop()


def _run(runner, **payload):
    events = list(runner.completion(payload))
    return "".join(e.get("content", "") for e in events), events[-1]


def test_generation_reports_timings_and_length_stop(runner):
    text, final = _run(runner, prompt="The capital of France is", n_predict=5, temperature=0)
    assert final["stop"] and ollama.stop_reason(final) == "length"
    t = final["timings"]
    assert t["predicted_n"] == 5 and t["prompt_n"] > 0 and t["predicted_ms"] > 0
    assert text


def test_stop_word_ends_generation_with_stop(runner):
    text, _ = _run(runner, prompt="1, 2, 3, 4,", n_predict=1, temperature=0)
    word = text.strip()[:1] or " "
    text, final = _run(runner, prompt="1, 2, 3, 4,", n_predict=20, temperature=0, stop=[word])
    assert ollama.stop_reason(final) == "stop" and final.get("stop_type") == "word"


def test_old_builds_stopped_booleans_are_understood():
    assert ollama.stop_reason({"stopped_limit": True}) == "length"
    assert ollama.stop_reason({"stopped_eos": True}) == "stop"
    assert ollama.stop_reason({"stopped_word": True}) == "stop"
    assert ollama.stop_reason({"stop_type": "eos"}) == "stop"


def test_tokenize_round_trip(runner):
    tokens = runner.tokenize("Hello, world! Ünïcode too.")
    assert tokens and all(isinstance(t, int) for t in tokens)
    assert runner.detokenize(tokens) == "Hello, world! Ünïcode too."


def test_a_runner_answers_only_its_own_key_which_ps_does_not_show(llama_server_bin, tiny_gguf, tmp_path):
    import http.client
    r = ollama.Runner(str(llama_server_bin), tiny_gguf, num_ctx=256, log_path=tmp_path / "runner.log")
    r.start(60)
    try:
        assert r.tokenize("hello")                          # our own calls carry the key
        for auth in ({}, {"Authorization": "Bearer wrong"}):  # another local user's do not
            conn = http.client.HTTPConnection("127.0.0.1", r.port, timeout=10)
            conn.request("POST", "/completion", body=b'{"prompt": "hi", "n_predict": 1}', headers=auth)
            assert conn.getresponse().status == 401, auth
            conn.close()
        with open("/proc/%d/cmdline" % r.pid, "rb") as f:
            assert r.api_key.encode() not in f.read()
    finally:
        r.stop()


def test_a_file_that_is_not_gguf_is_a_clear_error(llama_server_bin, tmp_path):
    bad = tmp_path / "notgguf.bin"
    bad.write_bytes(b"this is not a model\n" * 100)
    r = ollama.Runner(str(llama_server_bin), bad, log_path=tmp_path / "bad.log")
    with pytest.raises(ollama.OllamaError) as e:
        r.start(60)
    assert "llama-server process has terminated" in str(e.value)
    assert not r.alive()


def test_a_killed_child_is_detected_and_memory_is_named(runner):
    os.kill(runner.pid, signal.SIGKILL)             # what the kernel's out-of-memory killer sends
    assert runner.exited(5)
    with pytest.raises(ollama.OllamaError) as e:
        list(runner.completion({"prompt": "x", "n_predict": 2}))
    assert "terminated: SIGKILL (killed): most likely by the kernel's out-of-memory killer" in str(e.value)


def cpu_has(flag):
    with open("/proc/cpuinfo") as f:
        return flag in f.read().split()


needs_avx512 = pytest.mark.skipif(
    not (os.path.exists("/proc/cpuinfo") and cpu_has("avx512f") and shutil.which("qemu-x86_64")),
    reason="needs an AVX-512 CPU (whose native build qemu-x86_64 cannot run) and qemu-user")


@needs_avx512
def test_engine_built_for_another_cpu_says_rebuild(llama_server_bin, tiny_gguf, tmp_path, caplog):
    # qemu-x86_64 emulates a CPU without AVX-512, so this machine's native build dies of a real SIGILL.
    r = ollama.Runner(str(llama_server_bin), tiny_gguf, num_ctx=256, log_path=tmp_path / "runner.log",
                      launcher=["qemu-x86_64"])
    with pytest.raises(ollama.OllamaError) as e:
        r.start(120)
    assert str(e.value) == ("llama-server process has terminated: SIGILL (illegal instruction): the engine uses "
                            "CPU instructions this machine cannot run; rebuild it with ./build_llama.sh (with "
                            "--portable if the binary came from another machine)")
    assert str(e.value) in caplog.text               # server.log says what the client is told
    assert not r.alive()


def fake_engine(tmp_path, signame):
    """Fault injection: a "llama-server" that dies of `signame` as soon as it starts."""
    exe = tmp_path / "llama-server"
    exe.write_text("#!%s\nimport os, signal\nos.kill(os.getpid(), signal.%s)\n" % (sys.executable, signame))
    exe.chmod(0o755)
    return str(exe)


@pytest.mark.parametrize("signame, says", [
    ("SIGSEGV", "SIGSEGV (segmentation fault): the engine crashed; its log is "),
    ("SIGABRT", "SIGABRT (aborted): the engine crashed; its log is "),
    ("SIGKILL", "SIGKILL (killed): most likely by the kernel's out-of-memory killer"),
    ("SIGILL", "SIGILL (illegal instruction): the engine uses CPU instructions this machine cannot run"),
])
def test_a_death_by_signal_is_said_in_words(tmp_path, signame, says):
    log_path = tmp_path / "runner.log"
    r = ollama.Runner(fake_engine(tmp_path, signame), tmp_path / "model.gguf", log_path=log_path)
    with pytest.raises(ollama.OllamaError) as e:
        r.start(30)
    assert says in str(e.value)
    assert (str(log_path) in str(e.value)) == (signame in ("SIGSEGV", "SIGABRT"))


def test_a_plain_exit_keeps_its_status_and_log_tail(tmp_path):
    err = ollama.runner_exit_error(1, tmp_path / "x.log", ": error loading model")
    assert str(err) == "llama-server process has terminated: exit status 1: error loading model"


def test_missing_engine_says_to_build_it(tmp_path, monkeypatch):
    config = ollama.Config({"HOME": str(tmp_path)})
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ollama.OllamaError) as e:
        ollama.find_llama_server(config, here=tmp_path)
    assert "./build_llama.sh" in str(e.value)


def test_engine_is_found_in_order(tmp_path, monkeypatch):
    exe = tmp_path / "bin" / "llama-server"
    exe.parent.mkdir()
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    config = ollama.Config({"HOME": str(tmp_path)})
    assert ollama.find_llama_server(config, here=tmp_path) == str(exe)
    config.llama_server = "/bin/sh"
    assert ollama.find_llama_server(config, here=tmp_path) == "/bin/sh"


def test_a_saved_slot_restores_into_a_new_runner_with_its_tokens(llama_server_bin, tiny_gguf, tmp_path):
    slots = tmp_path / "slots"
    slots.mkdir()

    def runner():
        return ollama.Runner(str(llama_server_bin), tiny_gguf, num_ctx=512, slot_save_path=slots,
                             log_path=tmp_path / "runner.log").start(60)

    prompt = list(range(100, 400))
    r = runner()
    try:
        assert "--slot-save-path" in r.args
        list(r.completion({"prompt": prompt, "n_predict": 4, "temperature": 0, "cache_prompt": True}))
        saved = r.save_slot(0, "s.slot")
        key = r.prompt_key()
    finally:
        r.stop()
    assert saved["n_saved"] >= len(prompt) and (slots / "s.slot").stat().st_size == saved["n_written"]
    r = runner()
    try:
        assert r.prompt_key() == key                     # another port, the same key
        assert r.restore_slot(0, "s.slot")["n_restored"] == saved["n_saved"]
        final = list(r.completion({"prompt": prompt + [500], "n_predict": 1, "temperature": 0,
                                   "cache_prompt": True}))[-1]
        assert final["timings"]["prompt_n"] <= 2         # the rest was restored
    finally:
        r.stop()


def test_a_runner_without_a_slot_folder_offers_no_slot_actions(llama_server_bin, tiny_gguf, tmp_path):
    r = ollama.Runner(str(llama_server_bin), tiny_gguf, num_ctx=512, log_path=tmp_path / "runner.log")
    assert "--slot-save-path" not in r.args
    r.start(60)
    try:
        with pytest.raises(ollama.OllamaError):
            r.save_slot(0, "s.slot")
    finally:
        r.stop()
