"""Anthropic compatibility (/v1/messages) with the official `anthropic` SDK: plain, streamed (the
`messages.stream` helpers and the raw events), a tool round trip, thinking, and errors as the SDK's
exception types; plus the request mapping onto /api/chat, checked without an engine."""
import contextlib
import json

import pytest

import ollama
from fixtures import serving
from test_embed import CHAT, NUM_CTX, TOOLS, TOOLS_TEMPLATE, call
from test_inference import import_gguf
from test_openai import TOOL_CALL_FORMAT

anthropic = pytest.importorskip("anthropic")

TINY, THINK = "tiny", "tiny-think"
#: A template that starts the thinking itself when asked to think: the prompt ends with <think>, so
#: whatever the model writes up to </think> is thinking, random weights or not.
THINK_TEMPLATE = ("{{- range $i, $_ := .Messages }}{{- $last := eq (len (slice $.Messages $i)) 1 }}"
                  "{{- if eq .Role \"user\" }}<|user|>{{ .Content }}\n"
                  "{{- if $last }}<|assistant|>{{ if $.Think }}<think>{{ end }}{{ end }}"
                  "{{- else if eq .Role \"assistant\" }}<|assistant|>"
                  "{{ if .Thinking }}<think>{{ .Thinking }}</think>{{ end }}{{ .Content }}\n"
                  "{{- end }}{{- end }}")
WEATHER = {"name": "get_weather", "description": "Current weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


@contextlib.contextmanager
def agent_server(home, llama_server_bin, gemma_gguf, tiny_gguf):
    """A real server with Gemma (CHAT; TOOLS with a tool template) where the answer must make sense,
    and the tiny random model (TINY; THINK with a thinking template) where it need not."""
    env = {"HOME": str(home), "OLLAMA_MODELS": str(home / ".ollama" / "models"),
           "OLLAMA_CONTEXT_LENGTH": str(NUM_CTX * 2), "OLLAMA_MAX_LOADED_MODELS": "4"}
    srv = ollama.make_server(ollama.Config(env), "127.0.0.1", 0)
    srv.scheduler.exe = str(llama_server_bin)
    import_gguf(srv.store, CHAT, gemma_gguf, params={"stop": ["<end_of_turn>"]})
    import_gguf(srv.store, TOOLS, gemma_gguf, template=TOOLS_TEMPLATE, params={"stop": ["<|eot_id|>"]})
    import_gguf(srv.store, TINY, tiny_gguf, template="{{ .Prompt }}")
    import_gguf(srv.store, THINK, tiny_gguf, template=THINK_TEMPLATE)
    with serving(srv):
        yield srv


@pytest.fixture(scope="module")
def api(tmp_path_factory, llama_server_bin, gemma_gguf, tiny_gguf):
    with agent_server(tmp_path_factory.mktemp("anthropic"), llama_server_bin, gemma_gguf, tiny_gguf) as srv:
        yield srv


@pytest.fixture(scope="module")
def claude(api):
    return anthropic.Anthropic(base_url=api.url, api_key="ollama", max_retries=0, timeout=120)


def sse(data):
    """(event name, payload) of each named server-sent event."""
    out = []
    for block in data.decode().split("\n\n"):
        if block.strip():
            head, _, payload = block.partition("\n")
            assert head.startswith("event: ") and payload.startswith("data: "), block
            out.append((head[len("event: "):], json.loads(payload[len("data: "):])))
    return out


# -- the SDK against the real engine ----------------------------------------------

def test_messages_create(claude):
    m = claude.messages.create(model=CHAT, max_tokens=8, stop_sequences=["\n\n"],
                               extra_body={"temperature": 0, "top_p": 0.9, "top_k": 40},   # no longer SDK arguments
                               system=[{"type": "text", "text": "You are terse."}],
                               metadata={"user_id": "u1"}, messages=[{"role": "user", "content": "Say hi"}])
    assert m.type == "message" and m.role == "assistant" and m.model == CHAT and m.id.startswith("msg_")
    assert m.content and m.content[0].type == "text" and m.content[0].text
    assert m.stop_reason in ("end_turn", "max_tokens")
    assert m.usage.input_tokens > 0 and 0 < m.usage.output_tokens <= 8


def test_max_tokens_is_stop_reason_max_tokens(claude):
    m = claude.messages.create(model=TINY, max_tokens=3, messages=[{"role": "user", "content": "x"}])
    assert (m.stop_reason, m.usage.output_tokens) == ("max_tokens", 3)


def test_messages_stream_helpers(claude):
    with claude.messages.stream(model=CHAT, max_tokens=10, extra_body={"temperature": 0},
                                messages=[{"role": "user", "content": "Count: 1, 2,"}]) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text and final.content[0].text == text
    assert final.stop_reason in ("end_turn", "max_tokens") and final.usage.output_tokens > 0


def test_raw_stream_event_sequence(claude):
    events = list(claude.messages.create(model=TINY, max_tokens=4, stream=True,
                                         messages=[{"role": "user", "content": "x"}]))
    kinds = [e.type for e in events]
    assert kinds[:3] == ["message_start", "content_block_start", "content_block_delta"]
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert events[0].message.usage.input_tokens > 0 and events[0].message.content == []
    assert all(e.delta.type == "text_delta" for e in events if e.type == "content_block_delta")
    assert events[-2].delta.stop_reason == "max_tokens" and events[-2].usage.output_tokens == 4


def test_stream_is_named_sse_with_a_ping(api):
    status, resp, data = call(api, "POST", "/v1/messages", {
        "model": TINY, "max_tokens": 2, "stream": True, "messages": [{"role": "user", "content": "x"}]},
        headers={"x-api-key": "anything", "anthropic-version": "2023-06-01"})
    assert status == 200 and resp.getheader("Content-Type") == "text/event-stream"
    events = sse(data)
    assert [name for name, _ in events[:2]] == ["message_start", "ping"]
    assert all(name == payload["type"] for name, payload in events)


def test_tool_round_trip(claude):
    """tool_use (deterministic: the structured output forces the call's JSON), then tool_result, then an answer."""
    ask = {"role": "user", "content": "What is the weather in Paris?"}
    first = claude.messages.create(model=TOOLS, max_tokens=40, extra_body={"temperature": 0}, tools=[WEATHER],
                                   messages=[ask], tool_choice={"type": "auto"},
                                   output_config={"format": {"type": "json_schema", "schema": TOOL_CALL_FORMAT}})
    assert first.stop_reason == "tool_use"
    use = [b for b in first.content if b.type == "tool_use"][0]
    assert use.name == "get_weather" and set(use.input) == {"city"} and use.id
    second = claude.messages.create(
        model=TOOLS, max_tokens=16, extra_body={"temperature": 0}, tools=[WEATHER], tool_choice={"type": "none"},
        messages=[ask, {"role": "assistant", "content": first.content},
                  {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                                "content": [{"type": "text", "text": "18C and sunny"}]}]}])
    assert second.stop_reason in ("end_turn", "max_tokens")
    assert [b.type for b in second.content] == ["text"] and second.content[0].text
    assert "sunny" in second.content[0].text.lower()            # the answer read the tool's result


