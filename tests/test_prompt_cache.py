"""A prompt's state survives its runner (issue 26): saved at unload, restored by the next runner with the
same weights and settings, the same tokens as a cold run, never a half-written file, capped on disk.

The engine tests run the tiny random-weight llama (no sliding window, fast enough on 2 shared cores),
and Gemma 3 270M for a sliding window, which llama-server reuses once restored only with build_llama.sh's
swa_reuse fix (see PromptCache); without it those tests are skipped."""
import os
import re
import time
from pathlib import Path

import pytest

import ollama
from test_inference import import_gguf, post

# ~600 tokens of plain prose: long enough that reuse shows
LONG = " ".join("Step %d: the agent opens file_%d.py, reads the function, and writes a short note." % (i, i)
                for i in range(30))


@pytest.fixture
def tiny(server, tiny_gguf, llama_server_bin):
    server.scheduler.exe = str(llama_server_bin)
    server.scheduler.prompt_cache.min_tokens = 256     # below the default (1024): shorter prompts, same rule
    import_gguf(server.store, "tiny", tiny_gguf)
    return "tiny"


@pytest.fixture
def gemma(server, gemma_gguf, llama_server_bin):
    if not ollama.engine_reuses_windows(llama_server_bin):
        pytest.skip("%s has no swa_reuse line in its build-info: not built by this build_llama.sh" % llama_server_bin)
    server.scheduler.exe = str(llama_server_bin)
    server.scheduler.prompt_cache.min_tokens = 256
    import_gguf(server.store, "gemma", gemma_gguf)
    return "gemma"


def _generate(server, model, prompt, **extra):
    status, lines = post(server, "/api/generate", dict({
        "model": model, "prompt": prompt, "raw": True, "stream": False,
        "options": {"temperature": 0, "num_predict": 32, "num_ctx": 1024}}, **extra))
    assert status == 200, lines
    return lines[-1]


def _unload(server, model):
    """Unload the model and wait for its runner's prompt to be saved and the runner stopped."""
    post(server, "/api/generate", {"model": model, "keep_alive": 0})
    for thread in list(server.scheduler.stopping.values()):
        thread.join(120)


def _evaluated(server, nth, model="tiny"):
    """The prompt tokens the engine computed for the `nth` completion of `model` since the test began (its
    log's "prompt eval time" lines, written as the slot is released, which can be just after the answer):
    prompt_eval_count is the prompt's size, cached or not, as in Ollama."""
    log_path = server.config.home / "logs" / ("runner-%s_latest.log" % model)
    deadline = time.monotonic() + 10
    while True:
        text = log_path.read_text() if log_path.exists() else ""
        lines = [ln for ln in text.splitlines() if "prompt eval time" in ln]
        if len(lines) >= nth or time.monotonic() > deadline:
            return int(re.search(r"/\s*(\d+) tokens", lines[nth - 1]).group(1))
        time.sleep(0.05)


def _slot_files(server):
    return sorted(server.scheduler.prompt_cache.root.glob("*/*"))


def test_restored_prompt_cache_gives_the_cold_runs_tokens(server, tiny):
    first = _generate(server, tiny, LONG)
    assert _evaluated(server, 1) > 256
    _unload(server, tiny)
    files = _slot_files(server)
    assert [f.suffix for f in files] == [".slot"]      # one slot saved, no temp file left
    blob = Path(ollama.load_model(server.store, tiny).model_path).name
    assert files[0].parent == server.store.prompt_cache_dir(blob)
    turn2 = LONG + first["response"] + " Next, the agent"
    restored = _generate(server, tiny, turn2)
    assert _evaluated(server, 2) < 20                # the new words (and the answer's last tokens)
    _unload(server, tiny)
    for f in _slot_files(server):
        f.unlink()
    cold = _generate(server, tiny, turn2)
    assert _evaluated(server, 3) == cold["prompt_eval_count"]
    assert restored["response"] == cold["response"] and restored["eval_count"] == cold["eval_count"] == 32


def test_a_short_prompt_is_not_saved_and_a_long_one_is_not_replaced_by_it(server, tiny):
    _generate(server, tiny, LONG)
    _unload(server, tiny)
    (saved,) = _slot_files(server)
    before = saved.read_bytes()
    _generate(server, tiny, "Hello")                 # restores the long state, then overwrites the slot
    _unload(server, tiny)
    assert _slot_files(server) == [saved] and saved.read_bytes() == before


