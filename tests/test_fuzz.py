"""Schemathesis against a live in-process serve with the tiny model loaded: valid and invalid requests
generated from our own OpenAPI description of the /api endpoints (written for this test; Ollama's
docs/openapi.yaml describes the same shapes). No answer may be a 5xx, every error must be Ollama's
JSON `{"error": "..."}`, and the server must keep serving. Endpoints that reach a registry (pull,
push, create `from`) are left out: a fuzzer must not send traffic off this machine."""
import json
import urllib.request

import pytest

import ollama
from test_inference import import_gguf

schemathesis = pytest.importorskip("schemathesis")
hypothesis = pytest.importorskip("hypothesis")

EXAMPLES = 40                    # per operation; about 30 s for the whole file on the 2-core CI machine

MODEL = {"type": "string", "example": "tiny"}
OPTIONS = {"type": "object", "properties": {
    "num_predict": {"type": "integer", "maximum": 8}, "temperature": {"type": "number"},
    "top_k": {"type": "integer"}, "top_p": {"type": "number"}, "seed": {"type": "integer"},
    "stop": {"type": "array", "items": {"type": "string"}}, "num_ctx": {"type": "integer"},
    "num_thread": {"type": "integer"}, "num_batch": {"type": "integer"}, "num_gpu": {"type": "integer"}}}
MESSAGE = {"type": "object", "required": ["role", "content"], "properties": {
    "role": {"type": "string", "enum": ["system", "user", "assistant", "tool"]}, "content": {"type": "string"},
    "images": {"type": "array", "items": {"type": "string"}}}}
KEEP_ALIVE = {"oneOf": [{"type": "string"}, {"type": "number"}]}


def _post(path, properties, required=("model",)):
    body = {"type": "object", "required": list(required), "properties": properties}
    return {path: {"post": {"requestBody": {"required": True, "content": {"application/json": {"schema": body}}},
                            "responses": {"200": {"description": "ok"}, "400": {"description": "bad request"},
                                          "404": {"description": "not found"}}}}}


SPEC = {
    "openapi": "3.0.3",
    "info": {"title": "ollama.py /api (for fuzzing)", "version": ollama.__version__},
    "paths": {
        **_post("/api/generate", {"model": MODEL, "prompt": {"type": "string"}, "suffix": {"type": "string"},
                                  "system": {"type": "string"}, "template": {"type": "string"},
                                  "context": {"type": "array", "items": {"type": "integer"}},
                                  "stream": {"type": "boolean"}, "raw": {"type": "boolean"},
                                  "format": {"oneOf": [{"type": "string"}, {"type": "object"}]},
                                  "keep_alive": KEEP_ALIVE, "options": OPTIONS, "think": {"type": "boolean"}}),
        **_post("/api/chat", {"model": MODEL, "messages": {"type": "array", "items": MESSAGE},
                              "stream": {"type": "boolean"}, "keep_alive": KEEP_ALIVE, "options": OPTIONS,
                              "tools": {"type": "array", "items": {"type": "object"}},
                              "format": {"oneOf": [{"type": "string"}, {"type": "object"}]}}),
        **_post("/api/embed", {"model": MODEL, "input": {"oneOf": [{"type": "string"},
                                                                   {"type": "array", "items": {"type": "string"}}]},
                               "truncate": {"type": "boolean"}, "dimensions": {"type": "integer"},
                               "options": OPTIONS, "keep_alive": KEEP_ALIVE}),
        **_post("/api/embeddings", {"model": MODEL, "prompt": {"type": "string"}, "options": OPTIONS}),
        **_post("/api/show", {"model": MODEL, "verbose": {"type": "boolean"}}),
        **_post("/api/copy", {"source": MODEL, "destination": {"type": "string"}}, ("source", "destination")),
        **_post("/api/create", {"model": {"type": "string"}, "files": {"type": "object",
                                "additionalProperties": {"type": "string"}},
                                "template": {"type": "string"}, "system": {"type": "string"},
                                "parameters": {"type": "object"}, "quantize": {"type": "string"},
                                "messages": {"type": "array", "items": MESSAGE}, "stream": {"type": "boolean"},
                                "license": {"oneOf": [{"type": "string"},
                                                      {"type": "array", "items": {"type": "string"}}]}}),
        **_post("/api/tokenize", {"model": MODEL, "content": {"type": "string"}}),
        "/api/delete": {"delete": {"requestBody": {"required": True, "content": {"application/json": {"schema": {
            "type": "object", "required": ["model"], "properties": {"model": {"type": "string"}}}}}},
            "responses": {"200": {"description": "ok"}, "404": {"description": "not found"}}}},
        "/api/tags": {"get": {"responses": {"200": {"description": "ok"}}}},
        "/api/ps": {"get": {"responses": {"200": {"description": "ok"}}}},
        "/api/version": {"get": {"responses": {"200": {"description": "ok"}}}},
        "/api/blobs/{digest}": {"head": {"parameters": [{"name": "digest", "in": "path", "required": True,
                                                         "schema": {"type": "string"}}],
                                         "responses": {"200": {"description": "ok"}, "404": {"description": "no"}}}},
    },
}

schema = schemathesis.openapi.from_dict(SPEC)


@pytest.fixture
def live(server, engine, tiny_gguf):
    """The server with the tiny model (also as "keep", which delete may take) and its engine."""
    server.scheduler.exe = str(engine)
    for name in ("tiny", "keep"):
        import_gguf(server.store, name, tiny_gguf)
    return server


@schema.parametrize()
@hypothesis.settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                     suppress_health_check=[hypothesis.HealthCheck.function_scoped_fixture,
                                            hypothesis.HealthCheck.too_slow])
def test_no_request_makes_the_server_fail(case, live):     # one live server for all of an operation's cases
    response = case.call(base_url=live.url, timeout=60)
    what = (case.as_curl_command(), response.status_code, response.text[:300])
    assert response.status_code < 500, what
    if response.status_code >= 400 and response.content:  # (HEAD answers have no body)
        if response.text in ("404 page not found", "405 method not allowed"):
            return                                         # the router's own answers, as Ollama's gin
        err = json.loads(response.content.splitlines()[-1])  # a streamed answer's error is its last line
        assert isinstance(err.get("error"), str) and "Traceback" not in err["error"], what
    with urllib.request.urlopen(live.url + "/api/version", timeout=10) as resp:   # still serving
        assert resp.status == 200
