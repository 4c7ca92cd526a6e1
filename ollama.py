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
import math
import os
import re
import secrets
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
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


def human_number(n):
    """Ollama's format.HumanNumber: "8B", "3.2B", "268.10M", "12K", "950"."""
    if n >= 1_000_000_000:
        v = n / 1e9
        return "%.0fB" % v if v == int(v) else "%.1fB" % v
    if n >= 1_000_000:
        v = n / 1e6
        return "%.0fM" % v if v == int(v) else "%.2fM" % v
    if n >= 1000:
        return "%.0fK" % (n / 1e3)
    return str(n)


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
    hours = int(math.floor(seconds / 3600 + 0.5))           # Go's math.Round: halves away from zero
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
    if int(int(delta / 3600) / 24 / 365) < -20:              # Go: int(delta.Hours())/24/365, truncating
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

GGUF_MAGIC = b"GGUF"
#: GGUF metadata value types: id -> (name, struct format or None for string/array).
_GGUF_TYPES = {0: ("uint8", "B"), 1: ("int8", "b"), 2: ("uint16", "H"), 3: ("int16", "h"),
               4: ("uint32", "I"), 5: ("int32", "i"), 6: ("float32", "f"), 7: ("bool", "?"),
               8: ("string", None), 9: ("array", None), 10: ("uint64", "Q"), 11: ("int64", "q"),
               12: ("float64", "d")}
#: ggml tensor types, as Ollama names them in /api/show tensors.
GGML_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1",
              10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS",
              17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S",
              23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M",
              30: "BF16", 34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4"}
#: general.file_type -> Ollama's quantization name (fs/ggml FileType.String).
GGUF_FILE_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1",
                   10: "Q2_K", 11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M",
                   16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S",
                   22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M",
                   28: "IQ2_S", 29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16", 36: "TQ1_0",
                   37: "TQ2_0", 38: "MXFP4"}
_GGUF_MAX_STRING = 1 << 30        # bytes; a longer key or value means a corrupt file
_GGUF_MAX_COUNT = 1 << 40         # items; same reason, for array lengths and tensor counts


class GGUFTensor:
    """One tensor's info: name, ggml type id, shape (innermost dimension first, as stored), offset."""
    __slots__ = ("name", "type", "shape", "offset")

    def __init__(self, name, type_id, shape, offset):
        self.name, self.type, self.shape, self.offset = name, type_id, shape, offset

    @property
    def type_name(self):
        return GGML_TYPES.get(self.type, str(self.type))

    @property
    def elements(self):
        n = 1
        for d in self.shape:
            n *= d
        return n

    def to_dict(self):
        """The /api/show `tensors` entry: {name, type, shape}."""
        return {"name": self.name, "type": self.type_name, "shape": list(self.shape)}


class GGUF:
    """The header, metadata and tensor infos of a GGUF file (versions 2 and 3, little-endian).

    Tensor data is never read. `kv` keeps the file's key order; arrays longer than `max_array`
    (when given) are skipped over and stored as [] with their length in `array_lengths`.
    Use `read_gguf(path)`; a file that is not GGUF, or is cut short, raises BadRequest.
    """

    def __init__(self, version, kv, tensors, array_lengths=None, size=0):
        self.version, self.kv, self.tensors = version, kv, tensors
        self.array_lengths = array_lengths or {}
        self.size = size

    # -- metadata helpers (Ollama's KV accessors) ----------------------------
    @property
    def architecture(self):
        return self.kv.get("general.architecture", "unknown")

    def key(self, name):
        """A key as Ollama's KV looks it up: "general.*" and "tokenizer.*" as is, others under the arch."""
        if name.startswith(("general.", "tokenizer.")):
            return name
        return "%s.%s" % (self.architecture, name)

    def get(self, name, default=None):
        return self.kv.get(self.key(name), default)

    @property
    def kind(self):
        return self.kv.get("general.type", "")

    @property
    def parameter_count(self):
        return sum(t.elements for t in self.tensors)

    @property
    def file_type(self):
        ft = self.kv.get("general.file_type")
        return GGUF_FILE_TYPES.get(ft, "unknown") if isinstance(ft, int) else "unknown"

    @property
    def context_length(self):
        return self.get("context_length", 0)

    @property
    def embedding_length(self):
        return self.get("embedding_length", 0)

    @property
    def block_count(self):
        return self.get("block_count", 0)

    @property
    def chat_template(self):
        return self.kv.get("tokenizer.chat_template", "")

    @property
    def is_embedding(self):
        """An embedding model: it declares a pooling type (Ollama's Capabilities check)."""
        return self.key("pooling_type") in self.kv

    @property
    def is_projector(self):
        """A standalone vision/audio projector (mmproj) rather than a language model."""
        if self.kind in ("projector", "mmproj"):
            return True
        if not self.block_count and self.kv.get("vision.block_count"):
            return True
        return self.architecture == "clip" and not self.block_count and bool(
            self.kv.get("clip.has_vision_encoder") or self.kv.get("clip.has_audio_encoder"))

    def model_info(self, verbose=False):
        """/api/show `model_info`: the KV map with general.parameter_count added, minus general.name
        and tokenizer.chat_template; arrays of more than 5 items become [] unless verbose."""
        out = {}
        for k, v in self.kv.items():
            if k in ("general.name", "tokenizer.chat_template"):
                continue
            if isinstance(v, list) and not verbose and (len(v) > 5 or k in self.array_lengths):
                v = []
            out[k] = v
        out["general.parameter_count"] = self.parameter_count
        return out


class _GGUFReader:
    """Buffered little-endian reads over a file, with offsets for error messages."""

    def __init__(self, f, size):
        self.f, self.size, self.pos = f, size, 0

    def read(self, n):
        data = self.f.read(n)
        if len(data) != n:
            raise BadRequest("invalid GGUF file: unexpected end of file at offset %d" % (self.pos + len(data)))
        self.pos += n
        return data

    def skip(self, n):
        if self.pos + n > self.size:
            raise BadRequest("invalid GGUF file: unexpected end of file at offset %d" % self.size)
        self.f.seek(n, os.SEEK_CUR)
        self.pos += n

    def unpack(self, fmt):
        fmt = "<" + fmt
        return struct.unpack(fmt, self.read(struct.calcsize(fmt)))[0]

    def count(self, what):
        n = self.unpack("Q")
        if n > _GGUF_MAX_COUNT:
            raise BadRequest("invalid GGUF file: %s count %d is too large" % (what, n))
        return n

    def string(self):
        n = self.unpack("Q")
        if n > _GGUF_MAX_STRING or self.pos + n > self.size:
            raise BadRequest("invalid GGUF file: string of %d bytes at offset %d" % (n, self.pos - 8))
        return self.read(n).decode("utf-8", errors="replace")


def _f32(x):
    """A float32 as the shortest decimal that reads back as the same float32 (Go's json output)."""
    if x != x or x in (float("inf"), float("-inf")):
        return x
    packed = struct.pack("<f", x)
    for digits in range(1, 18):
        y = float("%.*g" % (digits, x))
        if struct.pack("<f", y) == packed:
            return y
    return x