def test_a_runner_with_another_context_size_does_not_restore_the_file(server, tiny):
    _generate(server, tiny, LONG)
    _unload(server, tiny)
    other = _generate(server, tiny, LONG, options={"temperature": 0, "num_predict": 12, "num_ctx": 2048})
    assert _evaluated(server, 2) == other["prompt_eval_count"]   # all computed: the file is for num_ctx 1024
    _unload(server, tiny)
    assert len(_slot_files(server)) == 2              # one per key, side by side


def test_a_half_written_cache_file_is_never_used(server, tiny):
    first = _generate(server, tiny, LONG)
    _unload(server, tiny)
    (saved,) = _slot_files(server)
    data = saved.read_bytes()
    saved.with_name(saved.stem + ".dead.tmp").write_bytes(data)   # a kill during a save leaves this
    saved.write_bytes(data[:len(data) // 2])          # and were a file ever cut short, the engine refuses it
    again = _generate(server, tiny, LONG)
    assert _evaluated(server, 2) == again["prompt_eval_count"] and again["response"] == first["response"]
    assert not saved.exists() or saved.read_bytes() != data[:len(data) // 2]   # the bad file was removed


def test_prompt_key_differs_with_weights_context_and_kv_type(tmp_path):
    exe = tmp_path / "llama-server"
    exe.write_text("")
    key = ollama.Runner(str(exe), "/m/a", num_ctx=4096, slot_save_path=tmp_path).prompt_key()
    assert key == ollama.Runner(str(exe), "/m/a", num_ctx=4096, slot_save_path=tmp_path / "x").prompt_key()
    assert key != ollama.Runner(str(exe), "/m/b", num_ctx=4096, slot_save_path=tmp_path).prompt_key()
    assert key != ollama.Runner(str(exe), "/m/a", num_ctx=8192, slot_save_path=tmp_path).prompt_key()
    assert key != ollama.Runner(str(exe), "/m/a", num_ctx=4096, kv_cache_type="q8_0",
                                slot_save_path=tmp_path).prompt_key()
    os.utime(str(exe), ns=(1, 1))                      # a rebuilt engine
    assert key != ollama.Runner(str(exe), "/m/a", num_ctx=4096, slot_save_path=tmp_path).prompt_key()


def _fake_slot(root, blob, name, size, age):
    path = root / blob / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    t = time.time() - age
    os.utime(str(path), (t, t))
    return path


def test_the_cache_keeps_the_most_recently_used_files_within_its_limit(tmp_path):
    cache = ollama.PromptCache(ollama.Store(tmp_path), 250)
    old = _fake_slot(cache.root, "a" * 64, "k1-0.slot", 100, 300)
    mid = _fake_slot(cache.root, "b" * 64, "k2-0.slot", 100, 200)
    new = _fake_slot(cache.root, "a" * 64, "k3-0.slot", 100, 100)
    dead = _fake_slot(cache.root, "a" * 64, "k3-0.1234.tmp", 10, ollama.PROMPT_CACHE_TMP_AGE + 1)
    live = _fake_slot(cache.root, "a" * 64, "k3-0.5678.tmp", 10, 1)    # a save under way
    cache.trim()
    assert [p.exists() for p in (old, mid, new, dead, live)] == [False, True, True, False, True]
    ollama.PromptCache(ollama.Store(tmp_path), 0).trim()             # 0: off, and nothing kept
    assert not mid.exists() and not new.exists()


def test_the_cache_is_off_for_embeddings_images_drafts_and_at_zero(tiny_gguf, tmp_path):
    store = ollama.Store(tmp_path)
    import_gguf(store, "tiny", tiny_gguf)
    m = ollama.load_model(store, "tiny")
    assert ollama.PromptCache(store, 1 << 30).folder(m, False) == store.prompt_cache_dir(Path(m.model_path).name)
    assert ollama.PromptCache(store, 1 << 30).folder(m, True) is None
    assert ollama.PromptCache(store, 0).folder(m, False) is None
    m.projector_paths = ["/p"]
    assert ollama.PromptCache(store, 1 << 30).folder(m, False) is None


def test_prompt_cache_files_are_removed_with_their_model(tmp_path):
    store = ollama.Store(tmp_path)
    digest, _ = store.write_blob_bytes(b"weights")
    d = store.prompt_cache_dir(digest)
    d.mkdir(parents=True)
    (d / "k-0.slot").write_bytes(b"state")
    store.remove_unused([digest])
    assert not d.exists()


@pytest.mark.parametrize("value, size", [("", ollama.DEFAULT_PROMPT_CACHE), ("0", 0), ("4GiB", 4 << 30),
                                         ("500MB", 500 * 10**6), ("2g", 2 << 30), ("1.5 GB", 1500 * 10**6),
                                         ("123", 123), ("lots", ollama.DEFAULT_PROMPT_CACHE)])
def test_ollama_prompt_cache_is_a_size_with_units(value, size):
    assert ollama.Config({"HOME": "/h", "OLLAMA_PROMPT_CACHE": value}).prompt_cache == size


def _engine(tmp_path, swa_reuse):
    exe = tmp_path / ("llama-server-%s" % swa_reuse)
    exe.write_text("")
    lines = ["gguf_edits: v1:0", "swa_reuse: %s" % swa_reuse] if swa_reuse else ["gguf_edits: v1:0"]
    Path(str(exe) + ".build-info").write_text("\n".join(lines) + "\n")
    return str(exe)


def test_a_sliding_window_model_keeps_prompt_state_only_on_an_engine_that_reuses_windows(gemma_gguf, tiny_gguf,
                                                                                          tmp_path):
    store = ollama.Store(tmp_path)
    import_gguf(store, "gemma3:270m", gemma_gguf)
    import_gguf(store, "tiny", tiny_gguf)
    cache = ollama.PromptCache(store, 1 << 30)
    gemma, tiny = ollama.load_model(store, "gemma3:270m"), ollama.load_model(store, "tiny")
    patched, unpatched = _engine(tmp_path, "v1:bae2da55dbcf37f7"), _engine(tmp_path, "")
    assert cache.folder(gemma, False, patched) is not None
    assert cache.folder(gemma, False, unpatched) is None          # it would recompute every restored window
    assert cache.folder(gemma, False, str(tmp_path / "elsewhere")) is None   # no build-info: built otherwise
    assert cache.folder(gemma, False) is None
    (tmp_path / "linked").symlink_to(patched)                     # e.g. /usr/local/bin/llama-server -> bin/
    assert cache.folder(gemma, False, str(tmp_path / "linked")) is not None
    assert cache.folder(tiny, False, unpatched) is not None


def _chat(server, model, messages):
    status, lines = post(server, "/api/chat", {
        "model": model, "messages": messages, "stream": False,
        "options": {"temperature": 0, "num_predict": 32, "num_ctx": 4096}})
    assert status == 200, lines
    return lines[-1]


def test_a_restored_sliding_window_gives_an_agents_next_turn_the_cold_runs_tokens_without_its_prefix(server, gemma):
    turn1 = [{"role": "user", "content": LONG + " What does the agent do next?"}]
    first = _chat(server, gemma, turn1)
    assert _evaluated(server, 1, gemma) > 512           # past Gemma 3's 512-token window
    _unload(server, gemma)
    assert [f.suffix for f in _slot_files(server)] == [".slot"]
    turn2 = turn1 + [first["message"], {"role": "user", "content": "And after that?"}]
    restored = _chat(server, gemma, turn2)
    assert _evaluated(server, 2, gemma) < 30            # the new turn only: the window was reused
    _unload(server, gemma)
    for f in _slot_files(server):
        f.unlink()
    cold = _chat(server, gemma, turn2)
    assert _evaluated(server, 3, gemma) == cold["prompt_eval_count"] > 512
    assert restored["message"]["content"] == cold["message"]["content"]
    assert restored["eval_count"] == cold["eval_count"]


def test_a_prompt_that_leaves_a_restored_window_early_is_computed_whole_with_the_cold_runs_tokens(server, gemma):
    """The saved window holds the last 512 positions only: a prompt that differs before its end needs
    cells that are not there, so all of it is computed (as --swa-full would not: it reads the gap)."""
    _generate(server, gemma, LONG, options={"temperature": 0, "num_predict": 32, "num_ctx": 4096})
    _unload(server, gemma)
    words = LONG.split(" ")
    other = " ".join(words[:len(words) * 4 // 5]) + " Then the user asks for a summary of the files:"
    opts = {"temperature": 0, "num_predict": 24, "num_ctx": 4096}
    restored = _generate(server, gemma, other, options=opts)
    assert _evaluated(server, 2, gemma) == restored["prompt_eval_count"]
    _unload(server, gemma)
    for f in _slot_files(server):
        f.unlink()
    cold = _generate(server, gemma, other, options=opts)
    assert restored["response"] == cold["response"]
