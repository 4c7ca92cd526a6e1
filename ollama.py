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
                      log_path=self.config.home / "logs" / ("runner-%s.log" % _safe_filename(model.short)))

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
_CORS_HEADERS = "Authorization, Content-Type, User-Agent, Accept, X-Requested-With, OpenAI-Beta, " \
                "x-stainless-arch, x-stainless-async, x-stainless-custom-poll-interval, " \
                "x-stainless-helper-method, x-stainless-lang, x-stainless-os, x-stainless-package-version, " \
                "x-stainless-poll-helper, x-stainless-retry-count, x-stainless-runtime, " \
                "x-stainless-runtime-version, x-stainless-timeout"


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


api_embed = api_embeddings = api_tokenize = api_detokenize = _todo

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

# Ollama's api.Options and Runner fields by type, for `/set parameter` (api.FormatParams).
_PARAM_INT = ("num_keep", "seed", "num_predict", "top_k", "repeat_last_n", "num_ctx", "num_batch", "num_gpu",
              "main_gpu", "num_thread")
_PARAM_FLOAT = ("temperature", "top_p", "min_p", "typical_p", "repeat_penalty", "presence_penalty",
                "frequency_penalty")
_PARAM_BOOL = ("use_mmap",)
_PARAM_LIST = ("stop",)
_THINK_LEVELS = ("high", "medium", "low", "max")
_HISTORY_LIMIT = 100                  # lines kept in ~/.ollama/history, as Ollama's readline keeps
_GREY, _BOLD, _RESET = "\x1b[38;5;245m", "\x1b[1m", "\x1b[0m"
_RFC3339_RE = re.compile(r"^(\d{4})-(\d\d)-(\d\d)[Tt ](\d\d):(\d\d):(\d\d)(\.\d+)?([Zz]|[+-]\d\d:\d\d)$")


def _format_param(key, values):
    """One `/set parameter` value typed as Ollama's api.FormatParams does; ValueError with its text."""
    if key in _PARAM_LIST:
        return list(values)
    text = values[0]
    try:
        if key in _PARAM_INT:
            return int(text, 10)
        if key in _PARAM_FLOAT:
            return float(text)
        if key in _PARAM_BOOL:
            return {"1": True, "t": True, "true": True, "0": False, "f": False, "false": False}[text.lower()]
    except (ValueError, KeyError):
        kind = "int" if key in _PARAM_INT else "float" if key in _PARAM_FLOAT else "bool"
        raise ValueError("invalid %s value [%s]" % (kind, " ".join(values))) from None
    raise ValueError("unknown parameter '%s'" % key)


def _parse_rfc3339(text):
    """Seconds since the epoch for an RFC 3339 time with any fraction and offset ("Z" too); None for
    Go's zero time or text that doesn't parse (fromisoformat takes neither "Z" nor nanoseconds on 3.9)."""
    m = _RFC3339_RE.match(text or "")
    if not m or m.group(1) == "0001":
        return None
    y, mo, d, h, mi, s = (int(m.group(i)) for i in range(1, 7))
    off = m.group(8)
    offset = 0 if off in ("Z", "z") else (1 if off[0] == "+" else -1) * (int(off[1:3]) * 3600 + int(off[4:6]) * 60)
    tz = datetime.timezone(datetime.timedelta(seconds=offset))
    when = datetime.datetime(y, mo, d, h, mi, s, tzinfo=tz).timestamp()
    return when + (float(m.group(7)) if m.group(7) else 0.0)


def _render_table(header, rows):
    """A table as Ollama prints it with tablewriter: left-aligned, no borders, every cell padded to
    its column's width and followed by four spaces."""
    table = [header] + rows
    widths = [max(_text_width(r[i]) for r in table) for i in range(len(header))]
    return "".join("".join(c + " " * (w - _text_width(c)) + "    " for c, w in zip(r, widths)) + "\n"
                   for r in table)


def _char_width(ch):
    """Terminal columns of one character (go-runewidth's rule of thumb): 0 combining, 2 wide."""
    import unicodedata
    if unicodedata.combining(ch) or ch in "\u200b\u200d":
        return 0
    return 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1


