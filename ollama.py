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
        self.keep_alive = parse_keep_alive(_env(env, "OLLAMA_KEEP_ALIVE") or None, DEFAULT_KEEP_ALIVE, env=True)
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


def parse_keep_alive(value, default, env=False):
    """keep_alive as Ollama reads it: number = seconds, string = Go duration (integer seconds too
    when read from the environment); negative = forever (inf). None means the default. Raises BadRequest."""
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
            if not (env and re.match(r"^-?\d+$", value)):
                raise BadRequest("time: missing unit in duration %s" % json.dumps(value)
                                 if re.match(r"^-?\d+(\.\d+)?$", value)
                                 else "time: invalid duration %s" % json.dumps(value)) from None
            seconds = float(value)
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

def parse_options(options):
    """Placeholder until the Modelfile section lands: options pass through unchecked."""
    return dict(options)


###############################################################################
# Templates ###################################################################
###############################################################################

def render_prompt(template, messages, tools=None, think=None, suffix=None):
    """Placeholder until the Go template engine lands: the user prompt, as {{ .Prompt }} renders it."""
    return "".join(m.get("content") or "" for m in messages if m.get("role") == "user")


###############################################################################
# Registry ####################################################################
###############################################################################

# -- keys: ed25519 (RFC 8032) and the OpenSSH key files ------------------------