def test_streamed_tool_use_is_input_json_delta(api):
    status, _, data = call(api, "POST", "/v1/messages", {
        "model": TOOLS, "max_tokens": 40, "temperature": 0, "stream": True, "tools": [WEATHER],
        "output_config": {"format": {"type": "json_schema", "schema": TOOL_CALL_FORMAT}},
        "messages": [{"role": "user", "content": "Weather in Oslo?"}]})
    events = [payload for _, payload in sse(data)]
    start = [e for e in events if e["type"] == "content_block_start" and e["content_block"]["type"] == "tool_use"]
    assert status == 200 and len(start) == 1 and start[0]["content_block"]["input"] == {}
    delta = [e for e in events if e["type"] == "content_block_delta" and e["index"] == start[0]["index"]]
    assert delta[0]["delta"]["type"] == "input_json_delta" and "city" in json.loads(delta[0]["delta"]["partial_json"])
    assert events[-2]["delta"]["stop_reason"] == "tool_use"


def test_thinking_becomes_thinking_blocks(claude):
    ask = [{"role": "user", "content": "Think."}]
    m = claude.messages.create(model=THINK, max_tokens=6, thinking={"type": "enabled", "budget_tokens": 1024},
                               messages=ask)
    assert m.content[0].type == "thinking" and m.content[0].thinking
    with claude.messages.stream(model=THINK, max_tokens=6, thinking={"type": "enabled", "budget_tokens": 1024},
                                messages=ask) as stream:
        kinds = {e.delta.type for e in stream if e.type == "content_block_delta"}
        final = stream.get_final_message()
    assert kinds == {"thinking_delta"} and final.content[0].type == "thinking" and final.content[0].thinking
    plain = claude.messages.create(model=THINK, max_tokens=4, thinking={"type": "disabled"}, messages=ask)
    assert [b.type for b in plain.content] == ["text"]


def test_thinking_on_a_model_that_cannot_think_is_relaxed(claude):
    m = claude.messages.create(model=TINY, max_tokens=2, thinking={"type": "enabled", "budget_tokens": 1024},
                               messages=[{"role": "user", "content": "x"}])
    assert [b.type for b in m.content] == ["text"]


def test_errors_are_the_sdk_exception_types(claude):
    with pytest.raises(anthropic.NotFoundError) as e:
        claude.messages.create(model="nope", max_tokens=4, messages=[{"role": "user", "content": "x"}])
    assert e.value.body["error"] == {"type": "not_found_error", "message": "model 'nope' not found"}
    assert e.value.body["type"] == "error" and e.value.body["request_id"].startswith("req_")
    with pytest.raises(anthropic.BadRequestError) as e:
        claude.messages.create(model=CHAT, max_tokens=0, messages=[{"role": "user", "content": "x"}])
    assert e.value.status_code == 400 and e.value.body["error"]["type"] == "invalid_request_error"
    with pytest.raises(anthropic.BadRequestError, match="messages is required"):
        claude.messages.create(model=CHAT, max_tokens=4, messages=[])
    with pytest.raises(anthropic.BadRequestError, match="does not support tools"):
        claude.messages.create(model=CHAT, max_tokens=4, tools=[WEATHER], messages=[{"role": "user", "content": "x"}])
    with pytest.raises(anthropic.BadRequestError, match="Only base64 images are supported"):
        claude.messages.create(model=CHAT, max_tokens=4, messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "url", "url": "http://example.invalid/a.png"}}]}])