def _text_width(text):
    return sum(_char_width(c) for c in text)


def _term_width(stream):
    """Columns of the terminal behind `stream`, or 0 when it isn't one."""
    try:
        return os.get_terminal_size(stream.fileno()).columns if stream.isatty() else 0
    except (OSError, ValueError, AttributeError):
        return 0


class _Display:
    """Streamed text to stdout, flushed per piece; word-wrapped like Ollama's displayResponse when
    `width` (terminal columns) is at least 10: a word that would cross width-5 moves to a new line."""

    def __init__(self, width=0, out=None):
        self.out = out or sys.stdout
        self.width = width
        self.line = 0         # columns used on the current line
        self.word = ""        # the word being written, moved down whole when the line overflows

    def write(self, text):
        w = self.width
        if w < 10:
            self.out.write(text)
            self.out.flush()
            return
        parts = []
        for ch in text:
            cw = _char_width(ch)
            if ch in "\n\r":
                parts.append(ch)
                self.line, self.word = 0, ""
            elif self.line + cw > w - 5:
                if ch in " \t":
                    parts.append("\n")
                    self.line, self.word = 0, ""
                elif 0 < _text_width(self.word) <= w - 10:
                    # back over the partial word, clear to the end of the line, rewrite it below
                    parts.append("\x1b[%dD\x1b[K\n%s%s" % (_text_width(self.word), self.word, ch))
                    self.word += ch
                    self.line = _text_width(self.word)
                else:
                    parts.append("\n" + ch)
                    self.line, self.word = cw, ("" if cw >= 2 else ch)
            else:
                parts.append(ch)
                self.line += cw
                self.word = "" if (ch in " \t" or cw >= 2) else self.word + ch
        self.out.write("".join(parts))
        self.out.flush()


def _print_metrics(final, out=None):
    """Ollama's Metrics.Summary: the timing block --verbose prints (lines with values > 0 only)."""
    out = out or sys.stderr
    ns = lambda k: int(final.get(k) or 0)  # noqa: E731
    lines = []
    if ns("total_duration") > 0:
        lines.append("total duration:       %s" % format_duration(ns("total_duration") / 1e9))
    if ns("load_duration") > 0:
        lines.append("load duration:        %s" % format_duration(ns("load_duration") / 1e9))
    if ns("prompt_eval_count") > 0:
        lines.append("prompt eval count:    %d token(s)" % ns("prompt_eval_count"))
    if ns("prompt_eval_duration") > 0:
        lines.append("prompt eval duration: %s" % format_duration(ns("prompt_eval_duration") / 1e9))
        lines.append("prompt eval rate:     %.2f tokens/s"
                     % (ns("prompt_eval_count") / (ns("prompt_eval_duration") / 1e9)))
    if ns("eval_count") > 0:
        lines.append("eval count:           %d token(s)" % ns("eval_count"))
    if ns("eval_duration") > 0:
        lines.append("eval duration:        %s" % format_duration(ns("eval_duration") / 1e9))
        lines.append("eval rate:            %.2f tokens/s" % (ns("eval_count") / (ns("eval_duration") / 1e9)))
    if lines:
        out.write("\n".join(lines) + "\n")
        out.flush()


class _RunOptions:
    """One `run` session (Ollama's runOptions): the model, its settings and the conversation so far."""

    def __init__(self, model):
        self.model = model
        self.parent_model = ""
        self.capabilities = []
        self.messages = []            # the chat so far, sent whole with every /api/chat
        self.system = ""
        self.options = {}             # /set parameter values, sent as "options"
        self.format = ""
        self.keep_alive = None        # Go duration string, or -1 for forever
        self.think = None             # None (server default), True/False or a level
        self.think_explicit = False
        self.hide_thinking = False
        self.verbose = False
        self.wordwrap = True

    def display(self):
        return _Display(_term_width(sys.stdout) if self.wordwrap else 0)

    def request(self, **fields):
        """A generate/chat body with this session's format, options, think and keep_alive set."""
        body = {"model": self.model}
        body.update(fields)
        if self.format:
            body["format"] = _format_value(self.format)
        if self.options:
            body["options"] = dict(self.options)
        if self.think is not None:
            body["think"] = self.think
        if self.keep_alive is not None:
            body["keep_alive"] = self.keep_alive
        return body


