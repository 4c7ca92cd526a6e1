"""Model management API against a real server: blobs, create, tags, show, copy, delete."""
import errno
import hashlib
import http.client
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

import ollama
from tiny_gguf import write_tiny_gguf


def call(server, method, path, body=None, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", server.server_port, timeout=30)
    if isinstance(body, (dict, list)):
        body = json.dumps(body).encode()
    conn.request(method, path, body=body, headers=headers or {})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, data


def jcall(server, method, path, body=None, headers=None):
    status, data = call(server, method, path, body, headers)
    return status, (json.loads(data) if data.strip() and data[:1] in b"{[" else data)


def lines(data):
    return [json.loads(x) for x in data.splitlines() if x.strip()]


def upload(server, data):
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    status, _ = call(server, "POST", "/api/blobs/" + digest, data)
    assert status in (200, 201)
    return digest


def gguf_bytes(tmp_path, **kw):
    path = tmp_path / ("w%d.gguf" % len(os.listdir(tmp_path)))
    write_tiny_gguf(path, **kw)
    return path.read_bytes()


def create(server, body):
    status, data = call(server, "POST", "/api/create", body)
    return status, data


def blobs(server):
    d = server.store.blobs
    return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


def assert_consistent(store):
    """Every manifest's blobs exist, and every blob's bytes match its name."""
    for name, _raw, manifest, _ in store.list():
        for digest in ollama.manifest_digests(manifest):
            assert store.has_blob(digest), (name, digest)
    for p in store.blobs.iterdir() if store.blobs.is_dir() else []:
        if p.name.startswith("sha256-") and len(p.name) == 71:
            assert hashlib.sha256(p.read_bytes()).hexdigest() == p.name[7:]


# -- blobs -------------------------------------------------------------------

def test_blob_upload_created_then_exists_then_head(server):
    data = b"some bytes"
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    assert call(server, "HEAD", "/api/blobs/" + digest)[0] == 404
    assert call(server, "POST", "/api/blobs/" + digest, data)[0] == 201
    assert call(server, "POST", "/api/blobs/" + digest, data)[0] == 200
    assert call(server, "HEAD", "/api/blobs/" + digest)[0] == 200
    assert server.store.blob_path(digest).read_bytes() == data
    assert oct(server.store.blob_path(digest).stat().st_mode & 0o777) == "0o644"


def test_blob_digest_mismatch_is_400_and_nothing_is_stored(server):
    wrong = "sha256:" + "0" * 64
    status, body = jcall(server, "POST", "/api/blobs/" + wrong, b"hello")
    got = "sha256:" + hashlib.sha256(b"hello").hexdigest()
    assert status == 400
    assert body == {"error": 'digest mismatch, expected "%s", got "%s"' % (wrong, got)}
    assert blobs(server) == []


def test_blob_invalid_digest_is_400(server):
    status, body = jcall(server, "HEAD", "/api/blobs/sha256:abc")
    assert status == 400
    status, body = jcall(server, "POST", "/api/blobs/md5:" + "0" * 32, b"x")
    assert status == 400 and body == {"error": "invalid digest format"}


def test_full_disk_while_writing_a_blob_leaves_store_unchanged(server, monkeypatch):
    real = ollama.Store.temp_blob

    class Full:
        def __init__(self, f):
            self.f, self.n = f, 0

        def write(self, data):
            self.n += len(data)
            if self.n > 1000:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def temp_blob(store):
        f, path = real(store)
        return Full(f), path

    monkeypatch.setattr(ollama.Store, "temp_blob", temp_blob)
    data = os.urandom(5000)
    status, body = jcall(server, "POST", "/api/blobs/sha256:" + hashlib.sha256(data).hexdigest(), data)
    assert status == 500 and "No space left on device" in body["error"]
    assert blobs(server) == []


def test_local_path_import_links_the_file_without_copying(server, tmp_path):
    path = tmp_path / "w.gguf"
    write_tiny_gguf(path)
    digest = "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    status, _ = call(server, "POST", "/api/blobs/" + digest, b"", {"X-Ollama-Path": str(path)})
    assert status == 201
    blob = server.store.blob_path(digest)
    assert blob.read_bytes() == path.read_bytes()
    assert os.path.samestat(blob.stat(), path.stat())         # a hard link: same inode
    assert [n for n in blobs(server) if "tmp" in n] == []


@pytest.mark.parametrize("owner,mode", [("self", 0o664), ("self", 0o646), ("nobody", 0o644)])
def test_local_path_import_copies_a_file_another_user_could_rewrite(server, tmp_path, owner, mode):
    if owner == "nobody" and os.geteuid() != 0:
        pytest.skip("needs root to give a file to another user")
    path = tmp_path / "w.gguf"
    write_tiny_gguf(path)
    os.chmod(path, mode)
    if owner == "nobody":
        os.chown(path, NOBODY, NOBODY)
    digest = "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    status, _ = call(server, "POST", "/api/blobs/" + digest, b"", {"X-Ollama-Path": str(path)})
    assert status == 201
    blob = server.store.blob_path(digest)
    assert blob.read_bytes() == path.read_bytes()
    assert not os.path.samestat(blob.stat(), path.stat())     # a copy: rewriting the file leaves the blob
    assert blob.stat().st_uid == os.geteuid()
    assert [n for n in blobs(server) if "tmp" in n] == []


def test_local_path_import_refuses_a_file_with_other_bytes(server, tmp_path):
    path = tmp_path / "w.gguf"
    path.write_bytes(b"not what you said")
    wrong = "sha256:" + "1" * 64
    status, body = jcall(server, "POST", "/api/blobs/" + wrong, b"", {"X-Ollama-Path": str(path)})
    assert status == 400 and body["error"] == 'digest mismatch, expected "%s"' % wrong   # no real digest
    assert blobs(server) == []
    status, body = jcall(server, "POST", "/api/blobs/" + wrong, b"", {"X-Ollama-Path": str(tmp_path / "nope")})
    assert status == 400 and "cannot read" in body["error"]


NOBODY = 65534
#: A Python another user can run (the test's own interpreter may live under root's 0700 home).
SYSTEM_PYTHON = shutil.which("python3", path="/usr/bin:/bin")
needs_root = pytest.mark.skipif(os.geteuid() != 0 or not SYSTEM_PYTHON or not os.path.isdir("/proc/net"),
                                reason="needs root (to run a client as nobody), /usr/bin/python3 and /proc")

_ATTACK = """
import http.client, json, sys
port, secret, missing, real = sys.argv[1:]
out = []
for path, digest in ((secret, "sha256:" + "1" * 64), (missing, "sha256:" + "1" * 64), (secret, real)):
    conn = http.client.HTTPConnection("127.0.0.1", int(port), timeout=30)
    conn.request("POST", "/api/blobs/" + digest, b"", {"X-Ollama-Path": path})
    resp = conn.getresponse()
    out.append([resp.status, resp.read().decode()])
print(json.dumps(out))
"""


@needs_root
def test_path_import_as_another_user_reads_nothing_and_reveals_nothing(server, tmp_path):
    secret = tmp_path / "id_ed25519"
    secret.write_bytes(b"root's private key")
    os.chmod(secret, 0o600)
    real = "sha256:" + hashlib.sha256(secret.read_bytes()).hexdigest()
    out = subprocess.run([SYSTEM_PYTHON, "-c", _ATTACK, str(server.server_port), str(secret),
                          str(tmp_path / "no-such-file"), real],
                         user=NOBODY, capture_output=True, text=True, timeout=60, cwd="/")
    assert out.returncode == 0, out.stderr
    answers = json.loads(out.stdout)
    assert [a[0] for a in answers] == [403, 403, 403]
    assert answers[0] == answers[1], "an existing and a missing file must answer alike"
    assert real[7:] not in out.stdout
    assert not server.store.has_blob(real) and blobs(server) == []


@needs_root
def test_create_as_another_user_falls_back_to_uploading(server):
    work = Path(tempfile.mkdtemp(prefix="ollama-nobody-"))
    try:
        os.chmod(work, 0o755)
        write_tiny_gguf(work / "w.gguf")
        (work / "Modelfile").write_text("FROM ./w.gguf\n")
        (work / "home").mkdir()
        shutil.copy(str(Path(ollama.__file__)), str(work / "ollama.py"))    # the checkout may be 0700 (CI's is)
        for p in (work, work / "w.gguf", work / "Modelfile", work / "home", work / "ollama.py"):
            os.chown(p, NOBODY, NOBODY)
        env = {"HOME": str(work / "home"), "OLLAMA_HOST": "127.0.0.1:%d" % server.server_port, "PATH": "/usr/bin:/bin"}
        out = subprocess.run([SYSTEM_PYTHON, str(work / "ollama.py"), "create", "tiny", "-f", "Modelfile"],
                             user=NOBODY, env=env, cwd=str(work), capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr
        digest = "sha256:" + hashlib.sha256((work / "w.gguf").read_bytes()).hexdigest()
        blob = server.store.blob_path(digest)
        assert blob.read_bytes() == (work / "w.gguf").read_bytes()
        assert not os.path.samestat(blob.stat(), (work / "w.gguf").stat()), "uploaded, not linked"
        assert server.store.resolve("tiny") is not None
    finally:
        shutil.rmtree(str(work), ignore_errors=True)


# -- create ------------------------------------------------------------------

def test_create_from_gguf_streams_ollamas_statuses(server, tmp_path):
    digest = upload(server, gguf_bytes(tmp_path))
    status, data = create(server, {"model": "tiny", "files": {"w.gguf": digest}, "system": "be brief"})
    assert status == 200
    statuses = [x["status"] for x in lines(data)]
    assert statuses[0] == "parsing GGUF"
    assert statuses[1] == "using existing layer %s" % digest
    assert statuses[2].startswith("creating new layer sha256:")
    assert statuses[-2:] == ["writing manifest", "success"]


def test_manifest_and_config_blob_match_ollamas_bytes(server, tmp_path):
    data = gguf_bytes(tmp_path, arch="llama", file_type=15)
    digest = upload(server, data)
    status, _ = create(server, {"model": "tiny", "files": {"w.gguf": digest},
                                "parameters": {"temperature": 0.7, "stop": ["<|eot_id|>"], "num_ctx": 4096}})
    assert status == 200
    raw = server.store.manifest_path(ollama.Name.parse("tiny")).read_bytes()
    params = b'{"num_ctx":4096,"stop":["\\u003c|eot_id|\\u003e"],"temperature":0.7}\n'
    params_digest = "sha256:" + hashlib.sha256(params).hexdigest()
    config = ('{"model_format":"gguf","model_family":"llama","model_families":["llama"],"model_type":"128",'
              '"file_type":"Q4_K_M","architecture":"amd64","os":"linux",'
              '"rootfs":{"type":"layers","diff_ids":["%s","%s"]}}\n' % (digest, params_digest)).encode()
    config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
    expected = ('{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json",'
                '"config":{"mediaType":"application/vnd.docker.container.image.v1+json","digest":"%s","size":%d},'
                '"layers":[{"mediaType":"application/vnd.ollama.image.model","digest":"%s","size":%d,"from":"w.gguf"},'
                '{"mediaType":"application/vnd.ollama.image.params","digest":"%s","size":%d}]}\n'
                % (config_digest, len(config), digest, len(data), params_digest, len(params))).encode()
    got, want = json.loads(raw), json.loads(expected)
    for key in want:                                          # field by field first, for readable failures
        assert got[key] == want[key], key
    assert server.store.blob_path(config_digest).read_bytes() == config
    assert server.store.blob_path(params_digest).read_bytes() == params
    assert raw == expected


def test_create_stream_false_returns_only_success(server, tmp_path):
    digest = upload(server, gguf_bytes(tmp_path))
    status, body = jcall(server, "POST", "/api/create", {"model": "t", "files": {"w.gguf": digest}, "stream": False})
    assert status == 200 and body == {"status": "success"}


@pytest.mark.parametrize("bad", ["a/../b", "../x", "/abs/model", "a\\b", "x\x00y", "a//b", "", "a/b/c/d",
                                 "bad name", "x:"])
def test_invalid_model_names_are_rejected(server, tmp_path, bad):
    digest = upload(server, gguf_bytes(tmp_path))
    status, body = jcall(server, "POST", "/api/create", {"model": bad, "files": {"w.gguf": digest}})
    assert status == 400 and body == {"error": "invalid model name"}
    status, body = jcall(server, "POST", "/api/show", {"model": bad or "x:"})
    assert status == 400 and body == {"error": "invalid model name"}
    status, body = jcall(server, "DELETE", "/api/delete", {"model": bad})
    assert status == 400 and body["error"].startswith("name ") and body["error"].endswith(" is invalid")
    assert not server.store.manifests.exists() or not any(server.store.manifests.rglob("*"))


def test_create_needs_from_or_files(server):
    status, body = jcall(server, "POST", "/api/create", {"model": "x"})
    assert status == 400 and body == {"error": "neither 'from' or 'files' was specified"}


@pytest.mark.parametrize("key", ["../w.gguf", "/etc/w.gguf", "a\\w.gguf", "c:w.gguf", "."])
def test_create_file_paths_must_be_relative(server, key):
    status, body = jcall(server, "POST", "/api/create", {"model": "x", "files": {key: "sha256:" + "a" * 64}})
    assert status == 400 and body["error"].startswith("file path must be relative")


def test_create_from_a_non_gguf_blob_is_400(server):
    digest = upload(server, b"just some text, not a model")
    status, body = jcall(server, "POST", "/api/create", {"model": "x", "files": {"notes.txt": digest}})
    assert status == 400 and body == {"error": "supplied file was not in GGUF format"}
    assert server.store.resolve("x") is None


def test_create_from_a_missing_blob_is_400(server):
    status, body = jcall(server, "POST", "/api/create", {"model": "x", "files": {"w.gguf": "sha256:" + "b" * 64}})
    assert status == 400 and "blob not found" in body["error"]


def test_create_from_a_model_that_is_not_stored_pulls_it(server):
    # the registry is a closed loopback port, so the pull (and with it the create) fails clearly
    status, data = call(server, "POST", "/api/create", {"model": "x", "from": "127.0.0.1:9/library/nosuch"})
    out = lines(data)
    assert status == 200 and out[0] == {"status": "pulling manifest"}
    assert out[-1]["error"].startswith("pull model manifest: ")
    assert not (server.store.manifests / "registry.ollama.ai" / "library" / "x").exists()


def test_create_from_local_model_reuses_layers_and_merges(server, tmp_path):
    digest = upload(server, gguf_bytes(tmp_path))
    create(server, {"model": "base", "files": {"w.gguf": digest}, "template": "{{ .Prompt }}!",
                    "system": "old", "parameters": {"temperature": 0.5, "top_k": 10},
                    "messages": [{"role": "user", "content": "hi"}], "license": "MIT"})
    status, data = create(server, {"model": "child", "from": "base", "system": "new",
                                   "parameters": {"temperature": 0.9}, "license": ["Apache", "BSD"]})
    assert status == 200
    child = ollama.load_model(server.store, "child")
    assert child.system == "new" and child.template == "{{ .Prompt }}!"
    assert child.params == {"temperature": 0.9, "top_k": 10}
    assert child.messages == [{"role": "user", "content": "hi"}]
    assert child.license == ["MIT", "Apache", "BSD"]
    model_layer = [la for la in child.manifest["layers"] if la["mediaType"].endswith(".model")][0]
    assert model_layer == {"mediaType": "application/vnd.ollama.image.model", "digest": digest,
                           "size": model_layer["size"], "from": "base:latest"}
    assert "using existing layer %s" % digest in [x["status"] for x in lines(data)]
    status, _ = create(server, {"model": "child2", "from": "base", "messages": [{"role": "user", "content": "yo"}]})
    assert ollama.load_model(server.store, "child2").messages == [{"role": "user", "content": "yo"}]


def test_recreating_a_model_removes_its_orphaned_blobs(server, tmp_path):
    digest = upload(server, gguf_bytes(tmp_path))
    create(server, {"model": "m", "files": {"w.gguf": digest}, "system": "first"})
    first = set(ollama.manifest_digests(server.store.get("m")[2]))
    create(server, {"model": "m", "files": {"w.gguf": digest}, "system": "second"})
    second = set(ollama.manifest_digests(server.store.get("m")[2]))
    for d in first - second:
        assert not server.store.has_blob(d)
    assert server.store.has_blob(digest)
    assert_consistent(server.store)


def test_two_creates_of_the_same_name_at_once_both_finish(server, tmp_path):
    digest = upload(server, gguf_bytes(tmp_path))
    results = []

    def run(i):
        results.append(create(server, {"model": "same", "files": {"w.gguf": digest}, "system": "v%d" % i,
                                       "stream": False}))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert [r[0] for r in results] == [200] * 4
    assert ollama.load_model(server.store, "same").system in {"v0", "v1", "v2", "v3"}
    assert_consistent(server.store)
    referenced = {ollama.parse_digest(d).replace(":", "-") for d in server.store.referenced()}
    assert set(blobs(server)) == referenced                  # the losers' layers were pruned


# -- tags, show, copy, delete -------------------------------------------------

def test_tags_lists_models_newest_first_with_details(server, tmp_path):
    digest = upload(server, gguf_bytes(tmp_path))
    create(server, {"model": "older", "files": {"w.gguf": digest}})
    create(server, {"model": "me/newer:v1", "files": {"w.gguf": digest}})
    os.utime(server.store.manifest_path(ollama.Name.parse("older")), (1_600_000_000, 1_600_000_000))
    status, body = jcall(server, "GET", "/api/tags")
    assert status == 200
    names = [m["name"] for m in body["models"]]
    assert names == ["me/newer:v1", "older:latest"]
    m = body["models"][1]
    raw = server.store.manifest_path(ollama.Name.parse("older")).read_bytes()
    manifest = json.loads(raw)
    assert m["model"] == "older:latest" and m["digest"] == hashlib.sha256(raw).hexdigest()
    assert m["size"] == sum(la["size"] for la in manifest["layers"]) + manifest["config"]["size"]
    assert m["details"] == {"parent_model": "", "format": "gguf", "family": "llama", "families": ["llama"],
                            "parameter_size": "128", "quantization_level": "Q4_K_M",
                            "context_length": 2048, "embedding_length": 16}      # from the GGUF, as Ollama
    assert m["capabilities"] == ["completion"]
    assert m["modified_at"].startswith("2020-09-1")


def test_create_refuses_a_template_that_does_not_parse(server, tmp_path):
    digest = upload(server, gguf_bytes(tmp_path))
    status, err = jcall(server, "POST", "/api/create", {"model": "x", "files": {"w.gguf": digest},
                                                         "template": "{{ .Prompt"})
    assert status == 400 and err["error"].startswith("template error: template: ")
    assert server.store.resolve(ollama.Name.parse("x")) is None


def test_suffix_needs_a_model_that_can_insert(server, tmp_path):
    digest = upload(server, gguf_bytes(tmp_path))
    create(server, {"model": "plain", "files": {"w.gguf": digest}, "template": "{{ .Prompt }}"})
    status, err = jcall(server, "POST", "/api/generate", {"model": "plain", "prompt": "def f(", "suffix": "return 1"})
    assert (status, err) == (400, {"error": '"plain" does not support insert'})


@pytest.mark.parametrize("value, noprune", [("", False), ("0", False), ("false", False), ("F", False),
                                             ("1", True), ("true", True), ("yes", True)])
def test_boolean_settings_read_like_go_parsebool(value, noprune):
    config = ollama.Config({"HOME": "/nonexistent", "OLLAMA_NOPRUNE": value, "OLLAMA_NOHISTORY": value,
                            "OLLAMA_FLASH_ATTENTION": value})
    assert config.noprune is noprune and config.nohistory is noprune
    assert config.flash_attention is (None if value == "" else noprune)    # unset: llama-server's auto
    args = ollama.Runner("llama-server", "m.gguf", flash_attention=config.flash_attention).args
    assert ("--flash-attn" in args) is (value != "") and args[-1] != "--flash-attn"


def test_show_reports_modelfile_parameters_and_metadata(server, tmp_path):
    digest = upload(server, gguf_bytes(tmp_path))
    create(server, {"model": "s", "files": {"w.gguf": digest}, "system": "You are\nhelpful",
                    "template": "{{ if .Tools }}{{ .Tools }}{{ end }}{{ .Prompt }}{{ .Suffix }}",
                    "parameters": {"stop": ["<a>", "<b>"], "temperature": 0.7, "num_ctx": 4096},
                    "messages": [{"role": "user", "content": "hello"}], "license": "MIT"})
    status, body = jcall(server, "POST", "/api/show", {"model": "s"})
    assert status == 200
    blob = str(server.store.blob_path(digest))
    assert body["modelfile"] == (
        '# Modelfile generated by "ollama show"\n# To build a new Modelfile based on this, replace FROM with:\n'
        '# FROM s:latest\n\nFROM %s\nTEMPLATE {{ if .Tools }}{{ .Tools }}{{ end }}{{ .Prompt }}{{ .Suffix }}\n'
        'SYSTEM "You are\nhelpful"\nPARAMETER num_ctx 4096\nPARAMETER stop <a>\nPARAMETER stop <b>\n'
        'PARAMETER temperature 0.7\nLICENSE MIT\nMESSAGE user hello\n' % blob)
    assert body["parameters"] == ('num_ctx                        4096\nstop                           "<a>"\n'
                                  'stop                           "<b>"\ntemperature                    0.7')
    assert body["system"] == "You are\nhelpful" and body["license"] == "MIT"
    assert body["details"]["parent_model"] == "w.gguf" and body["details"]["quantization_level"] == "Q4_K_M"
    assert body["messages"] == [{"role": "user", "content": "hello"}]
    assert body["model_info"]["general.architecture"] == "llama"
    assert body["model_info"]["tokenizer.ggml.tokens"] == []
    assert "general.name" not in body["model_info"]
    assert body["tensors"][0] == {"name": "token_embd.weight", "type": "F32", "shape": [16, 6]}   # as Ollama: always
    assert body["capabilities"] == ["completion", "tools", "insert"]
    status, verbose = jcall(server, "POST", "/api/show", {"model": "S", "verbose": True})
    assert len(verbose["model_info"]["tokenizer.ggml.tokens"]) == 6
    assert verbose["tensors"][0] == {"name": "token_embd.weight", "type": "F32", "shape": [16, 6]}


def test_show_defaults_and_embedding_capability(server, tmp_path):
    digest = upload(server, gguf_bytes(tmp_path, arch="bert", extra={"bert.pooling_type": 1}))
    create(server, {"model": "emb", "files": {"w.gguf": digest}})
    status, body = jcall(server, "POST", "/api/show", {"model": "emb"})
    assert body["template"] == "{{ .Prompt }}" and body["capabilities"] == ["embedding"]
    assert "parameters" not in body and "system" not in body


def test_show_unknown_model_is_404_and_empty_is_400(server):
    assert jcall(server, "POST", "/api/show", {"model": "ghost"}) == (404, {"error": "model 'ghost' not found"})
    assert jcall(server, "POST", "/api/show", {}) == (400, {"error": "model is required"})


def test_copy_is_byte_for_byte_and_reports_errors(server, tmp_path):
    digest = upload(server, gguf_bytes(tmp_path))
    create(server, {"model": "src", "files": {"w.gguf": digest}})
    status, body = call(server, "POST", "/api/copy", {"source": "src", "destination": "me/dst:v2"})
    assert status == 200 and body == b""
    store = server.store
    assert store.manifest_path(ollama.Name.parse("me/dst:v2")).read_bytes() == \
        store.manifest_path(ollama.Name.parse("src")).read_bytes()
    assert jcall(server, "POST", "/api/copy", {"source": "ghost", "destination": "x"}) == \
        (404, {"error": 'model "ghost" not found'})
    assert jcall(server, "POST", "/api/copy", {"source": "a/../b", "destination": "x"}) == \
        (400, {"error": 'source "a/../b" is invalid'})
    assert jcall(server, "POST", "/api/copy", {"source": "src", "destination": "/abs"}) == \
        (400, {"error": 'destination "/abs" is invalid'})


def test_delete_keeps_shared_blobs_and_removes_the_rest(server, tmp_path):
    digest = upload(server, gguf_bytes(tmp_path))
    create(server, {"model": "a", "files": {"w.gguf": digest}, "system": "only in a"})
    create(server, {"model": "b", "files": {"w.gguf": digest}})
    digests = {n: set(ollama.manifest_digests(server.store.get(n)[2])) for n in ("a", "b")}
    only_a = digests["a"] - digests["b"]
    assert call(server, "DELETE", "/api/delete", {"model": "a"}) == (200, b"")
    assert server.store.has_blob(digest)
    assert not any(server.store.has_blob(d) for d in only_a)
    assert jcall(server, "DELETE", "/api/delete", {"model": "a"}) == (404, {"error": "model 'a' not found"})
    assert_consistent(server.store)


# -- create --quantize: llama-quantize from the engine build -----------------

def tiny_f32(server, gguf, name="tiny32"):
    """The tiny F32 model (64 wide, 32000-token vocab) created as `name`; returns its blob's digest."""
    digest = upload(server, gguf.read_bytes())
    status, data = create(server, {"model": name, "files": {"tiny.gguf": digest}, "stream": False})
    assert status == 200, data
    return digest


def model_blob(server, name):
    manifest = server.store.get(ollama.Name.parse(name))[2]
    layer = next(la for la in manifest["layers"] if la["mediaType"] == ollama.MEDIA_PREFIX + "model")
    return layer["digest"], layer["size"]


#: ggml type -> (bytes per block, weights per block)
BLOCKS = {"F32": (4, 1), "F16": (2, 1), "Q8_0": (34, 32), "Q5_0": (22, 32), "Q5_1": (24, 32), "Q4_0": (18, 32),
          "Q4_1": (20, 32), "Q4_K": (144, 256), "Q5_K": (176, 256), "Q6_K": (210, 256)}


@pytest.mark.parametrize("level, canonical, types", [
    ("q8_0", "Q8_0", {"Q8_0", "F32"}),
    # 64-wide tensors cannot hold 256-weight K blocks: llama-quantize falls back to Q5_0 and Q8_0
    ("q4_K_M", "Q4_K_M", {"Q5_0", "Q8_0", "F32"})])
def test_cli_create_quantizes_an_f32_model_that_then_generates(engine, server, tiny_f32_gguf, tmp_path, level,
                                                               canonical, types):
    import subprocess
    gguf = tmp_path / "tiny32.gguf"
    gguf.write_bytes(tiny_f32_gguf.read_bytes())     # a copy: the store may link it (no-copy import)
    (tmp_path / "Modelfile").write_text("FROM %s\n" % gguf)
    out = subprocess.run([sys.executable, os.path.join(os.path.dirname(ollama.__file__), "ollama.py"), "create",
                          "tinyq", "-q", level, "-f", str(tmp_path / "Modelfile")], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert "quantizing F32 model to %s" % canonical in out.stderr and "verifying conversion" in out.stderr
    digest, size = model_blob(server, "tinyq")
    g = ollama.read_gguf(server.store.blob_path(digest), 0)
    assert g.file_type == canonical and {t.type_name for t in g.tensors} == types
    # Smaller by what the tensor types say: the F32 weights' 4 bytes each become their blocks' bytes.
    weights = sum(t.elements * 4 for t in g.tensors)
    quantized = sum(t.elements // BLOCKS[t.type_name][1] * BLOCKS[t.type_name][0] for t in g.tensors)
    assert abs(size - (gguf.stat().st_size - weights + quantized)) < 0.01 * size
    assert size < 0.4 * gguf.stat().st_size
    status, shown = jcall(server, "POST", "/api/show", {"model": "tinyq"})
    assert status == 200 and shown["details"]["quantization_level"] == canonical
    status, data = call(server, "POST", "/api/generate", {"model": "tinyq", "prompt": "Hello", "stream": False,
                                                          "options": {"num_predict": 4, "temperature": 0}})
    assert status == 200 and json.loads(data)["eval_count"] == 4
    f32 = "sha256-" + hashlib.sha256(gguf.read_bytes()).hexdigest()
    assert f32 not in blobs(server)                    # the unquantized source is used by no model: gone
    assert not [b for b in blobs(server) if "tmp" in b]
    assert_consistent(server.store)


def test_official_client_create_quantizes_from_a_stored_model(engine, server, tiny_f32_gguf):
    from test_embed import official_ollama
    source = tiny_f32(server, tiny_f32_gguf)
    out = official_ollama(server, """
        statuses = [r.status for r in client.create(model="tiny-q4", from_="tiny32", quantize="q4_K_M", stream=True)]
        print(json.dumps({"statuses": statuses, "level": client.show("tiny-q4").details.quantization_level}))
    """)
    assert out["statuses"][0] == "quantizing F32 model to Q4_K_M" and out["statuses"][-1] == "success"
    assert "verifying conversion" in out["statuses"] and out["level"] == "Q4_K_M"
    assert model_blob(server, "tiny32")[0] == source and server.store.has_blob(source)   # still used: kept


def test_quantize_errors_are_ollamas(engine, server, tiny_f32_gguf):
    tiny_f32(server, tiny_f32_gguf)
    status, err = jcall(server, "POST", "/api/create", {"model": "x", "from": "tiny32", "quantize": "q9_z"})
    assert status == 400 and err["error"].startswith("unsupported quantization type Q9_Z - supported types are "
                                                      "F32, F16, BF16, Q8_0, Q6_K, Q5_K_M")
    status, _ = jcall(server, "POST", "/api/create", {"model": "tiny8", "from": "tiny32", "quantize": "Q8_0",
                                                       "stream": False})
    assert status == 200
    status, err = jcall(server, "POST", "/api/create", {"model": "x", "from": "tiny8", "quantize": "q4_K_M"})
    assert (status, err) == (400, {"error": "quantization is only supported for F16, BF16 and F32 models"})


def test_quantize_without_disk_space_says_so_and_leaves_nothing(engine, server, tiny_f32_gguf, monkeypatch):
    import shutil
    tiny_f32(server, tiny_f32_gguf)
    before = blobs(server)
    usage = shutil.disk_usage(str(server.store.blobs))
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=10 << 20))   # 10 MiB free
    status, err = jcall(server, "POST", "/api/create", {"model": "x", "from": "tiny32", "quantize": "q8_0"})
    assert status == 507 and err["error"].startswith("not enough disk space to quantize: about ")
    assert blobs(server) == before and server.store.resolve(ollama.Name.parse("x")) is None


def test_a_failing_quantize_leaves_no_temp_file_and_no_model(server, tiny_f32_gguf, tmp_path):
    # Fault injection: a llama-quantize that writes half a file and dies.
    exe_dir = tmp_path / "engine"
    exe_dir.mkdir()
    for name, body in (("llama-server", "exit 0"),
                       ("llama-quantize", 'printf half > "$2"; echo "[   1/  10] tensor" >&2; '
                                          'echo "error: out of cheese" >&2; exit 3')):
        (exe_dir / name).write_text("#!/bin/sh\n%s\n" % body)
        (exe_dir / name).chmod(0o755)
    server.config.llama_server = str(exe_dir / "llama-server")
    tiny_f32(server, tiny_f32_gguf)
    before = blobs(server)
    status, data = call(server, "POST", "/api/create", {"model": "x", "from": "tiny32", "quantize": "q8_0"})
    items = lines(data)
    assert status == 200 and items[0]["status"] == "quantizing F32 model to Q8_0"
    assert items[-1] == {"error": "llama-quantize process has terminated: exit status 3: error: out of cheese"}
    assert blobs(server) == before and server.store.resolve(ollama.Name.parse("x")) is None