def _gguf_value(r, vtype, max_array, key, lengths):
    if vtype == 8:
        return r.string()
    if vtype == 9:
        itype, n = r.unpack("I"), r.count("array")
        if itype not in _GGUF_TYPES:
            raise BadRequest("invalid GGUF file: unknown array type %d for %s" % (itype, key))
        fmt = _GGUF_TYPES.get(itype, ("", None))[1]
        if max_array is not None and n > max_array:
            lengths[key] = n
            if fmt:
                r.skip(n * struct.calcsize(fmt))
            else:
                for _ in range(n):
                    _gguf_value(r, itype, 0, key, {})
            return []
        if fmt:
            size = struct.calcsize(fmt)
            out = list(struct.unpack("<%d%s" % (n, fmt), r.read(n * size)))
            return [_f32(v) for v in out] if itype == 6 else out
        return [_gguf_value(r, itype, max_array, key, lengths) for _ in range(n)]
    if vtype not in _GGUF_TYPES:
        raise BadRequest("invalid GGUF file: unknown value type %d for %s" % (vtype, key))
    v = r.unpack(_GGUF_TYPES[vtype][1])
    return _f32(v) if vtype == 6 else v


def read_gguf(path, max_array=None):
    """Read a GGUF file's header, metadata and tensor infos (never the tensor data) -> GGUF.

    `max_array`: arrays with more items are skipped (stored as []), which keeps /api/show fast on
    vocabularies of 256k tokens. Raises BadRequest("supplied file was not in GGUF format") for
    other files and BadRequest("invalid GGUF file: ...") for truncated or corrupt ones.
    """
    with open(str(path), "rb") as f:
        size = os.fstat(f.fileno()).st_size
        r = _GGUFReader(f, size)
        if f.read(4) != GGUF_MAGIC:
            raise BadRequest("supplied file was not in GGUF format")
        r.pos = 4
        version = r.unpack("I")
        if version in (1, 2, 3):
            if version == 1:
                raise BadRequest("invalid GGUF file: version 1 is not supported, convert it again")
        elif struct.unpack(">I", struct.pack("<I", version))[0] in (2, 3):
            raise BadRequest("invalid GGUF file: big-endian GGUF is not supported")
        else:
            raise BadRequest("invalid GGUF file: unknown version %d" % version)
        n_tensors, n_kv = r.count("tensor"), r.count("metadata")
        kv, lengths = {}, {}
        for _ in range(n_kv):
            key = r.string()
            kv[key] = _gguf_value(r, r.unpack("I"), max_array, key, lengths)
        tensors = []
        for _ in range(n_tensors):
            name = r.string()
            n_dims = r.unpack("I")
            if n_dims > 8:
                raise BadRequest("invalid GGUF file: tensor %s has %d dimensions" % (name, n_dims))
            shape = list(struct.unpack("<%dQ" % n_dims, r.read(8 * n_dims)))
            tensors.append(GGUFTensor(name, r.unpack("I"), shape, r.unpack("Q")))
    return GGUF(version, kv, tensors, lengths, size)


