#!/usr/bin/env python3
"""ollama.py: Ollama in one file.

Run large language models locally with Ollama's commands, HTTP API and model
store, on top of llama.cpp's own ``llama-server`` (built by build_llama.sh).
Standard library only, Python 3.9 or newer. MIT licensed.

    ollama.py serve                   start the server (OLLAMA_HOST, default 127.0.0.1:11434)
    ollama.py create NAME -f Modelfile
    ollama.py run NAME [PROMPT]       chat, or answer one prompt
    ollama.py pull|push|list|ps|show|cp|rm|stop ...
"""

__version__ = "0.1.0"
__license__ = "MIT"
__all__ = [
    "Config", "OllamaError", "Name", "Store", "Client", "OllamaServer", "make_server", "main",
]

import argparse
import base64
import datetime
import errno
import hashlib
import http.client
import http.server
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

###############################################################################
# Config ######################################################################
###############################################################################

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 11434
DEFAULT_REGISTRY = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
DEFAULT_TAG = "latest"
DEFAULT_KEEP_ALIVE = 300.0        # seconds; OLLAMA_KEEP_ALIVE default "5m"
DEFAULT_NUM_CTX = 4096            # tokens; Ollama's CPU/low-VRAM tier
DEFAULT_MAX_QUEUE = 512           # pending requests before 503
DEFAULT_MAX_LOADED = 3            # runners; Ollama's 3 x #GPUs with CPU counted as one
DEFAULT_LOAD_TIMEOUT = 300.0      # seconds without load progress before giving up
COPY_CHUNK = 1 << 20              # bytes per read when streaming blobs

MEDIA_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MEDIA_CONFIG = "application/vnd.docker.container.image.v1+json"
MEDIA_PREFIX = "application/vnd.ollama.image."

log = logging.getLogger("ollama")


def _env(environ, key, default=""):
    """Read an environment variable the way Ollama's envconfig.Var does: spaces and quotes stripped."""
    return environ.get(key, default).strip().strip("\"'").strip()


def parse_host(value, default_port=DEFAULT_PORT):
    """Split an OLLAMA_HOST value into (scheme, host, port), as Ollama's envconfig.Host does."""
    scheme, hostport = "http", value or DEFAULT_HOST
    if "://" in hostport:
        scheme, hostport = hostport.split("://", 1)
    hostport = hostport.split("/", 1)[0]
    port = {"http": 80, "https": 443}.get(scheme, default_port) if "://" in (value or "") else default_port
    host = hostport
    if hostport.startswith("["):                       # [::1]:port
        host, _, rest = hostport[1:].partition("]")
        if rest.startswith(":") and rest[1:].isdigit():
            port = int(rest[1:])
    elif hostport.count(":") == 1:
        host, _, p = hostport.partition(":")
        if p.isdigit() and 0 <= int(p) <= 65535:
            port = int(p)
    return scheme, host or DEFAULT_HOST, port


class Config:
    """Everything the environment decides, read once (OLLAMA_* variables, see `serve --help`)."""

    def __init__(self, environ=None):
        env = os.environ if environ is None else environ
        self.scheme, self.host, self.port = parse_host(_env(env, "OLLAMA_HOST"))
        home = Path(env.get("HOME") or Path.home())
        self.home = home / ".ollama"
        self.models = Path(_env(env, "OLLAMA_MODELS") or self.home / "models").expanduser()
        self.keep_alive = parse_keep_alive(_env(env, "OLLAMA_KEEP_ALIVE") or None, DEFAULT_KEEP_ALIVE)
        self.num_parallel = _int_env(env, "OLLAMA_NUM_PARALLEL", 1)
        self.max_loaded_models = _int_env(env, "OLLAMA_MAX_LOADED_MODELS", 0) or DEFAULT_MAX_LOADED
        self.max_queue = _int_env(env, "OLLAMA_MAX_QUEUE", DEFAULT_MAX_QUEUE)
        self.context_length = _int_env(env, "OLLAMA_CONTEXT_LENGTH", 0) or DEFAULT_NUM_CTX
        self.load_timeout = _duration_env(env, "OLLAMA_LOAD_TIMEOUT", DEFAULT_LOAD_TIMEOUT)
        self.origins = [o.strip() for o in _env(env, "OLLAMA_ORIGINS").split(",") if o.strip()]
        debug = _env(env, "OLLAMA_DEBUG").lower()
        self.debug = 2 if debug == "2" else 1 if debug in ("1", "true") else 0
        self.noprune = bool(_env(env, "OLLAMA_NOPRUNE"))
        self.nohistory = bool(_env(env, "OLLAMA_NOHISTORY"))
        self.flash_attention = _env(env, "OLLAMA_FLASH_ATTENTION").lower() in ("1", "true")
        self.kv_cache_type = _env(env, "OLLAMA_KV_CACHE_TYPE")
        self.llama_server = _env(env, "OLLAMA_LLAMA_SERVER")

    @property
    def base_url(self):
        host = "[%s]" % self.host if ":" in self.host else self.host
        return "%s://%s:%d" % (self.scheme, host, self.port)


def _int_env(env, key, default):
    try:
        return int(_env(env, key) or default)
    except ValueError:
        log.warning("invalid %s, using %s", key, default)
        return default


def _duration_env(env, key, default):
    try:
        value = _env(env, key)
        return parse_duration(value) if value else default
    except ValueError:
        return default


###############################################################################
# Errors ######################################################################
###############################################################################

class OllamaError(Exception):
    """An error with the HTTP status it is reported with; its text is Ollama's."""
    status = 500

    def __init__(self, message, status=None):
        super().__init__(message)
        if status is not None:
            self.status = status


class BadRequest(OllamaError):
    """The request is malformed or asks for something the model cannot do."""
    status = 400


class Unauthorized(OllamaError):
    """A registry refused our credentials."""
    status = 401


class Forbidden(OllamaError):
    """The Host header or origin is not allowed."""
    status = 403


class NotFound(OllamaError):
    """No such model, blob or route."""
    status = 404


class Canceled(OllamaError):
    """The client went away before the answer was done."""
    status = 499


class Busy(OllamaError):
    """The request queue is full."""
    status = 503


###############################################################################
# Utilities ###################################################################
###############################################################################

_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
FOREVER = float("inf")


def parse_duration(text):
    """Parse a Go duration string ("5m", "1h30m", "-1m", "0") into seconds; ValueError if invalid."""
    s = text.strip()
    sign = -1.0 if s.startswith("-") else 1.0
    s = s.lstrip("+-")
    if s == "0":
        return 0.0
    pos, total = 0, 0.0
    for m in _DURATION_RE.finditer(s):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _DURATION_UNITS[m.group(2)]
        pos = m.end()
    if pos != len(s) or not s:
        raise ValueError("time: invalid duration %s" % json.dumps(text))
    return sign * total


def parse_keep_alive(value, default):
    """keep_alive as Ollama reads it: number = seconds, string = Go duration (or integer seconds
    from the environment); negative = forever (inf). None means the default. Raises BadRequest."""
    if value is None:
        return default
    if isinstance(value, bool):
        raise BadRequest("invalid keep_alive: %s" % json.dumps(value))
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        try:
            seconds = parse_duration(value)
        except ValueError:
            try:
                seconds = float(int(value))
            except ValueError:
                raise BadRequest("time: invalid duration %s" % json.dumps(value)) from None
    else:
        raise BadRequest("invalid keep_alive: %s" % json.dumps(value))
    return FOREVER if seconds < 0 else seconds


def format_duration(seconds):
    """Go's Duration.String(): 1h2m3.5s, 4.2ms, 1.23µs, 0s."""
    ns = int(round(seconds * 1e9))
    if ns == 0:
        return "0s"
    sign, ns = ("-", -ns) if ns < 0 else ("", ns)
    if ns < 1000:
        return "%s%dns" % (sign, ns)
    if ns < 1000_000:
        return sign + _trim_float(ns / 1e3) + "µs"
    if ns < 1000_000_000:
        return sign + _trim_float(ns / 1e6) + "ms"
    h, rem = divmod(ns, 3600 * 10**9)
    m, rem = divmod(rem, 60 * 10**9)
    out = sign
    if h:
        out += "%dh" % h
    if h or m:
        out += "%dm" % m
    return out + _trim_float(rem / 1e9) + "s"


def _trim_float(x):
    text = ("%.9f" % x).rstrip("0").rstrip(".")
    return text or "0"


def human_bytes(n):
    """Ollama's format.HumanBytes: SI units, "4.7 GB", "934 MB", "12 KB", "512 B"."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            value = n / size
            if value >= 10 or value == int(value):
                return "%d %s" % (value, unit)
            return "%.1f %s" % (value, unit)
    return "%d B" % n


def _human_duration(seconds):
    s = int(seconds)
    if s < 1:
        return "Less than a second"
    if s == 1:
        return "1 second"
    if s < 60:
        return "%d seconds" % s
    minutes = s // 60
    if minutes == 1:
        return "About a minute"
    if minutes < 60:
        return "%d minutes" % minutes
    hours = int(round(seconds / 3600))
    if hours == 1:
        return "About an hour"
    if hours < 48:
        return "%d hours" % hours
    if hours < 24 * 7 * 2:
        return "%d days" % (hours // 24)
    if hours < 24 * 30 * 2:
        return "%d weeks" % (hours // 24 // 7)
    if hours < 24 * 365 * 2:
        return "%d months" % (hours // 24 // 30)
    return "%d years" % (hours // 24 // 365)


def human_time(when, now=None):
    """Ollama's format.HumanTime: "2 days ago", "About a minute ago", "4 minutes from now", "Forever"."""
    delta = (time.time() if now is None else now) - when
    if delta / 86400 / 365 < -20:
        return "Forever"
    if delta < 0:
        return _human_duration(-delta) + " from now"
    return _human_duration(delta) + " ago"


def rfc3339(ts=None):
    """Timestamp as Go's time.RFC3339Nano in UTC: 2023-08-04T19:22:45.499127Z."""
    dt = datetime.datetime.fromtimestamp(time.time() if ts is None else ts, datetime.timezone.utc)
    text = dt.strftime("%Y-%m-%dT%H:%M:%S.%f").rstrip("0").rstrip(".")
    return text + "Z"


