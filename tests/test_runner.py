"""The runner layer against the real llama-server: load, generate, stop reasons, timings, tokenize."""
import os
import signal

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


def test_a_file_that_is_not_gguf_is_a_clear_error(llama_server_bin, tmp_path):
    bad = tmp_path / "notgguf.bin"
    bad.write_bytes(b"this is not a model\n" * 100)
    r = ollama.Runner(str(llama_server_bin), bad, log_path=tmp_path / "bad.log")
    with pytest.raises(ollama.OllamaError) as e:
        r.start(60)
    assert "llama-server process has terminated" in str(e.value)
    assert not r.alive()


def test_a_killed_child_is_detected(runner):
    os.kill(runner.pid, signal.SIGKILL)
    assert runner.exited(5)
    with pytest.raises(ollama.OllamaError) as e:
        list(runner.completion({"prompt": "x", "n_predict": 2}))
    assert str(e.value) == ollama.RUNNER_STOPPED


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
