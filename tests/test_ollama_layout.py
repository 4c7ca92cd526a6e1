"""Models as Ollama publishes them: GGUFs written by Ollama's converter run on stock llama.cpp through
GGUF edits (ollama_layout, engine_files and build_llama.sh's hook), their blobs untouched; manifests
llama.cpp cannot run are refused before a byte is fetched; DRAFT layers drive speculative decoding.

Each family is proven the same way: one set of tensors written twice, once in llama.cpp's layout (as
convert_hf_to_gguf.py writes it) and once in the layout Ollama's converter writes, and the real
llama-server must give the same greedy answer and the same top logprobs for both. Gemma 3 uses the real
270M weights; its vision tower (inside the file, Ollama's way) is a tiny random-weight one."""
import base64
import contextlib
import http.client
import json
import os
import shutil
import subprocess
import sys

import pytest

import fixtures
import ollama
from test_inference import import_gguf, post
from test_registry import _serve, registry  # noqa: F401 -- registry: the real docker-registry fixture
from test_vision import import_model, png

GREEDY = {"temperature": 0, "seed": 1, "num_predict": 12}


def answer(server, model, prompt="Question: Why is the sky blue? Answer:", **extra):
    """(text, prompt tokens, top-5 logprobs of the first tokens) of a greedy raw generate."""
    status, lines = post(server, "/api/generate", dict({"model": model, "prompt": prompt, "raw": True,
                                                        "stream": False, "options": GREEDY, "logprobs": True,
                                                        "top_logprobs": 5}, **extra))
    assert status == 200, lines
    out = lines[-1]
    tops = [[(t["token"], round(t["logprob"], 5)) for t in step["top_logprobs"]] for step in out["logprobs"][:3]]
    return out["response"], out["prompt_eval_count"], tops


def delete(server, model):
    conn = http.client.HTTPConnection("127.0.0.1", server.server_port, timeout=60)
    conn.request("DELETE", "/api/delete", body=json.dumps({"model": model}))
    status = conn.getresponse().status
    conn.close()
    return status


@contextlib.contextmanager
def pulled_by_another_serve(name, engine, tmp_path):
    """Push `name` from the `server` fixture's store (OLLAMA_HOST) to its registry, and yield a second
    serve, with a store of its own, that has pulled it."""
    assert ollama.main(["push", "--insecure", name]) == 0
    other = ollama.make_server(ollama.Config({"HOME": str(tmp_path), "OLLAMA_MODELS": str(tmp_path / "m2"),
                                              "OLLAMA_LLAMA_SERVER": str(engine)}), "127.0.0.1", 0)
    with fixtures.serving(other):
        status, lines = post(other, "/api/pull", {"model": name, "insecure": True, "stream": False})
        assert status == 200 and lines[-1] == {"status": "success"}
        yield other


def view_files(store):
    root = store.root / ".ollama-py" / "views"
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.is_dir() else []


# -- gemma3 (real weights) ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ollama_gemma3(gemma_gguf, tmp_path_factory):
    return fixtures.write_ollama_gemma3(gemma_gguf, tmp_path_factory.mktemp("layout") / "gemma3-ollama.gguf")


def test_stock_llama_cpp_refuses_ollamas_gemma3(ollama_gemma3, llama_server_bin, tmp_path):
    """What users of other llama.cpp front ends meet: the reason this layer exists."""
    runner = ollama.Runner(str(llama_server_bin), ollama_gemma3, num_ctx=256, log_path=tmp_path / "r.log")
    with pytest.raises(ollama.OllamaError, match="layer_norm_rms_epsilon"):
        runner.start(timeout=60)


def test_gemma3_in_ollamas_layout_answers_as_llama_cpps_does(server, engine, gemma_gguf, ollama_gemma3):
    import_gguf(server.store, "orig", gemma_gguf)
    import_gguf(server.store, "ollama", ollama_gemma3)
    want = answer(server, "orig")
    assert want[0] and answer(server, "ollama") == want
    blob = ollama.file_digest(ollama_gemma3)
    assert ollama.file_digest(server.store.blob_path(blob)) == blob     # the blob is as it came
    assert view_files(server.store) == [blob[7:], blob[7:] + "/model.gguf", blob[7:] + "/model.gguf.edits"]
    shown = post(server, "/api/show", {"model": "ollama"})[1][-1]
    assert shown["engine"] == {"layout": "Ollama's gemma3, translated as it loads"}
    assert "engine" not in post(server, "/api/show", {"model": "orig"})[1][-1]


def test_gemma3_pulled_from_docker_registry_runs_and_keeps_its_bytes(server, engine, registry, tmp_path,  # noqa: F811
                                                                     gemma_gguf, ollama_gemma3, capsys):
    """Pushed as Ollama's library serves a model, pulled by a second serve, answered with llama.cpp's
    greedy text; afterwards the pulled blob still hashes to its name, and push and /v2 serve it as is."""
    import_gguf(server.store, "orig", gemma_gguf)
    name = "%s/library/gemma3:270m" % registry
    import_gguf(server.store, name, ollama_gemma3)
    with pulled_by_another_serve(name, engine, tmp_path) as other:
        assert answer(other, name) == answer(server, "orig")
        for d in ollama.manifest_digests(other.store.get(name)[2]):
            assert ollama.file_digest(other.store.blob_path(d)) == d
        assert delete(other, name) == 200
        assert view_files(other.store) == []                  # the view went with the blob


def test_gemma3_from_an_ollama_store_copied_in_as_files_runs_from_the_cli(tmp_path, engine, gemma_gguf,
                                                                         ollama_gemma3):
    """An existing ~/.ollama (blobs and manifests as Ollama wrote them) copied to a new machine: `run`
    answers as llama.cpp's file does, and the store afterwards holds only what Ollama's would, plus
    the derived views under .ollama-py."""
    models = tmp_path / "ollama" / "models"
    store = ollama.Store(models)
    params = {"temperature": 0, "num_predict": 16}
    import_gguf(store, "gemma3:270m", ollama_gemma3, template="{{ .Prompt }}", params=params)
    import_gguf(store, "orig", gemma_gguf, template="{{ .Prompt }}", params=params)
    copied = tmp_path / "copied"
    shutil.copytree(str(models), str(copied))
    env = dict(os.environ, HOME=str(tmp_path), OLLAMA_MODELS=str(copied), OLLAMA_LLAMA_SERVER=str(engine),
               OLLAMA_HOST="127.0.0.1:%d" % ollama.free_port())
    serve = _serve(env)
    try:
        def run(model):
            out = subprocess.run([sys.executable, str(fixtures.ROOT / "ollama.py"), "run", model,
                                  "Why is the sky blue?"], env=env, capture_output=True, text=True, timeout=300)
            assert out.returncode == 0, out.stderr
            return out.stdout
        assert run("gemma3:270m") == run("orig")
    finally:
        serve.terminate()
        serve.wait(30)
    assert sorted(p.name for p in copied.iterdir()) == [".ollama-py", "blobs", "manifests"]


def test_monolithic_gemma3_sees_images_through_its_own_file(server, engine, registry, gemma_gguf,  # noqa: F811
                                                             tmp_path, capsys):
    """gemma3 4B and up: Ollama stores the vision tower inside the model file. Pulled from
    docker-registry, the same file serves as the projector; image answers match llama.cpp's model +
    mmproj pair, and follow the pixels."""
    mmproj = fixtures.write_tiny_gemma3_mmproj(tmp_path / "mmproj.gguf")
    mono = fixtures.write_ollama_gemma3(gemma_gguf, tmp_path / "gemma3-vision-ollama.gguf", mmproj=mmproj)
    import_model(server.store, "pair", gemma_gguf, mmproj)
    name = "%s/library/gemma3:4b-like" % registry
    import_model(server.store, name, mono)
    with pulled_by_another_serve(name, engine, tmp_path) as other:
        assert "vision" in ollama.load_model(other.store, name).capabilities()
        red, blue = tops(server, "pair", (200, 30, 30)), tops(server, "pair", (30, 30, 200))
        assert red != blue
        assert tops(other, name, (200, 30, 30)) == red and tops(other, name, (30, 30, 200)) == blue
        digest = ollama.file_digest(mono)
        assert ollama.file_digest(other.store.blob_path(digest)) == digest
        assert {digest[7:] + "/mmproj.gguf", digest[7:] + "/mmproj.gguf.edits"} <= set(view_files(other.store))


def tops(server, model, rgb):
    """Top-5 logprobs of the first two greedy tokens of a chat about one image of colour `rgb`."""
    status, lines = post(server, "/api/chat", {
        "model": model, "stream": False, "options": dict(GREEDY, num_predict=2), "logprobs": True,
        "top_logprobs": 5, "messages": [{"role": "user", "content": "What is this?",
                                         "images": [base64.b64encode(png(rgb)).decode()]}]})
    assert status == 200, lines
    return [[(t["token"], round(t["logprob"], 5)) for t in s["top_logprobs"]] for s in lines[-1]["logprobs"]]


# -- Llama 3: the tokenizer gap, through --override-kv ------------------------------------------------

@pytest.fixture(scope="module")
def llama3_pair(tmp_path_factory):
    """A tiny random-weight Llama 3 (llama.cpp's llama-bpe vocabulary, EOS <|eot_id|>), and the same
    tensors as Ollama's older converter wrote Llama 3: no pre-tokenizer, EOS <|end_of_text|>."""
    import gguf
    d = tmp_path_factory.mktemp("llama3")
    src = fixtures.write_tiny_gguf(d / "llama3.gguf", vocab="ggml-vocab-llama-bpe.gguf")
    cpp = fixtures.rewrite_gguf(src, d / "llama3-cpp.gguf", lambda kv: dict(
        kv, **{"tokenizer.ggml.eos_token_id": (128009, gguf.GGUFValueType.UINT32, None)}))

    def ollama_kv(kv):
        kv = {k: v for k, v in kv.items() if k != "tokenizer.ggml.pre"}
        kv["tokenizer.ggml.eos_token_id"] = (128001, gguf.GGUFValueType.UINT32, None)
        return kv
    return cpp, fixtures.rewrite_gguf(src, d / "llama3-ollama.gguf", ollama_kv)