def rfc3339_local(ts):
    """A local timestamp with offset, as Ollama writes modified_at: 2024-05-01T10:00:00.123+02:00."""
    dt = datetime.datetime.fromtimestamp(ts).astimezone()
    frac = dt.strftime("%f").rstrip("0")
    off = dt.strftime("%z")
    off = "Z" if off in ("+0000", "-0000") else off[:3] + ":" + off[3:]
    return dt.strftime("%Y-%m-%dT%H:%M:%S") + ("." + frac if frac else "") + off


def json_dumps(obj):
    """Compact JSON, non-ASCII kept, as Go's encoder writes it (without HTML escaping)."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def atomic_write(path, data, mode=0o644):
    """Write bytes to path so that a crash leaves either the old or the new file: temp + fsync + rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name + ".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        _unlink(tmp)
        raise


def _fsync_dir(path):
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _unlink(path):
    try:
        os.unlink(str(path))
    except FileNotFoundError:
        pass


###############################################################################
# Names #######################################################################
###############################################################################

_PART_RE = {
    "host": re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:-]{0,349}$"),
    "namespace": re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]{0,79}$"),
    "model": re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,79}$"),
    "tag": re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,79}$"),
}
_DIGEST_RE = re.compile(r"^sha256[:-]([0-9a-fA-F]{64})$")


class Name:
    """A model name, host/namespace/model:tag, parsed as Ollama's types/model.ParseName does.

    Missing parts take the defaults registry.ollama.ai, library and latest. `scheme` is "https"
    unless the name was written with "http://". Parsing keeps case; comparisons ignore it.
    """
    __slots__ = ("scheme", "host", "namespace", "model", "tag")

    def __init__(self, host, namespace, model, tag, scheme="https"):
        self.scheme, self.host, self.namespace, self.model, self.tag = scheme, host, namespace, model, tag

    @classmethod
    def parse(cls, text):
        """Parse and fill defaults; raises BadRequest("invalid model name") if not valid."""
        name = cls.parse_bare(text)
        if name is None or not name.is_valid():
            raise BadRequest("invalid model name")
        return name

    @classmethod
    def parse_bare(cls, text):
        """Parse without validating; empty parts become "!MISSING!" (never valid). None for non-strings."""
        if not isinstance(text, str):
            return None
        s, scheme = text, "https"
        if "://" in s:
            scheme, s = s.split("://", 1)
        tag = DEFAULT_TAG
        colon, slash = s.rfind(":"), s.rfind("/")
        if colon > slash:
            s, tag = s[:colon], s[colon + 1:] or "!MISSING!"
        parts = s.split("/")
        if len(parts) > 3:
            return cls("!MISSING!", "!MISSING!", "!MISSING!", tag, scheme)
        model = parts[-1] or "!MISSING!"
        namespace = (parts[-2] or "!MISSING!") if len(parts) >= 2 else DEFAULT_NAMESPACE
        host = (parts[-3] or "!MISSING!") if len(parts) == 3 else DEFAULT_REGISTRY
        return cls(host, namespace, model, tag, scheme)

    def is_valid(self):
        return all(_PART_RE[k].match(getattr(self, k)) for k in ("host", "namespace", "model", "tag")) \
            and ".." not in self.host

    def parts(self):
        """The manifest path parts under manifests/: [host, namespace, model, tag]."""
        return [self.host, self.namespace, self.model, self.tag]

    def key(self):
        """Case-folded identity used for comparisons."""
        return tuple(p.lower() for p in self.parts())

    def __eq__(self, other):
        return isinstance(other, Name) and self.key() == other.key()

    def __hash__(self):
        return hash(self.key())

    def __str__(self):
        return "%s/%s/%s:%s" % (self.host, self.namespace, self.model, self.tag)

    def __repr__(self):
        return "Name(%r)" % str(self)

    def display(self):
        """DisplayShortest: drop the default host, then the library namespace; always keep :tag."""
        out = self.model + ":" + self.tag
        if self.host.lower() != DEFAULT_REGISTRY:
            return "%s/%s/%s" % (self.host, self.namespace, out)
        if self.namespace.lower() != DEFAULT_NAMESPACE:
            return "%s/%s" % (self.namespace, out)
        return out

    def repository(self):
        """<namespace>/<model>, the OCI repository path."""
        return "%s/%s" % (self.namespace, self.model)


def parse_digest(text):
    """Normalise "sha256:<hex>" or "sha256-<hex>" to "sha256:<lowercase hex>"; BadRequest otherwise."""
    m = _DIGEST_RE.match(text or "") if isinstance(text, str) else None
    if not m:
        raise BadRequest("invalid digest format")
    return "sha256:" + m.group(1).lower()


###############################################################################
# Store #######################################################################
###############################################################################

class Store:
    """Ollama's on-disk model store under OLLAMA_MODELS.

    blobs/sha256-<hex>                          content-addressed files (0644)
    manifests/<host>/<namespace>/<model>/<tag>  OCI image manifests (JSON)

    Invariants, kept across crashes: a blob's bytes always match its name (written to a temp
    file, hashed, fsynced, renamed); a manifest is written only after all its blobs exist and
    is replaced atomically; deletion removes the manifest before any blob.
    """

    def __init__(self, root):
        self.root = Path(root)
        self.blobs = self.root / "blobs"
        self.manifests = self.root / "manifests"
        self.lock = threading.RLock()      # held across "blobs present? -> write manifest" and deletes

    # -- blobs ---------------------------------------------------------------
    def blob_path(self, digest):
        """Path of a blob: blobs/sha256-<hex>. The digest is validated, so no path can escape."""
        return self.blobs / parse_digest(digest).replace(":", "-")

    def has_blob(self, digest):
        return self.blob_path(digest).is_file()

    def blob_size(self, digest):
        return self.blob_path(digest).stat().st_size

    def temp_blob(self):
        """Open a new temp file inside blobs/ (same filesystem, so the final rename is atomic)."""
        self.blobs.mkdir(parents=True, exist_ok=True, mode=0o755)
        fd, tmp = tempfile.mkstemp(dir=self.blobs, prefix="sha256-tmp-")
        return os.fdopen(fd, "wb"), Path(tmp)

    def write_blob(self, stream, expected=None, length=None, progress=None):
        """Copy a byte stream into the store, hashing as it goes. Returns (digest, size).

        With `expected`, a mismatch raises BadRequest and nothing is kept. `length` bounds the
        read (a Content-Length). `progress(n)` is called with the bytes written so far.
        On any error (a full disk included) the temp file is removed and the store is unchanged.
        """
        h, size = hashlib.sha256(), 0
        f, tmp = self.temp_blob()
        try:
            with f:
                while length is None or size < length:
                    chunk = stream.read(COPY_CHUNK if length is None else min(COPY_CHUNK, length - size))
                    if not chunk:
                        break
                    h.update(chunk)
                    f.write(chunk)
                    size += len(chunk)
                    if progress:
                        progress(size)
                if length is not None and size < length:
                    raise BadRequest("unexpected end of body: got %d of %d bytes" % (size, length))
                f.flush()
                os.fsync(f.fileno())
            digest = "sha256:" + h.hexdigest()
            if expected is not None and parse_digest(expected) != digest:
                raise BadRequest('digest mismatch, expected "%s", got "%s"' % (parse_digest(expected), digest))
            self.commit_blob(tmp, digest)
            return digest, size
        except BaseException:
            _unlink(tmp)
            raise

    def write_blob_bytes(self, data):
        """Store bytes; returns (digest, size)."""
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if not self.has_blob(digest):
            f, tmp = self.temp_blob()
            try:
                with f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                self.commit_blob(tmp, digest)
            except BaseException:
                _unlink(tmp)
                raise
        return digest, len(data)

    def commit_blob(self, tmp, digest):
        """Rename a fully written, verified temp file to its digest name (0644)."""
        os.chmod(str(tmp), 0o644)
        os.replace(str(tmp), str(self.blob_path(digest)))
        _fsync_dir(self.blobs)

    # -- manifests -----------------------------------------------------------
    def manifest_path(self, name):
        return self.manifests.joinpath(*name.parts())

    def resolve(self, name):
        """The stored spelling of `name` (Name or str), matched case-insensitively; None if absent."""
        if isinstance(name, str):
            name = Name.parse(name)
        path = self.manifest_path(name)
        if path.is_file():
            return name
        for n, _ in self._walk_manifests():
            if n == name:
                return n
        return None

    def get(self, name):
        """(Name as stored, raw manifest bytes, parsed manifest) or NotFound("model 'X' not found")."""
        text = name if isinstance(name, str) else name.display()
        found = self.resolve(name)
        if found is None:
            raise NotFound("model '%s' not found" % text)
        raw = self.manifest_path(found).read_bytes()
        return found, raw, json.loads(raw)

    def write_manifest(self, name, manifest):
        """Write a manifest (dict, or raw bytes as pulled) atomically, after checking every blob it
        names is present. Returns the raw bytes. An existing differently-cased spelling is reused."""
        raw = manifest if isinstance(manifest, bytes) else (json_dumps(manifest) + "\n").encode()
        data = json.loads(raw)
        with self.lock:
            for d in manifest_digests(data):
                if not self.has_blob(d):
                    raise OllamaError("blob %s is missing; manifest not written" % d)
            name = self.resolve(name) or name
            atomic_write(self.manifest_path(name), raw)
        return raw

    def list(self):
        """Every stored model: [(Name, raw bytes, manifest dict, mtime)], skipping corrupt manifests."""
        out = []
        for name, path in self._walk_manifests():
            try:
                raw = path.read_bytes()
                out.append((name, raw, json.loads(raw), path.stat().st_mtime))
            except (OSError, ValueError) as e:
                log.warning("skipping unreadable manifest %s: %s", path, e)
        return out

    def _walk_manifests(self):
        root = self.manifests
        if not root.is_dir():
            return
        for dirpath, _dirs, files in os.walk(root):
            rel = Path(dirpath).relative_to(root).parts
            if len(rel) != 3:
                continue
            for tag in files:
                if tag.startswith("."):
                    continue
                name = Name(rel[0], rel[1], rel[2], tag)
                if name.is_valid():
                    yield name, Path(dirpath) / tag

    def referenced(self, exclude=None):
        """Every digest named by a stored manifest (except the manifest of `exclude`)."""
        refs = set()
        for name, _raw, data, _mtime in self.list():
            if exclude is None or name != exclude:
                refs.update(manifest_digests(data))
        return refs

    def delete(self, name):
        """Remove a model: its manifest, then empty folders, then the blobs no other model uses."""
        with self.lock:
            found, _raw, data = self.get(name)
            path = self.manifest_path(found)
            path.unlink()
            _fsync_dir(path.parent)
            self._prune_dirs(path.parent)
            self.remove_unused(manifest_digests(data))
        return found

    def remove_unused(self, digests):
        """Delete those of `digests` that no remaining manifest references."""
        with self.lock:
            refs = self.referenced()
            for d in set(digests) - refs:
                _unlink(self.blob_path(d))

    def _prune_dirs(self, d):
        while d != self.manifests and self.manifests in d.parents:
            try:
                d.rmdir()
            except OSError:
                break
            d = d.parent


