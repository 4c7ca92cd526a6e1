"""Embeddings and the tokenizer through the real engine: /api/embed, /api/embeddings,
/api/tokenize, /api/detokenize, and the official `ollama` client's embed()."""
import contextlib
import http.client
import json
import math
import subprocess
import sys
import tempfile
import textwrap

import pytest

from pathlib import Path

import ollama
from fixtures import serving
from test_inference import import_gguf

NUM_CTX = 256          # tokens; OLLAMA_CONTEXT_LENGTH of the shared server, small so loads are quick
CHAT, EMBED, TOOLS = "gemma3:270m", "gemma-embed", "gemma-tools"
#: Ollama's llama3.2 tool template (server/testdata/tools), so TOOLS has the "tools" capability.
TOOLS_TEMPLATE = (Path(__file__).parent / "data" / "templates" / "llama3.2-tools.gotmpl").read_text()


@contextlib.contextmanager
def gemma_server(home, llama_server_bin, gemma_gguf):
    """A real server with Gemma 3 270M stored twice (CHAT and EMBED, one blob), so completion and
    embedding runners stay loaded side by side instead of reloading each other between tests."""
    env = {"HOME": str(home), "OLLAMA_MODELS": str(home / ".ollama" / "models"),
           "OLLAMA_CONTEXT_LENGTH": str(NUM_CTX)}
    srv = ollama.make_server(ollama.Config(env), "127.0.0.1", 0)
    srv.scheduler.exe = str(llama_server_bin)
    import_gguf(srv.store, CHAT, gemma_gguf, params={"stop": ["<end_of_turn>"]})
    srv.store.write_manifest(ollama.Name.parse(EMBED), srv.store.get(CHAT)[1])
    import_gguf(srv.store, TOOLS, gemma_gguf, template=TOOLS_TEMPLATE)
    with serving(srv):
        yield srv


@pytest.fixture(scope="module")
def api(tmp_path_factory, llama_server_bin, gemma_gguf):
    with gemma_server(tmp_path_factory.mktemp("embed"), llama_server_bin, gemma_gguf) as srv:
        yield srv


def call(server, method, path, body=None, headers=None):
    """(status, headers, raw body) of one request."""
    conn = http.client.HTTPConnection("127.0.0.1", server.server_port, timeout=120)
    conn.request(method, path, body=None if body is None else json.dumps(body),
                 headers=dict({"Content-Type": "application/json"}, **(headers or {})))
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, resp, data


def post(server, path, body):
    status, _, data = call(server, "POST", path, body)
    return status, json.loads(data) if data else None


def official_ollama(server, code):
    """Run `code` with the pip-installed `ollama` client bound to `client`, and return what it prints
    as JSON. `-I` keeps the repository (whose ollama.py shadows the package) off sys.path."""
    script = "import json, ollama\nclient = ollama.Client(host=%r)\n%s" % (server.url, textwrap.dedent(code))
    out = subprocess.run([sys.executable, "-I", "-c", script], capture_output=True, text=True, timeout=120,
                         cwd=tempfile.gettempdir())
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)


def norm(v):
    return math.sqrt(sum(x * x for x in v))


def cosine(a, b):
    return sum(x * y for x, y in zip(a, b)) / (norm(a) * norm(b))


def test_embed_returns_one_unit_vector_per_input(api):
    status, out = post(api, "/api/embed", {"model": EMBED, "input": ["The sky is blue", "Cats purr"]})
    assert status == 200
    assert set(out) == {"model", "embeddings", "total_duration", "load_duration", "prompt_eval_count"}
    assert out["model"] == EMBED and len(out["embeddings"]) == 2
    assert all(len(v) == 640 for v in out["embeddings"])           # gemma3.embedding_length
    assert all(abs(norm(v) - 1) < 1e-6 for v in out["embeddings"])
    tokens = sum(len(post(api, "/api/tokenize", {"model": EMBED, "text": t})[1]["tokens"]) + 1    # + BOS
                 for t in ("The sky is blue", "Cats purr"))
    assert out["prompt_eval_count"] == tokens
    assert out["total_duration"] >= out["load_duration"] > 0


def test_embed_distinguishes_inputs_and_is_deterministic(api):
    a = post(api, "/api/embed", {"model": EMBED, "input": "The sky is blue"})[1]["embeddings"][0]
    b = post(api, "/api/embed", {"model": EMBED, "input": "Cats purr"})[1]["embeddings"][0]
    again = post(api, "/api/embed", {"model": EMBED, "input": ["x", "The sky is blue"]})[1]["embeddings"][1]
    assert cosine(a, again) > 0.9999
    assert cosine(a, b) < 0.999          # pooled on the last token, not the shared BOS


def test_embed_dimensions_cut_and_renormalise(api):
    full = post(api, "/api/embed", {"model": EMBED, "input": "hello"})[1]["embeddings"][0]
    cut = post(api, "/api/embed", {"model": EMBED, "input": "hello", "dimensions": 8})[1]["embeddings"][0]
    assert len(cut) == 8 and abs(norm(cut) - 1) < 1e-9
    expected = [x / norm(full[:8]) for x in full[:8]]
    assert all(abs(x - y) < 1e-6 for x, y in zip(cut, expected))


def test_embed_empty_input_only_loads_the_model(api):
    api.scheduler.expire(EMBED)
    status, out = post(api, "/api/embed", {"model": EMBED, "input": []})
    assert status == 200 and out == {"model": EMBED, "embeddings": []}
    assert ollama.Name.parse(EMBED).display() in [e.model.short_name for e in api.scheduler.running()]
    assert post(api, "/api/embed", {"model": EMBED, "input": ""})[1] == {"model": EMBED, "embeddings": []}