def test_llama3_without_a_pre_tokenizer_tokenizes_as_llama_cpps(server, engine, llama3_pair, tmp_path):
    cpp, theirs = llama3_pair
    header = ollama.read_gguf(theirs, 0)
    text, clip = ollama.ollama_layout(header, theirs)
    assert clip is None and text.override_args() == [
        "--override-kv", "tokenizer.ggml.eos_token_id=int:128009",
        "--override-kv", "tokenizer.ggml.eot_token_id=int:128009",
        "--override-kv", "tokenizer.ggml.pre=str:llama-bpe"]
    import_gguf(server.store, "cpp", cpp)
    import_gguf(server.store, "ollama", theirs)
    prompt = "In 2024, 1234567 people didn't say: 'hello world'!"
    want = answer(server, "cpp", prompt)
    assert answer(server, "ollama", prompt) == want
    # the gap is real: read as it is, the same text is cut into other tokens
    runner = ollama.Runner(str(engine), theirs, num_ctx=256, log_path=tmp_path / "r.log").start(60)
    try:
        assert len(runner.tokenize(prompt)) != want[1] - 1          # -1: the BOS the prompt count has
    finally:
        runner.stop()


# -- olmo3: another architecture name and key prefix (the hook's key renames) ---------------------------

def test_olmo3_runs_as_llama_cpps_olmo2(server, engine, tmp_path):
    import gguf
    cpp = fixtures.write_tiny_gguf(tmp_path / "olmo2.gguf", arch="olmo2", seed=5)

    def olmo3(kv):
        out = {k.replace("olmo2.", "olmo3.", 1) if k.startswith("olmo2.") else k: v for k, v in kv.items()}
        out["general.architecture"] = ("olmo3", gguf.GGUFValueType.STRING, None)
        return out
    theirs = fixtures.rewrite_gguf(cpp, tmp_path / "olmo3-ollama.gguf", olmo3)
    import_gguf(server.store, "cpp", cpp)
    import_gguf(server.store, "ollama", theirs)
    want = answer(server, "cpp", "once upon a time")
    assert answer(server, "ollama", "once upon a time") == want


# -- gpt-oss: another architecture name, key prefix and tensor names -------------------------------------

def test_gptoss_runs_as_llama_cpps_gpt_oss(server, engine, tmp_path):
    """A tiny random-weight gpt-oss (attention sinks, MoE with biases) relabelled as Ollama's converter
    writes gpt-oss: architecture gptoss, gptoss.* keys without the expert FFN size and the YaRN type,
    attn_out, attn_sinks without .weight, ffn_norm for post_attention_norm."""
    cpp = fixtures.write_tiny_gpt_oss(tmp_path / "gpt-oss.gguf", seed=9)

    def kv(kv):
        out = {k.replace("gpt-oss.", "gptoss.", 1): v for k, v in kv.items()
               if k not in ("gpt-oss.expert_feed_forward_length", "gpt-oss.rope.scaling.type")}
        out["general.architecture"] = ("gptoss",) + kv["general.architecture"][1:]
        return out

    def names(tensors):
        renames = ((".attn_output.", ".attn_out."), (".attn_sinks.weight", ".attn_sinks"),
                   (".post_attention_norm.", ".ffn_norm."))
        out = []
        for name, t in tensors:
            for old, new in renames:
                name = name.replace(old, new)
            out.append((name, t))
        return out
    theirs = fixtures.rewrite_gguf(cpp, tmp_path / "gptoss-ollama.gguf", kv, names)
    g = ollama.read_gguf(theirs, 0)
    assert g.architecture == "gptoss" and ollama._tensor(g, "blk.0.attn_sinks") is not None
    import_gguf(server.store, "cpp", cpp)
    import_gguf(server.store, "ollama", theirs)
    assert answer(server, "ollama", "once upon a time") == answer(server, "cpp", "once upon a time")


# -- mistral3: YaRN keys under Ollama's names, the vision tower inside -------------------------------------

def test_mistral3_reads_ollamas_yarn_keys_and_leaves_the_vision_tower(server, engine, tmp_path):
    import gguf
    import numpy as np
    f32 = gguf.GGUFValueType.FLOAT32
    yarn = {"rope.scaling.yarn_beta_fast": 32.0, "rope.scaling.yarn_beta_slow": 1.0,
            "rope.scaling.yarn_log_multiplier": 0.5, "attention.temperature_scale": 0.3}
    src = fixtures.write_tiny_gguf(tmp_path / "m.gguf", arch="mistral3", seed=11)
    cpp = fixtures.rewrite_gguf(src, tmp_path / "mistral3.gguf", lambda kv: dict(kv, **{
        "mistral3." + k: (v, f32, None) for k, v in yarn.items()}, **{
        "mistral3.rope.scaling.type": ("yarn", gguf.GGUFValueType.STRING, None),
        "mistral3.rope.scaling.factor": (2.0, f32, None),
        "mistral3.rope.scaling.original_context_length": (1024, gguf.GGUFValueType.UINT32, None)}))
    theirs_names = {"rope.scaling.yarn_beta_fast": "rope.scaling.beta_fast",
                    "rope.scaling.yarn_beta_slow": "rope.scaling.beta_slow",
                    "rope.scaling.yarn_log_multiplier": "rope.scaling.mscale_all_dim",
                    "attention.temperature_scale": "rope.scaling_beta"}

    class Tower:                                          # what Ollama's file also holds: a vision tower
        data, tensor_type = np.zeros((4, 8), dtype=np.float32), gguf.GGMLQuantizationType.F32
    theirs = fixtures.rewrite_gguf(
        cpp, tmp_path / "mistral3-ollama.gguf",
        lambda kv: {("mistral3." + theirs_names[k[9:]] if k[9:] in theirs_names else k): v for k, v in kv.items()},
        lambda tensors: tensors + [("v.blk.0.attn_q.weight", Tower), ("mm.linear_1.weight", Tower)])
    import_gguf(server.store, "cpp", cpp)
    import_gguf(server.store, "ollama", theirs)
    assert answer(server, "ollama", "once upon a time") == answer(server, "cpp", "once upon a time")


def test_monolithic_mistral3_sees_images_through_its_own_file(server, engine, tmp_path):
    """Mistral Small 3.1 as Ollama's converter writes it: the Pixtral tower inside, vision Q/K rows in HF
    order, patch_conv F16, no img_break. Read through its edits (Q/K as the blob's rows reordered) and a
    data file of the computed tensors, image answers match llama.cpp's model + mmproj pair and follow
    the pixels; the data file holds only the computed tensors, is written once, goes with the model,
    and the blob keeps its bytes."""
    text = fixtures.write_tiny_gguf(tmp_path / "mistral3.gguf", arch="mistral3", seed=31)
    mmproj = fixtures.write_tiny_pixtral_mmproj(tmp_path / "mmproj.gguf", seed=32)
    mono = fixtures.write_ollama_mistral3(text, tmp_path / "mistral3-ollama.gguf", mmproj)
    import_model(server.store, "pair", text, mmproj)
    import_model(server.store, "ollama", mono)
    red, blue = tops(server, "pair", (200, 30, 30)), tops(server, "pair", (30, 30, 200))
    assert red != blue
    assert tops(server, "ollama", (200, 30, 30)) == red and tops(server, "ollama", (30, 30, 200)) == blue
    digest = ollama.file_digest(mono)
    assert ollama.file_digest(server.store.blob_path(digest)) == digest
    data = server.store.view_dir(digest) / "mmproj.gguf.data"
    g = ollama.read_gguf(mono, 0)
    patch = ollama._tensor(g, "v.patch_conv.weight")                     # F16, stored again as F32
    want = 2 * ollama._tensor_nbytes(patch.type, patch.shape) + 4 * g.embedding_length      # and img_break
    assert want <= data.stat().st_size - 64 < want + 32      # a 64-byte stamp, 32-byte alignment; Q/K: the blob's rows
    written = data.stat().st_mtime_ns
    ollama.engine_files(server.store, ollama.load_model(server.store, "ollama"), str(engine))   # a next load
    assert data.stat().st_mtime_ns == written
    assert delete(server, "ollama") == 200 and not data.exists()          # gone with the blob's view


def test_data_edits_widen_f16_bf16_and_q8_0_to_f32_and_move_whole_rows():
    """What the data edits compute, against numpy: F16, BF16 and Q8_0 widened to F32 (Q/K/V of mixed
    types are merged so), and the RoPE permutation as the blob's own rows, of any type, reordered."""
    import numpy as np
    rng = np.random.default_rng(5)
    x = rng.standard_normal(64).astype(np.float32)
    assert ollama._f32_bytes(x.astype(np.float16).tobytes(), 1) == x.astype(np.float16).astype(np.float32).tobytes()
    bf16 = (x.view(np.uint32) >> 16).astype(np.uint16)
    assert ollama._f32_bytes(bf16.tobytes(), 30) == (bf16.astype(np.uint32) << 16).view(np.float32).tobytes()
    q = rng.integers(-127, 128, 64).astype(np.int8)
    scales = np.array([0.01, 0.02], dtype=np.float16)
    q8 = b"".join(scales[i].tobytes() + q[32 * i:32 * i + 32].tobytes() for i in range(2))
    want = (np.repeat(scales.astype(np.float32), 32) * q).astype(np.float32)
    assert np.allclose(np.frombuffer(ollama._f32_bytes(q8, 8), dtype=np.float32), want, rtol=1e-6)

    class Header:
        data_offset = 100
    t = ollama.GGUFTensor("v.blk.0.attn_q.weight", 8, [32, 8], 60)     # Q8_0: a row is one 34-byte block
    order = ollama._rope_order(8, 2)
    assert order == [0, 2, 1, 3, 4, 6, 5, 7]                            # per head of 4: halves interleaved
    assert ollama._ranges(Header, t, order)[:3] == [(160, 34), (160 + 68, 34), (160 + 34, 34)]
    assert ollama._ranges(Header, t, range(8)) == ollama._ranges(Header, t) == [(160, 8 * 34)]


def test_a_v1_engine_runs_monolithic_mistral3_text_only(tmp_path):
    """An engine built before the data edit (hook v1) gets no projector that needs one: the model still
    answers text, and the log says what to rebuild."""
    text = fixtures.write_tiny_gguf(tmp_path / "mistral3.gguf", arch="mistral3", seed=31)
    mono = fixtures.write_ollama_mistral3(text, tmp_path / "mono.gguf",
                                          fixtures.write_tiny_pixtral_mmproj(tmp_path / "mmproj.gguf"))
    exe = tmp_path / "llama-server"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    (tmp_path / "llama-server.build-info").write_text("gguf_edits: v1:0123456789abcdef\n")
    store = ollama.Store(tmp_path / "models")
    import_model(store, "m", mono)
    files = ollama.engine_files(store, ollama.load_model(store, "m"), str(exe))
    assert files.projector is None and files.model_path.endswith("model.gguf")
    (tmp_path / "llama-server.build-info").write_text("gguf_edits: v2:0123456789abcdef\n")
    files = ollama.engine_files(store, ollama.load_model(store, "m"), str(exe))
    assert files.projector.endswith("mmproj.gguf") and os.path.getsize(files.projector + ".data") > 0


