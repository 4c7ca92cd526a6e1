"""Models with only their GGUF's Jinja template: capabilities and /api/show's template come from it,
and chat with tools (or thinking) goes through llama-server's /v1/chat/completions, mapped back."""
import pytest

import fixtures
from test_inference import import_gguf, post

TEMPLATES = fixtures.llama_cpp_source() / "models" / "templates"


@pytest.fixture
def qwen(server, engine, tmp_path):
    text = (TEMPLATES / "Qwen-Qwen3-0.6B.jinja").read_text()
    gguf = fixtures.write_tiny_gguf(tmp_path / "q.gguf", chat_template=text)
    server.scheduler.exe = str(engine)
    import_gguf(server.store, "qwen", gguf)
    server.jinja = text
    return server


def test_capabilities_and_template_come_from_the_gguf(qwen):
    status, lines = post(qwen, "/api/show", {"model": "qwen"})
    assert status == 200
    assert lines[0]["template"] == qwen.jinja
    assert {"completion", "tools", "thinking"} <= set(lines[0]["capabilities"])


@pytest.mark.parametrize("stream", [False, True])
def test_chat_with_tools_goes_through_llama_servers_jinja(qwen, stream):
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "weather",
                                               "parameters": {"type": "object", "properties": {
                                                   "city": {"type": "string"}}}}}]
    status, lines = post(qwen, "/api/chat", {"model": "qwen", "stream": stream, "tools": tools, "think": False,
                                             "options": {"num_predict": 8, "temperature": 0},
                                             "messages": [{"role": "user", "content": "weather in Paris?"}]})
    assert status == 200, lines
    last = lines[-1]
    assert last["done"] is True and last["done_reason"] in ("stop", "length")
    assert last["message"]["role"] == "assistant" and last.get("eval_count", 0) > 0