def is_gguf(path):
    """True when the file starts with the GGUF magic."""
    try:
        with open(str(path), "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


###############################################################################
# Modelfile ###################################################################
###############################################################################

MODELFILE_COMMANDS = ("from", "license", "template", "system", "adapter", "draft", "renderer", "parser",
                      "parameter", "message", "requires")
_ERR_INVALID_COMMAND = ('command must be one of "from", "license", "template", "system", "adapter", '
                        '"draft", "renderer", "parser", "parameter", "message", or "requires"')
_ERR_MESSAGE_ROLE = 'message role must be one of "system", "user", or "assistant"'
DEFAULT_TEMPLATE = "{{ .Prompt }}"

#: Model parameters (api.Options): name -> type. Types: int, float, bool, list (of strings).
PARAMETER_TYPES = {
    "num_ctx": int, "num_batch": int, "num_gpu": int, "main_gpu": int, "use_mmap": bool,
    "num_thread": int, "draft_num_predict": int, "num_keep": int, "seed": int, "num_predict": int,
    "top_k": int, "top_p": float, "min_p": float, "typical_p": float, "repeat_last_n": int,
    "temperature": float, "repeat_penalty": float, "presence_penalty": float,
    "frequency_penalty": float, "stop": list,
}
#: api.DefaultOptions; num_ctx comes from Config.context_length, main_gpu/use_mmap/stop have none.
DEFAULT_OPTIONS = {
    "num_batch": 512, "num_gpu": -1, "num_thread": 0, "draft_num_predict": 4, "num_keep": 4,
    "seed": -1, "num_predict": -1, "top_k": 40, "top_p": 0.9, "min_p": 0.0, "typical_p": 1.0,
    "repeat_last_n": 64, "temperature": 0.8, "repeat_penalty": 1.0, "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
}
#: Accepted in a Modelfile with a warning, then ignored.
DEPRECATED_PARAMETERS = ("penalize_newline", "low_vram", "f16_kv", "logits_all", "vocab_only",
                         "use_mlock", "mirostat", "mirostat_tau", "mirostat_eta")
_OPTION_TYPE_NAMES = {int: "integer", float: "float32", bool: "boolean", str: "string", list: "array"}
_GO_BOOLS = {"1": True, "t": True, "T": True, "TRUE": True, "true": True, "True": True,
             "0": False, "f": False, "F": False, "FALSE": False, "false": False, "False": False}
_GO_INT_RE = re.compile(r"^[+-]?[0-9]+$")
_GO_FLOAT_RE = re.compile(r"^[+-]?(?:(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|inf|infinity|nan)$",
                          re.IGNORECASE)


def _is_print(ch):
    return ch == " " or ch.isprintable()


def _unquote(s):
    if s.startswith('"""'):
        return (s[3:-3], True) if len(s) >= 6 and s.endswith('"""') else ("", False)
    if s.startswith('"'):
        return (s[1:-1], True) if len(s) >= 2 and s.endswith('"') else ("", False)
    return s, True


def _decode_modelfile(data):
    if isinstance(data, str):
        return data
    if data.startswith(b"\xef\xbb\xbf"):
        return data[3:].decode("utf-8", errors="replace")
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return data.decode("utf-16", errors="replace")
    return data.decode("utf-8", errors="replace")


def parse_modelfile(data):
    """Parse Modelfile text (str or bytes; a UTF-8/UTF-16 BOM is honoured) into [(name, args)].

    A port of Ollama's parser.ParseFile state machine: instruction names are case-insensitive
    (FROM is stored as "model", PARAMETER as its parameter name, MESSAGE as "role: text"), `#`
    starts a comment only at the start of a line, values run to the end of the line unless quoted
    with `"` or `\"\"\"` (then they may span lines). Errors are BadRequest with Ollama's texts,
    "(line N): ..." where Ollama gives a line; an unterminated quote names the line it opened on.
    """
    text = _decode_modelfile(data)
    commands, name, buf, role = [], "", [], ""
    state, line, value_line = "nil", 1, 1

    def fail(msg):
        raise BadRequest("(line %d): %s" % (line, msg))

    for ch in text:
        if ch in "\r\n":
            line += 1
        # the next state for this rune (parseRuneForState); `keep` is whether the rune is kept
        keep = True
        if state == "nil":
            if ch == "#":
                nxt, keep = "comment", False
            elif ch in " \t\r\n":
                nxt, keep = "nil", False
            else:
                nxt = "name"
        elif state == "name":
            if ch.isascii() and ch.isalpha():
                nxt = "name"
            elif ch in " \t":
                nxt, keep = "value", False
            else:
                fail(_ERR_INVALID_COMMAND)
        elif state == "value":
            nxt = "nil" if ch in " \t\r\n" else "value"
        elif state in ("parameter", "message"):
            ok = ch.isascii() and (ch.isalpha() or (state == "parameter" and (ch.isdigit() or ch == "_")))
            if ok:
                nxt = state
            elif ch in " \t":
                nxt, keep = "value", False
            else:
                raise BadRequest("unexpected EOF: %s" % "".join(buf))
        else:                                                   # comment
            nxt, keep = ("nil" if ch in "\r\n" else "comment"), False
        if nxt != state:
            if state == "name":
                word = "".join(buf)
                if word.lower() not in MODELFILE_COMMANDS:
                    fail(_ERR_INVALID_COMMAND)
                word = word.lower()
                if word == "from":
                    name = "model"
                elif word == "parameter":
                    nxt = "parameter"
                else:
                    if word == "message":
                        nxt = "message"
                    name = word
                value_line = line
            elif state == "parameter":
                name = "".join(buf)
            elif state == "message":
                if "".join(buf) not in ("system", "user", "assistant"):
                    fail(_ERR_MESSAGE_ROLE)
                role = "".join(buf)
            elif state == "value":
                s, ok = _unquote("".join(buf).strip())
                if not ok or ch in " \t":
                    buf.append(ch)
                    continue
                if role:
                    s, role = role + ": " + s, ""
                commands.append((name, s))
            if nxt == "value" and state != "value":
                value_line = line
            buf = []
            state = nxt
        if keep and _is_print(ch):
            buf.append(ch)
    if state == "value":
        s, ok = _unquote("".join(buf).strip())
        if not ok:
            raise BadRequest("(line %d): unexpected EOF" % value_line)
        commands.append((name, role + ": " + s if role else s))
    elif state not in ("nil", "comment"):
        raise BadRequest("(line %d): unexpected EOF" % line)
    if not any(c[0] == "model" for c in commands):
        raise BadRequest("no FROM line")
    return commands


def _go_list(vals):
    return "[" + " ".join(vals) + "]"


def format_param(key, value):
    """Convert one Modelfile PARAMETER value (text) to its typed value, as api.FormatParams does.

    BadRequest for `unknown parameter 'x'` and `invalid int|float|bool value [x]`. `stop` gives a
    one-item list (repeats are joined by the caller).
    """
    kind = PARAMETER_TYPES.get(key)
    if kind is None:
        raise BadRequest("unknown parameter '%s'" % key)
    if kind is int:
        if not _GO_INT_RE.match(value):
            raise BadRequest("invalid int value %s" % _go_list([value]))
        return int(value)
    if kind is float:
        if not _GO_FLOAT_RE.match(value):
            raise BadRequest("invalid float value %s" % _go_list([value]))
        return _f32(float(value))
    if kind is bool:
        if value not in _GO_BOOLS:
            raise BadRequest("invalid bool value %s" % _go_list([value]))
        return _GO_BOOLS[value]
    return [value]


def parse_options(opts):
    """Validate and convert an API `options` map (request options or a params layer) -> dict.

    As Ollama's Options.FromMap: unknown keys are logged ("invalid option provided") and dropped,
    None values are skipped, JSON numbers are accepted for ints (truncated) and floats, and a
    type mismatch raises BadRequest('option "k" must be of type integer|float32|boolean|string|array').
    Only the keys given come back; merge over DEFAULT_OPTIONS (and num_ctx) yourself.
    """
    if opts is None:
        return {}
    if not isinstance(opts, dict):
        raise BadRequest("options must be an object")
    out = {}
    for key, val in opts.items():
        kind = PARAMETER_TYPES.get(key)
        if kind is None:
            log.warning("invalid option provided option=%s", key)
            continue
        if val is None:
            continue
        bad = BadRequest('option "%s" must be of type %s' % (key, _OPTION_TYPE_NAMES[kind]))
        if kind is int:
            if isinstance(val, bool) or not isinstance(val, (int, float)) or val != val or val in (FOREVER, -FOREVER):
                raise bad
            out[key] = int(val)
        elif kind is float:
            if isinstance(val, bool) or not isinstance(val, (int, float)):
                raise bad
            out[key] = float(val)
        elif kind is bool:
            if not isinstance(val, bool):
                raise bad
            out[key] = val
        elif kind is list:
            if not isinstance(val, list):
                raise bad
            if not all(isinstance(v, str) for v in val):
                raise BadRequest('option "%s" must be of an array of strings' % key)
            out[key] = list(val)
    return out


def _expand_path(path, relative_dir):
    """FROM/ADAPTER path expansion: absolute, ~, ~user, or relative to the Modelfile's folder."""
    if path.startswith(("/", "\\")):
        return os.path.abspath(path)
    if path.startswith("~"):
        if path == "~" or path.startswith("~/"):
            home, rest = os.path.expanduser("~"), path[2:]
        else:
            user, _, rest = path[1:].partition("/")
            try:
                import pwd
                home = pwd.getpwnam(user).pw_dir
            except (ImportError, KeyError):
                raise BadRequest("failed to find user '%s': user: unknown user %s" % (user, user)) from None
        return os.path.abspath(os.path.join(home, rest))
    return os.path.abspath(os.path.join(relative_dir, path))


def _files_for_model(folder):
    """The model files of a folder given to FROM: its *.gguf files (else *.bin GGUF files)."""
    import glob
    for pattern in ("*.gguf", "*.bin"):
        found = sorted(p for p in glob.glob(os.path.join(glob.escape(folder), pattern)) if is_gguf(p))
        if found:
            return found
    if glob.glob(os.path.join(glob.escape(folder), "*.safetensors")):
        raise BadRequest("safetensors models are not supported by ollama.py; convert to GGUF first")
    raise BadRequest("no Modelfile or safetensors files found")


def file_digest(path, progress=None):
    """sha256 of a file, read in COPY_CHUNK pieces -> "sha256:<hex>"; progress(bytes_so_far)."""
    h, n = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while True:
            chunk = f.read(COPY_CHUNK)
            if not chunk:
                break
            h.update(chunk)
            n += len(chunk)
            if progress:
                progress(n)
    return "sha256:" + h.hexdigest()


def modelfile_request(commands, relative_dir, digest=file_digest):
    """Turn parsed Modelfile commands into (create request dict, {abs path: digest} of local files).

    A FROM naming an existing file or folder becomes `files` (keyed by base name, as Ollama's CLI
    sends them), anything else `from`. Parameters are typed (stop repeats collect into a list);
    deprecated ones print a warning and are dropped.
    """
    req, params, messages, licenses, local = {}, {}, [], [], {}

    def local_files(arg):
        path = _expand_path(arg, relative_dir)
        if not os.path.exists(path):
            return None
        paths = _files_for_model(path) if os.path.isdir(path) else [os.path.realpath(path)]
        out = {}
        for p in paths:
            d = digest(p)
            local[p] = d
            out[os.path.basename(p)] = d
        return out

    for name, args in commands:
        if name == "model":
            files = local_files(args)
            if files is None:
                req["from"] = args
            else:
                req.setdefault("files", {}).update(files)
        elif name == "adapter":
            files = local_files(args)
            if files is None:
                raise BadRequest("adapter file not found: %s" % args)
            req["adapters"] = files
        elif name in ("template", "system", "renderer", "parser"):
            req[name] = args
        elif name == "license":
            licenses.append(args)
        elif name == "requires":
            if not re.match(r"^v?\d+(\.\d+){0,2}(-[0-9A-Za-z.-]+)?$", args):
                raise BadRequest("requires must be a valid semver (e.g. 0.14.0)")
            req["requires"] = args.lstrip("v")
        elif name == "draft":
            raise BadRequest("DRAFT models are not supported by ollama.py")
        elif name == "message":
            role, _, content = args.partition(": ")
            messages.append({"role": role, "content": content})
        elif name in DEPRECATED_PARAMETERS:
            print("warning: parameter %s is deprecated" % name)
        else:
            value = format_param(name, args)
            if isinstance(value, list):
                params[name] = params.get(name, []) + value if isinstance(params.get(name), list) else value
            else:
                params[name] = value
    if params:
        req["parameters"] = params
    if messages:
        req["messages"] = messages
    if licenses:
        req["license"] = licenses
    return req, local


def quote_modelfile_value(s):
    """Ollama's Modelfile quoting: "..." when the value has a newline or edge spaces, \"\"\" if it
    also has a double quote."""
    if "\n" in s or s.startswith(" ") or s.endswith(" "):
        return '"""' + s + '"""' if '"' in s else '"' + s + '"'
    return s


def modelfile_command(name, args):
    """One Modelfile line (Command.String)."""
    if name == "model":
        return "FROM %s" % args
    if name in ("license", "template", "system", "adapter", "renderer", "parser", "requires", "draft"):
        return "%s %s" % (name.upper(), quote_modelfile_value(args))
    if name == "message":
        role, _, text = args.partition(": ")
        return "MESSAGE %s %s" % (role, quote_modelfile_value(text))
    return "PARAMETER %s %s" % (name, quote_modelfile_value(args))


# -- Go formatting, so blobs and texts match Ollama's byte for byte ------------

def _go_float(f, bits=64):
    """Go's %v of a float (strconv 'g', shortest): "0.7", "40", "1e+06", "1.5e-05"."""
    if f != f:
        return "NaN"
    if f in (FOREVER, -FOREVER):
        return "+Inf" if f > 0 else "-Inf"
    from decimal import Decimal
    text = repr(_f32(f) if bits == 32 else float(f))
    if f == 0:
        return "-0" if text.startswith("-") else "0"
    d = Decimal(text)
    digits = str(d.as_tuple().digits and "".join(map(str, d.as_tuple().digits))).rstrip("0") or "0"
    exponent = d.adjusted()
    if exponent < -4 or exponent >= 6:              # shortest %g switches to %e at these exponents
        m = digits[0] + ("." + digits[1:] if len(digits) > 1 else "")
        return "%s%se%s%02d" % ("-" if f < 0 else "", m, "-" if exponent < 0 else "+", abs(exponent))
    out = format(d, "f")
    return out.rstrip("0").rstrip(".") if "." in out else out


def _go_json_float(f):
    """encoding/json's float64 text: plain digits unless |f| < 1e-6 or >= 1e21."""
    if f != f or f in (FOREVER, -FOREVER):
        raise ValueError("json: unsupported value: %r" % f)
    a = abs(f)
    from decimal import Decimal
    if a != 0 and (a < 1e-6 or a >= 1e21):
        text = repr(float(f))
        m, _, e = text.partition("e")
        return "%se%s%d" % (m, "-" if e.startswith("-") else "+", abs(int(e)))
    out = format(Decimal(repr(float(f))), "f")
    if "." in out:
        out = out.rstrip("0").rstrip(".")
    return out or "0"


_GO_JSON_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t",
                    "<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}


def _go_json_string(s):
    out = []
    for ch in s:
        if ch in _GO_JSON_ESCAPES:
            out.append(_GO_JSON_ESCAPES[ch])
        elif ch < " ":
            out.append("\\u%04x" % ord(ch))
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def go_json(obj, sort_keys=False):
    """JSON as Go's json.Encoder writes it (HTML-escaped, Go float text), without the newline.

    Go sorts map keys; pass sort_keys=True for values that are Go maps (params), False for
    structs whose field order the dict already has (manifests, config, messages).
    """
    if obj is None:
        return "null"
    if obj is True:
        return "true"
    if obj is False:
        return "false"
    if isinstance(obj, int):
        return str(obj)
    if isinstance(obj, float):
        return _go_json_float(obj)
    if isinstance(obj, str):
        return _go_json_string(obj)
    if isinstance(obj, (list, tuple)):
        return "[" + ",".join(go_json(v, sort_keys) for v in obj) + "]"
    if isinstance(obj, dict):
        keys = sorted(obj) if sort_keys else list(obj)
        return "{" + ",".join(_go_json_string(str(k)) + ":" + go_json(obj[k], sort_keys) for k in keys) + "}"
    raise TypeError("cannot encode %r" % (obj,))


def _go_quote(s):
    """strconv.Quote: Go's %#v of a string."""
    out = []
    for ch in s:
        o = ord(ch)
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch in "\a\b\f\n\r\t\v":
            out.append({"\a": "\\a", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t",
                        "\v": "\\v"}[ch])
        elif _is_print(ch):
            out.append(ch)
        elif o < 0x80:
            out.append("\\x%02x" % o)
        elif o < 0x10000:
            out.append("\\u%04x" % o)
        else:
            out.append("\\U%08x" % o)
    return '"' + "".join(out) + '"'


def go_sprint(v, sharp=False):
    """Go's %v (or %#v with sharp=True) for JSON-decoded values: numbers, strings, bools, lists."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return _go_float(v)
    if isinstance(v, str):
        return _go_quote(v) if sharp else v
    if isinstance(v, list):
        if sharp:
            return "[]interface {}{" + ", ".join(go_sprint(x, True) for x in v) + "}"
        return "[" + " ".join(go_sprint(x) for x in v) + "]"
    if v is None:
        return "<nil>" if not sharp else "interface {}(nil)"
    return str(v)


# -- a stored model, as its layers describe it ----------------------------------

class Model:
    """A stored model read from its manifest: weights path, projectors, adapters, template, system,
    params, messages, licenses, config. Build it with `load_model(store, name)`."""

    def __init__(self, name, manifest_raw, manifest, config, store):
        self.name, self.manifest_raw, self.manifest, self.config = name, manifest_raw, manifest, config
        self.digest = hashlib.sha256(manifest_raw).hexdigest()
        self.model_path = None
        self.parent_model = ""
        self.projector_paths, self.adapter_paths, self.license = [], [], []
        self.template, self.system, self.params, self.messages = DEFAULT_TEMPLATE, "", {}, []
        for layer in manifest.get("layers") or []:
            media = layer.get("mediaType", "")
            kind = media[len(MEDIA_PREFIX):] if media.startswith(MEDIA_PREFIX) else media
            path = store.blob_path(layer["digest"])
            if kind == "model":
                self.model_path, self.parent_model = str(path), layer.get("from", "")
            elif kind == "projector":
                self.projector_paths.append(str(path))
            elif kind == "adapter":
                self.adapter_paths.append(str(path))
            elif kind in ("template", "prompt"):
                self.template = path.read_text(encoding="utf-8", errors="replace")
            elif kind == "system":
                self.system = path.read_text(encoding="utf-8", errors="replace")
            elif kind == "params":
                self.params = json.loads(path.read_bytes() or b"{}") or {}
            elif kind == "messages":
                self.messages = json.loads(path.read_bytes() or b"[]") or []
            elif kind == "license":
                self.license.append(path.read_text(encoding="utf-8", errors="replace"))
        self._gguf = None

    @property
    def short_name(self):
        return self.name.display()

    def gguf(self, max_array=0):
        """The weights' GGUF metadata (arrays skipped unless max_array is None); None if no weights."""
        if self.model_path is None:
            return None
        if max_array == 0:
            if self._gguf is None:
                self._gguf = read_gguf(self.model_path, 0)
            return self._gguf
        return read_gguf(self.model_path, max_array)

    def capabilities(self):
        """Ollama's Model.Capabilities: completion or embedding, vision, tools, insert, thinking."""
        return model_capabilities(self)

    def modelfile(self):
        """The Modelfile text `ollama show --modelfile` prints (Model.String with its header)."""
        cmds = []
        if self.model_path:
            cmds.append(("model", self.model_path))
        cmds += [("adapter", p) for p in self.adapter_paths]
        cmds += [("model", p) for p in self.projector_paths]
        cmds.append(("template", self.template))
        if self.system:
            cmds.append(("system", self.system))
        for k in sorted(self.params):
            v = self.params[k]
            for item in (v if isinstance(v, list) else [v]):
                cmds.append((k, go_sprint(item)))
        cmds += [("license", text) for text in self.license]
        cmds += [("message", "%s: %s" % (m.get("role", ""), m.get("content", ""))) for m in self.messages]
        head = ('# Modelfile generated by "ollama show"\n'
                "# To build a new Modelfile based on this, replace FROM with:\n"
                "# FROM %s\n\n" % self.short_name)
        return head + "".join(modelfile_command(n, a) + "\n" for n, a in cmds)

    def parameters_text(self, params=None):
        """/api/show `parameters`: Go's "%-30s %#v" per value, one line per list item."""
        params = self.params if params is None else params
        lines = []
        for k in sorted(params):
            v = params[k]
            for item in (v if isinstance(v, list) else [v]):
                lines.append("%-30s %s" % (k, go_sprint(item, sharp=True)))
        return "\n".join(lines)


def load_model(store, name):
    """Load a stored model by name (str or Name) -> Model; NotFound("model 'X' not found")."""
    found, raw, manifest = store.get(name)
    config = {}
    digest = (manifest.get("config") or {}).get("digest")
    if digest:
        try:
            config = json.loads(store.blob_path(digest).read_bytes())
        except (OSError, ValueError) as e:
            log.warning("unreadable config blob %s: %s", digest, e)
    return Model(found, raw, manifest, config, store)


_TEMPLATE_VAR_RE = r"\{\{[^}]*\.%s\b"


def model_capabilities(model):
    """The capabilities of a Model, as Ollama's server/images.go Capabilities decides them.

    completion (or embedding when the GGUF has <arch>.pooling_type), vision (a vision block or a
    projector), tools (the template uses .Tools), insert (.Suffix), thinking (.Thinking, or a
    gpt-oss family).
    """
    caps = []
    g = None
    if model.model_path:
        try:
            g = model.gguf()
        except (OSError, OllamaError) as e:
            log.error("couldn't open model file: %s", e)
    if g is not None:
        caps.append("embedding" if g.is_embedding else "completion")
        if g.key("vision.block_count") in g.kv:
            caps.append("vision")
    elif model.config.get("capabilities"):
        caps.extend(model.config["capabilities"])
    template = model.template or ""
    if re.search(_TEMPLATE_VAR_RE % "Tools", template):
        caps.append("tools")
    if re.search(_TEMPLATE_VAR_RE % "Suffix", template):
        caps.append("insert")
    if model.projector_paths and "vision" not in caps:
        caps.append("vision")
    if "thinking" not in caps and (re.search(_TEMPLATE_VAR_RE % "Thinking", template)
                                   or model.config.get("model_family") in ("gptoss", "gpt-oss")):
        caps.append("thinking")
    return caps


###############################################################################
# Templates ###################################################################
###############################################################################


###############################################################################
# Registry ####################################################################
###############################################################################

# -- keys: ed25519 (RFC 8032) and the OpenSSH key files ------------------------


# -- registry client: OCI distribution pull and push ---------------------------


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

def _blob_digest_param(req):
    return parse_digest(req.params.get("digest"))


def api_blob_head(req):
    """HEAD /api/blobs/:digest: 200 if the blob is stored, else 404 `blob "…" not found`."""
    digest = _blob_digest_param(req)
    if not req.server.store.has_blob(digest):
        raise NotFound('blob "%s" not found' % req.params.get("digest"))
    return Response(200, b"", None)


def api_blob_post(req):
    """POST /api/blobs/:digest: store the body as a blob, streamed to disk and verified.

    201 when created, 200 when it already existed, 400 `digest mismatch, expected "…", got "…"`
    (nothing is kept). No-copy import (an ollama.py extension): with the header
    `X-Ollama-Path: /abs/path` and an empty body, a server that runs on the same machine as the
    client (loopback peer) and can read that file hashes it and, when it matches the digest,
    links it into blobs/ (a reflink or hard link when the store is on the same filesystem, else a
    copy). The hashed file is the linked one, checked unchanged (size, mtime, inode) after hashing,
    so the blob matches its name when it is committed. A hard-linked blob shares its bytes with the
    original: editing that file in place afterwards would change the blob too (tools that write a
    new file and rename it, as editors and downloaders do, are safe).
    """
    store = req.server.store
    digest = _blob_digest_param(req)
    src = req.headers.get("X-Ollama-Path")
    if store.has_blob(digest):
        _drain(req)
        return Response(200, b"", None)
    if src:
        _drain(req)
        if not _peer_is_local(req):
            raise Forbidden("X-Ollama-Path is only honoured for local clients")
        _import_local_blob(store, src, digest)
        return Response(201, b"", None)
    length = req.headers.get("Content-Length")
    store.write_blob(req.body_stream(), expected=digest,
                     length=int(length) if length and length.isdigit() else None)
    return Response(201, b"", None)


def _drain(req):
    """Read and drop a request body in COPY_CHUNK pieces (keeps the connection usable)."""
    body = req.body_stream()
    while body.read(COPY_CHUNK):
        pass


def _peer_is_local(req):
    host = req.handler.client_address[0]
    try:
        import ipaddress
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


def _import_local_blob(store, src, digest):
    """Link (or copy) a local file into blobs/ under `digest`, re-hashed; BadRequest on mismatch."""
    if not os.path.isabs(src):
        raise BadRequest("X-Ollama-Path must be an absolute path")
    try:
        st = os.stat(src)
    except OSError as e:
        raise BadRequest("cannot read %s: %s" % (src, e.strerror)) from None
    if not stat.S_ISREG(st.st_mode):
        raise BadRequest("%s is not a regular file" % src)
    store.blobs.mkdir(parents=True, exist_ok=True, mode=0o755)
    tmp = store.blobs / ("sha256-tmp-%s" % secrets.token_hex(8))
    linked = True
    try:
        try:
            os.link(src, str(tmp))
        except OSError:
            linked = False
        if not linked:
            with open(src, "rb") as f:
                store.write_blob(f, expected=digest)           # streamed copy, verified
            return
        before = os.stat(str(tmp))
        actual = file_digest(str(tmp))
        after = os.stat(str(tmp))
        if (before.st_size, before.st_mtime_ns, before.st_ino) != (after.st_size, after.st_mtime_ns, after.st_ino):
            raise BadRequest("%s changed while it was being imported" % src)
        if actual != parse_digest(digest):
            raise BadRequest('digest mismatch, expected "%s", got "%s"' % (parse_digest(digest), actual))
        if not store.has_blob(digest):
            os.replace(str(tmp), str(store.blob_path(digest)))
            _fsync_dir(store.blobs)
    finally:
        _unlink(tmp)


def _model_details(config, parent=""):
    return {"parent_model": parent, "format": config.get("model_format", ""),
            "family": config.get("model_family", ""), "families": config.get("model_families"),
            "parameter_size": config.get("model_type", ""), "quantization_level": config.get("file_type", "")}


def _read_config(store, manifest):
    digest = (manifest.get("config") or {}).get("digest")
    if not digest:
        return {}
    try:
        return json.loads(store.blob_path(digest).read_bytes())
    except (OSError, ValueError):
        return {}


def api_tags(req):
    """GET /api/tags: every stored model, newest first."""
    store = req.server.store
    models = []
    for name, raw, manifest, mtime in store.list():
        config = _read_config(store, manifest)
        size = sum(int(layer.get("size") or 0) for layer in manifest.get("layers") or [])
        size += int((manifest.get("config") or {}).get("size") or 0)
        models.append((mtime, {"name": name.display(), "model": name.display(),
                               "modified_at": rfc3339_local(mtime), "size": size,
                               "digest": hashlib.sha256(raw).hexdigest(),
                               "details": _model_details(config)}))
    models.sort(key=lambda m: m[0], reverse=True)
    return {"models": [m for _, m in models]}


def api_show(req):
    """POST /api/show: a model's Modelfile, parameters, template, details, metadata, capabilities."""
    body = req.json()
    text = body.get("model") or body.get("name")
    if not text:
        raise BadRequest("model is required")
    name = Name.parse(text)
    store = req.server.store
    if store.resolve(name) is None:
        raise NotFound("model '%s' not found" % text)
    model = load_model(store, name)
    verbose = bool(body.get("verbose"))
    if body.get("system"):
        model.system = body["system"]
    params = dict(model.params)
    params.update(parse_options(body.get("options")))
    resp = {}
    if model.license:
        resp["license"] = "\n".join(model.license)
    resp["modelfile"] = model.modelfile()
    text_params = model.parameters_text(params)
    if text_params:
        resp["parameters"] = text_params
    resp["template"] = model.template
    if model.system:
        resp["system"] = model.system
    for k in ("renderer", "parser"):
        if model.config.get(k):
            resp[k] = model.config[k]
    resp["details"] = _model_details(model.config, model.parent_model)
    if model.messages:
        resp["messages"] = model.messages
    if model.model_path:
        g = model.gguf(max_array=None if verbose else 5)
        resp["model_info"] = g.model_info(verbose)
        if model.projector_paths:
            resp["projector_info"] = read_gguf(model.projector_paths[0], None if verbose else 5).model_info(verbose)
        if verbose:
            resp["tensors"] = [t.to_dict() for t in g.tensors]
    caps = model_capabilities(model)
    if caps:
        resp["capabilities"] = caps
    resp["modified_at"] = rfc3339_local(store.manifest_path(model.name).stat().st_mtime)
    if model.config.get("requires"):
        resp["requires"] = model.config["requires"]
    return resp


def api_copy(req):
    """POST /api/copy {source, destination}: copy the manifest byte for byte; 200, empty body."""
    body = req.json()
    src_text, dst_text = body.get("source", ""), body.get("destination", "")
    if not isinstance(src_text, str) or not _valid(src_text):
        raise BadRequest('source %s is invalid' % _go_quote(str(src_text)))
    if not isinstance(dst_text, str) or not _valid(dst_text):
        raise BadRequest('destination %s is invalid' % _go_quote(str(dst_text)))
    store = req.server.store
    with store.lock:
        found = store.resolve(Name.parse(src_text))
        if found is None:
            raise NotFound("model %s not found" % _go_quote(src_text))
        raw = store.manifest_path(found).read_bytes()
        store.write_manifest(Name.parse(dst_text), raw)
    return None


def _valid(text):
    try:
        Name.parse(text)
        return True
    except BadRequest:
        return False


def api_delete(req):
    """DELETE /api/delete {model}: remove the manifest, then the blobs no other model uses."""
    body = req.json()
    text = body.get("model") or body.get("name") or ""
    if not isinstance(text, str) or not _valid(text):
        raise BadRequest("name %s is invalid" % _go_quote(str(text)))
    store = req.server.store
    if store.resolve(Name.parse(text)) is None:
        raise NotFound("model '%s' not found" % text)
    store.delete(text)
    return None


def _pull_for_create(req, name):
    """Hook for /api/create with a `from` model that is not stored: pull it, yielding pull
    progress dicts. The registry code replaces this; until then it raises NotFound."""
    raise NotFound("model '%s' not found" % name.display())


def _validate_create_files(files, what="files"):
    if files is None:
        return {}
    if not isinstance(files, dict):
        raise BadRequest("%s must be an object of file names to digests" % what)
    for path, digest in files.items():
        parts = path.split("/")
        if path == "." or path.startswith("/") or any(p in ("", ".", "..") for p in parts) \
                or "\\" in path or ":" in path or "\x00" in path:
            raise BadRequest("file path must be relative: %s" % path)
        if not isinstance(digest, str) or not digest:
            raise BadRequest("invalid digest format")
        try:
            parse_digest(digest)
        except BadRequest:
            raise BadRequest("invalid digest for %s: invalid digest format" % path) from None
    return files


def _layer(media, digest, size, source=None):
    out = {"mediaType": media, "digest": digest, "size": size}
    if source:
        out["from"] = source
    return out


def _new_layer(store, data, media, created):
    """A layer for bytes written now; its digest goes into `created` when the blob is new."""
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    if not store.has_blob(digest):
        store.write_blob_bytes(data)
        created.add(digest)
    return _layer(media, digest, len(data))


def api_create(req):
    """POST /api/create: build a model from GGUF blobs (`files`) or another model (`from`), plus
    template, system, license, parameters and messages; streams statuses ending in "success"."""
    body = req.json()
    text = body.get("model") or body.get("name") or ""
    files = _validate_create_files(body.get("files"))
    adapters = _validate_create_files(body.get("adapters"), "adapters")
    if body.get("quantize") or body.get("quantization"):
        raise BadRequest("quantization is not supported by ollama.py; quantize the GGUF with "
                         "llama.cpp's llama-quantize before importing")
    license_ = body.get("license")
    if license_ is not None and not isinstance(license_, str) and not (
            isinstance(license_, list) and all(isinstance(x, str) for x in license_)):
        raise BadRequest("license must be a string or a list of strings")
    messages = body.get("messages") or []
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise BadRequest("messages must be a list of objects")
    parameters = body.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise BadRequest("parameters must be an object")
    parse_options(parameters)
    name = Name.parse(text if isinstance(text, str) else "")
    from_text = body.get("from") or ""
    if not from_text and not files:
        raise BadRequest("neither 'from' or 'files' was specified")
    from_name = Name.parse(from_text) if from_text else None
    stream = body.get("stream", True) is not False
    items = _create_stream(req, name, from_name, files, adapters, body, parameters, messages)
    if stream:
        return Stream(items)
    last = None
    for last in items:
        pass
    return last


def _create_stream(req, name, from_name, files, adapters, body, parameters, messages):
    store = req.server.store
    if from_name is not None and store.resolve(from_name) is None:
        for progress in _pull_for_create(req, from_name):
            yield progress
    statuses, created = [], set()
    with store.lock:
        layers, config = [], {}
        if from_name is not None:
            base = load_model(store, from_name)
            config = {k: v for k, v in base.config.items() if k not in ("architecture", "os", "rootfs")}
            source = base.name.display()
            for layer in base.manifest.get("layers") or []:
                if not store.has_blob(layer["digest"]):
                    raise NotFound('model "%s" not found, try pulling it first' % source)
                layers.append(_layer(layer["mediaType"], layer["digest"], store.blob_size(layer["digest"]), source))
        ggufs = []
        for kind, table in (("model", files), ("adapter", adapters)):
            for path in sorted(table):
                digest = parse_digest(table[path])
                statuses.append("parsing GGUF")
                if not store.has_blob(digest):
                    raise BadRequest("blob not found for %s (digest %s)" % (path, digest))
                g = read_gguf(store.blob_path(digest), 0)
                media = kind
                if kind == "model" and g.kind == "adapter":
                    media = "adapter"
                elif kind == "model" and g.is_projector:
                    media = "projector"
                layers.append(_layer(MEDIA_PREFIX + media, digest, store.blob_size(digest), path))
                if media == "model":
                    ggufs.append(g)
        for g in ggufs:
            config["model_format"] = config.get("model_format") or "gguf"
            config["model_family"] = config.get("model_family") or g.architecture
            config["model_type"] = config.get("model_type") or human_number(g.parameter_count)
            config["file_type"] = config.get("file_type") or g.file_type
            families = config.get("model_families") or []
            if g.architecture not in families:
                families = families + [g.architecture]
            config["model_families"] = families
        for k in ("renderer", "parser", "requires"):
            if body.get(k):
                config[k] = body[k]

        def replace(media, data):
            layers[:] = [la for la in layers if la["mediaType"] != MEDIA_PREFIX + media]
            layers.append(_new_layer(store, data, MEDIA_PREFIX + media, created))

        if body.get("template"):
            replace("template", body["template"].encode())
        if body.get("system"):
            replace("system", body["system"].encode())
        license_ = body.get("license")
        for text in ([license_] if isinstance(license_, str) else license_ or []):
            if text:
                layers.append(_new_layer(store, text.encode(), MEDIA_PREFIX + "license", created))
        merged = dict(parameters)
        for layer in layers:
            if layer["mediaType"] == MEDIA_PREFIX + "params":
                existing = json.loads(store.blob_path(layer["digest"]).read_bytes() or b"{}") or {}
                for k, v in existing.items():
                    merged.setdefault(k, v)
        if merged:
            replace("params", (go_json(merged, sort_keys=True) + "\n").encode())
        if messages:
            replace("messages", (go_json([_message_struct(m) for m in messages]) + "\n").encode())

        config_raw = (go_json(_config_struct(config, layers)) + "\n").encode()
        config_digest, config_size = store.write_blob_bytes(config_raw)
        manifest = {"schemaVersion": 2, "mediaType": MEDIA_MANIFEST,
                    "config": _layer(MEDIA_CONFIG, config_digest, config_size), "layers": layers}
        old = store.resolve(name)
        old_digests = manifest_digests(store.get(old)[2]) if old is not None else []
        statuses += ["%s %s" % ("creating new layer" if la["digest"] in created else "using existing layer",
                                la["digest"]) for la in layers]
        statuses.append("writing manifest")
        store.write_manifest(name, (go_json(manifest) + "\n").encode())
        if old_digests and not req.server.config.noprune:
            store.remove_unused(old_digests)
    for status in statuses:
        yield {"status": status}
    yield {"status": "success"}


def _message_struct(m):
    """An api.Message in Go field order (role, content, then the optional fields that are set)."""
    out = {"role": m.get("role", ""), "content": m.get("content", "")}
    for k in ("thinking", "images", "tool_calls", "tool_name", "tool_call_id"):
        if m.get(k):
            out[k] = m[k]
    return out


def _config_struct(config, layers):
    """model.ConfigV2 in Go field order: the five model fields, the optional ones when set, then
    architecture/os and rootfs (diff_ids = the layer digests), as Ollama's create writes it."""
    out = {"model_format": config.get("model_format", ""), "model_family": config.get("model_family", ""),
           "model_families": config.get("model_families"), "model_type": config.get("model_type", ""),
           "file_type": config.get("file_type", "")}
    for k in ("renderer", "parser", "requires", "remote_host", "remote_model", "capabilities",
              "context_length", "embedding_length", "base_name"):
        if config.get(k):
            out[k] = config[k]
    out["architecture"] = "amd64"
    out["os"] = "linux"
    out["rootfs"] = {"type": "layers", "diff_ids": [la["digest"] for la in layers]}
    return out


# -- inference (inference issue) ---------------------------------------------

api_generate = api_chat = api_ps = api_embed = api_embeddings = api_tokenize = api_detokenize = _todo

# -- registry (registry issue) -----------------------------------------------

api_pull = api_push = _todo

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


def _table(rows, header=None, indent=""):
    """Go tablewriter with no borders and 4-space padding: every cell left-aligned and padded to
    its column's width, followed by four spaces."""
    rows = ([header] if header else []) + rows
    widths = {}
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths.get(i, 0), len(cell))
    return "".join(indent + "".join(cell.ljust(widths[i]) + "    " for i, cell in enumerate(row)) + "\n"
                   for row in rows)


