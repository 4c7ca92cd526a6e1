"""Registry: pull and push over the OCI distribution protocol, against a real docker-registry and
against a small fake registry (tests-only, http.server on loopback) that can lie, stall and drop."""
import errno
import hashlib
import http.server
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

import ollama

ROOT = Path(__file__).resolve().parent.parent
REGISTRY_BIN = "/usr/bin/docker-registry"
GEMMA = Path.home() / ".cache/ollama-py/gemma/gemma-3-270m-q4_k_m.gguf"
MODEL_MEDIA = "application/vnd.ollama.image.model"


def sha(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def make_manifest(blobs, config=b'{"model_format":"gguf","model_family":"test"}'):
    """(manifest bytes, {digest: bytes}) for a model of the given layer bytes plus a config."""
    layers = [{"mediaType": MODEL_MEDIA, "digest": sha(b), "size": len(b)} for b in blobs]
    manifest = {"schemaVersion": 2, "mediaType": ollama.MEDIA_MANIFEST,
                "config": {"mediaType": ollama.MEDIA_CONFIG, "digest": sha(config), "size": len(config)},
                "layers": layers}
    return (json.dumps(manifest, separators=(",", ":")) + "\n").encode(), \
        {sha(b): b for b in list(blobs) + [config]}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- a fake registry for fault injection ---------------------------------------

class FakeRegistry(http.server.ThreadingHTTPServer):
    """Serves /v2/<repo>/manifests/<tag> and /v2/<repo>/blobs/<digest> from dicts. Faults:
    corrupt (digests served with wrong bytes), ignore_range, drop_after (bytes per response before
    the connection is cut), stall (seconds to hang mid-body, first blob request only), delay (seconds
    per 64 KiB), bearer (required token; /token hands it out for the Basic credentials in
    `accounts`, or to anyone when accounts is None), redirect_to (blob GETs go to another host)."""
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _FakeHandler)
        self.manifests, self.blobs = {}, {}
        self.corrupt, self.ignore_range, self.drop_after, self.stall, self.delay = set(), False, None, 0, 0
        self.bearer, self.accounts, self.redirect_to = None, None, None
        self.served = 0                 # blob body bytes sent
        self.requests = []              # (method, path, headers)
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def host(self):
        return "127.0.0.1:%d" % self.server_port

    def add(self, repo_tag, blobs, config=None):
        """Publish a model at "ns/model:tag"; returns its manifest bytes."""
        raw, by_digest = make_manifest(blobs, *([config] if config else []))
        self.manifests[repo_tag] = raw
        self.blobs.update(by_digest)
        return raw

    def blob_gets(self):
        return [r for r in self.requests if r[0] == "GET" and "/blobs/" in r[1]]

    def close(self):
        self.shutdown()
        self.server_close()