def test_bad_json_is_an_anthropic_400(api):
    status, _, data = call(api, "POST", "/v1/messages", {"model": 3, "max_tokens": 4, "messages": []})
    assert status == 400 and json.loads(data)["error"] == {
        "type": "invalid_request_error",
        "message": "json: cannot unmarshal number into Go struct field MessagesRequest.model of type string"}


# -- the mapping onto /api/chat (no engine) ----------------------------------------

def test_request_maps_onto_an_api_chat_body():
    image = "aGVsbG8="
    chat = ollama._anthropic_chat({
        "model": "m", "max_tokens": 9, "system": "Be brief.", "temperature": 0.1, "top_p": 0.2, "top_k": 3,
        "stop_sequences": ["END"], "stream": True, "tools": [WEATHER], "thinking": {"type": "enabled"},
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Look: "},
                                         {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                                      "data": image}}]},
            {"role": "assistant", "content": [{"type": "thinking", "thinking": "hmm", "signature": ""},
                                              {"type": "text", "text": "Checking."},
                                              {"type": "tool_use", "id": "t1", "name": "get_weather",
                                               "input": {"city": "Paris"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "18C"},
                                         {"type": "text", "text": "And?"}]}]})
    assert chat == {
        "model": "m", "stream": True, "think": True,
        "options": {"num_predict": 9, "temperature": 0.1, "top_p": 0.2, "top_k": 3, "stop": ["END"]},
        "tools": [{"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                                    "parameters": WEATHER["input_schema"]}}],
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Look: ", "images": [image]},
            {"role": "assistant", "content": "Checking.", "thinking": "hmm",
             "tool_calls": [{"id": "t1", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
            {"role": "tool", "content": "18C", "tool_call_id": "t1", "tool_name": "get_weather"},
            {"role": "user", "content": "And?"}]}


def test_tool_choice_none_drops_the_tools_and_effort_sets_a_level():
    chat = ollama._anthropic_chat({"model": "m", "max_tokens": 1, "tools": [WEATHER], "tool_choice": {"type": "none"},
                                   "output_config": {"effort": "xhigh"},
                                   "messages": [{"role": "user", "content": "x"}]})
    assert "tools" not in chat and chat["think"] == "high"


@pytest.mark.parametrize("body,message", [
    ({"max_tokens": 1, "messages": [{"role": "user", "content": "x"}]}, "model is required"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}]}, "max_tokens is required and must be positive"),
    ({"model": "m", "max_tokens": 1}, "messages is required"),
    ({"model": "m", "max_tokens": 1, "messages": [{"role": "assistant", "content": [
        {"type": "tool_use", "name": "f"}]}]}, "tool_use block missing required 'id' field"),
    ({"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "data": "!!"}}]}]}, "invalid base64 image data"),
    ({"model": "m", "max_tokens": "9", "messages": []},
     "json: cannot unmarshal string into Go struct field MessagesRequest.max_tokens of type int"),
])
def test_invalid_requests_are_400(body, message):
    with pytest.raises(ollama.BadRequest, match=message):
        ollama._anthropic_chat(body)


def test_events_close_each_block_before_the_next():
    events = ollama.MessageEvents("msg_1", "m", 5)
    items = [{"message": {"role": "assistant", "content": "", "thinking": "a"}, "done": False},
             {"message": {"role": "assistant", "content": "b"}, "done": False},
             {"message": {"role": "assistant", "content": "", "tool_calls": [
                 {"id": "call_1", "function": {"index": 0, "name": "f", "arguments": {"x": 1}}}]}, "done": False},
             {"message": {"role": "assistant", "content": ""}, "done": True, "done_reason": "stop",
              "prompt_eval_count": 7, "eval_count": 3}]
    out = [e for item in items for e in events.feed(item)]
    assert [(e["type"], e.get("index")) for e in out] == [
        ("message_start", None), ("ping", None),
        ("content_block_start", 0), ("content_block_delta", 0), ("content_block_stop", 0),
        ("content_block_start", 1), ("content_block_delta", 1), ("content_block_stop", 1),
        ("content_block_start", 2), ("content_block_delta", 2), ("content_block_stop", 2),
        ("message_delta", None), ("message_stop", None)]
    assert out[0]["message"]["usage"] == {"input_tokens": 5, "output_tokens": 0}
    assert out[9]["delta"] == {"type": "input_json_delta", "partial_json": '{"x":1}'}
    assert out[-2]["delta"]["stop_reason"] == "tool_use" and out[-2]["usage"] == {"input_tokens": 7,
                                                                                   "output_tokens": 3}