def _format_value(fmt):
    """--format as sent: "json", or a JSON schema given as JSON text."""
    if fmt == "json":
        return "json"
    try:
        return json.loads(fmt)
    except ValueError:
        return fmt


def _think_option(value):
    """--think's value (a bare flag means true): True, False or a level; OllamaError otherwise."""
    if value in ("", "true"):
        return True
    if value == "false":
        return False
    if value in _THINK_LEVELS:
        return value
    raise OllamaError('invalid value for --think: "%s" (must be true, false, high, medium, low, or max)' % value)


def _keep_alive_option(text):
    """--keepalive parsed as Go's time.ParseDuration, sent as Ollama's client sends an api.Duration."""
    seconds = parse_keep_alive(text, None)
    return -1 if seconds == FOREVER else format_duration(seconds)


def _pull_with_progress(client, name, insecure=False):
    """Pull a model over /api/pull, showing its progress on stderr: a bar per layer on a terminal,
    one line per status otherwise."""
    tty = sys.stderr.isatty()
    status, bar_open = None, False
    for msg in client.stream("POST", "/api/pull", {"model": name, "insecure": insecure}):
        digest, total = msg.get("digest"), int(msg.get("total") or 0)
        if digest and total:
            done = int(msg.get("completed") or 0)
            if not done:
                continue                     # Ollama skips the first report of each layer
            label = "pulling %s" % digest.replace("sha256:", "")[:12]
            pct = done * 100 // total
            if tty:
                fill = pct * 25 // 100
                sys.stderr.write("\r%s: %3d%% ▕%s%s▏ %s/%s\x1b[K" % (
                    label, pct, "█" * fill, " " * (25 - fill), human_bytes(done), human_bytes(total)))
                bar_open = True
            elif status != label and done >= total:
                sys.stderr.write("%s: 100%% %s\n" % (label, human_bytes(total)))
                status = label
            continue
        text = msg.get("status", "")
        if text and text != status:
            if bar_open:
                sys.stderr.write("\n")
                bar_open = False
            sys.stderr.write(text + "\n")
            status = text
        sys.stderr.flush()
    if bar_open:
        sys.stderr.write("\n")


def _show_or_pull(client, name, insecure=False):
    """/api/show for the model, pulling it first when the server doesn't have it (404)."""
    try:
        return client.call("POST", "/api/show", {"model": name})
    except OllamaError as e:
        if e.status != 404:
            raise
    _pull_with_progress(client, name, insecure)
    return client.call("POST", "/api/show", {"model": name})


def _apply_show(opts, info):
    opts.parent_model = ((info or {}).get("details") or {}).get("parent_model") or ""
    opts.capabilities = (info or {}).get("capabilities") or []
    if not opts.think_explicit and "thinking" in opts.capabilities:
        opts.think = True


def _load_model(client, opts):
    """Load (or with keep_alive 0, unload) the model: an /api/generate without a prompt."""
    body = {"model": opts.model}
    if opts.keep_alive is not None:
        body["keep_alive"] = opts.keep_alive
    if opts.think is not None:
        body["think"] = opts.think                # unsupported thinking fails here, before any chat
    for _ in client.stream("POST", "/api/generate", body):
        pass