class _FakeHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_HEAD(self):
        self.do_GET(head=True)

    def do_GET(self, head=False):
        reg = self.server
        with reg.lock:
            reg.requests.append((self.command, self.path, dict(self.headers)))
        if self.path.startswith("/token"):
            return self._token()
        if reg.bearer and self.headers.get("Authorization") != "Bearer " + reg.bearer:
            realm = "http://%s/token" % reg.host
            return self._send(401, b'{"errors":[{"code":"UNAUTHORIZED"}]}', {
                "WWW-Authenticate": 'Bearer realm="%s",service="fake",scope="repository:x:pull"' % realm})
        m = re.match(r"^/v2/(.+)/(manifests|blobs)/([^/?]+)$", self.path)
        if not m:
            return self._send(404, b"{}")
        repo, kind, ref = m.groups()
        if kind == "manifests":
            raw = reg.manifests.get("%s:%s" % (repo, ref))
            if raw is None:
                return self._send(404, b'{"errors":[{"code":"MANIFEST_UNKNOWN"}]}')
            return self._send(200, raw, {"Content-Type": ollama.MEDIA_MANIFEST}, head)
        data = reg.blobs.get(ref)
        if data is None:
            return self._send(404, b'{"errors":[{"code":"BLOB_UNKNOWN"}]}')
        if reg.redirect_to and not head:
            return self._send(307, b"", {"Location": "http://%s/storage/%s" % (reg.redirect_to, ref)})
        self._blob(data, ref, head)

    def _blob(self, data, digest, head):
        reg = self.server
        if digest in reg.corrupt:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        start, end, status = 0, len(data) - 1, 200
        rng = re.match(r"bytes=(\d+)-(\d*)", self.headers.get("Range") or "")
        if rng and not reg.ignore_range:
            start, status = int(rng.group(1)), 206
            end = int(rng.group(2)) if rng.group(2) else end
        body = data[start:end + 1]
        headers = {"Content-Type": "application/octet-stream"}
        if status == 206:
            headers["Content-Range"] = "bytes %d-%d/%d" % (start, end, len(data))
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if head:
            return
        limit = len(body) if reg.drop_after is None else min(len(body), reg.drop_after)
        stall, reg.stall = reg.stall, 0
        pos = 0
        try:
            while pos < limit:
                chunk = body[pos:min(limit, pos + 65536)]
                self.wfile.write(chunk)
                self.wfile.flush()
                pos += len(chunk)
                with reg.lock:
                    reg.served += len(chunk)
                if stall:
                    time.sleep(stall)   # hang mid-body; the client must give up and retry
                    return
                if reg.delay:
                    time.sleep(reg.delay)
        except (BrokenPipeError, ConnectionResetError):
            return
        if limit < len(body):
            self.connection.shutdown(socket.SHUT_RDWR)
        self.close_connection = True

    def _token(self):
        reg = self.server
        auth = self.headers.get("Authorization") or ""
        import base64
        ok = reg.accounts is None or any(
            auth == "Basic " + base64.b64encode(("%s:%s" % acct).encode()).decode() for acct in reg.accounts)
        if not ok:
            return self._send(401, b'{"details":"access denied"}')
        self._send(200, json.dumps({"token": reg.bearer}).encode(), {"Content-Type": "application/json"})

    def _send(self, status, body, headers=None, head=False):
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)


class _Storage(http.server.ThreadingHTTPServer):
    """Blob storage on another host name (localhost vs 127.0.0.1): records the headers it gets."""
    daemon_threads = True

    def __init__(self, blobs):
        self.blobs, self.seen = blobs, []
        super().__init__(("127.0.0.1", 0), _StorageHandler)
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()


class _StorageHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        self.server.seen.append(dict(self.headers))
        data = self.server.blobs[self.path.rsplit("/", 1)[1]]
        rng = re.match(r"bytes=(\d+)-(\d+)", self.headers.get("Range") or "")
        start, end = (int(rng.group(1)), int(rng.group(2))) if rng else (0, len(data) - 1)
        self.send_response(206 if rng else 200)
        if rng:
            self.send_header("Content-Range", "bytes %d-%d/%d" % (start, end, len(data)))
        self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        self.wfile.write(data[start:end + 1])


@pytest.fixture
def fake():
    reg = FakeRegistry()
    yield reg
    reg.close()


@pytest.fixture
def fast(server):
    """Small parts, short retries and stall timeout on the test server's transfer settings."""
    t = server.transfers
    t.part_min, t.retries, t.backoff, t.backoff_max, t.stall_timeout = 64 * 1024, 3, 0.01, 0.05, 1.0
    t.checkpoint_interval = 0.05
    return t


def parts(server):
    """What pull_model and push_model take: the store, its transfer state and the config."""
    return server.store, server.transfers, server.config


def pull(server, name, insecure=True):
    """pull_model on the test server; returns the progress objects."""
    seen = []
    ollama.pull_model(*parts(server), name, insecure=insecure, progress=seen.append)
    return seen


def store_files(server):
    root = server.store.root
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.exists() else []


def partial_completed(store, digest):
    """Bytes recorded as done in the -partial-<N> files of a digest."""
    prefix = digest.replace(":", "-") + "-partial-"
    return sum(json.loads(p.read_bytes())["Completed"] for p in store.blobs.glob(prefix + "*"))


# -- pulls against the fake registry -----------------------------------------------

