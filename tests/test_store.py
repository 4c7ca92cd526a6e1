"""Store crash safety: a server killed at any moment leaves no manifest pointing at a missing blob,
and the official `ollama` Python client works against our model API."""
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import ollama
from tiny_gguf import write_tiny_gguf

ROOT = Path(__file__).resolve().parent.parent

# The official client is also importable as `ollama`, which in this repo is our module. Run it in a
# fresh interpreter with -I (isolated: no cwd or script dir on sys.path, no PYTHON* variables), from
# a folder outside the repo, so `import ollama` finds the pip-installed package in site-packages.
_OFFICIAL = r"""
import json, sys
import ollama
assert "site-packages" in ollama.__file__, ollama.__file__
host, gguf_path = sys.argv[1], sys.argv[2]
c = ollama.Client(host=host)
import hashlib
digest = "sha256:" + hashlib.sha256(open(gguf_path, "rb").read()).hexdigest()
assert c.create_blob(gguf_path) == digest
steps = [p.status for p in c.create(model="official", files={"w.gguf": digest}, system="hi", stream=True)]
names = [m.model for m in c.list().models]
show = c.show("official")
c.copy("official", "official-copy")
after_copy = sorted(m.model for m in c.list().models)
c.delete("official")
final = [m.model for m in c.list().models]
print(json.dumps({"steps": steps, "names": names, "system": "SYSTEM hi" in show.modelfile,
                  "family": show.details.family, "caps": list(show.capabilities or []), "after_copy": after_copy,
                  "final": final,
                  "arch": show.modelinfo["general.architecture"]}))
"""


def test_official_python_client_manages_models(server, tmp_path):
    path = tmp_path / "w.gguf"
    write_tiny_gguf(path)
    out = subprocess.run([sys.executable, "-I", "-c", _OFFICIAL, server.url, str(path)], cwd=str(tmp_path),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    assert r["steps"][-2:] == ["writing manifest", "success"]
    assert r["names"] == ["official:latest"] and r["system"] is True and r["family"] == "llama"
    assert r["caps"] == ["completion"] and r["arch"] == "llama"
    assert r["after_copy"] == ["official-copy:latest", "official:latest"]
    assert r["final"] == ["official-copy:latest"]


_WORKER = r"""
import hashlib, http.client, json, sys, threading
sys.path.insert(0, sys.argv[1])
import ollama
srv = ollama.make_server(ollama.Config(), "127.0.0.1", 0)
threading.Thread(target=srv.serve_forever, daemon=True).start()
data = open(sys.argv[2], "rb").read()
digest = "sha256:" + hashlib.sha256(data).hexdigest()
def call(method, path, body):
    c = http.client.HTTPConnection("127.0.0.1", srv.server_port, timeout=30)
    c.request(method, path, body=body if isinstance(body, bytes) else json.dumps(body).encode())
    r = c.getresponse(); r.read(); c.close()
    return r.status
assert call("POST", "/api/blobs/" + digest, data) in (200, 201)
print("ready", flush=True)
i = 0
while True:
    i += 1
    call("POST", "/api/create", {"model": "m%d" % (i % 3), "files": {"w.gguf": digest}, "system": "s%d" % i,
                                 "parameters": {"seed": i}, "stream": False})
    call("POST", "/api/copy", {"source": "m%d" % (i % 3), "destination": "c%d" % (i % 2)})
    if i % 4 == 0:
        call("DELETE", "/api/delete", {"model": "c%d" % (i % 2)})
    other = data + str(i).encode()               # a new blob: an upload, then a no-copy import
    call("POST", "/api/blobs/sha256:" + hashlib.sha256(other).hexdigest(), other)
    with open(sys.argv[3], "wb") as f:
        f.write(other + b"!")
    call("POST", "/api/blobs/sha256:" + hashlib.sha256(other + b"!").hexdigest(), b"")
"""


def test_a_kill_at_any_moment_leaves_the_store_consistent_and_startup_cleans_the_rest(tmp_path, ollama_home):
    path = tmp_path / "w.gguf"
    write_tiny_gguf(path)
    env = dict(os.environ)
    rng = random.Random(7)
    for _ in range(6):
        proc = subprocess.Popen([sys.executable, "-c", _WORKER, str(ROOT), str(path), str(tmp_path / "imp")],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.05, 0.6))
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        store = ollama.Store(os.environ["OLLAMA_MODELS"])
        models = store.list()
        assert models, "the worker should have written some manifests"
        for name, _raw, manifest, _ in models:
            for d in ollama.manifest_digests(manifest):
                assert store.has_blob(d), (str(name), d)
        for p in store.blobs.iterdir():
            if len(p.name) == 71 and p.name.startswith("sha256-") and "tmp" not in p.name:
                assert hashlib.sha256(p.read_bytes()).hexdigest() == p.name[7:]
        store.clean(grace=0)                     # what serve's startup does, without the grace period
        refs = store.referenced()
        left = sorted(p.name for p in store.blobs.iterdir() if p.name.replace("-", ":", 1) not in refs)
        assert left == [], "temp files, journals or unreferenced blobs survived the cleanup"
        temps = [f for _d, _s, files in os.walk(store.manifests) for f in files if ".tmp-" in f]
        assert temps == []


