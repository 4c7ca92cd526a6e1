"""logprobs and top_logprobs (0-20) on /api/generate, /api/chat, /v1/chat/completions and
/v1/completions, from llama-server's n_probs, in Ollama's shapes; through the official clients."""
import json
import math
import subprocess
import sys

import pytest

from test_inference import import_gguf, post


@pytest.fixture
def tiny(server, engine, tiny_gguf):
    server.scheduler.exe = str(engine)
    import_gguf(server.store, "tiny", tiny_gguf, template="{{ .Prompt }}")
    return server


GREEDY = {"num_predict": 4, "temperature": 0}


def check_entries(entries, top):
    assert len(entries) == 4                                   # one per generated token
    for e in entries:
        assert isinstance(e["token"], str) and math.isfinite(e["logprob"]) and e["logprob"] <= 0
        assert isinstance(e["bytes"], list)
        if top:
            alts = e["top_logprobs"]
            assert len(alts) == top and alts == sorted(alts, key=lambda a: -a["logprob"])
            assert e["logprob"] <= alts[0]["logprob"] + 1e-6   # greedy: the pick is the most likely
        else:
            assert "top_logprobs" not in e


@pytest.mark.parametrize("path", ["/api/generate", "/api/chat"])
@pytest.mark.parametrize("stream, top", [(False, 0), (False, 3), (True, 2)])
def test_native_endpoints_return_logprobs_per_token(tiny, path, stream, top):
    body = {"model": "tiny", "stream": stream, "logprobs": True, "top_logprobs": top, "options": GREEDY}
    body.update({"prompt": "hello"} if path == "/api/generate" else {"messages": [{"role": "user", "content": "hi"}]})
    status, lines = post(tiny, path, body)
    assert status == 200, lines
    check_entries([e for line in lines for e in line.get("logprobs") or []], top)
    if stream:
        assert sum(1 for line in lines if line.get("logprobs")) > 1


@pytest.mark.parametrize("top", [-1, 21, "3"])
def test_top_logprobs_out_of_range_is_ollamas_400(tiny, top):
    status, lines = post(tiny, "/api/generate", {"model": "tiny", "prompt": "x", "logprobs": True, "top_logprobs": top})
    assert status == 400
    assert lines[-1]["error"] in ("top_logprobs must be between 0 and 20",
                                  "json: cannot unmarshal string into Go struct field api.GenerateRequest."
                                  "top_logprobs of type int")


def test_without_logprobs_there_are_none(tiny):
    status, lines = post(tiny, "/api/generate", {"model": "tiny", "prompt": "x", "stream": False, "options": GREEDY})
    assert status == 200 and "logprobs" not in lines[-1]


def test_official_clients_read_logprobs(tiny):
    from test_embed import official_ollama
    out = official_ollama(tiny, """
        g = client.generate(model="tiny", prompt="hello", logprobs=True, top_logprobs=2, options={"num_predict": 4})
        c = client.chat(model="tiny", messages=[{"role": "user", "content": "hi"}], logprobs=True,
                        options={"num_predict": 4})
        print(json.dumps([[x.logprob for x in g.logprobs], len(g.logprobs[0].top_logprobs), len(c.logprobs)]))
    """)
    assert len(out[0]) == 4 and out[1] == 2 and out[2] == 4
    script = """
import json, openai
c = openai.OpenAI(base_url=%r, api_key="x")
r = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                              logprobs=True, top_logprobs=2)
s = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                              logprobs=True, stream=True)
streamed = [t.logprob for ch in s if ch.choices and ch.choices[0].logprobs for t in ch.choices[0].logprobs.content]
t = c.completions.create(model="tiny", prompt="hello", max_tokens=4, logprobs=3)
content = r.choices[0].logprobs.content
print(json.dumps([[x.logprob for x in content], len(content[0].top_logprobs), streamed,
                  len(t.choices[0].logprobs.content)]))
""" % (tiny.url + "/v1")
    res = subprocess.run([sys.executable, "-I", "-c", script], capture_output=True, text=True, timeout=120, cwd="/")
    assert res.returncode == 0, res.stderr[-2000:]
    chat, top, streamed, completion = json.loads(res.stdout)
    assert len(chat) == 4 and top == 2 and len(streamed) == 4 and completion == 4