# -- qwen3-vl: M-RoPE metadata Ollama's files lack, the vision tower inside -----------------------------------

def test_qwen3vl_gets_its_mrope_sections_and_leaves_the_vision_tower(server, engine, tmp_path):
    import gguf
    import numpy as np
    src = fixtures.write_tiny_gguf(tmp_path / "q.gguf", arch="qwen3vl", n_embd=256, n_head=2, seed=13)
    cpp = fixtures.rewrite_gguf(src, tmp_path / "qwen3vl.gguf", lambda kv: dict(kv, **{
        "qwen3vl.rope.dimension_sections": ([24, 20, 20, 0], gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT32),
        "qwen3vl.n_deepstack_layers": (0, gguf.GGUFValueType.UINT32, None)}))

    class Tower:
        data, tensor_type = np.zeros((4, 8), dtype=np.float32), gguf.GGMLQuantizationType.F32
    theirs = fixtures.rewrite_gguf(
        cpp, tmp_path / "qwen3vl-ollama.gguf",
        lambda kv: {k: v for k, v in kv.items() if k not in ("qwen3vl.rope.dimension_sections",
                                                              "qwen3vl.n_deepstack_layers")},
        lambda tensors: tensors + [("v.blk.0.attn_qkv.weight", Tower), ("v.merger.linear_fc1.weight", Tower)])
    import_gguf(server.store, "cpp", cpp)
    import_gguf(server.store, "ollama", theirs)
    assert answer(server, "ollama", "once upon a time") == answer(server, "cpp", "once upon a time")


def test_monolithic_qwen3vl_sees_images_through_its_own_file(server, engine, tmp_path):
    """Qwen3-VL as Ollama's converter wrote it: the vision tower inside with Q, K and V split, one Conv3D
    patch embedding, F16 position embeddings, a deepstack merger numbered in order. Read through its
    edits (attn_qkv as the blob's Q, K and V bytes in a row; the two per-frame kernels and the F32
    position embeddings from the data file), image answers match llama.cpp's model + mmproj pair and
    follow the pixels."""
    import gguf
    src = fixtures.write_tiny_gguf(tmp_path / "q.gguf", arch="qwen3vl", n_embd=256, n_head=2, seed=35)
    text = fixtures.rewrite_gguf(src, tmp_path / "qwen3vl.gguf", lambda kv: dict(kv, **{
        "qwen3vl.rope.dimension_sections": ([24, 20, 20, 0], gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT32),
        "qwen3vl.n_deepstack_layers": (1, gguf.GGUFValueType.UINT32, None)}))
    mmproj = fixtures.write_tiny_qwen3vl_mmproj(tmp_path / "mmproj.gguf", seed=36)
    mono = fixtures.write_ollama_qwen3vl(text, tmp_path / "qwen3vl-ollama.gguf", mmproj)
    import_model(server.store, "pair", text, mmproj)
    import_model(server.store, "ollama", mono)
    red, blue = tops(server, "pair", (200, 30, 30)), tops(server, "pair", (30, 30, 200))
    assert red != blue
    assert tops(server, "ollama", (200, 30, 30)) == red and tops(server, "ollama", (30, 30, 200)) == blue
    g = ollama.read_gguf(mono, 0)
    patch, pos = ollama._tensor(g, "v.patch_embed.weight"), ollama._tensor(g, "v.pos_embed.weight")
    want = 2 * (ollama._tensor_nbytes(patch.type, patch.shape) + ollama._tensor_nbytes(pos.type, pos.shape))
    data = server.store.view_dir(ollama.file_digest(mono)) / "mmproj.gguf.data"
    assert want <= data.stat().st_size - 64 < want + 3 * 32   # as F32: the kernels and positions; attn_qkv: the blob's


@pytest.mark.parametrize("arch", ["qwen35", "qwen35moe"])
def test_monolithic_qwen35_sees_images_through_its_own_file(server, engine, tmp_path, arch):
    """Qwen3.5 as Ollama's converter writes it: Qwen3-VL's tower without deepstack inside the hybrid text
    model. Its projector view gives llama.cpp's pair's image answers, which follow the pixels."""
    text = fixtures.write_tiny_qwen3next(tmp_path / (arch + ".gguf"), arch, seed=37)
    mmproj = fixtures.write_tiny_qwen3vl_mmproj(tmp_path / "mmproj.gguf", n_embd_text=64, deepstack=(),
                                                pixel_limits=False, seed=38)
    mono = fixtures.write_ollama_qwen3vl(text, tmp_path / (arch + "-ollama.gguf"), mmproj, arch=arch)
    import_model(server.store, "pair", text, mmproj)
    import_model(server.store, "ollama", mono)
    red, blue = tops(server, "pair", (200, 30, 30)), tops(server, "pair", (30, 30, 200))
    assert red != blue
    assert tops(server, "ollama", (200, 30, 30)) == red and tops(server, "ollama", (30, 30, 200)) == blue


def answers_alike(server, cpp, theirs, prompt="once upon a time"):
    """Import llama.cpp's file and Ollama's (the first read as it is, the second through its edits)
    and check they answer alike: the same greedy text and top-5 logprobs. Returns Ollama's edits."""
    assert ollama.ollama_layout(ollama.read_gguf(cpp, 0), cpp) == (None, None)
    edits, _ = ollama.ollama_layout(ollama.read_gguf(theirs, 0), theirs)
    import_gguf(server.store, "cpp", cpp)
    import_gguf(server.store, "ollama", theirs)
    want = answer(server, "cpp", prompt)
    assert want[0] and answer(server, "ollama", prompt) == want
    return edits


# -- lfm2: the last norm under another name, a feed-forward size the tensors contradict -------------------

def test_lfm2_runs_as_llama_cpps_lfm2(server, engine, tmp_path):
    """Short-convolution and attention layers; Ollama's file names the last norm output_norm (llama.cpp:
    token_embd_norm) and, from its converter's auto-adjusted size, claims a feed-forward length that
    ffn_gate's shape contradicts (llama.cpp refuses the load)."""
    import gguf
    cpp = fixtures.write_tiny_lfm2(tmp_path / "lfm2.gguf", seed=21)
    theirs = fixtures.rewrite_gguf(
        cpp, tmp_path / "lfm2-ollama.gguf",
        lambda kv: dict(kv, **{"lfm2.feed_forward_length": (128, gguf.GGUFValueType.UINT32, None)}),
        lambda tensors: [("output_norm.weight" if n == "token_embd_norm.weight" else n, t) for n, t in tensors])
    edits = answers_alike(server, cpp, theirs)
    assert edits.rename == [("output_norm.weight", "token_embd_norm.weight")]
    assert edits.set["lfm2.feed_forward_length"] == (4, 96)


# -- laguna: sliding-window RoPE keys, the attention gate's name, YaRN's attention factor ---------------

def test_laguna_runs_as_llama_cpps_laguna(server, engine, tmp_path):
    """Hybrid full/sliding-window attention with per-layer heads, YaRN on the full layers, a per-head
    attention gate and a MoE, relabelled as Ollama's converter writes Laguna: the sliding-window RoPE
    under rope.swa.*, YaRN's betas and attention factor under its own names (the factor, 1 + 0.1 ln
    factor, under the name llama.cpp reads as an extra multiplier), layer types and gating spelled
    out, and the gate named attn_g."""
    import math
    import gguf
    T = gguf.GGUFValueType
    cpp = fixtures.write_tiny_laguna(tmp_path / "laguna.gguf", seed=23)
    renamed = {"laguna.rope.freq_base_swa": "laguna.rope.swa.freq_base",
               "laguna.rope.dimension_count_swa": "laguna.rope.swa.dimension_count",
               "laguna.rope.scaling.yarn_beta_fast": "laguna.rope.scaling.beta_fast",
               "laguna.rope.scaling.yarn_beta_slow": "laguna.rope.scaling.beta_slow"}

    def kv(kv):
        out = {renamed.get(k, k): v for k, v in kv.items()}
        out.update({
            "laguna.rope.scaling.attn_factor": (1 + 0.1 * math.log(4.0), T.FLOAT32, None),
            "laguna.rope.partial_rotary_factor": (0.5, T.FLOAT32, None),
            "laguna.rope.swa.scaling.type": ("linear", T.STRING, None),
            "laguna.rope.swa.scaling.factor": (1.0, T.FLOAT32, None),
            "laguna.rope.swa.partial_rotary_factor": (1.0, T.FLOAT32, None),
            "laguna.attention.layer_types": ([0, 1, 1, 1], T.ARRAY, T.UINT32),
            "laguna.attention.sliding_window_pattern": ([False, True, True, True], T.ARRAY, T.BOOL),
            "laguna.attention.sink_enabled": (False, T.BOOL, None),
            "laguna.attention.gating_type": (1, T.UINT32, None), "laguna.attention.qk_norm": (True, T.BOOL, None),
            "laguna.expert_shared_count": (1, T.UINT32, None), "laguna.decoder_sparse_step": (1, T.UINT32, None),
            "laguna.dense_layers": ([0], T.ARRAY, T.UINT32),
            "tokenizer.ggml.add_bos_token": kv.get("tokenizer.ggml.add_bos_token", (True, T.BOOL, None))})
        return out
    theirs = fixtures.rewrite_gguf(cpp, tmp_path / "laguna-ollama.gguf", kv, lambda tensors: [
        (n.replace(".attn_gate.", ".attn_g."), t) for n, t in tensors])
    edits = answers_alike(server, cpp, theirs, "Question: Why is the sky blue? Answer:")
    assert ("blk.0.attn_g.weight", "blk.0.attn_gate.weight") in edits.rename
    assert edits.remove == ["laguna.rope.scaling.attn_factor"]


def embeddings_alike(server, cpp, theirs, inputs=("The sky is blue because of Rayleigh scattering", "Cats purr")):
    """answers_alike for embedding models: the same /api/embed vectors. Returns Ollama's edits."""
    assert ollama.ollama_layout(ollama.read_gguf(cpp, 0), cpp) == (None, None)
    edits, _ = ollama.ollama_layout(ollama.read_gguf(theirs, 0), theirs)
    import_gguf(server.store, "cpp", cpp)
    import_gguf(server.store, "ollama", theirs)
    vectors = []
    for model in ("cpp", "ollama"):
        status, lines = post(server, "/api/embed", {"model": model, "input": list(inputs)})
        assert status == 200, lines
        vectors.append(lines[-1]["embeddings"])
    assert len(vectors[0]) == len(inputs) and vectors[0][0] != vectors[0][1]
    assert vectors[1] == vectors[0]
    return edits


# -- embeddinggemma: a gemma3 file with the sentence-transformers projections ------------------------------