def cmd_run(args):
    """Run a model."""
    client = _client(args)
    client.heartbeat()
    opts = _RunOptions(args.model)
    opts.format = args.format or ""
    opts.verbose = args.verbose
    opts.hide_thinking = args.hidethinking
    opts.wordwrap = not args.nowordwrap
    prompts = list(args.prompt)
    if args.think is not None:
        try:
            opts.think = _think_option(args.think)
        except OllamaError:
            # argparse read `--think WORD` as the flag's value; Ollama would take WORD as the prompt
            opts.think = True
            prompts.insert(0, args.think)
        opts.think_explicit = True
    if args.keepalive:
        opts.keep_alive = _keep_alive_option(args.keepalive)
    interactive = True
    if not sys.stdin.isatty():
        data = sys.stdin.read()
        if data:
            prompts.insert(0, data)
        interactive = False
    prompt = " ".join(prompts)
    if prompts or not sys.stdout.isatty():
        interactive = False

    info = _show_or_pull(client, opts.model, args.insecure)
    _apply_show(opts, info)
    if "embedding" in opts.capabilities:
        return _embed(client, opts, prompt, args)
    if not interactive:
        return _generate(client, opts, prompt)
    _load_model(client, opts)
    for msg in (info or {}).get("messages") or []:
        if msg.get("role") == "user":
            print(">>> %s" % msg.get("content", ""))
        elif msg.get("role") == "assistant":
            opts.display().write(msg.get("content", ""))
            print("\n")
    return _Repl(client, opts).loop()


def _embed(client, opts, prompt, args):
    if not prompt:
        raise OllamaError('embedding models require input text. Usage: ollama.py run %s "your text here"'
                          % opts.model)
    body = {"model": opts.model, "input": prompt}
    if opts.keep_alive is not None:
        body["keep_alive"] = opts.keep_alive
    if args.truncate:
        body["truncate"] = True
    if args.dimensions:
        body["dimensions"] = args.dimensions
    resp = client.call("POST", "/api/embed", body) or {}
    if not resp.get("embeddings"):
        raise OllamaError("no embeddings returned")
    print(json_dumps(resp["embeddings"][0]))
    return 0


class _Streamer:
    """Print one streamed answer: thinking (framed, dimmed on a terminal) then content."""

    def __init__(self, opts):
        self.opts = opts
        self.display = opts.display()
        self.plain = not sys.stdout.isatty()
        self.thinking = None          # the thinking text while its block is open
        self.content = []

    def feed(self, thinking, content):
        if thinking and not self.opts.hide_thinking:
            if self.thinking is None:
                self.thinking = ""
                sys.stdout.write("Thinking...\n" if self.plain else _GREY + _BOLD + "Thinking...\n" + _RESET + _GREY)
            self.thinking += thinking
            self.display.write(thinking)
        if content and self.thinking is not None:
            if not self.thinking.endswith("\n"):
                sys.stdout.write("\n")
            sys.stdout.write("...done thinking.\n\n" if self.plain
                             else _GREY + _BOLD + "...done thinking.\n\n" + _RESET)
            self.thinking = None
            self.display = self.opts.display()
        if content:
            self.content.append(content)
            self.display.write(content)


def _generate(client, opts, prompt):
    """One /api/generate, streamed to stdout; Ctrl+C stops it quietly."""
    body = opts.request(prompt=prompt)
    if opts.system:
        body["system"] = opts.system
    out, final = _Streamer(opts), None
    try:
        for chunk in client.stream("POST", "/api/generate", body):
            out.feed(chunk.get("thinking"), chunk.get("response"))
            if chunk.get("done"):
                final = chunk
    except KeyboardInterrupt:
        sys.stdout.write("\n")
        return 0
    if prompt:
        sys.stdout.write("\n\n")
    sys.stdout.flush()
    if final is not None and opts.verbose:
        _print_metrics(final)
    return 0


def _chat(client, opts):
    """One /api/chat turn with the whole conversation, streamed; the assistant message, or None
    when Ctrl+C stopped it (the connection is closed, so the server stops generating)."""
    out, final, role = _Streamer(opts), None, "assistant"
    try:
        for chunk in client.stream("POST", "/api/chat", opts.request(messages=list(opts.messages))):
            msg = chunk.get("message") or {}
            role = msg.get("role") or role
            out.feed(msg.get("thinking"), msg.get("content"))
            if chunk.get("done"):
                final = chunk
    except KeyboardInterrupt:
        sys.stdout.write("\n")
        sys.stdout.flush()
        return None
    if opts.messages:
        sys.stdout.write("\n\n")
        sys.stdout.flush()
    if final is not None and opts.verbose:
        _print_metrics(final)
    return {"role": role, "content": "".join(out.content)}