def test_pull_streams_ollama_statuses_and_writes_manifest_as_received(server, fast, fake):
    blob = os.urandom(300_000)
    raw = fake.add("ns/tiny:1", [blob])
    seen = pull(server, "%s/ns/tiny:1" % fake.host)
    statuses = [s["status"] for s in seen]
    assert statuses[0] == "pulling manifest"
    assert statuses[-3:] == ["verifying sha256 digest", "writing manifest", "success"]
    pulling = [s for s in seen if s["status"].startswith("pulling ") and s["status"] != "pulling manifest"]
    assert {s["status"] for s in pulling} == {"pulling " + d[7:19] for d in fake.blobs}
    last = {s["digest"]: s for s in pulling}
    assert all(s["completed"] == s["total"] for s in last.values())
    name, stored, _ = server.store.get("%s/ns/tiny:1" % fake.host)
    assert stored == raw
    assert server.store.blob_path(sha(blob)).read_bytes() == blob
    assert not list(server.store.blobs.glob("*partial*"))


def test_pull_unknown_model_is_file_does_not_exist(server, fast, fake, capsys):
    with pytest.raises(ollama.OllamaError, match="^pull model manifest: file does not exist$"):
        pull(server, "%s/ns/missing:1" % fake.host)
    assert ollama.main(["pull", "--insecure", "%s/ns/missing:1" % fake.host]) == 1
    assert "Error: pull model manifest: file does not exist" in capsys.readouterr().err


def test_pull_api_reports_errors_in_stream_and_as_json(server, fast, fake):
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", server.server_port, timeout=10)
    conn.request("POST", "/api/pull", json.dumps({"model": "%s/ns/missing:1" % fake.host, "insecure": True}))
    lines = [json.loads(line) for line in conn.getresponse().read().splitlines()]
    assert lines == [{"status": "pulling manifest"}, {"error": "pull model manifest: file does not exist"}]
    conn.request("POST", "/api/pull", json.dumps({"name": "%s/ns/missing:1" % fake.host, "insecure": True,
                                                  "stream": False}))
    resp = conn.getresponse()
    assert (resp.status, json.loads(resp.read())) == (500, {"error": "pull model manifest: file does not exist"})
    conn.request("POST", "/api/pull", json.dumps({"model": "a/b/c/d"}))
    resp = conn.getresponse()
    assert (resp.status, json.loads(resp.read())) == (400, {"error": "invalid model name"})


def test_pull_stream_false_returns_only_success(server, fast, fake):
    import http.client
    fake.add("ns/tiny:1", [b"GGUF" + os.urandom(1000)])
    conn = http.client.HTTPConnection("127.0.0.1", server.server_port, timeout=10)
    conn.request("POST", "/api/pull", json.dumps({"model": "%s/ns/tiny:1" % fake.host, "insecure": True,
                                                  "stream": False}))
    resp = conn.getresponse()
    assert (resp.status, json.loads(resp.read())) == (200, {"status": "success"})


def test_pull_when_registry_is_down_fails_clearly(server, fast, capsys):
    port = free_port()
    with pytest.raises(ollama.OllamaError, match=r'^pull model manifest: Get "http://127\.0\.0\.1:%d/v2/ns/m/'
                                                 r'manifests/latest": .*[Cc]onnection refused' % port):
        pull(server, "127.0.0.1:%d/ns/m" % port)
    assert ollama.main(["pull", "--insecure", "127.0.0.1:%d/ns/m" % port]) == 1
    assert "Error: pull model manifest" in capsys.readouterr().err
    assert store_files(server) == []


def test_pull_wrong_bytes_is_digest_mismatch_and_keeps_nothing(server, fast, fake):
    blob = os.urandom(200_000)
    fake.add("ns/bad:1", [blob])
    fake.corrupt.add(sha(blob))
    bad = sha(bytes([blob[0] ^ 0xFF]) + blob[1:])
    with pytest.raises(ollama.OllamaError) as err:
        pull(server, "%s/ns/bad:1" % fake.host)
    assert str(err.value) == "digest mismatch, file must be downloaded again: want %s, got %s" % (sha(blob), bad)
    assert not any("manifests" in f or sha(blob)[7:] in f for f in store_files(server))