@pytest.mark.parametrize("value", [5, {"text": "x"}, ["ok", 3], True])
def test_embed_input_of_another_type_is_400(api, value):
    assert post(api, "/api/embed", {"model": EMBED, "input": value}) == (400, {"error": "invalid input type"})


def test_embed_too_long_input_is_400_without_truncate(api):
    status, out = post(api, "/api/embed", {"model": EMBED, "input": "word " * (NUM_CTX + 50), "truncate": False})
    assert (status, out) == (400, {"error": "the input length exceeds the context length"})


def test_embed_truncates_a_long_input_to_the_context(api):
    status, out = post(api, "/api/embed", {"model": EMBED, "input": ["word " * (NUM_CTX + 50), "short"]})
    assert status == 200 and len(out["embeddings"]) == 2
    short = len(post(api, "/api/tokenize", {"model": EMBED, "text": "short"})[1]["tokens"]) + 1
    assert out["prompt_eval_count"] == NUM_CTX + short


def test_legacy_embeddings_are_raw_and_point_the_same_way(api):
    status, out = post(api, "/api/embeddings", {"model": EMBED, "prompt": "The sky is blue"})
    assert status == 200 and list(out) == ["embedding"]
    raw = out["embedding"]
    assert abs(norm(raw) - 1) > 0.01                     # not normalised
    unit = post(api, "/api/embed", {"model": EMBED, "input": "The sky is blue"})[1]["embeddings"][0]
    assert cosine(raw, unit) > 0.9999


def test_legacy_embeddings_empty_prompt_is_an_empty_vector(api):
    assert post(api, "/api/embeddings", {"model": EMBED}) == (200, {"embedding": []})


def test_embed_unknown_model_is_404(api):
    assert post(api, "/api/embed", {"model": "nope", "input": "x"}) == (404, {"error": "model 'nope' not found"})


def test_embedding_runner_pools_on_the_last_token(api):
    post(api, "/api/embed", {"model": EMBED, "input": "x"})
    (entry,) = [e for e in api.scheduler.runners_for(ollama.Name.parse(EMBED)) if e.embedding]
    args = entry.runner.args
    assert "--embedding" in args and args[args.index("--pooling") + 1] == "last"
    assert ollama.embedding_pooling(entry.model) is None and not ollama.is_embedding_model(entry.model)


def test_pooling_type_in_the_gguf_marks_an_embedding_model(tmp_path):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "bert.gguf"
    w = gguf.GGUFWriter(str(path), "bert")
    w.add_uint32("bert.pooling_type", 1)
    w.add_array("tokenizer.ggml.tokens", ["a", "b", "c"])
    w.add_uint32("bert.context_length", 512)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    store = ollama.Store(tmp_path / "models")
    import_gguf(store, "bert-embed", path)
    model = ollama.load_model(store, "bert-embed")
    assert ollama.embedding_pooling(model) == 1 and ollama.is_embedding_model(model)
    assert "--pooling" not in ollama._embedding_args(model)


def test_an_embedding_runner_names_each_flag_once():
    """One source for each flag: the context and batch sizes were given twice before (512, then 513)."""
    runner = ollama.Runner("llama-server", "m.gguf", num_ctx=512, num_batch=64, embedding=True,
                           extra_args=["--pooling", "last"])
    flags = [a for a in runner.args if a.startswith("--")]
    assert len(flags) == len(set(flags)), flags
    for flag in ("--ctx-size", "--batch-size", "--ubatch-size"):
        assert runner.args[runner.args.index(flag) + 1] == "513"


def test_an_embedding_only_model_refuses_generate_and_chat(server, tmp_path):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "bert.gguf"
    w = gguf.GGUFWriter(str(path), "bert")
    w.add_uint32("bert.pooling_type", 1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    import_gguf(server.store, "bert-embed", path)
    status, out = post(server, "/api/generate", {"model": "bert-embed", "prompt": "hi"})
    assert status == 400 and out == {"error": '"bert-embed" does not support generate'}
    status, out = post(server, "/api/chat", {"model": "bert-embed", "messages": [{"role": "user", "content": "hi"}]})
    assert status == 400 and out == {"error": '"bert-embed" does not support chat'}


def test_tokenize_and_detokenize_round_trip(api):
    status, out = post(api, "/api/tokenize", {"model": CHAT, "text": "Hello, world!"})
    assert status == 200 and out["model"] == CHAT
    tokens = out["tokens"]
    assert tokens and all(isinstance(t, int) for t in tokens) and tokens[0] != 2     # no BOS added
    assert post(api, "/api/tokenize", {"model": CHAT, "content": "Hello, world!"})[1]["tokens"] == tokens
    assert post(api, "/api/detokenize", {"model": CHAT, "tokens": tokens}) == \
        (200, {"model": CHAT, "text": "Hello, world!"})


def test_tokenize_bad_requests(api):
    assert post(api, "/api/tokenize", {"model": "nope", "text": "x"}) == (404, {"error": "model 'nope' not found"})
    assert post(api, "/api/tokenize", {"model": CHAT, "text": 5})[0] == 400
    assert post(api, "/api/detokenize", {"model": CHAT, "tokens": ["a"]})[0] == 400


def test_official_ollama_client_embed(api):
    out = official_ollama(api, """
        r = client.embed(model=%r, input=["hello", "world"], dimensions=16)
        print(json.dumps({"n": len(r.embeddings), "dims": [len(e) for e in r.embeddings],
                          "norms": [sum(x * x for x in e) for e in r.embeddings], "count": r.prompt_eval_count}))
    """ % EMBED)
    assert out["n"] == 2 and out["dims"] == [16, 16] and out["count"] > 2
    assert all(abs(n - 1) < 1e-6 for n in out["norms"])
