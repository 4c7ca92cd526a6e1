"""OpenAI compatibility (/v1/*) with the official `openai` client, structured outputs with the
official `ollama` client, OpenAI-shaped errors, and the CORS / host checks browsers meet."""
import base64
import json
import struct

import pytest

import ollama
from test_embed import CHAT, EMBED, TOOLS, call, gemma_server, official_ollama, post

openai = pytest.importorskip("openai")       # the pip package; no clash with our ollama.py

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 24},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"]}


@pytest.fixture(scope="module")
def api(tmp_path_factory, llama_server_bin, gemma_gguf):
    with gemma_server(tmp_path_factory.mktemp("openai"), llama_server_bin, gemma_gguf) as srv:
        yield srv


@pytest.fixture(scope="module")
def oai(api):
    return openai.OpenAI(base_url=api.url + "/v1", api_key="ollama", max_retries=0, timeout=120)


def sse_events(data):
    """The `data:` payloads of an SSE body, "[DONE]" kept as a string."""
    out = []
    for block in data.decode().split("\n\n"):
        if block.startswith("data: "):
            payload = block[len("data: "):]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def openai_error(status, message, kind):
    return status, {"error": {"message": message, "type": kind, "param": None, "code": None}}


# -- chat completions ---------------------------------------------------------