def test_embeddinggemma_embeds_as_llama_cpps_gemma_embedding(server, engine, tmp_path):
    """Ollama's embeddinggemma files say gemma3 (non-causal, a sliding-window pattern array, no SWA
    RoPE base) and name the projections dense.0/dense.1 and the last norm norm: read as llama.cpp's
    gemma-embedding, they embed as its own file does."""
    import gguf
    T = gguf.GGUFValueType
    cpp = fixtures.write_tiny_gemma_embedding(tmp_path / "embeddinggemma.gguf", seed=25)

    def kv(kv):
        out = {k.replace("gemma-embedding.", "gemma3.", 1): v for k, v in kv.items()
               if not k.startswith(("gemma-embedding.dense_", "gemma-embedding.rope.freq_base_swa"))}
        out["general.architecture"] = ("gemma3",) + kv["general.architecture"][1:]
        out["gemma3.attention.causal"] = (False, T.BOOL, None)
        out["gemma3.attention.sliding_window_pattern"] = ([True] * 5 + [False], T.ARRAY, T.BOOL)
        return out
    names = {"dense_2.weight": "dense.0.weight", "dense_3.weight": "dense.1.weight",
             "output_norm.weight": "norm.weight"}
    theirs = fixtures.rewrite_gguf(cpp, tmp_path / "embeddinggemma-ollama.gguf", kv,
                                   lambda tensors: [(names.get(n, n), t) for n, t in tensors])
    edits = embeddings_alike(server, cpp, theirs)
    assert edits.set["general.architecture"] == (8, "gemma-embedding")


# -- llama4: the vision tower inside the file ---------------------------------------------------------------

def tower():
    """A stand-in tensor for rewrite_gguf: part of a tower the text loader must not see."""
    import numpy as np

    class Tower:
        data, tensor_type = np.zeros((4, 8), dtype=np.float32), 0       # GGMLQuantizationType.F32
    return Tower


def test_llama4_runs_its_text_side_with_the_vision_tower_inside(server, engine, tmp_path):
    """Ollama's llama4 files hold the vision encoder and projector (v.*, mm.*) and their llama4.vision.*
    keys beside the text model, and spell out the chunk size and q/k norm llama.cpp derives."""
    import gguf
    T = gguf.GGUFValueType
    cpp = fixtures.write_tiny_llama4(tmp_path / "llama4.gguf", seed=27)
    theirs = fixtures.rewrite_gguf(
        cpp, tmp_path / "llama4-ollama.gguf",
        lambda kv: dict(kv, **{"llama4.use_qk_norm": (True, T.BOOL, None),
                               "llama4.attention.chunk_size": (8192, T.UINT32, None),
                               "llama4.vision.block_count": (1, T.UINT32, None),
                               "llama4.vision.embedding_length": (8, T.UINT32, None)}),
        lambda tensors: tensors + [(name, tower()) for name in (
            "v.patch_embedding.weight", "v.blk.0.attn_q.weight", "mm.linear_1.weight")])
    edits = answers_alike(server, cpp, theirs, "Question: Why is the sky blue? Answer:")
    assert edits.hide == ["v.patch_embedding.weight", "v.blk.0.attn_q.weight", "mm.linear_1.weight"]


def test_monolithic_llama4_sees_images_through_its_own_file(server, engine, tmp_path):
    """Llama 4 as Ollama's converter writes it: the vision encoder inside under its names and
    llama4.vision.* keys. Its projector view (keys and names only: no data file) gives llama.cpp's
    pair's image answers, which follow the pixels."""
    text = fixtures.write_tiny_llama4(tmp_path / "llama4.gguf", seed=39)
    mmproj = fixtures.write_tiny_llama4_mmproj(tmp_path / "mmproj.gguf", seed=40)
    mono = fixtures.write_ollama_llama4(text, tmp_path / "llama4-ollama.gguf", mmproj)
    import_model(server.store, "pair", text, mmproj)
    import_model(server.store, "ollama", mono)
    red, blue = tops(server, "pair", (200, 30, 30)), tops(server, "pair", (30, 30, 200))
    assert red != blue
    assert tops(server, "ollama", (200, 30, 30)) == red and tops(server, "ollama", (30, 30, 200)) == blue
    assert not (server.store.view_dir(ollama.file_digest(mono)) / "mmproj.gguf.data").exists()


# -- qwen2.5-vl: another architecture name, three M-RoPE sections, the vision tower inside ------------------

def test_qwen25vl_runs_as_llama_cpps_qwen2vl(server, engine, tmp_path):
    """Ollama's qwen2.5-vl files say qwen25vl, give M-RoPE's sections as rope.mrope_section (three, not
    llama.cpp's four) and hold the vision tower and its qwen25vl.vision.* keys."""
    import gguf
    T = gguf.GGUFValueType
    cpp = fixtures.write_tiny_qwen2vl(tmp_path / "qwen2vl.gguf", seed=29)

    def kv(kv):
        out = {k.replace("qwen2vl.", "qwen25vl.", 1): v for k, v in kv.items()
               if k != "qwen2vl.rope.dimension_sections"}
        out["general.architecture"] = ("qwen25vl",) + kv["general.architecture"][1:]
        out["qwen25vl.rope.mrope_section"] = ([2, 3, 3], T.ARRAY, T.INT32)
        out["qwen25vl.vision.block_count"] = (1, T.UINT32, None)
        out["qwen25vl.vision.fullatt_block_indexes"] = ([0], T.ARRAY, T.INT32)
        return out
    theirs = fixtures.rewrite_gguf(cpp, tmp_path / "qwen25vl-ollama.gguf", kv, lambda tensors: tensors + [
        (name, tower()) for name in ("v.patch_embd_0.weight", "v.blk.0.attn_q.weight", "v.merger.mlp.0.weight")])
    edits = answers_alike(server, cpp, theirs, "Question: Why is the sky blue? Answer:")
    assert edits.set["qwen2vl.rope.dimension_sections"] == (9, (5, [2, 3, 3, 0]))
    assert len(edits.hide) == 3


def test_monolithic_qwen25vl_sees_images_through_its_own_file(server, engine, tmp_path):
    """Qwen2.5-VL as Ollama's converter writes it: the vision tower inside, its merger and two temporal
    patch embeddings under other names, those F16. Read through its edits (the patch embeddings as F32
    from the data file), image answers match llama.cpp's model + mmproj pair and follow the pixels."""
    text = fixtures.write_tiny_qwen2vl(tmp_path / "qwen2vl.gguf", seed=33)
    mmproj = fixtures.write_tiny_qwen25vl_mmproj(tmp_path / "mmproj.gguf", seed=34)
    mono = fixtures.write_ollama_qwen25vl(text, tmp_path / "qwen25vl-ollama.gguf", mmproj)
    import_model(server.store, "pair", text, mmproj)
    import_model(server.store, "ollama", mono)
    red, blue = tops(server, "pair", (200, 30, 30)), tops(server, "pair", (30, 30, 200))
    assert red != blue
    assert tops(server, "ollama", (200, 30, 30)) == red and tops(server, "ollama", (30, 30, 200)) == blue
    data = server.store.view_dir(ollama.file_digest(mono)) / "mmproj.gguf.data"
    embd = ollama._tensor(ollama.read_gguf(mono, 0), "v.patch_embd_0.weight")
    assert data.stat().st_size == 64 + 2 * 2 * ollama._tensor_nbytes(embd.type, embd.shape)   # both as F32


# -- snowflake-arctic-embed2: the precompiled charsmap as base64 characters ---------------------------------

def test_snowflake_arctic_embed2_embeds_as_llama_cpps_bert(server, engine, tmp_path):
    """Ollama's snowflake-arctic-embed2 stores the T5 tokenizer's precompiled charsmap as one base64
    character per string (llama.cpp refuses anything but bytes): decoded, it embeds as llama.cpp's file
    does, normalisation included ("A" is "a" through the charsmap)."""
    import gguf
    cpp = fixtures.write_tiny_xlm_roberta(tmp_path / "snowflake.gguf", seed=31)
    chars = list(base64.b64encode(fixtures.tiny_charsmap()).decode())
    theirs = fixtures.rewrite_gguf(cpp, tmp_path / "snowflake-ollama.gguf", lambda kv: dict(kv, **{
        "tokenizer.ggml.precompiled_charsmap": (chars, gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING)}))
    edits = embeddings_alike(server, cpp, theirs, ("the sky is blue because of scattering", "cats purr", "A sky"))
    assert edits.set == {"tokenizer.ggml.precompiled_charsmap": (9, (0, list(fixtures.tiny_charsmap())))}
    vectors = post(server, "/api/embed", {"model": "ollama", "input": ["A sky", "a sky", "b sky"]})[1][-1]["embeddings"]
    assert vectors[0] == vectors[1] != vectors[2]


# -- gemma4: the tokenizer named llama, the per-expert scale's name, audio and vision towers inside ----------

def test_gemma4_runs_its_text_side_as_llama_cpps_gemma4(server, engine, tmp_path):
    """Ollama's gemma4 files name the BPE tokenizer llama (read as SentencePiece, the text is cut
    otherwise), call the MoE's per-expert scale ffn_gate_inp.per_expert_scale, and hold the audio
    and vision towers (a.*, v.*, mm.*) and their keys."""
    import gguf
    T = gguf.GGUFValueType
    cpp = fixtures.write_tiny_gemma4(tmp_path / "gemma4.gguf", seed=33)
    towers = ("a.conv1d.0.weight", "a.blk.0.attn_q.weight", "v.patch_embd.weight", "v.blk.0.attn_q.weight",
              "mm.input_projection.weight")
    theirs = fixtures.rewrite_gguf(
        cpp, tmp_path / "gemma4-ollama.gguf",
        lambda kv: dict(kv, **{"tokenizer.ggml.model": ("llama", T.STRING, None),
                               "tokenizer.ggml.pre": ("gemma4", T.STRING, None),
                               "gemma4.vision.block_count": (1, T.UINT32, None),
                               "gemma4.audio.block_count": (1, T.UINT32, None)}),
        lambda tensors: [(n.replace(".ffn_down_exps.scale", ".ffn_gate_inp.per_expert_scale"), t) for n, t in tensors]
        + [(name, tower()) for name in towers])
    prompt = "the thermodynamics of tea kettles"
    edits = answers_alike(server, cpp, theirs, prompt)
    assert edits.set == {"tokenizer.ggml.model": (8, "gemma4")} and edits.hide == list(towers)
    assert edits.rename == [("blk.1.ffn_gate_inp.per_expert_scale", "blk.1.ffn_down_exps.scale")]
    # the gap is real: read as SentencePiece, the same text is cut into other tokens
    spm = fixtures.rewrite_gguf(cpp, tmp_path / "gemma4-spm.gguf", lambda kv: dict(
        kv, **{"tokenizer.ggml.model": ("llama", T.STRING, None)}))
    tokens = []
    for path in (cpp, spm):
        runner = ollama.Runner(str(engine), path, num_ctx=256, log_path=tmp_path / "r.log").start(60)
        try:
            tokens.append(runner.tokenize(prompt))
        finally:
            runner.stop()
    assert tokens[0] != tokens[1]