class _LineReader:
    """The REPL's input: GNU readline when importable (line editing, up-arrow history), plain
    input() otherwise; accepted lines go to ~/.ollama/history unless history is off."""

    def __init__(self, path, enabled=True):
        self.path, self.enabled = Path(path), enabled
        try:
            import readline
        except ImportError:
            readline = None
        self.rl = readline
        self.lines = []
        try:
            for line in self.path.read_text(errors="replace").splitlines():
                if line.strip():
                    self.lines.append(line.strip())
        except OSError:
            pass
        self.lines = self.lines[-_HISTORY_LIMIT:]
        if self.rl is not None:
            if hasattr(self.rl, "set_auto_history"):
                self.rl.set_auto_history(False)
            for line in self.lines:
                self.rl.add_history(line)

    def read(self, prompt):
        """One line; EOFError on Ctrl+D, KeyboardInterrupt on Ctrl+C."""
        return input(prompt)

    def pending(self):
        """What was typed on the line when Ctrl+C came ("" when unknown)."""
        return self.rl.get_line_buffer() if self.rl is not None else ""

    def add(self, line):
        """Remember an accepted line (not twice in a row), saved at once as Ollama's history does."""
        if not self.enabled or not line.strip() or (self.lines and self.lines[-1] == line):
            return
        self.lines = (self.lines + [line])[-_HISTORY_LIMIT:]
        if self.rl is not None:
            self.rl.add_history(line)
        try:
            atomic_write(self.path, ("\n".join(self.lines) + "\n").encode(), mode=0o600)
        except OSError as e:
            log.debug("cannot save history: %s", e)


_USAGE = """Available Commands:
  /set            Set session variables
  /show           Show model information
  /load <model>   Load a session or model
  /save <model>   Save your current session
  /clear          Clear session context
  /bye            Exit
  /?, /help       Help for a command
  /? shortcuts    Help for keyboard shortcuts

Use \"\"\" to begin a multi-line message.

"""
_USAGE_SET = """Available Commands:
  /set parameter ...     Set a parameter
  /set system <string>   Set system message
  /set history           Enable history
  /set nohistory         Disable history
  /set wordwrap          Enable wordwrap
  /set nowordwrap        Disable wordwrap
  /set format json       Enable JSON mode
  /set noformat          Disable formatting
  /set verbose           Show LLM stats
  /set quiet             Disable LLM stats
  /set think             Enable thinking
  /set nothink           Disable thinking

"""
_USAGE_SHORTCUTS = """Available keyboard shortcuts:
  Ctrl + a            Move to the beginning of the line (Home)
  Ctrl + e            Move to the end of the line (End)
   Alt + b            Move back (left) one word
   Alt + f            Move forward (right) one word
  Ctrl + k            Delete the sentence after the cursor
  Ctrl + u            Delete the sentence before the cursor
  Ctrl + w            Delete the word before the cursor

  Ctrl + l            Clear the screen
  Ctrl + c            Stop the model from responding
  Ctrl + d            Exit ollama (/bye)

"""
_USAGE_SHOW = """Available Commands:
  /show info         Show details for this model
  /show license      Show model license
  /show modelfile    Show Modelfile for this model
  /show parameters   Show parameters for this model
  /show system       Show system message
  /show template     Show prompt template

"""
_USAGE_PARAMETERS = """Available Parameters:
  /set parameter seed <int>             Random number seed
  /set parameter num_predict <int>      Max number of tokens to predict
  /set parameter top_k <int>            Pick from top k num of tokens
  /set parameter top_p <float>          Pick token based on sum of probabilities
  /set parameter min_p <float>          Pick token based on top token probability * min_p
  /set parameter num_ctx <int>          Set the context size
  /set parameter temperature <float>    Set creativity level
  /set parameter repeat_penalty <float> How strongly to penalize repetitions
  /set parameter repeat_last_n <int>    Set how far back to look for repetitions
  /set parameter num_gpu <int>          The number of layers to send to the GPU
  /set parameter stop <string> <string> ...   Set the stop parameters

"""