@pytest.mark.parametrize("raw", [
    b"<html>not json</html>",
    b"[1, 2]",
    json.dumps({"schemaVersion": 1, "layers": []}).encode(),
    json.dumps({"schemaVersion": 2, "layers": [{"digest": "sha256:xyz", "size": 1}]}).encode(),
    json.dumps({"schemaVersion": 2, "layers": [{"digest": "sha256:../../../../etc/passwd", "size": 1}]}).encode(),
    json.dumps({"schemaVersion": 2, "layers": [{"digest": "sha256-" + "a" * 64, "size": 1}]}).encode(),
    json.dumps({"schemaVersion": 2, "layers": [{"digest": "sha256:" + "A" * 64, "size": 1}]}).encode(),
    json.dumps({"schemaVersion": 2, "layers": [{"digest": "sha256:" + "a" * 64, "size": -1}]}).encode(),
    json.dumps({"schemaVersion": 2, "layers": [{"digest": "sha256:" + "a" * 64, "size": "1"}]}).encode(),
    json.dumps({"schemaVersion": 2, "layers": [], "config": {"digest": "../x", "size": 1}}).encode(),
], ids=["html", "not-object", "schema1", "impossible-digest", "path-traversal", "dash-digest",
        "uppercase-digest", "negative-size", "string-size", "bad-config-digest"])
def test_pull_rejects_bad_manifest_before_any_write(server, fast, fake, raw):
    fake.manifests["ns/evil:1"] = raw
    with pytest.raises(ollama.OllamaError, match="^pull model manifest: invalid manifest: "):
        pull(server, "%s/ns/evil:1" % fake.host)
    assert fake.blob_gets() == []
    assert store_files(server) == []


def test_pull_resumes_partial_blob_fetching_only_missing_bytes(server, fast, fake):
    blob = os.urandom(512 * 1024)                   # 8 parts of 64 KiB
    fake.add("ns/big:1", [blob])
    fake.drop_after, fast.retries = 20_000, 1       # every response is cut after 20 kB; no retry
    with pytest.raises(ollama.OllamaError, match="max retries exceeded"):
        pull(server, "%s/ns/big:1" % fake.host)
    done = partial_completed(server.store, sha(blob))
    assert 0 < done < len(blob)
    assert not server.store.has_blob(sha(blob)) and server.store.resolve("%s/ns/big:1" % fake.host) is None

    fake.drop_after, fake.served = None, 0
    pull(server, "%s/ns/big:1" % fake.host)
    config_size = len(fake.blobs) and sum(len(b) for d, b in fake.blobs.items() if d != sha(blob))
    assert fake.served == len(blob) - done + config_size
    assert server.store.blob_path(sha(blob)).read_bytes() == blob
    assert not list(server.store.blobs.glob("*partial*"))


def test_pull_resumes_ollama_partial_files(server, fast, fake):
    """A partial left by Ollama (sparse data file + -partial-N JSON) is picked up where it stopped."""
    blob = os.urandom(300_000)
    fake.add("ns/m:1", [blob])
    base = str(server.store.blob_path(sha(blob)))
    server.store.blobs.mkdir(parents=True)
    with open(base + "-partial", "wb") as f:
        f.truncate(len(blob))
        f.seek(0)
        f.write(blob[:100_000])
    for n, (off, size, done) in enumerate([(0, 150_000, 100_000), (150_000, 150_000, 0)]):
        Path("%s-partial-%d" % (base, n)).write_text(json.dumps(
            {"N": n, "Offset": off, "Size": size, "Completed": done}) + "\n")
    pull(server, "%s/ns/m:1" % fake.host)
    assert fake.served == len(blob) - 100_000 + len(fake.blobs[[d for d in fake.blobs if d != sha(blob)][0]])
    assert server.store.blob_path(sha(blob)).read_bytes() == blob


def test_pull_disk_full_keeps_partial_and_writes_no_manifest(server, fast, fake, monkeypatch):
    blob = os.urandom(400_000)
    fake.add("ns/m:1", [blob])
    written = [0]
    real = ollama._pwrite

    def full_disk(fd, data, offset):
        if written[0] + len(data) > 150_000:
            raise OSError(errno.ENOSPC, "No space left on device")
        written[0] += len(data)
        real(fd, data, offset)

    monkeypatch.setattr(ollama, "_pwrite", full_disk)
    with pytest.raises(ollama.OllamaError, match="no space left on device"):
        pull(server, "%s/ns/m:1" % fake.host)
    assert server.store.resolve("%s/ns/m:1" % fake.host) is None
    assert Path(str(server.store.blob_path(sha(blob))) + "-partial").exists()
    assert partial_completed(server.store, sha(blob)) == written[0] > 0

    monkeypatch.setattr(ollama, "_pwrite", real)
    fake.served = 0
    pull(server, "%s/ns/m:1" % fake.host)
    assert server.store.blob_path(sha(blob)).read_bytes() == blob
    assert fake.served < len(blob)