def manifest_digests(manifest):
    """The config digest and every layer digest of a manifest dict."""
    out = [layer["digest"] for layer in manifest.get("layers") or []]
    config = manifest.get("config") or {}
    if config.get("digest"):
        out.append(config["digest"])
    return out


###############################################################################
# GGUF ########################################################################
###############################################################################


###############################################################################
# Modelfile ###################################################################
###############################################################################


###############################################################################
# Templates ###################################################################
###############################################################################


###############################################################################
# Registry ####################################################################
###############################################################################

# -- keys: ed25519 (RFC 8032) and the OpenSSH key files ------------------------


# -- registry client: OCI distribution pull and push ---------------------------
#
# Names, media types and digest checks are small functions so that a future `serve` can answer
# as a read-only OCI registry with the same rules it uses to fetch.

MEDIA_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MANIFEST_MEDIA_TYPES = (MEDIA_MANIFEST, MEDIA_OCI_MANIFEST)
_STRICT_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
_PART_FILE_RE = re.compile(r"-partial-(\d+)$")
DOWNLOAD_PARTS = 16                 # parts per blob; Ollama's numDownloadParts
PART_SIZE_MIN = 100 * 1000 ** 2     # bytes; Ollama's minDownloadPartSize (100 MB, SI)
PART_SIZE_MAX = 1000 * 1000 ** 2    # bytes; Ollama's maxDownloadPartSize
OLLAMA_REGISTRY_HOSTS = ("registry.ollama.ai", "ollama.com")


def registry_base_url(name, insecure=False):
    """scheme://host of the registry holding `name`: https, or http when `insecure` is set.
    A name written with http:// needs `insecure`, else OllamaError("insecure protocol http")."""
    if name.scheme == "http" and not insecure:
        raise OllamaError("insecure protocol http")
    return "%s://%s" % ("http" if insecure else "https", name.host)


def manifest_url(base, name):
    """/v2/<namespace>/<model>/manifests/<tag> under a registry base URL."""
    return "%s/v2/%s/manifests/%s" % (base, name.repository(), name.tag)


def blob_url(base, repository, digest):
    """/v2/<namespace>/<model>/blobs/<digest> under a registry base URL."""
    return "%s/v2/%s/blobs/%s" % (base, repository, digest)


def is_strict_digest(value):
    """True for "sha256:" + 64 lowercase hex, the only digest form a manifest may name."""
    return isinstance(value, str) and bool(_STRICT_DIGEST_RE.match(value))


def parse_manifest(raw):
    """Validate manifest bytes before anything is written; returns the dict.

    A JSON object, schemaVersion 2, a config and layers that are objects with a strict sha256
    digest (so no digest can name a path outside blobs/) and a non-negative integer size.
    Raises OllamaError("invalid manifest: ...").
    """
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise OllamaError("invalid manifest: not JSON: %s" % e) from None
    if not isinstance(data, dict):
        raise OllamaError("invalid manifest: not a JSON object")
    if data.get("schemaVersion") != 2 or isinstance(data.get("schemaVersion"), bool):
        raise OllamaError("invalid manifest: schemaVersion must be 2")
    media = data.get("mediaType")
    if media is not None and media not in MANIFEST_MEDIA_TYPES:
        raise OllamaError("invalid manifest: unsupported media type %s" % json.dumps(media))
    layers = data.get("layers")
    if not isinstance(layers, list):
        raise OllamaError("invalid manifest: layers must be a list")
    config = data.get("config")
    for desc in layers + ([config] if config is not None else []):
        if not isinstance(desc, dict):
            raise OllamaError("invalid manifest: layer is not an object")
        if not is_strict_digest(desc.get("digest")):
            raise OllamaError("invalid manifest: invalid digest %s" % json.dumps(desc.get("digest"))[:100])
        size = desc.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise OllamaError("invalid manifest: invalid size for %s" % desc["digest"])
    return data


def manifest_layers(manifest):
    """The layer descriptors plus the config descriptor (last), each digest once."""
    out, seen = [], set()
    for desc in list(manifest.get("layers") or []) + [manifest.get("config") or {}]:
        if desc.get("digest") and desc["digest"] not in seen:
            seen.add(desc["digest"])
            out.append(desc)
    return out