def test_chat_completion_with_the_openai_client(oai):
    r = oai.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "Say hi"}],
                                    max_tokens=5, seed=1, temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == CHAT
    assert r.system_fingerprint == "fp_ollama"
    choice = r.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert 0 < r.usage.completion_tokens <= 5 and r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_stream_sends_role_once_then_finish_then_usage(oai):
    chunks = list(oai.chat.completions.create(
        model=CHAT, messages=[{"role": "user", "content": [{"type": "text", "text": "Count: 1, 2,"}]}],
        max_tokens=4, stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert deltas[0].role == "assistant" and all(d.role is None for d in deltas[1:])
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1 and finish[0].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4


def test_chat_stream_is_sse_ending_in_done(api):
    status, resp, data = call(api, "POST", "/v1/chat/completions", {
        "model": CHAT, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "stream": True})
    assert status == 200 and resp.getheader("Content-Type") == "text/event-stream"
    events = sse_events(data)
    assert events[-1] == "[DONE]" and all("usage" not in e for e in events[:-1])
    assert events[-2]["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "length"}


def test_chat_response_format_json_schema_is_followed(oai):
    r = oai.chat.completions.create(
        model=CHAT, messages=[{"role": "user", "content": "Describe a person as JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}},
        max_tokens=60, temperature=0)
    person = json.loads(r.choices[0].message.content)
    assert set(person) == {"name", "age"}
    assert isinstance(person["name"], str) and isinstance(person["age"], int) and 0 <= person["age"] <= 120


def test_response_format_maps_to_ollama_format():
    assert ollama._chat_format({"type": "json_object"}) == "json"
    assert ollama._chat_format({"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}) == PERSON
    assert ollama._chat_format({"type": "text"}) is None and ollama._chat_format(None) is None


def test_sampling_defaults_and_mapping():
    opts = ollama._openai_options({"max_tokens": 7, "stop": "END", "seed": 3, "presence_penalty": 0.5})
    assert opts == {"num_predict": 7, "stop": ["END"], "seed": 3, "presence_penalty": 0.5,
                    "temperature": 1.0, "top_p": 1.0}
    assert ollama._openai_options({"temperature": 0.2, "top_p": 0.5, "stop": ["a", 1]}) == \
        {"temperature": 0.2, "top_p": 0.5, "stop": ["a"]}
    with pytest.raises(ollama.BadRequest, match="invalid type for 'stop' field: float64"):
        ollama._openai_options({"stop": ["a", 1]}, completions=True)


def test_tool_calls_become_openai_tool_calls_with_string_arguments():
    items = iter([{"message": {"role": "assistant", "content": "",
                               "tool_calls": [{"id": "call_ab12cd34", "function": {
                                   "index": 0, "name": "get_weather", "arguments": {"city": "Paris"}}}]},
                   "done": False},
                  {"message": {"role": "assistant", "content": ""}, "done": True, "done_reason": "stop",
                   "prompt_eval_count": 9, "eval_count": 3}])
    events = list(ollama._chat_chunks(next(items), items, "chatcmpl-1", 0, "m", True))
    call_delta = events[0]["choices"][0]["delta"]
    assert call_delta["tool_calls"] == [{"id": "call_ab12cd34", "index": 0, "type": "function",
                                         "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]
    assert events[1]["choices"][0]["finish_reason"] == "tool_calls"
    assert events[2]["usage"] == {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}
    assert events[3] == "[DONE]"


def test_openai_tool_messages_map_to_ollama_messages():
    msgs = ollama._from_chat_messages([
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "-3C"}])
    assert msgs == [{"role": "assistant", "content": "",
                     "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
                    {"role": "tool", "content": "-3C", "tool_name": "get_weather"}]
    with pytest.raises(ollama.BadRequest, match="invalid tool call arguments"):
        ollama._from_chat_messages([{"role": "assistant", "content": "",
                                     "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]}])


WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
# Forcing the output into the tool-call shape makes the answer a tool call whatever the base model "wants".
TOOL_CALL_FORMAT = {"type": "object", "properties": {
    "name": {"const": "get_weather"},
    "arguments": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8}},
                  "required": ["city"]}}, "required": ["name", "arguments"]}

def test_openai_client_tool_call_has_string_arguments(api, oai):
    r = oai.chat.completions.create(model=TOOLS, messages=[{"role": "user", "content": "Weather in Paris?"}],
                                    tools=[WEATHER_TOOL], max_tokens=32, temperature=0,
                                    response_format={"type": "json_schema",
                                                     "json_schema": {"name": "call", "schema": TOOL_CALL_FORMAT}})
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    call_ = choice.message.tool_calls[0]
    assert call_.function.name == "get_weather" and "city" in json.loads(call_.function.arguments)


def test_official_ollama_client_chat_with_tools(api):
    out = official_ollama(api, """
        r = client.chat(model=%r, messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[%r],
                        format=%r, options={"num_predict": 32, "temperature": 0})
        print(json.dumps([{"name": c.function.name, "arguments": dict(c.function.arguments)}
                          for c in (r.message.tool_calls or [])]))
    """ % (TOOLS, WEATHER_TOOL, TOOL_CALL_FORMAT))
    assert out and out[0]["name"] == "get_weather" and "city" in out[0]["arguments"]


def test_a_model_without_a_tool_template_refuses_tools(api):
    status, out = post(api, "/api/chat", {"model": CHAT, "messages": [{"role": "user", "content": "x"}],
                                          "tools": [WEATHER_TOOL]})
    assert status == 400 and out["error"] == "registry.ollama.ai/library/gemma3:270m does not support tools"


# -- completions, models, embeddings -------------------------------------------

def test_completions_with_the_openai_client(oai):
    r = oai.completions.create(model=CHAT, prompt="The capital of France is", max_tokens=4, temperature=0)
    assert r.object == "text_completion" and r.id.startswith("cmpl-") and r.model == CHAT
    assert isinstance(r.choices[0].text, str) and r.choices[0].finish_reason in ("stop", "length")
    assert 0 < r.usage.completion_tokens <= 4


def test_completions_stream_with_usage(api):
    status, resp, data = call(api, "POST", "/v1/completions", {
        "model": CHAT, "prompt": "Once upon a time", "max_tokens": 3, "stream": True,
        "stream_options": {"include_usage": True}})
    events = sse_events(data)
    assert status == 200 and events[-1] == "[DONE]"
    assert all(e["object"] == "text_completion" for e in events[:-1])
    assert events[-3]["choices"][0]["finish_reason"] == "length"
    assert events[-2]["choices"] == [] and events[-2]["usage"]["completion_tokens"] == 3


def test_models_list_and_retrieve(api, oai):
    ids = [m.id for m in oai.models.list()]
    assert sorted(ids) == sorted([CHAT, ollama.Name.parse(EMBED).display(), ollama.Name.parse(TOOLS).display()])
    m = oai.models.retrieve(CHAT)
    assert (m.id, m.object, m.owned_by) == (CHAT, "model", "library") and m.created > 0
    with pytest.raises(openai.NotFoundError) as e:
        oai.models.retrieve("nope")
    assert e.value.body == {"message": "model 'nope' not found", "type": "not_found_error", "param": None,
                            "code": None}


def test_embeddings_float_and_base64_agree(oai):
    floats = oai.embeddings.create(model=EMBED, input=["hello", "world"], dimensions=32)
    assert [d.index for d in floats.data] == [0, 1] and len(floats.data[0].embedding) == 32
    assert floats.usage.prompt_tokens > 0
    raw = oai.embeddings.with_raw_response.create(model=EMBED, input="hello", dimensions=32,
                                                  encoding_format="base64")
    packed = base64.b64decode(json.loads(raw.text)["data"][0]["embedding"])
    decoded = struct.unpack("<32f", packed)
    assert all(abs(a - b) < 1e-6 for a, b in zip(decoded, floats.data[0].embedding))
    # the client's default asks for base64 and decodes it itself
    auto = oai.embeddings.create(model=EMBED, input="hello", dimensions=32)
    assert all(abs(a - b) < 1e-6 for a, b in zip(auto.data[0].embedding, decoded))


# -- errors ---------------------------------------------------------------------

def test_empty_messages_is_400_in_openai_shape(api):
    assert post(api, "/v1/chat/completions", {"model": CHAT, "messages": []}) == \
        openai_error(400, "[] is too short - 'messages'", "invalid_request_error")


def test_unknown_model_is_404_not_found_error(api, oai):
    assert post(api, "/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "x"}]}) \
        == openai_error(404, "model 'nope' not found", "not_found_error")
    with pytest.raises(openai.NotFoundError):
        oai.completions.create(model="nope", prompt="x")


def test_invalid_json_schema_is_400(api):
    status, out = post(api, "/v1/chat/completions", {
        "model": CHAT, "messages": [{"role": "user", "content": "x"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": 5}}}})
    assert status == 400 and out["error"]["type"] == "invalid_request_error"
    assert out["error"]["message"].startswith("invalid JSON schema in format: ")
    assert "type must be a string" in out["error"]["message"]
    status, out = post(api, "/api/generate", {"model": CHAT, "prompt": "x", "format": {"type": 5}})
    assert status == 400 and out["error"].startswith("invalid JSON schema in format: ")


def test_format_neither_json_nor_object_is_400(api):
    status, out = post(api, "/api/chat", {"model": CHAT, "messages": [{"role": "user", "content": "x"}],
                                          "format": "yaml"})
    assert (status, out) == (400, {"error": 'invalid format: "yaml"; expected "json" or a valid JSON Schema object'})


def test_bad_encoding_format_is_400(api):
    assert post(api, "/v1/embeddings", {"model": EMBED, "input": "x", "encoding_format": "int8"}) == openai_error(
        400, "Invalid value for 'encoding_format' = int8. Supported values: ['float', 'base64'].",
        "invalid_request_error")


def test_embedding_longer_than_context_without_truncate_is_400(api):
    status, out = post(api, "/api/embed", {"model": EMBED, "input": "word " * 400, "truncate": False})
    assert (status, out) == (400, {"error": "the input length exceeds the context length"})


def test_images_rejected_without_projector_and_http_urls_rejected(api):
    def ask(url):
        return post(api, "/v1/chat/completions", {"model": CHAT, "messages": [{"role": "user", "content": [
            {"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": url}}]}]})
    png = "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n").decode()
    assert ask(png) == openai_error(400, "this model is missing data required for image input",
                                    "invalid_request_error")
    assert ask("https://example.com/cat.png") == openai_error(400, "invalid image input", "invalid_request_error")


def test_bad_message_content_is_400(api):
    assert post(api, "/v1/chat/completions", {"model": CHAT, "messages": [{"role": "user", "content": 5}]}) == \
        openai_error(400, "invalid message content type: float64", "invalid_request_error")
    status, out = post(api, "/v1/completions", {"model": CHAT, "prompt": ["a", "b"]})
    assert status == 400 and out["error"]["type"] == "invalid_request_error"


# -- the official ollama client: structured outputs -------------------------------

def test_official_ollama_client_chat_with_format_schema(api):
    out = official_ollama(api, """
        r = client.chat(model=%r, messages=[{"role": "user", "content": "Describe a person as JSON."}],
                        format=%r, options={"num_predict": 60, "temperature": 0})
        print(json.dumps(r.message.content))
    """ % (CHAT, PERSON))
    person = json.loads(out)
    assert set(person) == {"name", "age"} and isinstance(person["age"], int)


# -- CORS and the DNS-rebinding guard ---------------------------------------------

def test_preflight_from_an_allowed_origin_is_204_with_cors_headers(server):
    status, resp, data = call(server, "OPTIONS", "/v1/chat/completions", headers={
        "Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type,authorization"})
    assert status == 204 and data == b""
    assert resp.getheader("Access-Control-Allow-Origin") == "http://localhost:3000"
    assert "POST" in resp.getheader("Access-Control-Allow-Methods").split(",")
    allowed = {h.lower() for h in resp.getheader("Access-Control-Allow-Headers").split(",")}
    assert {"authorization", "content-type", "openai-beta", "x-stainless-retry-count"} <= allowed
    # what the Anthropic SDK sends from a browser, for /v1/messages (Ollama's list lacks them)
    assert {"x-api-key", "anthropic-version", "anthropic-beta", "anthropic-dangerous-direct-browser-access"} <= allowed
    status, resp, _ = call(server, "GET", "/api/version", headers={"Origin": "http://127.0.0.1:8080"})
    assert status == 200 and resp.getheader("Access-Control-Allow-Origin") == "http://127.0.0.1:8080"


def test_disallowed_origin_is_403_without_cors_headers(server):
    for method in ("OPTIONS", "GET"):
        status, resp, _ = call(server, method, "/api/version", headers={"Origin": "https://evil.example"})
        assert status == 403 and resp.getheader("Access-Control-Allow-Origin") is None


def test_a_folded_or_malformed_origin_is_403_and_never_echoed(server):
    import socket
    for origin in (b"http://localhost:3000\r\n X-Injected: 1", b"http://localhost:3000\r\n\tX-Injected: 1",
                   b"http://localhost:3000/path", b"http://localhost:3000 x"):
        with socket.create_connection(("127.0.0.1", server.server_port), timeout=10) as sock:
            sock.sendall(b"GET /api/version HTTP/1.1\r\nHost: 127.0.0.1\r\nOrigin: " + origin
                         + b"\r\nConnection: close\r\n\r\n")
            answer = b""
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                answer += chunk
        head = answer.split(b"\r\n\r\n")[0]
        assert head.startswith(b"HTTP/1.1 403 "), (origin, head)
        assert b"X-Injected" not in head and b"Access-Control-Allow-Origin" not in head


def test_ollama_origins_adds_allowed_origins(monkeypatch):
    import threading
    monkeypatch.setenv("OLLAMA_ORIGINS", "https://app.example.com,chrome-extension://*")
    srv = ollama.make_server(ollama.Config(), "127.0.0.1", 0)
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        for origin in ("https://app.example.com", "chrome-extension://abcdef"):
            status, resp, _ = call(srv, "GET", "/api/version", headers={"Origin": origin})
            assert status == 200 and resp.getheader("Access-Control-Allow-Origin") == origin
        assert call(srv, "GET", "/api/version", headers={"Origin": "https://other.example.com"})[0] == 403
    finally:
        srv.shutdown()
        srv.server_close()


def test_foreign_host_is_403_and_local_hosts_pass(server):
    status, resp, data = call(server, "GET", "/api/version", headers={"Host": "attacker.example:11434"})
    assert status == 403 and data == b""
    for host in ("localhost:11434", "[::1]:11434", "127.0.0.1", "10.1.2.3:80", "myhost.local", "box.internal"):
        assert call(server, "GET", "/api/version", headers={"Host": host})[0] == 200, host
    assert call(server, "OPTIONS", "/api/version", headers={"Host": "localhost"})[0] == 204
