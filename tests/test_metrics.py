"""GET /metrics: Prometheus' text exposition, read with prometheus_client's own parser, and the counters
moving by what a real generate (and a pull) did."""
import http.client
import json

import pytest
from prometheus_client.parser import text_string_to_metric_families

import fixtures
import ollama
from test_inference import import_gguf


def scrape(port, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/metrics", headers=headers or {})
    resp = conn.getresponse()
    body = resp.read().decode()
    return resp.status, resp.getheader("Content-Type"), body


def samples(text):
    """{(sample name, ((label, value), ...)): value} from the exposition, as Prometheus parses it."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def post(port, path, body):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    conn.request("POST", path, body=json.dumps(body))
    resp = conn.getresponse()
    return resp.status, json.loads(resp.read() or b"null")


def test_metrics_parse_and_count_a_real_generate_by_the_right_amounts(engine, tiny_gguf, server):
    import_gguf(server.store, "tiny", tiny_gguf, params={"seed": 1, "temperature": 0})
    port = server.server_port
    status, ctype, text = scrape(port)
    assert status == 200 and ctype.startswith("text/plain; version=0.0.4")
    before = samples(text)
    model = (("model", "tiny:latest"),)
    assert before[("ollama_queue_depth", ())] == 0 and before[("ollama_runners_loaded", ())] == 0
    assert ("ollama_generated_tokens_total", model) not in before

    status, out = post(port, "/api/generate", {"model": "tiny", "prompt": "hello there", "stream": False,
                                                "options": {"num_predict": 5}})
    assert status == 200 and out["eval_count"] == 5
    assert post(port, "/api/show", {"model": "nosuch"})[0] == 404
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("HEAD", "/api/blobs/sha256:" + "0" * 64)
    assert conn.getresponse().status == 404

    after = samples(scrape(port)[2])

    def moved(name, labels=()):
        return after.get((name, tuple(sorted(labels)))) - before.get((name, tuple(sorted(labels))), 0)

    gen = (("endpoint", "/api/generate"), ("method", "POST"), ("status", "200"))
    assert moved("ollama_http_requests_total", gen) == 1
    assert moved("ollama_http_requests_total", (("endpoint", "/api/show"), ("method", "POST"),
                                                ("status", "404"))) == 1
    # a route's pattern, never the raw path: one series however many digests are asked for
    assert moved("ollama_http_requests_total", (("endpoint", "/api/blobs/:digest"), ("method", "HEAD"),
                                                ("status", "404"))) == 1
    assert not [k for k in after if "sha256:" in str(k)]
    assert moved("ollama_http_requests_total", (("endpoint", "/metrics"), ("method", "GET"), ("status", "200"))) == 1
    assert moved("ollama_http_request_duration_seconds_count", (("endpoint", "/api/generate"),)) == 1
    assert moved("ollama_generated_tokens_total", model) == 5 == out["eval_count"]
    assert moved("ollama_prompt_tokens_total", model) == out["prompt_eval_count"] > 0
    assert 0 < moved("ollama_generation_seconds_total", model) <= out["total_duration"] / 1e9
    assert 0 < moved("ollama_prompt_eval_seconds_total", model) <= out["total_duration"] / 1e9
    assert moved("ollama_model_load_seconds_count", model) == 1
    assert 0 < moved("ollama_model_load_seconds_sum", model) <= out["load_duration"] / 1e9
    assert moved("ollama_queue_wait_seconds_count") == 1
    assert moved("ollama_queue_wait_seconds_sum") == pytest.approx(out["load_duration"] / 1e9, abs=0.01)
    assert after[("ollama_runners_loaded", ())] == 1 and after[("ollama_queue_depth", ())] == 0
    assert after[("ollama_runner_memory_bytes", model)] > 1 << 20        # llama-server's resident set

    # a second generate on the loaded runner: tokens move again, loads do not
    post(port, "/api/generate", {"model": "tiny", "prompt": "again", "stream": False, "options": {"num_predict": 3}})
    third = samples(scrape(port)[2])
    assert third[("ollama_generated_tokens_total", model)] - after[("ollama_generated_tokens_total", model)] == 3
    assert third[("ollama_model_load_seconds_count", model)] == after[("ollama_model_load_seconds_count", model)]


def test_metrics_are_guarded_by_api_keys(ollama_home, monkeypatch):
    monkeypatch.setenv("OLLAMA_API_KEYS", "k1")
    with fixtures.serving(ollama.make_server(ollama.Config(), "127.0.0.1", 0)) as srv:
        assert scrape(srv.server_port)[0] == 401
        status, _, text = scrape(srv.server_port, {"Authorization": "Bearer k1"})
        assert status == 200 and "# TYPE ollama_http_requests_total counter" in text


def test_metrics_off_with_ollama_metrics_0(ollama_home, monkeypatch):
    monkeypatch.setenv("OLLAMA_METRICS", "0")
    with fixtures.serving(ollama.make_server(ollama.Config(), "127.0.0.1", 0)) as srv:
        assert scrape(srv.server_port)[0] == 404


def test_metrics_names_follow_prometheus_conventions(server):
    families = {f.name: f for f in text_string_to_metric_families(scrape(server.server_port)[2])}
    for name, (kind, _help) in ollama.METRICS.items():
        assert name.startswith("ollama_")
        if kind == "counter":
            assert name.endswith("_total") and families[name[:-len("_total")]].type == "counter"
        else:
            assert families[name].type == kind
    assert all(n.endswith(("_total", "_seconds", "_bytes", "_depth", "_loaded")) for n in ollama.METRICS)
    assert families["ollama_pull_bytes"].samples[0].value == 0


def test_pull_counts_the_bytes_it_downloads(tiny_gguf, server, ollama_home, tmp_path, monkeypatch):
    """A pull from another serve's /v2 (the LAN registry): pulled bytes move by the blobs' sizes."""
    import_gguf(server.store, "tiny", tiny_gguf)
    manifest = json.loads(server.store.manifest_path(ollama.Name.parse("tiny")).read_bytes())
    size = sum(layer["size"] for layer in manifest["layers"])
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "other"))
    with fixtures.serving(ollama.make_server(ollama.Config(), "127.0.0.1", 0)) as other:
        before = samples(scrape(other.server_port)[2])[("ollama_pull_bytes_total", ())]
        status, _ = post(other.server_port, "/api/pull", {
            "model": "127.0.0.1:%d/library/tiny" % server.server_port, "insecure": True, "stream": False})
        assert status == 200
        after = samples(scrape(other.server_port)[2])[("ollama_pull_bytes_total", ())]
    assert after - before >= size - 4096 and after - before <= size + 4096     # the layers (config is small)
