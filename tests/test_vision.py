"""Vision: images reach llama-server's multimodal input (/completion's prompt_string + multimodal_data,
with the media marker pinned through LLAMA_MEDIA_MARKER) on /api/generate, /api/chat and
/v1/chat/completions; a model without a projector is a 400 with Ollama's text.

Two engines. A recording fake "llama-server" (fault-injection style) pins down the exact request: the
marker's placement, image order, [img-N] tags. The real llama-server runs a model created from the tiny
llama GGUF plus a tiny random-weight LLaVA-style projector (fixtures.write_tiny_mmproj): there each image
costs exactly the projector's (image_size / patch_size)**2 prompt tokens, and the next-token
distribution follows the pixels (red and blue differ, red twice is the same), through every endpoint and
the official ollama client."""
import base64
import json
import re
import struct
import subprocess
import sys
import zlib

import pytest

import fixtures
import ollama
from test_embed import official_ollama
from test_inference import post
from test_models_api import upload
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
    write_tiny_gguf(tmp_path / "p.gguf", arch="clip",
                    extra={"clip.has_vision_encoder": True, "clip.projector_type": "mlp"})
    import_model(server.store, "seer", tmp_path / "m.gguf", tmp_path / "p.gguf")
    import_model(server.store, "blind", tmp_path / "m.gguf")

    def requests():
        return [json.loads(x) for x in record.read_text().splitlines()] if record.exists() else []
    server.engine_requests = requests          # (not .requests: the server counts its requests there)
    return server


def sent(server):
    """The last /completion request the engine got: (prompt_string with the marker as <M>, images)."""
    req = server.engine_requests()[-1]
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
    assert vision.engine_requests() == []


def test_bad_base64_is_gos_400(vision):
    status, lines = post(vision, "/api/generate", {"model": "seer", "prompt": "x", "images": ["iVBO!!"],
                                                   "stream": False})
    assert status == 400 and lines[-1]["error"] == "illegal base64 data at input byte 4"
    assert vision.engine_requests() == []


def test_debug_render_counts_images(vision):
    status, lines = post(vision, "/api/chat", {"model": "seer", "_debug_render_only": True, "messages": [
        {"role": "user", "content": "x", "images": [b64(PNG), b64(JPEG)]}]})
    assert status == 200 and lines[-1]["_debug_info"]["image_count"] == 2


def encode_png(rows):
    """A real PNG (truecolour, 8 bits, filter 0 rows) of `rows` of RGB bytes, written with zlib."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    head = struct.pack(">IIBBBBB", len(rows[0]) // 3, len(rows), 8, 2, 0, 0, 0)
    data = zlib.compress(b"".join(b"\x00" + r for r in rows))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", head) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


# -- WebP: converted to PNG before the engine sees it (llama.cpp's loader has no WebP) ---------------

def real_png(width=5, height=3):
    """A real RGB PNG of a gradient, and its pixels as rows of bytes."""
    rows = [b"".join(bytes((x * 50 % 256, y * 80 % 256, 200)) for x in range(width)) for y in range(height)]
    return encode_png(rows), rows


def png_pixels(png):
    """(width, height, rows) of an 8-bit RGB or RGBA PNG, its five row filters undone."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, head = 8, b"", None
    while pos < len(png):
        (n,), kind = struct.unpack(">I", png[pos:pos + 4]), png[pos + 4:pos + 8]
        data = png[pos + 8:pos + 8 + n]
        head = data if kind == b"IHDR" else head
        idat += data if kind == b"IDAT" else b""
        pos += 12 + n
    width, height, depth, color = struct.unpack(">IIBB", head[:10])
    assert depth == 8 and color in (2, 6)
    bpp = 3 if color == 2 else 4
    raw, rows, prev = zlib.decompress(idat), [], bytes(width * bpp)
    for y in range(height):
        line = raw[y * (width * bpp + 1):(y + 1) * (width * bpp + 1)]
        kind, cur = line[0], bytearray(line[1:])
        for i in range(len(cur)):
            a, b, c = (cur[i - bpp] if i >= bpp else 0), prev[i], (prev[i - bpp] if i >= bpp else 0)
            p = a + b - c
            pred = (0, a, b, (a + b) // 2, a if abs(p - a) <= abs(p - b) and abs(p - a) <= abs(p - c)
                    else b if abs(p - b) <= abs(p - c) else c)[kind]
            cur[i] = (cur[i] + pred) & 0xFF
        prev = bytes(cur)
        rows.append(b"".join(prev[i:i + 3] for i in range(0, len(prev), bpp)))    # RGB, alpha dropped
    return width, height, rows