def test_monolithic_gemma4_sees_images_through_its_own_file(server, engine, tmp_path):
    """Gemma 4 as Ollama's converter writes it: the vision tower inside under llama.cpp's names, patch_embd
    F16, gemma4.vision.* keys. Its projector view (patch_embd as F32 from the data file) gives llama.cpp's
    pair's image answers, which follow the pixels."""
    text = fixtures.write_tiny_gemma4(tmp_path / "gemma4.gguf", seed=41)
    mmproj = fixtures.write_tiny_gemma4v_mmproj(tmp_path / "mmproj.gguf", seed=42)
    mono = fixtures.write_ollama_gemma4(text, tmp_path / "gemma4-ollama.gguf", mmproj)
    import_model(server.store, "pair", text, mmproj)
    import_model(server.store, "ollama", mono)
    red, blue = tops(server, "pair", (200, 30, 30)), tops(server, "pair", (30, 30, 200))
    assert red != blue
    assert tops(server, "ollama", (200, 30, 30)) == red and tops(server, "ollama", (30, 30, 200)) == blue


# -- LLaVA projectors without a projector type ------------------------------------------------------------

def test_llava_projector_without_a_type_is_read_as_mlp(server, engine, tmp_path):
    import gguf
    text = fixtures.write_tiny_gguf(tmp_path / "text.gguf")
    mmproj = fixtures.write_tiny_mmproj(tmp_path / "mmproj.gguf")
    untyped = fixtures.rewrite_gguf(mmproj, tmp_path / "mmproj-untyped.gguf",
                                    lambda kv: {k: v for k, v in kv.items() if k != "clip.projector_type"})
    assert ollama.ollama_layout(ollama.read_gguf(untyped, 0), untyped)[1].set == {
        "clip.projector_type": (8, "mlp")}
    assert gguf.GGUFReader(str(untyped)).fields.get("clip.projector_type") is None
    import_model(server.store, "typed", text, mmproj)
    import_model(server.store, "untyped", text, untyped)
    image = base64.b64encode(png((200, 30, 30))).decode()

    assert answer(server, "untyped", "look:", images=[image]) == answer(server, "typed", "look:", images=[image])


# -- the hook itself: a tensor read as its first rows (gemma3n's vocabulary cut) ---------------------------

def test_the_hook_reads_a_tensor_as_its_first_rows(engine, tmp_path):
    """token_embd with rows the tokenizer lacks (as Ollama's gemma3n files have): read through
    edits.shape and edits.truncate it answers as the file without them, and a cut that would read
    more than the tensor holds is refused."""
    import numpy as np
    src = fixtures.write_tiny_gguf(tmp_path / "tiny.gguf", seed=7)

    def more_rows(tensors):
        class Extra:                                     # the same rows, then 16 more
            def __init__(self, t):
                self.data = np.concatenate([t.data, np.ones((16, t.data.shape[1]), dtype=t.data.dtype)])
                self.tensor_type = t.tensor_type
        return [(n, Extra(t) if n == "token_embd.weight" else t) for n, t in tensors]
    padded = fixtures.rewrite_gguf(src, tmp_path / "padded.gguf", edit_tensors=more_rows)
    rows = ollama.read_gguf(src, 0).array_lengths["tokenizer.ggml.tokens"]
    n_embd = ollama._tensor(ollama.read_gguf(padded, 0), "token_embd.weight").shape[0]

    def logits(path, rows_read):
        view = tmp_path / ("view-%d" % rows_read) / "model.gguf"
        view.parent.mkdir()
        view.symlink_to(path)
        if rows_read:
            e = ollama.GGUFEdits("test")
            e.shape.append(("token_embd.weight", [n_embd, rows_read]))
            e.write(str(view) + ".edits")
        runner = ollama.Runner(str(engine), view, num_ctx=128, log_path=view.parent / "r.log")
        runner.start(60)
        try:
            return runner.call("/completion", {"prompt": "once upon", "n_predict": 1, "n_probs": 5,
                                               "temperature": 0})["completion_probabilities"]
        finally:
            runner.stop()
    assert logits(padded, rows) == logits(src, 0)
    with pytest.raises(ollama.OllamaError):
        logits(padded, rows + 17)                        # more rows than the tensor has


def test_the_hook_refuses_a_data_edit_it_cannot_read(engine, tmp_path):
    """edits.data naming a tensor the file lacks, a type ggml does not have, or byte ranges that do not
    add up to the tensor's size, stops the load with the tensor named in the engine's log, instead of
    reading other bytes."""
    src = fixtures.write_tiny_gguf(tmp_path / "tiny.gguf", seed=7)
    for case, (name, spec, ranges) in enumerate((("no.such.tensor", "0,64", "f0+256"),
                                                 ("output_norm.weight", "99,64", "f0+256"),
                                                 ("output_norm.weight", "0,64", "f0+128,d0+64"))):
        view = tmp_path / str(case) / "model.gguf"
        view.parent.mkdir()
        view.symlink_to(src)
        ollama.write_gguf(str(view) + ".edits", [("edits.data", 9, (8, [name, spec, ranges]))], [])
        runner = ollama.Runner(str(engine), view, num_ctx=128, log_path=view.parent / "r.log")
        with pytest.raises(ollama.OllamaError):
            runner.start(60)
        runner.stop()
        assert "cannot read tensor %s as %s" % (name, spec) in (view.parent / "r.log").read_text()


# -- the other families: what the edits say, on headers written in Ollama's layout ---------------------

def header(tmp_path, arch, kv=(), tensors=()):
    """A GGUF header of `arch` with `kv` [(key, type, value)] and F32 tensors {name: shape}."""
    path = tmp_path / ("%s.gguf" % arch)
    ollama.write_gguf(path, [("general.architecture", 8, arch)] + list(kv),
                      [(name, 0, shape, b"\0" * 4 * shape[0] * (shape[1] if len(shape) > 1 else 1))
                       for name, shape in tensors])
    return ollama.read_gguf(path, 0), path


def test_gptoss_is_renamed_to_llama_cpps_gpt_oss(tmp_path):
    g, path = header(tmp_path, "gptoss", [("gptoss.block_count", 4, 1)], [
        ("blk.0.attn_out.weight", [4, 4]), ("blk.0.attn_sinks", [4]), ("blk.0.ffn_norm.weight", [4]),
        ("blk.0.ffn_gate_exps.weight", [4, 8])])
    e, _ = ollama.ollama_layout(g, path)
    assert e.set["general.architecture"] == (8, "gpt-oss") and e.rename_keys == [("gptoss.", "gpt-oss.")]
    assert e.set["gpt-oss.expert_feed_forward_length"] == (4, 8)
    assert e.set["tokenizer.ggml.pre"] == (8, "gpt-4o")
    assert sorted(e.rename) == [("blk.0.attn_out.weight", "blk.0.attn_output.weight"),
                                ("blk.0.attn_sinks", "blk.0.attn_sinks.weight"),
                                ("blk.0.ffn_norm.weight", "blk.0.post_attention_norm.weight")]


def test_olmo3_runs_as_olmo2_and_lfm2_gets_its_norm_back(tmp_path):
    g, path = header(tmp_path, "olmo3", [("olmo3.block_count", 4, 1)])
    e, _ = ollama.ollama_layout(g, path)
    assert e.set == {"general.architecture": (8, "olmo2")} and e.rename_keys == [("olmo3.", "olmo2.")]
    g, path = header(tmp_path, "lfm2", [("lfm2.feed_forward_length", 4, 12)],
                     [("output_norm.weight", [4]), ("blk.0.ffn_gate.weight", [4, 8])])
    e, _ = ollama.ollama_layout(g, path)
    assert e.rename == [("output_norm.weight", "token_embd_norm.weight")]
    assert e.set["lfm2.feed_forward_length"] == (4, 8)


def test_vision_models_stored_whole_get_their_text_side_and_keys(tmp_path):
    g, path = header(tmp_path, "mistral3", [("mistral3.rope.scaling.beta_fast", 6, 32.0),
                                             ("mistral3.rope.scaling_beta", 6, 0.1)],
                     [("blk.0.attn_q.weight", [4, 4]), ("v.blk.0.attn_q.weight", [4, 4]), ("mm.1.weight", [4])])
    e, _ = ollama.ollama_layout(g, path)
    assert e.set == {"mistral3.rope.scaling.yarn_beta_fast": (6, 32.0),
                     "mistral3.attention.temperature_scale": (6, 0.1), "tokenizer.ggml.pre": (8, "tekken")}
    assert e.hide == ["v.blk.0.attn_q.weight", "mm.1.weight"]
    g, path = header(tmp_path, "qwen25vl", [("qwen25vl.rope.mrope_section", 9, (5, [16, 24, 24]))])
    e, _ = ollama.ollama_layout(g, path)
    assert e.set["qwen2vl.rope.dimension_sections"] == (9, (5, [16, 24, 24, 0]))
    assert e.rename_keys == [("qwen25vl.", "qwen2vl.")]
    g, path = header(tmp_path, "qwen3vl", [("qwen3vl.vision.deepstack_visual_indexes", 9, (4, [5, 11, 17]))])
    e, _ = ollama.ollama_layout(g, path)
    assert e.set == {"qwen3vl.rope.dimension_sections": (9, (5, [24, 20, 20, 0])),
                     "qwen3vl.n_deepstack_layers": (4, 3)}


