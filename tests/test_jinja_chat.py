"""Models with only their GGUF's Jinja template: capabilities and /api/show's template come from it,
and chat with tools or thinking goes through llama-server's /v1/chat/completions, mapped back.

The model is fixtures.write_scripted_gguf: real weights llama-server runs, which always answer with
the same pieces, so a tool call and a thinking block really come out of the engine and its parsers."""
import json
import re

import pytest

import fixtures
from test_embed import official_ollama
from test_inference import import_gguf, post
from test_models_api import upload

THOUGHT = "\nThe user wants the weather: call the tool.\n"
THOUGHT_SEEN = THOUGHT.lstrip()   # as Ollama's parser: whitespace after <think> eaten, before </think> kept
CALL = '\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
ANSWER = "It is sunny in Paris."
# Qwen3's template prefills "<think>\n\n</think>\n\n" when thinking is off: the script then goes on
# from its "\n\n" piece, as a real model does.
TOOL_SCRIPT = ["<think>", THOUGHT, "</think>", "\n\n", "<tool_call>", CALL, "</tool_call>"]
ANSWER_SCRIPT = ["<think>", THOUGHT, "</think>", "\n\n", ANSWER]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                           "parameters": {"type": "object", "required": ["city"],
                                                          "properties": {"city": {"type": "string"}}}}}]
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture
def qwen(server, engine, tmp_path):
    """qwen3-tools and qwen3-answer: Qwen3's real chat template, no TEMPLATE layer."""
    tree = fixtures.llama_cpp_source()         # after `engine`, which builds from (so fetches) it
    text = (tree / "models" / "templates" / "Qwen-Qwen3-0.6B.jinja").read_text()
    for name, script in (("qwen3-tools", TOOL_SCRIPT), ("qwen3-answer", ANSWER_SCRIPT)):
        gguf = fixtures.write_scripted_gguf(tmp_path / (name + ".gguf"), script, text)
        import_gguf(server.store, name, gguf)
    server.scheduler.exe = str(engine)
    server.jinja = text
    return server


def chat(server, model, stream, **body):
    status, lines = post(server, "/api/chat", dict(body, model=model, stream=stream, messages=QUESTION))
    assert status == 200, lines
    assert all(x["done"] is (i == len(lines) - 1) for i, x in enumerate(lines))
    msgs = [x["message"] for x in lines]
    return (lines[-1], "".join(m.get("thinking", "") for m in msgs), "".join(m["content"] for m in msgs),
            [c for m in msgs for c in m.get("tool_calls") or []])


def test_capabilities_and_template_come_from_the_gguf(qwen):
    status, lines = post(qwen, "/api/show", {"model": "qwen3-tools"})
    assert status == 200
    assert lines[0]["template"] == qwen.jinja
    # show --modelfile says so, and has no TEMPLATE {{ .Prompt }} that a create from it would make render
    assert "# Chat is rendered by the GGUF's own Jinja template" in lines[0]["modelfile"]
    assert "\nTEMPLATE" not in lines[0]["modelfile"]
    assert {"completion", "tools", "thinking"} <= set(lines[0]["capabilities"])


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("think", ["unset", True, "high"])
def test_a_tool_call_and_its_thinking_are_parsed_from_the_gguf_template(qwen, stream, think):
    extra = {} if think == "unset" else {"think": think}
    last, thinking, content, calls = chat(qwen, "qwen3-tools", stream, tools=TOOLS, **extra)
    assert thinking == THOUGHT_SEEN and content == ""
    assert [c["function"] for c in calls] == [{"index": 0, "name": "get_weather", "arguments": {"city": "Paris"}}]
    assert calls[0]["id"]
    assert last["done_reason"] == "stop" and last["eval_count"] > 0 and last["prompt_eval_count"] > 0


@pytest.mark.parametrize("stream", [False, True])
def test_think_false_reaches_the_gguf_template(qwen, stream):
    # Only the template's enable_thinking=false prefill makes the script skip its thought.
    _, thinking, _, calls = chat(qwen, "qwen3-tools", stream, tools=TOOLS, think=False)
    assert thinking == "" and [c["function"]["name"] for c in calls] == ["get_weather"]
    _, thinking, content, calls = chat(qwen, "qwen3-answer", stream, think=False)
    assert (thinking, content, calls) == ("", ANSWER, [])


@pytest.mark.parametrize("stream", [False, True])
def test_thinking_is_separated_from_the_answer(qwen, stream):
    for think in ("unset", True, "low"):
        extra = {} if think == "unset" else {"think": think}
        _, thinking, content, calls = chat(qwen, "qwen3-answer", stream, **extra)
        assert (thinking, content, calls) == (THOUGHT_SEEN, ANSWER, []), think