def test_pull_401_without_credentials_says_unauthorized(server, fast, fake, capsys):
    fake.add("ns/private:1", [b"secret"])
    fake.bearer, fake.accounts = "tok-123", [("alice", "s3cret")]
    with pytest.raises(ollama.Unauthorized, match="^pull model manifest: unauthorized: access denied"):
        pull(server, "%s/ns/private:1" % fake.host)
    assert ollama.main(["pull", "--insecure", "%s/ns/private:1" % fake.host]) == 1
    assert "Error: pull model manifest: unauthorized" in capsys.readouterr().err


def test_pull_with_docker_credentials_gets_bearer_token(server, fast, fake, ollama_home, caplog):
    fake.add("ns/private:1", [os.urandom(100_000)])
    fake.bearer, fake.accounts = "tok-123", [("alice", "s3cret")]
    import base64
    (ollama_home / ".docker").mkdir()
    (ollama_home / ".docker" / "config.json").write_text(json.dumps({"auths": {
        fake.host: {"auth": base64.b64encode(b"alice:s3cret").decode()}}}))
    caplog.set_level("DEBUG", logger="ollama")
    assert pull(server, "%s/ns/private:1" % fake.host)[-1] == {"status": "success"}
    assert any(r[1].startswith("/token?service=fake&scope=repository%3Ax%3Apull") for r in fake.requests)
    assert "s3cret" not in caplog.text and "tok-123" not in caplog.text


def test_pull_redirect_to_other_host_drops_authorization(server, fast, fake, ollama_home):
    blob = os.urandom(200_000)
    fake.add("ns/m:1", [blob])
    fake.bearer, fake.accounts = "tok-123", None     # anonymous tokens
    storage = _Storage(fake.blobs)
    fake.redirect_to = "localhost:%d" % storage.server_port
    try:
        pull(server, "%s/ns/m:1" % fake.host)
    finally:
        storage.shutdown()
        storage.server_close()
    assert storage.seen and all("Authorization" not in h for h in storage.seen)
    assert any(h.get("Authorization") == "Bearer tok-123" for _m, p, h in fake.requests if "/blobs/" in p)
    assert server.store.blob_path(sha(blob)).read_bytes() == blob


def test_pull_registry_ignoring_range_still_writes_correct_blob(server, fast, fake):
    blob = os.urandom(300_000)                      # 5 parts, every one answered with the whole blob
    fake.add("ns/m:1", [blob])
    fake.ignore_range = True
    pull(server, "%s/ns/m:1" % fake.host)
    assert server.store.blob_path(sha(blob)).read_bytes() == blob
    assert len(fake.blob_gets()) >= 5


def test_pull_detects_stalled_connection_and_retries(server, fast, fake):
    blob = os.urandom(100_000)
    fake.add("ns/m:1", [blob])
    fast.parts, fast.part_min, fast.stall_timeout = 1, 1 << 20, 0.3
    fake.stall = 5                                  # first blob response hangs after 64 KiB
    pull(server, "%s/ns/m:1" % fake.host)
    assert server.store.blob_path(sha(blob)).read_bytes() == blob
    gets = [h.get("Range") for _m, p, h in fake.blob_gets() if sha(blob) in p]
    assert gets == ["bytes=0-99999", "bytes=65536-99999"]