def file_digest(path):
    """"sha256:<hex>" of a file's bytes."""
    h = hashlib.sha256()
    with open(str(path), "rb") as f:
        for chunk in iter(lambda: f.read(COPY_CHUNK), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def digest_mismatch(want, got):
    """Ollama's errDigestMismatch text."""
    return OllamaError("digest mismatch, file must be downloaded again: want %s, got %s" % (want, got))


def part_size(total, parts=DOWNLOAD_PARTS, lo=PART_SIZE_MIN, hi=PART_SIZE_MAX):
    """Bytes per download/upload part: total/parts clamped to [lo, hi], as Ollama does."""
    return max(lo, min(hi, total // parts)) or 1


def docker_credentials(host, environ=None):
    """(user, password) for `host` from the docker config's "auths" (DOCKER_CONFIG or
    ~/.docker/config.json, written by `docker login`), or None. credsStore helpers are not used."""
    env = os.environ if environ is None else environ
    folder = Path(env.get("DOCKER_CONFIG") or Path(env.get("HOME") or Path.home()) / ".docker")
    try:
        auths = json.loads((folder / "config.json").read_bytes()).get("auths") or {}
    except (OSError, ValueError, AttributeError):
        return None
    for key, entry in auths.items():
        key_host = urllib.parse.urlsplit(key if "://" in key else "//" + key).netloc
        if key_host.lower() != host.lower() or not isinstance(entry, dict):
            continue
        if entry.get("auth"):
            try:
                user, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
                return user, password
            except (ValueError, UnicodeDecodeError):
                continue
        if entry.get("username"):
            return entry["username"], entry.get("password", "")
    return None


def _ollama_signature(config, method, url):
    """The Authorization value Ollama's registry wants for a token request:
    "<pubkey-b64>:<base64(ed25519 signature)>" over "METHOD,URL,base64(hex(sha256(empty body)))",
    made with ~/.ollama/id_ed25519 by the keys subsection."""
    ensure, sign = globals().get("ensure_keypair"), globals().get("sign_challenge")
    if ensure is None or sign is None:
        raise OllamaError("signing requests for %s needs the ed25519 key support, which this "
                          "build lacks" % urllib.parse.urlsplit(url).hostname)
    body_hash = base64.b64encode(hashlib.sha256(b"").hexdigest().encode()).decode()
    return sign(ensure(config.home), ("%s,%s,%s" % (method, url, body_hash)).encode())


def _parse_challenge(header):
    """WWW-Authenticate "Bearer realm=...,service=...,scope=..." -> ("bearer", {params})."""
    scheme, _, rest = (header or "").strip().partition(" ")
    params = {k.lower(): v for k, v in re.findall(r'(\w+)="([^"]*)"', rest)}
    params.update({k.lower(): v for k, v in re.findall(r'(\w+)=([^",\s]+)', rest)})
    return scheme.lower(), params


def _pwrite(fd, data, offset):
    """Write all of `data` at `offset` (a seam for fault tests: a full disk raises ENOSPC here)."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


class _KeepAuthOnSameHost(urllib.request.HTTPRedirectHandler):
    """Follow redirects; the registry's Authorization goes along only to the same scheme+host+port
    (blob storage elsewhere gets a plain request, as Ollama does)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        auth = req.unredirected_hdrs.get("Authorization")
        if new is not None and auth:
            old, nxt = urllib.parse.urlsplit(req.full_url), urllib.parse.urlsplit(new.full_url)
            if (old.scheme, old.netloc.lower()) == (nxt.scheme, nxt.netloc.lower()):
                new.add_unredirected_header("Authorization", auth)
        return new


class RegistrySession:
    """HTTP to one registry for one pull or push: auth (Bearer token, Basic from the docker config,
    Ollama's signed tokens for registry.ollama.ai), redirects, proxies (HTTPS_PROXY/NO_PROXY via
    urllib) and TLS with the system CAs (SSL_CERT_FILE honoured by the default context).
    Credentials are only sent to the registry's own host and never logged."""

    def __init__(self, config, name, insecure=False, timeout=30.0):
        self.config, self.name, self.insecure, self.timeout = config, name, insecure, timeout
        self.base = registry_base_url(name, insecure)
        self.netloc = urllib.parse.urlsplit(self.base).netloc.lower()
        self.auth = None                # Authorization header value once a challenge was answered
        self.auth_lock = threading.Lock()
        self.opener = urllib.request.build_opener(_KeepAuthOnSameHost())
        self.user_agent = "ollama.py/%s (%s %s) Python/%s" % (
            __version__, getattr(os.uname(), "machine", ""), sys.platform, sys.version.split()[0])

    def request(self, method, url, headers=None, body=None, allow=()):
        """Send one request, answering one 401 challenge; returns the open response (caller closes).
        Statuses in `allow` are returned; 404 raises NotFound("file does not exist"), other >= 400
        OllamaError("<code>: <body>"), a second 401 Unauthorized("unauthorized: access denied")."""
        for attempt in (0, 1):
            resp = self._open(method, url, headers, body)
            status = resp.status
            if status in allow or status < 400:
                return resp
            text = _read_error(resp)
            if status == 401 and attempt == 0 and self._answer(resp.headers.get("WWW-Authenticate"), url):
                if hasattr(body, "seek"):
                    body.seek(0)
                continue
            if status == 401:
                hint = "" if self.auth else "; no credentials for %s (add them with 'docker login %s')" % (
                    self.name.host, self.name.host)
                raise Unauthorized("unauthorized: access denied" + hint)
            if status == 404:
                raise NotFound("file does not exist")
            raise OllamaError("%d: %s" % (status, text))
        raise Unauthorized("unauthorized: access denied")          # pragma: no cover

    def _open(self, method, url, headers, body, auth=True):
        req = urllib.request.Request(url, data=body, method=method, headers=dict(headers or {}))
        req.add_header("User-Agent", self.user_agent)
        if auth and self.auth and urllib.parse.urlsplit(url).netloc.lower() == self.netloc:
            req.add_unredirected_header("Authorization", self.auth)
        try:
            return self.opener.open(req, timeout=self.timeout)
        except urllib.error.HTTPError as e:
            return e
        except urllib.error.URLError as e:
            reason = e.reason
            if isinstance(reason, ssl.SSLError) and getattr(reason, "reason", "") in (
                    "WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "HTTP_REQUEST", "PACKET_LENGTH_TOO_LONG"):
                raise OllamaError("insecure protocol http: %s answers plain HTTP; use --insecure to allow "
                                  "it" % self.name.host) from None
            text = getattr(reason, "strerror", None) or str(reason)
            raise OllamaError('%s "%s": %s' % (method.title(), url, text)) from None
        except (socket.timeout, http.client.HTTPException, OSError) as e:
            raise OllamaError('%s "%s": %s' % (method.title(), url, e or type(e).__name__)) from None

    def _answer(self, header, url):
        """Set self.auth from a 401 challenge; False when there is nothing to try."""
        scheme, params = _parse_challenge(header)
        creds = docker_credentials(self.name.host)
        with self.auth_lock:
            if scheme == "basic":
                if not creds or self.auth:
                    return False
                self.auth = "Basic " + base64.b64encode(("%s:%s" % creds).encode()).decode()
                return True
            if scheme != "bearer" or not params.get("realm"):
                return False
            self.auth = "Bearer " + self._token(params, creds)
            return True

    def _token(self, params, creds):
        query = [("service", params["service"])] if params.get("service") else []
        query += [("scope", s) for s in params.get("scope", "").split() if s]
        query += [("ts", str(int(time.time()))),
                  ("nonce", base64.urlsafe_b64encode(secrets.token_bytes(16)).decode().rstrip("="))]
        realm = params["realm"]
        url = realm + ("&" if "?" in realm else "?") + urllib.parse.urlencode(query)
        headers = {}
        realm_host = urllib.parse.urlsplit(realm).hostname or ""
        if creds:
            headers["Authorization"] = "Basic " + base64.b64encode(("%s:%s" % creds).encode()).decode()
        elif self.name.host.lower() in OLLAMA_REGISTRY_HOSTS:
            if realm_host.lower() != (urllib.parse.urlsplit(self.base).hostname or "").lower():
                raise OllamaError("unauthorized: realm host %s does not match %s" % (realm_host, self.name.host))
            headers["Authorization"] = _ollama_signature(self.config, "GET", url)
        resp = self._open("GET", url, headers, None, auth=False)
        with resp:
            data = resp.read()
        if resp.status == 401:
            raise Unauthorized("unauthorized: access denied; the token server at %s refused %s" % (
                realm_host, "the credentials from the docker config" if creds else "anonymous access"))
        if resp.status >= 400:
            raise OllamaError("%d: %s" % (resp.status, data.decode(errors="replace").strip()))
        try:
            info = json.loads(data)
            return info.get("token") or info["access_token"]
        except (ValueError, KeyError, TypeError, AttributeError):
            raise OllamaError("unauthorized: the token server at %s sent no token" % realm_host) from None


def _read_error(resp):
    try:
        with resp:
            return resp.read(4096).decode(errors="replace").strip()
    except (OSError, http.client.HTTPException, AttributeError):
        return ""


class Transfers:
    """The server's registry transfer state: one shared download per digest (two pulls of the same
    blob share it), plus the knobs below (tests shrink them)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.jobs = {}                      # digest -> _BlobDownload
        self.parts = DOWNLOAD_PARTS
        self.part_min = PART_SIZE_MIN       # bytes
        self.part_max = PART_SIZE_MAX       # bytes
        self.max_parallel = DOWNLOAD_PARTS  # concurrent part requests per blob
        self.retries = 6                    # tries per part (a stall counts as a try, without the sleep)
        self.backoff = 1.0                  # seconds; sleep backoff * 2^try, capped at backoff_max
        self.backoff_max = 30.0             # seconds
        self.stall_timeout = 30.0           # seconds without a byte before a part is retried
        self.progress_interval = 0.06       # seconds between progress updates (Ollama's 60 ms)
        self.checkpoint_interval = 1.0      # seconds between fsync + part-file updates

    def acquire(self, digest, factory):
        """The running download of `digest`, or a new one from factory() (started); hold it with
        release() when done. A download whose callers all went away is cancelled."""
        while True:
            with self.lock:
                job = self.jobs.get(digest)
                if job is None:
                    job = self.jobs[digest] = factory()
                    job.refs = 1
                    job.start()
                    return job
                if not job.cancelled.is_set():
                    job.refs += 1
                    return job
            job.thread.join()               # a cancelled download is still unwinding
            with self.lock:
                if self.jobs.get(digest) is job:
                    del self.jobs[digest]

    def release(self, job):
        with self.lock:
            job.refs -= 1
            if job.refs > 0:
                return
            job.cancelled.set()
            if not job.thread.is_alive() and self.jobs.get(job.digest) is job:
                del self.jobs[job.digest]


def _transfers(server):
    """The Transfers object of an OllamaServer (created on first use; dict.setdefault is atomic)."""
    return vars(server).setdefault("transfers", Transfers())


class _Part:
    """One byte range of a download, stored as Ollama's blobs/sha256-<hex>-partial-<N> JSON."""
    __slots__ = ("n", "offset", "size", "completed")

    def __init__(self, n, offset, size, completed=0):
        self.n, self.offset, self.size, self.completed = n, offset, size, completed

    def to_json(self):
        return (json_dumps({"N": self.n, "Offset": self.offset, "Size": self.size,
                            "Completed": self.completed}) + "\n").encode()


class _BlobDownload:
    """Fetch one blob into blobs/sha256-<hex>-partial in parallel byte ranges, resumable.

    Progress lives on disk in Ollama's format (a sparse data file truncated to the total, plus
    one JSON per part); a part's Completed is only raised after its bytes are fdatasync'ed, so a
    crash or reboot at any moment resumes without refetching what is on disk. finish() verifies
    the sha256 and renames the data into place; a mismatch deletes it.
    """

    def __init__(self, transfers, store, session, repository, digest, size):
        self.t, self.store, self.session = transfers, store, session
        self.digest, self.total = digest, size
        self.url = blob_url(session.base, repository, digest)
        self.path = store.blob_path(digest)
        self.partial = Path(str(self.path) + "-partial")
        self.parts, self.refs, self.fd = [], 0, None
        self.lock = threading.Lock()        # guards completed counts and part files
        self.completed = 0
        self.done, self.cancelled, self.abort = threading.Event(), threading.Event(), threading.Event()
        self.error, self.verified = None, None
        self.finish_lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, name="pull-" + digest[7:19], daemon=True)

    def start(self):
        self.thread.start()

    def _run(self):
        try:
            self._prepare()
            self._download()
        except BaseException as e:          # reported to every waiter
            self.error = e
        finally:
            if self.fd is not None:
                os.close(self.fd)
                self.fd = None
            self.done.set()
            if self.cancelled.is_set():
                with self.t.lock:
                    if self.t.jobs.get(self.digest) is self:
                        del self.t.jobs[self.digest]

    def _part_files(self):
        prefix = self.partial.name + "-"
        return [p for p in self.store.blobs.glob(prefix + "*") if _PART_FILE_RE.search(p.name)
                and p.name[len(prefix):].isdigit()]

    def _load_parts(self):
        """The parts recorded on disk, or None when absent or inconsistent (then start over)."""
        files = self._part_files()
        if not files:
            return None
        parts = []
        try:
            for f in files:
                d = json.loads(f.read_bytes())
                part = _Part(d["N"], d["Offset"], d["Size"], d["Completed"])
                if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                           for v in (part.n, part.offset, part.size, part.completed)) \
                        or part.completed > part.size or f.name != "%s-%d" % (self.partial.name, part.n):
                    raise ValueError("bad part")
                parts.append(part)
            parts.sort(key=lambda p: p.offset)
            offset = 0
            for i, part in enumerate(parts):
                if part.offset != offset or part.n != i:
                    raise ValueError("parts do not tile the blob")
                offset += part.size
            if offset != self.total or self.partial.stat().st_size != self.total:
                raise ValueError("size changed")
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("discarding partial download of %s: %s", self.digest[7:19], e)
            return None
        return parts

    def _prepare(self):
        self.store.blobs.mkdir(parents=True, exist_ok=True, mode=0o755)
        parts = self._load_parts()
        if parts is None:
            for f in self._part_files():
                _unlink(f)
            _unlink(self.partial)
            size = part_size(self.total, self.t.parts, self.t.part_min, self.t.part_max)
            parts = [_Part(i, off, min(size, self.total - off))
                     for i, off in enumerate(range(0, self.total, size))]
        self.fd = os.open(str(self.partial), os.O_RDWR | os.O_CREAT, 0o644)
        if os.fstat(self.fd).st_size != self.total:
            os.ftruncate(self.fd, self.total)           # sparse: Ollama's layout
        for part in parts:
            atomic_write("%s-%d" % (self.partial, part.n), part.to_json())
        self.parts = parts
        self.completed = sum(p.completed for p in parts)
        if parts:
            log.info("downloading %s in %d %s part(s), %s already on disk", self.digest[7:19], len(parts),
                     human_bytes(parts[0].size), human_bytes(self.completed))

    def _download(self):
        todo = [p for p in self.parts if p.completed < p.size]
        errors = []

        def worker(queue):
            while queue and not self.abort.is_set():
                try:
                    part = queue.pop()
                except IndexError:
                    return
                try:
                    self._fetch_part(part)
                except BaseException as e:
                    errors.append(e)
                    self.abort.set()

        queue = list(reversed(todo))
        threads = [threading.Thread(target=worker, args=(queue,), daemon=True)
                   for _ in range(min(len(todo), self.t.max_parallel))]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        if self.cancelled.is_set():
            raise Canceled("request canceled")
        if errors:
            fatal = [e for e in errors if not isinstance(e, Canceled)]
            raise (fatal or errors)[0]
        os.fsync(self.fd)

    def _stopped(self):
        return self.abort.is_set() or self.cancelled.is_set()

    def _fetch_part(self, part):
        tries = 0
        while part.completed < part.size:
            if self._stopped():
                raise Canceled("request canceled")
            try:
                self._fetch_range(part)
            except OSError as e:
                if e.errno == errno.ENOSPC:
                    raise OllamaError("no space left on device while writing %s (%s of %s kept; pull again "
                                      "to resume)" % (self.partial.name, human_bytes(self.completed),
                                                      human_bytes(self.total))) from None
                err, stalled = e, isinstance(e, socket.timeout)
            except (OllamaError, http.client.HTTPException, ValueError) as e:
                if isinstance(e, (Unauthorized, Canceled)):
                    raise
                err, stalled = e, False
            else:
                continue
            tries += 1
            if tries >= self.t.retries:
                raise OllamaError("max retries exceeded: %s" % (err or type(err).__name__))
            if stalled:
                log.info("%s part %d stalled; retrying", self.digest[7:19], part.n)
                continue
            delay = min(self.t.backoff * 2 ** (tries - 1), self.t.backoff_max)
            log.info("%s part %d attempt %d failed: %s, retrying in %s", self.digest[7:19], part.n, tries,
                     err, format_duration(delay))
            if self.cancelled.wait(delay) or self.abort.is_set():
                raise Canceled("request canceled")

    def _fetch_range(self, part):
        start, stop = part.offset + part.completed, part.offset + part.size
        resp = self.session.request("GET", self.url, {"Range": "bytes=%d-%d" % (start, stop - 1)})
        last = time.monotonic()
        try:
            skip = 0
            if resp.status == 206:
                got = re.match(r"bytes (\d+)-", resp.headers.get("Content-Range") or "")
                if not got or int(got.group(1)) != start:
                    raise ValueError("registry sent range %r for bytes=%d-" % (
                        resp.headers.get("Content-Range"), start))
            elif resp.status == 200:
                skip = start                # Range ignored: the body is the whole blob from byte 0
                if skip:
                    log.debug("%s: registry ignored Range; skipping %d bytes", self.digest[7:19], skip)
            else:
                raise OllamaError("unexpected status code %d" % resp.status)
            read = getattr(resp, "read1", resp.read)    # what has arrived: a stall loses no bytes
            while skip:
                chunk = read(min(COPY_CHUNK, skip))
                if not chunk:
                    raise ConnectionError("unexpected EOF")
                skip -= len(chunk)
            pos = start
            while pos < stop:
                if self._stopped():
                    return
                chunk = read(min(COPY_CHUNK, stop - pos))
                if not chunk:
                    raise ConnectionError("unexpected EOF")
                _pwrite(self.fd, chunk, pos)
                pos += len(chunk)
                with self.lock:
                    part.completed += len(chunk)
                    self.completed += len(chunk)
                if time.monotonic() - last >= self.t.checkpoint_interval:
                    self._checkpoint(part)
                    last = time.monotonic()
        finally:
            resp.close()
            try:
                self._checkpoint(part)
            except OSError as e:            # the old record stays valid: it claims fewer bytes
                log.warning("could not record progress of %s: %s", self.partial.name, e)

    def _checkpoint(self, part):
        """Make the written bytes durable, then record them (data before the claim)."""
        with self.lock:
            done = part.completed
        os.fdatasync(self.fd)
        record = _Part(part.n, part.offset, part.size, done)
        atomic_write("%s-%d" % (self.partial, part.n), record.to_json())

    def wait(self, progress, cancel=None):
        """Report progress every progress_interval until the download ends; raises its error."""
        status = "pulling %s" % self.digest[7:19]
        sent = None
        while True:
            finished = self.done.wait(self.t.progress_interval)
            if cancel is not None and cancel.is_set():
                raise Canceled("request canceled")
            if finished:
                break
            if self.parts and self.completed != sent:
                sent = self.completed
                progress({"status": status, "digest": self.digest, "total": self.total, "completed": sent})
        if self.error is not None:
            raise self.error
        progress({"status": status, "digest": self.digest, "total": self.total, "completed": self.total})

    def finish(self):
        """Verify the downloaded bytes and move them into place (once, whoever calls first)."""
        with self.finish_lock:
            if self.verified is None:
                try:
                    self._verify_and_commit()
                    self.verified = True
                except BaseException as e:
                    self.verified = e
            if self.verified is not True:
                raise self.verified

    def _verify_and_commit(self):
        if self.store.has_blob(self.digest):
            return
        got = file_digest(self.partial)
        if got != self.digest:
            for f in self._part_files():
                _unlink(f)
            _unlink(self.partial)
            raise digest_mismatch(self.digest, got)
        with open(str(self.partial), "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(str(self.partial), 0o644)
        os.replace(str(self.partial), str(self.path))
        _fsync_dir(self.store.blobs)
        for f in self._part_files():
            _unlink(f)


def pull_model(server, name, insecure=False, progress=None, cancel=None):
    """Pull `name` (Name or str) from its registry into server.store, reporting Ollama's pull
    statuses as dicts to progress(obj). Blobs already present are not fetched; a download in
    progress for the same digest is shared; interrupted downloads resume. The manifest is written
    last, byte for byte as received. `cancel` (threading.Event) stops it with Canceled."""
    progress = progress or (lambda obj: None)
    store, transfers = server.store, _transfers(server)
    if isinstance(name, str):
        name = Name.parse(name)
    old = set()
    stored = store.resolve(name)
    if stored is not None and not server.config.noprune:
        try:
            old = set(manifest_digests(store.get(stored)[2]))
        except (OSError, ValueError, OllamaError):
            pass
    if name.scheme == "http" and not insecure:
        raise OllamaError("insecure protocol http")
    progress({"status": "pulling manifest"})
    session = RegistrySession(server.config, name, insecure, transfers.stall_timeout)
    try:
        resp = session.request("GET", manifest_url(session.base, name),
                               {"Accept": ", ".join(MANIFEST_MEDIA_TYPES)})
        with resp:
            raw = resp.read()
        manifest = parse_manifest(raw)
    except OllamaError as e:
        cls = Unauthorized if isinstance(e, Unauthorized) else OllamaError   # others: 500, as Ollama
        raise cls("pull model manifest: %s" % e) from None
    except (OSError, http.client.HTTPException) as e:
        raise OllamaError("pull model manifest: %s" % e) from None

    jobs = []
    try:
        for desc in manifest_layers(manifest):
            digest = desc["digest"]
            if store.has_blob(digest):
                size = store.blob_size(digest)
                progress({"status": "pulling %s" % digest[7:19], "digest": digest, "total": size,
                          "completed": size})
                continue
            job = transfers.acquire(digest, lambda: _BlobDownload(
                transfers, store, session, name.repository(), digest, desc["size"]))
            jobs.append(job)
            job.wait(progress, cancel)
        progress({"status": "verifying sha256 digest"})
        for job in jobs:
            job.finish()
    finally:
        for job in jobs:
            transfers.release(job)
    progress({"status": "writing manifest"})
    store.write_manifest(name, raw)
    unused = old - set(manifest_digests(manifest))
    if unused:
        progress({"status": "removing unused layers"})
        store.remove_unused(unused)
    progress({"status": "success"})


class _FileSlice:
    """A readable, rewindable window of a file, reporting bytes read (an upload body)."""

    def __init__(self, f, offset, length, on_read):
        self.f, self.offset, self.length, self.on_read, self.pos = f, offset, length, on_read, 0

    def read(self, n=-1):
        n = self.length - self.pos if n is None or n < 0 else min(n, self.length - self.pos)
        if n <= 0:
            return b""
        self.f.seek(self.offset + self.pos)
        data = self.f.read(n)
        self.pos += len(data)
        self.on_read(len(data))
        return data

    def seek(self, pos, whence=0):
        self.on_read(-self.pos)
        self.pos = pos


def _upload_blob(session, store, name, desc, transfers, progress, cancel):
    digest, size = desc["digest"], desc["size"]
    status = "pushing %s" % digest[7:19]
    repo = name.repository()
    resp = session.request("HEAD", blob_url(session.base, repo, digest), allow=(404,))
    resp.close()
    if resp.status == 200:
        progress({"status": status, "digest": digest, "total": size, "completed": size})
        return
    query = ""
    source = Name.parse_bare(desc.get("from") or "")
    if source is not None and source.is_valid() and source.host.lower() == name.host.lower() \
            and source.repository().lower() != repo.lower():
        query = "?" + urllib.parse.urlencode({"mount": digest, "from": source.repository()})
    upload = "%s/v2/%s/blobs/uploads/%s" % (session.base, repo, query)
    resp = session.request("POST", upload, {"Content-Length": "0"}, b"")
    resp.close()
    if resp.status == 201:                              # mounted from the other repository
        progress({"status": status, "digest": digest, "total": size, "completed": size})
        return
    location = resp.headers.get("Docker-Upload-Location") or resp.headers.get("Location")
    if not location:
        raise OllamaError("registry gave no upload location for %s" % digest)
    location = urllib.parse.urljoin(upload, location)
    state = {"done": 0, "sent": 0.0}

    def on_read(n):
        state["done"] += n
        now = time.monotonic()
        if now - state["sent"] >= transfers.progress_interval:
            state["sent"] = now
            progress({"status": status, "digest": digest, "total": size, "completed": state["done"]})
        if cancel is not None and cancel.is_set():
            raise Canceled("request canceled")

    chunk = part_size(size, transfers.parts, transfers.part_min, transfers.part_max)
    with open(str(store.blob_path(digest)), "rb") as f:
        for offset in range(0, size, chunk):
            n = min(chunk, size - offset)
            body = _FileSlice(f, offset, n, on_read)
            resp = session.request("PATCH", location, {
                "Content-Type": "application/octet-stream", "Content-Length": str(n),
                "Content-Range": "%d-%d" % (offset, offset + n - 1)}, body)
            resp.close()
            location = urllib.parse.urljoin(location, resp.headers.get("Location") or location)
    split = urllib.parse.urlsplit(location)
    final = location + ("&" if split.query else "?") + urllib.parse.urlencode({"digest": digest})
    resp = session.request("PUT", final, {"Content-Length": "0"}, b"")
    resp.close()
    progress({"status": status, "digest": digest, "total": size, "completed": size})


def push_model(server, name, insecure=False, progress=None, cancel=None):
    """Push `name` (Name or str) from server.store to its registry: each blob the registry lacks
    (HEAD) is mounted or uploaded in PATCH chunks, then the manifest is PUT byte for byte as
    stored. Reports Ollama's push statuses as dicts to progress(obj)."""
    progress = progress or (lambda obj: None)
    transfers = _transfers(server)
    if isinstance(name, str):
        name = Name.parse(name)
    progress({"status": "retrieving manifest"})
    if name.scheme == "http" and not insecure:
        raise OllamaError("insecure protocol http")
    try:
        stored, raw, manifest = server.store.get(name)
        manifest = parse_manifest(raw)
    except OllamaError:
        progress({"status": "couldn't retrieve manifest"})
        raise
    session = RegistrySession(server.config, stored, insecure, transfers.stall_timeout)
    for desc in manifest_layers(manifest):
        _upload_blob(session, server.store, stored, desc, transfers, progress, cancel)
    progress({"status": "pushing manifest"})
    media = manifest.get("mediaType") or MEDIA_MANIFEST
    resp = session.request("PUT", manifest_url(session.base, stored), {"Content-Type": media}, raw)
    resp.close()
    progress({"status": "success"})


###############################################################################
# Runner ######################################################################
###############################################################################


###############################################################################
# Scheduler ###################################################################
###############################################################################


###############################################################################
# HTTP API ####################################################################
###############################################################################

class Response:
    """A complete, non-JSON (or non-200) answer: status, body bytes, content type, extra headers."""

    def __init__(self, status=200, body=b"", content_type="text/plain; charset=utf-8", headers=None):
        self.status, self.body, self.content_type = status, body, content_type
        self.headers = headers or {}


class Stream:
    """A streamed answer: `items` is an iterator of JSON-able objects, sent as they come.

    Sent with chunked transfer encoding, one `encode(item)` per chunk (NDJSON by default). An
    OllamaError raised before the first item becomes an ordinary JSON error with its status; one
    raised later becomes a final `error_item(message)` chunk, as Ollama does. When the client goes
    away the iterator is closed, so a generator's `finally` can cancel its work.
    """

    def __init__(self, items, content_type="application/x-ndjson",
                 encode=None, error_item=None, headers=None):
        self.items = iter(items)
        self.content_type = content_type
        self.encode = encode or (lambda obj: (json_dumps(obj) + "\n").encode())
        self.error_item = error_item or (lambda msg: {"error": msg})
        self.headers = headers or {}


class Request:
    """One API call as a handler sees it: method, path, route params, query, headers, body."""

    def __init__(self, handler, params):
        self.handler = handler
        self.server = handler.server
        self.method = handler.command
        url = urllib.parse.urlsplit(handler.path)
        self.path = url.path
        self.query = dict(urllib.parse.parse_qsl(url.query))
        self.headers = handler.headers
        self.params = params
        self._body = None

    def body_stream(self):
        """A file-like reader of the raw body (Content-Length or chunked); read once."""
        return _BodyReader(self.handler)

    def body(self):
        """The whole body as bytes."""
        if self._body is None:
            self._body = self.body_stream().read()
        return self._body

    def json(self):
        """The body parsed as a JSON object: 400 "missing request body" when empty, 400 on bad JSON."""
        raw = self.body()
        if not raw.strip():
            raise BadRequest("missing request body")
        try:
            data = json.loads(raw)
        except ValueError as e:
            raise BadRequest(str(e)) from None
        if not isinstance(data, dict):
            raise BadRequest("json: cannot unmarshal %s into Go value of type api.Request" % type(data).__name__)
        return data

    def client_gone(self):
        """True when the client closed its connection (checked without consuming data)."""
        sock = self.handler.connection
        try:
            sock.setblocking(False)
            try:
                return sock.recv(1, socket.MSG_PEEK) == b""
            finally:
                sock.setblocking(True)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return True


class _BodyReader:
    """Read a request body framed by Content-Length or by chunked transfer encoding."""

    def __init__(self, handler):
        self.rfile = handler.rfile
        self.chunked = "chunked" in (handler.headers.get("Transfer-Encoding") or "").lower()
        self.remaining = 0 if self.chunked else int(handler.headers.get("Content-Length") or 0)
        self.done = False

    def read(self, n=-1):
        out = []
        while (n < 0 or n > 0) and not self.done:
            if self.chunked and self.remaining == 0:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass                                   # trailers
                    self.done = True
                    break
                self.remaining = size
            if self.remaining == 0:
                self.done = True
                break
            want = self.remaining if n < 0 else min(n, self.remaining)
            data = self.rfile.read(want)
            if not data:
                raise BadRequest("unexpected end of request body")
            self.remaining -= len(data)
            if self.chunked and self.remaining == 0:
                self.rfile.readline()                          # CRLF after each chunk
            out.append(data)
            if n > 0:
                n -= len(data)
        return b"".join(out)


_LOOPBACK_NAMES = ("localhost",)
_DEFAULT_ORIGINS = ["http://localhost", "https://localhost", "http://localhost:*", "https://localhost:*",
                    "http://127.0.0.1", "https://127.0.0.1", "http://127.0.0.1:*", "https://127.0.0.1:*",
                    "http://0.0.0.0", "https://0.0.0.0", "http://0.0.0.0:*", "https://0.0.0.0:*",
                    "app://*", "file://*", "tauri://*", "vscode-webview://*", "vscode-file://*"]
_CORS_HEADERS = "Authorization, Content-Type, User-Agent, Accept, X-Requested-With, OpenAI-Beta, " \
                "x-stainless-arch, x-stainless-async, x-stainless-custom-poll-interval, " \
                "x-stainless-helper-method, x-stainless-lang, x-stainless-os, x-stainless-package-version, " \
                "x-stainless-poll-helper, x-stainless-retry-count, x-stainless-runtime, " \
                "x-stainless-runtime-version, x-stainless-timeout"


class OllamaHandler(http.server.BaseHTTPRequestHandler):
    """Serves Ollama's API: host check, CORS, then one route table (ROUTES) for dispatch."""
    protocol_version = "HTTP/1.1"
    server_version = "ollama.py/" + __version__

    def do_GET(self):
        self._dispatch()

    do_POST = do_DELETE = do_HEAD = do_PUT = do_PATCH = do_OPTIONS = do_GET

    def log_message(self, fmt, *args):
        log.debug("%s %s", self.address_string(), fmt % args)

    def _dispatch(self):
        started = time.monotonic()
        status = 500
        try:
            status = self._route()
        finally:
            log.info("| %3d | %10s | %15s | %-7s %s", status, format_duration(time.monotonic() - started),
                     self.client_address[0], self.command, urllib.parse.urlsplit(self.path).path)

    def _route(self):
        origin = self.headers.get("Origin")
        try:
            if not self.server.host_allowed(self.headers.get("Host", "")):
                raise Forbidden("forbidden")
            if origin and not self.server.origin_allowed(origin):
                raise Forbidden("origin not allowed")
            if self.command == "OPTIONS":
                return self._send(Response(204, b"", None))
            path = urllib.parse.urlsplit(self.path).path
            func, params, allowed = self.server.routes.match(self.command, path)
            if func is None:
                if allowed:
                    return self._send(Response(405, b"405 method not allowed"))
                return self._send(Response(404, b"404 page not found"))
            result = func(Request(self, params))
        except OllamaError as e:
            result = Response(e.status, (json_dumps({"error": str(e)})).encode(), "application/json; charset=utf-8")
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
            return 499
        except Exception as e:                                  # a bug: report it, keep serving
            log.exception("internal error on %s %s", self.command, self.path)
            result = Response(500, json_dumps({"error": str(e)}).encode(), "application/json; charset=utf-8")
        return self._send(result)

    def _cors(self):
        origin = self.headers.get("Origin")
        if not origin:
            return
        self.send_header("Access-Control-Allow-Origin", origin)
        self.send_header("Vary", "Origin")
        if self.command == "OPTIONS":
            self.send_header("Access-Control-Allow-Methods", "GET, POST, PUT, PATCH, DELETE, HEAD, OPTIONS")
            self.send_header("Access-Control-Allow-Headers", _CORS_HEADERS)
            self.send_header("Access-Control-Max-Age", "43200")

    def _send(self, result):
        if isinstance(result, Stream):
            return self._send_stream(result)
        if not isinstance(result, Response):
            body = b"" if result is None else json_dumps(result).encode()
            result = Response(200, body, "application/json; charset=utf-8" if result is not None else None)
        self.send_response(result.status)
        if result.content_type:
            self.send_header("Content-Type", result.content_type)
        for k, v in result.headers.items():
            self.send_header(k, v)
        self._cors()
        self.send_header("Content-Length", str(len(result.body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(result.body)
        return result.status

    def _send_stream(self, stream):
        items = stream.items
        try:
            first = next(items)
        except StopIteration:
            first = None
        except OllamaError as e:
            return self._send(Response(e.status, json_dumps({"error": str(e)}).encode(),
                                       "application/json; charset=utf-8"))
        self.send_response(200)
        self.send_header("Content-Type", stream.content_type)
        for k, v in stream.headers.items():
            self.send_header(k, v)
        self._cors()
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            item = first
            while item is not None:
                self._chunk(stream.encode(item))
                try:
                    item = next(items)
                except StopIteration:
                    break
                except OllamaError as e:
                    self._chunk(stream.encode(stream.error_item(str(e))))
                    break
                except Exception as e:
                    log.exception("internal error while streaming %s", self.path)
                    self._chunk(stream.encode(stream.error_item(str(e))))
                    break
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
            self.close_connection = True
            return 499
        finally:
            close = getattr(items, "close", None)
            if close:
                close()                                         # runs the generator's cleanup
        return 200

    def _chunk(self, data):
        if data:
            self.wfile.write(b"%X\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()


class Routes:
    """The route table: (method, pattern) -> handler; ":name" segments capture path params."""

    def __init__(self, table):
        self.table = []
        for method, pattern, func in table:
            regex = "^" + re.sub(r":(\w+)", r"(?P<\1>[^/]+)", pattern) + "$"
            self.table.append((method, re.compile(regex), func))

    def match(self, method, path):
        """(func, params, allowed): the handler or None, the captured params, and whether the path
        exists under another method (for 405)."""
        allowed = False
        for m, regex, func in self.table:
            hit = regex.match(path)
            if hit:
                if m == method or (method == "HEAD" and m == "GET"):
                    return func, hit.groupdict(), True
                allowed = True
        return None, {}, allowed


class OllamaServer(http.server.ThreadingHTTPServer):
    """The `serve` process: the HTTP listener plus all server state (store, scheduler, config)."""
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, config, address=None, routes=None):
        self.config = config
        self.store = Store(config.models)
        self.routes = routes or Routes(ROUTES)
        self.scheduler = None      # set by the Scheduler section when inference lands
        host = config.host if address is None else address[0]
        port = config.port if address is None else address[1]
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        super().__init__((host, port), OllamaHandler)
        self.origins = _DEFAULT_ORIGINS + config.origins
        self.loopback = _is_loopback(host)

    @property
    def url(self):
        host, port = self.server_address[:2]
        return "http://%s:%d" % ("[%s]" % host if ":" in host else host, port)

    def host_allowed(self, host_header):
        """The DNS-rebinding guard: bound to loopback, only local names and addresses may be used."""
        if not self.loopback:
            return True
        host = host_header.rsplit(":", 1)[0] if host_header.count(":") == 1 else host_header
        host = host.strip("[]").lower()
        if host in ("", "localhost", socket.gethostname().lower()):
            return True
        if host.endswith((".localhost", ".local", ".internal")):
            return True
        try:
            import ipaddress
            ip = ipaddress.ip_address(host.split("%")[0])
        except ValueError:
            return False
        return ip.is_loopback or ip.is_private or ip.is_unspecified or ip.is_link_local

    def origin_allowed(self, origin):
        import fnmatch
        return any(fnmatch.fnmatchcase(origin, pat) for pat in self.origins)

    def server_close(self):
        if self.scheduler is not None:
            self.scheduler.shutdown()
        super().server_close()


def _is_loopback(host):
    if host in ("localhost", ""):
        return True
    try:
        import ipaddress
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def make_server(config=None, host=None, port=None):
    """An OllamaServer bound to (host, port) (port 0 picks a free one); call serve_forever()."""
    config = config or Config()
    return OllamaServer(config, (host or config.host, config.port if port is None else port))


# -- general -----------------------------------------------------------------

def api_root(req):
    """GET|HEAD /: the heartbeat every CLI command sends first."""
    return Response(200, b"Ollama is running")


def api_version(req):
    """GET /api/version."""
    return {"version": __version__}


def _todo(req):
    raise OllamaError("not implemented yet: %s %s" % (req.method, req.path), 501)


# -- models (store issue) ----------------------------------------------------

api_tags = api_show = api_create = api_copy = api_delete = api_blob_head = api_blob_post = _todo

# -- inference (inference issue) ---------------------------------------------

api_generate = api_chat = api_ps = api_embed = api_embeddings = api_tokenize = api_detokenize = _todo

# -- registry (registry issue) -----------------------------------------------

def _progress_stream(req, work, stream=True):
    """Run work(progress, cancel) for a pull/push request: a Stream of its progress objects, or
    with stream=False only the last one (errors then keep their status, as waitForStream does)."""
    if not stream:
        last = []
        work(last.append, None)
        return last[-1] if last else None
    import queue as queue_mod
    items, cancel, end = queue_mod.Queue(), threading.Event(), object()

    def run():
        try:
            work(items.put, cancel)
        except BaseException as e:          # handed to the streaming thread
            items.put(e)
        finally:
            items.put(end)

    def generate():
        threading.Thread(target=run, name="transfer", daemon=True).start()
        try:
            while True:
                item = items.get()
                if item is end:
                    return
                if isinstance(item, OllamaError):
                    raise item
                if isinstance(item, BaseException):
                    raise OllamaError(str(item) or type(item).__name__)
                yield item
        finally:
            cancel.set()                    # client gone: stop the transfer (downloads keep their parts)

    return Stream(generate())


def _transfer_request(req):
    body = req.json()
    name = Name.parse_bare(body.get("model") or body.get("name") or "")
    if name is None or not name.is_valid():
        raise BadRequest("invalid model name")
    return name, bool(body.get("insecure")), body.get("stream", True) is not False


def api_pull(req):
    """POST /api/pull {model, insecure, stream}: pull a model from its registry."""
    name, insecure, stream = _transfer_request(req)
    return _progress_stream(req, lambda progress, cancel: pull_model(
        req.server, name, insecure, progress, cancel), stream)


def api_push(req):
    """POST /api/push {model, insecure, stream}: push a model to its registry."""
    name, insecure, stream = _transfer_request(req)
    return _progress_stream(req, lambda progress, cancel: push_model(
        req.server, name, insecure, progress, cancel), stream)

# -- OpenAI compatibility ----------------------------------------------------

v1_chat_completions = v1_completions = v1_embeddings = v1_models = v1_model = _todo

#: The one route table. HEAD is served by the GET handler where no HEAD route is given.
ROUTES = [
    ("GET", "/", api_root),
    ("GET", "/api/version", api_version),
    ("GET", "/api/tags", api_tags),
    ("POST", "/api/show", api_show),
    ("POST", "/api/create", api_create),
    ("POST", "/api/copy", api_copy),
    ("DELETE", "/api/delete", api_delete),
    ("HEAD", "/api/blobs/:digest", api_blob_head),
    ("POST", "/api/blobs/:digest", api_blob_post),
    ("POST", "/api/pull", api_pull),
    ("POST", "/api/push", api_push),
    ("POST", "/api/generate", api_generate),
    ("POST", "/api/chat", api_chat),
    ("GET", "/api/ps", api_ps),
    ("POST", "/api/embed", api_embed),
    ("POST", "/api/embeddings", api_embeddings),
    ("POST", "/api/tokenize", api_tokenize),
    ("POST", "/api/detokenize", api_detokenize),
    ("POST", "/v1/chat/completions", v1_chat_completions),
    ("POST", "/v1/completions", v1_completions),
    ("POST", "/v1/embeddings", v1_embeddings),
    ("GET", "/v1/models", v1_models),
    ("GET", "/v1/models/:model", v1_model),
]


###############################################################################
# CLI #########################################################################
###############################################################################

class Client:
    """The CLI's side of the API: JSON calls and NDJSON streams to OLLAMA_HOST over http.client."""

    def __init__(self, base_url, timeout=None):
        url = urllib.parse.urlsplit(base_url)
        self.scheme, self.host, self.port = url.scheme or "http", url.hostname, url.port
        self.prefix = url.path.rstrip("/")
        self.timeout = timeout

    def _connect(self):
        cls = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
        return cls(self.host, self.port, timeout=self.timeout)

    def _open(self, method, path, body=None, headers=None):
        conn = self._connect()
        hdrs = {"Accept": "application/x-ndjson, application/json",
                "User-Agent": "ollama.py/%s (%s %s) Python/%s" % (
                    __version__, os.uname().machine if hasattr(os, "uname") else "", sys.platform,
                    sys.version.split()[0])}
        hdrs.update(headers or {})
        if isinstance(body, (dict, list)):
            body = json_dumps(body).encode()
            hdrs["Content-Type"] = "application/json"
        try:
            conn.request(method, self.prefix + path, body=body, headers=hdrs)
            resp = conn.getresponse()
        except ConnectionRefusedError:
            conn.close()
            raise OllamaError("could not connect to ollama server, run 'ollama.py serve' to start it") from None
        except OSError as e:
            conn.close()
            raise OllamaError("could not connect to ollama server: %s" % e) from None
        if resp.status >= 400:
            data = resp.read()
            conn.close()
            try:
                msg = json.loads(data)["error"]
                if isinstance(msg, dict):                       # OpenAI shape
                    msg = msg.get("message")
            except (ValueError, KeyError, TypeError):
                msg = data.decode(errors="replace").strip() or http.client.responses.get(resp.status, "")
            raise OllamaError(msg, resp.status)
        return conn, resp

    def call(self, method, path, body=None, headers=None):
        """One request; the decoded JSON answer (None for an empty body). Raises OllamaError."""
        conn, resp = self._open(method, path, body, headers)
        try:
            data = resp.read()
        finally:
            conn.close()
        return json.loads(data) if data.strip() else None

    def stream(self, method, path, body=None, headers=None):
        """Yield each NDJSON object of a streamed answer; an {"error"} line raises OllamaError."""
        conn, resp = self._open(method, path, body, headers)
        try:
            for line in resp:
                if not line.strip():
                    continue
                obj = json.loads(line)
                if isinstance(obj, dict) and obj.get("error"):
                    raise OllamaError(obj["error"])
                yield obj
        finally:
            conn.close()

    def heartbeat(self):
        """HEAD /, as every Ollama command does before its real work."""
        conn, resp = self._open("HEAD", "/")
        resp.read()
        conn.close()


def _client(args):
    return Client(Config().base_url)


# -- serve -------------------------------------------------------------------

def cmd_serve(args):
    """Start ollama.py's server.

    Environment variables:
      OLLAMA_HOST               IP address and port for the server (default 127.0.0.1:11434)
      OLLAMA_MODELS             the path to the models directory (default ~/.ollama/models)
      OLLAMA_KEEP_ALIVE         how long models stay loaded in memory (default "5m")
      OLLAMA_MAX_LOADED_MODELS  maximum number of loaded models (default 3)
      OLLAMA_MAX_QUEUE          maximum number of queued requests (default 512)
      OLLAMA_NUM_PARALLEL       maximum number of parallel requests per model (default 1)
      OLLAMA_CONTEXT_LENGTH     context length to use unless otherwise specified (default 4096)
      OLLAMA_ORIGINS            a comma separated list of allowed origins
      OLLAMA_DEBUG              show additional debug information (e.g. OLLAMA_DEBUG=1)
      OLLAMA_NOHISTORY          do not preserve readline history
      OLLAMA_NOPRUNE            accepted for compatibility; ollama.py never prunes at startup
      OLLAMA_LOAD_TIMEOUT       how long to allow model loads to stall before giving up (default "5m")
      OLLAMA_FLASH_ATTENTION    enable flash attention
      OLLAMA_KV_CACHE_TYPE      quantization type for the K/V cache (default: f16)
      OLLAMA_LLAMA_SERVER       path of the llama-server binary to run models with
    """
    config = Config()
    _setup_logging(config, to_file=True)
    server = make_server(config)
    stop = threading.Event()

    def on_signal(signum, frame):
        stop.set()
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    log.info("Listening on %s (version %s)", server.url.replace("http://", ""), __version__)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
    return 0


def _setup_logging(config, to_file=False):
    level = logging.DEBUG if config.debug else logging.INFO
    fmt = logging.Formatter("time=%(asctime)s level=%(levelname)s msg=%(message)s")
    handlers = [logging.StreamHandler(sys.stderr)]
    if to_file:
        try:
            (config.home / "logs").mkdir(parents=True, exist_ok=True)
            handlers.append(logging.FileHandler(str(config.home / "logs" / "server.log")))
        except OSError as e:
            print("Warning: cannot write server.log: %s" % e, file=sys.stderr)
    for h in handlers:
        h.setFormatter(fmt)
        log.addHandler(h)
    log.setLevel(level)


# -- models (store issue) ----------------------------------------------------

def _cli_todo(args):
    raise OllamaError("not implemented yet: %s" % args.command)


cmd_create = cmd_show = cmd_list = cmd_cp = cmd_rm = _cli_todo

# -- inference (inference issue) ---------------------------------------------

cmd_run = cmd_ps = cmd_stop = _cli_todo

# -- registry (registry issue) -----------------------------------------------

class _TransferProgress:
    """Ollama-style progress for pull/push on stderr: a bar per blob (percent, size, speed, time
    left) redrawn in place on a TTY; plain lines otherwise (a blob's line once it completes)."""

    def __init__(self, out=None):
        self.out = out or sys.stderr
        self.tty = hasattr(self.out, "isatty") and self.out.isatty()
        self.lines = []                     # [key, text] in display order
        self.bars = {}                      # digest -> [total, completed, [(time, completed)...]]
        self.drawn, self.last_draw = 0, 0.0
        self.status = None

    def update(self, obj):
        status, digest = obj.get("status") or "", obj.get("digest")
        if digest and obj.get("total"):
            total, done = obj["total"], obj.get("completed") or 0
            bar = self.bars.get(digest)
            if bar is None:
                if not done:
                    return                  # Ollama skips a blob's first, empty update
                bar = self.bars[digest] = [total, done, []]
                self.lines.append([digest, ""])
            was_done = bar[1] >= bar[0]
            bar[0], bar[1] = total, done
            bar[2].append((time.monotonic(), done))
            bar[2][:] = [s for s in bar[2] if s[0] > time.monotonic() - 3.0]
            self._set(digest, self._bar(status, digest))
            if not self.tty and done >= total and not was_done:
                print(self._bar(status, digest, plain=True), file=self.out, flush=True)
        elif status and status != self.status:
            self.status = status
            self.lines.append([status, status])
            if not self.tty:
                print(status, file=self.out, flush=True)
        self._draw(force=status == "success" or not digest)

    def _set(self, key, text):
        for line in self.lines:
            if line[0] == key:
                line[1] = text

    def _bar(self, status, digest, plain=False):
        total, done, samples = self.bars[digest]
        pct = int(100 * done / total) if total else 100
        if plain:
            return "%s: %3d%% %s" % (status, pct, human_bytes(total))
        width = 25
        filled = width * done // total if total else width
        size = human_bytes(total) if done >= total else "%s/%s" % (human_bytes(done), human_bytes(total))
        text = "%s: %3d%% \u2595%s%s\u258f %s" % (status, pct, "\u2588" * filled, " " * (width - filled), size)
        if done < total and len(samples) > 1 and samples[-1][0] > samples[0][0]:
            rate = (samples[-1][1] - samples[0][1]) / (samples[-1][0] - samples[0][0])
            if rate > 0:
                left = format_duration(int((total - done) / rate))
                text += "  %8s/s %7s" % (human_bytes(rate), left)
        return text

    def _draw(self, force=False):
        if not self.tty or (not force and time.monotonic() - self.last_draw < 0.1):
            return
        self.last_draw = time.monotonic()
        out = "\x1b[%dA" % (self.drawn - 1) if self.drawn > 1 else ""
        out += "\r" + "\n".join("\x1b[K" + text for _key, text in self.lines)
        self.out.write(out)
        self.out.flush()
        self.drawn = len(self.lines)

    def close(self):
        if self.tty and self.drawn:
            self._draw(force=True)
            self.out.write("\n")
            self.out.flush()


def _transfer(args, path):
    client = _client(args)
    client.heartbeat()
    display = _TransferProgress()
    last = None
    try:
        for last in client.stream("POST", path, {"model": args.model, "insecure": bool(args.insecure)}):
            display.update(last)
    except (OSError, http.client.HTTPException) as e:
        raise OllamaError("unexpected EOF: %s" % e) from None
    finally:
        display.close()
    if not last or last.get("status") != "success":
        raise OllamaError("unexpected EOF")                 # the server went away mid-stream


def cmd_pull(args):
    """Pull a model from a registry

    Fetches the manifest and every missing blob (resuming interrupted downloads) from the model's
    registry: registry.ollama.ai, or the host in the name (host:port/namespace/model:tag).
    Credentials for other registries come from the docker config (~/.docker/config.json "auths",
    as written by 'docker login'); --insecure allows plain HTTP.
    """
    _transfer(args, "/api/pull")
    return 0


def cmd_push(args):
    """Push a model to a registry

    Uploads the blobs the registry lacks, then the manifest. Credentials as for 'pull'.
    """
    _transfer(args, "/api/push")
    name = Name.parse_bare(args.model)
    if name is not None and name.host.lower() == DEFAULT_REGISTRY:
        print("\nYou can find your model at:\n\n\thttps://ollama.com/%s/%s\n" % (name.namespace, name.model))
    return 0


def _doc(func):
    """A command's help: the first line of its docstring (the rest is its description)."""
    return (func.__doc__ or "").strip().splitlines()[0] if func.__doc__ else None


def build_parser():
    """The argparse parser with every Ollama command, each routed to its cmd_* function."""
    parser = argparse.ArgumentParser(
        prog="ollama.py", description="Large language model runner",
        epilog="Environment: OLLAMA_HOST (default 127.0.0.1:11434), OLLAMA_MODELS (default "
               "~/.ollama/models); see 'ollama.py serve --help' for the rest.")
    parser.add_argument("-v", "--version", action="store_true", help="show version information")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def add(name, func, aliases=()):
        doc = (func.__doc__ or "").strip()
        p = sub.add_parser(name, aliases=list(aliases), help=_doc(func), description=doc,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(func=func)
        return p

    p = add("cp", cmd_cp)
    p.add_argument("source")
    p.add_argument("destination")
    p = add("create", cmd_create)
    p.add_argument("model")
    p.add_argument("-f", "--file", help='name of the Modelfile (default "Modelfile")')
    p.add_argument("-q", "--quantize", help="quantize model to this level (e.g. q4_K_M)")
    p = add("list", cmd_list, aliases=["ls"])
    p.add_argument("prefix", nargs="?", default="")
    p = add("ps", cmd_ps)
    p = add("pull", cmd_pull)
    p.add_argument("model")
    p.add_argument("--insecure", action="store_true", help="use an insecure registry")
    p = add("push", cmd_push)
    p.add_argument("model")
    p.add_argument("--insecure", action="store_true", help="use an insecure registry")
    p = add("rm", cmd_rm)
    p.add_argument("models", nargs="+", metavar="model")
    p = add("run", cmd_run)
    p.add_argument("model")
    p.add_argument("prompt", nargs="*")
    p.add_argument("--format", help='response format (e.g. json)')
    p.add_argument("--keepalive", help="duration to keep a model loaded (e.g. 5m)")
    p.add_argument("--verbose", action="store_true", help="show timings for response")
    p.add_argument("--insecure", action="store_true", help="use an insecure registry")
    p.add_argument("--nowordwrap", action="store_true", help="don't wrap words to the next line automatically")
    p.add_argument("--think", nargs="?", const="true", help="enable thinking mode: true/false or high/medium/low")
    p.add_argument("--hidethinking", action="store_true", help="hide thinking output (if provided)")
    p.add_argument("--truncate", action="store_true", help="for embedding models: truncate inputs that exceed the context length")
    p.add_argument("--dimensions", type=int, help="truncate output embeddings to specified dimension")
    p = add("serve", cmd_serve, aliases=["start"])
    p = add("show", cmd_show)
    p.add_argument("model")
    for flag, what in (("license", "license"), ("modelfile", "Modelfile"), ("parameters", "parameters"),
                       ("system", "system message"), ("template", "template")):
        p.add_argument("--" + flag, action="store_true", help="show %s of a model" % what)
    p.add_argument("-v", "--verbose", action="store_true", help="show detailed model information")
    p = add("stop", cmd_stop)
    p.add_argument("model")
    return parser


###############################################################################
# Main ########################################################################
###############################################################################

def main(argv=None):
    """Entry point: parse the command line and run the command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.version:
        print("ollama version is %s" % __version__)
        return 0
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return args.func(args) or 0
    except OllamaError as e:
        print("Error: %s" % e, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