class _Status:
    """Status lines for create: on a TTY the current line is rewritten in place, otherwise each
    new status is printed once on its own line."""

    def __init__(self, out=None):
        self.out = out or sys.stderr
        self.tty = self.out.isatty()
        self.current = None

    def show(self, text, final=False):
        if text == self.current and not final:
            return
        if self.tty:
            self.out.write("\r\x1b[K" + text + ("\n" if final else ""))
        elif final or not text.startswith("copying file"):
            self.out.write(text + "\n")
        self.out.flush()
        self.current = text

    def done(self):
        if self.tty and self.current is not None:
            self.out.write("\n")
            self.out.flush()
        self.current = None


def _upload_blob(client, path, digest, status):
    """Send one local file to the server as a blob: a no-copy import when the server is on this
    machine, else a streamed upload with a `copying file sha256:… N%` display."""
    try:
        client.call("HEAD", "/api/blobs/" + digest)
        status.show("copying file %s 100%%" % digest, final=True)
        return
    except OllamaError as e:
        if getattr(e, "status", 500) != 404:
            raise
    if _server_is_local(client):
        try:
            client.call("POST", "/api/blobs/" + digest, b"", {"X-Ollama-Path": os.path.abspath(path)})
            status.show("copying file %s 100%%" % digest, final=True)
            return
        except OllamaError as e:
            log.debug("no-copy import refused (%s), uploading instead", e)
    size = os.path.getsize(path)

    class Reader:
        def __init__(self, f):
            self.f, self.n = f, 0

        def read(self, n=-1):
            data = self.f.read(n if n and n > 0 else COPY_CHUNK)
            self.n += len(data)
            status.show("copying file %s %d%%" % (digest, 100 * self.n // size if size else 100))
            return data

    with open(path, "rb") as f:
        client.call("POST", "/api/blobs/" + digest, Reader(f), {"Content-Length": str(size),
                                                                "Content-Type": "application/octet-stream"})
    status.show("copying file %s 100%%" % digest, final=True)


def _server_is_local(client):
    if client.host in ("localhost", None):
        return True
    try:
        import ipaddress
        return ipaddress.ip_address(client.host).is_loopback
    except ValueError:
        return False


def cmd_create(args):
    """Create a model from a Modelfile.

    Reads the Modelfile (-f, default ./Modelfile; without one, the current folder's GGUF file is
    used as if the Modelfile were "FROM ."), sends its local files to the server as blobs (linked
    instead of copied when the server runs on this machine and can read them), then asks the
    server to build the model.
    """
    client = _client(args)
    client.heartbeat()
    if not Name.parse_bare(args.model) or not Name.parse_bare(args.model).is_valid():
        raise OllamaError("invalid model name: %s" % args.model)
    path = args.file or "Modelfile"
    if os.path.exists(path):
        path = os.path.abspath(path)
        with open(path, "rb") as f:
            data = f.read()
    elif args.file:
        raise OllamaError("specified Modelfile wasn't found")
    else:
        path, data = os.path.abspath("Modelfile"), b"FROM .\n"
    commands = parse_modelfile(data)
    status = _Status()
    req, local = modelfile_request(commands, os.path.dirname(path))
    for file_path, digest in local.items():
        _upload_blob(client, file_path, digest, status)
    req["model"] = args.model
    if args.quantize:
        req["quantize"] = args.quantize
    status.show("gathering model components")
    try:
        for item in client.stream("POST", "/api/create", req):
            if item.get("status"):
                status.show(item["status"], final=not status.tty)
    finally:
        status.done()
    return 0


def cmd_list(args):
    """List models."""
    client = _client(args)
    client.heartbeat()
    resp = client.call("GET", "/api/tags") or {}
    prefix = (args.prefix or "").lower()
    rows = []
    for m in resp.get("models") or []:
        if prefix and not m["name"].lower().startswith(prefix):
            continue
        rows.append([m["name"], m["digest"][:12], human_bytes(m["size"]),
                     human_time(_parse_time(m["modified_at"]))])
    sys.stdout.write(_table(rows, ["NAME", "ID", "SIZE", "MODIFIED"]))
    return 0


def _parse_time(text):
    """RFC 3339 (with up to nanosecond fractions) -> unix seconds."""
    m = re.match(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)$", text or "")
    if not m:
        return 0.0
    base = datetime.datetime.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S")
    tz = datetime.timezone.utc if m.group(3) == "Z" else datetime.timezone(
        datetime.timedelta(hours=int(m.group(3)[:3]), minutes=int(m.group(3)[0] + m.group(3)[4:])))
    return base.replace(tzinfo=tz).timestamp() + float("0." + (m.group(2) or "0"))


def _show_value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return v
    if isinstance(v, (int, float)):
        return _go_float(float(v))
    if isinstance(v, list):
        shown, width = 0, 1
        for i, item in enumerate(v):
            w = len(go_sprint(item)) + (2 if i else 0)
            if width + w > 10 and i > 0:
                break
            width += w
            shown += 1
        text = go_sprint(v[:shown])
        return text[:-1] + " ...+%d more]" % (len(v) - shown) if shown < len(v) else text
    return "map[string]interface {}" if isinstance(v, dict) else str(v)


def _show_info(resp, verbose, out):
    def section(title, rows):
        out.write("  %s\n" % title)
        out.write(_table(rows))
        out.write("\n")

    info = resp.get("model_info")
    details = resp.get("details") or {}
    rows = []
    if info:
        arch = info.get("general.architecture", "")
        rows.append(["", "architecture", arch])
        param = details.get("parameter_size") or (human_number(int(info["general.parameter_count"]))
                                                  if "general.parameter_count" in info else "")
        rows.append(["", "parameters", param])
        for key, label in (("context_length", "context length"), ("embedding_length", "embedding length")):
            v = info.get("%s.%s" % (arch, key))
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                rows.append(["", label, "%d" % v if v == int(v) else repr(v)])
    else:
        rows.append(["", "architecture", details.get("family", "")])
        rows.append(["", "parameters", details.get("parameter_size", "")])
    rows.append(["", "quantization", details.get("quantization_level", "")])
    if resp.get("requires"):
        rows.append(["", "requires", resp["requires"]])
    section("Model", rows)
    if resp.get("capabilities"):
        section("Capabilities", [["", c] for c in resp["capabilities"]])
    proj = resp.get("projector_info")
    if proj:
        arch = proj.get("general.architecture", "")
        section("Projector", [["", "architecture", arch],
                              ["", "parameters", human_number(int(proj.get("general.parameter_count", 0)))],
                              ["", "embedding length", _show_value(proj.get("%s.vision.embedding_length" % arch, 0))],
                              ["", "dimensions", _show_value(proj.get("%s.vision.projection_dim" % arch, 0))]])
    if resp.get("parameters"):
        section("Parameters", [[""] + line.split() for line in resp["parameters"].splitlines() if line])
    if info and verbose:
        section("Metadata", [["", k, _show_value(info[k])] for k in sorted(info)])
    if verbose and resp.get("tensors"):
        section("Tensors", [["", t["name"], t["type"], "[" + " ".join(str(d) for d in t["shape"]) + "]"]
                            for t in resp["tensors"]])

    def head(text, n):
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        return [["", line] for line in lines[:n]] + ([["", "..."]] if len(lines) > n else [])

    if resp.get("system"):
        section("System", head(resp["system"], 2))
    if resp.get("license"):
        section("License", head(resp["license"], 2))


def cmd_show(args):
    """Show information for a model."""
    flags = [f for f in ("license", "modelfile", "parameters", "system", "template") if getattr(args, f)]
    if len(flags) > 1:
        raise OllamaError("only one of '--license', '--modelfile', '--parameters', '--system', "
                          "or '--template' can be specified")
    client = _client(args)
    client.heartbeat()
    resp = client.call("POST", "/api/show", {"name": args.model, "verbose": bool(args.verbose)})
    if flags:
        field = flags[0]
        empty = {"license": "No license was specified for this model.",
                 "parameters": "No parameters were specified for this model.",
                 "system": "No system message was specified for this model.",
                 "template": "No prompt template was specified for this model."}
        print(resp.get(field) or empty.get(field, ""))
        return 0
    _show_info(resp, args.verbose, sys.stdout)
    return 0


def cmd_cp(args):
    """Copy a model."""
    client = _client(args)
    client.heartbeat()
    client.call("POST", "/api/copy", {"source": args.source, "destination": args.destination})
    print("copied '%s' to '%s'" % (args.source, args.destination))
    return 0


def cmd_rm(args):
    """Remove a model."""
    client = _client(args)
    client.heartbeat()
    for model in args.models:
        try:
            for _ in client.stream("POST", "/api/generate", {"model": model, "keep_alive": 0}):
                pass
        except OllamaError as e:
            if "not found" not in str(e).lower():
                print("Warning: unable to stop model '%s'" % model, file=sys.stderr)
        client.call("DELETE", "/api/delete", {"model": model})
        print("deleted '%s'" % model)
    return 0


# -- inference (inference issue) ---------------------------------------------

cmd_run = cmd_ps = cmd_stop = _cli_todo

# -- registry (registry issue) -----------------------------------------------

cmd_pull = cmd_push = _cli_todo


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