def test_qwen3next_laguna_embeddinggemma_and_snowflake_edits(tmp_path):
    g, path = header(tmp_path, "qwen3next", [("qwen3next.attention.head_count_kv", 9, (4, [0, 2, 0, 2]))],
                     [("blk.1.ssm_dt", [4])])
    e, _ = ollama.ollama_layout(g, path)
    assert e.set == {"qwen3next.attention.head_count_kv": (4, 2)}
    assert e.rename == [("blk.1.ssm_dt", "blk.1.ssm_dt.bias")]
    g, path = header(tmp_path, "laguna", [("laguna.rope.swa.freq_base", 6, 10000.0)], [("blk.0.attn_g.weight", [4])])
    e, _ = ollama.ollama_layout(g, path)
    assert e.set == {"laguna.rope.freq_base_swa": (6, 10000.0)}
    assert e.rename == [("blk.0.attn_g.weight", "blk.0.attn_gate.weight")]
    g, path = header(tmp_path, "gemma3", [("gemma3.attention.causal", 7, False)],
                     [("dense.0.weight", [4, 8]), ("dense.1.weight", [8, 4]), ("norm.weight", [4])])
    e, _ = ollama.ollama_layout(g, path)
    assert e.set["general.architecture"] == (8, "gemma-embedding") and "gemma3.attention.causal" in e.remove
    assert e.set["gemma-embedding.dense_2_feat_out"] == (4, 8) and ("norm.weight", "output_norm.weight") in e.rename
    charsmap = base64.b64encode(bytes(range(5))).decode()
    g, path = header(tmp_path, "bert", [("tokenizer.ggml.model", 8, "t5"),
                                        ("tokenizer.ggml.precompiled_charsmap", 9, (8, list(charsmap)))])
    e, _ = ollama.ollama_layout(g, path)
    assert e.set == {"tokenizer.ggml.precompiled_charsmap": (9, (0, [0, 1, 2, 3, 4]))}
    e.write(str(tmp_path / "sidecar.edits"))                     # a byte array survives the sidecar
    assert ollama.read_gguf(tmp_path / "sidecar.edits").kv["tokenizer.ggml.precompiled_charsmap"] == [0, 1, 2, 3, 4]


def test_glm_flash_runs_as_deepseek2_and_nemotron_hides_its_mtp(tmp_path):
    g, path = header(tmp_path, "glm4moelite", [
        ("glm4moelite.attention.kv_lora_rank", 4, 512), ("glm4moelite.rope.dimension_count", 4, 64),
        ("glm4moelite.attention.key_length", 4, 256), ("tokenizer.ggml.eos_token_ids", 9, (5, [7, 8, 9]))])
    e, _ = ollama.ollama_layout(g, path)
    assert e.rename_keys == [("glm4moelite.", "deepseek2.")]
    assert {k: e.set[k][1] for k in ("deepseek2.attention.key_length", "deepseek2.attention.value_length",
                                     "deepseek2.attention.key_length_mla", "tokenizer.ggml.eot_token_id",
                                     "tokenizer.ggml.eom_token_id")} == {
        "deepseek2.attention.key_length": 576, "deepseek2.attention.value_length": 512,
        "deepseek2.attention.key_length_mla": 256, "tokenizer.ggml.eot_token_id": 8, "tokenizer.ggml.eom_token_id": 9}
    g, path = header(tmp_path, "nemotron_h_moe", tensors=[("blk.1.ffn_latent_in.weight", [8, 4]),
                                                          ("mtp.layers.0.x.weight", [4])])
    e, _ = ollama.ollama_layout(g, path)
    assert e.set == {"nemotron_h_moe.moe_latent_size": (4, 4)} and e.hide == ["mtp.layers.0.x.weight"]
    assert e.rename == [("blk.1.ffn_latent_in.weight", "blk.1.ffn_latent_down.weight")]


def test_monolithic_nemotron_omni_sees_images_through_its_own_file(server, engine, tmp_path):
    """Nemotron 3 Nano Omni as Ollama's converter writes it: the RADIO tower inside (Q, K, V split, the
    patch embedding linear, registers F16, the whole position table of the checkpoint) and an audio
    encoder. Its projector view (the kernel a byte range of the file, the registers as F32 and the
    table resampled for the fixed image size in the data file) gives llama.cpp's pair's image answers,
    which follow the pixels."""
    text = fixtures.write_tiny_nemotron_h_moe(tmp_path / "nemotron.gguf", seed=35)
    mmproj = fixtures.write_tiny_nemotron_v2_vl_mmproj(tmp_path / "mmproj.gguf", seed=36)
    mono = fixtures.write_ollama_nemotron_omni(text, tmp_path / "nemotron-omni-ollama.gguf", mmproj, seed=36)
    import_model(server.store, "pair", text, mmproj)
    import_model(server.store, "ollama", mono)
    red, blue = tops(server, "pair", (200, 30, 30)), tops(server, "pair", (30, 30, 200))
    assert red != blue
    assert tops(server, "ollama", (200, 30, 30)) == red and tops(server, "ollama", (30, 30, 200)) == blue
    assert (server.store.view_dir(ollama.file_digest(mono)) / "mmproj.gguf.data").exists()


def test_nemotron_omni_without_experts_runs_as_nemotron_h(tmp_path):
    g, path = header(tmp_path, "nemotron_h_omni", [("nemotron_h_omni.block_count", 4, 2)],
                     [("blk.0.ssm_in.weight", [8, 4]), ("v.blk.0.x.weight", [4]), ("a.blk.0.x.weight", [4])])
    e, clip = ollama.ollama_layout(g, path)
    assert e.set == {"general.architecture": (8, "nemotron_h")} and clip is None
    assert e.rename_keys == [("nemotron_h_omni.", "nemotron_h.")]
    assert e.hide == ["v.blk.0.x.weight", "a.blk.0.x.weight"]


def test_gemma3n_reads_its_vocabulary_as_the_per_layer_embeddings_have_it(tmp_path):
    tokens = ["<pad>", "<eos>", "<0x0A>", "<unused1>", "a", "b", "<image>", "<audio>"]
    g, path = header(tmp_path, "gemma3n", [
        ("tokenizer.ggml.tokens", 9, (8, tokens)), ("tokenizer.ggml.scores", 9, (6, [0.0] * 8)),
        ("tokenizer.ggml.token_type", 9, (5, [3, 3, 3, 3, 1, 1, 3, 3])),
        ("tokenizer.ggml.eos_token_ids", 9, (5, [1]))],
        [("token_embd.weight", [4, 8]), ("per_layer_token_embd.weight", [6, 6])])
    e, _ = ollama.ollama_layout(g, path)
    assert e.shape == [("token_embd.weight", [4, 6])]
    assert e.truncate == {"tokenizer.ggml.tokens": 6, "tokenizer.ggml.scores": 6}
    assert e.set["tokenizer.ggml.token_type"] == (9, (5, [3, 3, 6, 1, 1, 1]))
    assert e.set["tokenizer.ggml.eos_token_ids"] == (9, (5, [1, 106]))
    assert e.override_args() is None


def test_gemma4_and_deepseek_ocr_keep_their_text_side(tmp_path):
    g, path = header(tmp_path, "gemma4", [("tokenizer.ggml.model", 8, "llama")], [
        ("blk.0.ffn_gate_inp.per_expert_scale", [4]), ("a.blk.0.w", [4]), ("v.blk.0.w", [4]),
        ("token_embd.weight", [4])])
    e, _ = ollama.ollama_layout(g, path)
    assert e.set == {"tokenizer.ggml.model": (8, "gemma4")} and e.hide == ["a.blk.0.w", "v.blk.0.w"]
    assert e.rename == [("blk.0.ffn_gate_inp.per_expert_scale", "blk.0.ffn_down_exps.scale")]
    g, path = header(tmp_path, "deepseekocr", tensors=[("blk.1.ffn_down_exps.weight", [896, 4]),
                                                       ("blk.1.ffn_down_shexp.weight", [1792, 4]), ("s.x", [4])])
    e, _ = ollama.ollama_layout(g, path)
    assert e.set["deepseek2-ocr.expert_feed_forward_length"] == (4, 896)
    assert e.set["deepseek2-ocr.expert_shared_count"] == (4, 2) and e.hide == ["s.x"]


@pytest.mark.parametrize("arch", ["qwen35", "qwen35moe"])
def test_qwen35_runs_its_text_side_without_the_mtp_layers(tmp_path, arch):
    g, path = header(tmp_path, arch, [("%s.attention.head_count_kv" % arch, 9, (4, [0, 0, 0, 4])),
                                      ("%s.rope.dimension_sections" % arch, 9, (5, [11, 11, 10])),
                                      ("%s.image_token_id" % arch, 4, 9)],
                     [("blk.0.ssm_dt", [4]), ("mtp.layers.0.x.weight", [4]), ("v.x", [4])])
    e, _ = ollama.ollama_layout(g, path)
    assert e.set == {"%s.attention.head_count_kv" % arch: (4, 4),
                     "%s.rope.dimension_sections" % arch: (9, (5, [11, 11, 10, 0]))}
    assert e.rename == [("blk.0.ssm_dt", "blk.0.ssm_dt.bias")] and e.hide == ["mtp.layers.0.x.weight", "v.x"]


def test_llama_cpp_layouts_are_left_as_they_are(tmp_path, gemma_gguf):
    assert ollama.ollama_layout(ollama.read_gguf(gemma_gguf, 0), gemma_gguf) == (None, None)
    g, path = header(tmp_path, "lfm2", tensors=[("token_embd_norm.weight", [4])])
    assert ollama.ollama_layout(g, path) == (None, None)


def test_an_engine_without_the_hook_is_named_with_what_to_do(server, tmp_path, ollama_gemma3):
    """A llama-server built some other way (fault injection: a stand-in without the hook's marker)."""
    fake = tmp_path / "llama-server"
    fake.write_text("#!/bin/sh\nexit 1\n")
    fake.chmod(0o755)
    import_gguf(server.store, "gemma3", ollama_gemma3)
    model = ollama.load_model(server.store, "gemma3")
    with pytest.raises(ollama.OllamaError, match=r"Ollama's gemma3 layout .*lacks the GGUF edits hook that "
                                                 r"\./build_llama\.sh builds in"):
        ollama.engine_files(server.store, model, str(fake))
    assert view_files(server.store) == []


# -- what llama.cpp cannot run is refused before the download --------------------------------------------

def test_a_safetensors_manifest_is_refused_at_pull_before_any_blob(server, registry, tmp_path):  # noqa: F811
    """Ollama's MLX models (application/vnd.ollama.image.tensor layers): a 400 in words, 0 bytes
    fetched; one already in the store still lists, shows and is removed."""
    from test_registry import put_model
    name = "%s/library/mlxmodel:latest" % registry
    put_model(server.store, name, [(os.urandom(300_000), ollama.MEDIA_TENSOR)])
    assert ollama.main(["push", "--insecure", name]) == 0
    other = ollama.make_server(ollama.Config({"HOME": str(tmp_path), "OLLAMA_MODELS": str(tmp_path / "m2")}),
                               "127.0.0.1", 0)
    with fixtures.serving(other):
        status, lines = post(other, "/api/pull", {"model": name, "insecure": True, "stream": False})
        assert status == 400 and "llama.cpp cannot run it" in lines[-1]["error"]
        assert "MLX" in lines[-1]["error"]
        blobs = other.store.blobs
        assert not blobs.exists() or [p for p in blobs.iterdir()] == []
    assert name in [n.display() for n, *_ in server.store.list()]
    status, lines = post(server, "/api/show", {"model": name})
    assert status == 200
    assert delete(server, name) == 200


