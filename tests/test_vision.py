"""Vision: images reach llama-server's multimodal input (/completion's prompt_string + multimodal_data,
with the media marker pinned through LLAMA_MEDIA_MARKER) on /api/generate, /api/chat and
/v1/chat/completions; a model without a projector is a 400 with Ollama's text.

The engine here is a recording fake "llama-server" (fault-injection style): a real one needs a real
projector, and clip.cpp wants a full vision tower of named tensors, not a tiny random GGUF."""
import base64
import json
import sys

import pytest

import ollama
from test_inference import post
from tiny_gguf import write_tiny_gguf

FAKE_ENGINE = r'''#!%s
import http.server, json, os, sys
port = int(sys.argv[sys.argv.index("--port") + 1])
record = os.environ["FAKE_ENGINE_RECORD"]

class H(http.server.BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def reply(self, obj):
        data = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self.reply({"status": "ok"})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path == "/tokenize":
            return self.reply({"tokens": list(range(len(body["content"].split())))})
        if self.path == "/detokenize":
            return self.reply({"content": ""})
        with open(record, "a") as f:
            f.write(json.dumps({"path": self.path, "body": body, "argv": sys.argv,
                                "marker": os.environ.get("LLAMA_MEDIA_MARKER")}) + "\n")
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for event in ({"content": "a cat", "stop": False},
                      {"content": "", "stop": True, "stop_type": "eos", "timings": {}}):
            self.wfile.write(b"data: " + json.dumps(event).encode() + b"\n\n")
            self.wfile.flush()

http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
'''

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(40))
JPEG = b"\xff\xd8\xff\xe0" + bytes(range(40, 80))


def b64(data):
    return base64.b64encode(data).decode()


def import_model(store, name, gguf, projector=None):
    layers = []
    for kind, path in (("model", gguf), ("projector", projector), ("template", None)):
        if kind == "template":
            d, s = store.write_blob_bytes(b"{{ range .Messages }}<{{ .Role }}>{{ .Content }}{{ end }}<assistant>")
        elif path is None:
            continue
        else:
            with open(path, "rb") as f:
                d, s = store.write_blob(f)
        layers.append({"mediaType": ollama.MEDIA_PREFIX + kind, "digest": d, "size": s})
    cd, cs = store.write_blob_bytes(json.dumps({"model_format": "gguf", "model_family": "llama"}).encode())
    store.write_manifest(ollama.Name.parse(name), {
        "schemaVersion": 2, "mediaType": ollama.MEDIA_MANIFEST,
        "config": {"mediaType": ollama.MEDIA_CONFIG, "digest": cd, "size": cs}, "layers": layers})


@pytest.fixture
def vision(server, tmp_path, monkeypatch):
    """`seer` has a projector layer, `blind` has none; both run on the recording fake engine."""
    exe = tmp_path / "llama-server"
    exe.write_text(FAKE_ENGINE % sys.executable)
    exe.chmod(0o755)
    record = tmp_path / "requests.jsonl"
    monkeypatch.setenv("FAKE_ENGINE_RECORD", str(record))
    server.scheduler.exe = str(exe)
    write_tiny_gguf(tmp_path / "m.gguf")
    write_tiny_gguf(tmp_path / "p.gguf", arch="clip", extra={"clip.has_vision_encoder": True})
    import_model(server.store, "seer", tmp_path / "m.gguf", tmp_path / "p.gguf")
    import_model(server.store, "blind", tmp_path / "m.gguf")

    def requests():
        return [json.loads(x) for x in record.read_text().splitlines()] if record.exists() else []
    server.requests = requests
    return server


def sent(server):
    """The last /completion request the engine got: (prompt_string with the marker as <M>, images)."""
    req = server.requests()[-1]
    assert req["path"] == "/completion" and "--mmproj" in req["argv"]
    marker = req["marker"]
    assert marker.startswith("<__ollama_media_") and len(marker) > 40      # pinned and unguessable
    prompt = req["body"]["prompt"]
    return prompt["prompt_string"].replace(marker, "<M>"), [base64.b64decode(d) for d in prompt["multimodal_data"]]