def test_clean_keeps_what_a_live_writer_holds_partials_and_young_blobs(tmp_path):
    store = ollama.Store(tmp_path / "models")
    kept, _ = store.write_blob_bytes(b"named by a model")
    store.write_manifest(ollama.Name.parse("m"), {"schemaVersion": 2, "mediaType": ollama.MEDIA_MANIFEST,
                                                  "config": {"digest": kept, "size": 16}, "layers": []})
    young, _ = store.write_blob_bytes(b"uploaded just now, its create still to come")
    os.utime(store.blob_path(young), (time.time() - 7200,) * 2)   # an mtime a hard link keeps: not its age
    partial = store.blobs / ("sha256-" + "ab" * 32 + "-partial")
    partial.write_bytes(b"half a pull")
    (store.blobs / ("sha256-" + "ab" * 32 + "-partial-0")).write_bytes(b"{}")
    dead_tmp = store.blobs / "sha256-tmp-left-by-a-kill"
    dead_tmp.write_bytes(b"x" * 100)
    live, live_tmp = store.temp_blob()           # an upload in progress: its writer holds the lock
    try:
        assert store.clean() == (1, 100)
        assert live_tmp.exists() and not dead_tmp.exists()
        assert store.has_blob(kept) and store.has_blob(young)
        later = time.time() + ollama.BLOB_GRACE + 60
        assert store.clean(now=later) == (1, len(b"uploaded just now, its create still to come"))
        assert store.has_blob(kept) and not store.has_blob(young)
        assert partial.read_bytes() == b"half a pull"
    finally:
        live.close()
    assert store.clean(prune=False) == (1, 0)     # its writer is gone: now it is removed
    assert not live_tmp.exists()


def test_a_delete_interrupted_after_the_manifest_is_finished_at_startup(tmp_path, monkeypatch):
    store = ollama.Store(tmp_path / "models")
    blob, _ = store.write_blob_bytes(b"the only model's blob")
    store.write_manifest(ollama.Name.parse("m"), {"schemaVersion": 2, "mediaType": ollama.MEDIA_MANIFEST,
                                                  "config": {"digest": blob, "size": 21}, "layers": []})

    def killed(digests):                          # fault injection: the process dies here
        raise KeyboardInterrupt

    monkeypatch.setattr(store, "remove_unused", killed)
    with pytest.raises(KeyboardInterrupt):
        store.delete("m")
    monkeypatch.undo()
    assert store.list() == [] and store.has_blob(blob)
    store.clean(prune=False)                      # no age rule: the journal says what to delete
    assert not store.has_blob(blob) and list(store.blobs.iterdir()) == []


def test_legacy_colon_blob_names_are_renamed_and_partials_kept(tmp_path):
    store = ollama.Store(tmp_path / "models")
    digest, _ = store.write_blob_bytes(b"legacy")
    hexd = digest.split(":")[1]
    store.blob_path(digest).rename(store.blobs / ("sha256:" + hexd))
    dup_digest, _ = store.write_blob_bytes(b"both")
    (store.blobs / ("sha256:" + dup_digest.split(":")[1])).write_bytes(b"both")
    partial = store.blobs / ("sha256-" + "ab" * 32 + "-partial")
    partial.write_bytes(b"half")
    assert store.fix_blob_names() == 2
    assert store.blob_path(digest).read_bytes() == b"legacy" and store.blob_path(dup_digest).read_bytes() == b"both"
    assert sorted(p.name for p in store.blobs.iterdir() if ":" in p.name) == []
    assert partial.read_bytes() == b"half"