# -- DRAFT: speculative decoding with a draft model -----------------------------------------------------------

def test_a_draft_layer_speculates_and_the_greedy_text_is_unchanged(server, engine, tmp_path):
    """A DRAFT model (Modelfile DRAFT, a draft layer) starts llama-server with it as the draft; the
    greedy text equals the target's alone, and `show --modelfile` names it."""
    target = fixtures.write_tiny_gguf(tmp_path / "target.gguf", n_embd=128, n_layer=4, seed=3)
    draft = fixtures.write_tiny_gguf(tmp_path / "draft.gguf", seed=4)
    modelfile = tmp_path / "Modelfile"
    modelfile.write_text("FROM %s\nDRAFT %s\n" % (target, draft))
    assert ollama.main(["create", "fast", "-f", str(modelfile)]) == 0
    modelfile.write_text("FROM %s\n" % target)
    assert ollama.main(["create", "plain", "-f", str(modelfile)]) == 0
    model = ollama.load_model(server.store, "fast")
    assert model.draft_path and "DRAFT " + model.draft_path in model.modelfile()
    prompt = "once upon a time"
    plain = answer(server, "plain", prompt, options=dict(GREEDY, num_predict=48))
    assert answer(server, "fast", prompt, options=dict(GREEDY, num_predict=48))[0] == plain[0]
    args = server.scheduler.runners_for(ollama.Name.parse("fast"))[0].runner.args
    assert args[args.index("--spec-draft-model") + 1] == model.draft_path
    assert args[args.index("--spec-type") + 1] == "draft-simple"
    log = (server.config.home / "logs" / "runner-fast_latest.log").read_text(errors="replace")
    assert "draft" in log.lower()


# -- the hybrid and MoE families: tiny random-weight pairs, llama.cpp's file against Ollama's --------------

def renamed(pairs, drop=(), extra=()):
    """An edit_tensors for fixtures.rewrite_gguf: names changed by the first matching (old, new)
    substring pair, tensors whose names start with one of `drop` left out, `extra` [(name, tensor)]
    added (what Ollama's file holds beside the text model)."""
    def edit(tensors):
        out = []
        for name, t in tensors:
            if name.startswith(tuple(drop)) and drop:
                continue
            for old, new in pairs:
                if old in name:
                    name = name.replace(old, new, 1)
                    break
            out.append((name, t))
        return out + list(extra)
    return edit


def same_answers(server, cpp, theirs, prompt="once upon a time"):
    """Both files imported; Ollama's, through its edits (a sidecar in its view), answers as llama.cpp's
    does, and its blob is as it came."""
    import_gguf(server.store, "cpp", cpp)
    import_gguf(server.store, "ollama", theirs)
    want = answer(server, "cpp", prompt)
    assert want[0] and answer(server, "ollama", prompt) == want
    blob = ollama.file_digest(theirs)
    assert blob[7:] + "/model.gguf.edits" in view_files(server.store)
    assert ollama.file_digest(server.store.blob_path(blob)) == blob


def test_qwen3next_runs_as_llama_cpps_qwen3next(server, engine, tmp_path):
    """Qwen3-Next as Ollama's first converter wrote it: one KV head count per layer (0 on the delta-net
    layers) and the delta-net dt bias named ssm_dt."""
    import gguf
    cpp = fixtures.write_tiny_qwen3next(tmp_path / "qwen3next.gguf", seed=21)

    def kv(kv):
        n_layer, n_kv = kv["qwen3next.block_count"][0], kv["qwen3next.attention.head_count_kv"][0]
        return dict(kv, **{"qwen3next.attention.head_count_kv": (
            [n_kv if (i + 1) % 4 == 0 else 0 for i in range(n_layer)], gguf.GGUFValueType.ARRAY,
            gguf.GGUFValueType.UINT32)})
    theirs = fixtures.rewrite_gguf(cpp, tmp_path / "qwen3next-ollama.gguf", kv, renamed([(".ssm_dt.bias", ".ssm_dt")]))
    g = ollama.read_gguf(theirs, 0)
    assert ollama._tensor(g, "blk.0.ssm_dt") is not None and "qwen3next.attention.head_count_kv" in g.array_lengths
    same_answers(server, cpp, theirs)


class Tower:
    """A stand-in for the tensors Ollama's file holds beside the text model (a vision tower, MTP layers)."""
    def __init__(self, *shape):
        import gguf
        import numpy as np
        self.data, self.tensor_type = np.ones(shape or (4, 8), dtype=np.float32), gguf.GGMLQuantizationType.F32


@pytest.mark.parametrize("arch", ["qwen35", "qwen35moe"])
def test_qwen35_runs_its_text_side_as_llama_cpps(server, engine, tmp_path, arch):
    """Qwen3.5 as Ollama's library serves it: per-layer KV heads, three M-RoPE sections, ssm_dt, the
    published-model keys (interleaved M-RoPE, reordered V heads, the vision tower's), and the vision
    tower and the multi-token-prediction layer inside under mtp.* (the text model runs without both)."""
    import gguf
    T = gguf.GGUFValueType
    cpp = fixtures.write_tiny_qwen3next(tmp_path / (arch + ".gguf"), arch, seed=23)

    def kv(kv):
        out = dict(kv)
        out[arch + ".attention.head_count_kv"] = ([0, 0, 0, kv[arch + ".attention.head_count_kv"][0]],
                                                  T.ARRAY, T.UINT32)
        for key in ("rope.dimension_sections", "rope.mrope_section", "mrope_sections"):
            out["%s.%s" % (arch, key)] = ([2, 1, 1], T.ARRAY, T.INT32)
        for key, value in (("rope.mrope_interleaved", True), ("ssm.v_head_reordered", True)):
            out["%s.%s" % (arch, key)] = (value, T.BOOL, None)
        for key, value in (("vision.block_count", 1), ("image_token_id", 31999)):
            out["%s.%s" % (arch, key)] = (value, T.UINT32, None)
        return out
    extra = [("mtp.fc.weight", Tower(64, 128)), ("mtp.layers.0.input_layernorm.weight", Tower(64)),
             ("v.blk.0.attn_qkv.weight", Tower()), ("v.merger.linear_fc1.weight", Tower())]
    theirs = fixtures.rewrite_gguf(cpp, tmp_path / (arch + "-ollama.gguf"), kv,
                                   renamed([(".ssm_dt.bias", ".ssm_dt")], extra=extra))
    same_answers(server, cpp, theirs)


def test_glm_flash_runs_as_llama_cpps_deepseek2_with_mla(server, engine, tmp_path):
    """GLM-4.7-Flash as Ollama's library serves it: architecture glm4moelite, the per-head key and value
    sizes where llama.cpp's deepseek2 has MLA's absorbed ones (and the other way round in the *_mla
    keys), every KV head counted, no expert groups. The V head is smaller than the K head here, so the
    value size must come from value_length."""
    import gguf
    U32 = gguf.GGUFValueType.UINT32
    cpp = fixtures.write_tiny_deepseek2(tmp_path / "deepseek2.gguf", seed=25)

    def kv(kv):
        out = {k.replace("deepseek2.", "glm4moelite.", 1): v for k, v in kv.items()
               if k not in ("deepseek2.expert_group_count", "deepseek2.expert_group_used_count")}
        out["general.architecture"] = ("glm4moelite",) + kv["general.architecture"][1:]
        for ours, theirs in (("key_length", "key_length_mla"), ("value_length", "value_length_mla")):
            out["glm4moelite.attention." + ours] = kv["deepseek2.attention." + theirs]
            out["glm4moelite.attention." + theirs] = kv["deepseek2.attention." + ours]
        out["glm4moelite.attention.head_count_kv"] = (kv["deepseek2.attention.head_count"][0], U32, None)
        return out
    theirs = fixtures.rewrite_gguf(cpp, tmp_path / "glm4moelite-ollama.gguf", kv)
    same_answers(server, cpp, theirs)


def test_deepseek_ocr_runs_its_text_side_as_llama_cpps_deepseek2_ocr(server, engine, tmp_path):
    """DeepSeek-OCR as Ollama's converter writes it: architecture deepseekocr without the RMS epsilon, the
    RoPE base and the expert sizes (read back from the tensors), and the SAM, vision and projector
    towers inside."""
    cpp = fixtures.write_tiny_deepseek2(tmp_path / "deepseek2-ocr.gguf", "deepseek2-ocr", seed=27)

    def kv(kv):
        dropped = ("attention.layer_norm_rms_epsilon", "expert_feed_forward_length", "expert_shared_count",
                   "rope.freq_base")                      # llama.cpp's default, 10000, is the model's
        out = {k.replace("deepseek2-ocr.", "deepseekocr.", 1): v for k, v in kv.items()
               if k[len("deepseek2-ocr."):] not in dropped}
        out["general.architecture"] = ("deepseekocr",) + kv["general.architecture"][1:]
        return out
    extra = [("s.blk.0.attn.qkv.weight", Tower()), ("v.blk.0.self_attn.qkv_proj.weight", Tower()),
             ("mm.layers.weight", Tower())]
    theirs = fixtures.rewrite_gguf(cpp, tmp_path / "deepseekocr-ollama.gguf", kv, renamed([], extra=extra))
    same_answers(server, cpp, theirs)


def test_nemotron_latent_moe_runs_as_llama_cpps_nemotron_h_moe(server, engine, tmp_path):
    """Nemotron 3 Super's shape as Ollama's library serves it: the latent MoE projections named
    ffn_latent_in/ffn_latent_out and moe_latent_size missing (read from the tensor), and the
    multi-token-prediction layers inside under mtp.* (the text model runs without its draft)."""
    cpp = fixtures.write_tiny_nemotron_h_moe(tmp_path / "nemotron.gguf", seed=29)
    extra = [("mtp.layers.0.mixer.experts.0.up_proj.weight", Tower()), ("mtp.layers.0.norm.weight", Tower(64))]
    theirs = fixtures.rewrite_gguf(
        cpp, tmp_path / "nemotron-ollama.gguf",
        lambda kv: {k: v for k, v in kv.items() if k != "nemotron_h_moe.moe_latent_size"},
        renamed([(".ffn_latent_down", ".ffn_latent_in"), (".ffn_latent_up", ".ffn_latent_out")], extra=extra))
    same_answers(server, cpp, theirs)


