"""Reranking: a tiny random-weight reranker GGUF (pooling type rank) through the real engine, as
/api/rerank and the Jina/Cohere-shaped /v1/rerank."""
import http.client
import json

import pytest

import fixtures
import ollama
from test_inference import import_gguf

DOCS = ["cats purr when they are happy", "the sky is blue", "rockets fly to orbit", "tea is a drink"]


@pytest.fixture(scope="module")
def reranker_gguf(tmp_path_factory):
    return fixtures.write_tiny_gguf(tmp_path_factory.mktemp("rerank") / "tiny-rerank.gguf", rerank=True,
                                    name="tiny-reranker")


@pytest.fixture
def rerank_server(engine, reranker_gguf, tiny_gguf, server):
    import_gguf(server.store, "rr", reranker_gguf)
    import_gguf(server.store, "tiny", tiny_gguf)
    return server


def post(server, path, body):
    conn = http.client.HTTPConnection("127.0.0.1", server.server_port, timeout=300)
    conn.request("POST", path, body=json.dumps(body))
    resp = conn.getresponse()
    return resp.status, json.loads(resp.read())


def test_a_rank_pooled_gguf_has_the_rerank_capability(reranker_gguf, tiny_gguf, server):
    import_gguf(server.store, "rr", reranker_gguf)
    import_gguf(server.store, "tiny", tiny_gguf)
    assert ollama.load_model(server.store, "rr").capabilities() == ["rerank"]
    assert "rerank" not in ollama.load_model(server.store, "tiny").capabilities()
    assert "--rerank" in ollama._embedding_args(ollama.load_model(server.store, "rr"))


def test_api_rerank_orders_by_score_honours_top_n_and_scores_follow_the_query(rerank_server):
    status, out = post(rerank_server, "/api/rerank", {"model": "rr", "query": "what do cats do", "documents": DOCS})
    assert status == 200, out
    results = out["results"]
    assert sorted(r["index"] for r in results) == [0, 1, 2, 3]
    scores = [r["relevance_score"] for r in results]
    assert scores == sorted(scores, reverse=True) and len(set(scores)) == 4
    assert all(r["document"] == DOCS[r["index"]] for r in results)
    assert out["prompt_eval_count"] > 0 and out["total_duration"] > 0
    status, top = post(rerank_server, "/api/rerank", {"model": "rr", "query": "what do cats do", "documents": DOCS,
                                                      "top_n": 2})
    assert status == 200 and top["results"] == results[:2]
    status, other = post(rerank_server, "/api/rerank", {"model": "rr", "query": "space travel", "documents": DOCS})
    by_index = {r["index"]: r["relevance_score"] for r in results}
    assert any(abs(by_index[r["index"]] - r["relevance_score"]) > 1e-4 for r in other["results"])


def test_v1_rerank_is_the_jina_cohere_shape(rerank_server):
    body = {"model": "rr", "query": "what do cats do", "documents": DOCS, "top_n": 3, "return_documents": True}
    status, out = post(rerank_server, "/v1/rerank", body)
    assert status == 200, out
    assert out["object"] == "list" and out["model"] == "rr" and out["usage"]["total_tokens"] > 0
    assert len(out["results"]) == 3
    assert set(out["results"][0]) == {"index", "relevance_score", "document"}
    assert all(r["document"] == {"text": DOCS[r["index"]]} for r in out["results"])
    api = post(rerank_server, "/api/rerank", {"model": "rr", "query": "what do cats do", "documents": DOCS})[1]
    assert [(r["index"], pytest.approx(r["relevance_score"], abs=1e-5)) for r in api["results"][:3]] == \
        [(r["index"], r["relevance_score"]) for r in out["results"]]
    status, plain = post(rerank_server, "/v1/rerank", {"model": "rr", "query": "q", "documents": [{"text": "a"}, "b"]})
    assert status == 200 and set(plain["results"][0]) == {"index", "relevance_score"}


def test_rerank_of_a_model_that_is_not_a_reranker_is_ollamas_400(rerank_server):
    status, out = post(rerank_server, "/api/rerank", {"model": "tiny", "query": "q", "documents": ["a"]})
    assert status == 400 and out == {"error": '"tiny" does not support rerank'}
    status, out = post(rerank_server, "/v1/rerank", {"model": "tiny", "query": "q", "documents": ["a"]})
    assert status == 400 and out["error"]["message"] == '"tiny" does not support rerank'
    status, out = post(rerank_server, "/api/generate", {"model": "rr", "prompt": "hi"})
    assert status == 400 and out == {"error": '"rr" does not support generate'}
    for path, body in (("/api/embed", {"input": "hi"}), ("/api/embeddings", {"prompt": "hi"})):
        status, out = post(rerank_server, path, dict(body, model="rr"))
        assert status == 400 and out == {"error": '"rr" does not support embeddings'}


def test_cohere_sdk_reranks_against_our_base_url(rerank_server):
    """A client people rerank with: Cohere's SDK, its base_url pointed at ollama.py (POST /v1/rerank)."""
    cohere = pytest.importorskip("cohere")
    client = cohere.Client(base_url="http://127.0.0.1:%d" % rerank_server.server_port, api_key="unused")
    answer = client.rerank(model="rr", query="what do cats do", documents=DOCS, top_n=2)
    api = post(rerank_server, "/api/rerank", {"model": "rr", "query": "what do cats do", "documents": DOCS})[1]
    assert [r.index for r in answer.results] == [r["index"] for r in api["results"][:2]]
    assert [r.relevance_score for r in answer.results] == \
        pytest.approx([r["relevance_score"] for r in api["results"][:2]], abs=1e-5)