def test_a_tool_result_goes_back_through_the_template(qwen):
    # The second turn of a tool loop: the assistant's call (with its id) and the tool's answer.
    status, lines = post(qwen, "/api/chat", {"model": "qwen3-answer", "stream": False, "think": False, "messages": [
        *QUESTION,
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_1", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}]})
    assert status == 200, lines
    assert lines[-1]["message"]["content"] == ANSWER


def test_official_ollama_client_gets_tool_calls_and_thinking_as_asked(qwen):
    out = official_ollama(qwen, """
        r = client.chat(model="qwen3-tools", messages=%r, tools=%r)
        s = list(client.chat(model="qwen3-tools", messages=%r, tools=%r, stream=True))
        calls = [c for part in s for c in part.message.tool_calls or []]
        off = client.chat(model="qwen3-answer", messages=%r, think=False)
        g = client.generate(model="qwen3-answer", prompt="Weather?", think="low")
        print(json.dumps([r.message.thinking, r.message.content,
                          [(c.function.name, c.function.arguments) for c in r.message.tool_calls],
                          "".join(p.message.thinking or "" for p in s),
                          [(c.function.name, c.function.arguments) for c in calls],
                          [off.message.thinking, off.message.content], [g.thinking, g.response]]))
    """ % (QUESTION, TOOLS, QUESTION, TOOLS, QUESTION))
    call = ["get_weather", {"city": "Paris"}]
    assert out == [THOUGHT_SEEN, "", [call], THOUGHT_SEEN, [call], [None, ANSWER], [THOUGHT_SEEN, ANSWER]]


@pytest.mark.parametrize("stream", [False, True])
def test_openai_client_gets_the_tool_call(qwen, stream):
    import openai
    client = openai.OpenAI(base_url=qwen.url + "/v1", api_key="ollama", max_retries=0, timeout=120)
    r = client.chat.completions.create(model="qwen3-tools", messages=QUESTION, tools=TOOLS, stream=stream)
    if not stream:
        choice = r.choices[0]
        calls = [(c.id, c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls]
        reasoning, finish = getattr(choice.message, "reasoning", None), choice.finish_reason
    else:
        parts, reasoning, finish = {}, "", None
        for chunk in r:
            delta = chunk.choices[0].delta
            reasoning += getattr(delta, "reasoning", None) or ""
            for c in delta.tool_calls or []:
                part = parts.setdefault(c.index, ["", "", ""])
                part[0] += c.id or ""
                part[1] += c.function.name or ""
                part[2] += c.function.arguments or ""
            finish = chunk.choices[0].finish_reason or finish
        calls = [(i, n, json.loads(a)) for i, n, a in parts.values()]
    assert [(n, a) for _, n, a in calls] == [("get_weather", {"city": "Paris"})] and calls[0][0]
    assert finish == "tool_calls" and reasoning == THOUGHT_SEEN


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("think", ["unset", True, False, "high"])
def test_generate_renders_the_gguf_template_and_separates_thinking(qwen, stream, think):
    body = {"model": "qwen3-answer", "prompt": QUESTION[0]["content"], "stream": stream}
    if think != "unset":
        body["think"] = think
    status, lines = post(qwen, "/api/generate", body)
    assert status == 200, lines
    thinking = "".join(x.get("thinking", "") for x in lines)
    assert "".join(x["response"] for x in lines) == ANSWER
    assert thinking == ("" if think is False else THOUGHT_SEEN)


def test_a_renderer_we_do_not_implement_leaves_chat_to_the_gguf_template(qwen, tmp_path):
    # A registry model naming one of Ollama's Go renderers/parsers, with a TEMPLATE layer beside it.
    digest = upload(qwen, (tmp_path / "qwen3-tools.gguf").read_bytes())
    status, lines = post(qwen, "/api/create", {"model": "qwen3-renderer", "files": {"m.gguf": digest},
                                               "template": "{{ .Prompt }}", "renderer": "qwen3-coder",
                                               "parser": "qwen3-coder", "stream": False})
    assert status == 200, lines
    status, lines = post(qwen, "/api/show", {"model": "qwen3-renderer"})
    assert (lines[0]["template"], lines[0]["renderer"], lines[0]["parser"]) == (qwen.jinja, "qwen3-coder",
                                                                                "qwen3-coder")
    assert "\nRENDERER qwen3-coder\nPARSER qwen3-coder\n" in lines[0]["modelfile"]
    assert "# Chat is rendered by the GGUF's own Jinja template" in lines[0]["modelfile"]
    _, thinking, content, calls = chat(qwen, "qwen3-renderer", False, tools=TOOLS)
    assert (thinking, content) == (THOUGHT_SEEN, "")
    assert [c["function"]["arguments"] for c in calls] == [{"city": "Paris"}]


@pytest.mark.parametrize("stream", [False, True])
def test_logprobs_come_through_the_gguf_template_path(qwen, stream):
    status, lines = post(qwen, "/api/chat", {"model": "qwen3-answer", "stream": stream, "messages": QUESTION,
                                             "logprobs": True, "top_logprobs": 2})
    assert status == 200, lines
    probs = [p for x in lines for p in x.get("logprobs") or []]
    # Thoughts too; llama-server sends no chunk, so no logprob, for tokens its parser holds back entirely
    assert [p["token"] for p in probs] == ["<think>", THOUGHT, ANSWER]
    assert all(p["logprob"] > -0.01 and len(p["top_logprobs"]) == 2 for p in probs)
    assert probs[-1]["bytes"] == list(ANSWER.encode())


def test_cli_run_shows_the_thinking_framed_hidden_or_off(qwen):
    from test_cli_run import cli
    r = cli("run", "qwen3-answer", "What is the weather in Paris?")
    assert (r.returncode, r.stdout) == (0, "Thinking...\n%s...done thinking.\n\n%s\n\n" % (THOUGHT_SEEN, ANSWER)), \
        r.stderr
    for flags in (["--hidethinking"], ["--think=false"]):
        r = cli("run", "qwen3-answer", "What is the weather in Paris?", *flags)
        assert (r.returncode, r.stdout) == (0, ANSWER + "\n\n"), (flags, r.stderr)


def test_count_tokens_is_the_prompt_the_chat_runs(qwen):
    # /v1/messages/count_tokens through the official SDK, against the usage of the same request: the
    # template path with tools, the plain render path, and thinking on and off (each a different prompt).
    anthropic = pytest.importorskip("anthropic")
    client = anthropic.Anthropic(base_url=qwen.url, api_key="ollama", max_retries=0, timeout=120)
    weather = {"name": "get_weather", "description": "Current weather in a city",
               "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}
    counts = []
    for model, extra in (("qwen3-tools", {"tools": [weather]}),
                         ("qwen3-answer", {}),
                         ("qwen3-answer", {"thinking": {"type": "disabled"}}),
                         ("qwen3-answer", {"system": "Be brief.",
                                           "thinking": {"type": "enabled", "budget_tokens": 1024}})):
        counted = client.messages.count_tokens(model=model, messages=QUESTION, **extra).input_tokens
        used = client.messages.create(model=model, max_tokens=64, messages=QUESTION, **extra).usage.input_tokens
        assert counted == used > 0, (model, extra)
        counts.append(counted)
    assert counts[0] > counts[1] + 20 and counts[3] > counts[1]       # the tool schema and the system prompt count
    with pytest.raises(anthropic.NotFoundError):
        client.messages.count_tokens(model="nope", messages=QUESTION)


def test_a_prompt_longer_than_the_context_says_what_to_set_in_each_api_shape(qwen):
    # An agent cannot send num_ctx: the error names the server setting, in each API's own error shape,
    # with a status (not a broken stream) whether streamed or not, and with tools (the template path).
    qwen.config.context_length = 512
    long = [{"role": "user", "content": "word " * 300}]          # byte tokens: ~1500
    weather = {"name": "get_weather", "input_schema": {"type": "object", "properties": {}}}
    asks = [("/api/chat", {"messages": long, "tools": TOOLS}, lambda o: o["error"]),
            ("/api/chat", {"messages": long, "stream": False}, lambda o: o["error"]),
            ("/api/generate", {"prompt": long[0]["content"]}, lambda o: o["error"]),
            ("/v1/chat/completions", {"messages": long, "stream": True}, lambda o: o["error"]["message"]),
            ("/v1/responses", {"input": long[0]["content"], "tools": [dict(TOOLS[0]["function"], type="function")]},
             lambda o: o["error"]["message"]),
            ("/v1/messages", {"messages": long, "max_tokens": 8, "stream": True, "tools": [weather]},
             lambda o: o["type"] == "error" and o["error"]["type"] == "invalid_request_error"
             and o["error"]["message"])]
    for path, body, message in asks:
        status, data = post(qwen, path, dict(body, model="qwen3-tools"), raw=True)
        assert status == 400, (path, data)
        text = message(json.loads(data))
        found = re.search(r"the prompt is (\d+) tokens but the context window is 512 tokens: .* set "
                          r"OLLAMA_CONTEXT_LENGTH=(\d+) where the server runs", text)
        assert found, (path, text)
        n, suggested = int(found.group(1)), int(found.group(2))
        assert n > 1000 and suggested >= n + 1024 and suggested & (suggested - 1) == 0, (path, text)