@pytest.mark.parametrize("stream", [False, True])
def test_generate_sends_the_images_with_markers(vision, stream):
    status, lines = post(vision, "/api/generate", {"model": "seer", "prompt": "what is it?", "stream": stream,
                                                   "images": [b64(PNG), b64(JPEG)]})
    assert status == 200, lines
    assert "".join(x["response"] for x in lines) == "a cat"
    assert sent(vision) == ("<user><M><M>what is it?<assistant>", [PNG, JPEG])


def test_chat_places_images_per_message_and_at_img(vision):
    messages = [{"role": "user", "content": "first", "images": [b64(PNG)]},
                {"role": "assistant", "content": "ok"},
                {"role": "user", "content": "compare [img] with it", "images": [b64(JPEG)]}]
    status, lines = post(vision, "/api/chat", {"model": "seer", "messages": messages, "stream": False})
    assert status == 200, lines
    assert lines[-1]["message"]["content"] == "a cat"
    assert sent(vision) == ("<user><M>first<assistant>ok<user>compare <M> with it<assistant>", [PNG, JPEG])


def test_typed_tags_and_markers_are_only_text(vision):
    """A user's own "[img-5]" names no image, and nothing typed can be the (secret) engine marker."""
    status, _ = post(vision, "/api/chat", {"model": "seer", "stream": False, "messages": [
        {"role": "user", "content": "[img-5] <__media__>", "images": [b64(PNG)]}]})
    assert status == 200
    assert sent(vision) == ("<user><M>[img-5] <__media__><assistant>", [PNG])


def test_raw_generate_uses_the_callers_tags_or_leads_with_them(vision):
    post(vision, "/api/generate", {"model": "seer", "raw": True, "prompt": "look: [img-1] and", "stream": False,
                                   "images": [b64(PNG), b64(JPEG)]})
    assert sent(vision) == ("<M>look: <M> and", [PNG, JPEG])


@pytest.mark.parametrize("url", ["data:image/png;base64," + b64(PNG), "data:;base64," + b64(PNG)])
def test_openai_image_url_reaches_the_engine(vision, url):
    status, lines = post(vision, "/v1/chat/completions", {"model": "seer", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is it?"}, {"type": "image_url", "image_url": {"url": url}}]}]})
    assert status == 200, lines
    assert lines[-1]["choices"][0]["message"]["content"] == "a cat"
    prompt, images = sent(vision)
    assert images == [PNG] and prompt.count("<M>") == 1 and "what is it?" in prompt


@pytest.mark.parametrize("path, body", [
    ("/api/generate", {"prompt": "x", "images": [b64(PNG)]}),
    ("/api/chat", {"messages": [{"role": "user", "content": "x", "images": [b64(PNG)]}]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + b64(PNG)}}]}]}),
])
def test_no_projector_is_ollamas_400_and_the_engine_never_sees_it(vision, path, body):
    status, lines = post(vision, path, dict(body, model="blind", stream=False))
    assert status == 400
    err = lines[-1]["error"]
    assert (err["message"] if isinstance(err, dict) else err) == "this model is missing data required for image input"
    assert vision.requests() == []


def test_bad_base64_is_gos_400(vision):
    status, lines = post(vision, "/api/generate", {"model": "seer", "prompt": "x", "images": ["iVBO!!"],
                                                   "stream": False})
    assert status == 400 and lines[-1]["error"] == "illegal base64 data at input byte 4"
    assert vision.requests() == []


def test_debug_render_counts_images(vision):
    status, lines = post(vision, "/api/chat", {"model": "seer", "_debug_render_only": True, "messages": [
        {"role": "user", "content": "x", "images": [b64(PNG), b64(JPEG)]}]})
    assert status == 200 and lines[-1]["_debug_info"]["image_count"] == 2
