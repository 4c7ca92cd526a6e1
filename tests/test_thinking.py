"""Thinking as Ollama's chat and generate handlers settle it: on by default for a thinking-capable
model, `think: false` honoured and visible to the template, levels, and the thoughts parsed into
`thinking` on /api/chat and /api/generate, streamed or not, and through the official client."""

import pytest

import fixtures
from test_anthropic import THINK_TEMPLATE
from test_inference import import_gguf, post

#: Prints what the template sees; `.Thinking` makes the model thinking-capable.
PROBE = ("{{- range .Messages }}{{ if .Thinking }}{{ .Thinking }}{{ end }}{{ end -}}"
         "Think={{ .Think }} ThinkLevel={{ .ThinkLevel }} IsThinkSet={{ .IsThinkSet }}")


@pytest.fixture
def models(server, engine, tiny_gguf):
    server.scheduler.exe = str(engine)
    import_gguf(server.store, "probe", tiny_gguf, template=PROBE)
    import_gguf(server.store, "plain", tiny_gguf, template="{{ .Prompt }}")
    import_gguf(server.store, "think", tiny_gguf, template=THINK_TEMPLATE)
    return server


def rendered(server, path, model, think):
    body = {"model": model, "stream": False, "_debug_render_only": True}
    body.update({"messages": [{"role": "user", "content": "hi"}]} if path == "/api/chat" else {"prompt": "hi"})
    if think != "unset":
        body["think"] = think
    status, lines = post(server, path, body)
    assert status == 200, lines
    return lines[-1]["_debug_info"]["rendered_template"]


# Ollama's table: a thinking-capable model given no `think` thinks (and the template sees it as set).
@pytest.mark.parametrize("path", ["/api/chat", "/api/generate"])
@pytest.mark.parametrize("think, seen", [
    ("unset", "Think=true ThinkLevel=medium IsThinkSet=true"),
    (True, "Think=true ThinkLevel=medium IsThinkSet=true"),
    (False, "Think=false ThinkLevel= IsThinkSet=true"),
    ("low", "Think=true ThinkLevel=low IsThinkSet=true"),
    ("high", "Think=true ThinkLevel=high IsThinkSet=true"),
])
def test_the_template_sees_think_as_ollama_settles_it(models, path, think, seen):
    assert rendered(models, path, "probe", think) == seen


@pytest.mark.parametrize("path", ["/api/chat", "/api/generate"])
def test_a_model_that_cannot_think_refuses_think_but_takes_false(models, path):
    body = {"model": "plain", "stream": False, "think": True}
    body.update({"messages": [{"role": "user", "content": "hi"}]} if path == "/api/chat" else {"prompt": "hi"})
    status, lines = post(models, path, body)
    assert (status, lines[-1]) == (400, {"error": '"plain" does not support thinking'})
    status, _ = post(models, path, dict(body, think=False, options={"num_predict": 1}))
    assert status == 200


def answer(server, path, think, stream):
    body = {"model": "think", "stream": stream, "options": {"num_predict": 6, "temperature": 0}}
    body.update({"messages": [{"role": "user", "content": "hi"}]} if path == "/api/chat" else {"prompt": "hi"})
    if think != "unset":
        body["think"] = think
    status, lines = post(server, path, body)
    assert status == 200, lines
    parts = [x["message"] if path == "/api/chat" else x for x in lines]
    text = "".join(p.get("content" if path == "/api/chat" else "response", "") for p in parts)
    return "".join(p.get("thinking", "") for p in parts), text


@pytest.mark.parametrize("path", ["/api/chat", "/api/generate"])
@pytest.mark.parametrize("stream", [True, False])
def test_thoughts_are_parsed_into_thinking_unless_think_is_false(models, path, stream):
    # The template ends the prompt with <think> when thinking, so the random model's words are thoughts.
    for think in ("unset", True, "low"):
        thought, text = answer(models, path, think, stream)
        assert thought and "</think>" not in text, (think, thought, text)
    thought, text = answer(models, path, False, stream)
    assert thought == "" and text


def test_official_client_gets_thinking_separated(models):
    from test_embed import official_ollama
    out = official_ollama(models, """
        r = client.chat(model="think", messages=[{"role": "user", "content": "hi"}], options={"num_predict": 6})
        off = client.chat(model="think", messages=[{"role": "user", "content": "hi"}], think=False,
                          options={"num_predict": 6})
        g = client.generate(model="think", prompt="hi", think="low", options={"num_predict": 6})
        print(json.dumps([r.message.thinking, off.message.thinking, g.thinking]))
    """)
    assert out[0] and not out[1] and out[2]


@pytest.mark.parametrize("path", ["/api/chat", "/api/generate"])
@pytest.mark.parametrize("stream", [True, False])
def test_a_prefilled_think_tag_starts_the_parser_inside_the_thoughts(server, engine, tmp_path, path, stream):
    # DeepSeek-R1-style: the template ends the prompt with <think>, so the model's first words are
    # thoughts and only its </think> shows where they end (a scripted model, so the text is exact).
    gguf = fixtures.write_scripted_gguf(tmp_path / "r1.gguf", ["<think>", "\nHmm, blue.\n", "</think>", "\n\nBlue."])
    server.scheduler.exe = str(engine)
    import_gguf(server.store, "think", gguf, template=THINK_TEMPLATE)
    for think in ("unset", True, "high"):
        assert answer(server, path, think, stream) == ("Hmm, blue.\n", "Blue."), think