def test_nemotron_omni_runs_its_text_side_as_llama_cpps_nemotron_h_moe(server, engine, tmp_path):
    """Nemotron 3 Nano Omni as Ollama's converter writes it: architecture nemotron_h_omni (its text keys
    under that name, vision.* and audio.* beside them), the RADIO vision tower, its projector and the
    Parakeet audio encoder inside (v.*, mm.*, a.*), and the latent MoE under Ollama's names. The text
    side answers as llama.cpp's nemotron_h_moe does."""
    import gguf
    T = gguf.GGUFValueType
    cpp = fixtures.write_tiny_nemotron_h_moe(tmp_path / "nemotron.gguf", seed=33)

    def kv(kv):
        out = {k.replace("nemotron_h_moe.", "nemotron_h_omni.", 1): v for k, v in kv.items()
               if k != "nemotron_h_moe.moe_latent_size"}
        out["general.architecture"] = ("nemotron_h_omni",) + kv["general.architecture"][1:]
        for key in ("vision.block_count", "vision.embedding_length", "audio.block_count", "audio.num_mel_bins"):
            out["nemotron_h_omni." + key] = (2, T.UINT32, None)
        return out
    extra = [("v.patch_embd.weight", Tower()), ("v.blk.0.attn_q.weight", Tower()), ("mm.1.weight", Tower()),
             ("a.blk.0.ffn1_up.weight", Tower()), ("a.subsampling.conv0.weight", Tower())]
    theirs = fixtures.rewrite_gguf(cpp, tmp_path / "nemotron-omni-ollama.gguf", kv, renamed(
        [(".ffn_latent_down", ".ffn_latent_in"), (".ffn_latent_up", ".ffn_latent_out")], extra=extra))
    same_answers(server, cpp, theirs)


def test_gemma3n_reads_the_text_vocabulary_as_llama_cpps_gemma3n(server, engine, tmp_path):
    """Gemma 3n as Ollama's library serves it: token_embd and the tokenizer with the multimodal
    vocabulary (16 tokens more here, 256 in the real files), per_layer_token_embd with the text one.
    Read as the first rows (edits.shape), the same file answers as llama.cpp's."""
    import gguf
    import numpy as np
    cpp = fixtures.write_tiny_gemma3n(tmp_path / "gemma3n.gguf", seed=31)
    extra = ["<multimodal_%d>" % i for i in range(16)]

    def kv(kv):
        out = dict(kv)
        for key, more in (("tokenizer.ggml.tokens", extra), ("tokenizer.ggml.scores", [0.0] * 16),
                          ("tokenizer.ggml.token_type", [int(gguf.TokenType.CONTROL)] * 16)):
            value, vtype, sub = kv[key]
            out[key] = (list(value) + more, vtype, sub)
        return out

    class MoreRows:                                       # token_embd with the multimodal tokens' rows
        def __init__(self, t):
            rows = np.random.default_rng(1).standard_normal((16, t.data.shape[1])).astype(np.float32) * 0.05
            self.data, self.tensor_type = np.concatenate([t.data, rows]), t.tensor_type

    theirs = fixtures.rewrite_gguf(cpp, tmp_path / "gemma3n-ollama.gguf", kv, lambda tensors: [
        (n, MoreRows(t) if n == "token_embd.weight" else t) for n, t in tensors])
    same_answers(server, cpp, theirs)


# -- glm-ocr: the FFN fused, in a second split written beside the view --------------------------------------

def test_glm_ocr_runs_as_llama_cpps_glm4_with_its_ffn_fused_in_a_second_split(server, engine, tmp_path):
    """GLM-OCR as Ollama's converter writes it: architecture glmocr, three M-RoPE sections, no RoPE
    width, other names for three norms and projections, the vision tower inside, and each block's FFN
    as ffn_gate and ffn_up with ffn_norm between them in the file, where llama.cpp's glm4 reads one
    ffn_up of gate rows then up rows. The fused tensors are the view's second split, written once and
    reused; the blob keeps its digest and `rm` removes the view."""
    cpp = fixtures.write_tiny_glm4(tmp_path / "glm4.gguf", seed=29)
    theirs = fixtures.write_ollama_glmocr(cpp, tmp_path / "glmocr-ollama.gguf",
                                          [(name, Tower()) for name in ("v.patch_embd.weight", "mm.model.fc.weight")])
    names = [t.name for t in ollama.read_gguf(theirs, 0).tensors]
    assert names.index("blk.0.ffn_gate.weight") < names.index("blk.0.ffn_norm.weight") < \
        names.index("blk.0.ffn_up.weight")
    edits = answers_alike(server, cpp, theirs)
    assert [(name, shape) for name, _t, shape, _r, _b in edits.split] == \
        [("blk.0.ffn_up.weight", [64, 192]), ("blk.1.ffn_up.weight", [64, 192])]
    assert edits.set["glm4.rope.dimension_sections"] == (9, (5, [2, 3, 3, 0]))
    assert edits.set["glm4.rope.dimension_count"] == (4, 16) and edits.set["tokenizer.ggml.pre"] == (8, "chatglm-bpe")
    blob = ollama.file_digest(theirs)
    assert ollama.file_digest(server.store.blob_path(blob)) == blob
    view = server.store.view_dir(blob)
    assert sorted(p.name for p in view.iterdir()) == [
        "model-00001-of-00002.gguf", "model-00001-of-00002.gguf.edits", "model-00002-of-00002.gguf"]
    second = ollama.read_gguf(view / "model-00002-of-00002.gguf", 0)
    assert [(t.name, t.shape) for t in second.tensors] == [("blk.0.ffn_up.weight", [64, 192]),
                                                           ("blk.1.ffn_up.weight", [64, 192])]
    inode = (view / "model-00002-of-00002.gguf").stat().st_ino
    edits.write(str(view / "model-00001-of-00002.gguf.edits"), theirs, ollama.read_gguf(theirs, 0))
    assert (view / "model-00002-of-00002.gguf").stat().st_ino == inode        # reused, not rewritten
    assert delete(server, "ollama") == 200
    assert not view.exists()


def test_glm_ocr_in_q8_0_fuses_its_ffn_halves_byte_for_byte(server, engine, tmp_path):
    """The fused ffn_up is the two halves' bytes one after the other, whole rows being whole blocks: a
    Q8_0 GLM-OCR (llama-quantize's file, relabelled as Ollama writes it) answers as llama.cpp's."""
    f32 = fixtures.write_tiny_glm4(tmp_path / "glm4-f32.gguf", seed=31)
    cpp = tmp_path / "glm4-q8_0.gguf"
    subprocess.run([os.path.join(os.path.dirname(str(engine)), "llama-quantize"), str(f32), str(cpp), "Q8_0"],
                   check=True, capture_output=True)
    theirs = fixtures.write_ollama_glmocr(cpp, tmp_path / "glmocr-q8_0-ollama.gguf")
    edits = answers_alike(server, cpp, theirs)
    assert [vtype for _n, vtype, _s, _r, _b in edits.split] == [8, 8]          # Q8_0, as stored


def test_glm_ocr_ffn_halves_of_two_types_are_fused_as_f32(tmp_path):
    """An FFN whose gate and up halves differ in type has no one type to copy bytes in: the fused
    tensor is both widened to F32, gate rows first."""
    import struct
    gate, up = [0.5 * i for i in range(8)], [-1.0 - i for i in range(8)]
    path = tmp_path / "glmocr.gguf"
    ollama.write_gguf(path, [("general.architecture", 8, "glmocr"), ("glmocr.block_count", 4, 1)], [
        ("blk.0.ffn_gate.weight", 1, [4, 2], struct.pack("<8e", *gate)),
        ("blk.0.ffn_norm.weight", 0, [4], struct.pack("<4f", 1, 1, 1, 1)),
        ("blk.0.ffn_up.weight", 0, [4, 2], struct.pack("<8f", *up))])
    g = ollama.read_gguf(path, 0)
    e, _ = ollama.ollama_layout(g, path)
    assert [(n, vtype, shape) for n, vtype, shape, _r, _b in e.split] == [("blk.0.ffn_up.weight", 0, [4, 4])]
    assert e.hide == ["blk.0.ffn_gate.weight", "blk.0.ffn_up.weight"]
    e.write(str(tmp_path / "model-00001-of-00002.gguf.edits"), path, g)
    second = ollama.read_gguf(tmp_path / "model-00002-of-00002.gguf", 0)
    assert second.kv["split.no"] == 1 and second.kv["split.tensors.count"] == 2       # ffn_norm and the fused
    with open(str(tmp_path / "model-00002-of-00002.gguf"), "rb") as f:
        assert struct.unpack("<16f", ollama._tensor_data(f, second, second.tensors[0])) == tuple(gate + up)
    edits = ollama.read_gguf(tmp_path / "model-00001-of-00002.gguf.edits", 0)
    assert (edits.kv["split.no"], edits.kv["split.count"], edits.kv["split.tensors.count"]) == (0, 2, 2)


def test_monolithic_glm_ocr_sees_images_through_its_own_file(server, engine, tmp_path):
    """GLM-OCR as Ollama's converter writes it, its vision tower inside (the temporal patch embeddings
    as patch_embd_0/_1, the keys under glmocr.vision.*): read as a glm4v projector through its own
    edits beside the split text view, image answers match llama.cpp's model + mmproj pair and follow
    the pixels."""
    text = fixtures.write_tiny_glm4(tmp_path / "glm4.gguf", seed=35)
    mmproj = fixtures.write_tiny_glm4v_mmproj(tmp_path / "mmproj.gguf", seed=36)
    mono = fixtures.write_ollama_glmocr(text, tmp_path / "glmocr-ollama.gguf", mmproj=mmproj)
    import_model(server.store, "pair", text, mmproj)
    import_model(server.store, "ollama", mono)
    red, blue = tops(server, "pair", (200, 30, 30)), tops(server, "pair", (30, 30, 200))
    assert red != blue
    assert tops(server, "ollama", (200, 30, 30)) == red and tops(server, "ollama", (30, 30, 200)) == blue
    assert {"mmproj.gguf.edits", "mmproj.gguf.data", "model-00002-of-00002.gguf"} <= {
        p.name for p in server.store.view_dir(ollama.file_digest(mono)).iterdir()}


def test_glm_ocr_ffn_halves_that_cannot_be_widened_are_refused_in_words(tmp_path):
    path = tmp_path / "glmocr.gguf"
    ollama.write_gguf(path, [("general.architecture", 8, "glmocr"), ("glmocr.block_count", 4, 1)], [
        ("blk.0.ffn_gate.weight", 12, [256, 2], bytes(2 * 144)),                 # Q4_K
        ("blk.0.ffn_up.weight", 0, [256, 2], bytes(2 * 256 * 4))])
    g = ollama.read_gguf(path, 0)
    e, _ = ollama.ollama_layout(g, path)
    with pytest.raises(ollama.OllamaError, match="cannot widen ggml type Q4_K to F32"):
        e.write(str(tmp_path / "model-00001-of-00002.gguf.edits"), path, g)
    assert not (tmp_path / "model-00002-of-00002.gguf").exists()