class _Repl:
    """Ollama's interactive prompt (cmd/interactive.go): chat turns plus the /commands."""

    def __init__(self, client, opts):
        self.client, self.opts = client, opts
        config = Config()
        self.reader = _LineReader(config.home / "history", enabled=not config.nohistory)
        self.buf = []                 # the message being typed (multi-line input)
        self.multiline = None         # None, "prompt" or "system" while inside \"\"\"

    def loop(self):
        """Read and act until /bye, /exit or Ctrl+D; returns the exit status."""
        while True:
            try:
                line = self.reader.read("... " if self.multiline or self.buf else ">>> ")
            except EOFError:
                print()
                return 0
            except KeyboardInterrupt:
                if not self.reader.pending() and not self.buf:
                    print("\nUse Ctrl + d or /bye to exit.")
                else:
                    print()
                self.buf, self.multiline = [], None
                continue
            self.reader.add(line)
            if self.handle(line) == "exit":
                return 0

    def handle(self, line):
        """Act on one input line; "exit" ends the REPL."""
        if self.multiline:
            ended = line.endswith('"""')
            self.buf.append(line[:-3] if ended else line + "\n")
            if not ended:
                return None
            kind, self.multiline = self.multiline, None
            if kind == "system":
                self.opts.system = "".join(self.buf)
                self.opts.messages.append({"role": "system", "content": self.opts.system})
                print("Set system message.")
                self.buf = []
        elif line.startswith('"""'):
            rest = line[3:]
            if rest.endswith('"""'):
                self.buf.append(rest[:-3])
            else:
                self.buf.append(rest + "\n")
                self.multiline = "prompt"
        elif line.startswith("/"):
            return self.command(line)
        else:
            self.buf.append(line)
        if self.buf and not self.multiline:
            text, self.buf = "".join(self.buf), []
            self.send(text)
        return None

    def send(self, text):
        opts = self.opts
        opts.messages.append({"role": "user", "content": text})
        try:
            reply = _chat(self.client, opts)
        except OllamaError as e:
            if "does not support thinking" in str(e) or "invalid think value" in str(e):
                print("error: %s" % e)
                return
            raise
        if reply is not None:
            opts.messages.append(reply)

    def command(self, line):
        """A /command; "exit" for /bye and /exit."""
        args = line.split()
        word = args[0]
        for name, func in (("/list", self.cmd_list), ("/load", self.cmd_load), ("/save", self.cmd_save),
                           ("/clear", self.cmd_clear), ("/set", self.cmd_set), ("/show", self.cmd_show),
                           ("/help", self.cmd_help), ("/?", self.cmd_help)):
            if line.startswith(name):
                func(args)
                return None
        if line.startswith("/exit") or line.startswith("/bye"):
            return "exit"
        print("Unknown command '%s'. Type /? for help" % word)
        return None

    def cmd_help(self, args):
        topic = args[1] if len(args) > 1 else None
        text = {None: _USAGE, "set": _USAGE_SET, "/set": _USAGE_SET, "show": _USAGE_SHOW, "/show": _USAGE_SHOW,
                "shortcut": _USAGE_SHORTCUTS, "shortcuts": _USAGE_SHORTCUTS}.get(topic, "")
        sys.stderr.write(text)
        sys.stderr.flush()

    def cmd_list(self, args):
        try:
            cmd_list(argparse.Namespace(command="list", prefix=args[1] if len(args) > 1 else ""))
        except OllamaError as e:
            print("Error: %s" % e)

    def cmd_load(self, args):
        if len(args) != 2:
            print("Usage:\n  /load <modelname>")
            return
        opts = self.opts
        saved = (opts.model, opts.messages, opts.parent_model, opts.capabilities, opts.think)
        opts.model, opts.messages = args[1], []
        print("Loading model '%s'" % opts.model)
        try:
            _apply_show(opts, self.client.call("POST", "/api/show", {"model": opts.model}))
            _load_model(self.client, opts)
        except OllamaError as e:
            opts.model, opts.messages, opts.parent_model, opts.capabilities, opts.think = saved
            if "not found" in str(e):
                print("Couldn't find model '%s'" % args[1])
            else:
                print("error: %s" % e)

    def cmd_save(self, args):
        if len(args) != 2:
            print("Usage:\n  /save <modelname>")
            return
        opts = self.opts
        parent = Name.parse_bare(opts.parent_model) if opts.parent_model else None
        body = {"model": args[1], "from": opts.parent_model if parent and parent.is_valid() else opts.model}
        if opts.system:
            body["system"] = opts.system
        if opts.options:
            body["parameters"] = dict(opts.options)
        if opts.messages:
            body["messages"] = list(opts.messages)
        try:
            for _ in self.client.stream("POST", "/api/create", body):
                pass
        except OllamaError as e:
            if "invalid model name" in str(e):
                print("error: The model name '%s' is invalid" % args[1])
            else:
                print("Error: %s" % e)
            return
        print("Created new model '%s'" % args[1])

    def cmd_clear(self, args):
        self.opts.messages = []
        if self.opts.system:
            self.opts.messages.append({"role": "system", "content": self.opts.system})
        print("Cleared session context")

    def cmd_set(self, args):
        opts = self.opts
        if len(args) < 2:
            sys.stderr.write(_USAGE_SET)
            return
        what = args[1]
        if what == "history":
            self.reader.enabled = True
        elif what == "nohistory":
            self.reader.enabled = False
        elif what in ("wordwrap", "nowordwrap"):
            opts.wordwrap = what == "wordwrap"
            print("Set '%s' mode." % what)
        elif what in ("verbose", "quiet"):
            opts.verbose = what == "verbose"
            print("Set '%s' mode." % what)
        elif what == "think":
            opts.think, opts.think_explicit = (args[2] if len(args) > 2 else True), True
            print("Set 'think' mode to '%s'." % args[2] if len(args) > 2 else "Set 'think' mode.")
        elif what == "nothink":
            opts.think, opts.think_explicit = False, True
            print("Set 'nothink' mode.")
        elif what == "format":
            if len(args) < 3 or args[2] != "json":
                print("Invalid or missing format. For 'json' mode use '/set format json'")
            else:
                opts.format = args[2]
                print("Set format to '%s' mode." % args[2])
        elif what == "noformat":
            opts.format = ""
            print("Disabled format.")
        elif what == "parameter":
            if len(args) < 4:
                sys.stderr.write(_USAGE_PARAMETERS)
                return
            try:
                value = _format_param(args[2], args[3:])
            except ValueError as e:
                print("Couldn't set parameter: %s" % json.dumps(str(e)))
                return
            print("Set parameter '%s' to '%s'" % (args[2], ", ".join(args[3:])))
            opts.options[args[2]] = value
        elif what == "system":
            if len(args) < 3:
                sys.stderr.write(_USAGE_SET)
                return
            text = " ".join(args[2:])
            if text.startswith('"""'):
                text = text[3:]
                if not text.endswith('"""'):
                    self.multiline = "system"
                    self.buf = [text + "\n"] if text else []
                    return
                text = text[:-3]
            opts.system = text
            msg = {"role": "system", "content": text}
            if opts.messages and opts.messages[-1].get("role") == "system":
                opts.messages[-1] = msg
            else:
                opts.messages.append(msg)
            print("Set system message.")
        else:
            print("Unknown command '/set %s'. Type /? for help" % what)

    def cmd_show(self, args):
        opts = self.opts
        if len(args) < 2:
            sys.stderr.write(_USAGE_SHOW)
            return
        body = {"model": opts.model}
        if opts.system:
            body["system"] = opts.system
        if opts.options:
            body["options"] = dict(opts.options)
        try:
            resp = self.client.call("POST", "/api/show", body) or {}
        except OllamaError:
            print("error: couldn't get model")
            raise
        what = args[1]
        if what == "info":
            _repl_show_info(resp, sys.stderr)
        elif what == "license":
            print(resp.get("license") or "No license was specified for this model.")
        elif what == "modelfile":
            print(resp.get("modelfile", ""))
        elif what == "parameters":
            print("Model defined parameters:")
            if not resp.get("parameters"):
                print("  No additional parameters were specified for this model.")
            else:
                for line in resp["parameters"].split("\n"):
                    print("  %s" % line)
            print()
            if opts.options:
                print("User defined parameters:")
                for k, v in opts.options.items():
                    print("  %-30s %s" % (k, _go_value(v)))
                print()
        elif what == "system":
            text = opts.system or resp.get("system")
            print(text + "\n" if text else "No system message was specified for this model.")
        elif what == "template":
            print(resp.get("template") or "No prompt template was specified for this model.")
        else:
            print("Unknown command '/show %s'. Type /? for help" % what)