def test_concurrent_pulls_of_one_blob_share_a_download(server, fast, fake):
    blob = os.urandom(640 * 1024)
    fake.add("ns/a:1", [blob])
    fake.add("ns/b:1", [blob])
    fake.delay = 0.02                               # slow enough that the pulls overlap
    results = []

    def run(n):
        try:
            results.append(pull(server, "%s/ns/%s:1" % (fake.host, n))[-1])
        except Exception as e:                      # reported by the assert below
            results.append(e)

    threads = [threading.Thread(target=run, args=(n,)) for n in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == [{"status": "success"}] * 2
    served = sum(1 for _m, p, _h in fake.blob_gets() if sha(blob) in p)
    assert served == 10 and fake.served == len(blob) + len(fake.blobs[[d for d in fake.blobs if d != sha(blob)][0]])


def test_pull_fetches_only_missing_layers(server, fast, fake):
    have, missing = os.urandom(200_000), os.urandom(50_000)
    fake.add("ns/m:1", [have, missing])
    server.store.write_blob_bytes(have)
    seen = pull(server, "%s/ns/m:1" % fake.host)
    assert not any(sha(have) in p for _m, p, _h in fake.blob_gets())
    hits = [s for s in seen if s.get("digest") == sha(have)]
    assert hits == [{"status": "pulling " + sha(have)[7:19], "digest": sha(have), "total": 200_000,
                     "completed": 200_000}]


def test_pull_of_new_version_removes_unused_layers(server, fast, fake):
    old, new = os.urandom(10_000), os.urandom(10_000)
    fake.add("ns/m:1", [old])
    pull(server, "%s/ns/m:1" % fake.host)
    assert "removing unused layers" not in [s["status"] for s in pull(server, "%s/ns/m:1" % fake.host)]
    fake.add("ns/m:1", [new])
    assert "removing unused layers" in [s["status"] for s in pull(server, "%s/ns/m:1" % fake.host)]
    assert not server.store.has_blob(sha(old)) and server.store.has_blob(sha(new))


def test_plain_http_needs_insecure(server, fast, fake):
    fake.add("ns/m:1", [b"x"])
    with pytest.raises(ollama.OllamaError, match="^insecure protocol http$"):
        pull(server, "http://%s/ns/m:1" % fake.host, insecure=False)
    with pytest.raises(ollama.OllamaError, match="insecure protocol http"):
        pull(server, "%s/ns/m:1" % fake.host, insecure=False)     # https to a plain-HTTP registry
    assert pull(server, "http://%s/ns/m:1" % fake.host)[-1] == {"status": "success"}


def test_docker_credentials_are_read_from_docker_config(tmp_path):
    import base64
    (tmp_path / "config.json").write_text(json.dumps({"auths": {
        "https://reg.example:5000": {"auth": base64.b64encode(b"bob:pw:with:colons").decode()},
        "other.example": {"username": "u", "password": "p"}}}))
    env = {"DOCKER_CONFIG": str(tmp_path)}
    assert ollama.docker_credentials("reg.example:5000", env) == ("bob", "pw:with:colons")
    assert ollama.docker_credentials("OTHER.example", env) == ("u", "p")
    assert ollama.docker_credentials("nope.example", env) is None


# -- the real docker-registry -------------------------------------------------------

@pytest.fixture
def registry(tmp_path):
    """Debian's docker-registry on 127.0.0.1:<free port>, storing in tmp; yields host:port."""
    if not os.access(REGISTRY_BIN, os.X_OK):
        pytest.skip("docker-registry is not installed")
    port = free_port()
    cfg = tmp_path / "registry.yml"
    cfg.write_text("version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: %s\n"
                   "  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:%d\n" % (tmp_path / "registry", port))
    proc = subprocess.Popen([REGISTRY_BIN, "serve", str(cfg)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                with urllib.request.urlopen("http://127.0.0.1:%d/v2/" % port, timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.05)
        else:
            pytest.fail("docker-registry did not start")
        yield "127.0.0.1:%d" % port
    finally:
        proc.kill()
        proc.wait()


def put_model(store, name, blobs, config=b'{"model_format":"gguf","model_family":"llama"}'):
    """A small model written straight into a store: blobs, a config and a manifest."""
    layers = []
    for data, media in blobs:
        if isinstance(data, Path):
            with open(data, "rb") as f:
                digest, size = store.write_blob(f)
        else:
            digest, size = store.write_blob_bytes(data)
        layers.append({"mediaType": media, "digest": digest, "size": size})
    cdigest, csize = store.write_blob_bytes(config)
    manifest = {"schemaVersion": 2, "mediaType": ollama.MEDIA_MANIFEST,
                "config": {"mediaType": ollama.MEDIA_CONFIG, "digest": cdigest, "size": csize}, "layers": layers}
    return store.write_manifest(ollama.Name.parse(name), manifest)


def tiny_gguf():
    """A minimal valid GGUF v3 file: header, one string KV, no tensors."""
    import struct
    key, val = b"general.architecture", b"llama"
    return (b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", len(key)) + key
            + struct.pack("<I", 8) + struct.pack("<Q", len(val)) + val)


def test_push_then_pull_through_real_docker_registry(server, fast, registry, tmp_path, capsys):
    name = "%s/test/tiny:v1" % registry
    raw = put_model(server.store, name, [(tiny_gguf() + os.urandom(200_000), MODEL_MEDIA),
                                        (b"{{ .Prompt }}", "application/vnd.ollama.image.template")])
    assert ollama.main(["push", "--insecure", name]) == 0
    out = capsys.readouterr().err
    assert "pushing manifest" in out and out.rstrip().endswith("success")

    other = ollama.make_server(ollama.Config({"HOME": str(tmp_path), "OLLAMA_MODELS": str(tmp_path / "m2")}),
                               "127.0.0.1", 0)
    seen = pull(other, name)
    assert [s["status"] for s in seen][-3:] == ["verifying sha256 digest", "writing manifest", "success"]
    _n, pulled, manifest = other.store.get(name)
    assert pulled == raw
    for d in ollama.manifest_digests(manifest):
        assert ollama.file_digest(other.store.blob_path(d)) == d == ollama.file_digest(server.store.blob_path(d))
    other.server_close()

    # pushing again finds every blob present (HEAD), and a second name mounts nothing new
    statuses = []
    ollama.push_model(*parts(server), name, insecure=True, progress=statuses.append)
    assert statuses[-2:] == [{"status": "pushing manifest"}, {"status": "success"}]


def test_push_unknown_model_fails(server, fast, registry):
    seen = []
    with pytest.raises(ollama.NotFound):
        ollama.push_model(*parts(server), "%s/test/none:1" % registry, insecure=True, progress=seen.append)
    assert seen == [{"status": "retrieving manifest"}, {"status": "couldn't retrieve manifest"}]


class _CountingProxy(http.server.ThreadingHTTPServer):
    """A throttling, byte-counting reverse proxy in front of the registry (GET/HEAD only)."""
    daemon_threads = True

    def __init__(self, upstream, rate):
        self.upstream, self.rate, self.served = upstream, rate, 0     # rate in bytes/s
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_HEAD(self):
        self.do_GET()

    def do_GET(self):
        import http.client
        host, port = self.server.upstream.split(":")
        up = http.client.HTTPConnection(host, int(port), timeout=30)
        headers = {k: v for k, v in self.headers.items() if k.lower() in ("range", "accept", "authorization")}
        up.request(self.command, self.path, headers=headers)
        resp = up.getresponse()
        self.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() in ("content-length", "content-range", "content-type", "docker-content-digest",
                             "location", "www-authenticate"):
                self.send_header(k, v)
        self.end_headers()
        try:
            while self.command == "GET":
                chunk = resp.read(65536)
                if not chunk:
                    break
                self.wfile.write(chunk)
                if "/blobs/" in self.path:
                    with self.server.lock:
                        self.server.served += len(chunk)
                time.sleep(len(chunk) / self.server.rate)
        except (BrokenPipeError, ConnectionResetError):
            pass
        finally:
            up.close()


def _serve(env):
    proc = subprocess.Popen([sys.executable, str(ROOT / "ollama.py"), "serve"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(200):
        try:
            with urllib.request.urlopen("http://%s/" % env["OLLAMA_HOST"], timeout=1):
                return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    pytest.fail("ollama.py serve did not start")


def kill_pull_and_resume(env, name, digest, total, proxy):
    """`ollama.py pull --insecure NAME` through a serve with `env`: SIGKILL the serve once a quarter of
    the blob `digest` (`total` bytes) is on disk, check the partial was kept and nothing committed, then
    restart and pull again with the proxy's byte count reset. Returns (store, bytes on disk at the kill)."""
    pull = [sys.executable, str(ROOT / "ollama.py"), "pull", "--insecure", name]
    store = ollama.Store(env["OLLAMA_MODELS"])
    srv = _serve(env)
    try:
        puller = subprocess.Popen(pull, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        recorded, deadline = 0, time.monotonic() + 60
        while recorded < total // 4 and time.monotonic() < deadline:
            time.sleep(0.1)
            try:
                recorded = partial_completed(store, digest)
            except (OSError, ValueError):           # a part file being replaced
                pass
        srv.send_signal(signal.SIGKILL)
        srv.wait()
        assert puller.wait(30) != 0
        recorded = partial_completed(store, digest)
        assert 0 < recorded < total
        assert not store.has_blob(digest) and store.resolve(ollama.Name.parse(name)) is None
        proxy.served = 0
        srv = _serve(env)
        done = subprocess.run(pull, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=90)
        assert done.returncode == 0, done.stderr.decode()
        assert ollama.file_digest(store.blob_path(digest)) == digest
        return store, recorded
    finally:
        srv.kill()
        srv.wait()


@pytest.mark.timeout(120)
@pytest.mark.skipif(not GEMMA.is_file(), reason="Gemma 3 270M GGUF not downloaded")
def test_pull_survives_server_sigkill_and_resumes_gemma(server, registry, tmp_path):
    name = "%s/test/gemma3:270m" % registry
    put_model(server.store, name, [(GEMMA, MODEL_MEDIA)])
    ollama.push_model(*parts(server), name, insecure=True)
    digest = json.loads(server.store.get(name)[1])["layers"][0]["digest"]
    total = GEMMA.stat().st_size

    proxy = _CountingProxy(registry, rate=40e6)
    models = tmp_path / "models2"
    env = dict(os.environ, OLLAMA_HOST="127.0.0.1:%d" % free_port(), OLLAMA_MODELS=str(models),
               HOME=str(tmp_path / "home2"))
    pulled = "127.0.0.1:%d/test/gemma3:270m" % proxy.server_port
    try:
        store2, recorded = kill_pull_and_resume(env, pulled, digest, total, proxy)
        config = json.loads(store2.get(pulled)[1])["config"]["size"]
        assert 0 < proxy.served <= total - recorded + config
        print("resume: %d of %d bytes on disk at the kill; refetched %d" % (recorded, total, proxy.served))
    finally:
        proxy.shutdown()
        proxy.server_close()


def test_push_mounts_layer_from_another_repository(server, fast, registry, monkeypatch):
    blob = tiny_gguf() + os.urandom(100_000)
    put_model(server.store, "%s/test/base:1" % registry, [(blob, MODEL_MEDIA)])
    ollama.push_model(*parts(server), "%s/test/base:1" % registry, insecure=True)
    derived = {"schemaVersion": 2, "mediaType": ollama.MEDIA_MANIFEST,
               "config": json.loads(server.store.get("%s/test/base:1" % registry)[1])["config"],
               "layers": [{"mediaType": MODEL_MEDIA, "digest": sha(blob), "size": len(blob),
                           "from": "%s/test/base:1" % registry}]}
    server.store.write_manifest(ollama.Name.parse("%s/other/derived:1" % registry), derived)
    calls = []
    real = ollama.RegistrySession.request

    def spy(self, method, url, *args, **kwargs):
        resp = real(self, method, url, *args, **kwargs)
        calls.append((method, url, resp.status))
        return resp

    monkeypatch.setattr(ollama.RegistrySession, "request", spy)
    ollama.push_model(*parts(server), "%s/other/derived:1" % registry, insecure=True)
    mounts = [c for c in calls if c[0] == "POST" and "mount=" + sha(blob).replace(":", "%3A") in c[1]]
    assert mounts and mounts[0][2] == 201 and "from=test%2Fbase" in mounts[0][1]
    assert len([c for c in calls if c[0] == "PATCH"]) == 1       # the config only: it has no "from"
    other = ollama.make_server(ollama.Config({"HOME": str(server.store.root), "OLLAMA_MODELS": str(
        server.store.root.parent / "m3")}), "127.0.0.1", 0)
    try:
        pull(other, "%s/other/derived:1" % registry)
        assert other.store.blob_path(sha(blob)).read_bytes() == blob
    finally:
        other.server_close()