def cwebp(tmp_path, png, lossless):
    """A real WebP of `png`, written by libwebp's cwebp (.ci/run installs Debian's webp)."""
    src, out = tmp_path / "in.png", tmp_path / "out.webp"
    src.write_bytes(png)
    subprocess.run(["cwebp", "-quiet"] + (["-lossless"] if lossless else []) + [str(src), "-o", str(out)], check=True)
    return out.read_bytes()


@pytest.mark.parametrize("lossless", [True, False])
@pytest.mark.parametrize("path", ["/api/generate", "/api/chat", "/v1/chat/completions"])
def test_webp_reaches_the_engine_as_png(vision, tmp_path, path, lossless):
    png, rows = real_png()
    webp = cwebp(tmp_path, png, lossless)
    assert webp[:4] == b"RIFF" and webp[8:12] == b"WEBP"
    body = {"/api/generate": {"prompt": "x", "images": [b64(webp)]},
            "/api/chat": {"messages": [{"role": "user", "content": "x", "images": [b64(webp)]}]},
            "/v1/chat/completions": {"messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "data:image/webp;base64," + b64(webp)}}]}]}}[path]
    status, lines = post(vision, path, dict(body, model="seer", stream=False))
    assert status == 200, lines
    _, images = sent(vision)
    width, height, got = png_pixels(images[0])
    assert (width, height) == (5, 3)
    if lossless:
        assert got == rows


def test_webp_without_dwebp_is_a_400_that_says_what_to_install(vision, tmp_path, monkeypatch):
    webp = cwebp(tmp_path, real_png()[0], True)
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    status, lines = post(vision, "/api/generate", {"model": "seer", "prompt": "x", "images": [b64(webp)],
                                                   "stream": False})
    assert status == 400 and "need libwebp's dwebp on PATH (apt install webp" in lines[-1]["error"]
    assert vision.engine_requests() == []


@pytest.mark.parametrize("webp, error", [
    (b"RIFF\x00\x00\x00\x00WEBPVP8X" + bytes(8) + (19999).to_bytes(3, "little") * 2,
     "decode WebP image: 20000x20000 is more than 33554432 pixels"),
    (b"RIFF\x00\x00\x00\x00WEBPJUNK" + bytes(20), "decode WebP image: unknown WebP header"),
    (b"RIFF\x20\x00\x00\x00WEBPVP8L\x10\x00\x00\x00\x2f" + bytes(20), "decode WebP image: "),
])
def test_a_webp_too_big_or_broken_is_a_400(vision, webp, error):
    status, lines = post(vision, "/api/chat", {"model": "seer", "stream": False, "messages": [
        {"role": "user", "content": "x", "images": [b64(webp)]}]})
    assert status == 400 and lines[-1]["error"].startswith(error), lines
    assert vision.engine_requests() == []
# -- the real engine: a tiny random-weight projector (fixtures.write_tiny_mmproj) ---------------------

TEMPLATE = "{{ range .Messages }}<{{ .Role }}>{{ .Content }}{{ end }}<assistant>"


def png(rgb, width=20, height=12):
    """A real PNG of one colour; mtmd decodes and resizes it."""
    return encode_png([bytes(rgb) * width] * height)


RED, BLUE = png((200, 30, 30)), png((30, 30, 200))
GREEDY = {"temperature": 0, "seed": 1, "num_predict": 2}


@pytest.fixture(scope="module")
def projector(tmp_path_factory):
    return fixtures.write_tiny_mmproj(tmp_path_factory.mktemp("mmproj") / "mmproj.gguf")


def image_tokens(projector):
    """The context positions one image takes, from the projector's own hparams: an "mlp" (LLaVA)
    projector resizes every image to image_size squared and yields one embedding per patch."""
    kv = ollama.read_gguf(projector).kv
    assert kv["clip.projector_type"] == "mlp"
    return (kv["clip.vision.image_size"] // kv["clip.vision.patch_size"]) ** 2


def first_token(entries):
    """The model's distribution for the first answer token, as (token, logprob to 1e-3) pairs: on
    random weights a greedy answer hardly moves with an image, these numbers do."""
    return [(t["token"], round(t["logprob"], 3)) for t in entries[0]["top_logprobs"]]


@pytest.fixture
def looker(engine, server, tiny_gguf, projector):
    """`looker`, created through /api/create from the tiny llama GGUF and the tiny projector (so
    create's own projector detection makes the layer), served by the real llama-server."""
    server.scheduler.exe = str(engine)
    files = {"model.gguf": upload(server, tiny_gguf.read_bytes()),
             "mmproj.gguf": upload(server, projector.read_bytes())}
    status, lines = post(server, "/api/create", {"model": "looker", "files": files, "template": TEMPLATE,
                                                 "stream": False})
    assert status == 200, lines
    server.per_image = image_tokens(projector)
    return server


def generate(server, images, **body):
    status, lines = post(server, "/api/generate", dict({
        "model": "looker", "prompt": "describe this", "stream": False, "options": GREEDY,
        "logprobs": True, "top_logprobs": 5, "images": [b64(i) for i in images]}, **body))
    assert status == 200, lines
    return lines[-1]["prompt_eval_count"], first_token(lines[-1]["logprobs"])


def test_real_engine_create_stores_the_projector_and_show_says_vision(looker):
    status, lines = post(looker, "/api/show", {"model": "looker"})
    assert status == 200
    assert "vision" in lines[0]["capabilities"]
    assert lines[0]["projector_info"]["clip.projector_type"] == "mlp"


def test_real_engine_generate_turns_each_image_into_its_patch_tokens(looker):
    """Raw: the image markers lead the text, so the text tokenizes alike with or without them and
    prompt_eval_count grows by exactly the projector's tokens per image."""
    counts = [generate(looker, images, raw=True)[0] for images in ([], [RED], [RED, BLUE])]
    assert counts[1] - counts[0] == looker.per_image
    assert counts[2] - counts[1] == looker.per_image


def test_real_engine_a_prompt_sharing_only_the_first_of_two_adjacent_images(looker):
    """llama-server's prompt cache cannot keep [red] of a cached [red][blue] (its "Chunk not found",
    for good, on that slot): ollama.py evaluates such a prompt afresh, and the cache works after."""
    two = generate(looker, [RED, BLUE], raw=True)
    one = generate(looker, [RED], raw=True)
    assert two[0] - one[0] == looker.per_image
    assert generate(looker, [RED], raw=True) == one
    assert generate(looker, [RED, BLUE], raw=True) == two


def test_real_engine_answer_depends_on_the_pixels(looker):
    """The same image gives the same next-token distribution, another colour another one: the pixels
    themselves (not only a marker) went through the vision tower into the model."""
    red, red_again, blue = (generate(looker, [i])[1] for i in (RED, RED, BLUE))
    assert red == red_again
    assert red != blue


@pytest.mark.parametrize("stream", [False, True])
def test_real_engine_chat_counts_message_images_and_sees_them(looker, stream):
    def chat(images):
        status, lines = post(looker, "/api/chat", {
            "model": "looker", "stream": stream, "options": GREEDY, "logprobs": True, "top_logprobs": 5,
            "messages": [{"role": "user", "content": "what is it?", "images": [b64(i) for i in images]}]})
        assert status == 200, lines
        assert lines[-1]["done"] and lines[-1]["message"]["role"] == "assistant"
        return lines[-1]["prompt_eval_count"], first_token([e for x in lines for e in x.get("logprobs") or []])
    (one, red), (two, _), (_, blue) = chat([RED]), chat([RED, BLUE]), chat([BLUE])
    assert two - one == looker.per_image
    assert red != blue


def test_real_engine_openai_image_url_is_the_chat_of_its_parts(looker):
    """/v1 makes each content part its own user message (as Ollama does): the engine then counts and
    answers exactly as for that /api/chat, whose image counting is proven above."""
    def complete(*images):
        content = [{"type": "text", "text": "what is it?"}]
        content += [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + b64(i)}} for i in images]
        status, lines = post(looker, "/v1/chat/completions", {
            "model": "looker", "temperature": 0, "seed": 1, "max_tokens": 2, "logprobs": True, "top_logprobs": 5,
            "messages": [{"role": "user", "content": content}]})
        assert status == 200, lines
        return lines[-1]["usage"]["prompt_tokens"], first_token(lines[-1]["choices"][0]["logprobs"]["content"])

    def chat(*images):
        messages = [{"role": "user", "content": "what is it?"}]
        messages += [{"role": "user", "content": "", "images": [b64(i)]} for i in images]
        status, lines = post(looker, "/api/chat", {"model": "looker", "stream": False, "options": GREEDY,
                                                   "logprobs": True, "top_logprobs": 5, "messages": messages})
        assert status == 200, lines
        return lines[-1]["prompt_eval_count"], first_token(lines[-1]["logprobs"])
    assert complete(RED) == chat(RED)
    assert complete(RED, BLUE) == chat(RED, BLUE)
    assert complete(RED, BLUE)[0] > complete(RED)[0] + looker.per_image    # a message's role tags, then the image
    assert complete(RED)[1] != complete(BLUE)[1]


def test_real_engine_through_the_official_ollama_client(looker):
    out = official_ollama(looker, """
        import base64
        red, blue = base64.b64decode(%r), base64.b64decode(%r)
        kw = dict(options=%r, logprobs=True, top_logprobs=5)
        def first(r):
            return [[t.token, round(t.logprob, 3)] for t in r.logprobs[0].top_logprobs]
        g = [client.generate(model="looker", prompt="describe this", raw=True, images=imgs, **kw)
             for imgs in ([red], [red, blue])]
        c = [client.chat(model="looker", messages=[{"role": "user", "content": "what is it?", "images": [img]}], **kw)
             for img in (red, blue)]
        print(json.dumps({"generate": [[x.prompt_eval_count, first(x)] for x in g], "chat": [first(x) for x in c]}))
    """ % (b64(RED), b64(BLUE), GREEDY))
    ours = [list(generate(looker, images, raw=True)) for images in ([RED], [RED, BLUE])]
    assert out["generate"] == [[n, [list(t) for t in top]] for n, top in ours]
    assert ours[1][0] - ours[0][0] == looker.per_image
    assert out["chat"][0] != out["chat"][1]


# -- the CLI: `run` takes image paths from the prompt, as Ollama's does -------------------------------

def test_extract_images_reads_named_files_and_cuts_their_paths(tmp_path, capsys):
    (tmp_path / "a cat.png").write_bytes(RED)
    (tmp_path / "dog.jpg").write_bytes(JPEG)
    text, images = ollama.extract_images("compare %s/a\\ cat.png with '%s/dog.jpg' and /no/such.png" % (
        tmp_path, tmp_path))
    assert text == "compare  with  and /no/such.png"               # a path that names no file stays text
    assert [base64.b64decode(i) for i in images] == [RED, JPEG]
    assert capsys.readouterr().err == "Added image '%s/a cat.png'\nAdded image '%s/dog.jpg'\n" % (tmp_path, tmp_path)
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(ollama.OllamaError, match="^invalid file type: text/plain; charset=utf-8$"):
        ollama.extract_images("see %s/notes.png" % tmp_path)


def test_cli_run_sends_the_image_a_prompt_names(looker, tmp_path):
    from test_cli_run import cli
    (tmp_path / "red.png").write_bytes(RED)
    r = cli("run", "looker", "describe this %s/red.png" % tmp_path, "--verbose")
    assert r.returncode == 0, r.stderr
    assert "Added image '%s/red.png'" % tmp_path in r.stderr
    count = int(re.search(r"prompt eval count:\s+(\d+) token", r.stderr).group(1))
    status, lines = post(looker, "/api/generate", {"model": "looker", "prompt": "describe this", "stream": False,
                                                   "images": [b64(RED)], "options": {"num_predict": 1}})
    assert status == 200 and lines[-1]["prompt_eval_count"] == count    # the path cut, the image sent