def _go_value(v):
    """A value as Go's %v prints it: [a b] for lists, true/false for booleans."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, list):
        return "[%s]" % " ".join(_go_value(x) for x in v)
    return str(v)


def _repl_show_info(resp, out):
    """A short `/show info`: the model's architecture, size, quantization and capabilities.
    (The full `ollama show` table lives with cmd_show.)"""
    details = resp.get("details") or {}
    info = resp.get("model_info") or {}
    arch = info.get("general.architecture") or details.get("family") or ""
    rows = [["", "architecture", arch],
            ["", "parameters", details.get("parameter_size", "")]]
    for key, label in (("context_length", "context length"), ("embedding_length", "embedding length")):
        if "%s.%s" % (arch, key) in info:
            rows.append(["", label, str(info["%s.%s" % (arch, key)])])
    rows.append(["", "quantization", details.get("quantization_level", "")])
    out.write("  Model\n" + _render_table(rows[0], rows[1:]) + "\n")
    if resp.get("capabilities"):
        out.write("  Capabilities\n" + _render_table([""] + resp["capabilities"][:1],
                                                     [["", c] for c in resp["capabilities"][1:]]) + "\n")
    out.flush()


def cmd_ps(args):
    """List running models."""
    client = _client(args)
    client.heartbeat()
    resp = client.call("GET", "/api/ps") or {}
    rows = []
    now = time.time()
    for m in resp.get("models") or []:
        size, vram = int(m.get("size") or 0), int(m.get("size_vram") or 0)
        if vram == 0:
            proc = "100% CPU"
        elif vram == size:
            proc = "100% GPU"
        elif vram > size or size == 0:
            proc = "Unknown"
        else:
            cpu = int(round((size - vram) / size * 100))
            proc = "%d%%/%d%% CPU/GPU" % (cpu, 100 - cpu)
        expires = _parse_rfc3339(m.get("expires_at"))
        if expires is None:
            until = "Never"
        elif expires < now:
            until = "Stopping..."
        else:
            until = human_time(expires, now)
        rows.append([m.get("name", ""), (m.get("digest") or "")[:12], human_bytes(size), proc,
                     str(m.get("context_length") or 0), until])
    sys.stdout.write(_render_table(["NAME", "ID", "SIZE", "PROCESSOR", "CONTEXT", "UNTIL"], rows))
    return 0


def cmd_stop(args):
    """Stop a running model."""
    client = _client(args)
    client.heartbeat()
    missing = OllamaError('couldn\'t find model "%s" to stop' % args.model)
    try:
        name = Name.parse(args.model)
    except BadRequest:
        raise missing from None
    running = (client.call("GET", "/api/ps") or {}).get("models") or []
    if not any(Name.parse_bare(m.get("name") or m.get("model")) == name for m in running):
        raise missing
    try:
        for _ in client.stream("POST", "/api/generate", {"model": args.model, "keep_alive": 0}):
            pass
    except OllamaError as e:
        if "not found" in str(e):
            raise missing from None
        raise
    return 0

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