# Ed25519 over edwards25519 (RFC 8032 section 5.1); points are extended (X, Y, Z, T), x=X/Z, y=Y/Z, xy=T/Z.
_ED_P = 2 ** 255 - 19                                                   # field prime
_ED_L = 2 ** 252 + 27742317777372353535851937790883648493              # order of the base point
_ED_D = -121665 * pow(121666, _ED_P - 2, _ED_P) % _ED_P                 # curve constant d
_ED_SQRT_M1 = pow(2, (_ED_P - 1) // 4, _ED_P)                           # a square root of -1
_ED_BY = 4 * pow(5, _ED_P - 2, _ED_P) % _ED_P                           # base point y = 4/5
_ED_BX = 15112221349535400772501151409588531511454012693041857206046113283949847762202  # its even x
_ED_BASE = (_ED_BX, _ED_BY, 1, _ED_BX * _ED_BY % _ED_P)
_ED_ZERO = (0, 1, 1, 0)

SSH_ED25519 = b"ssh-ed25519"
_OPENSSH_MAGIC = b"openssh-key-v1\x00"
_OPENSSH_PEM = "OPENSSH PRIVATE KEY"


def _ed_add(p, q):
    """Sum of two points (RFC 8032 5.1.4, complete formula: also right for p == q and the identity)."""
    P = _ED_P
    x1, y1, z1, t1 = p
    x2, y2, z2, t2 = q
    a = (y1 - x1) * (y2 - x2) % P
    b = (y1 + x1) * (y2 + x2) % P
    c = 2 * _ED_D * t1 * t2 % P
    d = 2 * z1 * z2 % P
    e, f, g, h = b - a, d - c, d + c, b + a
    return e * f % P, g * h % P, f * g % P, e * h % P


def _ed_double(p):
    """Twice a point (RFC 8032 5.1.4 doubling; cheaper than _ed_add(p, p))."""
    P = _ED_P
    x1, y1, z1, _ = p
    a, b, c = x1 * x1 % P, y1 * y1 % P, 2 * z1 * z1 % P
    h = a + b
    e = h - (x1 + y1) * (x1 + y1) % P
    g = a - b
    f = c + g
    return e * f % P, g * h % P, f * g % P, e * h % P


def _ed_mul(k, p):
    """k * p by double-and-add from the top bit."""
    q = _ED_ZERO
    for bit in bin(k)[2:]:
        q = _ed_double(q)
        if bit == "1":
            q = _ed_add(q, p)
    return q


def _ed_encode(p):
    """32 bytes: y little-endian with the parity of x in the top bit."""
    x, y, z, _ = p
    zi = pow(z, _ED_P - 2, _ED_P)
    x, y = x * zi % _ED_P, y * zi % _ED_P
    return (y | (x & 1) << 255).to_bytes(32, "little")


def _ed_decode(data):
    """The point encoded in 32 bytes, or None if they encode none (RFC 8032 5.1.3)."""
    if len(data) != 32:
        return None
    n = int.from_bytes(data, "little")
    sign, y = n >> 255, n & ((1 << 255) - 1)
    if y >= _ED_P:
        return None
    u, v = (y * y - 1) % _ED_P, (_ED_D * y * y + 1) % _ED_P
    x = u * pow(v, 3, _ED_P) * pow(u * pow(v, 7, _ED_P), (_ED_P - 5) // 8, _ED_P) % _ED_P
    if (v * x * x - u) % _ED_P:
        x = x * _ED_SQRT_M1 % _ED_P
        if (v * x * x - u) % _ED_P:
            return None
    if x == 0 and sign:
        return None
    if x & 1 != sign:
        x = _ED_P - x
    return x, y, 1, x * y % _ED_P


def _ed_hash(*parts):
    """SHA-512 of the concatenated parts as a little-endian integer mod L."""
    return int.from_bytes(hashlib.sha512(b"".join(parts)).digest(), "little") % _ED_L


class Ed25519Key:
    """An Ed25519 private key (RFC 8032), as Ollama keeps in ~/.ollama/id_ed25519.

    `seed` is the 32-byte private key, `public` the 32-byte encoded public key.
    """

    def __init__(self, seed):
        if len(seed) != 32:
            raise ValueError("ed25519 seed must be 32 bytes")
        h = hashlib.sha512(seed).digest()
        a = int.from_bytes(h[:32], "little")
        self.seed = bytes(seed)
        self._scalar = (a & ~7 & ((1 << 254) - 1)) | (1 << 254)          # clamped secret scalar
        self._prefix = h[32:]                                              # nonce key
        self.public = _ed_encode(_ed_mul(self._scalar, _ED_BASE))

    @classmethod
    def generate(cls):
        """A new key from 32 bytes of the OS's randomness."""
        return cls(secrets.token_bytes(32))

    @classmethod
    def from_seed(cls, seed):
        """The key whose 32-byte private seed is `seed`."""
        return cls(seed)

    def sign(self, message):
        """The 64-byte signature R || S of `message` (deterministic, RFC 8032 5.1.6)."""
        r = _ed_hash(self._prefix, message)
        big_r = _ed_encode(_ed_mul(r, _ED_BASE))
        s = (r + _ed_hash(big_r, self.public, message) * self._scalar) % _ED_L
        return big_r + s.to_bytes(32, "little")

    @staticmethod
    def verify(public, message, signature):
        """True if `signature` is a valid signature of `message` by the 32-byte `public` key."""
        if len(public) != 32 or len(signature) != 64:
            return False
        a, r = _ed_decode(public), _ed_decode(signature[:32])
        s = int.from_bytes(signature[32:], "little")
        if a is None or r is None or s >= _ED_L:
            return False
        k = _ed_hash(signature[:32], public, message)
        # [S]B == R + [k]A, compared as encodings (cofactorless, as Go's crypto/ed25519)
        return _ed_encode(_ed_mul(s, _ED_BASE)) == _ed_encode(_ed_add(r, _ed_mul(k, a)))

    def public_blob(self):
        """The public key in SSH wire format: string "ssh-ed25519", string key."""
        return _ssh_string(SSH_ED25519) + _ssh_string(self.public)

    def authorized_key_b64(self):
        """The base64 field of the authorized_keys line ("AAAAC3NzaC1lZDI1NTE5AAAAI...")."""
        return base64.b64encode(self.public_blob()).decode("ascii")

    def public_key_line(self):
        """The authorized_keys line "ssh-ed25519 AAAA...", without a newline or comment."""
        return "ssh-ed25519 " + self.authorized_key_b64()

    def to_openssh_private(self, comment=""):
        """The unencrypted "OPENSSH PRIVATE KEY" PEM, byte for byte as Go's ssh.MarshalPrivateKey writes it."""
        check = secrets.token_bytes(4)                      # checkint, twice; proves decryption worked
        block = (check + check + _ssh_string(SSH_ED25519) + _ssh_string(self.public)
                 + _ssh_string(self.seed + self.public) + _ssh_string(comment.encode("utf-8")))
        block += bytes(range(1, 1 + (-len(block) % 8)))     # pad to the 8-byte "none" cipher block
        body = (_OPENSSH_MAGIC + _ssh_string(b"none") + _ssh_string(b"none") + _ssh_string(b"")
                + (1).to_bytes(4, "big") + _ssh_string(self.public_blob()) + _ssh_string(block))
        b64 = base64.b64encode(body).decode("ascii")
        lines = [b64[i:i + 64] for i in range(0, len(b64), 64)]   # Go's encoding/pem line width
        return ("-----BEGIN %s-----\n%s\n-----END %s-----\n"
                % (_OPENSSH_PEM, "\n".join(lines), _OPENSSH_PEM)).encode("ascii")

    @classmethod
    def from_openssh_private(cls, data):
        """Load an unencrypted OpenSSH ed25519 private key (ours, Ollama's, or ssh-keygen's)."""
        if isinstance(data, bytes):
            data = data.decode("ascii", "replace")
        m = re.search(r"-----BEGIN %s-----(.*?)-----END %s-----" % (_OPENSSH_PEM, _OPENSSH_PEM), data, re.S)
        if not m:
            raise OllamaError("ssh: no key found")
        try:
            body = base64.b64decode("".join(m.group(1).split()), validate=True)
        except ValueError:
            raise OllamaError("ssh: no key found")
        if not body.startswith(_OPENSSH_MAGIC):
            raise OllamaError("ssh: invalid openssh private key format")
        r = _SSHReader(body[len(_OPENSSH_MAGIC):])
        cipher, kdf, _kdfopts = r.string(), r.string(), r.string()
        if cipher != b"none" or kdf != b"none":
            raise OllamaError("ssh: this private key is passphrase protected")
        if r.uint32() != 1:
            raise OllamaError("ssh: multi-key files are not supported")
        r.string()                                          # public key blob, repeated inside
        p = _SSHReader(r.string())
        if p.uint32() != p.uint32():
            raise OllamaError("ssh: checkint mismatch")
        keytype = p.string()
        if keytype != SSH_ED25519:
            raise OllamaError("ssh: unhandled key type %s" % keytype.decode("ascii", "replace"))
        public, private = p.string(), p.string()
        p.string()                                          # comment
        if len(public) != 32 or len(private) != 64:
            raise OllamaError("ssh: private key unexpected length")
        if p.rest() != bytes(range(1, 1 + len(p.rest()))):
            raise OllamaError("ssh: padding not as expected")
        key = cls(private[:32])
        if key.public != public or private[32:] != public:
            raise OllamaError("ssh: ed25519 public key does not match its private key")
        return key


def _ssh_string(data):
    """An SSH wire-format string: uint32 big-endian length, then the bytes."""
    return len(data).to_bytes(4, "big") + data


class _SSHReader:
    """Reads SSH wire-format fields from bytes; a short buffer is a malformed key."""

    def __init__(self, data):
        self.data, self.pos = data, 0

    def take(self, n):
        if n > len(self.data) - self.pos:
            raise OllamaError("ssh: invalid openssh private key format")
        self.pos += n
        return self.data[self.pos - n:self.pos]

    def uint32(self):
        return int.from_bytes(self.take(4), "big")

    def string(self):
        return self.take(self.uint32())

    def rest(self):
        return self.data[self.pos:]


def ensure_keypair(home, out=None):
    """Load <home>/id_ed25519, or create it and id_ed25519.pub first, as `ollama serve` does.

    Creating prints Ollama's two messages to `out` (stderr by default). The private key (0600) is
    written to a temp file and hard-linked into place, so a crash leaves no half key and two servers
    starting at once agree on one key; the .pub (0644) is derived from it, and rewritten if missing.
    """
    home = Path(home)
    priv_path, pub_path = home / "id_ed25519", home / "id_ed25519.pub"
    out = out or sys.stderr
    created = None
    if not priv_path.exists():
        print("Couldn't find '%s'. Generating new private key." % priv_path, file=out)
        created = Ed25519Key.generate()
        if not _create_exclusive(priv_path, created.to_openssh_private(), 0o600):
            created = None                                  # another process won the race; use its key
    key = Ed25519Key.from_openssh_private(priv_path.read_bytes())
    line = key.public_key_line() + "\n"                   # ssh.MarshalAuthorizedKey ends in a newline
    if created is not None or not pub_path.exists():
        atomic_write(pub_path, line.encode("ascii"), 0o644)
    if created is not None:
        print("Your new public key is: \n\n%s" % line, file=out)
        out.flush()
    return key


def _create_exclusive(path, data, mode):
    """Atomically create `path` with `data` unless it exists; True if we created it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    fd, tmp = tempfile.mkstemp(dir=str(path.parent), prefix="." + path.name + ".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, str(path))                         # fails if path exists: never clobbers a key
        except FileExistsError:
            return False
        except OSError:                                     # no hard links on this filesystem
            if path.exists():
                return False
            os.replace(tmp, str(path))
        _fsync_dir(path.parent)
        return True
    finally:
        _unlink(tmp)


def sign_auth(key, data):
    """Ollama's signed Authorization value for `data`: "<pubkey base64>:<base64 of the 64-byte signature>"."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    return "%s:%s" % (key.authorized_key_b64(), base64.b64encode(key.sign(data)).decode("ascii"))


def sign_challenge(key, method, url, body=b""):
    """The Authorization value for a registry token request to `url` (server/auth.go getAuthorizationToken).

    Signs "<METHOD>,<url>,<base64(hex(sha256(body)))>"; `url` is the full token URL (realm with service,
    scope, ts and nonce), exactly as it is sent.
    """
    digest = hashlib.sha256(body).hexdigest().encode("ascii")
    return sign_auth(key, "%s,%s,%s" % (method, url, base64.b64encode(digest).decode("ascii")))


# -- registry client: OCI distribution pull and push ---------------------------


###############################################################################
# Runner ######################################################################
###############################################################################

#: Request options that decide how llama-server is started; a change in any of them reloads.
LOAD_OPTIONS = ("num_ctx", "num_batch", "num_gpu", "main_gpu", "use_mmap", "num_thread")

#: Ollama sampling option -> llama-server /completion field.
SAMPLING_FIELDS = {
    "num_predict": "n_predict", "num_keep": "n_keep", "temperature": "temperature", "top_k": "top_k",
    "top_p": "top_p", "min_p": "min_p", "typical_p": "typical_p", "repeat_penalty": "repeat_penalty",
    "repeat_last_n": "repeat_last_n", "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty", "seed": "seed", "stop": "stop",
}

RUNNER_STOPPED = ("model runner has unexpectedly stopped, this may be due to resource limitations or an "
                  "internal error, check ollama server logs for details")


def find_llama_server(config):
    """The llama-server binary: OLLAMA_LLAMA_SERVER, bin/ beside ollama.py, ~/.ollama/bin, then PATH."""
    here = Path(os.path.abspath(__file__)).parent
    candidates = [config.llama_server, here / "bin" / "llama-server", config.home / "bin" / "llama-server",
                  shutil.which("llama-server")]
    for c in candidates:
        if c and os.path.isfile(str(c)) and os.access(str(c), os.X_OK):
            return str(c)
    raise OllamaError("llama-server not found: run ./build_llama.sh (or set OLLAMA_LLAMA_SERVER)")


def free_port():
    """A free TCP port on 127.0.0.1, as Ollama picks one: listen on port 0, read it back, close."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Runner:
    """One llama-server child process serving one GGUF on a free loopback port.

    `start()` launches it and waits for GET /health while watching the child, so a model that
    fails to load is reported with the tail of its log instead of a hang. The inference calls
    (`completion`, `tokenize`, `detokenize`, `apply_template`, `embeddings`) are thin JSON calls.
    """

    def __init__(self, exe, model_path, num_ctx=DEFAULT_NUM_CTX, parallel=1, num_thread=0, num_batch=0,
                 num_gpu=-1, use_mmap=None, embedding=False, projector=None, adapters=(),
                 flash_attention=False, kv_cache_type="", log_path=None, extra_args=()):
        self.exe, self.model_path = exe, str(model_path)
        self.num_ctx, self.parallel = num_ctx, max(1, parallel)
        self.port = free_port()
        self.log_path = log_path
        args = [exe, "--model", self.model_path, "--host", "127.0.0.1", "--port", str(self.port),
                "--no-webui", "--offline", "--ctx-size", str(num_ctx * self.parallel),
                "--parallel", str(self.parallel), "--no-kv-unified"]
        if num_thread:
            args += ["--threads", str(num_thread)]
        if num_batch:
            args += ["--batch-size", str(num_batch)]
        if num_gpu is not None and num_gpu >= 0:
            args += ["--n-gpu-layers", str(num_gpu)]
        if use_mmap is False:
            args += ["--load-mode", "none"]
        if embedding:
            args += ["--embedding"]
        if projector:
            args += ["--mmproj", str(projector)]
        for a in adapters:
            args += ["--lora", str(a)]
        if flash_attention:
            args += ["--flash-attn", "on"]
        if kv_cache_type:
            args += ["--cache-type-k", kv_cache_type, "--cache-type-v", kv_cache_type]
        self.args = args + list(extra_args)
        self.proc = None
        self._log = None

    def start(self, timeout=DEFAULT_LOAD_TIMEOUT):
        """Start the child and wait until it answers /health with {"status": "ok"}."""
        log.info("starting llama server: %s", " ".join(_shell_quote(a) for a in self.args))
        if self.log_path:
            Path(self.log_path).parent.mkdir(parents=True, exist_ok=True)
            self._log = open(str(self.log_path), "ab")
        self.proc = subprocess.Popen(self.args, stdin=subprocess.DEVNULL, stdout=self._log or subprocess.DEVNULL,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            code = self.proc.poll()
            if code is not None:
                self._close_log()
                raise OllamaError("llama-server process has terminated: exit status %s%s"
                                  % (code, self._log_tail()))
            try:
                status, body = self._call("GET", "/health", timeout=0.5)
                if status == 200 and body.get("status") == "ok":
                    return self
            except (OSError, http.client.HTTPException, ValueError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise OllamaError("timed out waiting for llama runner to start%s" % self._log_tail())
            time.sleep(0.02)

    def _log_tail(self, lines=12):
        if not self.log_path:
            return ""
        try:
            with open(str(self.log_path), "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 16384))
                tail = f.read().decode(errors="replace").splitlines()[-lines:]
        except OSError:
            return ""
        errors = [ln for ln in tail if "error" in ln.lower() or "failed" in ln.lower()]
        return ": " + " | ".join((errors or tail)[-4:]).strip()

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def stop(self, grace=5.0):
        """Stop the child: SIGTERM, then SIGKILL after `grace` seconds. Never leaves an orphan."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            try:
                proc.terminate()
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            except OSError:
                pass
        self._close_log()

    def _close_log(self):
        if self._log:
            self._log.close()
            self._log = None

    @property
    def pid(self):
        return self.proc.pid if self.proc else None

    def _connect(self, timeout=None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        conn.connect()
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn

    def _call(self, method, path, body=None, timeout=None):
        conn = self._connect(timeout)
        try:
            data = json_dumps(body).encode() if body is not None else None
            conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            raw = resp.read()
            return resp.status, (json.loads(raw) if raw.strip() else {})
        finally:
            conn.close()

    def call(self, path, body):
        """POST a JSON body to the runner and return its JSON answer; engine errors become OllamaError."""
        try:
            status, out = self._call("POST", path, body)
        except (OSError, http.client.HTTPException):
            raise OllamaError(RUNNER_STOPPED) from None
        if status != 200:
            raise _engine_error(status, out)
        return out

    def completion(self, payload):
        """Stream POST /completion: yields each SSE event as a dict, the last one with "stop": true
        and "timings". Closing the generator closes the connection, which cancels the task."""
        body = dict(payload, stream=True)
        try:
            conn = self._connect()
            conn.request("POST", "/completion", body=json_dumps(body).encode(),
                         headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
        except (OSError, http.client.HTTPException):
            raise OllamaError(RUNNER_STOPPED) from None
        try:
            if resp.status != 200:
                raw = resp.read()
                try:
                    err = json.loads(raw)
                except ValueError:
                    err = {"error": raw.decode(errors="replace")}
                raise _engine_error(resp.status, err)
            while True:
                try:
                    line = resp.readline()
                except (OSError, http.client.HTTPException):
                    raise OllamaError(RUNNER_STOPPED) from None
                if not line:
                    if not self.alive():
                        raise OllamaError(RUNNER_STOPPED)
                    raise OllamaError("an error was encountered while running the model: "
                                      "unexpected end of response")
                if not line.startswith(b"data: "):
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    raise _engine_error(500, event)
                yield event
                if event.get("stop"):
                    return
        finally:
            conn.close()

    def tokenize(self, text, add_special=False):
        return self.call("/tokenize", {"content": text, "add_special": add_special})["tokens"]

    def detokenize(self, tokens):
        return self.call("/detokenize", {"tokens": list(tokens)})["content"]

    def apply_template(self, messages):
        """Render messages with the GGUF's own chat template (llama-server's jinja), generation prompt added."""
        return self.call("/apply-template", {"messages": messages})["prompt"]

    def embeddings(self, inputs):
        """Raw (unnormalised) pooled embeddings for each input string, in order."""
        out = self.call("/embedding", {"content": inputs, "embd_normalize": -1})
        vectors = [None] * len(inputs)
        for item in out if isinstance(out, list) else [out]:
            emb = item["embedding"]
            vectors[item.get("index", 0)] = emb[0] if emb and isinstance(emb[0], list) else emb
        return vectors


def _engine_error(status, body):
    """Turn a llama-server error body into an OllamaError with Ollama's status and a clear message."""
    err = body.get("error", body) if isinstance(body, dict) else body
    if isinstance(err, dict):
        message = err.get("message") or json_dumps(err)
        kind = err.get("type", "")
        if kind == "exceed_context_size_error":
            return BadRequest("the prompt is %s tokens but the context is %s tokens (num_ctx): shorten the "
                              "input, raise num_ctx, or set \"truncate\": true to drop the oldest messages"
                              % (err.get("n_prompt_tokens", "?"), err.get("n_ctx", "?")))
        if "JSON schema conversion failed" in message:         # llama.cpp's json_schema_to_grammar
            return BadRequest("invalid JSON schema in format: %s" % message.split("failed:", 1)[-1].strip())
        if status == 400 or kind == "invalid_request_error":
            return BadRequest(message)
    else:
        message = str(err)
    return OllamaError("an error was encountered while running the model: %s" % message)


def stop_reason(event):
    """Ollama's done_reason from a final /completion event: stop_type (new) or stopped_* (old builds)."""
    kind = event.get("stop_type")
    if kind is None:
        kind = "limit" if event.get("stopped_limit") else "eos" if event.get("stopped_eos") else \
            "word" if event.get("stopped_word") else "none"
    return "length" if kind == "limit" else "stop"


def _shell_quote(arg):
    return arg if re.match(r"^[\w./:=,+-]+$", arg) else "'" + arg.replace("'", "'\\''") + "'"


###############################################################################
# Scheduler ###################################################################
###############################################################################

class Model:
    """What a manifest says to run: the GGUF blob and the Modelfile layers, read from the store."""

    def __init__(self, store, name):
        self.name, raw, self.manifest = store.get(name)
        self.digest = hashlib.sha256(raw).hexdigest()
        self.model_path = self.projector = None
        self.adapters, self.license, self.messages = [], [], []
        self.template = self.system = None
        self.params = {}
        self.size = sum(layer.get("size", 0) for layer in self.manifest.get("layers") or [])
        for layer in self.manifest.get("layers") or []:
            kind = layer.get("mediaType", "")[len(MEDIA_PREFIX):]
            path = store.blob_path(layer["digest"])
            if kind == "model":
                self.model_path = path
            elif kind == "projector":
                self.projector = path
            elif kind == "adapter":
                self.adapters.append(path)
            elif kind in ("template", "prompt"):
                self.template = path.read_text()
            elif kind == "system":
                self.system = path.read_text()
            elif kind == "license":
                self.license.append(path.read_text())
            elif kind == "params":
                self.params = json.loads(path.read_bytes() or b"{}")
            elif kind == "messages":
                self.messages = json.loads(path.read_bytes() or b"[]")
        config = (self.manifest.get("config") or {}).get("digest")
        self.config = {}
        if config and store.has_blob(config):
            try:
                self.config = json.loads(store.blob_path(config).read_bytes())
            except ValueError:
                pass
        if self.model_path is None or not self.model_path.is_file():
            raise NotFound('model "%s" not found, try pulling it first' % self.name.display())

    @property
    def short(self):
        return self.name.display()

    def details(self):
        c = self.config
        return {"parent_model": "", "format": c.get("model_format", "gguf"), "family": c.get("model_family", ""),
                "families": c.get("model_families"), "parameter_size": c.get("model_type", ""),
                "quantization_level": c.get("file_type", "")}


class _Loaded:
    """A runner in the scheduler's table, with its reference count and expiry."""

    def __init__(self, model, runner, load_key, keep_alive):
        self.model, self.runner, self.load_key = model, runner, load_key
        self.keep_alive = keep_alive
        self.refs = 0
        self.expires = FOREVER            # time.time() deadline once idle
        self.loaded_at = time.time()


class Scheduler:
    """Keeps llama-server children: one per loaded model, shared by concurrent requests.

    `acquire()` returns a loaded runner for a model (loading, reloading or evicting as needed) and
    must be paired with `release()`. Loads are serialised; at most OLLAMA_MAX_LOADED_MODELS stay
    loaded, and an idle one that expires soonest is evicted to make room. More than
    OLLAMA_MAX_QUEUE waiting requests get 503. A keep-alive timer starts when the last request on
    a runner finishes; a background thread stops runners whose time is up.
    """

    def __init__(self, config, exe=None):
        self.config = config
        self.exe = exe
        self.loaded = {}                              # Name key -> _Loaded
        self.cond = threading.Condition()
        self.load_lock = threading.Lock()
        self.waiting = 0
        self.closed = False
        self._reaper = threading.Thread(target=self._reap, name="scheduler-reaper", daemon=True)
        self._reaper.start()

    def _runner_for(self, model, opts, embedding):
        exe = self.exe or find_llama_server(self.config)
        self.exe = exe
        trained = _trained_context(model)
        num_ctx = max(4, int(opts.get("num_ctx") or self.config.context_length))
        if trained:
            num_ctx = min(num_ctx, trained)
        return Runner(exe, model.model_path, num_ctx=num_ctx,
                      parallel=1 if embedding else self.config.num_parallel,
                      num_thread=int(opts.get("num_thread") or 0), num_batch=int(opts.get("num_batch") or 0),
                      num_gpu=int(opts["num_gpu"]) if opts.get("num_gpu") is not None else -1,
                      use_mmap=opts.get("use_mmap"), embedding=embedding, projector=model.projector,
                      adapters=model.adapters, flash_attention=self.config.flash_attention,
                      kv_cache_type=self.config.kv_cache_type,
                      log_path=self.config.home / "logs" / ("runner-%s.log" % _safe_filename(model.short)),
                      extra_args=_embedding_args(model, num_ctx) if embedding else ())

    def acquire(self, model, opts, keep_alive, embedding=False):
        """A loaded _Loaded entry for `model` with its refcount taken. Raises Busy when the queue is full."""
        key = model.name.key()
        load_key = (model.digest, embedding) + tuple(opts.get(k) for k in LOAD_OPTIONS)
        with self.cond:
            if self.waiting >= self.config.max_queue:
                raise Busy("server busy, please try again.  maximum pending requests exceeded")
            self.waiting += 1
        try:
            while True:
                with self.cond:
                    if self.closed:
                        raise OllamaError("server is shutting down")
                    entry = self.loaded.get(key)
                    if entry is not None and entry.load_key == load_key and entry.runner.alive():
                        entry.refs += 1
                        entry.keep_alive = keep_alive
                        entry.expires = FOREVER
                        return entry
                    if entry is not None and entry.refs > 0 and entry.runner.alive():
                        self.cond.wait(0.5)           # a reload must wait for the old runner's requests
                        continue
                    if entry is not None:
                        self._unload(key)
                    if len(self.loaded) >= self.config.max_loaded_models:
                        if not self._evict_one():
                            self.cond.wait(0.5)
                            continue
                with self.load_lock:
                    with self.cond:
                        if key in self.loaded:        # another request loaded it meanwhile
                            continue
                    runner = self._runner_for(model, opts, embedding)
                    runner.start(self.config.load_timeout)
                    entry = _Loaded(model, runner, load_key, keep_alive)
                    with self.cond:
                        self.loaded[key] = entry
                        entry.refs += 1
                        self.cond.notify_all()
                    return entry
        finally:
            with self.cond:
                self.waiting -= 1

    def release(self, entry, keep_alive=None):
        """Drop a reference; the keep-alive timer starts when the last one goes (0 unloads now)."""
        with self.cond:
            entry.refs -= 1
            if keep_alive is not None:
                entry.keep_alive = keep_alive
            if entry.refs <= 0:
                entry.refs = 0
                entry.expires = time.time() + entry.keep_alive if entry.keep_alive != FOREVER else FOREVER
                if entry.keep_alive <= 0 or not entry.runner.alive():
                    self._unload(entry.model.name.key(), entry)
            self.cond.notify_all()

    def expire(self, name):
        """Unload `name` now if idle, or as soon as its requests finish. False if it was not loaded."""
        with self.cond:
            entry = self.loaded.get(Name.parse(name).key() if isinstance(name, str) else name.key())
            if entry is None:
                return False
            entry.keep_alive = 0
            if entry.refs == 0:
                self._unload(entry.model.name.key(), entry)
            return True

    def _unload(self, key, entry=None):
        current = self.loaded.get(key)
        if current is None or (entry is not None and current is not entry):
            return
        del self.loaded[key]
        log.info("unloading model %s", current.model.short)
        threading.Thread(target=current.runner.stop, daemon=True).start()

    def _evict_one(self):
        idle = [e for e in self.loaded.values() if e.refs == 0]
        if not idle:
            return False
        victim = min(idle, key=lambda e: (e.expires, e.model.short))
        self._unload(victim.model.name.key(), victim)
        return True

    def _reap(self):
        while True:
            time.sleep(0.25)
            with self.cond:
                if self.closed:
                    return
                now = time.time()
                for key, entry in list(self.loaded.items()):
                    if entry.refs == 0 and (entry.expires <= now or not entry.runner.alive()):
                        self._unload(key, entry)

    def running(self):
        """The loaded models, latest expiry first, for /api/ps."""
        with self.cond:
            entries = list(self.loaded.values())
        return sorted(entries, key=lambda e: -e.expires if e.expires != FOREVER else -float("inf"))

    def shutdown(self):
        """Stop every child and wait for them: no orphans."""
        with self.cond:
            self.closed = True
            entries = list(self.loaded.values())
            self.loaded.clear()
            self.cond.notify_all()
        for e in entries:
            e.runner.stop()


def _trained_context(model):
    c = model.config.get("context_length")
    if c:
        return int(c)
    try:
        return gguf_context_length(model.model_path)
    except Exception:          # an unreadable header is the engine's problem to report
        return 0


def embedding_pooling(model):
    """The GGUF's `<arch>.pooling_type` (llama.cpp's enum: 0 none, 1 mean, 2 cls, 3 last, 4 rank),
    or None when the model declares none.

    Ollama's rule: a model with a pooling type is an embedding model, one without is a
    completion model. Re-point this at the GGUF section's reader once it lands."""
    if "pooling_type" in model.config:
        return model.config["pooling_type"]
    try:
        arch = _gguf_scalars(model.model_path, ("general.architecture",)).get("general.architecture")
        return _gguf_scalars(model.model_path, ("%s.pooling_type" % arch,)).get("%s.pooling_type" % arch)
    except (OSError, ValueError, struct.error):
        return None


def is_embedding_model(model):
    """True for a model that only embeds (has "embedding" capability and no "completion")."""
    caps = getattr(model, "capabilities", None)
    if caps is not None:
        return "embedding" in caps and "completion" not in caps
    return embedding_pooling(model) is not None


def _embedding_args(model, num_ctx):
    """llama-server flags for an embedding runner: a whole input must fit one physical batch,
    and a model without pooling of its own is pooled on its last token, the hidden state
    Ollama's runner takes (llama_get_embeddings_ith of the last prompt token).

    llama-server refuses a prompt that fills its context exactly (it keeps room for one
    generated token), so the context gets one spare cell: an input cut to num_ctx tokens,
    as Ollama cuts it, still fits. These flags come last, so they win over Runner's."""
    size = str(num_ctx + 1)
    args = ["--ctx-size", size, "--batch-size", size, "--ubatch-size", size]
    if embedding_pooling(model) in (None, 0):
        args += ["--pooling", "last"]
    return args


#: GGUF metadata value types -> struct format of a fixed-size scalar (8 = string, 9 = array).
_GGUF_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def _gguf_scalars(path, keys):
    """Read scalar metadata `keys` from a GGUF v2/v3 header (arrays skipped); missing keys are absent.
    A stop-gap for the GGUF section's reader."""
    import mmap
    out = {}
    with open(str(path), "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        if m[:4] != b"GGUF" or struct.unpack_from("<I", m, 4)[0] < 2:
            raise ValueError("not a GGUF v2+ file")
        count = struct.unpack_from("<Q", m, 16)[0]
        pos = 24

        def string(pos):
            n = struct.unpack_from("<Q", m, pos)[0]
            return m[pos + 8:pos + 8 + n].decode("utf-8", "replace"), pos + 8 + n

        def skip(kind, pos):
            if kind == 8:
                return pos + 8 + struct.unpack_from("<Q", m, pos)[0]
            if kind == 9:
                sub, n = struct.unpack_from("<IQ", m, pos)
                pos += 12
                if sub in _GGUF_SCALAR:
                    return pos + n * struct.calcsize("<" + _GGUF_SCALAR[sub])
                for _ in range(n):
                    pos = skip(sub, pos)
                return pos
            return pos + struct.calcsize("<" + _GGUF_SCALAR[kind])

        for _ in range(count):
            key, pos = string(pos)
            kind = struct.unpack_from("<I", m, pos)[0]
            pos += 4
            if key in keys and kind in _GGUF_SCALAR:
                out[key] = struct.unpack_from("<" + _GGUF_SCALAR[kind], m, pos)[0]
            elif key in keys and kind == 8:
                out[key] = string(pos)[0]
            if len(out) == len(keys):
                break
            pos = skip(kind, pos)
    return out


def _safe_filename(text):
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)


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
#: Preflight answers as gin-contrib/cors writes them: canonical header names joined by ",".
_CORS_HEADERS = ",".join(["Authorization", "Content-Type", "User-Agent", "Accept", "X-Requested-With", "Openai-Beta"]
                         + ["X-Stainless-" + h for h in (
                             "Arch", "Async", "Custom-Poll-Interval", "Helper-Method", "Lang", "Os",
                             "Package-Version", "Poll-Helper", "Retry-Count", "Runtime", "Runtime-Version",
                             "Timeout")])
_CORS_METHODS = "GET,POST,PUT,PATCH,DELETE,HEAD,OPTIONS"


class OllamaHandler(http.server.BaseHTTPRequestHandler):
    """Serves Ollama's API: host check, CORS, then one route table (ROUTES) for dispatch."""
    protocol_version = "HTTP/1.1"
    server_version = "ollama.py/" + __version__

    def setup(self):
        super().setup()
        # one small write per token: without this, Nagle + delayed ACK can hold a chunk for 40 ms
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

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
        # Ollama's order: CORS (gin-contrib/cors) first, then the DNS-rebinding host guard.
        # Both refuse with a bare 403; a preflight from an allowed origin is a bare 204.
        origin, host = self.headers.get("Origin"), self.headers.get("Host", "")
        self._cors_origin = None
        try:
            if origin and origin not in ("http://" + host, "https://" + host):   # same origin: not CORS
                if not self.server.origin_allowed(origin):
                    return self._send(Response(403, b"", None))
                self._cors_origin = origin
                if self.command == "OPTIONS":
                    return self._send(Response(204, b"", None))
            verdict = self.server.host_allowed(host)
            if not verdict:
                return self._send(Response(403, b"", None))
            if self.command == "OPTIONS" and verdict == "name":
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
        origin = getattr(self, "_cors_origin", None)
        if not origin:
            return
        allow_all = "*" in self.server.origins
        if self.command == "OPTIONS":
            self.send_header("Access-Control-Allow-Methods", _CORS_METHODS)
            self.send_header("Access-Control-Allow-Headers", _CORS_HEADERS)
            self.send_header("Access-Control-Max-Age", "43200")
            if not allow_all:
                for vary in ("Origin", "Access-Control-Request-Method", "Access-Control-Request-Headers"):
                    self.send_header("Vary", vary)
        elif not allow_all:
            self.send_header("Vary", "Origin")
        self.send_header("Access-Control-Allow-Origin", "*" if allow_all else origin)

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
        self.scheduler = Scheduler(config)
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
        """The DNS-rebinding guard (Ollama's allowedHostsMiddleware). Falsy: refuse with 403. Bound
        off loopback, or a Host that is a loopback/private/unspecified/local address: True. A local
        name (localhost, this machine's name, *.localhost, *.local, *.internal): "name"."""
        if not self.loopback:
            return True
        host = _split_host(host_header).lower()
        ip = _parse_ip(host)
        if ip is not None:
            return ip.is_loopback or ip.is_unspecified or _go_private(ip) or host in _local_addresses()
        if host in ("", "localhost", socket.gethostname().lower()) or \
                host.endswith((".localhost", ".local", ".internal")):
            return "name"
        return False

    def origin_allowed(self, origin):
        """CORS: `origin` matches OLLAMA_ORIGINS or a default; "*" allows all, and each other
        pattern may hold one "*" (gin-contrib/cors AllowWildcard)."""
        for pattern in self.origins:
            if pattern == "*" or pattern == origin:
                return True
            if pattern.count("*") == 1:
                prefix, suffix = pattern.split("*")
                if origin.startswith(prefix) and origin.endswith(suffix) and \
                        len(origin) >= len(prefix) + len(suffix):
                    return True
        return False

    def server_close(self):
        if self.scheduler is not None:
            self.scheduler.shutdown()
        super().server_close()


def _split_host(host_header):
    """The host part of a Host header (Go's net.SplitHostPort, else the whole value)."""
    if host_header.startswith("["):
        inner, _, rest = host_header[1:].partition("]")
        return inner if rest.startswith(":") or not rest else host_header
    if host_header.count(":") == 1:
        return host_header.split(":", 1)[0]
    return host_header


def _parse_ip(text):
    import ipaddress
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _go_private(ip):
    """Go's netip.Addr.IsPrivate: RFC 1918 and RFC 4193 only (Python's is_private is much wider)."""
    import ipaddress
    nets = ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16") if ip.version == 4 else ("fc00::/7",)
    return any(ip in ipaddress.ip_network(n) for n in nets)


def _local_addresses():
    """This machine's own addresses, as far as its name resolves (Ollama's isLocalIP)."""
    try:
        return {info[4][0].lower() for info in socket.getaddrinfo(socket.gethostname(), None)}
    except OSError:
        return set()


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


#: Ollama's api.DefaultOptions for sampling (sent to llama-server, whose defaults differ).
DEFAULT_OPTIONS = {"num_keep": 4, "temperature": 0.8, "top_k": 40, "top_p": 0.9, "min_p": 0.0,
                   "typical_p": 1.0, "repeat_last_n": 64, "repeat_penalty": 1.0, "presence_penalty": 0.0,
                   "frequency_penalty": 0.0, "seed": -1, "num_predict": -1}


def _ns(seconds):
    return int(seconds * 1e9)


def _find_model(req, body, key="model"):
    """The Model named in the request: 400 for a missing/invalid name, 404 when not stored."""
    text = body.get(key) or body.get("name")
    if not text:
        raise BadRequest("model is required")
    if not isinstance(text, str):
        raise BadRequest("invalid model name")
    name = Name.parse(text)
    if req.server.store.resolve(name) is None:
        raise NotFound("model '%s' not found" % text)
    return Model(req.server.store, name)


def _request_options(model, body):
    """defaults < the model's params layer < the request's options, validated."""
    opts = dict(DEFAULT_OPTIONS)
    opts.update(model.params)
    opts.update(parse_options(body.get("options") or {}))
    return opts


def _sampling(opts, fmt):
    """The /completion sampling fields for merged options and a `format`."""
    out = {field: opts[k] for k, field in SAMPLING_FIELDS.items() if opts.get(k) is not None}
    if isinstance(out.get("stop"), str):
        out["stop"] = [out["stop"]]
    if fmt is not None:
        out["json_schema"] = _format_schema(fmt)
    out["cache_prompt"] = True
    return out


def _format_schema(fmt):
    """`format`: "json" (any JSON object) or a JSON schema object; anything else is 400."""
    if fmt == "json":
        return {"type": "object"}
    if isinstance(fmt, dict):
        return fmt
    if fmt in ("", None):
        return None
    raise BadRequest('invalid format: %s; expected "json" or a valid JSON Schema object' % json_dumps(fmt))


def _metrics(final, started, load_seconds):
    """Ollama's timing fields from the final /completion event (zero values omitted)."""
    t = final.get("timings") or {}
    out = {"total_duration": _ns(time.monotonic() - started), "load_duration": _ns(load_seconds),
           "prompt_eval_count": int(t.get("prompt_n", 0)) + int(t.get("cache_n", 0)),
           "prompt_eval_duration": int(t.get("prompt_ms", 0) * 1e6),
           "eval_count": int(t.get("predicted_n", 0)),
           "eval_duration": int(t.get("predicted_ms", 0) * 1e6)}
    return {k: v for k, v in out.items() if v}


def _render(model, runner, messages, template=None, tools=None, think=None):
    """The prompt text for a conversation: the model's Go TEMPLATE when it has one, else the
    chat template embedded in the GGUF (through llama-server), else the plain prompt."""
    template = template if template is not None else model.template
    if template is not None:
        return render_prompt(template, messages, tools=tools, think=think)
    return runner.apply_template([{"role": m.get("role"), "content": m.get("content") or ""}
                                  for m in messages])


def _schedule(req, model, body, embedding=False):
    """Validate keep_alive and options, then get a loaded runner: (entry, keep_alive, opts, load seconds)."""
    keep_alive = parse_keep_alive(body.get("keep_alive"), req.server.config.keep_alive)
    opts = _request_options(model, body)
    started = time.monotonic()
    entry = req.server.scheduler.acquire(model, opts, keep_alive, embedding=embedding)
    return entry, keep_alive, opts, time.monotonic() - started


def _completion(req, entry, prompt, opts, fmt):
    """Stream (piece, final_event_or_None) from the runner; the runner is released by the caller."""
    payload = dict(_sampling(opts, fmt), prompt=prompt)
    events = entry.runner.completion(payload)
    try:
        for event in events:
            if event.get("stop"):
                yield event.get("content", ""), event
                return
            yield event.get("content", ""), None
    finally:
        events.close()


def api_generate(req):
    """POST /api/generate: complete a prompt (streamed NDJSON unless "stream": false)."""
    body = req.json()
    started = time.monotonic()
    model = _find_model(req, body)
    keep_alive = parse_keep_alive(body.get("keep_alive"), req.server.config.keep_alive)
    prompt = body.get("prompt") or ""
    base = {"model": body.get("model")}
    if not prompt and keep_alive == 0 and not body.get("images"):
        req.server.scheduler.expire(model.name)
        return dict(base, created_at=rfc3339(), response="", done=True, done_reason="unload")
    if body.get("raw") and (body.get("template") or body.get("system") or body.get("context")):
        raise BadRequest("raw mode does not support template, system, or context")
    if body.get("think") not in (None, False):
        raise BadRequest('"%s" does not support thinking' % body.get("model"))
    if body.get("images") and model.projector is None:
        raise BadRequest("this model is missing data required for image input")
    fmt = body.get("format")
    _format_schema(fmt)
    entry, keep_alive, opts, load_s = _schedule(req, model, body)
    try:
        if not prompt:
            req.server.scheduler.release(entry, keep_alive)
            return dict(base, created_at=rfc3339(), response="", done=True, done_reason="load")
        runner = entry.runner
        if body.get("raw"):
            text = prompt
        else:
            messages = []
            system = body.get("system") or model.system
            if system:
                messages.append({"role": "system", "content": system})
            if not body.get("context"):
                messages.extend(model.messages)
            messages.append({"role": "user", "content": prompt, "images": body.get("images")})
            if body.get("suffix"):
                text = render_prompt(body.get("template") or model.template or "{{ .Prompt }}", messages,
                                     suffix=body["suffix"])
            else:
                text = _render(model, runner, messages, template=body.get("template"))
        if body.get("context"):
            text = runner.detokenize(body["context"]) + text
        if body.get("_debug_render_only"):
            req.server.scheduler.release(entry, keep_alive)
            return dict(base, created_at=rfc3339(), _debug_info={"rendered_template": text, "image_count": 0})
    except BaseException:
        req.server.scheduler.release(entry, keep_alive)
        raise

    def chunks():
        pieces = []
        try:
            for piece, final in _completion(req, entry, text, opts, fmt):
                if final is None:
                    pieces.append(piece)
                    yield dict(base, created_at=rfc3339(), response=piece, done=False)
                    continue
                pieces.append(piece)
                done = dict(base, created_at=rfc3339(), response=piece, done=True, done_reason=stop_reason(final))
                if not body.get("raw"):
                    done["context"] = entry.runner.tokenize(text + "".join(pieces))
                done.update(_metrics(final, started, load_s))
                yield done
        finally:
            req.server.scheduler.release(entry, keep_alive)

    return _respond(body, chunks(), "response")


def _respond(body, chunks, field):
    """Stream the chunks, or with "stream": false collapse them into one object."""
    if body.get("stream", True) is not False:
        return Stream(chunks)
    parts, last = [], None
    for last in chunks:
        if field == "response":
            parts.append(last.get("response", ""))
        else:
            parts.append(last["message"].get("content", ""))
    if last is None:
        raise OllamaError("no response from the model")
    if field == "response":
        last["response"] = "".join(parts)
    else:
        last["message"]["content"] = "".join(parts)
    return last


def _check_messages(messages):
    if not isinstance(messages, list):
        raise BadRequest("messages must be an array")
    out = []
    for m in messages:
        if not isinstance(m, dict):
            raise BadRequest("invalid message: %s" % json_dumps(m))
        m = dict(m)
        m["role"] = str(m.get("role", "")).lower()
        out.append(m)
    return out


def api_chat(req):
    """POST /api/chat: the next assistant message of a conversation (streamed unless "stream": false)."""
    body = req.json()
    started = time.monotonic()
    model = _find_model(req, body)
    keep_alive = parse_keep_alive(body.get("keep_alive"), req.server.config.keep_alive)
    messages = _check_messages(body.get("messages") or [])
    base = {"model": body.get("model")}
    if not messages and keep_alive == 0:
        req.server.scheduler.expire(model.name)
        return dict(base, created_at=rfc3339(), message={"role": "assistant", "content": ""}, done=True,
                    done_reason="unload")
    if body.get("think") not in (None, False):
        raise BadRequest('"%s" does not support thinking' % body.get("model"))
    if any(m.get("images") for m in messages) and model.projector is None:
        raise BadRequest("this model is missing data required for image input")
    fmt = body.get("format")
    _format_schema(fmt)
    entry, keep_alive, opts, load_s = _schedule(req, model, body)
    try:
        if not messages:
            req.server.scheduler.release(entry, keep_alive)
            return dict(base, created_at=rfc3339(), message={"role": "assistant", "content": ""}, done=True,
                        done_reason="load")
        full = list(model.messages) + messages
        if full[0].get("role") != "system" and model.system:
            full.insert(0, {"role": "system", "content": model.system})
        text = _render(model, entry.runner, full, tools=body.get("tools"))
        if body.get("_debug_render_only"):
            req.server.scheduler.release(entry, keep_alive)
            return dict(base, created_at=rfc3339(), _debug_info={"rendered_template": text, "image_count": 0})
    except BaseException:
        req.server.scheduler.release(entry, keep_alive)
        raise

    def chunks():
        try:
            for piece, final in _completion(req, entry, text, opts, fmt):
                msg = {"role": "assistant", "content": piece}
                if final is None:
                    yield dict(base, created_at=rfc3339(), message=msg, done=False)
                    continue
                done = dict(base, created_at=rfc3339(), message=msg, done=True, done_reason=stop_reason(final))
                done.update(_metrics(final, started, load_s))
                yield done
        finally:
            req.server.scheduler.release(entry, keep_alive)

    return _respond(body, chunks(), "message")


def api_ps(req):
    """GET /api/ps: the models loaded now."""
    out = []
    for e in req.server.scheduler.running():
        expires = e.expires if e.expires != FOREVER else time.time() + 292 * 365 * 86400
        out.append({"name": e.model.short, "model": e.model.short, "size": e.model.size,
                    "digest": e.model.digest, "details": e.model.details(),
                    "expires_at": rfc3339_local(expires), "size_vram": 0,
                    "context_length": e.runner.num_ctx})
    return {"models": out}


def _embed_inputs(value):
    """/api/embed `input`: a string or a list of strings; an empty string means no input."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value] if value else []
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise BadRequest("invalid input type")


def _fit_context(runner, text, truncate=True):
    """The tokens llama-server will embed for `text`, special tokens included, cut to the runner's
    context (keeping the BOS/EOS the tokenizer adds); too long without `truncate` is 400."""
    tokens = runner.tokenize(text, add_special=True)
    if len(tokens) <= runner.num_ctx:
        return tokens
    if not truncate:
        raise BadRequest("the input length exceeds the context length")
    plain = runner.tokenize(text, add_special=False)
    head = next((i for i in range(len(tokens)) if tokens[i:i + len(plain)] == plain), 0)
    prefix, suffix = tokens[:head], tokens[head + len(plain):]
    keep = runner.num_ctx - len(prefix) - len(suffix)
    if keep <= 0:
        raise BadRequest("input after truncation exceeds maximum context length")
    return prefix + plain[:keep] + suffix


def _normalize(vector):
    """L2-normalise (Ollama's normalize: NaN/Inf is an error, a zero vector stays zero)."""
    total = 0.0
    for v in vector:
        if v != v or v in (float("inf"), float("-inf")):
            raise OllamaError("embedding contains NaN or Inf values")
        total += v * v
    scale = 1.0 / max(math.sqrt(total), 1e-12)
    return [v * scale for v in vector]


def api_embed(req):
    """POST /api/embed: L2-normalised embeddings for a string or a list of strings."""
    body = req.json()
    started = time.monotonic()
    inputs = _embed_inputs(body.get("input"))
    model = _find_model(req, body)
    truncate = body.get("truncate", True) is not False
    dimensions = body.get("dimensions") or 0
    if not isinstance(dimensions, int) or isinstance(dimensions, bool):
        raise BadRequest("json: cannot unmarshal %s into Go struct field EmbedRequest.dimensions of type int"
                         % type(dimensions).__name__)
    entry, keep_alive, _opts, load_s = _schedule(req, model, body, embedding=True)
    try:
        if not inputs:
            return {"model": body.get("model"), "embeddings": []}
        batches = [_fit_context(entry.runner, text, truncate) for text in inputs]
        vectors = entry.runner.embeddings(batches)
    finally:
        req.server.scheduler.release(entry, keep_alive)
    embeddings = []
    for vector in vectors:
        vector = _normalize(vector)
        if 0 < dimensions < len(vector):
            vector = _normalize(vector[:dimensions])
        embeddings.append(vector)
    return {"model": body.get("model"), "embeddings": embeddings,
            "total_duration": _ns(time.monotonic() - started), "load_duration": _ns(load_s),
            "prompt_eval_count": sum(len(b) for b in batches)}


def api_embeddings(req):
    """POST /api/embeddings (legacy): one raw, unnormalised embedding of `prompt`."""
    body = req.json()
    model = _find_model(req, body)
    prompt = body.get("prompt") or ""
    if not isinstance(prompt, str):
        raise BadRequest("json: cannot unmarshal %s into Go struct field EmbeddingRequest.prompt of type string"
                         % type(prompt).__name__)
    entry, keep_alive, _opts, _load_s = _schedule(req, model, body, embedding=True)
    try:
        if not prompt:
            return {"embedding": []}
        return {"embedding": entry.runner.embeddings([_fit_context(entry.runner, prompt)])[0]}
    finally:
        req.server.scheduler.release(entry, keep_alive)


def _tokenizer_entry(req, model, body):
    """A runner for tokenizing: the one already loaded for `model` in whichever mode, else a new
    one in the model's own mode (embedding models embed, the rest complete)."""
    with req.server.scheduler.cond:
        loaded = req.server.scheduler.loaded.get(model.name.key())
        embedding = loaded.load_key[1] if loaded is not None else is_embedding_model(model)
    return _schedule(req, model, body, embedding=embedding)


def api_tokenize(req):
    """POST /api/tokenize: the model's token ids for `text` (no BOS/EOS added)."""
    body = req.json()
    text = body.get("text", body.get("content", ""))
    if not isinstance(text, str):
        raise BadRequest("text must be a string")
    model = _find_model(req, body)
    entry, keep_alive, _opts, _load_s = _tokenizer_entry(req, model, body)
    try:
        tokens = entry.runner.tokenize(text) if text else []
    finally:
        req.server.scheduler.release(entry, keep_alive)
    return {"model": body.get("model"), "tokens": tokens}


def api_detokenize(req):
    """POST /api/detokenize: the text of a list of token ids."""
    body = req.json()
    tokens = body.get("tokens")
    if tokens is None:
        tokens = []
    if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
        raise BadRequest("tokens must be an array of integers")
    model = _find_model(req, body)
    entry, keep_alive, _opts, _load_s = _tokenizer_entry(req, model, body)
    try:
        text = entry.runner.detokenize(tokens) if tokens else ""
    finally:
        req.server.scheduler.release(entry, keep_alive)
    return {"model": body.get("model"), "text": text}

# -- registry (registry issue) -----------------------------------------------

api_pull = api_push = _todo

# -- OpenAI compatibility ----------------------------------------------------

#: OpenAI's error "type" for an HTTP status (openai.NewError).
OPENAI_ERROR_TYPES = {400: "invalid_request_error", 404: "not_found_error"}
#: data: URL prefixes an image part may use; the bare one matches /api/chat's unadorned base64.
IMAGE_URL_PREFIXES = ["data:;base64,"] + ["data:image/%s;base64," % t for t in ("jpeg", "jpg", "png", "webp")]


def _openai_error(status, message):
    """An OpenAI-shaped error answer: {"error": {"message", "type", "param": null, "code": null}}."""
    body = {"error": {"message": message, "type": OPENAI_ERROR_TYPES.get(status, "api_error"),
                      "param": None, "code": None}}
    return Response(status, json_dumps(body).encode(), "application/json; charset=utf-8")


def _openai(handler):
    """Wrap a /v1 handler so that every OllamaError it raises is answered in OpenAI's error shape."""
    def wrapped(req):
        try:
            return handler(req)
        except OllamaError as e:
            return _openai_error(e.status, str(e))
    wrapped.__name__, wrapped.__doc__ = handler.__name__, handler.__doc__
    return wrapped


def _forward(req, body):
    """The same request with `body` as its JSON: how a /v1 call reaches the /api handler it wraps."""
    sub = Request.__new__(Request)
    sub.__dict__.update(req.__dict__)
    sub._body = json_dumps(body).encode()
    return sub


def _go_type(value):
    """The name Go's encoding/json gives a decoded JSON value, for error texts."""
    if value is None:
        return "<nil>"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "float64"
    if isinstance(value, str):
        return "string"
    return "[]interface {}" if isinstance(value, list) else "map[string]interface {}"


def _json_kind(value):
    return {bool: "bool", str: "string", list: "array", dict: "object"}.get(type(value), "number")


def _expect(body, field, kind, go_type, struct="ChatCompletionRequest"):
    """Go's unmarshal error for a field of the wrong JSON type (null is always accepted)."""
    value = body.get(field)
    if value is not None and (not isinstance(value, kind) or isinstance(value, bool) and kind is not bool):
        raise BadRequest("json: cannot unmarshal %s into Go struct field %s.%s of type %s"
                         % (_json_kind(value), struct, field, go_type))
    return value


def _sse(obj):
    """One server-sent event: `data: <json>` and a blank line; the string "[DONE]" ends the stream."""
    data = obj.encode() if isinstance(obj, str) else json_dumps(obj).encode()
    return b"data: " + data + b"\n\n"


def _sse_stream(items):
    return Stream(items, content_type="text/event-stream", encode=_sse,
                  error_item=lambda msg: {"error": {"message": msg, "type": "api_error", "param": None,
                                                    "code": None}})


def _prime(result):
    """(first item, rest) of an /api handler's answer; errors before the first item raise here,
    so they still get a status code. A plain dict answer is a one-item stream."""
    if not isinstance(result, Stream):
        return result, iter(())
    try:
        return next(result.items), result.items
    except StopIteration:
        return None, result.items


def _stop_option(stop, strict):
    if isinstance(stop, str):
        return [stop]
    if isinstance(stop, list):
        bad = [s for s in stop if not isinstance(s, str)]
        if bad and strict:
            raise BadRequest("invalid type for 'stop' field: %s" % _go_type(bad[0]))
        return [s for s in stop if isinstance(s, str)]
    return None


def _openai_options(body, completions=False):
    """Ollama options from OpenAI sampling fields; temperature and top_p default to 1.0."""
    options = {}
    stop = _stop_option(body.get("stop"), strict=completions)
    if stop is not None:
        options["stop"] = stop
    if body.get("max_tokens") is not None:
        options["num_predict"] = _expect(body, "max_tokens", int, "int")
    temperature = body.get("temperature")
    options["temperature"] = 1.0 if temperature is None else temperature
    if body.get("seed") is not None:
        options["seed"] = _expect(body, "seed", int, "int")
    for key in ("frequency_penalty", "presence_penalty"):
        if body.get(key) is not None:
            options[key] = body[key]
        elif completions:
            options[key] = 0.0
    top_p = body.get("top_p")
    options["top_p"] = 1.0 if top_p is None or (completions and top_p == 0) else top_p
    return options


def _from_tool_calls(calls):
    """OpenAI tool calls (arguments as a JSON string) -> Ollama's (arguments as an object)."""
    out = []
    for call in calls or []:
        function = (call or {}).get("function") or {}
        try:
            arguments = json.loads(function.get("arguments") or "")
        except (TypeError, ValueError):
            raise BadRequest("invalid tool call arguments") from None
        out.append({"function": {"name": function.get("name", ""), "arguments": arguments}})
    return out


def _image_part(part):
    """The base64 payload of an image_url part; only data: URLs of jpeg/png/webp images are taken."""
    image = part.get("image_url")
    url = image.get("url") if isinstance(image, dict) else image
    if not isinstance(url, str):
        raise BadRequest("invalid message format")
    for prefix in IMAGE_URL_PREFIXES:
        if url.startswith(prefix):
            data = url[len(prefix):]
            try:
                base64.b64decode(data, validate=True)
            except ValueError:
                raise BadRequest("invalid message format") from None
            return data
    raise BadRequest("invalid image input")


def _from_chat_messages(messages):
    """OpenAI messages -> /api/chat messages (each content part becomes its own message, as in Ollama)."""
    out = []
    for msg in messages:
        if not isinstance(msg, dict):
            raise BadRequest("json: cannot unmarshal %s into Go struct field ChatCompletionRequest.messages "
                             "of type openai.Message" % _json_kind(msg))
        role, content = msg.get("role") or "", msg.get("content")
        tool_name = ""
        if role.lower() == "tool":
            tool_name = msg.get("name") or ""
            if not tool_name and msg.get("tool_call_id"):
                for earlier in reversed(messages):
                    for call in (earlier.get("tool_calls") or []) if isinstance(earlier, dict) else []:
                        if not tool_name and call.get("id") == msg["tool_call_id"]:
                            tool_name = (call.get("function") or {}).get("name", "")
        extra = {}
        if msg.get("reasoning"):
            extra["thinking"] = msg["reasoning"]
        if tool_name:
            extra["tool_name"] = tool_name
        if isinstance(content, str) or (content is None and msg.get("tool_calls") is not None):
            m = dict(extra, role=role, content=content or "")
            if msg.get("tool_calls"):
                m["tool_calls"] = _from_tool_calls(msg["tool_calls"])
            out.append(m)
        elif isinstance(content, list):
            first = len(out)
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    out.append({"role": role, "content": part["text"]})
                elif kind == "image_url":
                    out.append({"role": role, "content": "", "images": [_image_part(part)]})
                else:
                    raise BadRequest("invalid message format")
            if len(out) > first and msg.get("tool_calls"):
                out[-1].update(extra, tool_calls=_from_tool_calls(msg["tool_calls"]))
        else:
            raise BadRequest("invalid message content type: %s" % _go_type(content))
    return out


def _chat_format(response_format):
    """response_format -> /api/chat `format`: json_object is "json", json_schema its schema."""
    if not isinstance(response_format, dict):
        return None
    kind = str(response_format.get("type") or "").strip().lower()
    if kind == "json_object":
        return "json"
    if kind == "json_schema" and isinstance(response_format.get("json_schema"), dict):
        return response_format["json_schema"].get("schema")
    return None


def _reasoning_think(body):
    effort = (body.get("reasoning") or {}).get("effort") if isinstance(body.get("reasoning"), dict) else None
    effort = effort or body.get("reasoning_effort")
    if not effort:
        return None
    if effort not in ("high", "medium", "low", "none"):
        raise BadRequest("invalid reasoning value: '%s' (must be \"high\", \"medium\", \"low\", or \"none\")"
                         % effort)
    return False if effort == "none" else effort


def _openai_tool_calls(calls):
    """Ollama tool calls -> OpenAI's, `arguments` as a JSON string (openai.ToToolCalls)."""
    out = []
    for call in calls or []:
        function = call.get("function") or {}
        out.append({"id": call.get("id") or "call_" + secrets.token_hex(4), "index": function.get("index", 0),
                    "type": "function", "function": {"name": function.get("name", ""),
                                                     "arguments": json_dumps(function.get("arguments") or {})}})
    return out


def _usage(final):
    prompt, completion = final.get("prompt_eval_count", 0), final.get("eval_count", 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _chat_chunks(first, items, cid, created, model, include_usage):
    """/api/chat stream items -> chat.completion.chunk events, then usage (if asked) and [DONE].
    Role goes in the first delta only; the finish reason comes in its own chunk with an empty delta."""
    base = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "system_fingerprint": "fp_ollama"}
    role_sent = tool_sent = False
    try:
        item = first
        while item is not None:
            msg = item.get("message") or {}
            delta = {}
            if msg.get("content"):
                delta["content"] = msg["content"]
            if msg.get("thinking"):
                delta["reasoning"] = msg["thinking"]
            if msg.get("tool_calls"):
                delta["tool_calls"] = _openai_tool_calls(msg["tool_calls"])
                tool_sent = True
            if delta or not (role_sent or item.get("done")):
                if not role_sent:
                    delta = dict({"role": "assistant", "content": ""}, **delta)
                    role_sent = True
                yield dict(base, choices=[{"index": 0, "delta": delta, "finish_reason": None}])
            if item.get("done"):
                reason = "tool_calls" if tool_sent else item.get("done_reason") or "stop"
                yield dict(base, choices=[{"index": 0, "delta": {}, "finish_reason": reason}])
                if include_usage:
                    yield dict(base, choices=[], usage=_usage(item))
                yield "[DONE]"
                return
            item = next(items, None)
    finally:
        close = getattr(items, "close", None)
        if close:
            close()


@_openai
def v1_chat_completions(req):
    """POST /v1/chat/completions: OpenAI chat on top of /api/chat."""
    body = req.json()
    _expect(body, "model", str, "string")
    messages = _expect(body, "messages", list, "[]openai.Message")
    if not messages:
        raise BadRequest("[] is too short - 'messages'")
    chat = {"model": body.get("model"), "messages": _from_chat_messages(messages),
            "options": _openai_options(body), "stream": bool(body.get("stream"))}
    fmt = _chat_format(body.get("response_format"))
    if fmt is not None:
        chat["format"] = fmt
    if body.get("tools"):
        chat["tools"] = body["tools"]
    think = _reasoning_think(body)
    if think is not None:
        chat["think"] = think
    if body.get("_debug_render_only"):
        chat["_debug_render_only"] = True
    cid, created = "chatcmpl-%d" % secrets.randbelow(999), int(time.time())
    first, items = _prime(api_chat(_forward(req, chat)))
    if chat["stream"]:
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        return _sse_stream(_chat_chunks(first, items, cid, created, body.get("model"), include_usage))
    msg = first.get("message") or {"role": "assistant", "content": ""}
    message = {"role": msg.get("role", "assistant"), "content": msg.get("content", "")}
    if msg.get("thinking"):
        message["reasoning"] = msg["thinking"]
    calls = _openai_tool_calls(msg.get("tool_calls"))
    if calls:
        message["tool_calls"] = calls
    reason = "tool_calls" if calls else first.get("done_reason") or None
    out = {"id": cid, "object": "chat.completion", "created": created, "model": body.get("model"),
           "system_fingerprint": "fp_ollama",
           "choices": [{"index": 0, "message": message, "finish_reason": reason}], "usage": _usage(first)}
    if "_debug_info" in first:
        out["_debug_info"] = first["_debug_info"]
    return out


def _completion_chunks(first, items, cid, created, model, include_usage):
    """/api/generate stream items -> text_completion events, then usage (if asked) and [DONE]."""
    base = {"id": cid, "object": "text_completion", "created": created, "model": model,
            "system_fingerprint": "fp_ollama"}
    try:
        item = first
        while item is not None:
            choice = {"text": item.get("response", ""), "index": 0,
                      "finish_reason": item.get("done_reason") or None}
            chunk = dict(base, choices=[choice])
            if include_usage:
                chunk["usage"] = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
            yield chunk
            if item.get("done"):
                if include_usage:
                    yield dict(base, choices=[], usage=_usage(item))
                yield "[DONE]"
                return
            item = next(items, None)
    finally:
        close = getattr(items, "close", None)
        if close:
            close()


@_openai
def v1_completions(req):
    """POST /v1/completions: OpenAI text completion of a prompt (and suffix) on top of /api/generate."""
    body = req.json()
    struct_name = "CompletionRequest"
    _expect(body, "model", str, "string", struct_name)
    prompt = _expect(body, "prompt", str, "string", struct_name) or ""
    suffix = _expect(body, "suffix", str, "string", struct_name) or ""
    generate = {"model": body.get("model"), "prompt": prompt, "options": _openai_options(body, completions=True),
                "stream": bool(body.get("stream"))}
    if suffix:
        generate["suffix"] = suffix
    if body.get("_debug_render_only"):
        generate["_debug_render_only"] = True
    cid, created = "cmpl-%d" % secrets.randbelow(999), int(time.time())
    first, items = _prime(api_generate(_forward(req, generate)))
    if generate["stream"]:
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        return _sse_stream(_completion_chunks(first, items, cid, created, body.get("model"), include_usage))
    return {"id": cid, "object": "text_completion", "created": created, "model": body.get("model"),
            "system_fingerprint": "fp_ollama",
            "choices": [{"text": first.get("response", ""), "index": 0,
                         "finish_reason": first.get("done_reason") or None}],
            "usage": _usage(first)}


@_openai
def v1_embeddings(req):
    """POST /v1/embeddings: OpenAI embeddings (float or base64 little-endian float32) via /api/embed."""
    body = req.json()
    fmt = body.get("encoding_format") or ""
    if fmt and str(fmt).lower() not in ("float", "base64"):
        raise BadRequest("Invalid value for 'encoding_format' = %s. Supported values: ['float', 'base64']."
                         % fmt)
    value = body.get("input")
    if value == "":
        value = [""]
    if value is None or value == []:
        raise BadRequest("invalid input")
    embed = {"model": body.get("model"), "input": value}
    if body.get("dimensions"):
        embed["dimensions"] = body["dimensions"]
    result = api_embed(_forward(req, embed))
    data = []
    for i, vector in enumerate(result["embeddings"]):
        if str(fmt).lower() == "base64":
            vector = base64.b64encode(struct.pack("<%df" % len(vector), *vector)).decode()
        data.append({"object": "embedding", "embedding": vector, "index": i})
    count = result.get("prompt_eval_count", 0)
    return {"object": "list", "data": data, "model": body.get("model"),
            "usage": {"prompt_tokens": count, "total_tokens": count}}


@_openai
def v1_models(req):
    """GET /v1/models: every stored model, newest first."""
    models = sorted(req.server.store.list(), key=lambda m: -m[3])
    return {"object": "list", "data": [{"id": name.display(), "object": "model", "created": int(mtime),
                                        "owned_by": name.namespace} for name, _raw, _m, mtime in models]}


@_openai
def v1_model(req):
    """GET /v1/models/{model}: one stored model."""
    text = req.params["model"]
    name = Name.parse(text)
    stored = req.server.store.resolve(name)
    if stored is None:
        raise NotFound("model '%s' not found" % text)
    mtime = req.server.store.manifest_path(stored).stat().st_mtime
    return {"id": text, "object": "model", "created": int(mtime), "owned_by": name.namespace}


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
    ensure_keypair(config.home, out=sys.stdout)
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
