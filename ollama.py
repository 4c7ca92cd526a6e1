#!/usr/bin/env python3
"""ollama.py: Ollama in one file.

Run large language models locally with Ollama's commands, HTTP API and model
store, on top of llama.cpp's own ``llama-server`` (built by build_llama.sh).
Standard library only, Python 3.9 or newer. MIT licensed.

    ollama.py serve                   start the server (OLLAMA_HOST, default 127.0.0.1:11434, or unix:PATH)
    ollama.py create NAME -f Modelfile
    ollama.py run NAME [PROMPT]       chat, or answer one prompt
    ollama.py pull|push|list|ps|show|cp|rm|stop|export|import ...
    ollama.py launch claude|codex|opencode [--model NAME] [-- ARGS]   a coding agent on a model here

The map
-------
Sections run in dependency order: each uses only those above it (Config's keep_alive default,
its OllamaError for a unix: OLLAMA_HOST without a path, and the Utilities' Go durations are the
exceptions). Each has a three-line ``#`` banner; the big ones are cut into parts by ``# ==`` lines,
and parts into pieces by ``# --`` lines.

    Config         defaults (one per line, with units); Config: the OLLAMA_* environment, read once
    Errors         OllamaError and its subclasses, each with the HTTP `status` it is answered with
    Utilities      Go durations, human sizes and times, RFC 3339 (written and parsed), files (atomic
                   writes, locks, the umask), loopback hosts, text tables as the CLI prints them;
                   _Wire: one raw HTTP/1.1 exchange (the token relay, runner calls, the CLI's Client);
                   Metrics: the counters /metrics serves
    Names          Name: host/namespace/model:tag as Ollama parses, displays and compares them
    Store          Store: ~/.ollama/models (blobs/sha256-*, manifests/...), its lock, atomic writes;
                   file_digest; a local file imported as a blob without a copy (_import_local_blob)
    GGUF           GGUF headers (architecture, context, chat template, vocabulary); tiny writers;
                   == Ollama's converter layout (GGUFEdits per family: what the engine reads differently)
    Go formatting  Go's %v, strconv quoting and json.Marshal: texts and blobs byte for byte Ollama's
    Modelfile      parse_modelfile, PARAMETER types and ranges, the /api/create body it becomes
    Templates      == Go's text/template engine, == Ollama's templates (values, vars, a chat
                   rendered), == output parsers (tool calls, thinking)
    Models         Model: a stored model as its layers describe it (load_model); its capabilities,
                   whether it embeds; images (WebP made PNG); == create: a model's layers, config and
                   manifest written as Ollama's create writes them (create_model)
    Registry       == keys (Ed25519, OpenSSH files, signed requests), == client (OCI pull and
                   push: RegistrySession, Transfers, pull_model, push_model), == archives (export and
                   import as OCI image layout tarballs)
    Runner         Runner: one llama-server child (argv, start, health, completion, tokenize,
                   embeddings, slot save/restore); engine_files and draft_args: the files and flags a model runs with
                   (views of Ollama-layout GGUFs, a DRAFT); Spawner: the thread that forks children
                   tied to serve; == engine tools (RPC workers, llama-quantize)
    Scheduler      Scheduler: the loaded runners, leases on them, queueing (streamed requests first),
                   eviction, keep-alive; PromptCache: runners' long prompts saved at unload, restored
    HTTP server    OllamaServer (listeners, keys, TLS, connection caps, who a local peer is),
                   OllamaHandler (CORS and Host guards, body limits), Routes, Request, Response,
                   Stream, FileResponse
    HTTP API       == Ollama's API (/api/*, an api_* each), == a read-only OCI
                   registry of the store (/v2/*, a v2_* each), == OpenAI compatibility (/v1/*, with
                   the Responses API), == Anthropic compatibility (/v1/messages)
    CLI            == the client, and @command (Client), == commands (a cmd_* each), == the REPL
    Main           main(argv): parse, run the command; an OllamaError is "Error: ..." and exit 1

The request path of a chat: ``OllamaServer`` (a ThreadingHTTPServer; one thread per connection)
-> ``OllamaHandler._route`` (CORS and Host guards, then ``Routes.match``) -> ``api_chat(req)``
(check_fields, ``_find_model`` -> ``load_model``) -> ``Scheduler.lease()`` in a ``with`` block
(loads a ``Runner`` if needed: llama-server on a free loopback port) -> ``Runner.completion()``
(llama-server's streamed /completion) -> ``_api_chat_chunks`` (tool-call and thinking parsers) ->
a ``Stream`` that ``OllamaHandler._send_stream`` writes as chunked NDJSON; the lease is handed to
the stream (``lease.stream()``) and released when it ends, which starts the keep-alive timer.
A model whose GGUF's Jinja template renders chat (``Model.jinja_template``: no TEMPLATE, or a
RENDERER) takes ``_jinja_chat_chunks`` instead: llama-server's /v1/chat/completions renders the
chat and parses tool calls and thinking itself; images are checked (WebP made PNG) by ``image_data``.
The /v1 handlers (OpenAI chat, completions and Responses; Anthropic Messages) call the /api
ones through ``_forward`` and translate the answer; the CLI talks to serve over HTTP only.

Where state lives: the server's is on the ``OllamaServer`` (config, store, scheduler, transfers,
metrics, routes, open connections and request slots); the models are on disk in the ``Store``; the
loaded runners in the ``Scheduler``; downloads in flight in ``Transfers``; the blobs /v2 has hashed in
the server's ``served_blobs``. At module level there are only constants, the logger and the two tables the
decorators fill at import: ``ROUTES`` and ``COMMANDS``.

Finding things, for example: a pull that resumes a blob is Registry == client (``pull_model`` ->
``Transfers`` -> ``_BlobDownload``, whose ``-partial`` file and ranged requests pick up where a
killed pull stopped); /v1/messages is HTTP API == Anthropic compatibility (``v1_messages``, which
forwards to ``api_chat``); a runner killed by SIGILL (an engine built for another CPU) is explained
by Runner's ``RUNNER_SIGNALS`` and ``runner_exit_error``; /v2 serving a blob is HTTP API == a
read-only OCI registry (``v2_get`` -> ``_oci_blob``, a ``FileResponse`` of the stored file);
thinking is parsed by Templates == output parsers (``ThinkingParser``, fed by ``_api_chat_chunks``
through a ``Turn``).

To add an endpoint: write ``@route("POST", "/api/thing")`` over ``def api_thing(req):`` in its
part of HTTP API; read the body with ``req.json()`` and ``check_fields`` (Go's exact unmarshal
errors), raise an ``OllamaError`` subclass for an error, and return a dict (JSON), a ``Stream``
or a ``Response``. Runners only through ``with _schedule(...) as lease:``. Test it through the
``server`` fixture (tests/test_api.py). To add a command: write ``@command("thing",
argument("model"), ...)`` over ``def cmd_thing(args):`` (its docstring's first line is its help,
the rest its description), talk to the server through ``_client()``, return the exit status,
and add it to README.md's table of commands (tests/test_docs.py checks it is there).
"""

__version__ = "0.1.0"
__license__ = "MIT"
__all__ = [
    "Config", "OllamaError", "Name", "Store", "Client", "OllamaServer", "make_server", "main",
]

# Only what a CLI command needs at every start is imported here (bin/ollama's start-up is a target in
# bench/). The rest is imported in the functions that use it: http.server, http.client, urllib.request
# and ssl (with the email parser: ~20 ms), hashlib and hmac (OpenSSL), secrets, subprocess, shutil,
# tempfile, ctypes, tarfile, queue.
import argparse
import base64
import contextlib
import datetime
import errno
import itertools
import json
import logging
import math
import os
import re
import signal
import socket
import stat
import struct
import sys
import threading
import time
import urllib.parse
from pathlib import Path

###############################################################################
# Config ######################################################################
###############################################################################
# Defaults, and the environment read once into Config.

API_VERSION = "0.14.0"            # the Ollama release whose API we implement (/api/version; docs/api.md "Versions")
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
RELAY_READ = 1 << 16              # bytes per recv from llama-server's token stream (many events when it runs ahead)
HANDLER_NICE = 5                  # niceness added to request threads: llama-server's compute threads come first
MAX_JSON_BODY = 64 << 20          # bytes; a JSON request (images ride in it as base64: a dozen photos fit)
IDLE_TIMEOUT = 120.0              # seconds a connection may wait for the first byte of its (next) request
HEAD_TIMEOUT = 10.0               # seconds from a request's first byte to its headers' end (Go's ReadHeaderTimeout)
STALL_TIMEOUT = 30.0              # seconds a request's body (or a client reading the answer) may stall
MAX_CONNECTIONS = 1024            # requests served at once (head read, answer not yet sent); more get 503
MAX_OPEN = 4096                   # open connections (a thread each); past it the longest idle one is closed
MAX_PEER_CONNECTIONS = 64         # open connections from one non-loopback address (an IPv6 /64); more get 503
BLOB_GRACE = 3600.0               # seconds an unreferenced blob is kept at startup (an upload awaiting its create)
#: llama-server's n-gram speculation (--spec-type): drafts from the context itself, no draft model.
#: OLLAMA_SPECULATIVE picks one, or off (""). Off by default: in bench.py's `speculative` section it took
#: Gemma 3 270M from 45 to 219 tok/s on a copy task without slowing prose, but checking drafts in one
#: batch changes floating-point results, and on near-ties the greedy text with it was seen to differ
#: from the text without it (and from run to run): a user must not get other text by default.
SPECULATIVE_TYPES = ("ngram-mod", "ngram-simple", "ngram-map-k", "ngram-map-k4v", "ngram-cache")
DEFAULT_SPECULATIVE = ""
#: llama.cpp's CPU backend repacks some quantized matrices (on x86: Q4_0, Q4_K, IQ4_NL, MXFP4, Q2_K with
#: AVX-512; on ARM also Q5_K, Q6_K, Q8_0) into interleaved layouts with kernels of their own; an RPC worker
#: holds matrices as stored and multiplies them with the plain kernels. Both take the same 8-bit rounded
#: activations and differ only in the order floats are summed (about 1e-6 of an output), but each next
#: layer rounds its input to 8 bits again, so the difference grows: Gemma 3 270M's next-token logprobs
#: differ by up to 0.46 nats, as much as the repacked kernels differ from themselves at another batch
#: size; neither is closer to the same weights in F32. OLLAMA_REPACK: unset is auto, which repacks unless
#: the serve has OLLAMA_RPC_SERVERS, so there a model computes the same split or kept local (its logprobs
#: agree exactly); 1 always repacks, 0 never. Not repacking, on AVX-512 x86 (bench.py's `repack` section):
#: Q4_K prompts 1.3x, generation 0.93x; Q4_0 prompts 0.71x, generation 0.97x. Only a serve with workers
#: pays it by default; the docs on RPC workers give the measurements.
DEFAULT_REPACK = None
#: Saved prompt state (llama-server's slot files: a runner's KV cache and its tokens), kept under the
#: store so that a prefix survives its runner (PromptCache). OLLAMA_PROMPT_CACHE caps the bytes kept (0 is
#: off). 4 GiB holds one 20k-token agent prefix of a 3B model at f16 (~110 KiB a token) and is a small part
#: of a 32 GB SD card; the oldest used file goes first past it.
DEFAULT_PROMPT_CACHE = 4 << 30         # bytes
#: tokens a slot must hold to be saved: below ~1k a prompt is seconds to recompute even on a Pi, not
#: worth the card's writes; an agent's system prompt and tools (15-30k tokens) are far above it
PROMPT_CACHE_MIN_TOKENS = 1024
PROMPT_CACHE_TMP_AGE = 3600.0          # seconds after which a temp file a kill left behind is removed
PROMPT_CACHE_IO_TIMEOUT = 600.0        # seconds a save or restore may take (GBs on an SD card: ~30 MB/s)

MEDIA_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MEDIA_CONFIG = "application/vnd.docker.container.image.v1+json"
MEDIA_PREFIX = "application/vnd.ollama.image."
MEDIA_TENSOR = MEDIA_PREFIX + "tensor"   # Ollama's safetensors layout (its MLX engine): not for llama.cpp

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


def parse_unix_host(value):
    """The socket path of an OLLAMA_HOST that names a Unix socket, else None. Spellings:
    unix:PATH and unix://PATH (PATH absolute, or relative to the current directory) and
    unix:///abs/path (the URL form: the same as unix:/abs/path)."""
    if not value or not value.startswith("unix:"):
        return None
    path = value[len("unix:"):]
    if path.startswith("//"):
        path = path[2:]
    if not path:
        raise OllamaError("OLLAMA_HOST=%s names no socket path" % value)
    return os.path.abspath(os.path.expanduser(path))


class Config:
    """Everything the environment decides, read once (OLLAMA_* variables, see `serve --help`)."""

    def __init__(self, environ=None):
        """Read `environ` (os.environ by default) once: bad numbers and durations are warned about and
        fall back to their defaults; a `unix:` OLLAMA_HOST without a path is an OllamaError."""
        env = os.environ if environ is None else environ
        self.unix = parse_unix_host(_env(env, "OLLAMA_HOST"))   # a socket path: serve listens only there
        self.socket_group = _env(env, "OLLAMA_SOCKET_GROUP")    # a group that may use it too (0660)
        self.scheme, self.host, self.port = parse_host(None if self.unix else _env(env, "OLLAMA_HOST"))
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
        self.noprune = _bool_env(env, "OLLAMA_NOPRUNE", False)
        self.nohistory = _bool_env(env, "OLLAMA_NOHISTORY", False)
        self.flash_attention = _bool_env(env, "OLLAMA_FLASH_ATTENTION", None)    # None: llama-server decides
        self.kv_cache_type = _env(env, "OLLAMA_KV_CACHE_TYPE")
        self.speculative = _speculative_env(env)               # an n-gram --spec-type, or "" for off
        self.repack = _bool_env(env, "OLLAMA_REPACK", DEFAULT_REPACK)   # None: auto (see runner_repacks)
        self.prompt_cache = _bytes_env(env, "OLLAMA_PROMPT_CACHE", DEFAULT_PROMPT_CACHE)   # bytes, 0: off
        self.llama_server = _env(env, "OLLAMA_LLAMA_SERVER")
        self.rpc_servers = [w.strip() for w in _env(env, "OLLAMA_RPC_SERVERS").split(",") if w.strip()]
        self.api_keys = [k.strip() for k in _env(env, "OLLAMA_API_KEYS").split(",") if k.strip()]
        self.api_key = _env(env, "OLLAMA_API_KEY")            # what the CLI sends, as the official clients do
        self.tls_cert, self.tls_key = _env(env, "OLLAMA_TLS_CERT"), _env(env, "OLLAMA_TLS_KEY")
        self.registry = _env(env, "OLLAMA_NO_REGISTRY").lower() not in ("1", "true")   # serve /v2
        self.mirrors = [m.strip() for m in _env(env, "OLLAMA_REGISTRY_MIRRORS").split(",") if m.strip()]
        self.metrics = _bool_env(env, "OLLAMA_METRICS", True)    # GET /metrics (Prometheus)

    @property
    def base_url(self):
        if self.unix:
            return "unix:" + self.unix
        host = "[%s]" % self.host if ":" in self.host else self.host
        return "%s://%s:%d" % (self.scheme, host, self.port)


#: strconv.ParseBool's spellings: the one Go bool parser (PARAMETERs, OLLAMA_* flags).
GO_BOOLS = {"1": True, "t": True, "T": True, "TRUE": True, "true": True, "True": True,
            "0": False, "f": False, "F": False, "FALSE": False, "false": False, "False": False}


def _bool_env(env, key, default):
    """An OLLAMA_* boolean as Ollama's envconfig.Bool reads it: unset is `default`; Go's ParseBool
    spellings (1 t T TRUE true True, 0 f F FALSE false False) say yes or no; anything else is yes."""
    value = _env(env, key)
    if not value:
        return default
    return GO_BOOLS.get(value, True)


def _speculative_env(env):
    """OLLAMA_SPECULATIVE: one of SPECULATIVE_TYPES; a yes (1, true, on) is the first of them, a no
    (0, false, off, none) is off, unset is DEFAULT_SPECULATIVE; anything else is warned about and unset."""
    value = _env(env, "OLLAMA_SPECULATIVE").strip().lower()
    if not value:
        return DEFAULT_SPECULATIVE
    if value in SPECULATIVE_TYPES:
        return value
    if value in ("1", "t", "true", "on", "yes"):
        return SPECULATIVE_TYPES[0]
    if value in ("0", "f", "false", "off", "no", "none"):
        return ""
    log.warning("invalid OLLAMA_SPECULATIVE %r (one of %s, or on/off): using the default",
                value, ", ".join(SPECULATIVE_TYPES))
    return DEFAULT_SPECULATIVE


def _int_env(env, key, default):
    try:
        return int(_env(env, key) or default)
    except ValueError:
        log.warning("invalid %s, using %s", key, default)
        return default


def parse_bytes(text):
    """A size in bytes from "4GiB", "500MB", "2g", "1.5 GB" or a plain number of bytes: k/m/g/t are
    powers of 1000, ki/mi/gi/ti of 1024, the B optional (a lone K/M/G/T letter counts in 1024s, as
    `ls -h` prints it). ValueError for anything else or a negative size."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([kmgt]?)(i?)(b?)\s*", text.lower())
    if not m:
        raise ValueError("invalid size %r" % text)
    number, unit, binary, b = m.groups()
    base = 1024 if binary or (unit and not b) else 1000
    return int(float(number) * base ** (" kmgt".index(unit or " ")))


def _bytes_env(env, key, default):
    value = _env(env, key)
    try:
        return parse_bytes(value) if value else default
    except ValueError:
        log.warning("invalid %s %r (a size such as 4GiB or 500MB, 0 for off): using %d bytes", key, value,
                    default)
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
# One hierarchy: every error the server answers or the CLI prints is an OllamaError with a status.

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


class ContextTooLong(BadRequest):
    """A prompt longer than the context: says what to set on the server, since a client such as
    Claude Code or Codex has no num_ctx to send (the suggestion is a power of two with room to answer)."""

    def __init__(self, n_prompt, n_ctx):
        need = 1 << max(12, (int(n_prompt) + 1024 - 1).bit_length()) if str(n_prompt).isdigit() else None
        super().__init__("the prompt is %s tokens but the context window is %s tokens: shorten the prompt, or "
                         "raise the context: set %s where the server runs and restart it (or num_ctx in the "
                         "request's options)" % (n_prompt, n_ctx, "OLLAMA_CONTEXT_LENGTH=%d" % need if need
                                                 else "OLLAMA_CONTEXT_LENGTH"))


class Unauthorized(OllamaError):
    """A registry refused our credentials."""
    status = 401


class Forbidden(OllamaError):
    """The Host header or origin is not allowed."""
    status = 403


class NotFound(OllamaError):
    """No such model, blob or route."""
    status = 404


class TooLarge(OllamaError):
    """The request body is over its endpoint's limit."""
    status = 413


class Canceled(OllamaError):
    """The client went away before the answer was done."""
    status = 499


class Busy(OllamaError):
    """The request queue is full."""
    status = 503


class RegistryError(OllamaError):
    """An OCI distribution error served by /v2: `code` is the spec's (MANIFEST_UNKNOWN, BLOB_UNKNOWN,
    NAME_UNKNOWN, NAME_INVALID, DIGEST_INVALID, UNSUPPORTED, ...), answered as {"errors": [...]}."""

    def __init__(self, code, message, status):
        super().__init__(message, status)
        self.code = code


###############################################################################
# Utilities ###################################################################
###############################################################################
# Small helpers with no state: Go durations, human sizes and times, timestamps, JSON, files.

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
    """A span of `seconds` in the words format.HumanTime puts before "ago" or "from now":
    "Less than a second", "About a minute", "5 hours", "3 weeks" (hours rounded as math.Round)."""
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
    """Timestamp as Go's time.RFC3339Nano in UTC: 2023-08-04T19:22:45.499127Z.

    Called once per streamed token, so it avoids strftime (~20 µs) for plain arithmetic."""
    ts = time.time() if ts is None else ts
    seconds = int(ts // 1)
    micros = int(round((ts - seconds) * 1e6))
    if micros == 1000000:
        seconds, micros = seconds + 1, 0
    y, mo, d, h, mi, s = time.gmtime(seconds)[:6]
    frac = ("%06d" % micros).rstrip("0")
    return "%04d-%02d-%02dT%02d:%02d:%02d%s%sZ" % (y, mo, d, h, mi, s, "." if frac else "", frac)


def rfc3339_local(ts):
    """A local timestamp with offset, as Ollama writes modified_at: 2024-05-01T10:00:00.123+02:00."""
    dt = datetime.datetime.fromtimestamp(ts).astimezone()
    frac = dt.strftime("%f").rstrip("0")
    off = dt.strftime("%z")
    off = "Z" if off in ("+0000", "-0000") else off[:3] + ":" + off[3:]
    return dt.strftime("%Y-%m-%dT%H:%M:%S") + ("." + frac if frac else "") + off


_RFC3339_RE = re.compile(r"^(\d{4})-(\d\d)-(\d\d)[Tt ](\d\d):(\d\d):(\d\d)(\.\d+)?([Zz]|[+-]\d\d:\d\d)$")


def _parse_rfc3339(text, zero=False):
    """Seconds since the epoch for an RFC 3339 time with any fraction and offset ("Z" too); None for
    text that doesn't parse, and for Go's zero time (year 1) unless `zero` (fromisoformat takes
    neither "Z" nor nanoseconds on 3.9)."""
    m = _RFC3339_RE.match(text or "")
    if not m or m.group(1) == "0001" and not zero:
        return None
    y, mo, d, h, mi, s = (int(m.group(i)) for i in range(1, 7))
    off = m.group(8)
    offset = 0 if off in ("Z", "z") else (1 if off[0] == "+" else -1) * (int(off[1:3]) * 3600 + int(off[4:6]) * 60)
    tz = datetime.timezone(datetime.timedelta(seconds=offset))
    when = datetime.datetime(y, mo, d, h, mi, s, tzinfo=tz).timestamp()
    return when + (float(m.group(7)) if m.group(7) else 0.0)


def _char_width(ch):
    """Terminal columns of one character (go-runewidth's rule of thumb): 0 combining, 2 wide."""
    import unicodedata
    if unicodedata.combining(ch) or ch in "\u200b\u200d":
        return 0
    return 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1


def _text_width(text):
    if text.isascii():                     # the usual case, and a list's table has hundreds of cells
        return len(text)
    return sum(_char_width(c) for c in text)


def _table(rows, header=None, indent=""):
    """Go tablewriter with no borders and 4-space padding: every cell left-aligned and padded to
    its column's width (in terminal columns), followed by four spaces."""
    rows = ([header] if header else []) + rows
    widths = {}
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths.get(i, 0), _text_width(cell))
    return "".join(indent + "".join(cell + " " * (widths[i] - _text_width(cell)) + "    "
                                    for i, cell in enumerate(row)) + "\n" for row in rows)


def json_dumps(obj):
    """Compact JSON, non-ASCII kept, as Go's encoder writes it (without HTML escaping)."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def atomic_write(path, data, mode=0o644):
    """Write bytes to path so that a crash leaves either the old or the new file: temp + fsync + rename."""
    import tempfile
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name + ".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            flock(f.fileno())                    # owned until renamed: Store.clean leaves it alone
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
            os.chmod(tmp, mode)
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        _unlink(tmp)
        raise


def current_umask():
    """The process's umask: from /proc/self/status where Linux shows it (4.7+), else set and put back
    at once (a race only with another thread creating a file in that instant)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_LOOPBACK_NAMES = ("localhost",)


def _parse_ip(text):
    import ipaddress
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _is_loopback(host):
    """True for a host that is this machine's loopback: "localhost", "" or None (the default
    address) or a loopback IP. The one check serve (bind), the CLI (the server's host) and
    the registry client (where OLLAMA_API_KEY may go) use."""
    if not host or host in _LOOPBACK_NAMES:
        return True
    ip = _parse_ip(host)
    return ip is not None and ip.is_loopback


def flock(fd, wait=True):
    """Take an exclusive advisory lock on an open file (released when it is closed, or when its
    process dies). With wait=False, False when another open file holds it. A no-op where there
    is no fcntl."""
    try:
        import fcntl
    except ImportError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        return True
    except BlockingIOError:
        return False


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


def _rmtree(path):
    """Remove a folder and what it holds, if it is there."""
    import shutil
    shutil.rmtree(str(path), ignore_errors=True)


class _Wire:
    """One HTTP/1.1 exchange on a raw socket (Connection: close): the request sent in one write, the
    answer read through one buffer, one recv per wake-up (up to RELAY_READ bytes, so a burst of
    events costs one syscall), lines split in C (bytes.split), reads advancing an offset so a burst
    is not copied once per line. The runner's token relay and the CLI's Client both use it:
    http.client costs a dozen Python calls per line on the relay, and ~20 ms (it imports the email
    parser) at every CLI start."""

    def __init__(self, sock):
        self.sock, self.buf, self.pos = sock, b"", 0      # self.buf[self.pos:] is unread
        self.reason, self.headers = "", {}                # of the answer, once response_head() has read it

    def _recv(self):
        data = self.sock.recv(RELAY_READ)
        if not data:
            raise EOFError("connection closed")
        self.buf, self.pos = self.buf[self.pos:] + data, 0

    def line(self):
        while True:
            end = self.buf.find(b"\n", self.pos) + 1
            if end:
                line, self.pos = self.buf[self.pos:end], end
                return line
            self._recv()

    def take(self, n):
        if len(self.buf) - self.pos < n:       # gather, then join once: a 1 MB chunk is ~16 recvs
            parts, have = [self.buf[self.pos:]], len(self.buf) - self.pos
            while have < n:
                data = self.sock.recv(max(RELAY_READ, n - have))
                if not data:
                    raise EOFError("connection closed")
                parts.append(data)
                have += len(data)
            self.buf, self.pos = b"".join(parts), 0
        self.pos += n
        return self.buf[self.pos - n:self.pos]

    @classmethod
    def request(cls, host, port, method, path, body=None, headers=None, timeout=None, tls=None, unix=None):
        """A _Wire on a new connection to host:port (through the ssl context `tls` if given), or to
        the Unix socket at path `unix` (then Host: is `host`), that has sent the request. `body` is
        bytes or a file (read in COPY_CHUNK pieces: as they come with a Content-Length header, else
        chunked). OSError when it cannot connect or send."""
        if unix:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(timeout)
                sock.connect(unix)
            except BaseException:
                sock.close()
                raise
        else:
            # An ASCII host as bytes: a str goes through the idna codec (its import, with unicodedata
            # and stringprep, is ~3 ms of a CLI start); a non-ASCII one needs it.
            sock = socket.create_connection((host.encode() if host.isascii() else host, port), timeout=timeout)
        try:
            if tls is not None:
                sock = tls.wrap_socket(sock, server_hostname=host)
            if not unix:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            hdrs = dict(headers or {})
            stream = body is not None and not isinstance(body, (bytes, bytearray))
            if isinstance(body, (bytes, bytearray)) or (body is None and method not in ("GET", "HEAD")):
                hdrs["Content-Length"] = str(len(body or b""))
            elif stream and "Content-Length" not in hdrs:
                hdrs["Transfer-Encoding"] = "chunked"
            head = "%s %s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n%s\r\n" % (
                method, path, host if unix else "%s:%d" % ("[%s]" % host if ":" in host else host, port),
                "".join("%s: %s\r\n" % kv for kv in hdrs.items()))
            if not stream:
                sock.sendall(head.encode("latin-1") + (body or b""))
            else:
                sock.sendall(head.encode("latin-1"))
                chunked = "Transfer-Encoding" in hdrs
                for data in iter(lambda: body.read(COPY_CHUNK), b""):
                    sock.sendall(b"%x\r\n%s\r\n" % (len(data), data) if chunked else data)
                if chunked:
                    sock.sendall(b"0\r\n\r\n")
        except BaseException:
            sock.close()
            raise
        return cls(sock)

    @classmethod
    def post(cls, port, path, body, key):
        """request() of POST `path` with the JSON `body` to 127.0.0.1:`port` (a runner whose API key is `key`)."""
        return cls.request("127.0.0.1", port, "POST", path, json_dumps(body).encode(),
                           {"Content-Type": "application/json", "Authorization": "Bearer " + key})

    def close(self):
        self.sock.close()

    def response_head(self):
        """(status, chunked, content_length or None) from the status line and headers (kept, with
        lower-case names, in .headers; the reason phrase in .reason); ValueError or IndexError when
        they are not HTTP."""
        parts = self.line().split(None, 2)
        status = int(parts[1])
        self.reason = parts[2].decode("latin-1").strip() if len(parts) > 2 else ""
        chunked, length = False, None
        while True:
            line = self.line()
            if line in (b"\r\n", b"\n"):
                return status, chunked, length
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            self.headers[name.decode("latin-1")] = value.strip().decode("latin-1")
            if name == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            elif name == b"content-length":
                length = int(value)

    def json(self):
        """The JSON answer of a request (its status, its body), read whole; OSError, EOFError or
        ValueError when it is not one."""
        status, chunked, length = self.response_head()
        raw = b"".join(self.chunks(chunked, length))
        return status, json.loads(raw) if raw.strip() else {}

    def chunks(self, chunked, length=None):
        """The body's bytes as they arrive: chunked, `length` bytes, or up to the close (the
        connection is Connection: close). EOFError when the socket closes inside a framed body."""
        if chunked:
            while True:
                size = int(self.line().split(b";")[0], 16)
                if size == 0:
                    return
                yield self.take(size + 2)[:-2]          # the chunk and its CRLF
        while length is None or length > 0:
            if self.pos == len(self.buf):             # else what came with the headers first
                try:
                    self._recv()
                except EOFError:
                    if length is None:
                        return
                    raise
            end = len(self.buf) if length is None else min(len(self.buf), self.pos + length)
            data, self.pos = self.buf[self.pos:end], end
            if length is not None:
                length -= len(data)
            yield data

    def body_lines(self, chunked, length=None):
        """The body's lines (see _lines)."""
        return _lines(self.chunks(chunked, length))


def _lines(chunks):
    """The lines (each with its b"\n") of a stream of byte chunks; the last may lack its newline."""
    pending = b""
    for data in chunks:
        *lines, pending = (pending + data).split(b"\n")
        for line in lines:
            yield line + b"\n"
    if pending:
        yield pending


#: The metrics GET /metrics exposes: name -> (Prometheus type, help). A summary is its _sum and _count.
METRICS = {
    "ollama_http_requests_total": ("counter", "HTTP requests answered, by route pattern, method and status."),
    "ollama_http_request_duration_seconds": ("summary", "Time to answer a request (a stream to its end), by route."),
    "ollama_queue_depth": ("gauge", "Requests waiting for a runner (a slot, or a load) now."),
    "ollama_queue_wait_seconds": ("summary", "Time requests waited for their runner, loading it included."),
    "ollama_runners_loaded": ("gauge", "llama-server runners loaded now."),
    "ollama_runner_memory_bytes": ("gauge", "Resident memory of each loaded runner's llama-server, by model."),
    "ollama_model_load_seconds": ("summary", "Time to start a runner and load its model, by model."),
    "ollama_prompt_tokens_total": ("counter", "Prompt tokens evaluated (cached ones included), by model."),
    "ollama_prompt_eval_seconds_total": ("counter", "Time spent evaluating prompts, by model."),
    "ollama_generated_tokens_total": ("counter", "Tokens generated, by model."),
    "ollama_generation_seconds_total": ("counter", "Time spent generating tokens, by model."),
    "ollama_pull_bytes_total": ("counter", "Blob bytes downloaded from registries."),
    "ollama_push_bytes_total": ("counter", "Blob bytes uploaded to registries."),
}


METRICS_UNLABELLED = ("ollama_queue_wait_seconds", "ollama_pull_bytes_total", "ollama_push_bytes_total")


class Metrics:
    """The server's Prometheus counters and summaries (gauges are read from the server's state when
    scraped): add() and observe() from any thread, text() for the exposition format 0.0.4."""

    def __init__(self):
        self.lock = threading.Lock()
        self.values = {}                      # (name, ((label, value), ...)) -> number

    def add(self, name, amount=1, **labels):
        key = (name, tuple(sorted(labels.items())))
        with self.lock:
            self.values[key] = self.values.get(key, 0) + amount

    def observe(self, name, seconds, **labels):
        """One observation of a summary: its _sum and _count."""
        key = tuple(sorted(labels.items()))
        with self.lock:
            for part, amount in (("_sum", seconds), ("_count", 1)):
                self.values[(name + part, key)] = self.values.get((name + part, key), 0) + amount

    def text(self, gauges=()):
        """The exposition: every METRICS entry with its HELP and TYPE, then its samples (those
        recorded here, and `gauges`: (name, labels dict, value) read now); a METRICS_UNLABELLED
        counter or summary that has not moved yet is shown as 0."""
        with self.lock:
            samples = dict(self.values)
        for name, labels, value in gauges:
            samples[(name, tuple(sorted(labels.items())))] = value
        out = []
        for name, (kind, text) in METRICS.items():
            out.append("# HELP %s %s\n# TYPE %s %s\n" % (name, text, name, kind))
            parts = ("_sum", "_count") if kind == "summary" else ("",)
            mine = sorted((k for k in samples if k[0] in [name + p for p in parts]), key=lambda k: (k[1], k[0]))
            if not mine and kind != "gauge" and name in METRICS_UNLABELLED:
                mine = [(name + p, ()) for p in parts]
            for key in mine:
                labels = ",".join('%s="%s"' % (k, str(v).replace("\\", "\\\\").replace('"', '\\"')
                                               .replace("\n", "\\n")) for k, v in key[1])
                value = samples.get(key, 0)
                out.append("%s%s %s\n" % (key[0], "{%s}" % labels if labels else "",
                                          repr(float(value)) if isinstance(value, float) else value))
        return "".join(out)


###############################################################################
# Names #######################################################################
###############################################################################
# Model names as Ollama's types/model package parses, checks and displays them.

_PART_RE = {
    "host": re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:-]{0,349}$"),
    "namespace": re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]{0,79}$"),
    "model": re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,79}$"),
    "tag": re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,79}$"),
}
_DIGEST_RE = re.compile(r"^sha256[:-]([0-9a-fA-F]{64})$")
_BLOB_NAME_RE = re.compile(r"^sha256-[0-9a-f]{64}$")     # a committed blob (not -partial, not tmp)


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


def file_digest(path, progress=None):
    """sha256 of a file, read in COPY_CHUNK pieces -> "sha256:<hex>"; progress(bytes_so_far)."""
    import hashlib
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


###############################################################################
# Store #######################################################################
###############################################################################
# The models directory: content-addressed blobs, manifests by name, one lock, crash-safe writes.

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
        self.parsed = {}                   # blob path / template text -> GGUF header / Template (immutable)

    # -- blobs ---------------------------------------------------------------
    def blob_path(self, digest):
        """Path of a blob: blobs/sha256-<hex>. The digest is validated, so no path can escape."""
        return self.blobs / parse_digest(digest).replace(":", "-")

    def has_blob(self, digest):
        return self.blob_path(digest).is_file()

    def view_dir(self, digest):
        """Where the engine's view of a blob lives: .ollama-py/views/<hex> (a link to the blob and
        its GGUF edits; see engine_files). Derived, so rebuilt at each load and removed with the blob."""
        return self.root / ".ollama-py" / "views" / parse_digest(digest).split(":")[1]

    def prompt_cache_dir(self, digest):
        """Where saved prompt state for the weights blob `digest` lives: .ollama-py/prompt-cache/<hex>
        (llama-server slot files, see PromptCache). Removed with the blob."""
        return self.root / ".ollama-py" / "prompt-cache" / parse_digest(digest).split(":")[1]

    def blob_size(self, digest):
        return self.blob_path(digest).stat().st_size

    def temp_blob(self):
        """Open a new temp file inside blobs/ (same filesystem, so the final rename is atomic),
        locked while it is open, so that `clean` knows a live writer owns it."""
        import tempfile
        self.blobs.mkdir(parents=True, exist_ok=True, mode=0o755)
        fd, tmp = tempfile.mkstemp(dir=self.blobs, prefix="sha256-tmp-")
        flock(fd)
        return os.fdopen(fd, "wb"), Path(tmp)

    def write_blob(self, stream, expected=None, length=None, progress=None):
        """Copy a byte stream into the store, hashing as it goes. Returns (digest, size).

        With `expected`, a mismatch raises BadRequest and nothing is kept. `length` bounds the
        read (a Content-Length). `progress(n)` is called with the bytes written so far.
        On any error (a full disk included) the temp file is removed and the store is unchanged.
        """
        import hashlib
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
                self.commit_blob(tmp, digest)         # renamed while still open (so locked)
            return digest, size
        except BaseException:
            _unlink(tmp)
            raise

    def write_blob_bytes(self, data):
        """Store bytes; returns (digest, size)."""
        import hashlib
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
                with open(path, "rb") as f:
                    raw = f.read()
                    mtime = os.fstat(f.fileno()).st_mtime
                out.append((name, raw, json.loads(raw), mtime))
            except (OSError, ValueError) as e:
                log.warning("skipping unreadable manifest %s: %s", path, e)
        return out

    def _walk_manifests(self):
        """(Name, path string) of each manifest file: host/namespace/model/tag under manifests/. Plain
        strings, not Paths: /api/tags walks them all at every call (pathlib was half its time)."""
        root = str(self.manifests)
        for dirpath, _dirs, files in os.walk(root):
            rel = os.path.relpath(dirpath, root).split(os.sep)
            if len(rel) != 3:
                continue
            for tag in files:
                if tag.startswith("."):
                    continue
                name = Name(rel[0], rel[1], rel[2], tag)
                if name.is_valid():
                    yield name, os.path.join(dirpath, tag)

    def referenced(self, exclude=None):
        """Every digest named by a stored manifest (except the manifest of `exclude`)."""
        refs = set()
        for name, _raw, data, _mtime in self.list():
            if exclude is None or name != exclude:
                refs.update(manifest_digests(data))
        return refs

    def delete(self, name):
        """Remove a model: its manifest, then empty folders, then the blobs no other model uses.

        The blobs to check are journalled first (blobs/.rm-<token>.json), so a crash after the
        manifest is gone leaves a journal that `clean` finishes, not orphaned blobs."""
        import secrets
        with self.lock:
            found, _raw, data = self.get(name)
            journal = self.blobs / (".rm-%s.json" % secrets.token_hex(8))
            atomic_write(journal, json_dumps(sorted(manifest_digests(data))).encode())
            path = self.manifest_path(found)
            path.unlink()
            _fsync_dir(path.parent)
            self._prune_dirs(path.parent)
            self.remove_unused(manifest_digests(data))
            _unlink(journal)
        return found

    def clean(self, grace=BLOB_GRACE, prune=True, now=None):
        """Startup repair: remove temp files no live writer holds (`flock`), finish interrupted
        deletes (their journals), and with `prune` remove blobs that no manifest names and that are
        older than `grace` seconds (an upload waiting for its create is younger). Resumable
        partial downloads (`-partial*`) are kept. A blob's age is from its ctime, which its commit
        (a rename) or its import (a hard link) sets, not from the mtime a link keeps. `now`: a
        time.time() to judge ages at. Returns (files removed, bytes freed)."""
        removed, freed = 0, 0
        if not self.blobs.is_dir():
            return removed, freed
        with self.lock:
            for path in list(self.blobs.iterdir()) + list(self._manifest_temps()):
                if path.name.startswith("sha256-tmp-") or ".tmp-" in path.name:
                    size = self._remove_unowned(path)
                    if size is not None:
                        removed, freed = removed + 1, freed + size
            for journal in self.blobs.glob(".rm-*.json"):
                try:
                    self.remove_unused(json.loads(journal.read_text()))
                except (OSError, ValueError, TypeError, OllamaError) as e:
                    log.warning("cannot finish the delete journalled in %s: %s", journal.name, e)
                _unlink(journal)
            if prune:
                refs, now = self.referenced(), time.time() if now is None else now
                for path in self.blobs.iterdir():
                    if not _BLOB_NAME_RE.match(path.name) or path.name.replace("-", ":", 1) in refs:
                        continue
                    st = path.stat()
                    if now - st.st_ctime > grace:
                        _unlink(path)
                        removed, freed = removed + 1, freed + st.st_size
        if removed:
            log.info("removed %d unused files from %s (%s)", removed, self.root, human_bytes(freed))
        return removed, freed

    def _manifest_temps(self):
        for dirpath, _dirs, files in os.walk(self.manifests) if self.manifests.is_dir() else ():
            for f in files:
                if ".tmp-" in f:
                    yield Path(dirpath) / f

    @staticmethod
    def _remove_unowned(path):
        """Unlink a temp file unless an open file holds its lock; its size, or None if kept."""
        try:
            fd = os.open(str(path), os.O_RDONLY)
        except OSError:
            return None
        try:
            if not flock(fd, wait=False):
                return None
            size = os.fstat(fd).st_size
            _unlink(path)
            return size
        finally:
            os.close(fd)

    def fix_blob_names(self):
        """Rename legacy blobs/sha256:<hex> files (older Ollama, or copied from a filesystem without
        ":" in names) to sha256-<hex>, as Ollama's fixBlobs does at startup. Returns the count."""
        fixed = 0
        if not self.blobs.is_dir():
            return fixed
        for path in self.blobs.iterdir():
            m = _DIGEST_RE.match(path.name)
            if m and path.name.startswith("sha256:") and path.is_file():
                target = self.blob_path(path.name)
                if target.exists():
                    path.unlink()
                else:
                    os.replace(str(path), str(target))
                fixed += 1
        return fixed

    def remove_unused(self, digests):
        """Delete those of `digests` that no remaining manifest references."""
        with self.lock:
            refs = self.referenced()
            for d in set(digests) - refs:
                _unlink(self.blob_path(d))
                _rmtree(self.view_dir(d))
                _rmtree(self.prompt_cache_dir(d))

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


def _import_local_blob(store, src, digest):
    """Link (or copy) a local file into blobs/ under `digest`, re-hashed; BadRequest on mismatch.
    Only a file the server's user owns and no group or other may write is linked."""
    import secrets
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
    linked, owner = True, None
    try:
        try:
            os.link(src, str(tmp))
        except OSError:
            linked = False
        if linked:
            owner = open(str(tmp), "rb")          # locked while hashed: Store.clean leaves it
            flock(owner.fileno())
            st = os.fstat(owner.fileno())         # the inode linked, not what src names by now
            if st.st_uid != os.geteuid() or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
                owner.close()                     # another user could rewrite it under its digest's name
                owner, linked = None, False       # later: copied, as Ollama always does
                _unlink(tmp)
        if not linked:
            with open(src, "rb") as f:
                try:
                    store.write_blob(f, expected=digest)       # streamed copy, verified
                except BadRequest:
                    raise BadRequest('digest mismatch, expected "%s"' % parse_digest(digest)) from None
            return
        before = os.stat(str(tmp))
        actual = file_digest(str(tmp))
        after = os.stat(str(tmp))
        if (before.st_size, before.st_mtime_ns, before.st_ino) != (after.st_size, after.st_mtime_ns, after.st_ino):
            raise BadRequest("%s changed while it was being imported" % src)
        if actual != parse_digest(digest):     # its real digest stays unsaid: no hash oracle
            raise BadRequest('digest mismatch, expected "%s"' % parse_digest(digest))
        if not store.has_blob(digest):
            os.replace(str(tmp), str(store.blob_path(digest)))
            _fsync_dir(store.blobs)
    finally:
        _unlink(tmp)
        if owner is not None:
            owner.close()


###############################################################################
# GGUF ########################################################################
###############################################################################
# GGUF files: the header's key/values and tensor list (read lazily), and a writer for tests and checks.

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
    """Little-endian reads over a memory-mapped GGUF header, with offsets for error messages."""

    def __init__(self, m, size):
        self.m, self.size, self.pos = m, size, 0

    def read(self, n):
        if self.pos + n > self.size:
            raise BadRequest("invalid GGUF file: unexpected end of file at offset %d" % self.size)
        data = self.m[self.pos:self.pos + n]
        self.pos += n
        return data

    def skip(self, n):
        if self.pos + n > self.size:
            raise BadRequest("invalid GGUF file: unexpected end of file at offset %d" % self.size)
        self.pos += n

    def skip_strings(self, n):
        """Skip n length-prefixed strings (a 256k-token vocabulary in ~40 ms, not ~250 ms)."""
        pos, m, size, length = self.pos, self.m, self.size, _U64.unpack_from
        for _ in range(n):
            if pos + 8 > size:
                raise BadRequest("invalid GGUF file: unexpected end of file at offset %d" % size)
            pos += 8 + length(m, pos)[0]
        if pos > size:
            raise BadRequest("invalid GGUF file: unexpected end of file at offset %d" % size)
        self.pos = pos

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


_U64 = struct.Struct("<Q")


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
    """One metadata value of GGUF type `vtype` at r's position (arrays as lists, float32s as their
    shortest decimal). An array longer than `max_array` is skipped and read as [], its length kept
    in `lengths[key]`; BadRequest (400) for an unknown type."""
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
            elif itype == 8:
                r.skip_strings(n)
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
    import mmap
    with open(str(path), "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if f.read(4) != GGUF_MAGIC:
            raise BadRequest("supplied file was not in GGUF format")
        if size < 8:
            raise BadRequest("invalid GGUF file: unexpected end of file at offset %d" % size)
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            return _parse_gguf(_GGUFReader(m, size), max_array, size)


def _parse_gguf(r, max_array, size):
    """Parse the header behind the magic (see read_gguf)."""
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
    g = GGUF(version, kv, tensors, lengths, size)
    align = kv.get("general.alignment") or 32
    g.data_offset = -(-r.pos // align) * align       # bytes: where tensor offsets count from
    return g


def is_gguf(path):
    """True when the file starts with the GGUF magic."""
    try:
        with open(str(path), "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def _gguf_encode(vtype, value):
    """One metadata value in GGUF's little-endian encoding; arrays are (element type, [values])."""
    if vtype == 8:
        data = value.encode()
        return _U64.pack(len(data)) + data
    if vtype == 9:
        itype, items = value
        return struct.pack("<IQ", itype, len(items)) + b"".join(_gguf_encode(itype, v) for v in items)
    return struct.pack("<" + _GGUF_TYPES[vtype][1], value)


def write_gguf(path, kv, tensors, alignment=32):
    """Write a GGUF v3 file: `kv` is [(key, value type, value)], `tensors` is [(name, ggml type, shape
    innermost first, data)], data being bytes or a function returning them, called as it is written
    (so large tensors are never all in memory). Written to a temp file and renamed, so a reader never
    sees half."""
    head = [GGUF_MAGIC, struct.pack("<IQQ", 3, len(tensors), len(kv))]
    head += [_gguf_encode(8, key) + struct.pack("<I", vtype) + _gguf_encode(vtype, value) for key, vtype, value in kv]
    offset, body = 0, []
    for name, ggml_type, shape, data in tensors:
        head.append(_gguf_encode(8, name) + struct.pack("<I%dQIQ" % len(shape), len(shape), *shape, ggml_type, offset))
        size = _tensor_nbytes(ggml_type, shape) if callable(data) else len(data)
        pad = -size % alignment
        body.append((name, data, size, pad))
        offset += size + pad
    header = b"".join(head)
    header += b"\0" * (-len(header) % alignment)
    tmp = "%s.tmp.%d.%d" % (path, os.getpid(), threading.get_ident())   # a writer each: none shared
    try:
        with open(tmp, "wb") as f:
            f.write(header)
            for name, data, size, pad in body:
                data = data() if callable(data) else data
                if len(data) != size:
                    raise OllamaError("tensor %s: %d bytes, expected %d" % (name, len(data), size))
                f.write(data)
                f.write(b"\0" * pad)
        os.replace(tmp, str(path))
    except BaseException:
        _unlink(tmp)
        raise


#: ggml type -> (bytes per block, weights per block, [(offset of an f16 scale in the block, value)]):
#: the quantized types the engine check fills with random weights. Scales keep weights within ~0.05.
_CHECK_BLOCKS = {2: (18, 32, [(0, 0.005)]),                     # Q4_0: w = d * (q - 8)
                 3: (20, 32, [(0, 0.005), (2, -0.04)]),         # Q4_1: w = d * q + m
                 8: (34, 32, [(0, 0.0003)]),                    # Q8_0: w = d * q, q int8
                 12: (144, 256, [(0, 5e-5), (2, 5e-5)]),        # Q4_K: w = d * sc * q - dmin * m
                 13: (176, 256, [(0, 2.5e-5), (2, 2.5e-5)]),    # Q5_K
                 14: (210, 256, [(208, 1e-5)])}                 # Q6_K: w = d * sc * (q - 32), d last


def engine_check_model(path, seed=0, f16=False):
    """Write the engine check's model: a 2-layer llama of width 256 with random weights, one tensor in
    each weight type llama.cpp's CPU kernels treat separately (Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K,
    F16, F32), grouped-query attention, and a byte-level SentencePiece vocabulary. 1.2 MB.
    `f16`: every matrix in F16 instead (a model llama-quantize accepts; 2.8 MB)."""
    import random
    rng = random.Random(seed)
    n_embd, n_ff, n_head, n_head_kv, n_layer = 256, 512, 4, 2, 2
    tokens = ["<unk>", "<s>", "</s>"] + ["<0x%02X>" % b for b in range(256)] + ["\u2581"]
    tokens += [chr(c) for c in range(33, 127)] + ["\u2581" + chr(c) for c in range(97, 123)]
    types = [2, 3, 3] + [6] * 256 + [1] * (len(tokens) - 259)     # unknown, control, byte, normal
    n_vocab = len(tokens)

    def quantized(ggml_type, rows, cols):
        if f16:
            return f16_matrix(rows, cols)
        size, per_block, scales = _CHECK_BLOCKS[ggml_type]
        blocks = rows * cols // per_block
        data = bytearray(rng.getrandbits(8 * size * blocks).to_bytes(size * blocks, "little"))
        for at, value in scales:
            lo, hi = struct.pack("<e", value)
            data[at::size], data[at + 1::size] = bytes([lo]) * blocks, bytes([hi]) * blocks
        return ggml_type, [cols, rows], bytes(data)

    def f16_matrix(rows, cols):
        return 1, [cols, rows], struct.pack("<%de" % (rows * cols), *(rng.gauss(0, 0.02) for _ in range(rows * cols)))

    def ones(n):
        return 0, [n], struct.pack("<%df" % n, *([1.0] * n))

    kv_dim = n_embd // n_head * n_head_kv
    layer_types = [(2, 3, 8, 12, 13, 14, 12), (8, 12, 14, 2, 2, 8, 14)]   # q k v output gate up down
    tensors = [("token_embd.weight",) + f16_matrix(n_vocab, n_embd), ("output_norm.weight",) + ones(n_embd),
               ("output.weight",) + quantized(14, n_vocab, n_embd)]
    for i in range(n_layer):
        q, k, v, o, gate, up, down = layer_types[i]
        tensors += [("blk.%d.%s" % (i, name),) + t for name, t in (
            ("attn_norm.weight", ones(n_embd)), ("attn_q.weight", quantized(q, n_embd, n_embd)),
            ("attn_k.weight", quantized(k, kv_dim, n_embd)), ("attn_v.weight", quantized(v, kv_dim, n_embd)),
            ("attn_output.weight", quantized(o, n_embd, n_embd)), ("ffn_norm.weight", ones(n_embd)),
            ("ffn_gate.weight", quantized(gate, n_ff, n_embd)), ("ffn_up.weight", quantized(up, n_ff, n_embd)),
            ("ffn_down.weight", quantized(down, n_embd, n_ff)))]
    kv = [("general.architecture", 8, "llama"), ("general.name", 8, "ollama.py engine check"),
          ("llama.context_length", 4, 512), ("llama.embedding_length", 4, n_embd),
          ("llama.block_count", 4, n_layer), ("llama.feed_forward_length", 4, n_ff),
          ("llama.attention.head_count", 4, n_head), ("llama.attention.head_count_kv", 4, n_head_kv),
          ("llama.rope.dimension_count", 4, n_embd // n_head), ("llama.vocab_size", 4, n_vocab),
          ("llama.attention.layer_norm_rms_epsilon", 6, 1e-5),
          ("tokenizer.ggml.model", 8, "llama"), ("tokenizer.ggml.tokens", 9, (8, tokens)),
          ("tokenizer.ggml.scores", 9, (6, [0.0] * 259 + [-float(i) for i in range(n_vocab - 259)])),
          ("tokenizer.ggml.token_type", 9, (5, types)), ("tokenizer.ggml.bos_token_id", 4, 1),
          ("tokenizer.ggml.eos_token_id", 4, 2), ("tokenizer.ggml.unknown_token_id", 4, 0),
          ("tokenizer.ggml.add_bos_token", 7, True)] + ([("general.file_type", 4, 1)] if f16 else [])
    write_gguf(path, kv, tensors)
    return path


# == GGUF: Ollama's converter layout ==========================================
# Ollama's library serves GGUFs written by Ollama's own converter, and stock llama.cpp refuses many
# (other key names, extra tokenizer entries, vision tensors inside the model file). Ollama patches
# llama.cpp to translate them as they load; ollama.py keeps the knowledge here, as data: GGUFEdits
# say what the engine must read differently, and the engine applies them while it reads the header
# (build_llama.sh's GGUF edits hook), or through --override-kv when only scalar keys change. The
# stored blob is never touched: digests, push, export, /v2 and Ollama itself see the original.

GGUF_EDITS_MARKER = b"ollama.py gguf edits v2"   # the hook's string: an engine that has it reads edits
GGUF_EDITS_VERSION = 2        # v2 adds edits.data (tensor bytes from a side file); v1 engines read the rest
#: A view whose edits have split tensors: the link to the blob, and the GGUF ollama.py writes with those
#: tensors, named as llama.cpp's loader finds a model's splits from the first one's name.
SPLIT_VIEW = ("model-00001-of-00002.gguf", "model-00002-of-00002.gguf")


class GGUFEdits:
    """What the engine must read differently in one GGUF: keys to set (with their GGUF types), arrays
    to truncate, keys to remove, key prefixes to rename, tensors to rename, to cut to their first rows
    and to hide. `family` and
    `quirks` say why, for the log and `show`. Falsy when there is nothing to change."""

    def __init__(self, family):
        """No edits yet, for `family` (its name in the log and `show`)."""
        self.family, self.quirks = family, []
        self.set, self.truncate, self.remove, self.rename_keys, self.rename, self.hide = {}, {}, [], [], [], []
        self.shape = []                    # (tensor name, shape): read as its first rows
        # (tensor name as the engine sees it, ggml type, shape, recipe, bytes): tensors read from other
        # bytes than the file gives them. `bytes` is either [(offset, length)], byte ranges of the file
        # itself read in order (rows moved, tensors joined: nothing stored twice), or a function (f, g)
        # -> the bytes, computed from the file `f` with header `g` into the data file beside the sidecar;
        # the recipe (text) names the computation, so a data file written by other code is rewritten.
        # Only the projector loader reads these (mtmd's clip.cpp, as build_llama.sh patches it).
        self.data = []
        # (tensor name, ggml type, shape, recipe, function (f, g) -> bytes): tensors the text loader
        # reads from a second file, a small real GGUF ollama.py writes beside the link (SPLIT_VIEW):
        # llama.cpp's loader takes the two as one model split in two (the sidecar adds the split.* keys
        # and hides what the second file replaces). For tensor data that must change for the text
        # loader, which maps each tensor as one byte range of its file, so edits.data cannot serve it.
        self.split = []

    def __bool__(self):
        return bool(self.set or self.truncate or self.remove or self.rename_keys or self.rename or self.hide
                    or self.shape or self.data or self.split)

    def set_missing(self, g, key, vtype, value):
        """Set `key` unless the file has it."""
        if key not in g.kv:
            self.set[key] = (vtype, value)

    def copy_keys(self, g, source, keys, target="clip.vision."):
        """Set `target` + key from `source` + key for each (key, GGUF type) in `keys` the file has: a
        tower's keys under its family's prefix, read where llama.cpp's projector loader looks."""
        for key, vtype in keys:
            if source + key in g.kv:
                self.set[target + key] = (vtype, g.kv[source + key])

    def hide_prefixes(self, g, *prefixes):
        """Hide the tensors whose names start with one of `prefixes` (another loader's part of the file)."""
        self.hide += [t.name for t in g.tensors if t.name.startswith(prefixes)]

    def rename_containing(self, g, pairs, prefixes=("",)):
        """Rename tensors (those whose names start with one of `prefixes`) by substring, the first
        matching pair each (Ollama's name -> llama.cpp's)."""
        for t in g.tensors:
            for old, new in pairs if t.name.startswith(prefixes) else ():
                if old in t.name:
                    self.rename.append((t.name, t.name.replace(old, new, 1)))
                    break

    def override_args(self):
        """--override-kv arguments doing the same, or None when these edits need the hook (arrays,
        tensors, removals, or a string longer than llama.cpp's 127-byte override)."""
        if self.truncate or self.remove or self.rename_keys or self.rename or self.hide or self.shape or self.data \
                or self.split:
            return None
        kinds = {4: "int", 5: "int", 6: "float", 7: "bool", 8: "str"}
        args = []
        for key, (vtype, value) in sorted(self.set.items()):
            if vtype not in kinds or (vtype == 8 and (len(value.encode()) > 127 or "," in value)):
                return None
            text = ("true" if value else "false") if vtype == 7 else str(value)
            args += ["--override-kv", "%s=%s:%s" % (key, kinds[vtype], text)]
        return args

    def write(self, path, source=None, g=None):
        """The sidecar the hook reads: a GGUF of the keys to set and the edits.* string arrays. With
        data edits, their bytes too, computed from `source` (header `g`) into the data file beside the
        sidecar ("X.edits" -> "X.data"), unless that file already holds them (data_file). With split
        tensors, the split keys and the second file of SPLIT_VIEW (split_file); `path` is then the
        first's sidecar."""
        def pairs(items):
            return (8, [s for pair in items for s in pair])
        kv = [(k, vtype, value) for k, (vtype, value) in sorted(self.set.items())]
        kv += [("edits.truncate", 9, pairs((k, str(n)) for k, n in sorted(self.truncate.items()))),
               ("edits.remove", 9, (8, list(self.remove))), ("edits.rename_keys", 9, pairs(self.rename_keys)),
               ("edits.rename", 9, pairs(self.rename)), ("edits.hide", 9, (8, list(self.hide))),
               ("edits.shape", 9, pairs((name, ",".join(map(str, dims))) for name, dims in self.shape))]
        if self.data:
            offsets = iter(self.data_file(str(path)[:-len(".edits")] + ".data", source, g))
            triples = []
            for name, vtype, shape, _recipe, produce in self.data:
                ranges = "d%d+%d" % (next(offsets), _tensor_nbytes(vtype, shape)) if callable(produce) else \
                    ",".join("f%d+%d" % r for r in produce)
                triples += [name, ",".join(map(str, [vtype] + list(shape))), ranges]
            kv.append(("edits.data", 9, (8, triples)))
        if self.split:
            # llama.cpp reads split.no and split.count as u16, split.tensors.count as i32 (as gguf-split writes)
            total = len(g.tensors) - len(set(self.hide)) + len(self.split)
            kv += [("split.no", 2, 0), ("split.count", 2, 2), ("split.tensors.count", 5, total)]
            self.split_file(os.path.join(os.path.dirname(str(path)), SPLIT_VIEW[1]), source, g, total)
        write_gguf(path, kv, [])

    def split_file(self, path, source, g, total):
        """Write the split tensors, computed from `source` (header `g`), as the GGUF `path`: the
        model's second split. Its key ollama_py.recipe is the hex SHA-256 of what it holds (names,
        types, shapes, recipes, the source's size), so while the blob and this code are unchanged it
        is written once and then reused."""
        import hashlib
        recipe = json_dumps([[n, t, list(s), r] for n, t, s, r, _b in self.split] + [g.size]).encode()
        stamp = hashlib.sha256(recipe).hexdigest()
        try:
            if read_gguf(path, 0).kv.get("ollama_py.recipe") == stamp:
                return
        except (OSError, OllamaError):
            pass
        with open(str(source), "rb") as f:
            write_gguf(path, [("split.no", 2, 1), ("split.count", 2, 2), ("split.tensors.count", 5, total),
                              ("ollama_py.recipe", 8, stamp)],
                       [(name, vtype, shape, lambda produce=produce: produce(f, g))
                        for name, vtype, shape, _r, produce in self.split])

    def data_file(self, path, source, g):
        """Write the computed data edits' bytes to `path` -> each one's offset there (bytes); no file
        when none is computed. The file starts with the hex SHA-256 of what it holds (names, types,
        shapes, recipes, the source's size), so while the blob and this code are unchanged it is
        written once and then reused; a changed recipe rewrites it. Written to a temp file and
        renamed: a reader never sees half."""
        import hashlib
        computed = [d for d in self.data if callable(d[4])]
        if not computed:
            _unlink(path)
            return []
        recipe = json_dumps([[n, t, list(s), r] for n, t, s, r, _b in computed] + [g.size]).encode()
        stamp = hashlib.sha256(recipe).hexdigest().encode()
        offsets, at = [], len(stamp)
        for _name, vtype, shape, _r, _b in computed:
            at = -(-at // 32) * 32                      # 32-byte aligned, as GGUF aligns tensor data
            offsets.append(at)
            at += _tensor_nbytes(vtype, shape)
        try:
            with open(path, "rb") as f:
                if f.read(len(stamp)) == stamp and os.fstat(f.fileno()).st_size == at:
                    return offsets
        except OSError:
            pass
        tmp = "%s.tmp.%d.%d" % (path, os.getpid(), threading.get_ident())   # a writer each: none shared
        try:
            with open(str(source), "rb") as src, open(tmp, "wb") as out:
                out.write(stamp)
                for (name, vtype, shape, _r, produce), offset in zip(computed, offsets):
                    data = produce(src, g)
                    if len(data) != _tensor_nbytes(vtype, shape):
                        raise OllamaError("data edit for %s: %d bytes, expected %d" % (
                            name, len(data), _tensor_nbytes(vtype, shape)))
                    out.write(b"\0" * (offset - out.tell()))
                    out.write(data)
            os.replace(tmp, path)
        except BaseException:
            _unlink(tmp)
            raise
        return offsets


#: ggml type -> (bytes per block, weights per block), for the types data edits move rows of (a row is
#: whole blocks, so moving rows is a byte copy whatever the type).
GGML_BLOCKS = {0: (4, 1), 1: (2, 1), 30: (2, 1), 2: (18, 32), 3: (20, 32), 6: (22, 32), 7: (24, 32),
               8: (34, 32), 10: (84, 256), 11: (110, 256), 12: (144, 256), 13: (176, 256), 14: (210, 256),
               39: (17, 32)}


def _tensor_nbytes(vtype, shape):
    """Bytes of a tensor of ggml type `vtype` and shape (innermost first)."""
    size, per = GGML_BLOCKS[vtype]
    n = 1
    for d in shape[1:]:
        n *= d
    return shape[0] // per * size * n


def _tensor_data(f, g, t):
    """The bytes of tensor `t` of the GGUF open as `f` (header `g`)."""
    f.seek(g.data_offset + t.offset)
    return f.read(_tensor_nbytes(t.type, t.shape))


def _ranges(g, t, rows=None):
    """Data edit byte ranges: tensor `t` of the file with header `g`, whole or its rows (outer
    dimension) in the order `rows`, adjacent ranges joined -> [(offset, length)]."""
    start, size = g.data_offset + t.offset, _tensor_nbytes(t.type, t.shape)
    if rows is None:
        return [(start, size)]
    row, out = size // t.shape[-1], []
    for r in rows:
        if out and out[-1][0] + out[-1][1] == start + r * row:
            out[-1] = (out[-1][0], out[-1][1] + row)
        else:
            out.append((start + r * row, row))
    return out


def _rope_order(rows, n_head):
    """Rows in llama.cpp's RoPE order: per head, the first and second halves interleaved (its
    converter's LlamaModel.permute, which Ollama's converter leaves out for vision towers): row
    h*head_dim + 2*i + j is row h*head_dim + j*head_dim/2 + i."""
    head_dim = rows // n_head
    return [dst - dst % head_dim + (dst % 2) * (head_dim // 2) + dst % head_dim // 2 for dst in range(rows)]


def _f32_bytes(data, vtype):
    """Tensor bytes of ggml type `vtype` (F32, F16, BF16 or Q8_0) as F32, little-endian."""
    if vtype == 0:
        return bytes(data)
    if vtype == 30:                                       # BF16: the high half of an F32
        out = bytearray(2 * len(data))
        out[2::4], out[3::4] = data[0::2], data[1::2]
        return bytes(out)
    if vtype == 1:
        n = len(data) // 2
        return struct.pack("<%df" % n, *struct.unpack("<%de" % n, data))
    if vtype == 8:                                        # Q8_0: blocks of an F16 scale and 32 int8
        values = []
        for at in range(0, len(data), 34):
            d = struct.unpack_from("<e", data, at)[0]
            values += [d * q for q in struct.unpack_from("<32b", data, at + 2)]
        return struct.pack("<%df" % len(values), *values)
    raise OllamaError("cannot widen ggml type %s to F32" % GGML_TYPES.get(vtype, vtype))


def _as_f32(t):
    """Data edit bytes: F16 or BF16 tensor `t` as F32 (little-endian)."""
    return lambda f, g: _f32_bytes(_tensor_data(f, g, t), t.type)


def _joined(parts):
    """Data edit bytes: the tensors `parts`, all of one ggml type, one after another along their outer
    dimension (rows): a byte copy, whole rows being whole blocks."""
    return lambda f, g: b"".join(_tensor_data(f, g, t) for t in parts)


def _widened(parts):
    """Data edit bytes: the tensors `parts` one after another along their outer dimension (rows),
    each widened to F32 (they differ in type)."""
    return lambda f, g: b"".join(_f32_bytes(_tensor_data(f, g, t), t.type) for t in parts)


def _temporal_slice(t, frame):
    """Data edit bytes: frame `frame` of a Conv3D patch embedding stored as ggml [W, H, frames, out*in]
    (Ollama's qwen3-vl files), as F32 [W, H, in, out]: plane p = out*in_channels + in of that frame,
    in order, which is the Conv2D kernel llama.cpp's qwen3vl_merger takes per frame."""
    def produce(f, g):
        data = _f32_bytes(_tensor_data(f, g, t), t.type)
        plane, frames = 4 * t.shape[0] * t.shape[1], t.shape[2]
        return b"".join(data[(frame + frames * p) * plane:(frame + frames * p + 1) * plane] for p in range(t.shape[3]))
    return produce


def _zeros(nbytes):
    """Data edit bytes: `nbytes` zero bytes (a tensor the loader wants and the file lacks)."""
    return lambda f, g: bytes(nbytes)


def _array_length(g, key):
    """The item count of an array key, read or (when skipped by read_gguf's max_array) recorded."""
    value = g.kv.get(key)
    return len(value) if value else g.array_lengths.get(key, 0)


def _tensor(g, name):
    return next((t for t in g.tensors if t.name == name), None)


def _gemma3_edits(g, path):
    """gemma3 (text): rope keys under rope.global/rope.local, no RMS epsilon, the tokenizer longer
    than token_embd (image tokens), and the vision tower inside the file. (Ollama's models carry a
    TEMPLATE layer, so a missing chat template is left missing.)"""
    has_vision = any(t.name.startswith(("v.", "mm.")) for t in g.tensors)
    markers = [has_vision, "gemma3.mm.tokens_per_image" in g.kv, "gemma3.rope.global.freq_base" in g.kv,
               "gemma3.rope.local.freq_base" in g.kv, "gemma3.attention.layer_norm_rms_epsilon" not in g.kv]
    if not any(markers):
        return None
    e = GGUFEdits("gemma3")
    for old, new in (("gemma3.rope.global.freq_base", "gemma3.rope.freq_base"),
                     ("gemma3.rope.local.freq_base", "gemma3.rope.freq_base_swa")):
        if old in g.kv:
            e.set[new] = (6, g.kv[old])
            e.quirks.append("%s read as %s" % (old, new))
    for key, value in (("gemma3.attention.layer_norm_rms_epsilon", 1e-6), ("gemma3.rope.freq_base", 1e6),
                       ("gemma3.rope.freq_base_swa", 1e4)):
        if key not in g.kv and key not in e.set:
            e.set[key] = (6, value)
            e.quirks.append("%s missing: %g" % (key, value))
    if g.context_length >= 131072 and "gemma3.rope.scaling.type" not in g.kv:
        e.set["gemma3.rope.scaling.type"] = (8, "linear")       # 4B and up: 16k trained, 8x linear
        e.set_missing(g, "gemma3.rope.scaling.factor", 6, 8.0)
        e.quirks.append("rope scaling missing: linear x8")
    embd = _tensor(g, "token_embd.weight")
    rows = embd.shape[1] if embd and len(embd.shape) > 1 else 0
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
        if rows and _array_length(g, key) > rows:
            e.truncate[key] = rows
    if e.truncate:
        e.quirks.append("tokenizer cut to token_embd's %d rows" % rows)
    if has_vision:
        e.hide_prefixes(g, "v.", "mm.")
        e.quirks.append("vision tower in the model file: the projector is the same file")
    return e


#: Ollama's gemma3 vision tensor names -> llama.cpp's mmproj names.
_GEMMA3_CLIP_RENAMES = (("v.patch_embedding", "v.patch_embd"), ("v.position_embedding", "v.position_embd"),
                        ("v.post_layernorm", "v.post_ln"), (".layer_norm1", ".ln1"), (".layer_norm2", ".ln2"),
                        (".attn_output", ".attn_out"), (".mlp.fc1", ".ffn_down"), (".mlp.fc2", ".ffn_up"),
                        ("mm.mm_input_projection", "mm.input_projection"),
                        ("mm.mm_soft_emb_norm", "mm.soft_emb_norm"))


def _gemma3_clip_edits(g, path):
    """gemma3 with its vision tower inside: the same file read as llama.cpp's Gemma 3 mmproj."""
    if not any(t.name.startswith("v.") for t in g.tensors):
        return None
    e = GGUFEdits("gemma3 vision")
    e.copy_keys(g, "gemma3.vision.", (("block_count", 4), ("embedding_length", 4), ("feed_forward_length", 4),
                                      ("image_size", 4), ("patch_size", 4), ("attention.head_count", 4),
                                      ("attention.layer_norm_epsilon", 6)))
    e.set["clip.vision.projection_dim"] = (4, g.embedding_length)
    e.set_missing(g, "clip.vision.image_mean", 9, (6, [0.5, 0.5, 0.5]))
    e.set_missing(g, "clip.vision.image_std", 9, (6, [0.5, 0.5, 0.5]))
    e.set_missing(g, "clip.has_vision_encoder", 7, True)
    e.set_missing(g, "clip.use_gelu", 7, True)
    e.set["clip.projector_type"] = (8, "gemma3")
    e.set["general.architecture"] = (8, "clip")
    e.rename_containing(g, _GEMMA3_CLIP_RENAMES, ("v.", "mm."))
    e.hide += [t.name for t in g.tensors if not t.name.startswith(("v.", "mm."))]
    e.quirks.append("vision tower read as a gemma3 projector")
    return e


def _llama3_edits(g, path):
    """Llama 3.x: no pre-tokenizer (tokenization silently differs) and EOS on <|end_of_text|> (an
    instruct model may not stop). Found by the vocabulary, never the name."""
    if _array_length(g, "tokenizer.ggml.tokens") <= 128009:
        return None
    tokens = read_gguf(path).kv.get("tokenizer.ggml.tokens") or []
    if tokens[128009] != "<|eot_id|>":
        return None
    if tokens[128006] != "<|start_header_id|>" and "<|eot_id|>" not in g.chat_template:
        return None
    e = GGUFEdits("llama3")
    if g.kv.get("tokenizer.ggml.pre", "default") in ("", "default"):
        e.set["tokenizer.ggml.pre"] = (8, "llama-bpe")
        e.quirks.append("no pre-tokenizer: llama-bpe")
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"):
        if g.kv.get(key, 128001) == 128001:
            e.set[key] = (4, 128009)
    if "tokenizer.ggml.eos_token_id" in e.set:
        e.quirks.append("EOS <|end_of_text|>: <|eot_id|>")
    return e or None


def _gptoss_edits(g, path):
    """gpt-oss: architecture "gptoss" (llama.cpp's is "gpt-oss"), three tensor names, the expert
    FFN size and the gpt-4o pre-tokenizer missing."""
    e = GGUFEdits("gpt-oss")
    e.set["general.architecture"] = (8, "gpt-oss")
    e.rename_keys.append(("gptoss.", "gpt-oss."))
    gate = _tensor(g, "blk.0.ffn_gate_exps.weight")
    if "gptoss.expert_feed_forward_length" not in g.kv and gate and len(gate.shape) > 1:
        e.set["gpt-oss.expert_feed_forward_length"] = (4, gate.shape[1])
    if "gptoss.rope.scaling.type" not in g.kv:
        e.set["gpt-oss.rope.scaling.type"] = (8, "yarn")
    e.set["tokenizer.ggml.pre"] = (8, "gpt-4o")
    e.rename_containing(g, ((".attn_out.", ".attn_output."), (".ffn_norm.", ".post_attention_norm.")))
    e.rename += [(t.name, t.name + ".weight") for t in g.tensors if t.name.endswith(".attn_sinks")]
    e.quirks += ["architecture gptoss: gpt-oss", "tensor names", "pre-tokenizer gpt-4o"]
    return e


def _olmo3_edits(g, path):
    """olmo3: llama.cpp runs it as olmo2 (same tensors; its olmo2 loader has OLMo 3's sliding window)."""
    e = GGUFEdits("olmo3")
    e.set["general.architecture"] = (8, "olmo2")
    e.rename_keys.append(("olmo3.", "olmo2."))
    e.quirks.append("architecture olmo3: olmo2")
    return e


def _lfm2_edits(g, path):
    """lfm2: the last norm is output_norm (llama.cpp: token_embd_norm), and feed_forward_length may
    disagree with ffn_gate's shape."""
    if not _tensor(g, "output_norm.weight") or _tensor(g, "token_embd_norm.weight"):
        return None
    e = GGUFEdits("lfm2")
    e.rename.append(("output_norm.weight", "token_embd_norm.weight"))
    e.set["tokenizer.ggml.pre"] = (8, "lfm2")
    gate = _tensor(g, "blk.0.ffn_gate.weight")
    if gate and len(gate.shape) > 1 and g.get("feed_forward_length") != gate.shape[1]:
        e.set["lfm2.feed_forward_length"] = (4, gate.shape[1])
    e.quirks += ["output_norm: token_embd_norm", "pre-tokenizer lfm2"]
    return e


def _vision_inside_edits(family):
    """A family whose text side only needs the embedded vision tensors hidden (llama4)."""
    def edits(g, path):
        if not any(t.name.startswith(("v.", "mm.")) for t in g.tensors):
            return None
        e = GGUFEdits(family)
        e.hide_prefixes(g, "v.", "mm.")
        e.quirks.append("vision tower in the model file: hidden from the text loader")
        return e
    return edits


#: Ollama's llama4 vision tensor names -> llama.cpp's mmproj names (its compat layer's list; the adapter
#: before the generic .mlp.fc renames).
_LLAMA4_CLIP_RENAMES = (("v.vision_adapter.mlp.fc1", "mm.model.mlp.1"), ("v.vision_adapter.mlp.fc2", "mm.model.mlp.2"),
                        ("mm.linear_1", "mm.model.fc"), ("v.class_embedding", "v.class_embd"),
                        ("v.layernorm_post", "v.post_ln"), ("v.layernorm_pre", "v.pre_ln"),
                        ("v.patch_embedding", "v.patch_embd"), (".attn_output", ".attn_out"), (".attn_norm", ".ln1"),
                        (".ffn_norm", ".ln2"), (".mlp.fc1", ".ffn_up"), (".mlp.fc2", ".ffn_down"))


def _llama4_clip_edits(g, path):
    """llama4 with its vision encoder inside: the same file read as llama.cpp's llama4 mmproj, as Ollama's
    compat layer reads it: keys under clip.* (the pixel-shuffle ratio as a scale factor), names. No
    tensor bytes change, so any engine with the hook reads it. None without a whole tower."""
    if not all("llama4.vision." + k in g.kv for k in ("block_count", "embedding_length", "attention.head_count")) \
            or not _tensor(g, "v.patch_embedding.weight"):
        return None
    e = GGUFEdits("llama4 vision")
    e.copy_keys(g, "llama4.vision.", (("block_count", 4), ("embedding_length", 4), ("feed_forward_length", 4),
                                      ("attention.head_count", 4), ("image_size", 4), ("patch_size", 4)))
    if "llama4.vision.layer_norm_epsilon" in g.kv:
        e.set["clip.vision.attention.layer_norm_epsilon"] = (6, g.kv["llama4.vision.layer_norm_epsilon"])
    e.set["clip.vision.projection_dim"] = (4, g.embedding_length)
    ratio = g.kv.get("llama4.vision.pixel_shuffle_ratio") or 0
    e.set["clip.vision.projector.scale_factor"] = (4, int(round(1 / ratio)) if ratio > 0 else 2)
    e.set_missing(g, "clip.vision.image_mean", 9, (6, [0.5, 0.5, 0.5]))
    e.set_missing(g, "clip.vision.image_std", 9, (6, [0.5, 0.5, 0.5]))
    e.set_missing(g, "clip.has_vision_encoder", 7, True)
    e.set_missing(g, "clip.use_gelu", 7, True)
    e.set["clip.projector_type"] = (8, "llama4")
    e.set["clip.vision.projector_type"] = (8, "llama4")
    e.set["general.architecture"] = (8, "clip")
    if _tensor(g, "v.positional_embedding_vlm"):
        e.rename.append(("v.positional_embedding_vlm", "v.position_embd.weight"))
    e.rename_containing(g, _LLAMA4_CLIP_RENAMES, ("v.", "mm."))
    e.hide += [t.name for t in g.tensors if not t.name.startswith(("v.", "mm."))]
    e.quirks.append("vision encoder read as a llama4 projector")
    return e


def _gemma3n_edits(g, path):
    """gemma3n: token_embd and the tokenizer hold the multimodal vocabulary, per_layer_token_embd only
    the text one (llama.cpp wants both alike: both read as the text vocabulary, a prefix of rows), the
    tokenizer model, byte and unused token types, and <end_of_turn> among the EOS ids."""
    embd, per_layer = _tensor(g, "token_embd.weight"), _tensor(g, "per_layer_token_embd.weight")
    if not embd or not per_layer or len(embd.shape) < 2 or len(per_layer.shape) < 2 \
            or embd.shape[1] == per_layer.shape[1]:
        return None
    rows = per_layer.shape[1]
    e = GGUFEdits("gemma3n")
    e.set["tokenizer.ggml.model"] = (8, "llama")
    e.shape.append(("token_embd.weight", [embd.shape[0], rows]))
    full = read_gguf(path)
    tokens, types = full.kv.get("tokenizer.ggml.tokens") or [], full.kv.get("tokenizer.ggml.token_type") or []
    e.truncate["tokenizer.ggml.tokens"] = e.truncate["tokenizer.ggml.scores"] = rows
    fixed = [6 if len(t) == 6 and t.startswith("<0x") and t.endswith(">") else 1 if t.startswith("<unused") else k
             for t, k in zip(tokens[:rows], types[:rows])]
    e.set["tokenizer.ggml.token_type"] = (9, (5, fixed))
    eos = full.kv.get("tokenizer.ggml.eos_token_ids")
    e.set["tokenizer.ggml.eos_token_ids"] = (9, (5, list(eos) + ([106] if 106 not in eos else []) if eos else [1, 106]))
    e.hide_prefixes(g, "v.", "mm.", "a.")
    e.quirks += ["vocabulary cut to per_layer_token_embd's %d rows" % rows, "token types", "EOS ids"]
    return e


def _gemma4_edits(g, path):
    """gemma4: the tokenizer named llama where llama.cpp wants gemma4 (its BPE; else the control
    tokens come out as text), the per-expert scale under another name, and the audio and vision towers
    inside (hidden: text only). Split expert gate/up tensors are left split, which llama.cpp reads."""
    inside = ("a.", "v.", "mm.", "model.vision_tower.")
    if not any(t.name.startswith(inside) for t in g.tensors) and g.kv.get("tokenizer.ggml.model") != "llama":
        return None
    e = GGUFEdits("gemma4")
    if g.kv.get("tokenizer.ggml.model") == "llama":
        e.set["tokenizer.ggml.model"] = (8, "gemma4")
        e.quirks.append("tokenizer llama: gemma4")
    e.rename_containing(g, ((".ffn_gate_inp.per_expert_scale", ".ffn_down_exps.scale"),))
    e.hide_prefixes(g, *inside)
    e.quirks.append("audio and vision towers hidden")
    return e


def _gemma4_clip_edits(g, path):
    """gemma4 with its vision tower inside (under llama.cpp's names already): the same file read as
    llama.cpp's gemma4v projector, as Ollama's compat layer reads it: keys under clip.* (Gemma 4's
    fixed 224 image size, mean 0 and std 1), patch_embd as F32 (a data edit: Metal's im2col needs it).
    The audio tower stays hidden (not translated). None without a whole vision tower."""
    if not all("gemma4.vision." + k in g.kv for k in ("block_count", "embedding_length", "attention.head_count")) \
            or not _tensor(g, "v.patch_embd.weight"):
        return None
    e = GGUFEdits("gemma4 vision")
    e.copy_keys(g, "gemma4.vision.", (("block_count", 4), ("embedding_length", 4), ("feed_forward_length", 4),
                                      ("attention.head_count", 4), ("attention.layer_norm_epsilon", 6),
                                      ("patch_size", 4)))
    e.set_missing(g, "clip.vision.image_size", 4, 224)
    e.set["clip.vision.projection_dim"] = (4, g.embedding_length)
    e.set_missing(g, "clip.vision.image_mean", 9, (6, [0.0, 0.0, 0.0]))
    e.set_missing(g, "clip.vision.image_std", 9, (6, [1.0, 1.0, 1.0]))
    e.set_missing(g, "clip.has_vision_encoder", 7, True)
    e.set["clip.vision.projector_type"] = (8, "gemma4v")
    e.set["general.architecture"] = (8, "clip")
    patch = _tensor(g, "v.patch_embd.weight")
    if patch.type in (1, 30):
        e.data.append(("v.patch_embd.weight", 0, patch.shape, "f32 of %s" % GGML_TYPES[patch.type], _as_f32(patch)))
    e.hide += [t.name for t in g.tensors if not t.name.startswith(("v.", "mm.")) or t.name.startswith("mm.a.")]
    e.quirks.append("vision tower read as a gemma4v projector (audio not translated)")
    return e


def _deepseekocr_edits(g, path):
    """deepseek-ocr: architecture deepseekocr (llama.cpp: deepseek2-ocr), the RMS epsilon and expert
    sizes missing, and the SAM, vision and projector towers inside (hidden: text only)."""
    e = GGUFEdits("deepseek-ocr")
    e.set["general.architecture"] = (8, "deepseek2-ocr")
    e.rename_keys.append(("deepseekocr.", "deepseek2-ocr."))
    if "deepseekocr.attention.layer_norm_rms_epsilon" not in g.kv:
        e.set["deepseek2-ocr.attention.layer_norm_rms_epsilon"] = (6, 1e-6)
    down, shared = _tensor(g, "blk.1.ffn_down_exps.weight"), _tensor(g, "blk.1.ffn_down_shexp.weight")
    per_expert = g.kv.get("deepseekocr.expert_feed_forward_length") or (down.shape[0] if down else 0)
    if "deepseekocr.expert_feed_forward_length" not in g.kv and per_expert:
        e.set["deepseek2-ocr.expert_feed_forward_length"] = (4, per_expert)
    if "deepseekocr.expert_shared_count" not in g.kv and shared and per_expert:
        e.set["deepseek2-ocr.expert_shared_count"] = (4, shared.shape[0] // per_expert)
    e.hide_prefixes(g, "s.", "v.", "mm.")
    e.quirks += ["architecture deepseekocr: deepseek2-ocr", "expert sizes", "SAM and vision hidden"]
    return e


def _mistral3_edits(g, path):
    """mistral3 (text): YaRN keys under other names, the tekken pre-tokenizer missing, and the vision
    tower inside the file (hidden from the text loader; _mistral3_clip_edits reads it as the projector)."""
    has_vision = any(t.name.startswith(("v.", "mm.")) for t in g.tensors)
    renamed = (("rope.scaling.beta_fast", "rope.scaling.yarn_beta_fast"),
               ("rope.scaling.beta_slow", "rope.scaling.yarn_beta_slow"),
               ("rope.scaling.mscale_all_dim", "rope.scaling.yarn_log_multiplier"),
               ("rope.scaling_beta", "attention.temperature_scale"))
    if not has_vision and not any("mistral3." + old in g.kv for old, _new in renamed):
        return None
    e = GGUFEdits("mistral3")
    for old, new in renamed:
        if "mistral3." + old in g.kv:
            e.set["mistral3." + new] = (6, g.kv["mistral3." + old])
            e.quirks.append("mistral3.%s read as mistral3.%s" % (old, new))
    if g.kv.get("tokenizer.ggml.pre", "default") in ("", "default"):
        e.set["tokenizer.ggml.pre"] = (8, "tekken")
        e.quirks.append("pre-tokenizer tekken")
    e.hide_prefixes(g, "v.", "mm.")
    return e


#: Ollama's mistral3 vision tensor names -> llama.cpp's pixtral mmproj names (its compat layer's list).
_MISTRAL3_CLIP_RENAMES = (("v.patch_conv", "v.patch_embd"), ("v.encoder_norm", "v.pre_ln"),
                          (".attn_output", ".attn_out"), (".attn_norm", ".ln1"), (".ffn_norm", ".ln2"),
                          ("mm.linear_1", "mm.1"), ("mm.linear_2", "mm.2"),
                          ("mm.patch_merger.merging_layer", "mm.patch_merger"), ("mm.norm", "mm.input_norm"))


def _mistral3_clip_edits(g, path):
    """mistral3 with its Pixtral tower inside: the same file read as llama.cpp's pixtral mmproj, as
    Ollama's compat layer reads it. Keys copied under clip.*, Pixtral's CLIP image mean and std, SiLU;
    data edits: vision Q/K read as the file's rows in llama.cpp's RoPE order (Ollama's converter
    permutes only the text side's), and computed into the data file patch_embd as F32 (llama.cpp's
    converter writes it so; Metal's im2col needs it) and v.token_embd.img_break, which the files lack,
    as zeros in output_norm's place (the [IMG_BREAK] row added after each image row then adds nothing). None
    without a whole tower (its keys and patch_conv): the model then runs text only."""
    if "mistral3.vision.block_count" not in g.kv or not _tensor(g, "v.patch_conv.weight"):
        return None
    e = GGUFEdits("mistral3 vision")
    for key in ("block_count", "embedding_length", "feed_forward_length", "attention.head_count",
                "image_size", "patch_size", "num_channels"):
        if "mistral3.vision." + key in g.kv:
            e.set["clip.vision." + key] = (4, g.kv["mistral3.vision." + key])
    if "mistral3.spatial_merge_size" in g.kv:
        e.set["clip.vision.spatial_merge_size"] = (4, g.kv["mistral3.spatial_merge_size"])
    if "mistral3.vision.rope.freq_base" in g.kv:
        e.set["clip.rope.freq_base"] = (6, g.kv["mistral3.vision.rope.freq_base"])
    e.set["clip.vision.projection_dim"] = (4, g.embedding_length)
    e.set_missing(g, "clip.vision.attention.layer_norm_epsilon", 6, 1e-5)
    e.set_missing(g, "clip.vision.image_mean", 9, (6, [0.48145467, 0.4578275, 0.40821072]))
    e.set_missing(g, "clip.vision.image_std", 9, (6, [0.26862955, 0.26130259, 0.2757771]))
    e.set_missing(g, "clip.has_vision_encoder", 7, True)
    e.set_missing(g, "clip.use_silu", 7, True)
    e.set["clip.projector_type"] = (8, "pixtral")
    e.set["general.architecture"] = (8, "clip")
    n_head = g.kv.get("mistral3.vision.attention.head_count") or 0
    for t in g.tensors:
        if t.name.startswith("v.blk.") and t.name.endswith((".attn_q.weight", ".attn_k.weight")) and n_head \
                and len(t.shape) == 2 and t.shape[1] % (2 * n_head) == 0 and t.type in GGML_BLOCKS:
            e.data.append((t.name, t.type, t.shape, "rope order", _ranges(g, t, _rope_order(t.shape[1], n_head))))
    patch = _tensor(g, "v.patch_conv.weight")
    if patch and patch.type in (1, 30):
        e.data.append(("v.patch_embd.weight", 0, patch.shape, "f32 of %s" % GGML_TYPES[patch.type], _as_f32(patch)))
    e.rename_containing(g, _MISTRAL3_CLIP_RENAMES, ("v.", "mm."))
    kept = ()
    if _tensor(g, "output_norm.weight") and not _tensor(g, "v.token_embd.img_break") and g.embedding_length:
        e.rename.append(("output_norm.weight", "v.token_embd.img_break"))
        e.data.append(("v.token_embd.img_break", 0, [g.embedding_length], "zeros", _zeros(4 * g.embedding_length)))
        kept = ("output_norm.weight",)
    e.hide += [t.name for t in g.tensors if not t.name.startswith(("v.", "mm.")) and t.name not in kept]
    e.quirks.append("vision tower read as a pixtral projector (%d tensors recomputed)" % len(e.data))
    return e


def _qwen25vl_edits(g, path):
    """qwen2.5-vl: llama.cpp runs it as qwen2vl, with mrope_section's three sizes as four
    dimension_sections; the vision tower inside is hidden (_qwen25vl_clip_edits reads it as the projector)."""
    e = GGUFEdits("qwen2.5-vl")
    e.set["general.architecture"] = (8, "qwen2vl")
    e.rename_keys.append(("qwen25vl.", "qwen2vl."))
    sections = read_gguf(path, 16).kv.get("qwen25vl.rope.mrope_section") or []     # `g` skips arrays
    if len(sections) >= 3:
        e.set["qwen2vl.rope.dimension_sections"] = (9, (5, list(sections[:3]) + [0]))
    e.hide_prefixes(g, "v.", "mm.")
    e.quirks += ["architecture qwen25vl: qwen2vl", "M-RoPE sections"]
    return e


def _qwen25vl_clip_edits(g, path):
    """qwen2.5-vl with its vision tower inside: the same file read as llama.cpp's qwen2.5vl_merger
    mmproj, as Ollama's compat layer reads it. Keys under clip.* (the window-attention pattern from the
    first full-attention block, the FFN size from ffn_up's shape), CLIP's image mean and std, the merger
    and the two temporal patch embeddings under llama.cpp's names, those two as F32 (data edits:
    llama.cpp's converter writes them so; Metal's im2col needs it). None without a whole tower."""
    if not all("qwen25vl.vision." + k in g.kv for k in ("block_count", "embedding_length", "attention.head_count")) \
            or not _tensor(g, "v.patch_embd_0.weight"):
        return None
    e = GGUFEdits("qwen2.5-vl vision")
    e.copy_keys(g, "qwen25vl.vision.", (("attention.head_count", 4), ("block_count", 4), ("embedding_length", 4),
                                        ("num_channels", 4), ("patch_size", 4), ("spatial_merge_size", 4),
                                        ("window_size", 4), ("attention.layer_norm_epsilon", 6)))
    e.set["clip.vision.projection_dim"] = (4, g.embedding_length)
    up = _tensor(g, "v.blk.0.ffn_up.weight")
    if up and len(up.shape) > 1:
        e.set["clip.vision.feed_forward_length"] = (4, up.shape[1])
    full = read_gguf(path, 64).kv.get("qwen25vl.vision.fullatt_block_indexes") or []    # `g` skips arrays
    e.set["clip.vision.n_wa_pattern"] = (4, full[0] + 1 if full else 8)
    e.set_missing(g, "clip.vision.image_size", 4, 560)             # Qwen2VLVisionModel's default
    e.set_missing(g, "clip.vision.image_mean", 9, (6, [0.48145466, 0.4578275, 0.40821073]))
    e.set_missing(g, "clip.vision.image_std", 9, (6, [0.26862954, 0.26130258, 0.27577711]))
    e.set_missing(g, "clip.has_vision_encoder", 7, True)
    e.set_missing(g, "clip.use_silu", 7, True)
    e.set["clip.projector_type"] = (8, "qwen2.5vl_merger")
    e.set["general.architecture"] = (8, "clip")
    renames = {"v.merger.ln_q.weight": "v.post_ln.weight", "v.merger.mlp.0.weight": "mm.0.weight",
               "v.merger.mlp.0.bias": "mm.0.bias", "v.merger.mlp.2.weight": "mm.2.weight",
               "v.merger.mlp.2.bias": "mm.2.bias", "v.patch_embd_0.weight": "v.patch_embd.weight",
               "v.patch_embd_1.weight": "v.patch_embd.weight.1"}
    e.rename += [(t.name, renames[t.name]) for t in g.tensors if t.name in renames]
    for t in g.tensors:
        if t.name.startswith("v.patch_embd_") and t.type in (1, 30):
            e.data.append((renames[t.name], 0, t.shape, "f32 of %s" % GGML_TYPES[t.type], _as_f32(t)))
    e.hide += [t.name for t in g.tensors if not t.name.startswith(("v.", "mm."))]
    e.quirks.append("vision tower read as a qwen2.5vl_merger projector")
    return e


def _qwen3vl_edits(g, path):
    """qwen3-vl and qwen3-vl-moe: M-RoPE sections and the deepstack layer count missing (Ollama's
    compat layer uses Qwen3-VL's [24, 20, 20, 0]); the vision tower inside is hidden."""
    arch = g.architecture
    if arch + ".rope.dimension_sections" in g.kv:
        return None
    e = GGUFEdits(arch)
    e.set[arch + ".rope.dimension_sections"] = (9, (5, [24, 20, 20, 0]))
    e.set_missing(g, arch + ".n_deepstack_layers", 4, _array_length(g, arch + ".vision.deepstack_visual_indexes"))
    e.hide_prefixes(g, "v.", "mm.")
    e.quirks += ["M-RoPE sections missing: [24, 20, 20, 0]", "deepstack layer count missing"]
    return e


def _qwen3vl_clip_edits(g, path):
    """qwen3-vl, qwen3-vl-moe, qwen3.5 and qwen3.5-moe with the vision tower inside (the same tower;
    qwen3.5's without deepstack mergers or image pixel limits): the same file read as llama.cpp's
    qwen3vl_merger mmproj, as Ollama's compat layer reads it. Keys under clip.* (the FFN size from
    ffn_up's shape, the image size from the position embeddings), tensor names (merger, deepstack
    mergers at their block's index), and data edits: each block's Q, K and V rows as one attn_qkv (one
    type: the file's bytes, one range after another; mixed: widened to F32, as Ollama does, into the
    data file), the Conv3D patch embedding split
    into llama.cpp's two per-frame Conv2D kernels as F32 (the second in block 0's attn_k's place, freed
    by the merge) and the position embeddings as F32. None without a whole tower."""
    arch, v = g.architecture, g.architecture + ".vision."
    patch = _tensor(g, "v.patch_embed.weight")
    if not all(v + k in g.kv for k in ("block_count", "embedding_length", "attention.head_count")) or not patch \
            or len(patch.shape) != 4 or patch.shape[2] != 2 or patch.type not in (0, 1, 30, 8):
        return None
    full = read_gguf(path, 4096).kv                    # `g` skips arrays: deepstack indexes, mean, std
    e = GGUFEdits(arch + " vision")
    e.copy_keys(g, v, (("attention.head_count", 4), ("block_count", 4), ("embedding_length", 4),
                       ("feed_forward_length", 4), ("num_channels", 4), ("patch_size", 4),
                       ("spatial_merge_size", 4), ("temporal_patch_size", 4), ("attention.layer_norm_epsilon", 6),
                       ("rope.freq_base", 6)))
    for key, vtype, value in (("num_channels", 4, 3), ("temporal_patch_size", 4, 2), ("rope.freq_base", 6, 1e4),
                              ("attention.layer_norm_epsilon", 6, 1e-6)):
        e.set.setdefault("clip.vision." + key, (vtype, value))
    e.set["clip.vision.projection_dim"] = (4, g.embedding_length)
    up = _tensor(g, "v.blk.0.mlp.linear_fc1.weight")
    if "clip.vision.feed_forward_length" not in e.set and up and len(up.shape) > 1:
        e.set["clip.vision.feed_forward_length"] = (4, up.shape[1])
    pos = _tensor(g, "v.pos_embed.weight")
    if pos and len(pos.shape) > 1 and v + "patch_size" in g.kv:
        e.set["clip.vision.image_size"] = (4, int(math.isqrt(pos.shape[1])) * g.kv[v + "patch_size"])
    for key, fallback in (("image_mean", [0.5, 0.5, 0.5]), ("image_std", [0.5, 0.5, 0.5])):
        e.set["clip.vision." + key] = (9, (6, list(full.get(v + key) or fallback)))
    for key, clip_key, fallback in (("shortest_edge", "image_min_pixels", 65536),
                                    ("longest_edge", "image_max_pixels", 16777216)):
        if arch.startswith("qwen3vl"):                 # qwen3.5: llama.cpp's own limits, as Ollama leaves them
            e.set["clip.vision." + clip_key] = (4, g.kv.get(v + key) or fallback)
    e.set_missing(g, "clip.has_vision_encoder", 7, True)
    e.set_missing(g, "clip.use_gelu", 7, True)
    e.set["clip.projector_type"] = (8, "qwen3vl_merger")
    e.set["general.architecture"] = (8, "clip")
    freed = set()
    for b in range(g.kv[v + "block_count"]):
        for kind in ("weight", "bias"):
            parts = [_tensor(g, "v.blk.%d.attn_%s.%s" % (b, x, kind)) for x in "qkv"]
            if not all(parts) or len({tuple(t.shape[:-1]) for t in parts}) != 1 \
                    or not all(t.type in GGML_BLOCKS for t in parts):
                continue
            mixed = len({t.type for t in parts}) > 1
            if mixed and not all(t.type in (0, 1, 30, 8) for t in parts):
                continue
            merged = "v.blk.%d.attn_qkv.%s" % (b, kind)
            shape = parts[0].shape[:-1] + [sum(t.shape[-1] for t in parts)]
            e.rename.append((parts[0].name, merged))
            e.data.append((merged, 0 if mixed else parts[0].type, shape, "qkv as F32" if mixed else "qkv",
                           _widened(parts) if mixed else [r for t in parts for r in _ranges(g, t)]))
            freed |= {parts[1].name, parts[2].name}
    width, height, frames, packed = patch.shape
    channels = e.set["clip.vision.num_channels"][1]
    kernel = [width, height, channels, packed // channels]
    e.rename.append(("v.patch_embed.weight", "v.patch_embd.weight"))
    e.data.append(("v.patch_embd.weight", 0, kernel, "frame 0", _temporal_slice(patch, 0)))
    if "v.blk.0.attn_k.weight" in freed:                # no spare slot otherwise: the engine adds no tensors
        e.rename.append(("v.blk.0.attn_k.weight", "v.patch_embd.weight.1"))
        e.data.append(("v.patch_embd.weight.1", 0, kernel, "frame 1", _temporal_slice(patch, 1)))
        freed.discard("v.blk.0.attn_k.weight")
    names = {"v.merger.norm.": "v.post_ln.", "v.merger.linear_fc1.": "mm.0.", "v.merger.linear_fc2.": "mm.2.",
             "v.patch_embed.bias": "v.patch_embd.bias", "v.pos_embed.weight": "v.position_embd.weight"}
    indexes = full.get(v + "deepstack_visual_indexes") or []
    for i, block in enumerate(indexes):
        for leaf, new in (("norm", "norm"), ("linear_fc1", "fc1"), ("linear_fc2", "fc2")):
            names["v.deepstack_merger.%d.%s." % (i, leaf)] = "v.deepstack.%d.%s." % (block, new)
    renamed = {old for old, _new in e.rename}
    for t in g.tensors:
        if t.name in renamed or not t.name.startswith("v."):
            continue
        new = next((t.name.replace(old, to, 1) for old, to in names.items() if t.name.startswith(old)), t.name)
        for old, to in ((".norm1.", ".ln1."), (".norm2.", ".ln2."), (".mlp.linear_fc1.", ".ffn_up."),
                        (".mlp.linear_fc2.", ".ffn_down.")):
            new = new.replace(old, to, 1) if new.startswith("v.blk.") else new
        if new != t.name:
            e.rename.append((t.name, new))
    if pos and pos.type in (1, 30):
        e.data.append(("v.position_embd.weight", 0, pos.shape, "f32 of %s" % GGML_TYPES[pos.type], _as_f32(pos)))
    e.hide += [t.name for t in g.tensors if not t.name.startswith(("v.", "mm.")) or t.name in freed]
    e.quirks.append("vision tower read as a qwen3vl_merger projector")
    return e


def _qwen3next_edits(g, path):
    """qwen3-next: per-layer KV head counts (llama.cpp takes one: the largest) and the SSM dt tensors
    without their .bias suffix."""
    dt = [t.name for t in g.tensors if t.name.endswith(".ssm_dt")]
    if not dt:
        return None
    e = GGUFEdits("qwen3-next")
    counts = read_gguf(path).kv.get("qwen3next.attention.head_count_kv")
    if isinstance(counts, list) and max(counts or [0]) > 0:
        e.remove.append("qwen3next.attention.head_count_kv")
        e.set["qwen3next.attention.head_count_kv"] = (4, max(counts))
    e.rename += [(name, name + ".bias") for name in dt]
    e.quirks += ["per-layer KV heads: the largest", "ssm_dt: ssm_dt.bias"]
    return e


def _qwen35_edits(g, path):
    """qwen3.5 and qwen3.5-moe (text): per-layer KV head counts (the largest), M-RoPE sections as three
    not four, the SSM dt tensors without .bias, and the vision tower and multi-token-prediction layers
    inside (hidden: the model runs without its MTP draft; _qwen3vl_clip_edits reads the tower as the
    projector)."""
    arch = g.architecture
    markers = [k for k in ("vision.block_count", "image_token_id", "ssm.v_head_reordered", "rope.mrope_interleaved")
               + (("feed_forward_length",) if arch == "qwen35moe" else ()) if "%s.%s" % (arch, k) in g.kv]
    if not markers and not any(t.name.startswith(("mtp.", "v.")) for t in g.tensors):
        return None
    e = GGUFEdits(arch)
    full = read_gguf(path, 4096)                           # the small arrays: head counts, sections
    counts = full.kv.get(arch + ".attention.head_count_kv")
    if isinstance(counts, list):
        e.set[arch + ".attention.head_count_kv"] = (4, max(counts or [0]) or 2)
    sections = full.kv.get(arch + ".rope.dimension_sections")
    if isinstance(sections, list) and len(sections) == 3:
        e.set[arch + ".rope.dimension_sections"] = (9, (5, list(sections) + [0]))
    e.rename += [(t.name, t.name + ".bias") for t in g.tensors if t.name.endswith(".ssm_dt")]
    e.hide_prefixes(g, "v.", "mm.", "mtp.")
    e.quirks += ["per-layer KV heads", "M-RoPE sections", "ssm_dt: ssm_dt.bias", "vision and MTP hidden"]
    return e


def _laguna_edits(g, path):
    """laguna: sliding-window RoPE keys under rope.swa.*, the attention gate named attn_g, and YaRN's
    magnitude (1 + 0.1 ln factor) written as rope.scaling.attn_factor, which llama.cpp reads as a
    further multiplier on top of the magnitude its rope applies itself (so the full-attention layers
    would get it twice; llama.cpp's converter writes the config's factor only as yarn_attn_factor,
    which its Laguna loader does not read)."""
    gates = [t.name for t in g.tensors if t.name.endswith(".attn_g.weight")]
    if not gates and "laguna.rope.swa.dimension_count" not in g.kv and "laguna.rope.swa.freq_base" not in g.kv:
        return None
    e = GGUFEdits("laguna")
    for old, new, vtype in (("rope.swa.dimension_count", "rope.dimension_count_swa", 4),
                            ("rope.swa.freq_base", "rope.freq_base_swa", 6)):
        if "laguna." + old in g.kv:
            e.set["laguna." + new] = (vtype, g.kv["laguna." + old])
    e.rename += [(name, name[:-len(".attn_g.weight")] + ".attn_gate.weight") for name in gates]
    e.quirks += ["rope.swa.* keys", "attn_g: attn_gate"]
    if "laguna.rope.scaling.attn_factor" in g.kv:
        e.remove.append("laguna.rope.scaling.attn_factor")
        e.quirks.append("YaRN attention factor not applied twice")
    return e


def _embeddinggemma_edits(g, path):
    """embeddinggemma (a gemma3 file with dense.* tensors): llama.cpp's gemma-embedding, its dense
    sizes from the tensors, three tensor names."""
    d0, d1 = _tensor(g, "dense.0.weight"), _tensor(g, "dense.1.weight")
    e = GGUFEdits("embeddinggemma")
    e.set["general.architecture"] = (8, "gemma-embedding")
    e.remove += ["gemma3.attention.causal", "gemma3.attention.sliding_window_pattern"]
    e.rename_keys.append(("gemma3.", "gemma-embedding."))
    if "gemma3.rope.freq_base_swa" not in g.kv:
        e.set["gemma-embedding.rope.freq_base_swa"] = (6, 10000.0)
    if d0 and d1 and len(d0.shape) > 1 and len(d1.shape) > 1:
        for key, value in (("dense_2_feat_in", d0.shape[0]), ("dense_2_feat_out", d0.shape[1]),
                           ("dense_3_feat_in", d1.shape[0]), ("dense_3_feat_out", d1.shape[1])):
            e.set["gemma-embedding." + key] = (4, value)
    e.rename += [(old, new) for old, new in (("dense.0.weight", "dense_2.weight"), ("dense.1.weight", "dense_3.weight"),
                                             ("norm.weight", "output_norm.weight")) if _tensor(g, old)]
    e.quirks += ["architecture gemma3: gemma-embedding", "dense and norm tensor names"]
    return e


def _gemma3_family_edits(g, path):
    """gemma3 files: embeddinggemma when they carry its dense.* tensors, else gemma3's own."""
    return (_embeddinggemma_edits if _tensor(g, "dense.0.weight") else _gemma3_edits)(g, path)


def _snowflake_edits(g, path):
    """snowflake-arctic-embed2 (bert with a t5 tokenizer): its precompiled charsmap as one base64
    character per string, where llama.cpp reads the decoded bytes."""
    if g.kv.get("tokenizer.ggml.model") != "t5" or "tokenizer.ggml.precompiled_charsmap" not in g.array_lengths \
            and not isinstance(g.kv.get("tokenizer.ggml.precompiled_charsmap"), list):
        return None
    chars = read_gguf(path).kv.get("tokenizer.ggml.precompiled_charsmap") or []
    if not chars or not all(isinstance(c, str) and len(c) == 1 for c in chars):
        return None
    try:
        data = base64.b64decode("".join(chars), validate=True)
    except ValueError:
        return None
    e = GGUFEdits("snowflake-arctic-embed2")
    e.set["tokenizer.ggml.precompiled_charsmap"] = (9, (0, list(data)))
    e.quirks.append("precompiled charsmap decoded from base64")
    return e


def _glm4moelite_edits(g, path):
    """glm-4.7-flash (glm4moelite): llama.cpp runs it as deepseek2 with MLA's absorbed key/value sizes,
    per-head sizes in the *_mla keys, expert groups of one, the glm4 pre-tokenizer, and EOT/EOM taken
    from eos_token_ids."""
    e = GGUFEdits("glm-4.7-flash")
    e.set["general.architecture"] = (8, "deepseek2")
    e.rename_keys.append(("glm4moelite.", "deepseek2."))
    e.set["deepseek2.attention.head_count_kv"] = (4, 1)
    kv_lora, rope = g.kv.get("glm4moelite.attention.kv_lora_rank"), g.kv.get("glm4moelite.rope.dimension_count")
    if kv_lora is not None and rope is not None:
        e.set["deepseek2.attention.key_length"] = (4, kv_lora + rope)
        e.set["deepseek2.attention.value_length"] = (4, kv_lora)
    # the per-head sizes: K's in key_length, V's in value_length (Ollama's compat layer takes K's for
    # both, which holds for GLM-4.7-Flash, 256 and 256, and breaks a model whose V head is smaller)
    k_head = g.kv.get("glm4moelite.attention.key_length")
    v_head = g.kv.get("glm4moelite.attention.value_length", k_head)
    if k_head is not None:
        e.set["deepseek2.attention.key_length_mla"] = (4, k_head)
        e.set["deepseek2.attention.value_length_mla"] = (4, v_head)
    for key in ("expert_group_count", "expert_group_used_count"):
        if "glm4moelite." + key not in g.kv:
            e.set["deepseek2." + key] = (4, 1)
    e.set["tokenizer.ggml.pre"] = (8, "glm4")
    ids = [i for i in read_gguf(path, 64).kv.get("tokenizer.ggml.eos_token_ids") or [] if i >= 0]
    for key, index in (("tokenizer.ggml.eot_token_id", 1), ("tokenizer.ggml.eom_token_id", 2)):
        if key not in g.kv and len(ids) > index:
            e.set[key] = (4, ids[index])
    e.quirks += ["architecture glm4moelite: deepseek2 (MLA sizes)", "pre-tokenizer glm4"]
    return e


def _glmocr_edits(g, path):
    """glm-ocr (glmocr): llama.cpp runs it as glm4, with mrope_section's three sizes as four
    dimension_sections, the RoPE width from key_length and partial_rotary_factor, the chatglm-bpe
    pre-tokenizer and its own names for three tensors. llama.cpp's glm4 reads each block's FFN as one
    ffn_up of gate rows then up rows ([n_embd, 2*n_ff]), which Ollama stores as ffn_gate and ffn_up with
    ffn_norm between them (its converter sorts a block's tensors by name): no single byte range of the
    blob is the fused tensor, so the fused ones are written once to the view's second split (about a
    third of the text weights; halves of two types are widened to F32, and a type that cannot be is
    refused in words as the view is written). The vision tower inside is hidden from the text loader
    (_glmocr_clip_edits reads it)."""
    e = GGUFEdits("glm-ocr")
    e.set["general.architecture"] = (8, "glm4")
    e.rename_keys.append(("glmocr.", "glm4."))
    sections = read_gguf(path, 16).kv.get("glmocr.rope.mrope_section") or []     # `g` skips arrays
    if len(sections) == 3:
        e.set["glm4.rope.dimension_sections"] = (9, (5, list(sections) + [0]))
    if "glmocr.rope.dimension_count" not in g.kv and "glmocr.attention.key_length" in g.kv:
        # as Ollama's converter now writes it for llama.cpp (its compat layer takes key_length alone:
        # the same for GLM-OCR, whose factor is 1 and whose sections cover half of each 128-wide head)
        factor = g.kv.get("glmocr.rope.partial_rotary_factor") or 1.0
        e.set["glm4.rope.dimension_count"] = (4, int(g.kv["glmocr.attention.key_length"] * factor))
    if g.kv.get("tokenizer.ggml.pre", "chatglm-bpe") != "chatglm-bpe":
        e.set["tokenizer.ggml.pre"] = (8, "chatglm-bpe")
    e.rename_containing(g, [(".attn_out.", ".attn_output."), (".post_attn_norm.", ".post_attention_norm."),
                            (".post_ffn_norm.", ".post_ffw_norm.")], ("blk.",))
    for b in range(g.kv.get("glmocr.block_count") or 0):
        gate, up = _tensor(g, "blk.%d.ffn_gate.weight" % b), _tensor(g, "blk.%d.ffn_up.weight" % b)
        if gate is None or up is None or gate.shape != up.shape or len(gate.shape) != 2:
            continue                                  # not two halves: the engine names the tensor it refuses
        shape = [gate.shape[0], 2 * gate.shape[1]]
        if gate.type == up.type and gate.type in GGML_BLOCKS:
            e.split.append((up.name, gate.type, shape, "gate rows then up rows", _joined([gate, up])))
        else:                                         # halves of two types: one type for the whole, F32
            e.split.append((up.name, 0, shape, "gate rows then up rows as F32", _widened([gate, up])))
        e.hide += [gate.name, up.name]
    e.hide_prefixes(g, "v.", "mm.")
    e.quirks += ["architecture glmocr: glm4", "M-RoPE sections", "FFN gate and up fused (%d tensors written)"
                 % len(e.split)]
    return e


def _glmocr_clip_edits(g, path):
    """glm-ocr with its vision tower inside: the same file read as llama.cpp's glm4v mmproj, as Ollama's
    compat layer reads it: the glmocr.vision.* keys under clip.*, the two temporal patch embeddings
    under llama.cpp's names (patch_embd_0/_1 -> .weight/.weight.1) and, when F16 or BF16, as F32 (data
    edits), the text model hidden. The tower's other names are llama.cpp's already. None without a
    whole tower."""
    if not all("glmocr.vision." + k in g.kv for k in ("block_count", "embedding_length", "attention.head_count")) \
            or not _tensor(g, "v.patch_embd_0.weight"):
        return None
    e = GGUFEdits("glm-ocr vision")
    for ours, theirs, vtype in (("block_count", "block_count", 4), ("embedding_length", "embedding_length", 4),
                                ("intermediate_size", "feed_forward_length", 4),
                                ("attention.head_count", "attention.head_count", 4),
                                ("attention.layer_norm_rms_epsilon", "attention.layer_norm_epsilon", 6),
                                ("image_size", "image_size", 4), ("patch_size", "patch_size", 4),
                                ("spatial_merge_size", "spatial_merge_size", 4),
                                ("out_hidden_size", "projection_dim", 4)):
        if "glmocr.vision." + ours in g.kv:
            e.set["clip.vision." + theirs] = (vtype, g.kv["glmocr.vision." + ours])
    arrays = read_gguf(path, 16).kv                      # `g` skips arrays
    for key in ("image_mean", "image_std"):
        if arrays.get("glmocr.vision." + key):
            e.set["clip.vision." + key] = (9, (6, list(arrays["glmocr.vision." + key])))
    e.set_missing(g, "clip.has_vision_encoder", 7, True)
    e.set_missing(g, "clip.use_silu", 7, True)
    e.set["clip.projector_type"] = (8, "glm4v")
    e.set["general.architecture"] = (8, "clip")
    renames = {"v.patch_embd_0.weight": "v.patch_embd.weight", "v.patch_embd_1.weight": "v.patch_embd.weight.1"}
    e.rename += [(t.name, renames[t.name]) for t in g.tensors if t.name in renames]
    for t in g.tensors:
        if t.name in renames and t.type in (1, 30):      # as F32, as Ollama's compat layer promotes them
            e.data.append((renames[t.name], 0, t.shape, "f32 of %s" % GGML_TYPES[t.type], _as_f32(t)))
    e.hide += [t.name for t in g.tensors if not t.name.startswith(("v.", "mm."))]
    e.quirks.append("vision tower read as a glm4v projector")
    return e


def _nemotron_h_moe_edits(g, path):
    """nemotron (nemotron_h_moe): the latent FFN size missing and its tensors under other names, and
    multi-token-prediction tensors the loader does not claim (hidden)."""
    e = GGUFEdits("nemotron")
    _nemotron_latent_and_mtp(e, g, "nemotron_h_moe.", "nemotron_h_moe.")
    return e or None


def _nemotron_latent_and_mtp(e, g, prefix, arch_prefix):
    """Into `e`: the latent MoE size (from ffn_latent_in's shape, unless `prefix`moe_latent_size is in
    the file) set as `arch_prefix`moe_latent_size, the latent projections under llama.cpp's names, and
    the multi-token-prediction tensors hidden (nemotron_h_moe's loader claims none of them)."""
    latent = [t for t in g.tensors if ".ffn_latent_in" in t.name]
    mtp = [t.name for t in g.tensors if t.name.startswith("mtp.")]
    if latent and prefix + "moe_latent_size" not in g.kv and len(latent[0].shape) > 1:
        e.set[arch_prefix + "moe_latent_size"] = (4, latent[0].shape[1])
    e.rename_containing(g, ((".ffn_latent_in", ".ffn_latent_down"), (".ffn_latent_out", ".ffn_latent_up")))
    e.hide += mtp
    if latent:
        e.quirks.append("latent FFN names and size")
    if mtp:
        e.quirks.append("MTP tensors hidden")


def _nemotron_h_omni_edits(g, path):
    """Nemotron 3 Nano Omni (nemotron_h_omni): one file of the text model, a RADIO vision tower (v.*),
    its projector (mm.*) and a Parakeet audio encoder (a.*). The text side is llama.cpp's nemotron_h_moe
    (nemotron_h when it has no experts) under another architecture name: its keys under that name, the
    towers hidden, and the latent-MoE and MTP fixes nemotron_h_moe's files need. The vision.* and
    audio.* keys are renamed along and ignored (no text key starts so)."""
    experts = g.kv.get("nemotron_h_omni.expert_count") or g.kv.get("nemotron_h_omni.expert_used_count")
    arch = "nemotron_h_moe" if experts else "nemotron_h"
    e = GGUFEdits("nemotron omni")
    e.set["general.architecture"] = (8, arch)
    e.rename_keys.append(("nemotron_h_omni.", arch + "."))
    e.hide_prefixes(g, "v.", "a.", "mm.")
    e.quirks += ["architecture nemotron_h_omni: " + arch, "vision, audio and projector tensors hidden"]
    if experts:
        _nemotron_latent_and_mtp(e, g, "nemotron_h_omni.", arch + ".")
    return e


def _nemotron_h_omni_clip_edits(g, path):
    """Nemotron 3 Nano Omni with its RADIO vision tower inside: the same file read as llama.cpp's
    nemotron_v2_vl projector, as Ollama's compat layer reads it: keys under clip.* (its defaults where
    the file has none), the register tokens as v.class_embd (F32: concatenated with the F32 patches),
    the linear patch embedding read as the conv kernel it is ([p, p, C, n_embd]: the same bytes, so a
    byte range of the file unless BF16, which ggml's im2col does not take), the position table resampled
    to the fixed image's patches (bilinear, corners aligned, as llama.cpp's converter does: a data file),
    the projector's names. The audio encoder stays hidden. None without a whole vision tower."""
    v = "nemotron_h_omni.vision."
    patch = _tensor(g, "v.patch_embd.weight")
    pos = _tensor(g, "v.position_embd") or _tensor(g, "v.position_embd.weight")
    if not all(v + k in g.kv for k in ("block_count", "embedding_length", "attention.head_count")) or not patch \
            or not pos or len(patch.shape) != 2:
        return None
    e = GGUFEdits("nemotron omni vision")
    e.copy_keys(g, v, (("block_count", 4), ("embedding_length", 4), ("feed_forward_length", 4),
                       ("attention.head_count", 4), ("attention.layer_norm_epsilon", 6), ("patch_size", 4),
                       ("image_size", 4), ("num_channels", 4), ("projector.scale_factor", 4)))
    # Ollama's compat layer's defaults, for a file without them (RADIO v2.5-h at 512 pixels)
    n_embd = g.kv.get(v + "embedding_length", 1280)
    for key, vtype, value in (("feed_forward_length", 4, 4 * n_embd), ("attention.layer_norm_epsilon", 6, 1e-6),
                              ("patch_size", 4, 16), ("image_size", 4, 512), ("num_channels", 4, 3),
                              ("projector.scale_factor", 4, 2)):
        if "clip.vision." + key not in e.set:
            e.set["clip.vision." + key] = (vtype, value)
    full = read_gguf(path, 16)
    for key, default in (("image_mean", [0.48145466, 0.4578275, 0.40821073]),
                         ("image_std", [0.26862954, 0.26130258, 0.27577711])):
        e.set["clip.vision." + key] = (9, (6, list(full.kv.get(v + key) or default)))
    if "nemotron_h_omni.embedding_length" in g.kv:          # else mtmd takes it from mm.2's shape
        e.set["clip.vision.projection_dim"] = (4, g.kv["nemotron_h_omni.embedding_length"])
    e.set["clip.has_vision_encoder"] = (7, True)
    e.set["clip.has_audio_encoder"] = (7, False)     # the Parakeet encoder: not translated
    e.set["clip.use_gelu"] = (7, True)
    e.set["clip.vision.projector_type"] = (8, "nemotron_v2_vl")
    e.set["general.architecture"] = (8, "clip")
    p, channels = e.set["clip.vision.patch_size"][1], e.set["clip.vision.num_channels"][1]
    side = e.set["clip.vision.image_size"][1] // p
    if patch.shape[0] != p * p * channels:
        return None
    kernel = [p, p, channels, patch.shape[1]]
    if patch.type in (0, 1):
        e.data.append(("v.patch_embd.weight", patch.type, kernel, "bytes", _ranges(g, patch)))
    else:
        e.data.append(("v.patch_embd.weight", 0, kernel, "f32 of %s" % GGML_TYPES[patch.type], _as_f32(patch)))
    cls = _tensor(g, "v.cls_embd")
    if cls:
        e.rename.append(("v.cls_embd", "v.class_embd"))
        if cls.type != 0:
            e.data.append(("v.class_embd", 0, cls.shape, "f32 of %s" % GGML_TYPES[cls.type], _as_f32(cls)))
    if pos.name != "v.position_embd.weight":
        e.rename.append((pos.name, "v.position_embd.weight"))
    grid = int(round(math.sqrt(pos.shape[1])))
    if grid * grid != pos.shape[1] or pos.shape[0] != n_embd:
        return None
    e.data.append(("v.position_embd.weight", 0, [n_embd, side * side],
                   "bilinear %dx%d to %dx%d, corners aligned" % (grid, grid, side, side),
                   _resampled_positions(pos, grid, side)))
    e.rename += [("mm.norm.weight", "mm.model.mlp.0.weight"), ("mm.1.weight", "mm.model.mlp.1.weight"),
                 ("mm.2.weight", "mm.model.mlp.3.weight")]
    keep = {"mm.norm.weight", "mm.1.weight", "mm.2.weight"}
    e.hide += [t.name for t in g.tensors if not t.name.startswith("v.") and t.name not in keep]
    e.quirks.append("vision tower read as a nemotron_v2_vl projector (audio not translated)")
    return e


def _resampled_positions(t, grid, side):
    """Data edit bytes: a position table of grid x grid rows (row-major, F16/BF16/F32) resampled to
    side x side rows as F32, bilinear with corners aligned (torch's interpolate, as llama.cpp's converter
    resamples RADIO's table for the fixed image size), computed in doubles. Two lines of the grid are
    widened at a time (the real table is 128 x 128 x 1280: as Python floats at once, over 600 MB)."""
    def produce(f, g):
        """The resampled table's bytes, from the blob `f` with header `g`."""
        n = t.shape[0]
        data = _tensor_data(f, g, t)
        line = len(data) // grid                          # bytes of one line of the grid (grid positions)

        def grid_line(y):
            raw = _f32_bytes(data[y * line:(y + 1) * line], t.type)
            return struct.unpack("<%df" % (len(raw) // 4), raw)
        out = bytearray()
        for y in range(side):
            sy = y * (grid - 1) / (side - 1) if side > 1 else 0.0
            y0 = int(sy)
            y1, wy = min(y0 + 1, grid - 1), sy - y0
            top, bottom = grid_line(y0), grid_line(y1)
            for x in range(side):
                sx = x * (grid - 1) / (side - 1) if side > 1 else 0.0
                x0 = int(sx)
                x1, wx = min(x0 + 1, grid - 1), sx - x0
                a, b = x0 * n, x1 * n
                out += struct.pack("<%df" % n, *[(top[a + i] * (1.0 - wx) + top[b + i] * wx) * (1.0 - wy)
                                                 + (bottom[a + i] * (1.0 - wx) + bottom[b + i] * wx) * wy
                                                 for i in range(n)])
        return bytes(out)
    return produce


def _llava_projector_edits(g, path):
    """A LLaVA/BakLLaVA projector without clip.projector_type: llama.cpp's default was mlp."""
    if g.architecture != "clip" or not g.kv.get("clip.has_vision_encoder") or \
            "clip.projector_type" in g.kv or "clip.vision.projector_type" in g.kv:
        return None
    e = GGUFEdits("llava projector")
    e.set["clip.projector_type"] = (8, "mlp")
    e.quirks.append("no projector type: mlp")
    return e


# glmocr (Ollama's published GLM-OCR files): llama.cpp's glm4 wants each block's FFN fused (ffn_up
# [n_embd, 2*n_ff], gate rows then up rows), and WriteGGUF sorts a block's tensors by name, so ffn_norm
# lies between ffn_gate and ffn_up: no single byte range is the fused tensor, and the text loader maps
# each tensor as one range of its file. So its view is a model split in two (GGUFEdits.split): the blob,
# and a file of the fused tensors alone, the only text weights stored twice (about a third of them).
#: architecture -> (text edits, projector edits): each takes (GGUF header, path) and returns GGUFEdits
#: or None when the file is already in llama.cpp's layout. docs/models.md's family table says what is tested.
OLLAMA_LAYOUTS = {
    "gemma3": (_gemma3_family_edits, _gemma3_clip_edits),
    "llama": (_llama3_edits, None),
    "gptoss": (_gptoss_edits, None),
    "olmo3": (_olmo3_edits, None),
    "lfm2": (_lfm2_edits, None),
    "llama4": (_vision_inside_edits("llama4"), _llama4_clip_edits),
    "gemma3n": (_gemma3n_edits, None),
    "gemma4": (_gemma4_edits, _gemma4_clip_edits),
    "deepseekocr": (_deepseekocr_edits, None),
    "mistral3": (_mistral3_edits, _mistral3_clip_edits),
    "qwen25vl": (_qwen25vl_edits, _qwen25vl_clip_edits),
    "qwen3vl": (_qwen3vl_edits, _qwen3vl_clip_edits),
    "qwen3vlmoe": (_qwen3vl_edits, _qwen3vl_clip_edits),
    "qwen3next": (_qwen3next_edits, None),
    "qwen35": (_qwen35_edits, _qwen3vl_clip_edits),
    "qwen35moe": (_qwen35_edits, _qwen3vl_clip_edits),
    "laguna": (_laguna_edits, None),
    "glm4moelite": (_glm4moelite_edits, None),
    "glmocr": (_glmocr_edits, _glmocr_clip_edits),
    "nemotron_h_moe": (_nemotron_h_moe_edits, None),
    "nemotron_h_omni": (_nemotron_h_omni_edits, _nemotron_h_omni_clip_edits),
    "bert": (_snowflake_edits, None),
    "clip": (None, _llava_projector_edits),
}


def ollama_layout(g, path):
    """(text edits, projector edits) for a GGUF header `g` read from `path`: each GGUFEdits, or None
    where the engine reads the file as it is."""
    text, clip = OLLAMA_LAYOUTS.get(g.architecture, (None, None))
    if g.is_projector:
        return None, clip(g, path) if clip else None
    return (text(g, path) if text else None), (clip(g, path) if clip else None)


###############################################################################
# Go formatting ###############################################################
###############################################################################
# Go's fmt, strconv and encoding/json output, for the Modelfile, templates and blobs that must match Ollama's.

def _is_print(ch):
    return ch == " " or ch.isprintable()


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


_GO_JSON_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\b": "\\b", "\f": "\\f",
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


def log_value(s):
    """A value a client chose (a path, an option key, a model or tool name) as Go's slog writes it
    in a log line: as it is, or strconv.Quote'd when it is empty or holds a space, "=", '"' or
    anything unprintable, so a newline cannot forge a line nor an escape sequence reach a terminal."""
    s = str(s)
    if s and not any(ch in ' ="' or not _is_print(ch) for ch in s):
        return s
    return _go_quote(s)


# -- Go values: structs, printing (fmt %v), json.Marshal ------------------------

class _GoStruct:
    """A Go struct as templates see it: fields by Go name, printed like fmt %v, marshalled by its JSON tags.

    _fields lists (GoName, json key, omitempty); _stringer marks types whose String() prints their JSON.
    """
    _fields = ()
    _stringer = False
    _pointer = False

    def __init__(self, **values):
        for name, _key, _omit in self._fields:
            setattr(self, name, values.get(name))

    def __repr__(self):
        return "%s(%s)" % (type(self).__name__, ", ".join("%s=%r" % (f[0], getattr(self, f[0])) for f in self._fields))


class _GoMap(dict):
    """A Go map whose String() prints its JSON; nil=True stands for a nil map (prints "{}", marshals null)."""
    nil = False
    ordered = False                     # True: marshal in insertion order (Ollama's ordered maps)


class _GoList(list):
    """A Go slice whose String() prints its JSON; nil=True stands for a nil slice (marshals null)."""
    nil = False


class _PropertyType(list):
    """api.PropertyType: prints as its only type, or like a []string when several."""


_NIL = ()                               # a nil slice of a struct field: prints [], len 0, marshals null


def go_sprint(v, sharp=False, top=False):
    """Go's fmt %v (or %#v with sharp=True, for JSON-decoded values) of a value: numbers, strings,
    bools, lists, maps, and the Go values templates see. `top` is for a value a template prints
    itself ({{ . }}), where nil is "<no value>" and a pointer to a struct "&{...}"."""
    if v is None:
        return "<no value>" if top else "interface {}(nil)" if sharp else "<nil>"
    if v is True or v is False:
        return "true" if v else "false"
    if isinstance(v, str):
        return _go_quote(v) if sharp else v
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return _go_float(v)
    if isinstance(v, _PropertyType):
        return v[0] if len(v) == 1 else "[" + " ".join(v) + "]"
    if isinstance(v, _GoMap):
        return "{}" if v.nil else go_json(v, sort_keys=True)
    if isinstance(v, _GoList):
        return go_json(v, sort_keys=True)
    if isinstance(v, _GoStruct):
        if v._stringer:
            return go_json(v, sort_keys=True)
        inner = "{" + " ".join(go_sprint(getattr(v, f[0])) for f in v._fields) + "}"
        return "&" + inner if v._pointer and top else inner
    if isinstance(v, (list, tuple)):
        if sharp:
            return "[]interface {}{" + ", ".join(go_sprint(x, True) for x in v) + "}"
        return "[" + " ".join(go_sprint(x) for x in v) + "]"
    if isinstance(v, dict):
        return "map[" + " ".join("%s:%s" % (go_sprint(k), go_sprint(v[k])) for k in sorted(v)) + "]"
    return str(v)


def go_json(v, sort_keys=False):
    """JSON as Go's encoding/json writes it (json.Marshal, or an Encoder's line without its newline):
    compact, <>& and U+2028/9 escaped, Go's float text; a _GoStruct's fields in order with omitempty,
    nil slices and maps as null. A plain dict keeps its order (a struct written as a dict: manifests,
    config, messages) unless sort_keys, which sorts it as Go sorts a map's keys (params, and every map
    a template marshals). NaN and infinities are refused as Go refuses them (ValueError)."""
    if v is None or v is _NIL:
        return "null"
    if v is True or v is False:
        return "true" if v else "false"
    if isinstance(v, str):
        return _go_json_string(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return _go_json_float(v)
    if isinstance(v, _PropertyType):
        return go_json(v[0] if len(v) == 1 else list(v), sort_keys)
    if isinstance(v, _GoStruct):
        parts = []
        for name, key, omit in v._fields:
            val = getattr(v, name)
            if omit and (val is None or val is _NIL or val == "" or val is False or val == 0
                         or (isinstance(val, (list, dict)) and not isinstance(val, _GoStruct) and len(val) == 0
                             and not (isinstance(val, _GoMap) and val.ordered and not val.nil))):
                continue
            parts.append(_go_json_string(key) + ":" + go_json(val, sort_keys))
        return "{" + ",".join(parts) + "}"
    if isinstance(v, dict):
        if isinstance(v, _GoMap) and v.nil:
            return "null"
        ordered = v.ordered if isinstance(v, _GoMap) else not sort_keys
        keys = list(v) if ordered else sorted(v, key=str)
        return "{" + ",".join(_go_json_string(str(k)) + ":" + go_json(v[k], sort_keys) for k in keys) + "}"
    if isinstance(v, (list, tuple)):
        if isinstance(v, _GoList) and v.nil:
            return "null"
        return "[" + ",".join(go_json(x, sort_keys) for x in v) + "]"
    raise TypeError("json: unsupported type %s" % type(v).__name__)


def _go_type(v):
    """The Go type name fmt prints in %!verb(type=value) notes."""
    if v is None:
        return "<nil>"
    for t, name in ((bool, "bool"), (int, "int"), (float, "float64"), (str, "string"),
                    (dict, "map[string]interface {}"), (list, "[]interface {}"), (tuple, "[]interface {}")):
        if isinstance(v, t):
            return name
    return type(v).__name__.lstrip("_")


_PRINTF_RE = re.compile(r"%([-+# 0]*)(\d+)?(?:\.(\d*))?([a-zA-Z%])")


def _go_sprintf(fmt, args):
    """fmt.Sprintf for the verbs templates use: %s %d %v %q %t %f %e %g %x %X %c %%, with flags and width."""
    out, pos, n = [], 0, 0
    for m in _PRINTF_RE.finditer(fmt):
        out.append(fmt[pos:m.start()])
        pos = m.end()
        flags, width, prec, verb = m.group(1), m.group(2), m.group(3), m.group(4)
        if verb == "%":
            out.append("%")
            continue
        if n >= len(args):
            out.append("%!" + verb + "(MISSING)")
            continue
        a = args[n]
        n += 1
        is_num = isinstance(a, (int, float)) and not isinstance(a, bool)
        if verb == "v" or (verb == "s" and not is_num):
            body = go_sprint(a)
            if prec is not None and verb == "s":
                body = body[:int(prec or 0)]
        elif verb == "q" and isinstance(a, str):
            body = _go_quote(a)
        elif verb == "t" and isinstance(a, bool):
            body = "true" if a else "false"
        elif verb in "dxXobc" and isinstance(a, int) and not isinstance(a, bool):
            body = {"d": "%d", "x": "%x", "X": "%X", "o": "%o", "b": "{:b}", "c": "%c"}[verb]
            body = format(a, "b") if verb == "b" else body % a
            if "+" in flags and a >= 0 and verb == "d":
                body = "+" + body
        elif verb in "xX" and isinstance(a, str):
            body = a.encode().hex()
            body = body.upper() if verb == "X" else body
        elif verb in "feEgG" and is_num:
            if verb in "gG" and prec is None:
                body = _go_float(float(a))
            else:
                digits = str(int(prec or 0) if prec is not None else 6)
                body = ("%" + ("+" if "+" in flags else "") + "." + digits + verb) % a
        else:
            body = "%!" + verb + "(" + _go_type(a) + "=" + go_sprint(a) + ")"
        if width and len(body) < int(width):
            pad = int(width) - len(body)
            if "-" in flags:
                body += " " * pad
            elif "0" in flags and is_num:
                sign = body[0] if body[:1] in "+-" else ""
                body = sign + "0" * pad + body[len(sign):]
            else:
                body = " " * pad + body
        out.append(body)
    out.append(fmt[pos:])
    if n < len(args):
        out.append("%!(EXTRA " + ", ".join(_go_type(a) + "=" + go_sprint(a) for a in args[n:]) + ")")
    return "".join(out)


def _fmt_sprint(args, spaces_always=False):
    """fmt.Sprint (a space between operands when neither is a string) or fmt.Sprintln's spacing."""
    out = []
    for i, a in enumerate(args):
        if i and (spaces_always or not (isinstance(a, str) or isinstance(args[i - 1], str))):
            out.append(" ")
        out.append(go_sprint(a))
    return "".join(out)


###############################################################################
# Modelfile ###################################################################
###############################################################################
# Modelfile text <-> commands, typed PARAMETERs, and the /api/create request a Modelfile becomes.

MODELFILE_COMMANDS = ("from", "license", "template", "system", "adapter", "draft", "renderer", "parser",
                      "parameter", "message", "requires")
_ERR_INVALID_COMMAND = ('command must be one of "from", "license", "template", "system", "adapter", '
                        '"draft", "renderer", "parser", "parameter", "message", or "requires"')
_ERR_MESSAGE_ROLE = 'message role must be one of "system", "user", or "assistant"'
DEFAULT_TEMPLATE = "{{ .Prompt }}"

#: Model parameters (api.Options): name -> type. Types: int, float, bool, list (of strings).
PARAMETER_TYPES = {
    "num_ctx": int, "num_batch": int, "num_gpu": int, "main_gpu": int, "use_mmap": bool,
    "num_thread": int, "draft_num_predict": int, "speculative": bool, "num_keep": int, "seed": int, "num_predict": int,
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
_GO_INT_RE = re.compile(r"^[+-]?[0-9]+$")
_GO_FLOAT_RE = re.compile(r"^[+-]?(?:(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|inf|infinity|nan)$",
                          re.IGNORECASE)


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


def format_param(key, values):
    """One PARAMETER's values (texts: a Modelfile line, or `/set parameter`'s words) typed as
    api.FormatParams types them: the first value as an int, float or bool, or all of them for `stop`.

    BadRequest for `unknown parameter 'x'` and `invalid int|float|bool value [x y]`.
    """
    kind = PARAMETER_TYPES.get(key)
    if kind is None:
        raise BadRequest("unknown parameter '%s'" % key)
    if kind is list:
        return list(values)
    value = values[0]
    if kind is int:
        if not _GO_INT_RE.match(value):
            raise BadRequest("invalid int value %s" % _go_list(values))
        return int(value)
    if kind is float:
        if not _GO_FLOAT_RE.match(value):
            raise BadRequest("invalid float value %s" % _go_list(values))
        return _f32(float(value))
    if value not in GO_BOOLS:
        raise BadRequest("invalid bool value %s" % _go_list(values))
    return GO_BOOLS[value]


_INT32 = (1 << 31) - 1
#: Integer options that become llama-server flags (a C int): checked before any model is unloaded.
OPTION_RANGES = {"num_ctx": (0, _INT32), "num_batch": (0, _INT32), "num_thread": (0, _INT32),
                 "num_gpu": (-1, _INT32), "main_gpu": (0, _INT32), "num_keep": (-1, _INT32),
                 "num_predict": (-2, _INT32), "top_k": (-_INT32, _INT32), "repeat_last_n": (-1, _INT32)}


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
            log.warning("invalid option provided option=%s", log_value(key))
            continue
        if val is None:
            continue
        bad = BadRequest('option "%s" must be of type %s' % (key, _OPTION_TYPE_NAMES[kind]))
        if kind is int:
            if isinstance(val, bool) or not isinstance(val, (int, float)) or val != val or val in (FOREVER, -FOREVER):
                raise bad
            low, high = OPTION_RANGES.get(key, (-(1 << 63), (1 << 63) - 1))   # Go's int, else the engine's
            if not low <= int(val) <= high:
                raise BadRequest('option "%s" must be between %d and %d' % (key, low, high))
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


def _looks_like_path(arg):
    """A FROM argument that names a file rather than a model: ./x, ../x, /x, ~/x, or *.gguf."""
    return arg.startswith(("./", "../", "/", "~", ".\\")) or arg.lower().endswith((".gguf", ".safetensors"))


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
            if files is None and _looks_like_path(args):
                # Ollama would try to pull "./x.gguf" as a model name; a missing file is what it is
                raise BadRequest("no such file: %s" % _expand_path(args, relative_dir))
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
            files = local_files(args)
            if files is None:
                raise BadRequest("draft model file not found: %s" % args)
            req.setdefault("draft_files", {}).update(files)
        elif name == "message":
            role, _, content = args.partition(": ")
            messages.append({"role": role, "content": content})
        elif name in DEPRECATED_PARAMETERS:
            print("warning: parameter %s is deprecated" % name)
        else:
            value = format_param(name, [args])
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


###############################################################################
# Templates ###################################################################
###############################################################################
# Prompt templates: a Go text/template engine, Ollama's template values, and the parsers of its output.

class TemplateError(BadRequest):
    """A prompt template that does not parse or fails to execute; the text is Go's ("template: :LINE: ...")."""


# == Templates: Go's text/template engine =====================================

# -- Go text/template: lexer and parser -----------------------------------------

_TPL_SPACE = " \t\r\n"                  # what {{- and -}} trim, and what may precede a right trim marker
_TPL_KEYWORDS = {"if", "else", "end", "range", "with", "break", "continue", "define", "template", "block"}
_TPL_NUMBER_RE = re.compile(
    r"[+-]?(?:0[xX][0-9a-fA-F_]+|0[bB][01_]+|0[oO][0-7_]+|(?:\d[\d_]*\.?[\d_]*|\.\d[\d_]*)(?:[eE][+-]?\d+)?)")
_TPL_IDENT_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_TPL_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v",
                "\\": "\\", '"': '"', "'": "'"}


class _Tok:
    """One token of an action: kind is a punctuation string or field/var/dot/ident/const/nil/keyword."""
    __slots__ = ("kind", "value", "line", "spaced")

    def __init__(self, kind, value, line, spaced):
        self.kind, self.value, self.line, self.spaced = kind, value, line, spaced


def _tpl_unquote(body, line):
    """Decode the escapes of a Go interpreted string literal (without its quotes)."""
    out, i = [], 0
    while i < len(body):
        c = body[i]
        if c != "\\":
            out.append(c)
            i += 1
            continue
        e = body[i + 1:i + 2]
        if e in _TPL_ESCAPES:
            out.append(_TPL_ESCAPES[e])
            i += 2
        elif e in ("x", "u", "U"):
            n = {"x": 2, "u": 4, "U": 8}[e]
            digits = body[i + 2:i + 2 + n]
            if len(digits) != n or not all(d in "0123456789abcdefABCDEF" for d in digits):
                raise TemplateError("template: :%d: invalid syntax" % line)
            out.append(chr(int(digits, 16)))
            i += 2 + n
        elif e and e in "01234567" and re.match(r"[0-7]{3}", body[i + 1:i + 4]):
            out.append(chr(int(body[i + 1:i + 4], 8)))
            i += 4
        else:
            raise TemplateError("template: :%d: invalid syntax" % line)
    return "".join(out)


def _tpl_lex(src):
    """Split template text into ("text", str, line) items and ("action", [tokens], line) items, trims applied."""
    items, pos, line, trim_next = [], 0, 1, False
    while True:
        start = src.find("{{", pos)
        text = src[pos:] if start < 0 else src[pos:start]
        if trim_next:
            text = text.lstrip(_TPL_SPACE)
        if start < 0:
            if text:
                items.append(("text", text, line))
            return items
        p = start + 2
        left_trim = src[p:p + 1] == "-" and src[p + 1:p + 2] in tuple(_TPL_SPACE)
        if left_trim:
            text = text.rstrip(_TPL_SPACE)
            p += 2
        if text:
            items.append(("text", text, line))
        line += src.count("\n", pos, start)
        action_line = line
        if src.startswith("/*", p):                       # {{/* comment */}}
            end = src.find("*/", p + 2)
            if end < 0:
                raise TemplateError("template: :%d: unclosed comment" % line)
            line += src.count("\n", p, end)
            q = end + 2
            if src.startswith("}}", q):
                trim_next, pos = False, q + 2
            elif src[q:q + 1] in tuple(_TPL_SPACE) and src.startswith("-}}", q + 1):
                trim_next, pos = True, q + 4
            else:
                raise TemplateError("template: :%d: comment ends before closing delimiter" % line)
            continue
        tokens, spaced = [], False
        while True:
            if p >= len(src):
                raise TemplateError("template: :%d: unclosed action" % action_line)
            c = src[p]
            if c in _TPL_SPACE:
                if src.startswith("-}}", p + 1):
                    trim_next, p = True, p + 4
                    break
                if c == "\n":
                    line += 1
                p, spaced = p + 1, True
                continue
            if src.startswith("}}", p):
                trim_next, p = False, p + 2
                break
            tok = None
            if c == '"':
                q = p + 1
                while q < len(src) and src[q] != '"':
                    if src[q] == "\n":
                        break
                    q += 2 if src[q] == "\\" else 1
                if q >= len(src) or src[q] != '"':
                    raise TemplateError("template: :%d: unterminated quoted string" % line)
                tok, p = _Tok("const", _tpl_unquote(src[p + 1:q], line), line, spaced), q + 1
            elif c == "`":
                q = src.find("`", p + 1)
                if q < 0:
                    raise TemplateError("template: :%d: unterminated raw quoted string" % line)
                tok = _Tok("const", src[p + 1:q], line, spaced)
                line += src.count("\n", p, q)
                p = q + 1
            elif c == "'":
                m = re.match(r"'(\\.[^']*|[^'\\])'", src[p:])
                if not m:
                    raise TemplateError("template: :%d: unterminated character constant" % line)
                tok, p = _Tok("const", ord(_tpl_unquote(m.group(1), line)), line, spaced), p + m.end()
            elif c == "$":
                m = _TPL_IDENT_RE.match(src, p + 1)
                name = "$" + (m.group() if m else "")
                tok, p = _Tok("var", name, line, spaced), p + len(name)
            elif c == "." and not src[p + 1:p + 2].isdigit():
                m = _TPL_IDENT_RE.match(src, p + 1)
                if m:
                    tok, p = _Tok("field", m.group(), line, spaced), m.end()
                else:
                    tok, p = _Tok("dot", ".", line, spaced), p + 1
            elif c.isdigit() or (c in "+-." and src[p + 1:p + 2].isdigit()):
                m = _TPL_NUMBER_RE.match(src, p)
                tok, p = _Tok("const", _tpl_number(m.group(), line), line, spaced), m.end()
            elif src.startswith(":=", p):
                tok, p = _Tok(":=", ":=", line, spaced), p + 2
            elif c in "()|,=":
                tok, p = _Tok(c, c, line, spaced), p + 1
            elif c.isalpha() or c == "_":
                m = _TPL_IDENT_RE.match(src, p)
                word, p = m.group(), m.end()
                if word in ("true", "false"):
                    tok = _Tok("const", word == "true", line, spaced)
                elif word == "nil":
                    tok = _Tok("nil", None, line, spaced)
                else:
                    tok = _Tok("keyword" if word in _TPL_KEYWORDS else "ident", word, line, spaced)
            else:
                raise TemplateError("template: :%d: unrecognized character in action: %r" % (line, c))
            tokens.append(tok)
            spaced = False
        items.append(("action", tokens, action_line))
        pos = p


def _tpl_number(text, line):
    """A Go number literal as int or float."""
    t = text.replace("_", "")
    try:
        if re.fullmatch(r"[+-]?0[0-7]+", t):
            return int(t, 8)
        if re.fullmatch(r"[+-]?(0[xXbBoO][0-9a-fA-F]+|\d+)", t):
            return int(t, 0)
        return float(t)
    except ValueError:
        raise TemplateError('template: :%d: bad number syntax: "%s"' % (line, text)) from None


class _Node:
    """A template tree node: kind is text/action/if/range/with/break/continue; or an argument node."""
    __slots__ = ("kind", "a", "b", "c", "d", "line")

    def __init__(self, kind, a=None, b=None, c=None, d=None, line=0):
        self.kind, self.a, self.b, self.c, self.d, self.line = kind, a, b, c, d, line

    # Meaning of a..d by kind:
    #   text: a=str | action: a=pipe | if/range/with: a=pipe, b=list, c=else list or None
    #   pipe: a=declared variable names, b=is "=" assignment, c=commands (lists of argument nodes)
    #   field: a=[names] | var: a=name, b=[names] | chain: a=node, b=[names] | ident: a=name
    #   const: a=value | dot, nil: no fields


class _TplParser:
    """Recursive descent over the lexed items, building lists of _Node; checks variables like Go does."""

    def __init__(self, src, funcs):
        self.items, self.i, self.funcs, self.vars = _tpl_lex(src), 0, funcs, ["$"]

    def parse(self):
        nodes, end = self.list_until()
        if end is not None:
            raise TemplateError("template: :%d: unexpected {{%s}}" % (end[2], end[0]))
        return nodes

    def list_until(self):
        """Parse nodes until {{end}}/{{else ...}} (returned as (word, tokens, line)) or EOF (None)."""
        nodes = []
        while self.i < len(self.items):
            kind, value, line = self.items[self.i]
            self.i += 1
            if kind == "text":
                nodes.append(_Node("text", value, line=line))
                continue
            toks = value
            if not toks:
                raise TemplateError("template: :%d: missing value for command" % line)
            head = toks[0]
            if head.kind == "keyword":
                word = head.value
                if word in ("end", "else"):
                    return nodes, (word, toks, line)
                if word in ("if", "range", "with"):
                    nodes.append(self.control(word, toks[1:], line))
                elif word in ("break", "continue"):
                    if len(toks) > 1:
                        raise TemplateError("template: :%d: unexpected %s in {{%s}}" % (line, toks[1].value, word))
                    nodes.append(_Node(word, line=line))
                else:
                    raise TemplateError("template: :%d: {{%s}} is not supported" % (line, word))
                continue
            nodes.append(_Node("action", self.pipeline(toks, line, "command"), line=line))
        return nodes, None

    def control(self, word, toks, line):
        """An {{if}}, {{range}} or {{with}} block -> its _Node: pipeline, body and else
        branch ({{else if}} or {{else with}} nests as the else branch, sharing the {{end}}).
        Variables declared in it go out of scope at its end."""
        mark = len(self.vars)
        pipe = self.pipeline(toks, line, word, allow_two=(word == "range"))
        body, end = self.list_until()
        orelse = None
        if end is None:
            raise TemplateError("template: :%d: unexpected EOF" % line)
        if end[0] == "else":
            rest = end[1][1:]
            if rest and rest[0].kind == "keyword" and rest[0].value in ("if", "with") and word != "range":
                # {{else if ...}} / {{else with ...}}: a nested branch that shares our {{end}}
                orelse = [self.control(rest[0].value, rest[1:], end[2])]
            else:
                if rest:
                    raise TemplateError("template: :%d: unexpected %s in else" % (end[2], rest[0].value))
                orelse, end = self.list_until()
                if end is None:
                    raise TemplateError("template: :%d: unexpected EOF" % line)
                if end[0] != "end":
                    raise TemplateError("template: :%d: expected end; found {{else}}" % end[2])
        elif len(end[1]) > 1:
            raise TemplateError("template: :%d: unexpected %s in end" % (end[2], end[1][1].value))
        del self.vars[mark:]
        return _Node(word, pipe, body, orelse, line=line)

    def pipeline(self, toks, line, context, allow_two=False):
        """An action's tokens -> a "pipe" _Node: the variables it declares ($x :=,
        $x =, and for range $i, $e :=) and its commands. `context` names the action in errors."""
        decl, assign, i = [], False, 0
        # declarations: $x :=  |  $x =  |  $i, $e :=  (range only)
        if len(toks) >= 2 and toks[0].kind == "var":
            if toks[1].kind in (":=", "="):
                decl, assign, i = [toks[0].value], toks[1].kind == "=", 2
            elif toks[1].kind == "," and allow_two and len(toks) >= 4 and toks[2].kind == "var" \
                    and toks[3].kind in (":=", "="):
                decl, assign, i = [toks[0].value, toks[2].value], toks[3].kind == "=", 4
            elif toks[1].kind == ",":
                raise TemplateError("template: :%d: too many declarations in %s" % (line, context))
        for name in decl:
            if assign and name not in self.vars:
                raise TemplateError('template: :%d: undefined variable "%s"' % (line, name))
            if not assign:
                self.vars.append(name)
        cmds, pos = self.commands(toks, i, line, context)
        if pos != len(toks):
            raise TemplateError("template: :%d: unexpected %s in %s" % (line, _tok_text(toks[pos]), context))
        return _Node("pipe", decl, assign, cmds, line=line)

    def commands(self, toks, i, line, context, closing=None):
        """A pipeline's commands from toks[i], split at "|", up to the end (or with
        `closing`, a ")") -> (commands, index after them). Go's errors for a missing or a
        non-executable command."""
        cmds, args = [], []
        while i < len(toks):
            t = toks[i]
            if t.kind == "|":
                if not args:
                    raise TemplateError("template: :%d: missing command" % line)
                cmds.append(args)
                args, i = [], i + 1
                continue
            if t.kind == ")" and closing:
                break
            if t.kind in ("keyword", ":=", "=", ",", ")"):
                raise TemplateError("template: :%d: unexpected %s in %s" % (line, _tok_text(t), context))
            node, i = self.operand(toks, i, line, context)
            args.append(node)
        if not args:
            raise TemplateError("template: :%d: missing value for %s" % (line, context))
        cmds.append(args)
        for cmd in cmds[1:]:
            if cmd[0].kind in ("const", "nil"):
                raise TemplateError("template: :%d: non executable command in pipeline stage %d"
                                    % (line, cmds.index(cmd) + 1))
        return cmds, i

    def operand(self, toks, i, line, context):
        """One argument from toks[i] -> (node, index after it): a field, variable, constant, nil,
        function or parenthesised pipeline, with the .Field chain that follows it. An undefined
        variable or function is a TemplateError here, at parse time, as in Go."""
        t = toks[i]
        i += 1
        if t.kind == "field":
            names = [t.value]
            while i < len(toks) and toks[i].kind == "field" and not toks[i].spaced:
                names.append(toks[i].value)
                i += 1
            return _Node("field", names), i
        if t.kind == "var":
            if t.value not in self.vars:
                raise TemplateError('template: :%d: undefined variable "%s"' % (line, t.value))
            node = _Node("var", t.value, [])
        elif t.kind == "dot":
            node = _Node("dot")
        elif t.kind == "const":
            node = _Node("const", t.value)
        elif t.kind == "nil":
            node = _Node("nil")
        elif t.kind == "ident":
            if t.value not in self.funcs:
                raise TemplateError('template: :%d: function "%s" not defined' % (line, t.value))
            node = _Node("ident", t.value)
        elif t.kind == "(":
            mark = len(self.vars)
            sub_decl = []
            if i + 1 < len(toks) and toks[i].kind == "var" and toks[i + 1].kind in (":=", "="):
                sub_decl = [toks[i].value]
                if toks[i + 1].kind == ":=":
                    self.vars.append(toks[i].value)
                i += 2
            cmds, i = self.commands(toks, i, line, "parenthesized pipeline", closing=True)
            if i >= len(toks) or toks[i].kind != ")":
                raise TemplateError("template: :%d: unclosed left paren" % line)
            i += 1
            del self.vars[mark + len(sub_decl):]
            node = _Node("pipe", sub_decl, False, cmds, line=line)
        else:
            raise TemplateError("template: :%d: unexpected %s in %s" % (line, _tok_text(t), context))
        names = []
        while i < len(toks) and toks[i].kind == "field" and not toks[i].spaced:
            names.append(toks[i].value)
            i += 1
        if names:
            if node.kind == "var":
                node.b = names
            elif node.kind in ("const", "nil"):
                raise TemplateError("template: :%d: unexpected . after term %r" % (line, _tok_text(t)))
            else:
                node = _Node("chain", node, names)
        return node, i


def _tok_text(tok):
    """How Go's parser names a token in its error messages."""
    if tok.kind == "field":
        return '<field .%s>' % tok.value
    if tok.kind == "const" and isinstance(tok.value, str):
        return '<%s>' % json.dumps(tok.value)
    return '<%s>' % (tok.value if tok.value is not None else "nil")


def _go_truth(v):
    """Go template truth: false, 0, nil, and empty strings, slices and maps are false."""
    if v is None:
        return False
    if isinstance(v, _GoStruct):
        return True
    if isinstance(v, (bool, int, float)):
        return v != 0
    if isinstance(v, (str, list, tuple, dict)):
        return len(v) > 0
    return True


# -- Go text/template: execution -------------------------------------------------

class _Break(Exception):
    pass


class _Continue(Exception):
    pass


_MISSING = object()                     # no piped value for a command


def _tpl_compare_kinds(a, b):
    """Basic kinds for comparisons (bool, int, float, string), "invalid" for nil, or None if not basic."""
    def kind(v):
        if v is None:
            return "invalid"
        if isinstance(v, bool):
            return "bool"
        if isinstance(v, int):
            return "int"
        if isinstance(v, float):
            return "float"
        if isinstance(v, str):
            return "string"
        return None
    return kind(a), kind(b)


def _tpl_eq(a, *others):
    """eq: a equals any of the others; different basic kinds are an error as in Go."""
    if not others:
        raise TemplateError("missing argument for comparison")
    for b in others:
        ka, kb = _tpl_compare_kinds(a, b)
        if ka != kb:
            if ka != "invalid" and kb != "invalid":
                raise TemplateError("incompatible types for comparison")
            continue
        if ka is None:
            if not (isinstance(a, _GoStruct) or isinstance(b, _GoStruct)) and len(a) and len(b):
                raise TemplateError("non-comparable types")
            if (len(a) == 0 and len(b) == 0) if not isinstance(a, _GoStruct) else a is b:
                return True
        elif a == b:
            return True
    return False


def _tpl_less(a, b):
    ka, kb = _tpl_compare_kinds(a, b)
    if ka is None or kb is None or ka in ("invalid", "bool") or kb in ("invalid", "bool"):
        raise TemplateError("invalid type for comparison")
    if ka != kb:
        raise TemplateError("incompatible types for comparison")
    return a < b


def _tpl_len(v):
    if isinstance(v, str):
        return len(v.encode("utf-8"))           # Go counts bytes
    if isinstance(v, (list, tuple, dict)):
        return len(v)
    raise TemplateError("len of type %s" % _go_type(v))


def _tpl_index(v, *keys):
    for k in keys:
        if isinstance(v, dict):
            v = v.get(k)
        elif isinstance(v, (list, tuple, str)) and isinstance(k, int) and not isinstance(k, bool):
            if not 0 <= k < len(v):
                raise TemplateError("error calling index: index out of range: %d" % k)
            v = v[k] if not isinstance(v, str) else v.encode("utf-8")[k]
        elif v is None:
            raise TemplateError("error calling index: index of untyped nil")
        else:
            raise TemplateError("error calling index: cannot index slice/array with type %s" % _go_type(k))
    return v


def _tpl_slice(v, *idx):
    """The template function slice: v[i:j] of a list, or of a string's UTF-8 bytes, as Go's
    (a string takes two indexes at most); TemplateError when an index is out of range."""
    if len(idx) > 3 or (len(idx) == 3 and isinstance(v, str)):
        raise TemplateError("error calling slice: too many slice indexes")
    if isinstance(v, str):
        seq = v.encode("utf-8")
    elif isinstance(v, (list, tuple)):
        seq = v
    else:
        raise TemplateError("error calling slice: can't slice item of type %s" % _go_type(v))
    bounds = [int(i) for i in idx] + [None] * (2 - len(idx[:2]))
    lo = bounds[0] or 0
    hi = len(seq) if bounds[1] is None else bounds[1]
    if not 0 <= lo <= hi <= len(seq):
        raise TemplateError("error calling slice: index out of range: %d" % (hi if hi > len(seq) else lo))
    out = seq[lo:hi]
    return out.decode("utf-8", "replace") if isinstance(out, bytes) else list(out)


def _tpl_ts_type(v):
    """toTypeScriptType of a tool property: "string", "number", "any[]", "A | B", ... or "any"."""
    def one(t):
        return {"string": "string", "number": "number", "integer": "number", "boolean": "boolean",
                "array": "any[]", "object": "Record<string, any>", "null": "null"}.get(t, "any")
    if not isinstance(v, _TProperty):
        return "any"
    if v.AnyOf:
        return " | ".join(_tpl_ts_type(p) for p in v.AnyOf)
    types = v.Type or []
    return " | ".join(one(t) for t in types) if types else "any"


def _tpl_html(*args):
    s = args[0] if len(args) == 1 and isinstance(args[0], str) else _fmt_sprint(args)
    return (s.replace("&", "&amp;").replace("'", "&#39;").replace("<", "&lt;").replace(">", "&gt;")
            .replace('"', "&#34;").replace("\0", "\ufffd"))


def _tpl_json(v):
    """The json template function: json.Marshal's text, or nothing when Go's would fail (NaN)."""
    try:
        return go_json(v, sort_keys=True)
    except (ValueError, TypeError):
        return ""


_TPL_FUNCS = {
    "and": None, "or": None,            # short-circuit: evaluated lazily by the executor
    "not": lambda v: not _go_truth(v),
    "eq": _tpl_eq,
    "ne": lambda a, b: not _tpl_eq(a, b),
    "lt": _tpl_less,
    "le": lambda a, b: _tpl_less(a, b) or _tpl_eq(a, b),
    "gt": lambda a, b: not (_tpl_less(a, b) or _tpl_eq(a, b)),
    "ge": lambda a, b: not _tpl_less(a, b),
    "len": _tpl_len,
    "index": _tpl_index,
    "slice": _tpl_slice,
    "print": lambda *a: _fmt_sprint(a),
    "println": lambda *a: _fmt_sprint(a, spaces_always=True) + "\n",
    "printf": lambda fmt, *a: _go_sprintf(fmt, a),
    "html": _tpl_html,
    "urlquery": lambda *a: urllib.parse.quote_plus(a[0] if len(a) == 1 and isinstance(a[0], str) else _fmt_sprint(a)),
    "json": _tpl_json,
    "currentDate": lambda *a: datetime.date.today().isoformat(),
    "yesterdayDate": lambda *a: (datetime.date.today() - datetime.timedelta(days=1)).isoformat(),
    "toTypeScriptType": _tpl_ts_type,
}


class _TplExec:
    """One execution of a parsed tree against data; variables live on a stack like Go's state.vars."""

    def __init__(self, data):
        self.out, self.vars = [], [["$", data]]

    def walk(self, dot, nodes):
        for node in nodes:
            try:
                self.step(dot, node)
            except TemplateError as e:
                if str(e).startswith("template:"):
                    raise
                at = _node_text(node.a.c[0][0]) if node.a is not None else node.kind
                raise TemplateError('template: :%d: executing "" at <%s>: %s' % (node.line, at, e)) from None

    def step(self, dot, node):
        """Execute one node with `dot` as the cursor: text is written, an action's value
        printed (unless it declares variables), if/with/range branch; break and continue unwind
        to the enclosing range."""
        kind = node.kind
        if kind == "text":
            self.out.append(node.a)
        elif kind == "action":
            value = self.pipe(dot, node.a)
            if not node.a.a:
                self.out.append(go_sprint(value, top=True))
        elif kind in ("if", "with"):
            mark = len(self.vars)
            value = self.pipe(dot, node.a)
            if _go_truth(value):
                self.walk(value if kind == "with" else dot, node.b)
            elif node.c is not None:
                self.walk(dot, node.c)
            del self.vars[mark:]
        elif kind == "range":
            self.range(dot, node)
        elif kind == "break":
            raise _Break()
        elif kind == "continue":
            raise _Continue()

    def range(self, dot, node):
        """{{range}}: over a map in key order, a list, or an integer's 0..n-1 (nil is
        empty), binding the element (and key) variables each turn; the else branch runs when
        there is nothing to range over."""
        pipe = node.a
        mark = len(self.vars)
        value = self.cmds(dot, pipe.c)
        if isinstance(value, dict):
            items = [(k, value[k]) for k in sorted(value, key=str)]     # Go ranges over maps in key order
        elif isinstance(value, (list, tuple)):
            items = list(enumerate(value))
        elif isinstance(value, int) and not isinstance(value, bool):
            items = [(i, i) for i in range(value)]
        elif value is None:
            items = []
        else:
            raise TemplateError("range can't iterate over %s" % go_sprint(value, top=True))
        if not pipe.b:
            self.vars.extend([name, value] for name in pipe.a)

        def bind(j, v):
            if pipe.b:
                self.set_var(pipe.a[j], v)
            else:
                self.vars[mark + j][1] = v
        for key, elem in items:
            if len(pipe.a) == 1:
                bind(0, elem)
            elif len(pipe.a) == 2:
                bind(0, key)
                bind(1, elem)
            inner = len(self.vars)
            try:
                self.walk(elem, node.b)
            except _Break:
                break
            except _Continue:
                pass
            finally:
                del self.vars[inner:]
        if not items and node.c is not None:
            self.walk(dot, node.c)
        del self.vars[mark:]

    def set_var(self, name, value):
        for slot in reversed(self.vars):
            if slot[0] == name:
                slot[1] = value
                return
        raise TemplateError("undefined variable: %s" % name)

    def pipe(self, dot, pipe):
        value = self.cmds(dot, pipe.c)
        for name in pipe.a:
            if pipe.b:
                self.set_var(name, value)
            else:
                self.vars.append([name, value])
        return value

    def cmds(self, dot, cmds):
        value = _MISSING
        for cmd in cmds:
            value = self.command(dot, cmd, value)
        return value

    def command(self, dot, cmd, final):
        """The value of one command of a pipeline: a function called with its arguments and `final`,
        the previous command's value (_MISSING for the first); and/or evaluate lazily, as in Go."""
        first = cmd[0]
        if first.kind == "ident":
            name = first.a
            if name in ("and", "or"):
                args = cmd[1:]
                if not args and final is _MISSING:
                    raise TemplateError("wrong number of args for %s: want at least 1 got 0" % name)
                value = None
                for arg in args:
                    value = self.arg(dot, arg)
                    if _go_truth(value) != (name == "and"):
                        return value
                return final if final is not _MISSING else value
            args = [self.arg(dot, a) for a in cmd[1:]]
            if final is not _MISSING:
                args.append(final)
            try:
                return _TPL_FUNCS[name](*args)
            except TypeError:
                raise TemplateError("wrong number of args for %s: got %d" % (name, len(args))) from None
            except TemplateError as e:
                raise TemplateError("error calling %s: %s" % (name, e) if not str(e).startswith("error calling")
                                    else str(e)) from None
        if len(cmd) > 1 or final is not _MISSING:
            raise TemplateError("can't give argument to non-function %s" % _node_text(first))
        return self.arg(dot, first)

    def arg(self, dot, node):
        """The value of an argument node: a constant, dot, a field or variable (with its
        field chain), a function called without arguments, or a parenthesised pipeline."""
        kind = node.kind
        if kind == "const":
            return node.a
        if kind in ("nil",):
            raise TemplateError("nil is not a command")
        if kind == "dot":
            return dot
        if kind == "field":
            return self.fields(dot, node.a)
        if kind == "var":
            for name, value in reversed(self.vars):
                if name == node.a:
                    return self.fields(value, node.b)
            raise TemplateError("undefined variable: %s" % node.a)
        if kind == "chain":
            return self.fields(self.arg(dot, node.a), node.b)
        if kind == "ident":
            return self.command(dot, [node], _MISSING)
        if kind == "pipe":
            return self.pipe(dot, node)
        raise TemplateError("can't evaluate %s" % kind)

    def fields(self, value, names):
        for name in names:
            if value is None:
                continue                                # nil data: missingkey=zero yields nil again
            if isinstance(value, dict):
                value = value.get(name)
            elif isinstance(value, _GoStruct):
                if not any(f[0] == name for f in value._fields):
                    raise TemplateError("can't evaluate field %s in type %s" % (name, _go_type(value)))
                value = getattr(value, name)
            else:
                raise TemplateError("can't evaluate field %s in type %s" % (name, _go_type(value)))
        return value


def _node_text(node):
    """A node written back as template source, for error messages."""
    if node.kind == "field":
        return "." + ".".join(node.a)
    if node.kind == "var":
        return "".join([node.a] + ["." + n for n in node.b])
    if node.kind == "const":
        return json.dumps(node.a) if isinstance(node.a, str) else go_sprint(node.a, top=True)
    return node.kind


# == Templates: Ollama's templates ============================================

# -- Ollama's template values ----------------------------------------------------

def _plain(*names):
    """Struct fields without JSON tags: marshalled under their Go names."""
    return tuple((n, n, False) for n in names)


class _TMessage(_GoStruct):
    _fields = _plain("Role", "Content", "Thinking", "Images", "ToolCalls", "ToolName", "ToolCallID")
    _pointer = True


class _TToolCall(_GoStruct):
    _fields = _plain("ID", "Function")


class _TToolCallFunction(_GoStruct):
    _fields = _plain("Index", "Name", "Arguments")


class _TTool(_GoStruct):
    _fields = (("Type", "type", False), ("Items", "items", True), ("Function", "function", False))
    _stringer = True


class _TToolFunction(_GoStruct):
    _fields = (("Name", "name", False), ("Description", "description", False), ("Parameters", "parameters", False))
    _stringer = True


class _TToolParams(_GoStruct):
    _fields = (("Type", "type", False), ("Defs", "$defs", True), ("Items", "items", True),
               ("Required", "required", True), ("Properties", "properties", False))
    _stringer = True


class _TProperty(_GoStruct):
    _fields = (("AnyOf", "anyOf", True), ("Type", "type", True), ("Items", "items", True),
               ("Description", "description", True), ("Enum", "enum", True), ("Properties", "properties", True))


def _go_map(d, nil_if_none=True, ordered=False):
    m = _GoMap(d or {})
    m.nil = d is None and nil_if_none
    m.ordered = ordered
    return m


def _template_property(p):
    p = p if isinstance(p, dict) else {}
    t = p.get("type")
    props = p.get("properties")
    return _TProperty(
        AnyOf=[_template_property(x) for x in p.get("anyOf") or []] or _NIL,
        Type=_PropertyType([t] if isinstance(t, str) else (t or [])),
        Items=p.get("items"), Description=p.get("description") or "", Enum=p.get("enum") or _NIL,
        Properties=None if not isinstance(props, dict) else _go_map(
            {k: _template_property(v) for k, v in props.items()}, ordered=True))


def _template_tools(tools):
    """API tool dicts as Ollama's templateTools ({{ .Tools }} prints their JSON)."""
    out = _GoList()
    out.nil = tools is None
    for tool in tools or []:
        fn = tool.get("function") or {}
        params = fn.get("parameters") or {}
        props = params.get("properties")
        out.append(_TTool(
            Type=tool.get("type") or "", Items=tool.get("items"),
            Function=_TToolFunction(
                Name=fn.get("name") or "", Description=fn.get("description") or "",
                Parameters=_TToolParams(
                    Type=params.get("type") or "", Defs=params.get("$defs"), Items=params.get("items"),
                    Required=params.get("required") or _NIL,
                    Properties=_go_map(None if not isinstance(props, dict) else
                                       {k: _template_property(v) for k, v in props.items()})))))
    return out


def _tool_arguments(args):
    if isinstance(args, str):                       # OpenAI clients send arguments as a JSON string
        try:
            args = json.loads(args)
        except ValueError:
            args = None
    return _go_map(args if isinstance(args, dict) else None)


def _template_messages(messages):
    """Collated API message dicts as Ollama's []*templateMessage."""
    out = []
    for m in messages:
        calls = []
        for tc in m.get("tool_calls") or []:
            fn = tc.get("function") or {}
            calls.append(_TToolCall(ID=tc.get("id") or "", Function=_TToolCallFunction(
                Index=fn.get("index") or 0, Name=fn.get("name") or "", Arguments=_tool_arguments(fn.get("arguments")))))
        out.append(_TMessage(Role=m.get("role") or "", Content=m.get("content") or "",
                             Thinking=m.get("thinking") or "", Images=list(m.get("images") or []) or _NIL,
                             ToolCalls=calls or _NIL, ToolName=m.get("tool_name") or "",
                             ToolCallID=m.get("tool_call_id") or ""))
    return out


def collate_messages(messages):
    """Ollama's collate: (all system contents joined by blank lines, messages with same-role runs merged).

    Consecutive messages of one role, except "tool", become one whose content is joined with "\\n\\n".
    """
    system, out = [], []
    for m in messages:
        role = m.get("role")
        if role == "system":
            system.append(m.get("content") or "")
        if out and out[-1].get("role") == role and role != "tool":
            out[-1]["content"] = (out[-1].get("content") or "") + "\n\n" + (m.get("content") or "")
        else:
            out.append(dict(m))
    return "\n\n".join(system), out


def _think_values(think):
    """(Think, ThinkLevel, IsThinkSet) for a request's think: None, a bool or a level string."""
    if think is None:
        return False, "", False
    if isinstance(think, str):
        return True, think, True
    return bool(think), "medium" if think else "", True


# -- Ollama's template: parse, vars, execute ------------------------------------

def _tpl_identifiers(nodes):
    """Ollama's Identifiers(): field and variable names in actions and branch pipelines, in tree order."""
    names = []

    def pipe(p):
        for cmd in p.c:
            for arg in cmd:
                if arg.kind == "field":
                    names.extend(arg.a)
                elif arg.kind == "var":
                    names.extend([arg.a] + arg.b)
                elif arg.kind == "pipe":
                    pipe(arg)

    def walk(ns):
        for n in ns:
            if n.kind == "action":
                pipe(n.a)
            elif n.kind in ("if", "range", "with"):
                pipe(n.a)
                walk(n.b)
                walk(n.c or [])
    walk(nodes)
    return names


def _tpl_cut_at_response(nodes):
    """Ollama's deleteNode: keep everything up to and including the first .Response field, drop the rest."""
    cut = [False]

    def pipe(p):
        cmds = []
        for cmd in p.c:
            args = []
            for arg in cmd:
                if cut[0]:
                    continue
                if arg.kind == "field" and "Response" in arg.a:
                    cut[0] = True
                args.append(arg)
            if not args:
                return None
            cmds.append(args)
        return _Node("pipe", p.a, p.b, cmds, line=p.line) if cmds else None

    def walk(ns):
        """`ns` up to the first .Response, the bodies of if/range/with cut there too."""
        out = []
        for n in ns:
            if cut[0]:
                break
            if n.kind == "action":
                p = pipe(n.a)
                if p is not None:
                    out.append(_Node("action", p, line=n.line))
            elif n.kind in ("if", "range", "with"):
                body = walk(n.b)
                orelse = None if n.c is None or cut[0] else walk(n.c)
                out.append(_Node(n.kind, n.a, body, orelse, line=n.line))
            else:
                out.append(n)
        return out
    return walk(nodes)


class Template:
    """A parsed Ollama prompt template (Go text/template syntax, Ollama's functions, missingkey=zero).

    Parsing appends {{ .Response }} when the text uses neither .Messages nor .Response, as Ollama does.
    TemplateError (400) for text that does not parse.
    """

    def __init__(self, text, append_response=True):
        self.text = text
        self.nodes = _TplParser(text, _TPL_FUNCS).parse()
        if append_response and not {"messages", "response"} & self.vars():
            self.nodes.append(_Node("action", _Node("pipe", [], False, [[_Node("field", ["Response"])]]),
                                    line=text.count("\n") + 1))

    def __str__(self):
        return self.text

    def vars(self):
        """The lower-cased identifiers the template uses (capability detection: "tools", "suffix", ...)."""
        return {name.lower() for name in _tpl_identifiers(self.nodes)}

    def execute(self, data, nodes=None):
        """Run the template with data (dicts, lists, scalars, template structs) as dot; returns the text."""
        run = _TplExec(data)
        try:
            run.walk(data, self.nodes if nodes is None else nodes)
        except (_Break, _Continue):
            pass
        return "".join(run.out)

    def render(self, messages=(), tools=None, prompt="", suffix="", think=None):
        """Ollama's Template.Execute: the prompt for messages (API dicts), or for prompt+suffix (insert mode)."""
        think_on, level, think_set = _think_values(think)
        base = {"Think": think_on, "ThinkLevel": level, "IsThinkSet": think_set}
        system, msgs = collate_messages(messages)
        if prompt and suffix:
            return self.execute(dict(base, Prompt=prompt, Suffix=suffix, Response=""))
        if "messages" in self.vars():
            return self.execute(dict(base, System=system, Messages=_template_messages(msgs),
                                     Tools=_template_tools(tools), Response=""))
        # legacy .System/.Prompt/.Response templates: one full rendering per completed turn
        out, turn = [], {"System": "", "Prompt": "", "Response": ""}
        for m in msgs:
            role, content = m.get("role"), m.get("content") or ""
            if (role == "system" and (turn["Prompt"] or turn["Response"])) or (role == "user" and turn["Response"]):
                out.append(self.execute(dict(base, **turn)))
                turn = {"System": "", "Prompt": "", "Response": ""}
            if role == "system":
                turn["System"] = content
            elif role == "user":
                turn["Prompt"] = content
            elif role == "assistant":
                turn["Response"] = content
        out.append(self.execute(dict(base, **turn), _tpl_cut_at_response(self.nodes)))
        return "".join(out)


def parse_template(text):
    """Parse a prompt template; TemplateError (400) with Go's message if it does not parse."""
    return text if isinstance(text, Template) else Template(text)


def template_vars(text):
    """The lower-cased identifiers a template uses, e.g. {"messages", "role", "content", "tools"}."""
    return parse_template(text).vars()


def render_template(text, data):
    """Execute template text against a data dict as plain Go text/template would (no Ollama modes)."""
    return Template(text, append_response=False).execute(data)


def render_prompt(template, messages, tools=None, think=None):
    """The prompt for a chat: messages are API dicts (role, content, images, tool_calls, ...), tools API tools.

    think is None (not set), a bool or a level string ("low", "medium", "high").
    """
    return parse_template(template or DEFAULT_TEMPLATE).render(messages=messages, tools=tools, think=think)


def render_generate(template, prompt, suffix="", system="", messages=(), think=None):
    """The prompt for /api/generate as Ollama builds it: insert mode when prompt and suffix are both set,
    otherwise [system] + model messages + the user prompt rendered as a chat."""
    if suffix:
        return parse_template(template or DEFAULT_TEMPLATE).render(prompt=prompt, suffix=suffix, think=think)
    msgs = ([{"role": "system", "content": system}] if system else []) + list(messages)
    msgs.append({"role": "user", "content": prompt})
    return parse_template(template or DEFAULT_TEMPLATE).render(messages=msgs, think=think)


IMAGE_TAG_RE = re.compile(r"\[img-(\d+)\]")   # Ollama's stable image tags; Runner.media_prompt swaps them
IMAGE_TOKENS = 768                                # what an image counts for in truncation, as Ollama's chatPrompt


def tag_images(messages):
    """(messages, images): each message's images tagged [img-N] in its content, as Ollama's
    imageTaggedMessages does (a "[img]" in the text is where the next one goes, else they lead), and
    all the images in tag order, for Runner.media_prompt to match up after rendering. The images are
    image_data's already (the handlers check them before a model loads)."""
    out, images = [], []
    for m in messages:
        if not m.get("images"):
            out.append(m)
            continue
        content, prefix = m.get("content") or "", ""
        for img in m["images"]:
            tag = "[img-%d]" % len(images)
            images.append(img)
            if "[img]" in content:
                content = content.replace("[img]", tag, 1)
            else:
                prefix += tag
        out.append(dict(m, content=prefix + content))
    return out, images


def _tool_block_start(messages, i):
    """Index to cut at so tool results never lose the assistant turn that called them."""
    if i <= 0 or i >= len(messages) or messages[i].get("role") != "tool":
        return i
    start = i
    while start > 0 and messages[start - 1].get("role") == "tool":
        start -= 1
    if start > 0 and messages[start - 1].get("role") == "assistant" and messages[start - 1].get("tool_calls"):
        return start - 1
    return i


def chat_prompt(template, messages, count_tokens, num_ctx, tools=None, think=None, truncate=True, image_tokens=0):
    """Render a chat prompt that fits num_ctx tokens: returns (prompt, number of messages dropped).

    With truncate, messages are dropped from the front (system messages and the last message are always
    kept, and a tool result keeps its assistant call) until count_tokens(prompt) plus image_tokens per image
    fits. Without truncate, a prompt over num_ctx raises BadRequest naming both sizes.
    """
    tmpl = parse_template(template or DEFAULT_TEMPLATE)
    messages = list(messages)

    def attempt(start):
        kept = [m for m in messages[:start] if m.get("role") == "system"] + messages[start:]
        prompt = tmpl.render(messages=kept, tools=tools, think=think)
        images = sum(len(m.get("images") or []) for m in messages[start:])
        return prompt, count_tokens(prompt) + image_tokens * images

    if not truncate:
        prompt, n = attempt(0)
        if n > num_ctx:
            raise ContextTooLong(n, num_ctx)
        return prompt, 0
    for i in range(len(messages)):
        start = _tool_block_start(messages, i)
        prompt, n = attempt(start)
        if n <= num_ctx or i == len(messages) - 1:
            dropped = sum(1 for m in messages[:start] if m.get("role") != "system")
            return prompt, dropped
    return attempt(0)[0], 0


# == Templates: output parsers (tool calls, thinking) =========================

# -- tool calls ------------------------------------------------------------------

def infer_tool_tag(template):
    """The text a model writes before a tool call, from the first text inside {{ if .ToolCalls }}.

    Cut at the first "{" and trimmed; "{" when the template shows none (then only output that starts
    with a JSON object is parsed as calls).
    """
    def is_tool_calls(n):
        return any(a.kind == "field" and "ToolCalls" in a.a for cmd in n.a.c for a in cmd)

    def find_if(nodes):
        for n in nodes:
            if n.kind == "if" and is_tool_calls(n):
                return n
            if n.kind in ("if", "range", "with"):
                found = find_if(n.b) or find_if(n.c or [])
                if found:
                    return found
        return None

    def first_text(nodes):
        for n in nodes:
            if n.kind == "text":
                if n.a.strip(_TPL_SPACE):
                    return n.a
            elif n.kind in ("if", "range", "with"):
                return first_text(n.b) or first_text(n.c or [])
            elif n.kind == "action":
                return None
        return None

    node = find_if(parse_template(template).nodes)
    text = first_text(node.b) if node else None
    tag = (text or "").replace("\r\n", "\n").split("{", 1)[0].strip()
    return tag or "{"


def _tool_call_id():
    import secrets
    return "call_" + "".join(secrets.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(8))


class ToolCallParser:
    """Streaming tool-call parser (Ollama's tools.Parser): feed(text) -> (content, calls); done() -> content.

    Text before the tag is content. After the tag, each known tool name followed by a balanced JSON object
    becomes a call {"id", "function": {"index", "name", "arguments"}}. With a "{" or "[" tag, only output that
    starts with it is parsed. Output that never yields a call comes back as content from done().
    """

    def __init__(self, tools, tag="{"):
        self.tag = tag or "{"
        self.names = [((t.get("function") or {}).get("name") or "") for t in tools or []]
        self.names = [n for n in self.names if n]
        self.state = "looking"          # looking for the tag -> calling -> finished (all text is content)
        self.buffer = ""
        self.count = 0

    def feed(self, text):
        """Add model output; returns (content to emit now, list of tool calls completed)."""
        if self.state == "finished":
            return text, []
        self.buffer += text
        content = ""
        if self.state == "looking":
            i, found = self._find_tag()
            if i < 0:
                content, self.buffer = self.buffer, ""
            else:
                content, self.buffer = self.buffer[:i], self.buffer[i:]
            if self.tag in ("{", "[") and content.strip():
                self.state = "finished"
                content, self.buffer = content + self.buffer, ""
                return content, []
            if not found:
                return content, []
            self.state = "calling"
        calls = []
        while True:
            call = self._parse_call()
            if call is None:
                break
            calls.append(call)
        if self._balanced():
            self.state = "finished"
            content, self.buffer = content + self.buffer, ""
        return content, calls

    def done(self):
        """Content still held back at the end of output: all of it when no call was parsed."""
        rest, self.buffer = self.buffer, ""
        return rest if self.count == 0 else ""

    def _find_tag(self):
        i = self.buffer.find(self.tag)
        if i >= 0:
            return i, True
        for n in range(min(len(self.buffer), len(self.tag)), 0, -1):
            if self.buffer.endswith(self.tag[:n]):
                return len(self.buffer) - n, False
        return -1, False

    def _find_tool(self):
        """(name, end) of the earliest (then longest) tool name in the buffer; None while a name may be cut."""
        buf = self.buffer
        longest = max((len(n) for n in self.names), default=0)
        for i in range(1, min(len(buf), longest) + 1):
            tail = buf[-i:]
            if any(len(tail) < len(n) and n.startswith(tail) for n in self.names):
                return None
        best = None
        for n in self.names:
            pos = buf.find(n)
            if pos >= 0 and (best is None or pos < best[1] or (pos == best[1] and len(n) > len(best[0]))):
                best = (n, pos)
        return (best[0], best[1] + len(best[0])) if best else None

    def _find_arguments(self, name):
        """(arguments, index of the closing brace) from the first balanced JSON object that holds them."""
        start, depth, in_str, esc = -1, 0, False, False
        for i, c in enumerate(self.buffer):
            if esc:
                esc = False
                continue
            if c == "\\":
                esc = True
                continue
            if c == '"':
                in_str = not in_str
                continue
            if in_str:
                continue
            if c == "{":
                if depth == 0:
                    start = i
                depth += 1
            elif c == "}":
                depth -= 1
                if depth == 0 and start != -1:
                    try:
                        data = json.loads(self.buffer[start:i + 1])
                    except ValueError:
                        data = None
                    if not isinstance(data, dict):
                        start = -1
                        continue
                    found, args = _find_tool_args(data, name)
                    return (args if found else data), i
                depth = max(depth, 0)
        return None, 0

    def _parse_call(self):
        tool = self._find_tool()
        if tool is None:
            return None
        name, end = tool
        args, i = self._find_arguments(name)
        if args is None:
            return None
        call = {"id": _tool_call_id(), "function": {"index": self.count, "name": name, "arguments": args}}
        self.count += 1
        self.buffer = self.buffer[max(end, i):]
        return call

    def _balanced(self):
        """For "{"/"[" tags: the buffer holds a closed bracket pair that was not a call (send it as text)."""
        pair = {"{": "{}", "[": "[]"}.get(self.tag)
        if not pair:
            return False
        depth = 0
        for c in self.buffer:
            if c == pair[0]:
                depth += 1
            elif c == pair[1]:
                depth -= 1
                if depth == 0:
                    return True
        return False


def _find_tool_args(obj, name):
    """(found, arguments) in a parsed object: "arguments"/"parameters" next to "name", or a key named for
    the tool; nested objects and arrays are searched too. A named call without arguments gets {}."""
    def as_map(v):
        if isinstance(v, dict):
            return v
        if isinstance(v, str):
            try:
                v = json.loads(v)
            except ValueError:
                return None
            return v if isinstance(v, dict) else None
        return None
    if "name" in obj:
        for key in ("arguments", "parameters"):
            args = as_map(obj.get(key))
            if args is not None:
                return True, args
        return True, {}
    args = as_map(obj.get(name))
    if args is not None:
        return True, args
    for v in obj.values():
        for child in (v if isinstance(v, list) else [v]):
            if isinstance(child, dict):
                found, args = _find_tool_args(child, name)
                if found:
                    return True, args
    return False, None


# -- thinking --------------------------------------------------------------------

def infer_thinking_tags(template):
    """(opening, closing) thinking tags, e.g. ("<think>", "</think>"): the first and last text nodes of the
    list around .Thinking inside {{ range .Messages }}; ("", "") when the template has none."""
    tags = ["", ""]

    def uses_messages(pipe):
        return any(a.kind == "field" and a.a[0] == "Messages" for cmd in pipe.c for a in cmd) or any(
            a.kind == "pipe" and uses_messages(a) for cmd in pipe.c for a in cmd)

    def has_thinking(pipe):
        for cmd in pipe.c:
            for a in cmd:
                if (a.kind == "field" and a.a[0] == "Thinking") or (a.kind == "pipe" and has_thinking(a)):
                    return True
        return False

    def visit(nodes, in_range, lists):
        lists = lists + [nodes]
        for n in nodes:
            if n.kind == "action" and in_range and has_thinking(n.a):
                take(lists[-1])
            elif n.kind in ("if", "range", "with"):
                if in_range and has_thinking(n.a):
                    take(lists[-1])
                inner = in_range if n.kind != "range" else uses_messages(n.a)
                visit(n.b, inner, lists)
                if n.c is not None:
                    visit(n.c, inner, lists)

    def take(nodes):
        if nodes and nodes[0].kind == "text":
            tags[0] = nodes[0].a.strip()
        if nodes and nodes[-1].kind == "text":
            tags[1] = nodes[-1].a.strip()
    visit(parse_template(template).nodes, False, [])
    return tags[0], tags[1]


class ThinkingParser:
    """Streaming split of output into (thinking, content) around opening/closing tags (thinking.Parser).

    Whitespace after each tag is dropped; output that does not start with the opening tag has no thinking.
    """

    def __init__(self, opening="<think>", closing="</think>"):
        self.opening, self.closing = opening, closing
        self.state = "looking"          # looking -> started (eating space) -> thinking -> ended (eating space) -> done
        self.acc = ""

    def feed(self, text):
        """Add output; returns (thinking, content) that can be emitted now."""
        self.acc += text
        thinking, content = [], []
        more = True
        while more:
            t, c, more = self._eat()
            thinking.append(t)
            content.append(c)
        return "".join(thinking), "".join(content)

    def done(self):
        """(thinking, content) still buffered at the end of output."""
        rest, self.acc = self.acc, ""
        if self.state == "thinking":
            return rest, ""
        return "", rest if self.state in ("looking", "done") else rest.lstrip()

    def _eat(self):
        """One step over the buffer in the current state -> (thinking, content, more); `more` when
        the state moved on and the rest must be looked at again. A partial tag stays buffered."""
        acc = self.acc
        if self.state == "looking":
            trimmed = acc.lstrip()
            if trimmed.startswith(self.opening):
                after = trimmed[len(self.opening):].lstrip()
                self.acc = after
                self.state = "thinking" if after else "started"
                return "", "", True
            if self.opening.startswith(trimmed):            # a partial tag, or only whitespace so far
                return "", "", False
            self.state, self.acc = "done", ""
            return "", acc, False
        if self.state == "started":
            trimmed = acc.lstrip()
            self.acc = trimmed
            if not trimmed:
                return "", "", False
            self.state = "thinking"
            return "", "", True
        if self.state == "thinking":
            if self.closing in acc:
                thinking, rest = acc.split(self.closing, 1)
                rest = rest.lstrip()
                self.acc = ""
                self.state = "done" if rest else "ended"
                return thinking, rest, False
            n = _overlap(acc, self.closing)
            self.acc = acc[len(acc) - n:] if n else ""
            return acc[:len(acc) - n], "", False
        if self.state == "ended":
            trimmed = acc.lstrip()
            self.acc = ""
            if trimmed:
                self.state = "done"
            return "", trimmed, False
        self.acc = ""
        return "", acc, False


def _overlap(s, delim):
    """Length of the longest suffix of s that is a prefix of delim."""
    for n in range(min(len(s), len(delim)), 0, -1):
        if s.endswith(delim[:n]):
            return n
    return 0


###############################################################################
# Models ######################################################################
###############################################################################
# A stored model as its manifest and layers describe it, and what it can do.

class Model:
    """A stored model read from its manifest: weights path, projectors, adapters, template, system,
    params, messages, licenses, config. Build it with `load_model(store, name)`."""

    def __init__(self, name, manifest_raw, manifest, config, store):
        """Read the manifest's layers: paths of the weights, projectors, adapters and draft; the
        text of template, system and licenses and the parsed params and messages, read now.
        Without a template layer, DEFAULT_TEMPLATE (`has_template` says which)."""
        import hashlib
        self.name, self.manifest_raw, self.manifest, self.config = name, manifest_raw, manifest, config
        self.digest = hashlib.sha256(manifest_raw).hexdigest()
        self.model_path = None
        self.parent_model = ""
        self.projector_paths, self.adapter_paths, self.license = [], [], []
        self.draft_path = None                 # a speculative-decoding draft model (DRAFT)
        self.template, self.system, self.params, self.messages = DEFAULT_TEMPLATE, "", {}, []
        self.has_template = False              # else the GGUF's own chat template is used for chat
        self.size = sum(layer.get("size", 0) for layer in manifest.get("layers") or [])
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
            elif kind == "draft":
                self.draft_path = str(path)
            elif kind in ("template", "prompt"):
                self.template = path.read_text(encoding="utf-8", errors="replace")
                self.has_template = True
            elif kind == "system":
                self.system = path.read_text(encoding="utf-8", errors="replace")
            elif kind == "params":
                self.params = json.loads(path.read_bytes() or b"{}") or {}
            elif kind == "messages":
                self.messages = json.loads(path.read_bytes() or b"[]") or []
            elif kind == "license":
                self.license.append(path.read_text(encoding="utf-8", errors="replace"))
        self.store, self._parsed = store, store.parsed
        self._capabilities = None

    @property
    def short_name(self):
        return self.name.display()

    def gguf(self, max_array=0):
        """The weights' GGUF metadata (arrays skipped unless max_array is None); None if no weights."""
        if self.model_path is None:
            return None
        if max_array == 0:
            header = self._parsed.get(self.model_path)
            if header is None:
                try:
                    header = read_gguf(self.model_path, 0)
                except OllamaError as e:       # a blob never changes (its name is its hash): nor does this
                    header = e
                self._parsed[self.model_path] = header
            if isinstance(header, OllamaError):
                raise type(header)(str(header))  # a new one: raising the cached one would grow its traceback
            return header
        return read_gguf(self.model_path, max_array)

    def jinja_template(self):
        """The GGUF's tokenizer.chat_template when it is what renders chat, else None: for a model with
        no TEMPLATE layer, or one whose config names a RENDERER (Ollama's Go renderers, which ollama.py
        leaves to llama-server's Jinja engine and its tool-call and reasoning parsers)."""
        if (self.has_template and not self.config.get("renderer")) or not self.model_path:
            return None
        try:
            return self.gguf().chat_template or None
        except (OSError, OllamaError):
            return None

    def parsed_template(self):
        """The TEMPLATE parsed once per server (a request renders it, reads its Vars() and tags);
        TemplateError if it does not parse."""
        key = ("template", self.template)
        parsed = self._parsed.get(key)
        if parsed is None:
            parsed = self._parsed[key] = parse_template(self.template)
        return parsed

    def capabilities(self):
        """Ollama's Model.Capabilities: completion or embedding, vision, tools, insert, thinking."""
        if self._capabilities is None:
            self._capabilities = model_capabilities(self)
        return self._capabilities

    def modelfile(self):
        """The Modelfile text `ollama show --modelfile` prints (Model.String with its header)."""
        cmds = []
        if self.model_path:
            cmds.append(("model", self.model_path))
        cmds += [("adapter", p) for p in self.adapter_paths]
        cmds += [("model", p) for p in self.projector_paths]
        cmds += [("draft", self.draft_path)] if self.draft_path else []
        jinja = self.jinja_template()
        if not jinja or self.has_template:             # else a TEMPLATE {{ .Prompt }} would replace the GGUF's
            cmds.append(("template", self.template))
        if self.system:
            cmds.append(("system", self.system))
        cmds += [(k, self.config[k]) for k in ("renderer", "parser") if self.config.get(k)]
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

    def layout(self):
        """(text edits, projector edits) of the weights in Ollama's converter layout (ollama_layout),
        worked out once per server: a blob never changes, and deciding may read a whole vocabulary.
        (None, None) without weights or for a header the engine will report on."""
        key = ("layout", self.model_path)
        if key not in self._parsed:
            try:
                g = self.gguf()
                self._parsed[key] = ollama_layout(g, self.model_path) if g else (None, None)
            except (OSError, OllamaError):
                return None, None
        return self._parsed[key]

    def engine_notes(self):
        """ollama.py's own /api/show field `engine` (`show` prints it): what renders chat when it is the
        GGUF's Jinja template, and the Ollama layout translated as the model loads; {} for neither."""
        notes = {}
        if self.jinja_template():
            notes["chat"] = "the GGUF's Jinja template, with llama.cpp's parsers"
        families = [e.family for e in self.layout() if e]
        if families:
            notes["layout"] = "Ollama's %s, translated as it loads" % " + ".join(families)
        return notes

    def parameters_text(self, params=None):
        """/api/show `parameters`: Go's "%-30s %#v" per value, one line per list item."""
        params = self.params if params is None else params
        lines = []
        for k in sorted(params):
            v = params[k]
            for item in (v if isinstance(v, list) else [v]):
                lines.append("%-30s %s" % (k, go_sprint(item, sharp=True)))
        return "\n".join(lines)


def refuse_unrunnable(manifest, name):
    """BadRequest, before any blob is fetched, for the manifest of `name` (a Name) whose weights are in
    Ollama's safetensors layout (application/vnd.ollama.image.tensor layers: Ollama's MLX engine, on
    Apple silicon), which llama.cpp cannot run. Such a model already in the store still lists, shows
    and removes."""
    if any(layer.get("mediaType") == MEDIA_TENSOR for layer in manifest.get("layers") or []):
        raise BadRequest("%s is stored as safetensors tensors (%s layers), which Ollama runs with its MLX "
                         "engine on Apple silicon; llama.cpp cannot run it, so ollama.py does not pull it: "
                         "pull a GGUF tag of the model instead" % (name.display(), MEDIA_TENSOR))


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


RANK_POOLING = 4                  # llama.cpp's LLAMA_POOLING_TYPE_RANK: a reranker (bge-reranker, Qwen3-Reranker)

#: What a GGUF's Jinja chat template must mention for a capability (llama.cpp's common_chat detects
#: tool and reasoning formats from the same text).
JINJA_CAPABILITIES = {"tools": ("tools",), "thinking": ("reasoning_content", "<think>", "enable_thinking")}


def model_capabilities(model):
    """The capabilities of a Model, as Ollama's server/images.go Capabilities decides them.

    completion (or embedding when the GGUF has <arch>.pooling_type, rerank when that is 4, a
    reranker's), vision (a vision block or a
    projector), tools (the template's Vars() include .Tools), insert (.Suffix), thinking (.Thinking,
    or a gpt-oss family).
    """
    caps = []
    g = None
    if model.model_path:
        try:
            g = model.gguf()
        except (OSError, OllamaError) as e:
            log.error("couldn't open model file: %s", e)
    if g is not None:
        rank = g.is_embedding and g.kv.get(g.key("pooling_type")) == RANK_POOLING
        caps.append("rerank" if rank else "embedding" if g.is_embedding else "completion")
        if g.key("vision.block_count") in g.kv:
            caps.append("vision")
    elif model.config.get("capabilities"):
        caps.extend(model.config["capabilities"])
    try:
        names = model.parsed_template().vars()
    except TemplateError as e:
        log.warning("template of %s does not parse: %s", model.short_name, e)
        names = set()
    jinja = model.jinja_template()
    if jinja:                     # llama.cpp's chat machinery renders it: what it mentions, it can do
        names = set(names) | {n for n, says in JINJA_CAPABILITIES.items() if any(w in jinja for w in says)}
    if "tools" in names:
        caps.append("tools")
    if "suffix" in names:
        caps.append("insert")
    if model.projector_paths and "vision" not in caps:
        caps.append("vision")
    if "thinking" not in caps and ("thinking" in names
                                   or model.config.get("model_family") in ("gptoss", "gpt-oss")):
        caps.append("thinking")
    return caps


def embedding_pooling(model):
    """The GGUF's `<arch>.pooling_type` (llama.cpp's enum: 0 none, 1 mean, 2 cls, 3 last, 4 rank),
    or None when the model declares none (Ollama's rule: then it is a completion model)."""
    try:
        g = model.gguf()
    except (OSError, OllamaError):
        return None
    return g.kv.get(g.key("pooling_type")) if g is not None else None


def is_embedding_model(model):
    """True for a model that only embeds (has "embedding" capability and no "completion")."""
    caps = model.capabilities()
    return "embedding" in caps and "completion" not in caps


WEBP_DECODER = "dwebp"             # libwebp's command-line decoder (Debian: apt install webp; brew install webp)


WEBP_MAX_PIXELS = 32 << 20        # a WebP bigger than this (decoded, 3 bytes a pixel) is refused, not decoded


def image_data(value):
    """One api.ImageData: base64 (Go's []byte in JSON), checked and given back in standard padding,
    a WebP converted to PNG (as Ollama's llama_server.go does: llama.cpp's image loader cannot read
    WebP). Bad base64 is Go's unmarshal error, a 400."""
    try:
        raw = base64.b64decode(value, validate=True)
    except ValueError:
        clean = value.rstrip("=")
        at = next((i for i, c in enumerate(clean) if not (c.isalnum() and c.isascii() or c in "+/")), len(clean))
        raise BadRequest("illegal base64 data at input byte %d" % at) from None
    if raw[:4] == b"RIFF" and raw[8:12] == b"WEBP":
        raw = webp_to_png(raw)
    return base64.b64encode(raw).decode()


def webp_size(raw):
    """(width, height) from a WebP's first chunk (VP8X canvas, VP8 key frame or VP8L header); None
    when the header is not one of those."""
    fourcc = raw[12:16]
    if fourcc == b"VP8X" and len(raw) >= 30:
        return 1 + int.from_bytes(raw[24:27], "little"), 1 + int.from_bytes(raw[27:30], "little")
    if fourcc == b"VP8 " and len(raw) >= 30 and raw[23:26] == b"\x9d\x01\x2a":
        return int.from_bytes(raw[26:28], "little") & 0x3FFF, int.from_bytes(raw[28:30], "little") & 0x3FFF
    if fourcc == b"VP8L" and len(raw) >= 25 and raw[20] == 0x2F:
        bits = int.from_bytes(raw[21:25], "little")
        return 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
    return None


def webp_to_png(raw):
    """A WebP image's bytes as PNG, through libwebp's dwebp (stdin to stdout); a 400 that says what
    to install when it is not on PATH, and for an image that is not a WebP it can decode."""
    import shutil
    import subprocess
    size = webp_size(raw)
    if size is None:
        raise BadRequest("decode WebP image: unknown WebP header")
    if size[0] * size[1] > WEBP_MAX_PIXELS:
        raise BadRequest("decode WebP image: %dx%d is more than %d pixels" % (size + (WEBP_MAX_PIXELS,)))
    exe = shutil.which(WEBP_DECODER)
    if not exe:
        raise BadRequest("WebP images need libwebp's %s on PATH (apt install webp, or brew install webp): "
                         "ollama.py converts them to PNG for the engine" % WEBP_DECODER)
    try:
        out = subprocess.run([exe, "-quiet", "-o", "-", "--", "-"], input=raw, capture_output=True, timeout=60)
    except subprocess.TimeoutExpired:
        raise BadRequest("decode WebP image: %s took more than 60 s" % WEBP_DECODER) from None
    if out.returncode != 0 or not out.stdout.startswith(b"\x89PNG\r\n\x1a\n"):
        why = out.stderr.decode(errors="replace").strip().splitlines()
        raise BadRequest("decode WebP image: %s" % (why[-1] if why else "%s failed" % WEBP_DECODER))
    return out.stdout


# == Models: create ===========================================================
# A model's layers, config and manifest, written as Ollama's create writes them.


class CreateSpec:
    """What a create asks for, checked: the name; a `from` model or GGUF blobs by file name (`files`:
    the model, a projector or an adapter among them is laid as one; `adapters`, `drafts`: theirs);
    a quantization level; `fields`: template, system, license (a string or a list), and renderer,
    parser and requires for the config; the PARAMETERs and MESSAGEs."""

    def __init__(self, name, from_name=None, files=None, adapters=None, drafts=None, level=None, fields=None,
                 parameters=None, messages=()):
        self.name, self.from_name, self.level = name, from_name, level
        self.files, self.adapters, self.drafts = files or {}, adapters or {}, drafts or {}
        self.fields, self.parameters, self.messages = fields or {}, parameters or {}, list(messages)


def create_model(store, spec, pull, quantize, prune=True):
    """Create `spec.name` in `store`, yielding Ollama's statuses ("parsing GGUF", "using existing
    layer ...", "writing manifest", and "success" last). `pull(name)` yields the progress of pulling a
    `from` model that is not stored; `quantize(level, digests)` yields progress and returns {source
    digest: (digest, size)} (llama-quantize, in Runner). The store lock is held while layers and the
    manifest are written; with `prune`, blobs only the replaced manifest used are removed."""
    from_name = spec.from_name
    if from_name is not None and store.resolve(from_name) is None:
        yield from pull(from_name)
    quantized = {}                                  # source digest -> (digest, size) of its quantized blob
    if spec.level:
        quantized = yield from quantize(spec.level, _model_digests(store, from_name, spec.files))
    statuses, created = [], set()
    with store.lock:
        layers, config = _base_layers(store, from_name)
        ggufs = []
        for kind, table in (("model", spec.files), ("adapter", spec.adapters), ("draft", spec.drafts)):
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
        fields = spec.fields
        for k in ("renderer", "parser", "requires"):
            if fields.get(k):
                config[k] = fields[k]
        for la in layers:
            if la["digest"] in quantized:
                la["digest"], la["size"] = quantized[la["digest"]]
                created.add(la["digest"])
                config["file_type"] = spec.level

        def replace(media, data):
            layers[:] = [la for la in layers if la["mediaType"] != MEDIA_PREFIX + media]
            layers.append(_new_layer(store, data, MEDIA_PREFIX + media, created))

        if fields.get("template"):
            replace("template", fields["template"].encode())
        if fields.get("system"):
            replace("system", fields["system"].encode())
        license_ = fields.get("license")
        for text in ([license_] if isinstance(license_, str) else license_ or []):
            if text:
                layers.append(_new_layer(store, text.encode(), MEDIA_PREFIX + "license", created))
        merged = dict(spec.parameters)
        for layer in layers:
            if layer["mediaType"] == MEDIA_PREFIX + "params":
                existing = json.loads(store.blob_path(layer["digest"]).read_bytes() or b"{}") or {}
                for k, v in existing.items():
                    merged.setdefault(k, v)
        if merged:
            replace("params", (go_json(merged, sort_keys=True) + "\n").encode())
        if spec.messages:
            replace("messages", (go_json([_message_struct(m) for m in spec.messages]) + "\n").encode())

        config_raw = (go_json(_config_struct(config, layers)) + "\n").encode()
        config_digest, config_size = store.write_blob_bytes(config_raw)
        manifest = {"schemaVersion": 2, "mediaType": MEDIA_MANIFEST,
                    "config": _layer(MEDIA_CONFIG, config_digest, config_size), "layers": layers}
        old = store.resolve(spec.name)
        old_digests = manifest_digests(store.get(old)[2]) if old is not None else []
        statuses += ["%s %s" % ("creating new layer" if la["digest"] in created else "using existing layer",
                                la["digest"]) for la in layers]
        statuses.append("writing manifest")
        store.write_manifest(spec.name, (go_json(manifest) + "\n").encode())
        if old_digests and prune:
            store.remove_unused(old_digests)
        store.remove_unused(quantized)          # the unquantized source stays only if a model uses it
    for status in statuses:
        yield {"status": status}
    yield {"status": "success"}


def _base_layers(store, from_name):
    """The layers (each marked as from its model) and config a create starts from: the `from`
    model's, or none. NotFound when one of its blobs is missing."""
    if from_name is None:
        return [], {}
    base = load_model(store, from_name)
    config = {k: v for k, v in base.config.items() if k not in ("architecture", "os", "rootfs")}
    source = base.name.display()
    layers = []
    for layer in base.manifest.get("layers") or []:
        if not store.has_blob(layer["digest"]):
            raise NotFound('model "%s" not found, try pulling it first' % source)
        layers.append(_layer(layer["mediaType"], layer["digest"], store.blob_size(layer["digest"]), source))
    return layers, config


def _model_digests(store, from_name, files):
    """The model-weight blobs a create would use: the `from` model's model layers, else the files
    that are GGUF models (not adapters or projectors)."""
    if from_name is not None:
        return [la["digest"] for la in load_model(store, from_name).manifest.get("layers") or []
                if la["mediaType"] == MEDIA_PREFIX + "model"]
    out = []
    for path in sorted(files):
        digest = parse_digest(files[path])
        if not store.has_blob(digest):
            raise BadRequest("blob not found for %s (digest %s)" % (path, digest))
        g = read_gguf(store.blob_path(digest), 0)
        if g.kind != "adapter" and not g.is_projector:
            out.append(digest)
    return out


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


def _layer(media, digest, size, source=None):
    out = {"mediaType": media, "digest": digest, "size": size}
    if source:
        out["from"] = source
    return out


def _new_layer(store, data, media, created):
    """A layer for bytes written now; its digest goes into `created` when the blob is new."""
    import hashlib
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    if not store.has_blob(digest):
        store.write_blob_bytes(data)
        created.add(digest)
    return _layer(media, digest, len(data))


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


###############################################################################
# Registry ####################################################################
###############################################################################
# Talking to OCI registries: the Ed25519 keys Ollama signs with, and pull and push.

# == Registry: keys: ed25519 (RFC 8032) and the OpenSSH key files =============

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
    import hashlib
    return int.from_bytes(hashlib.sha512(b"".join(parts)).digest(), "little") % _ED_L


class Ed25519Key:
    """An Ed25519 private key (RFC 8032), as Ollama keeps in ~/.ollama/id_ed25519.

    `seed` is the 32-byte private key, `public` the 32-byte encoded public key.
    """

    def __init__(self, seed):
        import hashlib
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
        import secrets
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
        import secrets
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
            raise OllamaError("ssh: no key found") from None
        if not body.startswith(_OPENSSH_MAGIC):
            raise OllamaError("ssh: invalid openssh private key format")
        r = _SSHReader(body[len(_OPENSSH_MAGIC):])
        cipher, kdf = r.string(), r.string()
        r.string()                                      # kdf options: empty for kdf "none"
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
    import tempfile
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
    import hashlib
    digest = hashlib.sha256(body).hexdigest().encode("ascii")
    return sign_auth(key, "%s,%s,%s" % (method, url, base64.b64encode(digest).decode("ascii")))


# == Registry: client: OCI distribution pull and push =========================
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
    return sign_challenge(ensure_keypair(config.home), method, url)


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


def _registry_opener():
    """A urllib opener that follows redirects, the registry's Authorization going along only to the
    same scheme+host+port (blob storage elsewhere gets a plain request, as Ollama does)."""
    import urllib.request  # here and in RegistrySession._open, not at the top: only serve reaches registries

    class KeepAuthOnSameHost(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, req, fp, code, msg, headers, newurl):
            new = super().redirect_request(req, fp, code, msg, headers, newurl)
            auth = req.unredirected_hdrs.get("Authorization")
            if new is not None and auth:
                old, nxt = urllib.parse.urlsplit(req.full_url), urllib.parse.urlsplit(new.full_url)
                if (old.scheme, old.netloc.lower()) == (nxt.scheme, nxt.netloc.lower()):
                    new.add_unredirected_header("Authorization", auth)
            return new
    return urllib.request.build_opener(KeepAuthOnSameHost())


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
        self.opener = _registry_opener()
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
        """Send one request as it is -> the response, error statuses included (401s
        are request()'s to answer). Authorization goes only to the registry's own host. A failed
        connection is an OllamaError naming method and URL (TLS to a plain-HTTP registry: use
        --insecure)."""
        import urllib.error
        import http.client
        import ssl
        import urllib.request
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
            if scheme == "bearer" and params.get("realm") == "ollama.py":    # another serve's OLLAMA_API_KEYS
                if not self.config.api_key or self.auth or not self._may_send_api_key():
                    return False
                self.auth = "Bearer " + self.config.api_key
                return True
            if scheme != "bearer" or not params.get("realm"):
                return False
            self.auth = "Bearer " + self._token(params, creds)
            return True

    def _may_send_api_key(self):
        """OLLAMA_API_KEY goes only where the user sent it: a registry named in OLLAMA_REGISTRY_MIRRORS
        (over plain HTTP if that is how it was named) or one on this machine. Any API client can name
        a registry to pull from, and any registry can ask for the key with an "ollama.py" challenge."""
        host = self.name.host.lower()
        if _is_loopback(urllib.parse.urlsplit("//" + host).hostname):
            return True
        return host in {m.rpartition("://")[2].rstrip("/").lower() for m in self.config.mirrors}

    def _token(self, params, creds):
        """A bearer token from the challenge's realm for its service and scopes,
        asked with the docker config's credentials, else (registry.ollama.ai) Ollama's signature,
        else anonymously. Unauthorized (401) when the token server refuses, else OllamaError."""
        import secrets
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
    import http.client
    try:
        with resp:
            return resp.read(4096).decode(errors="replace").strip()
    except (OSError, http.client.HTTPException, AttributeError):
        return ""


class Transfers:
    """The server's registry transfer state: one shared download per digest (two pulls of the same
    blob share it), plus the knobs below (tests shrink them)."""

    def __init__(self, metrics=None):
        self.lock = threading.Lock()
        self.metrics = metrics or Metrics()     # the server's: pulled and pushed bytes are counted there
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
        """The download's thread: prepare, then fetch the parts. An error is kept for every
        waiter; a cancelled download takes itself out of the Transfers' jobs as it ends."""
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
        """Lay out the partial file and its part records: resumed from those on disk
        when they are consistent, else new parts of part_size() each; the data file is opened at
        its full size."""
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
        """Fetch the unfinished parts on up to max_parallel threads, then fsync. The
        first error stops the others and is raised (a real one before a Canceled); Canceled when
        the download was cancelled."""
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
        """Fetch one part to its end, retrying with exponential backoff (a stalled range at
        once) up to `retries` times; a full disk, Unauthorized and cancellation are not retried."""
        import http.client  # loaded already (RegistrySession uses urllib); the name, for its errors
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
        """One GET of the part's missing bytes, written in place and checkpointed
        every checkpoint_interval (and at the end, even after an error). A registry that ignores
        Range is read from byte 0, the bytes before the range skipped. Returns early when the
        download stops."""
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
                self.t.metrics.add("ollama_pull_bytes_total", len(chunk))
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
        """finish()'s work: hash the partial file and rename it to its blob,
        durably; a mismatch deletes it and its part records (digest_mismatch). Nothing to do when
        the blob is already stored."""
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


def pull_sources(config, name, insecure=False):
    """Where to pull `name` from, in order: [(Name to fetch, insecure)]. For a registry.ollama.ai
    name, each of OLLAMA_REGISTRY_MIRRORS first (host:port is plain HTTP, as an ollama.py serve
    answers; https://host for TLS), then the registry itself; for other names, their registry."""
    sources = []
    if name.host.lower() == DEFAULT_REGISTRY:
        for mirror in config.mirrors:
            scheme, _, host = mirror.rpartition("://")
            mirrored = Name(host.rstrip("/"), name.namespace, name.model, name.tag, scheme or "http")
            if not mirrored.is_valid():
                log.warning("ignoring invalid OLLAMA_REGISTRY_MIRRORS entry %r", mirror)
                continue
            sources.append((mirrored, mirrored.scheme == "http"))
    return sources + [(name, insecure)]


def pull_model(store, transfers, config, name, insecure=False, progress=None, cancel=None):
    """Pull `name` (Name or str) from its registry into `store`, sharing downloads through
    `transfers` (a Transfers) and reading credentials, OLLAMA_NOPRUNE and OLLAMA_REGISTRY_MIRRORS from
    `config`; reports Ollama's pull statuses as dicts to progress(obj). Blobs already present are
    not fetched; a download in progress for the same digest is shared; interrupted downloads resume.
    With mirrors, each source is tried in turn (a failed one's partial downloads are resumed from the
    next) and "pulling from HOST" / "pulled from HOST" say which served it. The manifest is written
    last, byte for byte as received, under `name`. `cancel` (threading.Event) stops it with Canceled."""
    progress = progress or (lambda obj: None)
    if isinstance(name, str):
        name = Name.parse(name)
    old = set()
    stored = store.resolve(name)
    if stored is not None and not config.noprune:
        try:
            old = set(manifest_digests(store.get(stored)[2]))
        except (OSError, ValueError, OllamaError):
            pass
    if name.scheme == "http" and not insecure:
        raise OllamaError("insecure protocol http")
    sources = pull_sources(config, name, insecure)
    for i, (source, source_insecure) in enumerate(sources):
        if len(sources) > 1:
            progress({"status": "pulling from %s" % source.host})
        try:
            raw, manifest = _pull_blobs(store, transfers, config, source, source_insecure, progress, cancel)
            break
        except Canceled:
            raise
        except OllamaError as e:
            if i == len(sources) - 1:
                raise
            log.warning("pull of %s from %s failed: %s; trying %s", name.display(), source.host, e,
                        sources[i + 1][0].host)
            progress({"status": "%s failed: %s" % (source.host, e)})
    progress({"status": "writing manifest"})
    store.write_manifest(name, raw)
    unused = old - set(manifest_digests(manifest))
    if unused:
        progress({"status": "removing unused layers"})
        store.remove_unused(unused)
    if len(sources) > 1:
        progress({"status": "pulled from %s" % source.host})
    progress({"status": "success"})


def _pull_blobs(store, transfers, config, name, insecure, progress, cancel):
    """Fetch the manifest of `name` from its registry and every blob it names that the store lacks
    (verified); returns (raw manifest bytes, manifest dict). Nothing is written but blobs."""
    import http.client  # loaded already (RegistrySession uses urllib); the name, for its errors
    progress({"status": "pulling manifest"})
    session = RegistrySession(config, name, insecure, transfers.stall_timeout)
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
    refuse_unrunnable(manifest, name)

    jobs = []
    try:
        for desc in manifest_layers(manifest):
            digest = desc["digest"]
            if store.has_blob(digest):
                size = store.blob_size(digest)
                progress({"status": "pulling %s" % digest[7:19], "digest": digest, "total": size,
                          "completed": size})
                continue
            job = transfers.acquire(digest, lambda digest=digest, size=desc["size"]: _BlobDownload(
                transfers, store, session, name.repository(), digest, size))
            jobs.append(job)
            job.wait(progress, cancel)
        progress({"status": "verifying sha256 digest"})
        for job in jobs:
            job.finish()
    finally:
        for job in jobs:
            transfers.release(job)
    return raw, manifest


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
    """Push one layer (`desc`, a manifest descriptor) of `name`, reporting "pushing <digest>"
    progress: nothing is sent when the registry has the blob, a cross-repository mount when the
    layer came from another repository there, else PATCH chunks and a closing PUT."""
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
        transfers.metrics.add("ollama_push_bytes_total", n)
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


def push_model(store, transfers, config, name, insecure=False, progress=None, cancel=None):
    """Push `name` (Name or str) from `store` to its registry: each blob the registry lacks
    (HEAD) is mounted or uploaded in PATCH chunks, then the manifest is PUT byte for byte as
    stored. Reports Ollama's push statuses as dicts to progress(obj)."""
    progress = progress or (lambda obj: None)
    if isinstance(name, str):
        name = Name.parse(name)
    progress({"status": "retrieving manifest"})
    if name.scheme == "http" and not insecure:
        raise OllamaError("insecure protocol http")
    try:
        stored, raw, manifest = store.get(name)
        manifest = parse_manifest(raw)
    except OllamaError:
        progress({"status": "couldn't retrieve manifest"})
        raise
    session = RegistrySession(config, stored, insecure, transfers.stall_timeout)
    for desc in manifest_layers(manifest):
        _upload_blob(session, store, stored, desc, transfers, progress, cancel)
    progress({"status": "pushing manifest"})
    media = manifest.get("mediaType") or MEDIA_MANIFEST
    resp = session.request("PUT", manifest_url(session.base, stored), {"Content-Type": media}, raw)
    resp.close()
    progress({"status": "success"})


# == Registry: archives: OCI image layout tarballs (export, import) ===========
#
# An archive is an OCI image layout in a tar: oci-layout, index.json (one descriptor per model, its
# name in org.opencontainers.image.ref.name) and blobs/sha256/<hex> (manifests, configs, layers,
# each once however many models share it). export streams it in constant memory; import verifies
# every member before anything enters the store.

MEDIA_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_REF_NAME = "org.opencontainers.image.ref.name"
OCI_LAYOUT = b'{"imageLayoutVersion":"1.0.0"}'
TAR_BLOCK = 512                      # bytes; tar pads every member to a whole block
ARCHIVE_META_MAX = 4 << 20           # bytes; the most index.json, oci-layout or a manifest may be
ARCHIVE_HEADER_MAX = 1 << 20         # bytes; the most a PAX or GNU long-name header may be (tarfile reads it whole)
_ARCHIVE_BLOB_RE = re.compile(r"^blobs/sha256/([0-9a-f]{64})$")


def _tar_header(name, size, mtime):
    import tarfile  # here and in import_archive, not at the top: only export/import use it (~2 ms)
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.type = size, int(mtime), 0o644, tarfile.REGTYPE
    return info.tobuf(tarfile.USTAR_FORMAT)


def _tar_padding(size):
    return b"\0" * (-size % TAR_BLOCK)


def archive_plan(store, names):
    """What an archive of the models `names` holds: ([(member, size, path or bytes)], the tar's size
    in bytes). NotFound for a model not in the store, before anything is sent."""
    import hashlib
    descs, members, seen = [], [("oci-layout", len(OCI_LAYOUT), OCI_LAYOUT)], set()
    for text in names:
        found, raw, _data = store.get(text)
        manifest = parse_manifest(raw)
        digest = "sha256:" + hashlib.sha256(raw).hexdigest()
        descs.append({"mediaType": manifest.get("mediaType") or MEDIA_MANIFEST, "digest": digest,
                      "size": len(raw), "annotations": {OCI_REF_NAME: found.display()}})
        for d, size, source in [(digest, len(raw), raw)] + [
                (x["digest"], x["size"], store.blob_path(x["digest"])) for x in manifest_layers(manifest)]:
            if d not in seen:
                seen.add(d)
                members.append(("blobs/sha256/" + d[7:], size, source))
    index = json_dumps({"schemaVersion": 2, "mediaType": MEDIA_OCI_INDEX, "manifests": descs}).encode()
    members.insert(1, ("index.json", len(index), index))
    total = sum(TAR_BLOCK + size + len(_tar_padding(size)) for _m, size, _s in members) + 2 * TAR_BLOCK
    return members, total


def archive_chunks(members, progress=None):
    """Yield the tar bytes of archive_plan's members, a blob at a time in COPY_CHUNK reads.
    OllamaError when a blob is missing or not its manifest's size (the archive would be wrong)."""
    now, sent = time.time(), 0
    for name, size, source in members:
        yield _tar_header(name, size, now)
        if isinstance(source, bytes):
            yield source
        else:
            try:
                f = open(str(source), "rb")
            except OSError as e:
                raise OllamaError("cannot read %s: %s" % (source.name, e.strerror)) from None
            with f:
                if os.fstat(f.fileno()).st_size != size:
                    raise OllamaError("blob %s is not %d bytes; the store is damaged" % (source.name, size))
                left = size
                while left:
                    chunk = f.read(min(COPY_CHUNK, left))
                    if not chunk:
                        raise OllamaError("blob %s shrank while it was exported" % source.name)
                    left -= len(chunk)
                    yield chunk
        yield _tar_padding(size)
        sent += size
        if progress:
            progress(sent)
    yield b"\0" * (2 * TAR_BLOCK)


def _archive_tarinfo():
    """A tarfile.TarInfo class for reading archives we did not write: it refuses, as BadRequest and
    before tarfile acts on them, extension headers over ARCHIVE_HEADER_MAX (tarfile reads them into
    memory whole) and sparse members (tarfile expands their holes: a few KB sent would write GBs;
    an OCI layout never holds one). The hooks are tarfile's own dispatch methods, the same 3.9-3.13."""
    import tarfile

    def sparse(*_args):
        raise BadRequest("refusing archive: it holds a sparse member, which an OCI image layout never does")

    class ArchiveTarInfo(tarfile.TarInfo):
        def _proc_member(self, tar):
            if self.type in (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE,
                             tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE) and self.size > ARCHIVE_HEADER_MAX:
                raise BadRequest("refusing archive: a %d-byte extension header (the most is %d)"
                                 % (self.size, ARCHIVE_HEADER_MAX))
            if self.type == tarfile.GNUTYPE_SPARSE:
                sparse()
            return super()._proc_member(tar)

        _proc_gnusparse_00 = _proc_gnusparse_01 = _proc_gnusparse_10 = sparse   # PAX sparse 0.0, 0.1, 1.0

    return ArchiveTarInfo


def _archive_member_name(member):
    """The member's path, or BadRequest for anything an OCI layout must not hold: absolute paths,
    "..", links, devices, fifos."""
    name = member.name
    while name.startswith("./"):
        name = name[2:]
    if name.startswith("/") or ".." in name.split("/") or "\\" in name:
        raise BadRequest("refusing archive member %s: it points outside the archive" % json.dumps(member.name))
    if member.issparse() or any(k.startswith("GNU.sparse.") for k in member.pax_headers):
        raise BadRequest("refusing archive member %s: it is sparse" % json.dumps(member.name))
    if not (member.isreg() or member.isdir()):
        kind = "a link" if member.issym() or member.islnk() else "a device or fifo"
        raise BadRequest("refusing archive member %s: it is %s" % (json.dumps(member.name), kind))
    return name.rstrip("/")


class _Staged:
    """Blobs of an archive being imported: temp files in blobs/ (locked, so `clean` leaves them while
    we live and removes them after a kill), each hashed as it was copied and named by its digest."""

    def __init__(self, store):
        self.store, self.files, self.meta = store, {}, {}      # digest -> (file, tmp path, size); name -> bytes

    def add_blob(self, digest, reader, size, progress):
        """Copy `size` bytes of an archive member from `reader` into a temp blob, hashing
        them; progress(n) per chunk. BadRequest (400) when the member ends early or does not match
        `digest`; a second member with the same digest is checked, then discarded."""
        import hashlib
        f, tmp = self.store.temp_blob()
        first = self.files.setdefault(digest, (f, tmp, size))[1] == tmp
        try:
            h, left = hashlib.sha256(), size
            while left:
                chunk = reader.read(min(COPY_CHUNK, left))
                if not chunk:
                    raise BadRequest("archive is truncated: blob %s ends early" % digest[7:19])
                h.update(chunk)
                f.write(chunk)
                left -= len(chunk)
                progress(len(chunk))
            if "sha256:" + h.hexdigest() != digest:
                raise BadRequest("archive blob %s does not match its digest" % digest[7:19])
        finally:
            if not first:                                      # a duplicate member: keep the first; discard
                f.close()                                      # only knows the first, so this one goes now
                _unlink(tmp)

    def read(self, digest):
        f, _tmp, size = self.files[digest]
        if size > ARCHIVE_META_MAX:
            raise BadRequest("archive manifest %s is too large" % digest[7:19])
        f.flush()
        with open(str(self.files[digest][1]), "rb") as r:
            return r.read()

    def commit(self, digests):
        for d in digests:
            f, tmp, _size = self.files.pop(d)
            if not self.store.has_blob(d):
                f.flush()
                os.fsync(f.fileno())
                self.store.commit_blob(tmp, d)
            f.close()
            _unlink(tmp)

    def discard(self):
        for f, tmp, _size in self.files.values():
            f.close()
            _unlink(tmp)
        self.files.clear()


def import_archive(store, stream, name=None, progress=None):
    """Import the models of an OCI image layout tar read from `stream` (a file-like object) into
    `store`; returns their Names. Every member is checked and every blob hashed before a blob or
    manifest enters the store: a truncated, hostile or inconsistent archive raises BadRequest and
    leaves the store as it was. `name` names the model of a one-model archive (else its ref.name).
    progress(bytes) reports the blob bytes read so far."""
    import tarfile  # see _tar_header
    progress = progress or (lambda n: None)
    staged, state = _Staged(store), {"read": 0}

    def count(n):
        state["read"] += n
        progress(state["read"])

    try:
        try:
            with tarfile.open(fileobj=stream, mode="r|", tarinfo=_archive_tarinfo()) as tar:
                for member in tar:
                    path = _archive_member_name(member)
                    if member.isdir():
                        continue
                    m = _ARCHIVE_BLOB_RE.match(path)
                    reader = tar.extractfile(member)
                    if m:
                        staged.add_blob("sha256:" + m.group(1), reader, member.size, count)
                    elif path in ("oci-layout", "index.json") and member.size <= ARCHIVE_META_MAX:
                        staged.meta[path] = reader.read()
                        if len(staged.meta[path]) != member.size:
                            raise BadRequest("archive is truncated: %s ends early" % path)
                    else:
                        raise BadRequest("refusing archive member %s: not part of an OCI image layout"
                                         % json.dumps(member.name))
        except (tarfile.TarError, EOFError) as e:
            raise BadRequest("archive is not a complete tar: %s" % e) from None
        models = _archive_models(staged, name)
        with store.lock:
            needed = set()                   # the layers and configs: manifests live under manifests/ only
            for _n, _raw, manifest in models:
                needed.update(d for d in manifest_digests(manifest) if d in staged.files)
            staged.commit(sorted(needed))
            for n, raw, _manifest in models:
                store.write_manifest(n, raw)
        return [n for n, _raw, _m in models]
    finally:
        staged.discard()


def _archive_models(staged, name):
    """[(Name, manifest bytes, manifest dict)] the archive's index.json names, all checked."""
    try:
        layout = json.loads(staged.meta["oci-layout"])
        index = json.loads(staged.meta["index.json"])
    except KeyError as e:
        raise BadRequest("not an OCI image layout: %s is missing" % e) from None
    except ValueError as e:
        raise BadRequest("not an OCI image layout: bad JSON: %s" % e) from None
    if not isinstance(layout, dict) or layout.get("imageLayoutVersion") != "1.0.0":
        raise BadRequest("not an OCI image layout: unsupported oci-layout")
    descs = index.get("manifests") if isinstance(index, dict) else None
    if not isinstance(descs, list) or not descs:
        raise BadRequest("index.json lists no manifests")
    if name is not None and len(descs) != 1:
        raise BadRequest("a name can only be given for an archive of one model")
    models = []
    for desc in descs:
        if not isinstance(desc, dict) or not is_strict_digest(desc.get("digest")):
            raise BadRequest("index.json has an invalid manifest descriptor")
        digest = desc["digest"]
        if desc.get("mediaType") not in MANIFEST_MEDIA_TYPES:
            raise BadRequest("unsupported manifest type %s in index.json" % json.dumps(desc.get("mediaType")))
        if digest not in staged.files or staged.files[digest][2] != desc.get("size"):
            raise BadRequest("archive is missing manifest %s" % digest[7:19])
        raw = staged.read(digest)
        try:
            manifest = parse_manifest(raw)
        except OllamaError as e:
            raise BadRequest(str(e)) from None
        for d in manifest_layers(manifest):
            have = staged.files.get(d["digest"])
            if have is None and not staged.store.has_blob(d["digest"]):
                raise BadRequest("archive is missing blob %s" % d["digest"][7:19])
            size = have[2] if have else staged.store.blob_size(d["digest"])
            if size != d["size"]:
                raise BadRequest("archive blob %s is %d bytes, its manifest says %d" % (
                    d["digest"][7:19], size, d["size"]))
        ref = name or (desc.get("annotations") or {}).get(OCI_REF_NAME)
        if not isinstance(ref, str) or not ref:
            raise BadRequest("manifest %s has no %s annotation; give the model a name" % (digest[7:19], OCI_REF_NAME))
        model = Name.parse_bare(ref)
        if model is None or not model.is_valid():
            raise BadRequest("invalid model name %s in the archive" % json.dumps(ref[:200]))
        models.append((model, raw, manifest))
    return models

###############################################################################
# Runner ######################################################################
###############################################################################
# One llama-server child per loaded model: its argv, its life, and the HTTP calls to it.

#: Request options that decide how llama-server is started; a change in any of them reloads.
LOAD_OPTIONS = ("num_ctx", "num_batch", "num_gpu", "main_gpu", "use_mmap", "num_thread", "draft_num_predict",
                "speculative")

#: Ollama sampling option -> llama-server /completion field.
SAMPLING_FIELDS = {
    "num_predict": "n_predict", "num_keep": "n_keep", "temperature": "temperature", "top_k": "top_k",
    "top_p": "top_p", "min_p": "min_p", "typical_p": "typical_p", "repeat_penalty": "repeat_penalty",
    "repeat_last_n": "repeat_last_n", "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty", "seed": "seed", "stop": "stop",
}

RUNNER_STOPPED = ("model runner has unexpectedly stopped, this may be due to resource limitations or an "
                  "internal error, check ollama server logs for details")

#: What a death by signal means for the user: (short description, advice). SIGILL is the one a build
#: for another CPU gets; SIGKILL is almost always the kernel's out-of-memory killer.
RUNNER_SIGNALS = {
    "SIGILL": ("illegal instruction", "the engine uses CPU instructions this machine cannot run; rebuild it "
               "with ./build_llama.sh (with --portable if the binary came from another machine)"),
    "SIGKILL": ("killed", "most likely by the kernel's out-of-memory killer: the model needs more memory than "
                "is free; try a smaller model, a smaller num_ctx, or close other programs"),
    "SIGSEGV": ("segmentation fault", "the engine crashed"),
    "SIGBUS": ("bus error", "the engine crashed (a model file changed or truncated while loaded also does this)"),
    "SIGABRT": ("aborted", "the engine crashed"),
    "SIGFPE": ("arithmetic exception", "the engine crashed"),
    "SIGTERM": ("terminated", "something other than ollama.py stopped it"),
    "SIGINT": ("interrupted", "something other than ollama.py stopped it"),
}


def runner_exit_error(code, log_path=None, tail="", program="llama-server"):
    """The OllamaError for an engine program that exited with `code` (Popen's, negative for a signal):
    a death by signal says in words what happened and what to do, pointing at the runner's log."""
    if code is None or code >= 0:
        return OllamaError("%s process has terminated: exit status %s%s" % (program, code, tail))
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = "signal %d" % -code
    what, advice = RUNNER_SIGNALS.get(name, ("stopped by a signal", "the engine crashed"))
    if log_path and name not in ("SIGILL", "SIGKILL", "SIGTERM", "SIGINT"):
        advice += "; its log is %s" % log_path
    return OllamaError("%s process has terminated: %s (%s): %s" % (program, name, what, advice))


def find_llama_server(config, here=None):
    """The llama-server binary: OLLAMA_LLAMA_SERVER, bin/ beside ollama.py (or `here`), ~/.ollama/bin,
    then PATH."""
    import shutil
    here = Path(here or os.path.dirname(os.path.abspath(__file__)))
    candidates = [config.llama_server, here / "bin" / "llama-server", config.home / "bin" / "llama-server",
                  shutil.which("llama-server", path=os.environ.get("PATH"))]
    for c in candidates:
        if c and os.path.isfile(str(c)) and os.access(str(c), os.X_OK):
            return str(c)
    raise OllamaError("llama-server not found: run ./build_llama.sh (or set OLLAMA_LLAMA_SERVER)")


def free_port():
    """A free TCP port on 127.0.0.1, as Ollama picks one: listen on port 0, read it back, close."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PR_SET_PDEATHSIG = 1                  # linux/prctl.h


def _pdeathsig_setter():
    """libc's prctl bound to PR_SET_PDEATHSIG/SIGKILL, resolved before any fork (dlopen is not
    safe in a forked child of a threaded process); None where there is no prctl (not Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes  # here, not at the top: only serve forks children, and ctypes costs ~2 ms to import
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    return lambda: prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def popen_tied(args, **kw):
    """subprocess.Popen for a child that the kernel kills (SIGKILL) when the thread that started it
    ends, the process included, however it ends: kill -9, the OOM killer, a crash (Linux).
    A child whose parent died before the prctl took effect exits at once."""
    import subprocess
    setter, parent = _pdeathsig_setter(), os.getpid()

    def in_child():
        if setter is not None:
            setter()
            if os.getppid() != parent:
                os._exit(1)

    return subprocess.Popen(args, preexec_fn=in_child, **kw)


def process_start(pid):
    """A process's start time in clock ticks since boot (/proc/<pid>/stat field 22): with the pid,
    it names one process, never a later one that reuses the pid. None if there is none."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[19]) if len(fields) > 19 and fields[0] != "Z" else None


class Spawner:
    """Starts serve's children from one thread that lives as long as serve, and records them.

    PR_SET_PDEATHSIG fires when the *thread* that forked a child ends, so children are not started
    from request threads (which end with their connection). Each child is recorded by pid and start
    time in `record` (~/.ollama/runners/serve-<pid>.json), with serve's own; a later serve reaps
    the children of a serve that died where the kernel could not (`reap_orphans`).
    """

    def __init__(self, record=None):
        self.record = Path(record) if record else None
        self.children = []
        import queue  # here, not at the top: only serve spawns runners (~1 ms to import)
        self.jobs = queue.Queue()
        self.closed = False
        threading.Thread(target=self._run, name="spawner", daemon=True).start()

    def popen(self, args, **kw):
        """popen_tied(args, **kw), run on the spawner's thread; the child is recorded before it runs."""
        done, box = threading.Event(), {}
        if self.closed:
            raise OllamaError("server is shutting down")
        self.jobs.put((args, kw, box, done))
        done.wait()
        if "error" in box:
            raise box["error"]
        return box["proc"]

    def _run(self):
        """The spawner's thread: start each queued popen job's child and record it; a None job
        (close()) ends it, refusing whatever was still queued."""
        while True:
            job = self.jobs.get()
            if job is None:                   # close(): its children are stopped; ending kills none
                while not self.jobs.empty():      # a popen that raced close() is refused, not left waiting
                    _args, _kw, box, done = self.jobs.get()
                    box["error"] = OllamaError("server is shutting down")
                    done.set()
                return
            args, kw, box, done = job
            try:
                box["proc"] = proc = popen_tied(args, **kw)
                self.children = [c for c in self.children if c.poll() is None] + [proc]
                self._write()
            except BaseException as e:        # handed to the caller's thread
                box["error"] = e
            done.set()

    def _write(self):
        if self.record is None:
            return
        me = [os.getpid(), process_start(os.getpid())]
        kids = [[c.pid, process_start(c.pid)] for c in self.children]
        try:
            atomic_write(self.record, json_dumps({"serve": me, "runners": kids}).encode())
        except OSError as e:
            log.warning("cannot record runner processes in %s: %s", self.record, e)

    def close(self):
        """End the thread and forget the record, once every child has been stopped (idempotent:
        a second None would reach the thread's drain loop as a job)."""
        if self.closed:
            return
        self.closed = True
        self.jobs.put(None)
        if self.record is not None:
            _unlink(self.record)


def reap_orphans(directory):
    """Kill the recorded children of serves that are no longer running (Spawner's records in
    `directory`), matched by pid and start time, never by name. Returns the pids killed."""
    killed = []
    for path in sorted(Path(directory).glob("serve-*.json")) if Path(directory).is_dir() else []:
        try:
            data = json.loads(path.read_text())
            owner, runners = data["serve"], data["runners"]
        except (OSError, ValueError, KeyError, TypeError):
            _unlink(path)
            continue
        if owner[1] is not None and process_start(owner[0]) == owner[1]:
            continue                          # that serve is alive: its children are its own
        for pid, started in runners:
            if started is not None and process_start(pid) == started:
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                    log.warning("killed runner pid %d left behind by serve pid %d", pid, owner[0])
                except OSError:
                    pass
        _unlink(path)
    return killed


class Runner:
    """One llama-server child process serving one GGUF on a free loopback port.

    `start()` launches it and waits for GET /health while watching the child, so a model that
    fails to load is reported with the tail of its log instead of a hang. The inference calls
    (`completion`, `tokenize`, `detokenize`, `apply_template`, `embeddings`) are thin JSON calls.
    """

    def __init__(self, exe, model_path, num_ctx=DEFAULT_NUM_CTX, parallel=1, num_thread=0, num_batch=0,
                 num_gpu=-1, use_mmap=None, embedding=False, projector=None, adapters=(),
                 flash_attention=None, kv_cache_type="", log_path=None, extra_args=(), launcher=(),
                 spawn=None, rpc=(), repack=True, slot_save_path=None):
        """Prepare the llama-server command line for one model; nothing runs until start().
        It gets a free port and its own API key; the context holds num_ctx cells per parallel slot,
        and options left unset keep llama-server's defaults."""
        import secrets
        self.exe, self.model_path = exe, str(model_path)
        self.rpc = list(rpc)                  # llama.cpp RPC workers ("host:port") sharing the layers
        self.spawn = spawn or popen_tied      # Spawner.popen in serve: see its docstring
        self.num_ctx, self.parallel = num_ctx, max(1, parallel)
        self.port = free_port()
        # anyone on this machine can reach 127.0.0.1: the child answers only this key (OLLAMA_API_KEYS
        # is not bypassed), given in its environment, which ps does not show, unlike its argv
        self.api_key = secrets.token_urlsafe(32)
        self.log_path = log_path
        # An embedding input must fit one physical batch, and llama-server refuses a prompt that fills
        # its context exactly (it keeps a cell for a generated token): one spare cell, so an input cut
        # to num_ctx tokens, as Ollama cuts it, still fits.
        cells = num_ctx * self.parallel + (1 if embedding else 0)
        args = [exe, "--model", self.model_path, "--host", "127.0.0.1", "--port", str(self.port),
                "--no-webui", "--offline", "--ctx-size", str(cells),
                "--parallel", str(self.parallel), "--no-kv-unified"]
        if num_thread:
            args += ["--threads", str(num_thread)]
        if embedding:
            args += ["--batch-size", str(cells), "--ubatch-size", str(cells)]
        elif num_batch:
            args += ["--batch-size", str(num_batch)]
        if num_gpu is not None and num_gpu >= 0:
            args += ["--n-gpu-layers", str(num_gpu)]
        if use_mmap is False:
            args += ["--load-mode", "none"]
        if embedding:
            args += ["--embedding"]
        # llama-server splits a prompt at its media marker, random per process unless pinned; pinned to a
        # secret one here, as Ollama does, so a user's text can never pass for an image (media_prompt)
        self.media_marker = "<__ollama_media_%s__>" % secrets.token_hex(16) if projector else None
        if projector:
            args += ["--mmproj", str(projector)]
        for a in adapters:
            args += ["--lora", str(a)]
        if flash_attention is not None:           # unset: llama-server's own "auto"
            args += ["--flash-attn", "on" if flash_attention else "off"]
        if kv_cache_type:
            args += ["--cache-type-k", kv_cache_type, "--cache-type-v", kv_cache_type]
        if self.rpc:                          # verbosity 4: the log then says which layers went where
            args += ["--rpc", ",".join(self.rpc), "--log-verbosity", "4"]
        if not repack:                        # the plain CPU kernels, as RPC workers run (DEFAULT_REPACK)
            args += ["--no-repack"]
        # the slot files' folder (PromptCache), kept out of the argv the cache is keyed by (prompt_key)
        self.slot_save_path = str(slot_save_path) if slot_save_path else None
        self.args = list(launcher) + args + list(extra_args)   # launcher: an emulator such as qemu-aarch64
        if self.slot_save_path:
            self.args += ["--slot-save-path", self.slot_save_path]
        self.proc = None
        self._log = None
        self._lock = threading.Lock()         # orders start's spawn against a stop() from shutdown
        self._stopped_early = False

    def start(self, timeout=DEFAULT_LOAD_TIMEOUT):
        """Start the child and wait until it answers /health with {"status": "ok"}."""
        import subprocess
        log.info("starting llama server: %s", " ".join(_shell_quote(a) for a in self.args))
        if self.log_path:
            Path(self.log_path).parent.mkdir(parents=True, exist_ok=True)
            self._log = open(str(self.log_path), "ab")
        with self._lock:
            if self._stopped_early:           # stop() came first (serve is shutting down)
                self._close_log()
                raise OllamaError("server is shutting down")
            env = dict(os.environ, LLAMA_API_KEY=self.api_key)      # --api-key's variable (llama.cpp arg.cpp)
            if self.media_marker:
                env["LLAMA_MEDIA_MARKER"] = self.media_marker
            self.proc = self.spawn(self.args, stdin=subprocess.DEVNULL, stdout=self._log or subprocess.DEVNULL,
                                   stderr=subprocess.STDOUT, start_new_session=True, env=env)
        deadline = time.monotonic() + timeout
        while True:
            code = self.proc.poll()
            if code is not None:
                self._close_log()
                if self._stopped_early:
                    raise OllamaError("server is shutting down")
                raise self._died(code)
            try:
                status, body = self._call("GET", "/health", timeout=0.5)
                if status == 200 and body.get("status") == "ok":
                    return self
            except (OSError, EOFError, IndexError, ValueError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise OllamaError("timed out waiting for llama runner to start%s" % self._log_tail())
            time.sleep(0.02)

    def _log_tail(self, lines=40):
        """The end of the runner's log for an error message: ": " and its first and last error
        lines (the cause, and how it ended), else its last four lines; "" without a log."""
        if not self.log_path:
            return ""
        try:
            with open(str(self.log_path), "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 16384))
                tail = f.read().decode(errors="replace").splitlines()[-lines:]
        except OSError:
            return ""
        errors = [ln.strip() for ln in tail if "error" in ln.lower() or "failed" in ln.lower()]
        if not errors:
            return ": " + " | ".join(tail[-4:]).strip()
        # the first error is the cause ("unknown model architecture: 'x'"), the last how it ended
        return ": " + " | ".join(dict.fromkeys([errors[0], errors[-1]]))

    def _died(self, code):
        """The error for the child's exit, logged too, so server.log says what the client is told.
        With RPC workers, a worker that no longer answers is named: it is the likely cause."""
        err = runner_exit_error(code, self.log_path, self._log_tail())
        down = [w for w in self.rpc if not rpc_worker_answers(w)]
        if down:
            err = OllamaError("%s; RPC worker %s does not answer" % (err, ", ".join(down)))
        log.error("%s", err)
        return err

    def _stopped(self):
        """The error for a connection to the child that broke: its exit in words if it has died."""
        if self.proc is not None and self.exited(1.0) and (self.proc.returncode < 0 or self.rpc):
            return self._died(self.proc.returncode)
        return OllamaError(RUNNER_STOPPED)

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def exited(self, wait=0.0):
        """True once the child has exited, waiting up to `wait` seconds for it (it may be dying)."""
        import subprocess
        try:
            self.proc.wait(wait)
            return True
        except subprocess.TimeoutExpired:
            return False

    def stop(self, grace=5.0):
        """Stop the child: SIGTERM, then SIGKILL after `grace` seconds. Never leaves an orphan; a
        runner stopped before it started never starts."""
        import subprocess
        with self._lock:
            self._stopped_early = True
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

    def _call(self, method, path, body=None, timeout=None):
        """(status, JSON answer) of one request to the runner; OSError, EOFError or IndexError when
        there is no HTTP answer, ValueError when it is not JSON."""
        data = json_dumps(body).encode() if body is not None else None
        wire = _Wire.request("127.0.0.1", self.port, method, path, data, {
            "Content-Type": "application/json", "Authorization": "Bearer " + self.api_key}, timeout)
        try:
            return wire.json()
        finally:
            wire.close()

    def call(self, path, body):
        """POST a JSON body to the runner and return its JSON answer; engine errors become OllamaError."""
        try:
            status, out = self._call("POST", path, body)
        except (OSError, EOFError, IndexError):
            raise self._stopped() from None
        if status != 200:
            raise _engine_error(status, out)
        return out

    def completion(self, payload, path="/completion"):
        """Stream POST /completion: yields each SSE event as a dict, the last one with "stop": true
        and "timings". Closing the generator closes the connection, which cancels the task.
        With path="/v1/chat/completions" (the GGUF's Jinja template and llama.cpp's tool-call and
        reasoning parsers) the events are OpenAI chunks, up to the one with a finish_reason.
        Read from the raw socket (_Wire), not http.client: its chunked readline costs a dozen Python
        calls per token on a path that runs once per token, on the cores llama-server computes on."""
        try:
            wire = _Wire.post(self.port, path, dict(payload, stream=True), self.api_key)
        except OSError:
            raise self._stopped() from None
        try:
            try:
                status, chunked, _ = wire.response_head()
            except (OSError, ValueError, IndexError, EOFError):
                raise self._stopped() from None
            lines = wire.body_lines(chunked)
            if status != 200:
                raw = b"".join(self._engine_lines(lines))
                try:
                    err = json.loads(raw)
                except ValueError:
                    err = {"error": raw.decode(errors="replace")}
                raise _engine_error(status, err)
            for line in self._engine_lines(lines):
                if not line.startswith(b"data: "):
                    continue
                if line.strip() == b"data: [DONE]":
                    return
                event = json.loads(line[6:])
                if "error" in event:
                    raise _engine_error(500, event)
                yield event
                if event.get("stop"):
                    return
            if self.exited(1.0):
                raise self._stopped()
            raise OllamaError("an error was encountered while running the model: unexpected end of response")
        finally:
            wire.close()

    def _engine_lines(self, lines):
        """`lines`, with a broken connection (or a malformed chunk) as the engine's stop error; a
        body cut short just ends them (completion then tells a dead runner from a short answer)."""
        try:
            yield from lines
        except EOFError:
            return
        except (OSError, ValueError):
            raise self._stopped() from None

    def tokenize(self, text, add_special=False):
        return self.call("/tokenize", {"content": text, "add_special": add_special})["tokens"]

    def prompt_key(self):
        """What a saved slot file must have been made with to be restored here: the argv but for the
        port and the slot folder (the weights' view, context per slot, slots, KV type, flash attention,
        adapters, batch and threads, which can change the numbers), and the engine binary (its size and
        mtime: a rebuilt engine may lay its state out differently). 16 hex digits."""
        import hashlib
        skip = {j for i, a in enumerate(self.args) if a in ("--port", "--slot-save-path") for j in (i, i + 1)}
        args = [a for i, a in enumerate(self.args) if i not in skip]
        try:
            st = os.stat(self.exe)
            engine = [st.st_size, st.st_mtime_ns]
        except OSError:
            engine = []
        return hashlib.sha256(json_dumps([args, engine]).encode()).hexdigest()[:16]

    def save_slot(self, slot, filename, timeout=PROMPT_CACHE_IO_TIMEOUT):
        """Save slot `slot`'s KV cache and tokens to `filename` in the slot folder (llama-server waits
        for the slot to be idle): llama-server's answer, with n_saved (tokens) and n_written (bytes)."""
        return self._slot_action(slot, "save", filename, timeout)

    def restore_slot(self, slot, filename, timeout=PROMPT_CACHE_IO_TIMEOUT):
        """Load `filename` from the slot folder into slot `slot`: the answer, with n_restored (tokens).
        OllamaError when the file is not one this engine and model can read (the slot is then empty)."""
        return self._slot_action(slot, "restore", filename, timeout)

    def _slot_action(self, slot, action, filename, timeout):
        try:
            status, out = self._call("POST", "/slots/%d?action=%s" % (slot, action), {"filename": filename},
                                     timeout)
        except (OSError, EOFError, IndexError, ValueError):
            raise self._stopped() from None
        if status != 200:
            raise _engine_error(status, out)
        return out

    def tokenize_soon(self, text):
        """POST /tokenize now, answer later: a _Wire whose .json() reads it, or None when it could not
        be sent. llama-server tokenizes on its HTTP threads, not in the generating slot, so asked as a
        stream starts, the answer is waiting in the socket when the stream ends."""
        try:
            return _Wire.post(self.port, "/tokenize", {"content": text, "add_special": False}, self.api_key)
        except OSError:
            return None

    def detokenize(self, tokens):
        return self.call("/detokenize", {"tokens": list(tokens)})["content"]

    def media_prompt(self, prompt, images):
        """/completion's `prompt` for a text and its images: Ollama's [img-N] tags become this child's
        media marker, in the order they appear, and the images go along as base64 in that order (a tag
        whose message was truncated away takes its image with it, as in Ollama)."""
        if not images:
            return prompt
        if not self.media_marker:
            raise BadRequest("this model is missing data required for image input")
        sent, data = set(), []

        def swap(m):
            i = int(m.group(1))
            if i >= len(images) or i in sent:
                return m.group(0)             # a tag a user typed, or one already used: left as text
            sent.add(i)
            data.append(images[i])
            return self.media_marker

        text = IMAGE_TAG_RE.sub(swap, prompt)
        return {"prompt_string": text, "multimodal_data": data} if data else prompt

    def apply_template(self, messages, kwargs=None, body=None):
        """Render messages with the GGUF's own chat template (llama-server's jinja), generation prompt
        added; `kwargs` are variables for the template (chat_template_kwargs: enable_thinking, ...).
        `body`, a /v1/chat/completions payload, is rendered as that request's prompt (tools and all)."""
        body = dict(body) if body else {"messages": messages}
        if kwargs:
            body["chat_template_kwargs"] = kwargs
        return self.call("/apply-template", body)["prompt"]

    def rerank(self, query, documents):
        """(scores, prompt tokens): llama-server's relevance score of each document to `query` (a
        --rerank runner), in the documents' order, and the tokens it evaluated."""
        out = self.call("/rerank", {"query": query, "documents": documents, "top_n": len(documents)})
        scores = [0.0] * len(documents)
        for item in out.get("results", []):
            scores[item["index"]] = item["relevance_score"]
        return scores, int((out.get("usage") or {}).get("prompt_tokens", 0))

    def embeddings(self, inputs):
        """Raw (unnormalised) pooled embeddings for each input string, in order."""
        out = self.call("/embedding", {"content": inputs, "embd_normalize": -1})
        vectors = [None] * len(inputs)
        for item in out if isinstance(out, list) else [out]:
            emb = item["embedding"]
            vectors[item.get("index", 0)] = emb[0] if emb and isinstance(emb[0], list) else emb
        return vectors


def engine_reads_edits(exe):
    """Which GGUF edits hook a llama-server has (build_llama.sh's): 0 for none, else its version (1:
    header edits; 2: also edits.data, tensor bytes from a side file). Its build-info says so or, for
    one built some other way, its binary or the ggml library beside it carries the hook's marker."""
    import glob
    import mmap
    try:
        for line in Path(exe + ".build-info").read_text().splitlines():
            if line.startswith("gguf_edits:"):
                m = re.match(r"v(\d+):", line.split(":", 1)[1].strip())
                return int(m.group(1)) if m else 0
    except OSError:
        pass
    real = os.path.realpath(exe)
    here = os.path.dirname(real)
    prefix = GGUF_EDITS_MARKER[:-1]                  # "ollama.py gguf edits v", then the version digit
    for path in [real] + glob.glob(os.path.join(here, "libggml-base*")) + \
            glob.glob(os.path.join(here, "..", "lib", "libggml-base*")):
        try:
            with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                at = m.find(prefix)
                if at >= 0 and m[at + len(prefix):at + len(prefix) + 1].isdigit():
                    return int(m[at + len(prefix):at + len(prefix) + 1])
        except (OSError, ValueError):
            continue
    return 0


class EngineFiles:
    """What a runner hands llama-server for a model: the model file, the projector (the model file
    itself for a vision model stored whole, Ollama's way), extra flags (--override-kv), and the
    Ollama-layout families it translates, for the log."""

    def __init__(self, model_path, projector, args, families):
        self.model_path, self.projector, self.args, self.families = model_path, projector, args, families


def engine_files(store, model, exe):
    """The EngineFiles for `model`: each GGUF in Ollama's converter layout (ollama_layout) is read
    through --override-kv when only scalar keys differ, else through a view under the store
    (Store.view_dir: a link to the blob named for the engine, and its .edits sidecar), which the
    engine's GGUF edits hook applies. OllamaError, in words, when `exe` has no hook for a model
    that needs it. The blobs are never written."""
    projector = (model.projector_paths or [None])[0]
    text, clip = model.layout()
    families, args = [], []

    def view(blob, edits, name):
        """A view of `blob` for the engine -> its path: a link named `name` in the
        store's view directory, beside its .edits sidecar; OllamaError when `exe` lacks the hook."""
        if not engine_reads_edits(exe):
            raise OllamaError(
                "%s is in Ollama's %s layout (%s), which %s cannot read as it is: it lacks the GGUF edits "
                "hook that ./build_llama.sh builds in (a llama-server built another way needs ggml/src/gguf.cpp "
                "changed as build_llama.sh does)" % (model.short_name, edits.family, "; ".join(edits.quirks), exe))
        d = store.view_dir(Path(blob).name.replace("-", ":", 1))
        d.mkdir(parents=True, exist_ok=True)
        link = d / name
        edits.write(str(link) + ".edits", blob, read_gguf(blob, 0) if edits.data or edits.split else None)
        target = os.path.relpath(blob, str(d))
        if not link.is_symlink() or os.readlink(str(link)) != target:
            tmp = d / (".%s.%d" % (name, os.getpid()))
            _unlink(tmp)
            os.symlink(target, str(tmp))
            os.replace(str(tmp), str(link))
        families.append(edits.family)
        return str(link)

    if clip and clip.data and projector is None and engine_reads_edits(exe) < 2:
        # the projector needs tensor bytes the file lacks (edits.data): an engine with the v1 hook runs
        # the model text-only rather than not at all
        log.warning("model %s: %s needs the GGUF edits hook v2 to see images, which %s lacks: run ./build_llama.sh "
                    "again; until then it answers text only", model.short_name, clip.family, exe)
        clip = None
    model_path = model.model_path
    if text:
        overrides = text.override_args()
        if overrides is not None:
            args, model_path = overrides, model.model_path
            families.append(text.family)
        else:
            model_path = view(model.model_path, text, SPLIT_VIEW[0] if text.split else "model.gguf")
    if clip and projector is None:
        projector = view(model.model_path, clip, "mmproj.gguf")
    elif projector:
        try:
            _text, pclip = ollama_layout(read_gguf(projector, 0), projector)
        except (OSError, OllamaError):
            pclip = None
        if pclip:
            projector = view(projector, pclip, "mmproj.gguf")
    if families:
        log.info("model %s: Ollama's %s layout, translated as it loads", model.short_name, ", ".join(families))
    return EngineFiles(model_path, projector, args, families)


def draft_args(model, opts):
    """llama-server flags for a model's DRAFT layer (speculative decoding; greedy output is unchanged):
    Ollama's MTP and DFlash drafts as Ollama runs them, and beyond Ollama any smaller model that shares
    the vocabulary (llama.cpp's draft-simple). draft_num_predict tokens are drafted at a time; 0 turns
    it off."""
    n = int(opts.get("draft_num_predict") if opts.get("draft_num_predict") is not None else 4)
    if not model.draft_path or n <= 0:
        return []
    try:
        g = read_gguf(model.draft_path, 0)
    except (OSError, OllamaError):                # the engine says what is wrong with it
        g = None
    kind = "draft-simple"
    if g is not None and g.architecture == "dflash":
        kind = "draft-dflash"
    elif g is not None and (g.get("nextn_predict_layers") or 0) > 0:
        kind = "draft-mtp"
    return ["--spec-draft-model", model.draft_path, "--spec-type", kind, "--spec-draft-n-max", str(n)]


def _engine_error(status, body):
    """Turn a llama-server error body into an OllamaError with Ollama's status and a clear message."""
    err = body.get("error", body) if isinstance(body, dict) else body
    if isinstance(err, dict):
        message = err.get("message") or json_dumps(err)
        kind = err.get("type", "")
        if kind == "exceed_context_size_error":
            return ContextTooLong(err.get("n_prompt_tokens", "?"), err.get("n_ctx", "?"))
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


# == Runner: engine tools (RPC workers, llama-quantize) ======================

def rpc_worker_answers(address, timeout=1.0):
    """True when something accepts TCP connections at an RPC worker's "host:port"."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def find_engine_tool(config, name):
    """Another llama.cpp program build_llama.sh installs (llama-quantize): beside llama-server, else PATH."""
    import shutil
    beside = Path(find_llama_server(config)).with_name(name)
    found = str(beside) if os.access(str(beside), os.X_OK) else shutil.which(name)
    if not found:
        raise OllamaError("%s not found beside %s: run ./build_llama.sh" % (name, beside.parent))
    return found


#: Quantization levels for create -> (general.file_type, about how many bits per weight it takes):
#: Ollama's (F32, F16, BF16, Q8_0, Q4_K_S, Q4_K_M, with Q4_K meaning Q4_K_M) and, beyond Ollama, the
#: other llama-quantize levels a small machine may want.
QUANTIZE_TYPES = {"F32": (0, 32), "F16": (1, 16), "BF16": (32, 16), "Q8_0": (7, 8.5), "Q6_K": (18, 6.6),
                  "Q5_K_M": (17, 5.7), "Q5_K_S": (16, 5.5), "Q5_K": (17, 5.7), "Q5_1": (9, 6), "Q5_0": (8, 5.5),
                  "Q4_K_M": (15, 4.9), "Q4_K_S": (14, 4.6), "Q4_K": (15, 4.9), "Q4_1": (3, 5), "Q4_0": (2, 4.5),
                  "Q3_K_L": (13, 4.3), "Q3_K_M": (12, 3.9), "Q3_K_S": (11, 3.5), "Q3_K": (12, 3.9),
                  "Q2_K": (10, 3.4)}


def quantize_level(text):
    """A create request's quantize value -> its canonical level name (Ollama upper-cases it)."""
    level = text.upper() if isinstance(text, str) else ""
    if level not in QUANTIZE_TYPES:
        names = [n for n in QUANTIZE_TYPES if GGUF_FILE_TYPES[QUANTIZE_TYPES[n][0]] == n]
        raise BadRequest("unsupported quantization type %s - supported types are %s"
                         % (level or text, ", ".join(names)))
    return GGUF_FILE_TYPES[QUANTIZE_TYPES[level][0]]


def quantize_gguf(exe, src, dst, level, launcher=(), spawn=popen_tied):
    """Run llama-quantize: `src` to `dst` at `level`. Yields the fraction of tensors done (it reports
    each tensor on stderr, unbuffered). A failure raises OllamaError with the program's last words.
    `spawn` starts it (serve passes its Spawner's, so the child dies with serve)."""
    import subprocess
    args = list(launcher) + [exe, str(src), str(dst), level]
    log.info("quantizing: %s", " ".join(_shell_quote(a) for a in args))
    proc = spawn(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    tail = []
    try:
        for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            tail = (tail + [line])[-8:]
            done = re.match(r"\[\s*(\d+)/\s*(\d+)\]", line)
            if done:
                yield int(done.group(1)) / max(1, int(done.group(2)))
        code = proc.wait()
    finally:
        if proc.poll() is None:                  # the request went away: stop it, the caller cleans up
            proc.kill()
            proc.wait()
        proc.stdout.close()
    if code:
        errors = [ln for ln in tail if "error" in ln.lower() or "failed" in ln.lower()] or tail[-1:]
        raise runner_exit_error(code, tail=": " + " | ".join(errors) if errors else "", program="llama-quantize")


def quantize_blobs(store, exe, level, digests, spawn=popen_tied):
    """Quantize each model blob to `level` with llama-quantize (`exe`) into a temp blob, yielding
    Ollama's progress; returns {source digest: (quantized digest, size)}. Needs F16, BF16 or F32
    sources and the disk space for the result (else 400, 507); a failure or a client that goes away
    leaves no temp file."""
    import shutil
    want, bits = QUANTIZE_TYPES[level]
    out = {}
    for digest in digests:
        g = read_gguf(store.blob_path(digest), 0)
        if g.file_type not in ("F16", "BF16", "F32"):
            raise BadRequest("quantization is only supported for F16, BF16 and F32 models")
        if g.kv.get("general.file_type") == want:
            continue
        size = store.blob_size(digest)
        need = int(size * bits / {"F32": 32}.get(g.file_type, 16)) + (64 << 20)   # + metadata, slack
        free = shutil.disk_usage(str(store.blobs)).free
        if need > free:
            raise OllamaError("not enough disk space to quantize: about %s needed, %s free in %s"
                              % (human_bytes(need), human_bytes(free), store.blobs), 507)
        f, tmp = store.temp_blob()              # held open, so locked: clean() leaves it to us
        try:
            status = "quantizing %s model to %s" % (g.file_type, level)
            yield {"status": status, "digest": "0000000000000000000", "total": size, "completed": 0}
            for done in quantize_gguf(exe, store.blob_path(digest), tmp, level, spawn=spawn):
                yield {"status": status, "digest": "0000000000000000000", "total": size,
                       "completed": int(done * size)}
            yield {"status": "verifying conversion"}
            if read_gguf(tmp, 0).kv.get("general.file_type") != want:
                raise OllamaError("llama-quantize wrote a model that is not %s" % level)
            new = file_digest(tmp)
            store.commit_blob(tmp, new)
            out[digest] = (new, store.blob_size(new))
        finally:
            f.close()
            _unlink(tmp)
    return out


###############################################################################
# Scheduler ###################################################################
###############################################################################
# Which runners are loaded, and who holds them: leases, queueing, eviction, keep-alive.

class _Loaded:
    """A runner in the scheduler's table, with its reference count and expiry. `key` is the weights
    it serves (runner_key), `model` the model that loaded it, `models` every name served by it since
    (name key -> Model, in first-use order): /api/ps lists each, and stopping any of them stops it."""

    def __init__(self, model, runner, load_key, keep_alive, embedding=False, loaded_at=None, key=None):
        self.model, self.runner, self.load_key = model, runner, load_key
        self.key = model.name.key() if key is None else key
        self.models = {model.name.key(): model}
        self.embedding = embedding
        self.keep_alive = keep_alive
        self.stop = False                 # expire() was asked while requests held it: unload when they end
        self.refs = 0
        self.expires = FOREVER            # the scheduler's clock() deadline once idle
        self.loaded_at = time.time() if loaded_at is None else loaded_at


class Lease:
    """One request's hold on a loaded runner, from `Scheduler.lease()`: a context manager, released
    exactly once when the `with` block ends, unless `stream()` handed it to a streamed answer,
    which then releases it when it is exhausted, fails or is closed.

    `runner` is the loaded Runner, `opts` the request's options, `load_s` the seconds spent
    waiting for (and loading) it, `keep_alive` the seconds it stays loaded once idle.
    """

    def __init__(self, scheduler, entry, keep_alive, opts, load_s):
        self.scheduler, self.entry, self.keep_alive = scheduler, entry, keep_alive
        self.runner, self.opts, self.load_s = entry.runner, opts, load_s
        self._held = True
        self._handed_off = False

    def release(self):
        """Give the runner back (idempotent): its keep-alive timer starts once nobody holds it."""
        if self._held:
            self._held = False
            self.scheduler.release(self.entry, self.keep_alive)

    def stream(self, items):
        """An iterator over `items` that owns this lease from now on: it releases the runner when
        `items` ends, raises, or the iterator is closed (even unstarted). Leaving the `with` block
        afterwards releases nothing."""
        self._handed_off = True
        return _LeasedItems(self, iter(items))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if not self._handed_off:
            self.release()


class _LeasedItems:
    """The iterator `Lease.stream()` returns: `items`, then the lease released."""

    def __init__(self, lease, items):
        self.lease, self.items = lease, items

    def __iter__(self):
        return self

    def __next__(self):
        try:
            return next(self.items)
        except BaseException:
            self.close()
            raise

    def close(self):
        close = getattr(self.items, "close", None)
        try:
            if close:
                close()                     # the generator's own cleanup (the runner's stream) first
        finally:
            self.lease.release()

    __del__ = close                         # dropped unclosed, as a suspended generator would be


def engine_reuses_windows(exe):
    """Whether llama-server `exe` reuses a restored sliding window: built by build_llama.sh with its
    swa_reuse fix (its build-info says so). Unpatched, llama-server asks that the cache start one cell
    before the window the next token reads, which a restored slot (exactly that window) never does, so
    it computes the whole prompt again; a llama-server built some other way is taken as unpatched. The
    build-info is looked for beside `exe` and beside the file a link `exe` points to."""
    for path in dict.fromkeys((str(exe), os.path.realpath(str(exe)))):
        try:
            for line in Path(path + ".build-info").read_text().splitlines():
                if line.startswith("swa_reuse:"):
                    return line.split(":", 1)[1].strip().startswith("v1")
        except OSError:
            continue
    return False


def prompt_state_restorable(model, exe=None):
    """Whether llama-server `exe` can reuse a restored slot of `model`: not recurrent state (no cells to
    go back to), and a sliding window only with build_llama.sh's fix (engine_reuses_windows): a slot
    file then holds the window's cells only (all the next token reads) plus every cell of the global
    layers, read from the GGUF's keys."""
    try:
        g = model.gguf()
    except (OSError, OllamaError):
        return False
    if g is None:
        return False
    if g.get("attention.sliding_window") and not (exe and engine_reuses_windows(exe)):
        return False
    return not any(k.startswith(tuple(g.architecture + p for p in (".ssm.", ".wkv.", ".shortconv.")))
                   for k in g.kv)


class PromptCache:
    """Prompt state that outlives its runner. When a runner is unloaded (keep-alive over, evicted,
    reloaded with other options, stopped, serve shutting down), each of its slots that holds at least
    PROMPT_CACHE_MIN_TOKENS tokens is saved with llama-server's slot save (the KV cache and its tokens)
    to <models>/.ollama-py/prompt-cache/<weights hex>/<key>-<slot>.slot, `key` being Runner.prompt_key
    (the argv: context, KV type, adapters...; and the engine). A runner started later with the same key
    restores it into that slot before its first request, and llama-server reuses the longest common
    prefix as it does with a live cache: the next turn of an agent whose runner went away computes only
    what is new. Not for recurrent models (Mamba, RWKV, LFM2, Qwen3-Next): no earlier state to go back to.
    Sliding-window models (Gemma 2 and 3, gpt-oss) only with an engine that has build_llama.sh's
    swa_reuse fix: llama-server saves the window's cells only (and the global layers' all), which the
    next prompt can reuse only when it starts with every token the slot held (the last prompt and the
    answer as generated: an agent's next turn); a prompt that differs earlier is computed whole, as it
    would be without the cache. Unpatched, llama-server refuses every restored window by one cell, so
    their files would be disk spent for nothing. --swa-full (a full-size window cache) is no way out:
    its saves still hold only the window, and it then reuses a restored slot for a prompt that differs
    inside it, reading cells that are not there (other tokens than a cold run).

    Saved at unload, not after each long prompt: one save of a 20k-token prefix of a 3B model is ~2 GB,
    which at each turn would wear an SD card and take the cores the turn needs, while the live runner's
    own cache serves anyway. A crash (kill -9, power cut) loses what was computed since the runner
    started. A file is written under a temp name, fsynced and renamed, so a kill at any moment leaves
    the old file or the new one, never part of one; temp names are never restored, and are removed
    once PROMPT_CACHE_TMP_AGE old. The files used last are kept up to `limit` bytes (OLLAMA_PROMPT_CACHE;
    restoring counts as use): the oldest go first; 0 keeps nothing.
    """

    SUFFIX = ".slot"

    def __init__(self, store, limit):
        self.store, self.limit = store, limit
        self.min_tokens = PROMPT_CACHE_MIN_TOKENS
        self.root = store.root / ".ollama-py" / "prompt-cache"
        self.lock = threading.Lock()              # one trim at a time

    def folder(self, model, embedding, exe=None):
        """The slot folder for a runner of `model` on llama-server `exe` (created), or None where
        nothing is kept: the cache is off, an embedding runner (no prompt goes on), a projector
        (llama-server cannot save images' state), a draft model (its own cache is not saved), or state
        the engine cannot reuse (prompt_state_restorable)."""
        if not self.limit or embedding or model.projector_paths or model.draft_path or not model.model_path:
            return None
        if not prompt_state_restorable(model, exe):
            return None
        try:
            d = self.store.prompt_cache_dir(Path(model.model_path).name)
            d.mkdir(parents=True, exist_ok=True)
        except (OSError, OllamaError) as e:
            log.warning("prompt cache off for %s: %s", model.short_name, e)
            return None
        return d

    def _path(self, runner, slot):
        return Path(runner.slot_save_path) / ("%s-%d%s" % (runner.prompt_key(), slot, self.SUFFIX))

    def restore(self, runner):
        """Load `runner`'s saved slots (those of its key) into it; the tokens restored. A file the
        engine refuses is removed; nothing here fails the load."""
        if not getattr(runner, "slot_save_path", None):
            return 0
        total = 0
        for slot in range(runner.parallel):
            path = self._path(runner, slot)
            if not path.is_file():
                continue
            try:
                out = runner.restore_slot(slot, path.name)
                os.utime(str(path))               # used now: the trim keeps it longest
            except (OllamaError, OSError) as e:
                log.warning("prompt cache %s not restored, removed: %s", path, e)
                _unlink(path)
                continue
            n = int(out.get("n_restored") or 0)
            total += n
            log.info("prompt cache: restored %d tokens into slot %d from %s in %.0f ms", n, slot, path.name,
                     (out.get("timings") or {}).get("restore_ms", 0))
        return total

    def save(self, runner):
        """Save each slot of `runner` (alive and idle) that holds `min_tokens` or more; a
        shorter one leaves the file saved before in place. The files saved; the cache is then trimmed."""
        if not getattr(runner, "slot_save_path", None) or not runner.alive():
            return []
        import secrets
        saved = []
        for slot in range(runner.parallel):
            path = self._path(runner, slot)
            tmp = path.with_name("%s.%s.tmp" % (path.stem, secrets.token_hex(4)))
            try:
                out = runner.save_slot(slot, tmp.name)
                n = int(out.get("n_saved") or 0)
                if n < self.min_tokens or tmp.stat().st_size > self.limit:
                    continue
                with open(str(tmp), "rb") as f:       # on the disk before its name says it is whole
                    os.fsync(f.fileno())
                os.replace(str(tmp), str(path))
                _fsync_dir(path.parent)
                saved.append(path)
                log.info("prompt cache: saved %d tokens of slot %d (%s) to %s in %.0f ms", n, slot,
                         human_bytes(path.stat().st_size), path.name, (out.get("timings") or {}).get("save_ms", 0))
            except (OllamaError, OSError) as e:
                log.warning("prompt cache: slot %d not saved: %s", slot, e)
            finally:
                _unlink(tmp)
        if saved:
            self.trim()
        return saved

    def trim(self):
        """Remove the least recently used slot files past the limit, and temp files a kill left."""
        with self.lock:
            now, files = time.time(), []
            for path in self.root.glob("*/*") if self.root.is_dir() else ():
                try:
                    st = path.stat()
                except OSError:
                    continue
                if path.name.endswith(".tmp"):
                    if now - st.st_mtime > PROMPT_CACHE_TMP_AGE:
                        _unlink(path)
                elif path.name.endswith(self.SUFFIX):
                    files.append((st.st_mtime, st.st_size, path))
            total = sum(size for _, size, _ in files)
            for _, size, path in sorted(files):
                if total <= self.limit:
                    break
                log.info("prompt cache: removing %s (%s), used least recently", path, human_bytes(size))
                _unlink(path)
                total -= size


class Scheduler:
    """Keeps llama-server children: one per loaded weights blob and mode (runner_key), shared by
    concurrent requests and by every name for that blob (system, template and sampling are per request).

    `lease()` holds a loaded runner for a model (loading, reloading or evicting as needed) for the
    length of a `with` block (`acquire()`/`release()` are its parts); a runner serves
    OLLAMA_NUM_PARALLEL requests at once and the rest wait for a slot. Loads are serialised; at
    most OLLAMA_MAX_LOADED_MODELS stay loaded, and an idle one that expires soonest is evicted to
    make room. More than OLLAMA_MAX_QUEUE waiting requests get 503. A keep-alive timer starts when
    the last request on a runner finishes; a background thread (`reap()` every 0.25 s) stops
    runners whose time is up.

    Methods for the caller: `lease()`, `expire()`, `running()`, `runners_for()`, `loaded_embedding()`,
    `shutdown()`.
    Seams for tests: `new_runner(model, opts, embedding)` builds a runner that is not started
    (default: a llama-server `Runner`; it needs `start(timeout)`, `stop()`, `alive()`, `parallel`),
    `clock()` is the wall clock in seconds that keep-alive deadlines use, and `reaper=False`
    leaves `reap()` to the caller.
    """

    def __init__(self, config, exe=None, new_runner=None, clock=time.time, reaper=True, metrics=None):
        """An empty scheduler: it starts the Spawner (recorded under <home>/runners) and,
        unless reaper=False, the thread that stops runners whose keep-alive has run out."""
        self.config = config
        self.metrics = metrics or Metrics()           # the server's: queue waits and load times
        self.exe = exe
        self.new_runner = new_runner or self._runner_for
        self.clock = clock
        self.loaded = {}                              # runner_key's key (weights blob, embedding) -> _Loaded
        self.cond = threading.Condition()
        self.load_lock = threading.Lock()
        self.waiting = 0
        self.closed = False
        self.starting = set()                         # runners being loaded, stopped by shutdown() too
        self.stopping = {}                            # key -> the thread saving and stopping its last runner
        #                                               (the next load waits for them: their memory, their files)
        self.interactive = {}                         # key -> interactive requests waiting for it (acquire)
        self.spawner = Spawner(config.home / "runners" / ("serve-%d.json" % os.getpid()))
        self.prompt_cache = PromptCache(Store(config.models), config.prompt_cache)
        try:
            self.prompt_cache.trim()                  # a lowered OLLAMA_PROMPT_CACHE, a kill's temp files
        except OSError as e:
            log.warning("prompt cache: %s", e)
        if reaper:
            threading.Thread(target=self._reap, name="scheduler-reaper", daemon=True).start()

    def _runner_for(self, model, opts, embedding):
        """The default new_runner: an unstarted llama-server Runner for `model`, with the
        request's options (num_ctx capped at the trained context), the server's settings, its
        engine files, RPC workers and speculative-decoding flags."""
        exe = self.exe or find_llama_server(self.config)
        self.exe = exe
        trained = _trained_context(model)
        num_ctx = max(4, int(opts.get("num_ctx") or self.config.context_length))
        if trained:
            num_ctx = min(num_ctx, trained)
        num_gpu = int(opts["num_gpu"]) if opts.get("num_gpu") is not None else -1
        files = engine_files(model.store, model, exe)
        return Runner(exe, files.model_path, num_ctx=num_ctx, rpc=self._rpc_workers(num_gpu),
                      parallel=1 if embedding else self.config.num_parallel,
                      num_thread=int(opts.get("num_thread") or 0), num_batch=int(opts.get("num_batch") or 0),
                      num_gpu=num_gpu, use_mmap=opts.get("use_mmap"), embedding=embedding,
                      projector=files.projector, adapters=model.adapter_paths,
                      flash_attention=self.config.flash_attention,
                      kv_cache_type=self.config.kv_cache_type, repack=runner_repacks(self.config),
                      log_path=self.config.home / "logs" / ("runner-%s.log" % _safe_filename(model.short_name)),
                      extra_args=files.args + (_embedding_args(model) if embedding else
                                               draft_args(model, opts) or
                                               ngram_args(opts, self.config.speculative)),
                      spawn=self.spawner.popen, slot_save_path=self.prompt_cache.folder(model, embedding, exe))

    def _start(self, model, opts, embedding):
        """A new runner for `model`, started; a shutdown meanwhile stops it."""
        runner = self.new_runner(model, opts, embedding)
        with self.cond:
            if self.closed:
                raise OllamaError("server is shutting down")
            self.starting.add(runner)             # before it starts: a shutdown now stops it
        try:
            runner.start(self.config.load_timeout)
        finally:
            with self.cond:
                self.starting.discard(runner)
        return runner

    def _rpc_workers(self, num_gpu):
        """The OLLAMA_RPC_SERVERS workers a new runner uses: those that answer now (one that is down is
        left out, with a warning, so a model still loads while it fits without it); none when the
        request keeps every layer here (num_gpu 0)."""
        if num_gpu == 0:
            return []
        up = [w for w in self.config.rpc_servers if rpc_worker_answers(w)]
        for w in self.config.rpc_servers:
            if w not in up:
                log.warning("RPC worker %s does not answer: loading without it", w)
        return up

    def lease(self, model, opts, keep_alive, embedding=False, interactive=False):
        """A Lease on a loaded runner for `model` (use it as `with scheduler.lease(...) as lease:`).
        Raises Busy when the queue is full. An `interactive` request (a streamed answer someone
        watches) goes before the others waiting for the same runner (see acquire)."""
        started = time.monotonic()
        entry = self.acquire(model, opts, keep_alive, embedding=embedding, interactive=interactive)
        waited = time.monotonic() - started
        self.metrics.observe("ollama_queue_wait_seconds", waited)
        return Lease(self, entry, keep_alive, opts, waited)

    def loaded_embedding(self, name):
        """Whether the runner loaded for `name` embeds (True) or completes (False, also when both are);
        None if none is."""
        entries = self.runners_for(name)
        return all(e.embedding for e in entries) if entries else None

    def runners_for(self, name):
        """The loaded _Loaded entries that have served `name` (a Name): none, one, or a completion and an
        embedding runner."""
        key = name.key()
        with self.cond:                               # an RLock: callers holding it may call this
            return [e for e in self.loaded.values() if key in e.models]

    def acquire(self, model, opts, keep_alive, embedding=False, interactive=False):
        """A loaded _Loaded entry for `model` with its refcount taken. Raises Busy when the queue is full.

        Interactive first: while an `interactive` request waits for a runner (a slot, or its load), the
        others for that runner wait behind it, even one that came first or loaded the runner itself.
        Open WebUI sends its title task (num_predict 1000, not streamed) with the chat; with one slot the
        title could win the race, and the visible reply then waited for all of it. The cost:
        a background request waits for every streamed one that keeps arriving."""
        key, load_key = runner_key(model, opts, embedding)
        with self.cond:
            if self.waiting >= self.config.max_queue:
                raise Busy("server busy, please try again.  maximum pending requests exceeded")
            self.waiting += 1
            if interactive:
                self.interactive[key] = self.interactive.get(key, 0) + 1
        try:
            while True:
                with self.cond:
                    if self.closed:
                        raise OllamaError("server is shutting down")
                    entry = self.loaded.get(key)
                    if entry is not None and entry.load_key == load_key and entry.runner.alive():
                        if entry.refs >= entry.runner.parallel or (not interactive and self.interactive.get(key)):
                            self.cond.wait(0.5)           # every slot busy, or a streamed request first
                            continue
                        entry.refs += 1
                        entry.keep_alive, entry.stop = keep_alive, False    # a request after a stop revives it
                        entry.expires = FOREVER
                        if model.name.key() not in entry.models:   # a new dict: /api/ps may be reading it
                            entry.models = {**entry.models, model.name.key(): model}
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
                    with self.cond:
                        stopping, self.stopping = list(self.stopping.values()), {}
                    for thread in stopping:       # runners being saved and stopped go first: this one may
                        thread.join(PROMPT_CACHE_IO_TIMEOUT)   # restore what they save, and needs their memory
                    loading = time.monotonic()
                    runner = self._start(model, opts, embedding)
                    self.prompt_cache.restore(runner)
                    if not runner.alive():
                        # the engine died on a saved state (a file damaged on disk: llama-server aborts
                        # on some): restore removed it, so this start is a clean one
                        runner.stop()
                        runner = self._start(model, opts, embedding)
                    self.metrics.observe("ollama_model_load_seconds", time.monotonic() - loading,
                                         model=model.short_name)
                    entry = _Loaded(model, runner, load_key, keep_alive, embedding, self.clock(), key)
                    with self.cond:
                        closed = self.closed          # shutdown() ran while it loaded
                        if not closed:
                            self.loaded[key] = entry
                            self.cond.notify_all()
                            if interactive or not self.interactive.get(key):
                                entry.refs += 1
                                return entry
                    if closed:
                        runner.stop()
                        raise OllamaError("server is shutting down")
                    # loaded for a streamed request that waits meanwhile: it goes first (the loop waits)
        finally:
            with self.cond:
                self.waiting -= 1
                if interactive:
                    self.interactive[key] -= 1
                    if not self.interactive[key]:
                        del self.interactive[key]
                self.cond.notify_all()

    def release(self, entry, keep_alive=None):
        """Drop a reference; the keep-alive timer starts when the last one goes (0 unloads now)."""
        with self.cond:
            entry.refs -= 1
            if keep_alive is not None and not entry.stop:   # a stop asked meanwhile outlasts the request's own
                entry.keep_alive = keep_alive
            if entry.refs <= 0:
                entry.refs = 0
                entry.expires = self.clock() + entry.keep_alive if entry.keep_alive != FOREVER else FOREVER
                if entry.keep_alive <= 0 or not entry.runner.alive():
                    self._unload(entry.key, entry)
            self.cond.notify_all()

    def expire(self, name):
        """Unload `name` now if idle, or as soon as its requests finish. False if it was not loaded.
        The runner goes with every other name it serves: they share its weights."""
        with self.cond:
            entries = self.runners_for(Name.parse(name) if isinstance(name, str) else name)
            for entry in entries:
                entry.keep_alive, entry.stop = 0, True
                if entry.refs == 0:
                    self._unload(entry.key, entry)
            return bool(entries)

    def _unload(self, key, entry=None):
        current = self.loaded.get(key)
        if current is None or (entry is not None and current is not entry):
            return
        del self.loaded[key]
        log.info("unloading model %s", ", ".join(m.short_name for m in current.models.values()))
        stopping = threading.Thread(target=self._save_and_stop, args=(current.runner,), daemon=True)
        self.stopping[key] = stopping
        stopping.start()

    def _save_and_stop(self, runner):
        """Stop an unloaded runner, its prompt state saved first (PromptCache)."""
        try:
            self.prompt_cache.save(runner)
        except Exception as e:                    # a cache is never worth an orphan runner
            log.warning("prompt cache: %s", e)
        runner.stop()

    def _evict_one(self):
        idle = [e for e in self.loaded.values() if e.refs == 0]
        if not idle:
            return False
        victim = min(idle, key=lambda e: (e.expires, e.model.short_name))
        self._unload(victim.key, victim)
        return True

    def _reap(self):
        while not self.closed:
            time.sleep(0.25)
            self.reap()

    def reap(self):
        """Unload every idle runner whose keep-alive is over, or that died."""
        with self.cond:
            if self.closed:
                return
            now = self.clock()
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
            idle = [e.runner for e in self.loaded.values() if e.refs == 0]   # a busy one's state is half a turn
            runners = [e.runner for e in self.loaded.values()] + list(self.starting)
            self.loaded.clear()
            self.cond.notify_all()
        for r in runners:
            if r in idle:
                self._save_and_stop(r)
            r.stop()
        with self.cond:
            stopping, self.stopping = list(self.stopping.values()), {}
        for thread in stopping:                   # unloads under way finish their save and their stop
            thread.join(PROMPT_CACHE_IO_TIMEOUT)
        self.spawner.close()


def runner_key(model, opts, embedding):
    """(key, load_key) of the runner `model` needs with these options. `key` is the weights blob and
    the mode (completion or embedding, which llama-server cannot serve from one process): one runner
    per blob and mode, however many names point at it (a `cp`, or a create that only adds a SYSTEM,
    TEMPLATE or sampling parameters, which are applied per request), and a model used for chat and
    for embeddings keeps both loaded instead of reloading at each switch. `load_key` is the rest of
    what changes llama-server's argv (projectors, adapters, draft, LOAD_OPTIONS): a request whose
    load_key differs from the loaded runner's reloads it, as Ollama's needsReload does. Server-wide
    settings (OLLAMA_KV_CACHE_TYPE, OLLAMA_FLASH_ATTENTION...) are one for every runner of a serve."""
    key = (model.model_path or model.name.key(), embedding)
    load_key = (key, tuple(model.projector_paths), tuple(model.adapter_paths), model.draft_path) + \
        tuple(opts.get(k) for k in LOAD_OPTIONS)
    return key, load_key


def _trained_context(model):
    try:
        return int(model.gguf().context_length or 0)
    except (OSError, OllamaError):     # an unreadable header is the engine's problem to report
        return 0


def _embedding_args(model):
    """llama-server flags for an embedding runner beyond Runner's own (context and batch sizes): a
    model without pooling of its own is pooled on its last token, the hidden state Ollama's runner
    takes (llama_get_embeddings_ith of the last prompt token); a reranker gets --rerank (llama-server's
    /rerank instead of /embedding)."""
    pooling = embedding_pooling(model)
    if pooling in (None, 0):
        return ["--pooling", "last"]
    return ["--rerank"] if pooling == RANK_POOLING else []


def runner_repacks(config):
    """Whether a runner of this serve lets llama.cpp repack quantized matrices for its CPU kernels
    (DEFAULT_REPACK): OLLAMA_REPACK when set, else only on a serve without RPC workers, so that on a
    serve with workers a model computes the same whether it is split or kept local (num_gpu 0, or a
    worker down), the split's own CPU layers included."""
    return config.repack if config.repack is not None else not config.rpc_servers


def ngram_args(opts, kind):
    """llama-server flags for n-gram speculation (no draft model: drafts are looked up in the context,
    so an answer that repeats its input, such as a file rewritten with one change, takes several
    tokens per step; greedy output is unchanged). `kind` is the server's (OLLAMA_SPECULATIVE, "" for
    off); the `speculative` option or PARAMETER turns it on (with `kind`, else the first of
    SPECULATIVE_TYPES) or off for one model. A DRAFT layer's flags take its place (draft_args)."""
    on = opts.get("speculative")
    if on is not None:
        kind = (kind or SPECULATIVE_TYPES[0]) if on else ""
    return ["--spec-type", kind] if kind else []


def _safe_filename(text):
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)


###############################################################################
# HTTP server #################################################################
###############################################################################
# The serve process's front: the listener (TCP, TLS or a Unix socket), its guards (keys, CORS, Host,
# connection and request caps, who a local peer is), the router, and the request and answer objects
# every handler sees.

class Response:
    """A complete, non-JSON (or non-200) answer: status, body bytes, content type, extra headers."""

    def __init__(self, status=200, body=b"", content_type="text/plain; charset=utf-8", headers=None):
        self.status, self.body, self.content_type = status, body, content_type
        self.headers = headers or {}

    @classmethod
    def json(cls, status, obj):
        """A JSON answer with this status."""
        return cls(status, json_dumps(obj).encode(), "application/json; charset=utf-8")

    @classmethod
    def error(cls, status, message):
        """Ollama's error answer: {"error": message} with this status."""
        return cls.json(status, {"error": message})


class FileResponse:
    """A byte range of an open file as the answer (a blob): `length` bytes from `offset`, sent with
    socket.sendfile (the kernel's sendfile where it exists, no copy through Python); the file is
    closed once sent. HEAD sends the headers only."""

    def __init__(self, f, offset, length, status=200, content_type="application/octet-stream", headers=None):
        self.file, self.offset, self.length, self.status = f, offset, length, status
        self.content_type, self.headers = content_type, headers or {}


class Stream:
    """A streamed answer: `items` is an iterator of JSON-able objects, sent as they come.

    Sent with chunked transfer encoding, one `encode(item)` per chunk (NDJSON by default). An
    OllamaError raised before the first item becomes an ordinary JSON error with its status; one
    raised later becomes a final `error_item(message)` chunk, as Ollama does. When the client goes
    away the iterator is closed, so a generator's `finally` can cancel its work.
    With `length` (bytes; the items are then bytes) it is sent with that Content-Length instead, and
    an error after the first item drops the connection short of it, so the client sees a truncated
    body, never a complete-looking wrong one (an archive).
    """

    def __init__(self, items, content_type="application/x-ndjson",
                 encode=None, error_item=None, headers=None, length=None):
        self.items = iter(items)
        self.content_type = content_type
        self.encode = encode or (lambda obj: (json_dumps(obj) + "\n").encode())
        self.error_item = error_item or (lambda msg: {"error": msg})
        self.headers = headers or {}
        self.length = length


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
        """A file-like reader of the raw body (Content-Length or chunked), streamed; read once."""
        return self.handler.body_reader()

    def body(self, limit=MAX_JSON_BODY):
        """The whole body as bytes; TooLarge (413) past `limit` bytes, before reading them."""
        if self._body is None:
            reader = self.body_stream()
            if reader.remaining > limit:
                raise TooLarge("http: request body too large")
            data = reader.read(limit + 1)
            if len(data) > limit:
                raise TooLarge("http: request body too large")
            self._body = data
        return self._body

    def json(self):
        """The body parsed as a JSON object: 400 "missing request body" when empty, 400 on bad JSON."""
        raw = self.body()
        if not raw.strip():
            raise BadRequest("missing request body")
        data = parse_json(raw)
        if not isinstance(data, dict):
            raise BadRequest("json: cannot unmarshal %s into Go value of type api.Request" % _json_kind(data))
        return data

    def client_gone(self):
        """True when the client closed its connection (checked without consuming data)."""
        sock = self.handler.connection
        try:
            timeout = sock.gettimeout()
            sock.setblocking(False)
            try:
                return sock.recv(1, socket.MSG_PEEK) == b""
            finally:
                sock.settimeout(timeout)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return True


def _no_constant(name):
    if name.startswith("-"):
        raise ValueError("invalid character 'I' in numeric literal")
    raise ValueError("invalid character '%s' looking for beginning of value" % name[0])


def parse_json(raw):
    """JSON bytes decoded by Go's encoding/json rules: NaN and Infinity are errors, invalid UTF-8
    and lone UTF-16 surrogates ("\\ud800") become U+FFFD. BadRequest for bad JSON, nesting too
    deep for Python's parser included."""
    try:
        data = json.loads(raw.decode("utf-8", "replace"), parse_constant=_no_constant)
    except RecursionError:
        raise BadRequest("invalid character '[' exceeded max depth") from None
    except ValueError as e:
        raise BadRequest(str(e)) from None
    if re.search(rb"\\[uU][dD][89a-fA-F]", raw):      # a \uD800-\uDFFF escape: maybe a lone half
        data = _replace_surrogates(data)
    return data


def _replace_surrogates(value):
    if isinstance(value, str):
        return _SURROGATE_RE.sub("\ufffd", value)
    if isinstance(value, list):
        return [_replace_surrogates(v) for v in value]
    if isinstance(value, dict):
        return {_replace_surrogates(k): _replace_surrogates(v) for k, v in value.items()}
    return value


_SURROGATE_RE = re.compile("[\ud800-\udfff]")


def check_fields(body, fields, struct):
    """Go's unmarshal errors for the fields of a request struct: `fields` maps a field to
    (Python type, Go type), or to (list, Go type, element type, Go element type)."""
    for field, spec in fields.items():
        value = _expect(body, field, spec[0], spec[1], struct)
        if value is not None and len(spec) == 4:
            for item in value:
                if not isinstance(item, spec[2]) or isinstance(item, bool) and spec[2] is not bool:
                    raise BadRequest("json: cannot unmarshal %s into Go struct field %s.%s of type %s"
                                     % (_json_kind(item), struct, field, spec[3]))


def _json_type(value):
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


class _BodyReader:
    """Read a request body framed by Content-Length or by chunked transfer encoding."""

    def __init__(self, handler):
        self.rfile = handler.rfile
        self.chunked = "chunked" in (handler.headers.get("Transfer-Encoding") or "").lower()
        self.remaining = 0 if self.chunked else content_length(handler.headers)
        self.done = not self.chunked and self.remaining == 0

    def read(self, n=-1):
        """Up to `n` bytes of the body (all of it when n < 0); b"" at its end. Chunk framing
        and trailers are consumed; BadRequest (400) for a bad chunk size or a body cut short."""
        out = []
        while (n < 0 or n > 0) and not self.done:
            if self.chunked and self.remaining == 0:
                size = self._chunk_size(self.rfile.readline(1024))
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

    @staticmethod
    def _chunk_size(line):
        text = line.split(b";")[0].strip()
        if not re.match(rb"^[0-9a-fA-F]{1,15}$", text):
            raise BadRequest("invalid chunk size %s" % json.dumps(text.decode("latin-1")[:32]))
        return int(text, 16)


def content_length(headers):
    """A request's Content-Length: 0 when absent; BadRequest for anything but one decimal number
    (Go refuses a negative, signed or repeated one the same way)."""
    values = headers.get_all("Content-Length") or []
    if not values:
        return 0
    if len(set(v.strip() for v in values)) != 1 or not re.match(r"^[0-9]{1,18}$", values[0].strip()):
        raise BadRequest("invalid Content-Length %s" % json.dumps(values[0][:32]))
    return int(values[0])


_DEFAULT_ORIGINS = ["http://localhost", "https://localhost", "http://localhost:*", "https://localhost:*",
                    "http://127.0.0.1", "https://127.0.0.1", "http://127.0.0.1:*", "https://127.0.0.1:*",
                    "http://0.0.0.0", "https://0.0.0.0", "http://0.0.0.0:*", "https://0.0.0.0:*",
                    "app://*", "file://*", "tauri://*", "vscode-webview://*", "vscode-file://*"]
#: Preflight answers as gin-contrib/cors writes them: canonical header names joined by ",". Ollama's
#: list, plus the Anthropic SDK's (Ollama serves /v1/messages but a browser could not send these).
_CORS_HEADERS = ",".join(["Authorization", "Content-Type", "User-Agent", "Accept", "X-Requested-With", "Openai-Beta"]
                         + ["X-Api-Key", "Anthropic-Version", "Anthropic-Beta",
                            "Anthropic-Dangerous-Direct-Browser-Access"]
                         + ["X-Stainless-" + h for h in (
                             "Arch", "Async", "Custom-Poll-Interval", "Helper-Method", "Lang", "Os",
                             "Package-Version", "Poll-Helper", "Retry-Count", "Runtime", "Runtime-Version",
                             "Timeout")])
_CORS_METHODS = "GET,POST,PUT,PATCH,DELETE,HEAD,OPTIONS"
#: An origin as a browser sends it (RFC 6454): scheme "://" host [":" port], printable ASCII, no path.
_ORIGIN_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://[!-.0-~]+\Z")


class _DeadlineIO(socket.SocketIO):
    """A connection's reads (under the handler's rfile) with a deadline: while `deadline` (a
    time.monotonic() value) is set, each read waits only until then, so a request head sent a byte
    at a time ends at HEAD_TIMEOUT in all, not after STALL_TIMEOUT per byte."""
    deadline = None

    def readinto(self, b):
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout("request head not complete in %s" % format_duration(HEAD_TIMEOUT))
            self._sock.settimeout(min(left, STALL_TIMEOUT))
        return super().readinto(b)


class OllamaHandler:
    """Serves Ollama's API: host check, CORS, then one route table (ROUTES) for dispatch. A mixin
    that make_server puts over http.server.BaseHTTPRequestHandler (as OllamaServer over its
    ThreadingHTTPServer): http.server, with http.client and the email parser, is imported by serve,
    not by every CLI command (~20 ms a start)."""
    protocol_version = "HTTP/1.1"
    server_version = "ollama.py/" + __version__

    def setup(self):
        """Per connection: reads go through _DeadlineIO (for the head's deadline),
        TCP_NODELAY for token-by-token writes, and the thread's niceness raised by HANDLER_NICE."""
        import io  # always loaded by the interpreter: a lookup
        super().setup()
        self.rfile.close()                           # the makefile() one: reads go through _DeadlineIO
        self._raw = _DeadlineIO(self.connection, "rb")
        self.rfile = io.BufferedReader(self._raw)
        # one small write per token: without this, Nagle + delayed ACK can hold a chunk for 40 ms
        if self.connection.family != socket.AF_UNIX:
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # Linux's niceness is per thread: this connection's relay waits for the gaps between
        # llama-server's token steps instead of preempting a compute thread both of its threads
        # then wait for (runners are forked from the Spawner's thread, at serve's own niceness).
        if HANDLER_NICE and hasattr(os, "setpriority") and sys.platform.startswith("linux"):
            try:
                tid = threading.get_native_id()
                os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + HANDLER_NICE)
            except OSError:
                pass

    def handle_one_request(self):
        """Wait up to IDLE_TIMEOUT for the request's first byte, then give the whole head (request
        line and headers) HEAD_TIMEOUT from that byte on, as Go's ReadHeaderTimeout does."""
        self._reader = None
        self._raw.deadline = None
        self.connection.settimeout(IDLE_TIMEOUT)     # waiting for the next request
        try:
            first = self.rfile.peek(1)
        except socket.timeout:
            first = b""
        if not first:                                # closed, or idle too long
            self.close_connection = True
            return
        self._raw.deadline = time.monotonic() + HEAD_TIMEOUT
        super().handle_one_request()

    def parse_request(self):
        try:
            return super().parse_request()           # reads the headers
        finally:
            self._raw.deadline = None                # the head is in: body and answer may each stall
            self.connection.settimeout(STALL_TIMEOUT)

    def __getattr__(self, name):
        if name.startswith("do_"):                   # every method goes to the router: 404/405, not 501
            return self._dispatch
        raise AttributeError(name)

    def body_reader(self):
        """The request's body reader (one per request)."""
        if self._reader is None:
            self._reader = _BodyReader(self)
        return self._reader

    def _finish_body(self):
        """Keep the connection only if the request's body has been read to its end (a small unread
        rest is drained); otherwise the next request would start inside it."""
        try:
            reader = self.body_reader()
            if not reader.done and (reader.chunked or reader.remaining > COPY_CHUNK):
                self.close_connection = True
            elif not reader.done:
                reader.read()
        except (OllamaError, OSError):
            self.close_connection = True

    def log_message(self, fmt, *args):
        text = fmt % args                            # http.server's lines hold the raw request line
        log.debug("%s %s", self.address_string(), text if text.isprintable() else log_value(text))

    def _dispatch(self):
        """Every HTTP method's entry (see __getattr__): take a request slot (503 when the
        server is busy), route, drain what is left of the body, then count, time and log it."""
        started = time.monotonic()
        status = 500
        self._endpoint = None                  # the route pattern matched: the metrics' endpoint label
        try:
            if not self.server.begin_request(self.client_address):
                status = self._send(Response.json(503, {"error": _BUSY}))
                self.close_connection = True
                return
            try:
                status = self._route()
            finally:
                self.server.end_request(self.client_address)   # a body left to drain holds no slot
            if not self.close_connection:
                self._finish_body()
        finally:
            endpoint = self._endpoint or "other"      # never the raw path: one series per route, not per URL
            self.server.metrics.add("ollama_http_requests_total", endpoint=endpoint, method=self.command,
                                    status=status)
            self.server.metrics.observe("ollama_http_request_duration_seconds", time.monotonic() - started,
                                        endpoint=endpoint)
            log.info("| %3d | %10s | %15s | %-7s %s", status, format_duration(time.monotonic() - started),
                     self.client_address[0], self.command, log_value(urllib.parse.urlsplit(self.path).path))

    def _route(self):
        """Answer one request -> the status sent (499 when the client went away, 408 when
        it stalled): CORS and host checks (bare 403 or 204), API keys, then the route's handler,
        whose OllamaError is answered with its status and any other exception as a 500."""
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
            func, params, owner, self._endpoint = self.server.routes.match(self.command, path)
            if self.server.config.api_keys and path != "/" and not self._api_key_ok():
                return self._send(_unauthorized(owner))
            self.body_reader()                                  # a bad Content-Length is a 400 here
            if func is None:
                if owner:
                    return self._send(Response(405, b"405 method not allowed"))
                return self._send(Response(404, b"404 page not found"))
            result = func(Request(self, params))
        except OllamaError as e:
            result = Response.error(e.status, str(e))
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
            return 499
        except socket.timeout:                                  # the client stalled: drop it
            self.close_connection = True
            return 408
        except Exception as e:                                  # a bug: report it, keep serving
            log.exception("internal error on %s %s", self.command, log_value(self.path))
            result = Response.error(500, str(e))
        try:
            return self._send(result)
        except ConnectionError:                                 # the client hung up before its answer
            self.close_connection = True
            return 499

    def _api_key_ok(self):
        """OLLAMA_API_KEYS: the request carries one of the keys, as `Authorization: Bearer KEY` (Ollama's
        and OpenAI's clients) or `x-api-key: KEY` (Anthropic's). Every key is compared, in constant
        time, so the answer's timing says nothing about how much of a key matched."""
        import hmac
        auth = self.headers.get("Authorization", "")
        given = (auth[7:] if auth[:7].lower() == "bearer " else self.headers.get("x-api-key", "")).strip()
        ok = False
        for key in self.server.config.api_keys:
            ok |= hmac.compare_digest(given.encode(), key.encode())
        return ok

    def _cors(self):
        """The CORS headers for an allowed cross-origin request (_route set its origin): the
        origin, or * when OLLAMA_ORIGINS allows all, and for a preflight the allowed methods,
        headers and max age."""
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
        """Send a handler's result -> its status: a Stream, a FileResponse, a Response, or
        any other value as a 200 JSON body (None: an empty body)."""
        if isinstance(result, Stream):
            return self._send_stream(result)
        if isinstance(result, FileResponse):
            return self._send_file(result)
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

    def _send_file(self, result):
        """Send a FileResponse with sendfile -> its status (499 when the client went
        away); the connection is closed if the file shrank under it. The file is always closed."""
        try:
            self.send_response(result.status)
            self.send_header("Content-Type", result.content_type)
            for k, v in result.headers.items():
                self.send_header(k, v)
            self._cors()
            self.send_header("Content-Length", str(result.length))
            self.end_headers()
            if self.command != "HEAD" and result.length:
                sent = self.connection.sendfile(result.file, result.offset, result.length)
                if sent != result.length:                       # the file shrank: the framing is broken
                    self.close_connection = True
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, socket.timeout):
            self.close_connection = True
            return 499
        finally:
            result.file.close()
        return result.status

    def _send_stream(self, stream):
        """Send a Stream -> its status, items written as they come (chunked, or with
        its Content-Length). An error before the first item is an ordinary error answer, a later
        one a last error item (sized: a connection cut short). The iterator is closed at the end,
        so its cleanup runs."""
        items = stream.items
        try:
            first = next(items)
        except StopIteration:
            first = None
        except OllamaError as e:
            return self._send(Response.error(e.status, str(e)))
        self.send_response(200)
        self.send_header("Content-Type", stream.content_type)
        for k, v in stream.headers.items():
            self.send_header(k, v)
        self._cors()
        sized = stream.length is not None
        self.send_header(*("Content-Length", str(stream.length)) if sized else ("Transfer-Encoding", "chunked"))
        self.end_headers()
        write = self.wfile.write if sized else self._chunk
        if sized and self.command == "HEAD":
            first = None                                        # the length, without the body
        try:
            item = first
            while item is not None:
                write(stream.encode(item))
                try:
                    item = next(items)
                except StopIteration:
                    break
                except Exception as e:
                    if not isinstance(e, OllamaError):
                        log.exception("internal error while streaming %s", log_value(self.path))
                    if sized:
                        log.error("%s stopped short of its Content-Length: %s", log_value(self.path), e)
                        self.close_connection = True
                        return 500
                    self._chunk(stream.encode(stream.error_item(str(e))))
                    break
            if not sized:
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


#: The one route table: (method, pattern, handler) in file order, filled by @route beside each
#: handler. HEAD is served by the GET handler where no HEAD route is given.
ROUTES = []


def route(method, pattern):
    """Declare the decorated function the handler of `method pattern` (":name" segments become
    req.params, and a last "*name" takes the rest of the path, slashes included), as bottle's @route
    does: it goes into ROUTES, which every OllamaServer serves.
    Over another decorator (@_openai), it registers the wrapped handler."""
    def register(handler):
        ROUTES.append((method, pattern, handler))
        return handler
    return register


class Routes:
    """The route table: (method, pattern) -> handler; ":name" segments capture path params, "*name"
    the rest of the path."""

    def __init__(self, table):
        self.table = []
        for method, pattern, func in table:
            regex = "^" + re.sub(r"\*(\w+)$", r"(?P<\1>.+)", re.sub(r":(\w+)", r"(?P<\1>[^/]+)", pattern)) + "$"
            self.table.append((method, re.compile(regex), func, pattern))

    def match(self, method, path):
        """(func, params, owner, pattern): the handler or None, the captured params, the handler of
        the path under any method (None when no route has the path: a 404, else a 405; a refusal
        takes its API's shape from it), and the route's pattern (what metrics label it with)."""
        owner, found = None, None
        for m, regex, func, pattern in self.table:
            hit = regex.match(path)
            if hit:
                if m == method or (method == "HEAD" and m == "GET"):
                    return func, hit.groupdict(), func, pattern
                owner, found = owner or func, found or pattern
        return None, {}, owner, found


_BUSY = "server busy, please try again.  maximum connections exceeded"


class OllamaServer:
    """The `serve` process: the HTTP listener plus all server state (store, scheduler, config). A
    mixin over http.server.ThreadingHTTPServer: make_server builds one, with its `handler` class.

    Connection slots. A client can hold a connection open for free (an idle socket, or a request
    head sent a byte at a time) and before its head is read nothing is known of it, not even
    whether it has a key for OLLAMA_API_KEYS; so only requests count against max_connections
    (MAX_CONNECTIONS): a slot is taken once a request's head is in and given back once its answer
    is sent (begin_request/end_request; an unauthorised request's 401 holds it for microseconds).
    Connections without a request in progress cost a thread and an fd each, so they are bounded
    another way: a head must be complete HEAD_TIMEOUT after its first byte, a connection waits
    IDLE_TIMEOUT at most for that byte, and at max_open open connections a new one is still
    accepted and the one idle longest (no request in progress: waiting for or reading a head,
    kept alive, draining a body) is closed instead, so idle and slow sockets can never make a
    client with a complete request get a 503 (an evicted kept-alive client reconnects, as HTTP
    clients do). A non-loopback peer (an IPv4 address, an IPv6 /64) may hold max_per_peer
    (MAX_PEER_CONNECTIONS) connections; more get a 503 at once. Loopback is not capped per peer:
    every local client (the CLI, agents, a browser) shares 127.0.0.1, so a per-peer cap there
    would be a global one, and a local user can already do worse than hold sockets."""
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, config, address=None, routes=None):
        """The server's state and its bound listener: TLS, store, routes (/v2 and /metrics
        as the config allows), scheduler, transfers, connection caps. `address` (host, port)
        replaces OLLAMA_HOST's (tests bind port 0)."""
        self.config = config
        self.tls = _tls_context(config)                # first: a bad certificate starts nothing
        self.store = Store(config.models)
        self.routes = routes or Routes([r for r in ROUTES if (config.registry or not r[1].startswith("/v2"))
                                        and (config.metrics or r[1] != "/metrics")])
        self.metrics = Metrics()          # Prometheus counters (GET /metrics), filled by the parts below too
        self.scheduler = Scheduler(config, metrics=self.metrics)
        self.transfers = Transfers(self.metrics)      # registry downloads in flight, shared per digest
        self.served_blobs = {}            # digest -> stat identity of the file whose bytes /v2 hashed and matched
        self.verify_lock = threading.Lock()     # guards served_blobs and verify_locks
        self.verify_locks = {}            # digest -> Lock: one hash of a blob at a time (its parallel parts wait)
        self.unix = config.unix if address is None else None      # OLLAMA_HOST=unix:PATH: the only listener
        self.unix_peers = itertools.count(1)    # the client "address" of the Nth connection on the socket
        host = config.host if address is None else address[0]
        port = config.port if address is None else address[1]
        self.address_family = socket.AF_UNIX if self.unix else socket.AF_INET6 if ":" in host else socket.AF_INET
        self.request_queue_size = listen_backlog()
        self.max_open = min(MAX_OPEN, max(32, _fd_limit() - 128))      # fds kept for files, runners
        self.max_connections = min(MAX_CONNECTIONS, self.max_open)
        self.max_per_peer = MAX_PEER_CONNECTIONS
        self.open = {}                    # client address -> [socket, idle since (None: a request in progress), peer]
        self.peers = {}                   # peer (None: loopback) -> open connections
        self.requests = 0                 # requests in progress (slots taken)
        self.connections_lock = threading.Lock()       # guards open, peers and requests
        self.accept_backoff = 0.0                      # seconds; grows while accept() has no fd to give
        self.socket_id = None                          # (st_dev, st_ino) of the socket file we bound
        super().__init__(self.unix or (host, port), self.handler)
        self.origins = _DEFAULT_ORIGINS + config.origins
        self.loopback = bool(self.unix) or _is_loopback(host)

    def server_bind(self):
        """TCP as http.server binds it; a Unix socket file made 0600 (0660 with OLLAMA_SOCKET_GROUP,
        owned by that group), with its directory made if missing (0700). A socket file left by a
        killed serve (nothing accepts on it) is replaced; one a live server answers on is an error."""
        if not self.unix:
            try:
                return super().server_bind()
            except OSError as e:                 # Go's net.Listen text, not a traceback
                host, port = self.server_address[:2]
                raise OllamaError("listen tcp %s:%d: bind: %s" % ("[%s]" % host if ":" in host else host, port,
                                  (e.strerror or str(e)).lower())) from None
        gid = _socket_group(self.config.socket_group)
        path = self.unix
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        _take_over_socket(path)
        old = os.umask(0o177)                  # created 0600: no moment when another user can connect
        try:
            self.socket.bind(path)
        finally:
            os.umask(old)
        if gid is not None:
            os.chown(path, -1, gid)
            os.chmod(path, 0o660)
        st = os.stat(path)
        self.socket_id = (st.st_dev, st.st_ino)
        self.server_address = path
        self.server_name, self.server_port = "localhost", 0

    def get_request(self):
        """accept(), backing off (5 ms doubling to 1 s, as Go's http.Server) while the process is out
        of file descriptors: the listener stays readable then, and retrying at once would spin. A
        Unix socket's peer has no address: it is ("unix", N), N counting connections, so that each
        has a key of its own among the open connections (see "Connection slots")."""
        try:
            conn, addr = super().get_request()
        except OSError as e:
            if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                self.accept_backoff = min(1.0, self.accept_backoff * 2 or 0.005)
                log.warning("accept: %s; retrying in %s", e.strerror, format_duration(self.accept_backoff))
                time.sleep(self.accept_backoff)
            raise
        self.accept_backoff = 0.0
        return conn, ("unix", next(self.unix_peers)) if self.unix else addr

    def finish_request(self, request, client_address):
        """With OLLAMA_TLS_CERT/KEY, the TLS handshake happens here, on the connection's own thread
        (a slow or broken client holds up no one else), bounded by the stall timeout."""
        if self.tls is None:
            return super().finish_request(request, client_address)
        request.settimeout(STALL_TIMEOUT)
        request = self.tls.wrap_socket(request, server_side=True, do_handshake_on_connect=False)
        try:
            with self.connections_lock:               # wrapping took the fd: eviction shuts this one
                if client_address in self.open:
                    self.open[client_address][0] = request
            try:
                request.do_handshake()
            except OSError as e:                      # ssl.SSLError is one
                log.debug("TLS handshake with %s failed: %s", client_address[0], e)
                return None
            return super().finish_request(request, client_address)
        finally:
            self._forget(client_address)
            request.close()

    @property
    def connections(self):
        """Open connections."""
        return len(self.open)

    def process_request(self, request, client_address):
        """Admit a connection (see the class's "Connection slots"): over its peer's cap it gets a
        503; at max_open the one idle longest is closed to make room."""
        peer = _peer_key(client_address[0])
        with self.connections_lock:
            refuse = peer is not None and self.peers.get(peer, 0) >= self.max_per_peer
            if not refuse and len(self.open) >= self.max_open:
                refuse = not self._evict()
            if not refuse:
                self.open[client_address] = [request, time.monotonic(), peer]
                self.peers[peer] = self.peers.get(peer, 0) + 1
        if refuse:
            return self._refuse(request, peer)
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._forget(client_address)
            raise

    def process_request_thread(self, request, client_address):
        # socketserver's, with the connection forgotten before it is closed: _evict shuts sockets
        # down under the lock, never one whose fd may already be another connection's
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self._forget(client_address)
            self.shutdown_request(request)

    def _evict(self):
        """Close the connection idle longest (called with connections_lock held); False if every
        open one has a request in progress."""
        idle = [(entry[1], address) for address, entry in self.open.items() if entry[1] is not None]
        if not idle:
            return False
        address = min(idle)[1]
        sock = self.open[address][0]
        self._forget(address, locked=True)
        log.debug("closing the connection from %s idle longest: %d open", address[0], self.max_open)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)               # its thread's read ends, and the thread with it
        return True

    def _forget(self, client_address, locked=False):
        with contextlib.nullcontext() if locked else self.connections_lock:
            entry = self.open.pop(client_address, None)
            if entry is None:
                return
            if entry[1] is None:
                self.requests -= 1
            self.peers[entry[2]] -= 1
            if not self.peers[entry[2]]:
                del self.peers[entry[2]]

    def begin_request(self, client_address):
        """Take a request slot for this connection, whose request head is in; False if all
        max_connections are taken (the request gets a 503)."""
        with self.connections_lock:
            entry = self.open.get(client_address)
            if self.requests >= self.max_connections or entry is None:
                return False
            if entry[1] is not None:
                entry[1] = None
                self.requests += 1
            return True

    def end_request(self, client_address):
        """Give the slot back: the answer is sent, the connection is idle again."""
        with self.connections_lock:
            entry = self.open.get(client_address)
            if entry is not None and entry[1] is None:
                entry[1] = time.monotonic()
                self.requests -= 1

    def handle_error(self, request, client_address):
        """An exception out of a connection's handler (socketserver prints its traceback to stderr).
        A client that hung up or stalled is normal: one debug line, as Go's net/http logs it; any
        other exception is our bug and keeps its traceback."""
        e = sys.exc_info()[1]
        if isinstance(e, (ConnectionError, socket.timeout)):
            log.debug("connection from %s ended: %s", client_address[0], e.strerror or type(e).__name__)
        else:
            log.exception("internal error serving %s", client_address[0])

    def _refuse(self, request, peer=None):
        """Answer a connection over a cap with a 503 and close it, without a thread: what the
        client has sent so far is read first, so the close does not reset the answer away."""
        if peer is not None and self.peers.get(peer, 0) >= self.max_per_peer:
            log.warning("refusing a connection from %s: %d open from it", peer, self.max_per_peer)
        else:
            log.warning("refusing a connection: %d open, each with a request in progress", self.max_open)
        body = json_dumps({"error": _BUSY}).encode()
        try:
            request.setblocking(False)
            with contextlib.suppress(OSError):
                request.recv(65536)
            request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json; charset=utf-8"
                            b"\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        except OSError:
            pass
        self.shutdown_request(request)

    @property
    def url(self):
        if self.unix:
            return "unix:" + self.unix
        host, port = self.server_address[:2]
        return "%s://%s:%d" % ("https" if self.tls else "http", "[%s]" % host if ":" in host else host, port)

    def host_allowed(self, host_header):
        """The DNS-rebinding guard (Ollama's allowedHostsMiddleware). Falsy: refuse with 403. Bound
        off loopback, or a Host that is a loopback/private/unspecified/local address: True. A local
        name (localhost, this machine's name, *.localhost, *.local, *.internal): "name". On a Unix
        socket, anything (no browser page can reach one, so there is no rebinding to guard)."""
        if not self.loopback or self.unix:
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
        pattern may hold one "*" (gin-contrib/cors AllowWildcard). Only a well-formed origin
        (scheme://host[:port], or "null") is allowed: it is echoed in a header, and a folded one
        would carry its line break there (a forged header)."""
        if origin != "null" and not _ORIGIN_RE.match(origin):
            return False
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
        if self.socket_id is not None:         # our socket file, unless another serve has replaced it
            with contextlib.suppress(OSError):
                st = os.stat(self.unix)
                if (st.st_dev, st.st_ino) == self.socket_id:
                    os.unlink(self.unix)
            self.socket_id = None


def _socket_group(name):
    """The gid OLLAMA_SOCKET_GROUP names (a group name or number), or None when unset."""
    if not name:
        return None
    import grp
    try:
        return grp.getgrgid(int(name)).gr_gid if name.isdigit() else grp.getgrnam(name).gr_gid
    except (KeyError, ValueError):
        raise OllamaError("OLLAMA_SOCKET_GROUP=%s: no such group" % name) from None


def _take_over_socket(path):
    """Clear the way to bind a Unix socket at `path`: nothing there, or a socket file no process
    accepts on (a killed serve's) is removed. A live server there, or a file that is not a
    socket, is an OllamaError."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise OllamaError("cannot listen on %s: it exists and is not a socket" % path)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(2.0)
        probe.connect(path)
    except ConnectionRefusedError:              # stale: the serve that bound it is gone
        log.info("removing the stale socket %s left by a server that is gone", path)
        os.unlink(path)
        return
    except OSError as e:
        raise OllamaError("cannot listen on %s: %s" % (path, e.strerror or e)) from None
    finally:
        probe.close()
    raise OllamaError("cannot listen on %s: another server is already listening on it "
                      "(stop it first, or choose another OLLAMA_HOST)" % path)


def _tls_context(config):
    """The server's TLS context from OLLAMA_TLS_CERT and OLLAMA_TLS_KEY (PEM files), or None for
    plain HTTP. One without the other, or files that do not load, is an error at start."""
    if not (config.tls_cert or config.tls_key):
        return None
    if not (config.tls_cert and config.tls_key):
        raise OllamaError("OLLAMA_TLS_CERT and OLLAMA_TLS_KEY must be set together")
    import ssl  # here, not at the top: only a TLS serve (or an https client) needs it
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(config.tls_cert, config.tls_key)
    except OSError as e:                            # ssl.SSLError is one
        raise OllamaError("cannot load OLLAMA_TLS_CERT/OLLAMA_TLS_KEY: %s" % e) from None
    return context


def _unauthorized(handler):
    """The 401 for a request without a valid OLLAMA_API_KEYS key, in the shape of the API it called:
    the `unauthorized` body its handler's decorator declares (_errors_as, _oci), else Ollama's."""
    answer = Response.json(401, getattr(handler, "unauthorized", None) or {"error": "unauthorized"})
    answer.headers["WWW-Authenticate"] = 'Bearer realm="ollama.py"'
    return answer


def _peer_key(address):
    """The peer a connection's address counts against for MAX_PEER_CONNECTIONS: None for loopback
    and a Unix socket (not capped), an IPv4 address, or an IPv6 /64 (one host's share of a network: it can pick any
    address in it)."""
    import ipaddress
    if address == "unix":                   # a Unix socket's peers are this machine's users, as loopback's
        return None
    ip = _parse_ip(address.split("%", 1)[0])
    if ip is None:
        return address
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback:
        return None
    if ip.version == 6:
        return str(ipaddress.ip_network((ip, 64), strict=False))
    return str(ip)


def _split_host(host_header):
    """The host part of a Host header (Go's net.SplitHostPort, else the whole value)."""
    if host_header.startswith("["):
        inner, _, rest = host_header[1:].partition("]")
        return inner if rest.startswith(":") or not rest else host_header
    if host_header.count(":") == 1:
        return host_header.split(":", 1)[0]
    return host_header


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


def _peer_trusted(req):
    """True when the client is a process of the server's own user on this machine: on a Unix
    socket, a peer whose uid SO_PEERCRED gives (exact: the kernel's record of who connected); on
    TCP, a loopback peer whose socket /proc/net/tcp(6) says that uid owns. Unknown (no /proc,
    another network namespace, the socket already gone) is untrusted."""
    sock = req.handler.connection
    if sock.family == socket.AF_UNIX:
        try:
            _pid, uid, _gid = struct.unpack("3i", sock.getsockopt(
                socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
        except (OSError, AttributeError):      # AttributeError: no SO_PEERCRED (not Linux)
            return False
        return uid == os.geteuid()
    try:
        peer, local = sock.getpeername(), sock.getsockname()
    except OSError:
        return False
    ip = _parse_ip(peer[0].split("%")[0])
    if ip is None or not (ip.is_loopback or getattr(ip, "ipv4_mapped", None) and ip.ipv4_mapped.is_loopback):
        return False
    return socket_owner(peer[:2], local[:2]) == os.geteuid()


def _proc_net_addr(host, port):
    """An (ip, port) as /proc/net/tcp(6) spells it: each 32-bit word of the address in host byte
    order, in hex, then ":" and the port in hex. Returns (table, text); an IPv4-mapped IPv6
    address is looked up in the IPv4 table, where a dual-stack client's socket is."""
    ip = _parse_ip(host.split("%")[0])
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    words = struct.unpack("=%dI" % (len(ip.packed) // 4), ip.packed)
    return ("tcp" if ip.version == 4 else "tcp6"), "".join("%08X" % w for w in words) + ":%04X" % port


def socket_owner(peer, local):
    """The uid that owns the TCP socket whose local end is `peer` and remote end is `local` (both
    (ip, port)): the client's end of a connection this process accepted. None when unknown."""
    table, want_local = _proc_net_addr(*peer)
    _table, want_remote = _proc_net_addr(*local)
    if _table != table:
        return None
    try:
        with open("/proc/net/" + table) as f:
            lines = f.readlines()[1:]
    except OSError:
        return None
    for line in lines:
        fields = line.split()     # sl local_address rem_address st tx:rx tr:when retrnsmt uid ...
        if len(fields) > 7 and fields[1] == want_local and fields[2] == want_remote:
            return int(fields[7])
    return None


def listen_backlog():
    """The listen backlog Go uses: net.core.somaxconn (at most 65535, Linux keeps it in 16 bits),
    else 4096. socketserver's default of 5 drops SYNs under a burst of connections."""
    try:
        with open("/proc/sys/net/core/somaxconn") as f:
            return max(1, min(int(f.read().strip()), 65535))
    except (OSError, ValueError):
        return 4096


def _fd_limit():
    try:
        import resource
        return resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):
        return MAX_CONNECTIONS * 2


def raise_fd_limit():
    """Raise the soft open-file limit to the hard one, as every Go program does at start (1.19+)."""
    try:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or hard > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 1 << 20, hard))
    except (ImportError, OSError, ValueError):
        pass


def make_server(config=None, host=None, port=None):
    """An OllamaServer bound to (host, port) (port 0 picks a free one); call serve_forever()."""
    import http.server  # here, not at the top: see OllamaHandler
    config = config or Config()
    handler = type("OllamaHandler", (OllamaHandler, http.server.BaseHTTPRequestHandler), {})
    server = type("OllamaServer", (OllamaServer, http.server.ThreadingHTTPServer), {"handler": handler})
    if config.unix and host is None and port is None:
        return server(config)                     # OLLAMA_HOST=unix:PATH
    return server(config, (host or config.host, config.port if port is None else port))


###############################################################################
# HTTP API ####################################################################
###############################################################################
# The handlers: Ollama's /api, a read-only OCI registry (/v2), OpenAI's /v1 and Anthropic's /v1/messages.

# == HTTP API: Ollama's API (/api) ============================================

# -- general -----------------------------------------------------------------

@route("GET", "/")
def api_root(req):
    """GET|HEAD /: the heartbeat every CLI command sends first."""
    return Response(200, b"Ollama is running")


@route("GET", "/api/version")
def api_version(req):
    """GET /api/version: the Ollama version whose API we implement (clients gate features on it:
    Codex wants 0.13.4 or newer), and ours in a field of its own."""
    return {"version": API_VERSION, "ollama_py": __version__}


@route("GET", "/metrics")
def api_metrics(req):
    """GET /metrics: Prometheus' text exposition (0.0.4) of Metrics, with the gauges read now: the
    queue, the loaded runners and their llama-servers' resident memory. Keys guard it as the rest
    of the API; OLLAMA_METRICS=0 leaves the route out (404)."""
    scheduler = req.server.scheduler
    gauges = [("ollama_queue_depth", {}, scheduler.waiting)]
    running = scheduler.running()
    gauges.append(("ollama_runners_loaded", {}, len(running)))
    for e in running:
        gauges.append(("ollama_runner_memory_bytes", {"model": e.model.short_name}, _rss_bytes(e.runner)))
    return Response(200, req.server.metrics.text(gauges).encode(), "text/plain; version=0.0.4; charset=utf-8")


def _rss_bytes(runner):
    """A runner's llama-server resident memory (Linux /proc), else 0."""
    proc = getattr(runner, "proc", None)
    try:
        with open("/proc/%d/statm" % proc.pid) as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError, IndexError):
        return 0


# -- models ------------------------------------------------------------------

def _model_field(body, key="model"):
    """The model a request names: its `key` field, or the older "name" (Ollama reads both). Each
    endpoint checks it with its own Ollama message."""
    return body.get(key) or body.get("name")


def _blob_digest_param(req):
    return parse_digest(req.params.get("digest"))


@route("HEAD", "/api/blobs/:digest")
def api_blob_head(req):
    """HEAD /api/blobs/:digest: 200 if the blob is stored, else 404 `blob "…" not found`."""
    digest = _blob_digest_param(req)
    if not req.server.store.has_blob(digest):
        raise NotFound('blob "%s" not found' % req.params.get("digest"))
    return Response(200, b"", None)


@route("POST", "/api/blobs/:digest")
def api_blob_post(req):
    """POST /api/blobs/:digest: store the body as a blob, streamed to disk and verified.

    201 when created, 200 when it already existed, 400 `digest mismatch, expected "…", got "…"`
    (nothing is kept). No-copy import (an ollama.py extension): with the header
    `X-Ollama-Path: /abs/path` and an empty body, a server that runs on the same machine as the
    client, as the same user (`_peer_trusted`), hashes that file and, when it matches the digest,
    links it into blobs/ (a reflink or hard link when the store is on the same filesystem, else a
    copy). Any other client gets one 403 before the path is looked at, so the answer says nothing
    about the file, and a mismatch never names the file's real digest: the header can only do
    what the caller could do by reading the file and uploading it. The hashed file is the linked
    one, checked unchanged (size, mtime, inode) after hashing, so the blob matches its name when it
    is committed. A hard-linked blob shares its bytes with the
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
        if not _peer_trusted(req):
            raise Forbidden("X-Ollama-Path is only honoured for a local client running as the server's user")
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


def _list_gguf_details(model, entry):
    """What Ollama's model list adds from the GGUF (headers are cached per blob): capabilities,
    details.context_length and details.embedding_length. A model whose GGUF cannot be read is listed
    without them."""
    name = model.name
    try:
        caps = model_capabilities(model)
        g = model.gguf() if model.model_path else None
    except (OSError, OllamaError) as e:
        log.debug("list: %s: %s", name.display(), e)
        return
    if caps:
        entry["capabilities"] = caps
    if g is not None:
        for key, value in (("context_length", g.context_length), ("embedding_length", g.embedding_length)):
            if value:
                entry["details"][key] = value


@route("GET", "/api/tags")
def api_tags(req):
    """GET /api/tags: every stored model, newest first."""
    store = req.server.store
    models = []
    for name, raw, manifest, mtime in store.list():
        config = _read_config(store, manifest)
        model = Model(name, raw, manifest, config, store)
        size = sum(int(layer.get("size") or 0) for layer in manifest.get("layers") or [])
        size += int((manifest.get("config") or {}).get("size") or 0)
        entry = {"name": name.display(), "model": name.display(), "modified_at": rfc3339_local(mtime),
                 "size": size, "digest": model.digest, "details": _model_details(config)}
        _list_gguf_details(model, entry)
        models.append((mtime, entry))
    models.sort(key=lambda m: m[0], reverse=True)
    return {"models": [m for _, m in models]}


@route("POST", "/api/show")
def api_show(req):
    """POST /api/show: a model's Modelfile, parameters, template, details, metadata, capabilities."""
    body = req.json()
    text = _model_field(body)
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
    resp["template"] = model.jinja_template() or model.template     # the one that renders chat
    notes = model.engine_notes()
    if notes:
        resp["engine"] = notes
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
        resp["tensors"] = [t.to_dict() for t in g.tensors]        # always, as Ollama (the CLI shows them with -v)
    caps = model_capabilities(model)
    if caps:
        resp["capabilities"] = caps
    resp["modified_at"] = rfc3339_local(store.manifest_path(model.name).stat().st_mtime)
    if model.config.get("requires"):
        resp["requires"] = model.config["requires"]
    return resp


@route("POST", "/api/copy")
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


@route("DELETE", "/api/delete")
def api_delete(req):
    """DELETE /api/delete {model}: remove the manifest, then the blobs no other model uses."""
    body = req.json()
    text = _model_field(body) or ""
    if not isinstance(text, str) or not _valid(text):
        raise BadRequest("name %s is invalid" % _go_quote(str(text)))
    store = req.server.store
    if store.resolve(Name.parse(text)) is None:
        raise NotFound("model '%s' not found" % text)
    store.delete(text)
    return None


def _pull_for_create(req, name):
    """/api/create with a `from` model that is not stored pulls it first, streaming the pull's
    progress (its closing "success" is left to create)."""
    def pull(report, cancel):
        return pull_model(*_registry_parts(req), name, False, report, cancel)

    for progress in _progress_items(pull):
        if progress.get("status") != "success":
            yield progress


def _validate_create_files(files, what="files"):
    """A create request's `files` (or `adapters`, `draft_files`): file names, relative,
    to digests -> the dict ({} when absent); BadRequest (400) naming a bad name or digest."""
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


@route("POST", "/api/create")
def api_create(req):
    """POST /api/create: build a model from GGUF blobs (`files`) or another model (`from`), plus
    template, system, license, parameters and messages; streams statuses ending in "success"."""
    body = req.json()
    text = _model_field(body) or ""
    files = _validate_create_files(body.get("files"))
    adapters = _validate_create_files(body.get("adapters"), "adapters")
    adapters = {"adapter": adapters, "draft": _validate_create_files(body.get("draft_files"), "draft_files")}
    quantize = body.get("quantize") or body.get("quantization")
    level = quantize_level(quantize) if quantize else None
    if isinstance(body.get("template"), str) and body["template"]:
        try:                                        # refused now, not at the first chat (as Ollama)
            parse_template(body["template"])
        except TemplateError as e:
            raise BadRequest("template error: %s" % e) from None
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
    spec = CreateSpec(name, from_name, files, adapters["adapter"], adapters["draft"], level,
                      {k: body.get(k) for k in ("template", "system", "license", "renderer", "parser", "requires")},
                      parameters, messages)
    server = req.server

    def quantize(level, digests):
        exe = find_engine_tool(server.config, "llama-quantize")
        return quantize_blobs(server.store, exe, level, digests, spawn=server.scheduler.spawner.popen)

    items = create_model(server.store, spec, pull=lambda name: _pull_for_create(req, name), quantize=quantize,
                         prune=not server.config.noprune)
    if stream:
        return Stream(items)
    last = None
    for last in items:  # noqa: B007 -- run the stream to its end, keeping its last item
        pass
    return last


# -- inference ---------------------------------------------------------------

def _ns(seconds):
    return int(seconds * 1e9)


def _find_model(req, body, key="model"):
    """The Model named in the request: 400 for a missing/invalid name, 404 when not stored."""
    text = _model_field(body, key)
    if not text:
        raise BadRequest("model is required")
    if not isinstance(text, str):
        raise BadRequest("invalid model name")
    name = Name.parse(text)
    if req.server.store.resolve(name) is None:
        raise NotFound("model '%s' not found" % text)
    model = load_model(req.server.store, name)
    if model.model_path is None or not os.path.isfile(model.model_path):
        raise NotFound('model "%s" not found, try pulling it first' % model.short_name)
    return model


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


def _metrics(final, turn):
    """Ollama's timing fields from the turn's final /completion event (zero values omitted), counted
    for the lease's model in the server's Prometheus metrics too."""
    started, lease = turn.started, turn.lease
    t = final.get("timings") or {}
    model, metrics = lease.entry.model.short_name, lease.scheduler.metrics
    metrics.add("ollama_prompt_tokens_total", int(t.get("prompt_n", 0)) + int(t.get("cache_n", 0)), model=model)
    metrics.add("ollama_prompt_eval_seconds_total", float(t.get("prompt_ms", 0)) / 1e3, model=model)
    metrics.add("ollama_generated_tokens_total", int(t.get("predicted_n", 0)), model=model)
    metrics.add("ollama_generation_seconds_total", float(t.get("predicted_ms", 0)) / 1e3, model=model)
    out = {"total_duration": _ns(time.monotonic() - started), "load_duration": _ns(lease.load_s),
           "prompt_eval_count": int(t.get("prompt_n", 0)) + int(t.get("cache_n", 0)),
           "prompt_eval_duration": int(t.get("prompt_ms", 0) * 1e6),
           "eval_count": int(t.get("predicted_n", 0)),
           "eval_duration": int(t.get("predicted_ms", 0) * 1e6)}
    return {k: v for k, v in out.items() if v}


def _render(model, runner, messages, template=None, tools=None, think=None):
    """The prompt text for a conversation: the model's Go TEMPLATE when it has one, else the chat
    template embedded in the GGUF (through llama-server's /apply-template), else {{ .Prompt }}."""
    if template is None and model.jinja_template():
        return runner.apply_template([{"role": m.get("role"), "content": m.get("content") or ""}
                                      for m in messages], None if think is None else _jinja_think_kwargs(think))
    return render_prompt(template if template is not None else model.parsed_template(), messages, tools=tools,
                         think=think)


def _fit_chat(model, runner, messages, tools, think, truncate):
    """Render a chat prompt. With "truncate": true, the oldest turns are dropped until it fits num_ctx
    (system messages and the last message stay, as Ollama does); otherwise an over-long prompt is
    left for the engine to refuse with a clear 400 - ollama.py never cuts a prompt silently."""
    if not truncate:
        return _render(model, runner, messages, tools=tools, think=think)

    def count(text):
        return len(runner.tokenize(text, add_special=True))

    if not model.jinja_template():
        text, dropped = chat_prompt(model.parsed_template(), messages, count, runner.num_ctx, tools=tools,
                                    think=think, image_tokens=IMAGE_TOKENS if model.projector_paths else 0)
    else:
        keep = list(messages)
        dropped = 0
        while True:
            text = _render(model, runner, keep)
            droppable = [i for i, m in enumerate(keep[:-1]) if m.get("role") != "system"]
            if count(text) <= runner.num_ctx or not droppable:
                break
            del keep[droppable[0]]
            dropped += 1
    if dropped:
        log.info("truncated chat: dropped the %d oldest messages to fit num_ctx=%d", dropped, runner.num_ctx)
    return text


def _check_capability(body, model, capability, what):
    """400 `"NAME" does not support WHAT` when the model lacks `capability` (an embedding-only
    model asked to generate, say)."""
    try:
        model.gguf()
    except (OSError, OllamaError) as e:             # a broken blob is the server's problem, not the request's
        raise OllamaError("unable to load model %s: %s" % (model.model_path, e)) from None
    if capability not in model.capabilities():
        raise BadRequest('"%s" does not support %s' % (body.get("model"), what))


def _check_think(body, model, relax=False):
    """The request's `think` as Ollama's chat and generate handlers settle it: None (unset), a bool or
    a level. A thinking-capable model thinks unless told `false` (which templates then see as set);
    asking a model that cannot think is a 400, or, with `relax` (/v1/messages), ignored."""
    think = body.get("think")
    if think is not None and not isinstance(think, bool) and think not in ("low", "medium", "high", "max"):
        raise BadRequest('invalid think value: %s (must be "true", "false", "low", "medium", "high" or "max")'
                         % json_dumps(think))
    if "thinking" in model.capabilities():
        return True if think is None else think
    if think not in (None, False):
        if relax:
            log.warning("%s does not support thinking: relaxing think to unset", log_value(body.get("model")))
            return None
        raise BadRequest('"%s" does not support thinking' % body.get("model"))
    return think


def _keep_alive(req, body):
    """The request's keep_alive in seconds (the server's default when absent); 400 when invalid."""
    return parse_keep_alive(body.get("keep_alive"), req.server.config.keep_alive)


def _schedule(req, model, body, keep_alive, embedding=False):
    """Validate the options, then lease a loaded runner (a Lease: use it in a `with` block)."""
    opts = _request_options(model, body)
    return req.server.scheduler.lease(model, opts, keep_alive, embedding=embedding,
                                      interactive=not embedding and body.get("stream", True) is not False)


class Turn:
    """One generate or chat request while it is answered: the `lease` on its runner, `base` (the
    fields every answer object starts with), when it `started` (monotonic seconds), the rendered
    prompt `text` and the `images` its [img-N] tags name, the `fmt` and `top_logprobs` asked for
    (None: off), and the `thinking` and `tool_parser` its output goes through (None when unused)."""

    def __init__(self, lease, base, started, fmt=None, top_logprobs=None, text="", images=(), thinking=None,
                 tool_parser=None):
        self.lease, self.base, self.started, self.fmt, self.top_logprobs = lease, base, started, fmt, top_logprobs
        self.text, self.images, self.thinking, self.tool_parser = text, images, thinking, tool_parser

    def answer(self, **fields):
        """An answer object: base, created_at, then `fields`."""
        return dict(self.base, created_at=rfc3339(), **fields)


def _completion(turn, tokens=None):
    """Stream (piece, final_event_or_None, logprobs) of the turn's prompt from its leased runner; the
    lease is the caller's. With `top_logprobs` (0-20) each piece's tokens come with Ollama's
    api.Logprob entries, from llama-server's n_probs. `tokens`, a list, gets the token ids the events
    carry (see _context)."""
    lease, images, top_logprobs = turn.lease, turn.images, turn.top_logprobs
    payload = dict(_sampling(lease.opts, turn.fmt),
                   prompt=lease.runner.media_prompt(turn.text, list(images)) if images else turn.text)
    if top_logprobs is not None:
        payload["n_probs"] = max(1, top_logprobs)
    events = lease.runner.completion(payload)
    try:
        try:
            first = next(events, None)
        except OllamaError as e:
            # llama-server cannot cut a slot's cached prompt between two adjacent images (no text between
            # them, as with LLaVA's projector): a prompt that shares only the first one fails (a 500,
            # "Chunk not found"), and so does every later one until a prompt evaluated afresh replaces the
            # cache. So a request with images that the engine fails before any output runs once more
            # without the cache; an error that is the request's own (a 400) is not retried.
            if not images or e.status != 500:
                raise
            events.close()
            events = lease.runner.completion(dict(payload, cache_prompt=False))
            first = next(events, None)
        for event in itertools.chain([] if first is None else [first], events):
            if tokens is not None:
                tokens.extend(event.get("tokens") or ())
            probs = (_logprobs(event.get("completion_probabilities"), top_logprobs)
                     if top_logprobs is not None else [])
            if event.get("stop"):
                yield event.get("content", ""), event, probs
                return
            yield event.get("content", ""), None, probs
    finally:
        events.close()


def _logprobs(entries, top):
    """Ollama's api.Logprob list ({token, logprob, bytes, top_logprobs}) from llama-server's entries for
    one event: /completion's completion_probabilities or /v1/chat/completions' logprobs.content."""
    out = []
    for p in entries or []:
        entry = {"token": p.get("token", ""), "logprob": p.get("logprob", 0.0), "bytes": p.get("bytes")}
        if top:
            entry["top_logprobs"] = [{"token": t.get("token", ""), "logprob": t.get("logprob", 0.0),
                                      "bytes": t.get("bytes")} for t in (p.get("top_logprobs") or [])[:top]]
        out.append(entry)
    return out


def _top_logprobs(body):
    """The request's logprobs/top_logprobs as _completion takes them; Ollama's 400 out of range."""
    top = body.get("top_logprobs") or 0
    if not isinstance(top, int) or isinstance(top, bool) or not 0 <= top <= 20:
        raise BadRequest("top_logprobs must be between 0 and 20")
    return top if body.get("logprobs") else None


_STRING, _BOOL, _OPTIONS = (str, "string"), (bool, "bool"), (dict, "map[string]interface {}")
#: The fields of Ollama's GenerateRequest and ChatRequest with the JSON type each must have.
GENERATE_FIELDS = {"model": _STRING, "prompt": _STRING, "suffix": _STRING, "system": _STRING,
                   "template": _STRING, "raw": _BOOL, "stream": _BOOL, "options": _OPTIONS,
                   "context": (list, "[]int", int, "int"),
                   "images": (list, "[]api.ImageData", str, "api.ImageData"),
                   "logprobs": _BOOL, "top_logprobs": (int, "int")}
CHAT_FIELDS = {"model": _STRING, "stream": _BOOL, "options": _OPTIONS, "messages": (list, "[]api.Message", dict,
               "api.Message"), "tools": (list, "api.Tools", dict, "api.Tool"),
               "logprobs": _BOOL, "top_logprobs": (int, "int")}
MESSAGE_FIELDS = {"role": _STRING, "content": _STRING, "thinking": _STRING, "tool_name": _STRING,
                  "images": (list, "[]api.ImageData", str, "api.ImageData"),
                  "tool_calls": (list, "[]api.ToolCall", dict, "api.ToolCall")}


@route("POST", "/api/generate")
def api_generate(req):
    """POST /api/generate: complete a prompt (streamed NDJSON unless "stream": false)."""
    body = req.json()
    check_fields(body, GENERATE_FIELDS, "api.GenerateRequest")
    started = time.monotonic()
    model = _find_model(req, body)
    keep_alive = _keep_alive(req, body)
    prompt = body.get("prompt") or ""
    base = {"model": body.get("model")}
    if not prompt and keep_alive == 0 and not body.get("images"):
        req.server.scheduler.expire(model.name)
        return dict(base, created_at=rfc3339(), response="", done=True, done_reason="unload")
    if body.get("raw") and (body.get("template") or body.get("system") or body.get("context")):
        raise BadRequest("raw mode does not support template, system, or context")
    _check_capability(body, model, "completion", "generate")
    if body.get("suffix"):                              # Ollama: a suffix needs the insert capability
        _check_capability(body, model, "insert", "insert")
    # raw: only when asked (Ollama primes its parser for a raw prompt that opens the thinking itself)
    think = _check_think(body, model) if not body.get("raw") or body.get("think") is not None else None
    top_logprobs = _top_logprobs(body)
    if body.get("images") and "vision" not in model.capabilities():
        raise BadRequest("this model is missing data required for image input")
    images = [image_data(i) for i in body.get("images") or []]
    fmt = body.get("format")
    _format_schema(fmt)
    with _schedule(req, model, body, keep_alive) as lease:
        if not prompt:
            return dict(base, created_at=rfc3339(), response="", done=True, done_reason="load")
        runner = lease.runner
        if body.get("raw"):                             # the caller's own [img-N] tags, else they lead
            text = "".join("[img-%d]" % i for i in range(len(images)) if "[img-%d]" % i not in prompt) + prompt
        else:
            messages = []
            system = body.get("system") or model.system
            if system:
                messages.append({"role": "system", "content": system})
            if not body.get("context"):
                messages.extend(model.messages)
            messages.append({"role": "user", "content": prompt, "images": images})   # checked, WebP converted
            messages, images = tag_images(messages)
            if body.get("suffix"):
                text = render_generate(body.get("template") or model.parsed_template(), prompt,
                                       suffix=body["suffix"], think=think)
            else:
                text = _render(model, runner, messages, template=body.get("template"), think=think)
        if body.get("context"):
            text = runner.detokenize(body["context"]) + text
        if body.get("_debug_render_only"):
            return dict(base, created_at=rfc3339(), _debug_info={"rendered_template": text,
                                                                 "image_count": len(images)})
        turn = Turn(lease, base, started, fmt, top_logprobs, text, images,
                    thinking=_thinking_parser(model, text) if think else None)
        chunks = _api_generate_chunks(turn, body)
        return _respond(body, lease.stream(chunks), "response")


def _api_generate_chunks(turn, body):
    """/api/generate's answer objects, streamed from the turn's runner (through the thinking parser
    when the model thinks: its thoughts go to `thinking`, as Ollama's GenerateHandler does)."""
    pieces, tokens, thinking, runner = [], [], turn.thinking, turn.lease.runner
    asked = None if body.get("raw") else runner.tokenize_soon(turn.text)
    try:
        for piece, final, probs in _completion(turn, tokens):
            pieces.append(piece)
            thought = ""
            if thinking:
                thought, piece = thinking.feed(piece)
                if final is not None:
                    more_thought, more = thinking.done()
                    thought, piece = thought + more_thought, piece + more
            extra = {"thinking": thought} if thought else {}
            if probs:
                extra["logprobs"] = probs
            if final is None:
                if piece or thought or probs or not thinking:
                    yield turn.answer(response=piece, **extra, done=False)
                continue
            done = turn.answer(response=piece, **extra, done=True, done_reason=stop_reason(final))
            if not body.get("raw"):
                done["context"] = _context(runner, turn.text, "".join(pieces), asked, tokens, final)
            done.update(_metrics(final, turn))
            yield done
    finally:
        if asked is not None:
            asked.close()


def _context(runner, prompt, answer, asked, tokens, final):
    """Ollama's `context`: the tokens of prompt+answer (a later request detokenizes them and puts
    the text first). The prompt's, asked for as the stream started (`asked`, a _Wire), then the
    answer's, from the stream's events: no round trip after the last token. Where those are not the
    answer's (a stop word cut it, or an event never came because its token ended inside a UTF-8
    character), prompt+answer is tokenized now, as Ollama does."""
    stop = final.get("stop_type")
    if asked is not None and stop in ("eos", "limit") and len(tokens) == final.get("tokens_predicted"):
        try:
            status, out = asked.json()
        except (OSError, EOFError, ValueError, IndexError):
            status, out = None, {}
        if status == 200 and isinstance(out.get("tokens"), list):
            return out["tokens"] + (tokens[:-1] if stop == "eos" else tokens)      # less the end-of-generation token
    return runner.tokenize(prompt + answer)


def _respond(body, chunks, field):
    """Stream the chunks, or with "stream": false collapse them into one object."""
    if body.get("stream", True) is not False:
        return Stream(chunks)
    parts, thoughts, calls, probs, last = [], [], [], [], None
    for last in chunks:
        part = last if field == "response" else last["message"]
        parts.append(part.get(field if field == "response" else "content", ""))
        thoughts.append(part.get("thinking", ""))
        calls.extend(part.get("tool_calls") or [])
        probs.extend(last.get("logprobs") or [])
    if last is None:
        raise OllamaError("no response from the model")
    if probs:
        last["logprobs"] = probs
    part = last if field == "response" else last["message"]
    part[field if field == "response" else "content"] = "".join(parts)
    if any(thoughts):
        part["thinking"] = "".join(thoughts)
    if calls:
        part["tool_calls"] = calls
    return last


def _check_messages(messages):
    if not isinstance(messages, list):
        raise BadRequest("messages must be an array")
    out = []
    for m in messages:
        if not isinstance(m, dict):
            raise BadRequest("invalid message: %s" % json_dumps(m))
        check_fields(m, MESSAGE_FIELDS, "api.ChatRequest.messages")
        m = dict(m)
        m["role"] = str(m.get("role", "")).lower()
        out.append(m)
    return out


@route("POST", "/api/chat")
def api_chat(req):
    """POST /api/chat: the next assistant message of a conversation (streamed unless "stream": false)."""
    body = req.json()
    check_fields(body, CHAT_FIELDS, "api.ChatRequest")
    started = time.monotonic()
    model = _find_model(req, body)
    keep_alive = _keep_alive(req, body)
    messages = _check_messages(body.get("messages") or [])
    base = {"model": body.get("model")}
    if not messages and keep_alive == 0:
        req.server.scheduler.expire(model.name)
        return dict(base, created_at=rfc3339(), message={"role": "assistant", "content": ""}, done=True,
                    done_reason="unload")
    _check_capability(body, model, "completion", "chat")
    think = _check_think(body, model, relax=getattr(req, "relax_thinking", False))   # /v1/messages: Claude Code
    top_logprobs = _top_logprobs(body)
    tools = body.get("tools") or None
    if tools and "tools" not in model.capabilities():
        raise BadRequest("%s does not support tools" % model.name)
    if any(m.get("images") for m in messages) and "vision" not in model.capabilities():
        raise BadRequest("this model is missing data required for image input")
    messages = [dict(m, images=[image_data(i) for i in m["images"]]) if m.get("images") else m
                for m in messages]                      # bad base64 or WebP is a 400 before any model loads
    fmt = body.get("format")
    _format_schema(fmt)
    with _schedule(req, model, body, keep_alive) as lease:
        if not messages:
            return dict(base, created_at=rfc3339(), message={"role": "assistant", "content": ""}, done=True,
                        done_reason="load")
        full = list(model.messages) + messages
        if full[0].get("role") != "system" and model.system:
            full.insert(0, {"role": "system", "content": model.system})
        count = getattr(req, "count_only", False)         # /v1/messages/count_tokens
        if model.jinja_template() and (tools or think is not None) and not any(m.get("images") for m in full):
            if count:
                text = lease.runner.apply_template(None, body=_jinja_chat(full, tools, think))
                return dict(base, prompt_eval_count=len(lease.runner.tokenize(text, add_special=True)))
            chunks = _jinja_chat_chunks(Turn(lease, base, started, fmt, top_logprobs), full, tools, think)
            return _respond(body, lease.stream(chunks), "message")
        full, images = tag_images(full)
        text = _fit_chat(model, lease.runner, full, tools, think, body.get("truncate") is True)
        if count:                      # llama-server tokenizes a prompt as this does (BOS and specials)
            return dict(base, prompt_eval_count=len(lease.runner.tokenize(text, add_special=True))
                        + IMAGE_TOKENS * len(images))
        if body.get("_debug_render_only"):
            return dict(base, created_at=rfc3339(), _debug_info={
                "rendered_template": text, "image_count": len(set(IMAGE_TAG_RE.findall(text)))})
        turn = Turn(lease, base, started, fmt, top_logprobs, text, images,
                    thinking=_thinking_parser(model, text) if think else None,
                    tool_parser=ToolCallParser(tools, infer_tool_tag(model.parsed_template())) if tools else None)
        chunks = _api_chat_chunks(turn)
        return _respond(body, lease.stream(chunks), "message")


def _openai_messages(messages):
    """Ollama messages as llama-server's /v1/chat/completions takes them (arguments as JSON text,
    thinking as reasoning_content), for the GGUF's Jinja template."""
    out = []
    for m in messages:
        msg = {"role": m.get("role"), "content": m.get("content") or ""}
        if m.get("thinking"):
            msg["reasoning_content"] = m["thinking"]
        if m.get("tool_calls"):
            msg["tool_calls"] = [{"type": "function", "id": c.get("id") or "call_%d" % i,
                                  "function": {"name": (c.get("function") or {}).get("name", ""),
                                               "arguments": json_dumps((c.get("function") or {}).get("arguments")
                                                                       or {})}}
                                 for i, c in enumerate(m["tool_calls"])]
        if m.get("tool_call_id"):
            msg["tool_call_id"] = m["tool_call_id"]
        out.append(msg)
    return out


def _jinja_chat_chunks(turn, messages, tools, think):
    """/api/chat's answer objects for a model with only its GGUF template: llama-server renders it with
    Jinja and parses tool calls and reasoning itself; content and thinking stream as they come, the
    tool calls (whole only once their arguments are) come with the final object."""
    lease, top_logprobs = turn.lease, turn.top_logprobs
    payload = dict(_sampling(lease.opts, turn.fmt), **_jinja_chat(messages, tools, think))
    if top_logprobs is not None:
        payload.update(logprobs=True, top_logprobs=max(1, top_logprobs))
    calls = {}
    events = lease.runner.completion(payload, path="/v1/chat/completions")
    try:
        for event in events:
            choice = (event.get("choices") or [{}])[0]
            delta = choice.get("delta") or {}
            for c in delta.get("tool_calls") or []:
                call = calls.setdefault(c.get("index", len(calls)), {"id": "", "name": "", "arguments": ""})
                fn = c.get("function") or {}
                call["id"] = c.get("id") or call["id"]
                call["name"] += fn.get("name") or ""
                call["arguments"] += fn.get("arguments") or ""
            msg = {"role": "assistant", "content": delta.get("content") or ""}
            if delta.get("reasoning_content"):
                msg["thinking"] = delta["reasoning_content"]
            extra = {}
            if top_logprobs is not None and (choice.get("logprobs") or {}).get("content"):
                extra["logprobs"] = _logprobs(choice["logprobs"]["content"], top_logprobs)
            finish = choice.get("finish_reason")
            if finish is None:
                if msg["content"] or msg.get("thinking") or extra:
                    yield turn.answer(message=msg, **extra, done=False)
                continue
            if calls:
                msg["tool_calls"] = [_jinja_tool_call(i, calls[k]) for i, k in enumerate(sorted(calls))]
            done = turn.answer(message=msg, **extra, done=True, done_reason="length" if finish == "length" else "stop")
            done.update(_metrics(event, turn))
            yield done
            return
    finally:
        events.close()


def _jinja_chat(messages, tools, think):
    """The chat part of a /v1/chat/completions payload for llama-server (what its template renders)."""
    payload = dict(messages=_openai_messages(messages),
                   reasoning_format="deepseek",            # "none" would leave a prefilled <think></think> in content
                   chat_template_kwargs=_jinja_think_kwargs(think))
    if tools:
        payload["tools"] = tools
    return payload


def _jinja_think_kwargs(think):
    """`think` as the variables chat templates read: Qwen3's and DeepSeek's enable_thinking, gpt-oss's
    reasoning_effort (a level)."""
    kwargs = {"enable_thinking": bool(think)}
    if isinstance(think, str):
        kwargs["reasoning_effort"] = think
    return kwargs


def _jinja_tool_call(index, call):
    """One of llama-server's parsed tool calls as Ollama's api.ToolCall (arguments an object)."""
    try:
        args = json.loads(call["arguments"] or "{}")
    except ValueError:
        args = {}
        log.warning("tool call %s: arguments are not JSON: %s", log_value(call["name"]), log_value(call["arguments"]))
    out = {"function": {"index": index, "name": call["name"], "arguments": args}}
    if call["id"]:
        out["id"] = call["id"]
    return out


def _thinking_parser(model, prompt):
    """A ThinkingParser for the model's tags (None when it has none); when the rendered prompt already
    ends with the opening tag (a template that starts the thinking itself), the parser is fed it, as
    Ollama does, so the output up to the closing tag is thinking."""
    jinja = model.jinja_template()
    if jinja:                                  # the tags llama.cpp's reasoning parser knows, if it uses them
        opening, closing = ("<think>", "</think>") if "<think>" in jinja else ("", "")
    else:
        opening, closing = infer_thinking_tags(model.parsed_template())
    if not (opening and closing):
        return None                            # as Ollama: no tags, no parser; the text stays the answer
    parser = ThinkingParser(opening, closing)
    if opening and prompt.rstrip().endswith(opening):
        parser.feed(opening)
    return parser


def _api_chat_chunks(turn):
    """/api/chat's answer objects, streamed from the turn's runner through its tool-call and
    thinking parsers."""
    thinking, tool_parser = turn.thinking, turn.tool_parser
    for piece, final, probs in _completion(turn):
        msg = {"role": "assistant", "content": piece}
        if thinking:
            msg["thinking"], msg["content"] = thinking.feed(msg["content"])
            if final is not None:
                more_thinking, more = thinking.done()
                msg["thinking"] += more_thinking
                msg["content"] += more
        if tool_parser:
            msg["content"], calls = tool_parser.feed(msg["content"])
            if final is not None:
                msg["content"] += tool_parser.done()
            if calls:
                msg["tool_calls"] = calls
        if not msg.get("thinking"):
            msg.pop("thinking", None)
        extra = {"logprobs": probs} if probs else {}    # sent even while a parser holds the text back
        if final is None:
            if msg["content"] or msg.get("thinking") or msg.get("tool_calls") or probs:
                yield turn.answer(message=msg, **extra, done=False)
            continue
        done = turn.answer(message=msg, **extra, done=True, done_reason=stop_reason(final))
        done.update(_metrics(final, turn))
        yield done


@route("GET", "/api/ps")
def api_ps(req):
    """GET /api/ps: the models loaded now."""
    out = []
    for e in req.server.scheduler.running():
        expires = e.expires
        if expires == FOREVER and e.keep_alive != FOREVER:      # busy: when its keep-alive would end, as Ollama
            expires = time.time() + max(0.0, e.keep_alive)
        if expires == FOREVER:                                  # kept forever: Go's far-off time, as Ollama
            expires = time.time() + 292 * 365 * 86400
        for m in e.models.values():                             # each name this runner has served (one weights)
            out.append({"name": m.short_name, "model": m.short_name, "size": m.size,
                        "digest": m.digest, "details": _model_details(m.config, m.parent_model),
                        "expires_at": rfc3339_local(expires), "size_vram": 0, "context_length": e.runner.num_ctx,
                        **({"rpc_servers": e.runner.rpc} if e.runner.rpc else {})})
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


@route("POST", "/api/embed")
def api_embed(req):
    """POST /api/embed: L2-normalised embeddings for a string or a list of strings."""
    body = req.json()
    started = time.monotonic()
    inputs = _embed_inputs(body.get("input"))
    model = _find_model(req, body)
    truncate = body.get("truncate", True) is not False
    dimensions = _expect(body, "dimensions", int, "int", "EmbedRequest") or 0
    _check_not_reranker(body, model)
    with _schedule(req, model, body, _keep_alive(req, body), embedding=True) as lease:
        if not inputs:
            return {"model": body.get("model"), "embeddings": []}
        batches = [_fit_context(lease.runner, text, truncate) for text in inputs]
        vectors = lease.runner.embeddings(batches)
    embeddings = []
    for vector in vectors:
        vector = _normalize(vector)
        if 0 < dimensions < len(vector):
            vector = _normalize(vector[:dimensions])
        embeddings.append(vector)
    return {"model": body.get("model"), "embeddings": embeddings,
            "total_duration": _ns(time.monotonic() - started), "load_duration": _ns(lease.load_s),
            "prompt_eval_count": sum(len(b) for b in batches)}


@route("POST", "/api/rerank")
def api_rerank(req):
    """POST /api/rerank (an ollama.py extension in Ollama's style): `query`, `documents` (strings)
    and `top_n` -> `results` [{index, relevance_score, document}] best first, with the durations.
    A model without the rerank capability is 400 `"NAME" does not support rerank`."""
    body = req.json()
    started = time.monotonic()
    query, documents, top_n = _rerank_fields(body, "RerankRequest")
    model = _find_model(req, body)
    _check_capability(body, model, "rerank", "rerank")
    with _schedule(req, model, body, _keep_alive(req, body), embedding=True) as lease:
        scores, count = lease.runner.rerank(query, documents) if documents else ([], 0)
    results = _ranked(documents, scores, top_n)
    return {"model": body.get("model"), "results": results, "total_duration": _ns(time.monotonic() - started),
            "load_duration": _ns(lease.load_s), "prompt_eval_count": count}


def _rerank_fields(body, struct_name):
    """(query, documents, top_n) of a rerank request, Go's unmarshal errors for wrong types; a
    document may be a string or {"text": ...} (Cohere's and Jina's clients send either)."""
    query = _expect(body, "query", str, "string", struct_name) or ""
    documents = body.get("documents") or []
    if not isinstance(documents, list):
        raise BadRequest("json: cannot unmarshal %s into Go struct field %s.documents of type []string"
                         % (_json_kind(documents), struct_name))
    docs = []
    for d in documents:
        text = d.get("text") if isinstance(d, dict) else d
        if not isinstance(text, str):
            raise BadRequest("documents must be strings")
        docs.append(text)
    top_n = _expect(body, "top_n", int, "int", struct_name)
    if not query and docs:
        raise BadRequest("query is required")
    return query, docs, len(docs) if top_n is None or top_n <= 0 else min(top_n, len(docs))


def _ranked(documents, scores, top_n):
    """The `top_n` best documents: [{index, relevance_score, document}], by score then index."""
    order = sorted(range(len(documents)), key=lambda i: (-scores[i], i))[:top_n]
    return [{"index": i, "relevance_score": scores[i], "document": documents[i]} for i in order]


def _check_not_reranker(body, model):
    """400 `"NAME" does not support embeddings` for a reranker: its llama-server (--rerank) scores
    pairs and has no /embedding. Any other model embeds, as in Ollama."""
    if "rerank" in model.capabilities():
        raise BadRequest('"%s" does not support embeddings' % body.get("model"))


@route("POST", "/api/embeddings")
def api_embeddings(req):
    """POST /api/embeddings (legacy): one raw, unnormalised embedding of `prompt`."""
    body = req.json()
    model = _find_model(req, body)
    prompt = _expect(body, "prompt", str, "string", "EmbeddingRequest") or ""
    _check_not_reranker(body, model)
    with _schedule(req, model, body, _keep_alive(req, body), embedding=True) as lease:
        if not prompt:
            return {"embedding": []}
        return {"embedding": lease.runner.embeddings([_fit_context(lease.runner, prompt)])[0]}


def _tokenizer_lease(req, model, body):
    """A lease on a runner for tokenizing: the one already loaded for `model` in whichever mode,
    else a new one in the model's own mode (embedding models embed, the rest complete)."""
    embedding = req.server.scheduler.loaded_embedding(model.name)
    if embedding is None:
        embedding = is_embedding_model(model)
    return _schedule(req, model, body, _keep_alive(req, body), embedding=embedding)


@route("POST", "/api/tokenize")
def api_tokenize(req):
    """POST /api/tokenize: the model's token ids for `text` (no BOS/EOS added)."""
    body = req.json()
    text = body.get("text", body.get("content", ""))
    if not isinstance(text, str):
        raise BadRequest("text must be a string")
    model = _find_model(req, body)
    with _tokenizer_lease(req, model, body) as lease:
        tokens = lease.runner.tokenize(text) if text else []
    return {"model": body.get("model"), "tokens": tokens}


@route("POST", "/api/detokenize")
def api_detokenize(req):
    """POST /api/detokenize: the text of a list of token ids."""
    body = req.json()
    tokens = body.get("tokens")
    if tokens is None:
        tokens = []
    if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
        raise BadRequest("tokens must be an array of integers")
    model = _find_model(req, body)
    with _tokenizer_lease(req, model, body) as lease:
        text = lease.runner.detokenize(tokens) if tokens else ""
    return {"model": body.get("model"), "text": text}

# -- registry ----------------------------------------------------------------

def _progress_stream(req, work, stream=True):
    """Run work(progress, cancel) for a pull/push request: a Stream of its progress objects, or
    with stream=False only the last one (errors then keep their status, as waitForStream does)."""
    if not stream:
        last = []
        work(last.append, None)
        return last[-1] if last else None
    return Stream(_progress_items(work))


def _progress_items(work):
    """Yield the progress objects work(progress, cancel) reports from its own thread; its error is
    raised here. Closing the generator (the client went away) sets `cancel`."""
    import queue as queue_mod
    items, cancel, end = queue_mod.Queue(), threading.Event(), object()

    def run():
        try:
            work(items.put, cancel)
        except BaseException as e:          # handed to the streaming thread
            items.put(e)
        finally:
            items.put(end)

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
        cancel.set()                        # client gone: stop the transfer (downloads keep their parts)


def _transfer_request(req):
    body = req.json()
    name = Name.parse_bare(_model_field(body) or "")
    if name is None or not name.is_valid():
        raise BadRequest("invalid model name")
    return name, bool(body.get("insecure")), body.get("stream", True) is not False


def _registry_parts(req):
    """What pull_model and push_model need of the server: (store, transfers, config)."""
    return req.server.store, req.server.transfers, req.server.config


@route("POST", "/api/pull")
def api_pull(req):
    """POST /api/pull {model, insecure, stream}: pull a model from its registry."""
    name, insecure, stream = _transfer_request(req)
    return _progress_stream(req, lambda progress, cancel: pull_model(
        *_registry_parts(req), name, insecure, progress, cancel), stream)


@route("POST", "/api/push")
def api_push(req):
    """POST /api/push {model, insecure, stream}: push a model to its registry."""
    name, insecure, stream = _transfer_request(req)
    return _progress_stream(req, lambda progress, cancel: push_model(
        *_registry_parts(req), name, insecure, progress, cancel), stream)


@route("GET", "/api/export")
def api_export(req):
    """GET /api/export?model=NAME[&model=NAME...] (an ollama.py extension): the models as one OCI
    image layout tar, with its Content-Length; a failure part-way drops the connection short of it."""
    names = urllib.parse.parse_qs(urllib.parse.urlsplit(req.handler.path).query).get("model") or []
    if not names:
        raise BadRequest("model is required")
    members, total = archive_plan(req.server.store, names)
    return Stream(archive_chunks(members), "application/x-tar", encode=bytes, length=total)


@route("POST", "/api/import")
def api_import(req):
    """POST /api/import[?name=NAME] (an ollama.py extension), the body an OCI image layout tar (as
    export writes, or skopeo's oci-archive): its models enter the store once every blob is read and
    verified. Answers NDJSON: {"status": "imported NAME"} per model, then {"status": "success"}."""
    name = req.query.get("name") or None
    names = import_archive(req.server.store, req.body_stream(), name)
    return Stream([{"status": "imported %s" % n.display()} for n in names] + [{"status": "success"}])

# == HTTP API: a read-only OCI registry (/v2) =================================
#
# serve answers the OCI distribution API for its own store, read-only, so that another ollama.py
# (or skopeo, crane, docker-registry's clients) can pull from it on a LAN. The name mapping:
#
#     /v2/<namespace>/<model>/...          manifests/registry.ollama.ai/<namespace>/<model>/<tag>
#     /v2/<model>/...                      manifests/registry.ollama.ai/library/<model>/<tag>
#     /v2/<host>/<namespace>/<model>/...   manifests/<host>/<namespace>/<model>/<tag>
#
# so a model pulled from registry.ollama.ai (or created locally) is `library/<model>`, and a model
# pulled from elsewhere keeps its host as the first component. Only committed blobs a manifest of
# that repository names are served, each hashed once before its first byte goes out; OLLAMA_NO_REGISTRY=1
# turns it all off (404).

REGISTRY_API_VERSION = "registry/2.0"          # Docker-Distribution-API-Version
_OCI_PATH_RE = re.compile(r"^(?P<repo>.+)/(?P<kind>manifests|blobs|tags)/(?P<ref>[^/]+)$")
_OCI_STATUS_CODES = {400: "NAME_INVALID", 401: "UNAUTHORIZED", 403: "DENIED", 404: "NAME_UNKNOWN",
                     405: "UNSUPPORTED", 429: "TOOMANYREQUESTS"}


def _oci(handler):
    """Wrap a /v2 handler: every answer carries Docker-Distribution-API-Version, and an OllamaError
    becomes the spec's {"errors": [{"code", "message", "detail"}]} with its status."""
    def wrapped(req):
        try:
            result = handler(req)
        except OllamaError as e:
            code = e.code if isinstance(e, RegistryError) else _OCI_STATUS_CODES.get(e.status, "UNKNOWN")
            result = Response.json(e.status, {"errors": [{"code": code, "message": str(e), "detail": None}]})
        result.headers["Docker-Distribution-API-Version"] = REGISTRY_API_VERSION
        return result
    wrapped.__name__, wrapped.__doc__ = handler.__name__, handler.__doc__
    wrapped.unauthorized = {"errors": [{"code": "UNAUTHORIZED", "message": "authentication required", "detail": None}]}
    return wrapped


def oci_repository_name(repo, tag=DEFAULT_TAG):
    """The store Name for an OCI repository path (see the mapping above); NAME_INVALID otherwise."""
    parts = repo.split("/")
    if len(parts) == 1:
        parts = [DEFAULT_NAMESPACE] + parts
    if len(parts) == 2:
        parts = [DEFAULT_REGISTRY] + parts
    name = Name(*parts, tag) if len(parts) == 3 else None
    if name is None or not name.is_valid():
        raise RegistryError("NAME_INVALID", "invalid repository name %s" % json.dumps(repo[:200]), 400)
    return name


def oci_repository(name):
    """The OCI repository path a stored Name is served under (the inverse of oci_repository_name)."""
    if name.host.lower() == DEFAULT_REGISTRY:
        return name.repository()
    return "%s/%s" % (name.host, name.repository())


def _oci_manifests(store, repo):
    """[(Name, raw bytes, manifest dict)] of every tag stored under `repo`; NAME_UNKNOWN if none."""
    want = oci_repository_name(repo).key()[:3]
    found = [(n, raw, data) for n, raw, data, _mtime in store.list() if n.key()[:3] == want]
    if not found:
        raise RegistryError("NAME_UNKNOWN", "repository name not known to registry", 404)
    return found


def _paginate(req, items, path, field, extra=None):
    """The spec's pagination (?n=&last=) of sorted `items` as {field: page}, with a Link to the next."""
    items = sorted(set(items))
    last, n = req.query.get("last"), req.query.get("n")
    if last:
        items = [i for i in items if i > last]
    headers = {}
    if n is not None:
        # ASCII digits that fit an int64, as Go's strconv.Atoi takes them (int() would take "²"-free
        # Unicode digits too, and fail with a ValueError past 4,300 digits)
        digits = n.lstrip("0") or "0"
        if not (n.isascii() and n.isdigit()) or len(digits) > 19 or int(digits) >= 1 << 63:
            raise RegistryError("PAGINATION_NUMBER_INVALID", "invalid number of results requested", 400)
        n = int(digits)
        if len(items) > n:
            items = items[:n]
            if items:
                query = urllib.parse.urlencode({"n": n, "last": items[-1]})
                headers["Link"] = '<%s?%s>; rel="next"' % (path, query)
    body = dict(extra or {}, **{field: items})
    return Response(200, json_dumps(body).encode(), "application/json; charset=utf-8", headers)


def parse_range(header, size):
    """(start, stop) of a single "bytes=a-b", "bytes=a-" or "bytes=-n" Range over `size` bytes; None
    to send the whole body (no header, several ranges, or one RFC 9110 says to ignore).
    RegistryError 416 when it cannot be satisfied."""
    m = re.match(r"^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$", header or "", re.ASCII)
    if not m or not (m.group(1) or m.group(2)):
        return None
    # a number of over 19 digits is past any file's end (and int() of 4,300 digits is a ValueError)
    first, last = [None if not x else int(x.lstrip("0") or "0") if len(x.lstrip("0")) <= 19 else 1 << 64
                   for x in m.groups()]
    if first is None:                               # the last n bytes
        start, stop = max(0, size - last), size
        if last == 0:
            start = size
    else:
        start = first
        stop = size if last is None else min(size, last + 1)
        if last is not None and last < start:
            return None                             # syntactically invalid: ignored
    if start >= size or stop <= start:
        raise RegistryError("RANGE_INVALID", "requested range not satisfiable", 416)
    return start, stop


def _verified_blob(server, digest, f):
    """True when the open blob file's bytes hash to `digest`: hashed once per file identity
    (inode, size, mtime, ctime), so a blob changed behind the store's back is hashed again."""
    import hashlib
    st = os.fstat(f.fileno())
    key = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    with server.verify_lock:
        if server.served_blobs.get(digest) == key:
            return True
        lock = server.verify_locks.setdefault(digest, threading.Lock())
    with lock:                            # per digest: a big blob's first hash holds up no other blob
        with server.verify_lock:
            if server.served_blobs.get(digest) == key:
                return True               # hashed by the request we waited for
        h = hashlib.sha256()
        for chunk in iter(lambda: os.read(f.fileno(), COPY_CHUNK), b""):
            h.update(chunk)
        if "sha256:" + h.hexdigest() != digest:
            log.error("blob %s does not match its digest; not serving it", digest)
            return False
        with server.verify_lock:
            server.served_blobs[digest] = key
        return True


@route("GET", "/v2/")
@route("GET", "/v2")
@_oci
def v2_base(req):
    """GET /v2/: the API version check; {} with Docker-Distribution-API-Version."""
    return Response.json(200, {})


@route("GET", "/v2/_catalog")
@_oci
def v2_catalog(req):
    """GET /v2/_catalog?n=&last=: every repository in the store, paginated."""
    repos = [oci_repository(n) for n, _raw, _data, _mtime in req.server.store.list()]
    return _paginate(req, repos, "/v2/_catalog", "repositories")


@route("GET", "/v2/*path")
@_oci
def v2_get(req):
    """GET|HEAD /v2/<name>/manifests/<ref>, /v2/<name>/blobs/<digest>, /v2/<name>/tags/list."""
    m = _OCI_PATH_RE.match(req.params["path"])
    if not m:
        raise NotFound("404 page not found")
    repo, kind, ref = m.group("repo", "kind", "ref")
    if kind == "tags":
        if ref != "list":
            raise NotFound("404 page not found")
        tags = [n.tag for n, _raw, _data in _oci_manifests(req.server.store, repo)]
        return _paginate(req, tags, "/v2/%s/tags/list" % repo, "tags", {"name": repo})
    if kind == "manifests":
        return _oci_manifest(req, repo, ref)
    return _oci_blob(req, repo, ref)


def _oci_manifest(req, repo, ref):
    """A stored manifest by tag or digest: its exact bytes, media type and digest."""
    import hashlib
    stored = _oci_manifests(req.server.store, repo)
    if ":" in ref:
        if not is_strict_digest(ref):
            raise RegistryError("DIGEST_INVALID", "invalid digest %s" % json.dumps(ref[:100]), 400)
        hits = [raw for _n, raw, _d in stored if "sha256:" + hashlib.sha256(raw).hexdigest() == ref]
    else:
        hits = [raw for n, raw, _d in stored if n.tag.lower() == ref.lower()]
    if not hits:
        raise RegistryError("MANIFEST_UNKNOWN", "manifest unknown", 404)
    raw = hits[0]
    try:
        media = parse_manifest(raw).get("mediaType") or MEDIA_MANIFEST
    except OllamaError:
        raise RegistryError("MANIFEST_UNKNOWN", "manifest unknown (the stored one is invalid)", 404) from None
    digest = "sha256:" + hashlib.sha256(raw).hexdigest()
    return Response(200, raw, media, {"Docker-Content-Digest": digest})


def _oci_blob(req, repo, digest):
    """A blob that a manifest of `repo` names, whole or one Range (206, 416), hashed before its
    first serve; a blob missing, of the wrong size or not matching its digest is BLOB_UNKNOWN."""
    if not is_strict_digest(digest):
        raise RegistryError("DIGEST_INVALID", "invalid digest %s" % json.dumps(digest[:100]), 400)
    unknown = RegistryError("BLOB_UNKNOWN", "blob unknown to registry", 404)
    sizes = {d["digest"]: d["size"] for _n, _raw, data in _oci_manifests(req.server.store, repo)
             for d in manifest_layers(data) if isinstance(d.get("size"), int)}
    if digest not in sizes:
        raise unknown
    try:   # O_NOFOLLOW: a link planted in blobs/ is never followed out of models/
        f = os.fdopen(os.open(str(req.server.store.blob_path(digest)), os.O_RDONLY | os.O_NOFOLLOW), "rb")
    except OSError:
        raise unknown from None
    try:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_size != sizes[digest] or \
                not _verified_blob(req.server, digest, f):
            raise unknown
        size = st.st_size
        headers = {"Docker-Content-Digest": digest, "Accept-Ranges": "bytes", "ETag": '"%s"' % digest}
        try:
            span = parse_range(req.headers.get("Range"), size)
        except RegistryError:
            f.close()
            return Response(416, b"", None, dict(headers, **{"Content-Range": "bytes */%d" % size}))
        if span is None:
            return FileResponse(f, 0, size, headers=headers)
        start, stop = span
        headers["Content-Range"] = "bytes %d-%d/%d" % (start, stop - 1, size)
        return FileResponse(f, start, stop - start, status=206, headers=headers)
    except BaseException:
        f.close()
        raise


@route("POST", "/v2/*path")
@route("PUT", "/v2/*path")
@route("PATCH", "/v2/*path")
@route("DELETE", "/v2/*path")
@_oci
def v2_write(req):
    """Writes to /v2 (uploads, manifest puts, deletes): UNSUPPORTED, this registry is read-only."""
    raise RegistryError("UNSUPPORTED", "this registry is read-only: push to it with ollama.py create/pull", 405)


# == HTTP API: OpenAI compatibility (/v1) =====================================

#: OpenAI's error "type" for an HTTP status (openai.NewError).
OPENAI_ERROR_TYPES = {400: "invalid_request_error", 404: "not_found_error"}
#: data: URL prefixes an image part may use; the bare one matches /api/chat's unadorned base64.
IMAGE_URL_PREFIXES = ["data:;base64,"] + ["data:image/%s;base64," % t for t in ("jpeg", "jpg", "png", "webp")]


def _openai_error(status, message):
    """An OpenAI-shaped error answer: {"error": {"message", "type", "param": null, "code": null}}."""
    body = {"error": {"message": message, "type": OPENAI_ERROR_TYPES.get(status, "api_error"),
                      "param": None, "code": None}}
    return Response.json(status, body)


def _errors_as(shape, unauthorized):
    """A decorator for the handlers of another API: every OllamaError a handler raises is answered
    by `shape(status, message)`, that API's own error answer, and a request without a valid key by
    the `unauthorized` body (see _unauthorized)."""
    def decorate(handler):
        def wrapped(req):
            try:
                return handler(req)
            except OllamaError as e:
                return shape(e.status, str(e))
        wrapped.__name__, wrapped.__doc__ = handler.__name__, handler.__doc__
        wrapped.unauthorized = unauthorized
        return wrapped
    return decorate


_openai = _errors_as(_openai_error, {"error": {          # the /v1 handlers (OpenAI's shape)
    "message": "Incorrect API key provided", "type": "invalid_request_error", "param": None,
    "code": "invalid_api_key"}})


def _forward(req, body, **context):
    """The same request with `body` as its JSON: how a /v1 call reaches the /api handler it wraps.
    `context` become attributes of the copy (Ollama's gin context values, e.g. relax_thinking):
    what a wrapper may tell the handler that a client cannot put in the body."""
    sub = Request.__new__(Request)
    sub.__dict__.update(req.__dict__)
    sub.__dict__.update(context)
    sub._body = json_dumps(body).encode()
    return sub


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


def _relay(first, rest):
    """Yield `first`, then `rest`; closing this closes `rest` (so the runner's request is cancelled)."""
    try:
        if first is not None:
            yield first
            yield from rest
    finally:
        close = getattr(rest, "close", None)
        if close:
            close()


def _stop_option(stop, strict):
    if isinstance(stop, str):
        return [stop]
    if isinstance(stop, list):
        bad = [s for s in stop if not isinstance(s, str)]
        if bad and strict:
            raise BadRequest("invalid type for 'stop' field: %s" % _json_type(bad[0]))
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
            raise BadRequest("invalid message content type: %s" % _json_type(content))
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


#: A reasoning effort -> /api/chat `think` (openai.thinkFromReasoningEffort).
REASONING_EFFORTS = {"none": False, "minimal": "low", "low": "low", "medium": "medium", "high": "high",
                     "max": "max", "xhigh": "max", "ultra": "max"}


def _reasoning_think(body):
    """`think` from "reasoning": {"effort"} (or chat's "reasoning_effort"); None when unset."""
    effort = (body.get("reasoning") or {}).get("effort") if isinstance(body.get("reasoning"), dict) else None
    effort = effort or body.get("reasoning_effort")
    if not effort:
        return None
    if not isinstance(effort, str) or effort not in REASONING_EFFORTS:
        raise BadRequest('invalid reasoning value: %s (must be "minimal", "low", "medium", "high", "xhigh", '
                         '"ultra", "max", or "none")' % json_dumps(effort))
    return REASONING_EFFORTS[effort]


def _openai_tool_calls(calls):
    """Ollama tool calls -> OpenAI's, `arguments` as a JSON string (openai.ToToolCalls)."""
    import secrets
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
    with contextlib.closing(_relay(first, items)) as stream:
        for item in stream:
            msg = item.get("message") or {}
            delta = {}
            if msg.get("content"):
                delta["content"] = msg["content"]
            if msg.get("thinking"):
                delta["reasoning"] = msg["thinking"]
            if msg.get("tool_calls"):
                delta["tool_calls"] = _openai_tool_calls(msg["tool_calls"])
                tool_sent = True
            if delta or item.get("logprobs") or not (role_sent or item.get("done")):
                if not role_sent:
                    delta = dict({"role": "assistant", "content": ""}, **delta)
                    role_sent = True
                choice = {"index": 0, "delta": delta, "finish_reason": None}
                if item.get("logprobs"):
                    choice["logprobs"] = {"content": item["logprobs"]}
                yield dict(base, choices=[choice])
            if item.get("done"):
                reason = "tool_calls" if tool_sent else item.get("done_reason") or "stop"
                yield dict(base, choices=[{"index": 0, "delta": {}, "finish_reason": reason}])
                if include_usage:
                    yield dict(base, choices=[], usage=_usage(item))
                yield "[DONE]"
                return


@route("POST", "/v1/chat/completions")
@_openai
def v1_chat_completions(req):
    """POST /v1/chat/completions: OpenAI chat on top of /api/chat."""
    import secrets
    body = req.json()
    _expect(body, "model", str, "string")
    check_fields(body, {"messages": (list, "[]openai.Message", dict, "openai.Message")}, "ChatCompletionRequest")
    messages = body.get("messages")
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
    if body.get("logprobs"):                      # OpenAI's logprobs: true, top_logprobs: N (0-20)
        chat["logprobs"], chat["top_logprobs"] = True, body.get("top_logprobs") or 0
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
    choice = {"index": 0, "message": message, "finish_reason": reason}
    if first.get("logprobs"):
        choice["logprobs"] = {"content": first["logprobs"]}
    out = {"id": cid, "object": "chat.completion", "created": created, "model": body.get("model"),
           "system_fingerprint": "fp_ollama", "choices": [choice], "usage": _usage(first)}
    if "_debug_info" in first:
        out["_debug_info"] = first["_debug_info"]
    return out


def _completion_chunks(first, items, cid, created, model, include_usage):
    """/api/generate stream items -> text_completion events, then usage (if asked) and [DONE]."""
    base = {"id": cid, "object": "text_completion", "created": created, "model": model,
            "system_fingerprint": "fp_ollama"}
    with contextlib.closing(_relay(first, items)) as stream:
        for item in stream:
            choice = {"text": item.get("response", ""), "index": 0,
                      "finish_reason": item.get("done_reason") or None}
            if item.get("logprobs"):
                choice["logprobs"] = {"content": item["logprobs"]}
            chunk = dict(base, choices=[choice])
            if include_usage:
                chunk["usage"] = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
            yield chunk
            if item.get("done"):
                if include_usage:
                    yield dict(base, choices=[], usage=_usage(item))
                yield "[DONE]"
                return


@route("POST", "/v1/completions")
@_openai
def v1_completions(req):
    """POST /v1/completions: OpenAI text completion of a prompt (and suffix) on top of /api/generate."""
    import secrets
    body = req.json()
    struct_name = "CompletionRequest"
    _expect(body, "model", str, "string", struct_name)
    prompt = _expect(body, "prompt", str, "string", struct_name) or ""
    suffix = _expect(body, "suffix", str, "string", struct_name) or ""
    generate = {"model": body.get("model"), "prompt": prompt, "options": _openai_options(body, completions=True),
                "stream": bool(body.get("stream"))}
    if suffix:
        generate["suffix"] = suffix
    logprobs = _expect(body, "logprobs", int, "int", struct_name)
    if logprobs:                                  # the legacy API: logprobs is how many alternatives
        generate["logprobs"], generate["top_logprobs"] = True, logprobs
    if body.get("_debug_render_only"):
        generate["_debug_render_only"] = True
    cid, created = "cmpl-%d" % secrets.randbelow(999), int(time.time())
    first, items = _prime(api_generate(_forward(req, generate)))
    if generate["stream"]:
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        return _sse_stream(_completion_chunks(first, items, cid, created, body.get("model"), include_usage))
    return {"id": cid, "object": "text_completion", "created": created, "model": body.get("model"),
            "system_fingerprint": "fp_ollama",
            "choices": [dict({"text": first.get("response", ""), "index": 0,
                              "finish_reason": first.get("done_reason") or None},
                             **({"logprobs": {"content": first["logprobs"]}} if first.get("logprobs") else {}))],
            "usage": _usage(first)}


# -- /v1/responses (OpenAI Responses) ---------------------------------------------------------------


def _sse_event(obj):
    """One named server-sent event, `event: <its "type">` then `data: <json>`: how the Responses
    and Anthropic streams are framed (the SDKs dispatch on the event name)."""
    return b"event: %s\ndata: %s\n\n" % (obj["type"].encode(), json_dumps(obj).encode())


def _responses_content(parts, where):
    """Responses content (a string, or input_text/output_text/input_image parts) -> (text, images)."""
    if isinstance(parts, str):
        return parts, []
    if not isinstance(parts, list):
        raise BadRequest("%s: content must be a string or array" % where)
    text, images = [], []
    for i, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text"):
            text.append(part.get("text") or "")
        elif kind == "input_image":
            if part.get("image_url"):                  # a file_id names stored state: skipped, as in Ollama
                images.append(_image_part(part))
        elif kind == "input_file":
            raise BadRequest("file inputs are not currently supported")
        else:
            raise BadRequest("%s: content[%d]: unknown content type: %s" % (where, i, kind or ""))
    return "".join(text), images


def _responses_call(item, messages, thinking):
    """A function_call item -> a tool call on the assistant message it belongs to (the last one,
    or a new one), as openai.FromResponsesRequest merges them."""
    try:
        arguments = json.loads(item.get("arguments") or "{}")
    except (TypeError, ValueError) as e:
        raise BadRequest("failed to parse function call arguments: %s" % e) from None
    call = {"id": item.get("call_id") or "", "function": {"name": item.get("name") or "", "arguments": arguments}}
    if messages and messages[-1]["role"] == "assistant":
        messages[-1].setdefault("tool_calls", []).append(call)
        if thinking:
            messages[-1]["thinking"] = thinking
    else:
        messages.append(dict({"role": "assistant", "content": "", "tool_calls": [call]},
                             **({"thinking": thinking} if thinking else {})))


def _tool_name_for(messages, call_id):
    """The function an earlier tool call with this id named ("" when none): a template's .ToolName."""
    for m in reversed(messages):
        for call in m.get("tool_calls") or []:
            if call_id and call.get("id") == call_id:
                return call["function"]["name"]
    return ""


def _tool_message(content, images, call_id, earlier):
    """An /api/chat tool message answering call `call_id` (Responses' function_call_output, Anthropic's
    tool_result), named after the earlier call it answers."""
    msg = {"role": "tool", "content": content, "tool_call_id": call_id or ""}
    name = _tool_name_for(earlier, call_id)
    if name:
        msg["tool_name"] = name
    if images:
        msg["images"] = images
    return msg


def _from_responses_input(value):
    """Responses `input` (a string, or message / function_call / function_call_output / reasoning
    items) -> /api/chat messages. A reasoning item's text becomes the next assistant turn's thinking."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}] if value else []
    if value is None:
        return []
    if not isinstance(value, list):
        raise BadRequest("input must be a string or array")
    messages, thinking = [], ""
    for i, item in enumerate(value):
        where = "input[%d]" % i
        if not isinstance(item, dict):
            raise BadRequest("%s: input item must be an object" % where)
        kind = item.get("type") or ("message" if item.get("role") else "")
        if kind == "message":
            text, images = _responses_content(item.get("content") or "", where)
            msg = {"role": str(item.get("role") or "").lower(), "content": text}
            if images:
                msg["images"] = images
            if msg["role"] == "assistant" and thinking:
                msg["thinking"], thinking = thinking, ""
            messages.append(msg)
        elif kind == "function_call":
            _responses_call(item, messages, thinking)
            thinking = ""
        elif kind == "function_call_output":
            output = item.get("output")
            text, images = _responses_content(output if output is not None else "", where)
            messages.append(_tool_message(text, images, item.get("call_id"), messages))
        elif kind == "reasoning":
            thinking = item.get("encrypted_content") or "".join(
                (s or {}).get("text", "") for s in item.get("summary") or [] if isinstance(s, dict))
        elif not kind:
            raise BadRequest("%s: input item missing required 'type' field" % where)
        else:
            raise BadRequest("%s: unknown input item type: %s" % (where, json_dumps(kind)))
    if thinking:
        messages.append({"role": "assistant", "content": "", "thinking": thinking})
    return messages


def _from_responses_tools(tools, prefix=""):
    """Responses tools (flat {"type": "function", "name", "parameters"}; a "namespace" groups
    members, which get "namespace." names) -> /api/chat tools. The built-in web_search needs
    ollama.com, so it is left out."""
    out = []
    for tool in tools or []:
        if not isinstance(tool, dict):
            raise BadRequest("invalid tool: %s" % json_dumps(tool))
        name = tool.get("name") or ""
        if tool.get("type") == "web_search":
            log.warning("/v1/responses: the built-in web_search tool is not supported; left out")
        elif tool.get("type") == "namespace":
            out += _from_responses_tools(tool.get("tools"), prefix + name + "." if name else prefix)
        else:
            parameters = tool.get("parameters")
            if parameters is not None and not isinstance(parameters, dict):
                raise BadRequest("failed to unmarshal tool parameters: %s" % json_dumps(parameters))
            out.append({"type": "function", "function": {
                "name": name if name.startswith(prefix) else prefix + name,
                "description": tool.get("description") or "", "parameters": parameters or {"type": "object"}}})
    return out


def _responses_format(text):
    """text.format -> /api/chat `format`: json_schema is its schema, json_object any JSON; text is None."""
    fmt = text.get("format") if isinstance(text, dict) else None
    if not isinstance(fmt, dict):
        return None
    if fmt.get("type") == "json_schema" and fmt.get("schema") is not None:
        return fmt["schema"]
    return "json" if fmt.get("type") == "json_object" else None


#: ResponsesRequest fields with the JSON type each must have (Go's unmarshal errors).
RESPONSES_FIELDS = {"model": _STRING, "instructions": _STRING, "stream": _BOOL, "max_output_tokens": (int, "int"),
                    "temperature": ((int, float), "float64"), "top_p": ((int, float), "float64"),
                    "tools": (list, "[]openai.ResponsesTool", dict, "openai.ResponsesTool"),
                    "reasoning": (dict, "openai.ResponsesReasoning"), "text": (dict, "openai.ResponsesText")}


def _responses_chat(body):
    """A Responses request -> the /api/chat body it is answered with."""
    check_fields(body, RESPONSES_FIELDS, "ResponsesRequest")
    for field in ("previous_response_id", "conversation"):
        if body.get(field):                    # Ollama ignores them too: it keeps no responses
            log.warning("/v1/responses: %s is not supported (no stored state); answering from input alone", field)
    messages = []
    if body.get("instructions"):
        messages.append({"role": "system", "content": body["instructions"]})
    messages += _from_responses_input(body.get("input"))
    options = {"temperature": 1.0 if body.get("temperature") is None else body["temperature"]}
    if body.get("top_p") is not None:
        options["top_p"] = body["top_p"]
    if body.get("max_output_tokens") is not None:
        options["num_predict"] = body["max_output_tokens"]
    chat = {"model": body.get("model"), "messages": messages, "options": options,
            "stream": body.get("stream") is True}
    tools = _from_responses_tools(body.get("tools"))
    if tools and body.get("tool_choice") != "none":
        chat["tools"] = tools
    fmt = _responses_format(body.get("text"))
    if fmt is not None:
        chat["format"] = fmt
    think = _reasoning_think(body)
    if think is not None:
        chat["think"] = think
    return chat


class ResponsesAnswer:
    """One /v1/responses answer being built from /api/chat items: the response object (what
    Ollama echoes of the request: tools, text format, sampling, reasoning), its output items, and
    for a stream the events in order, each with its sequence_number."""

    def __init__(self, body):
        import secrets
        self.body, self.id = body, "resp_" + secrets.token_hex(8)
        self.msg_id, self.seq, self.output = "msg_" + secrets.token_hex(8), 0, []
        self.text, self.thinking, self.reasoning_id, self.calls = None, None, None, 0

    def response(self, status, usage=None):
        """The response object with `status` ("in_progress", "completed"): the output so
        far, what OpenAI's Responses API echoes of the request, and `usage` once done."""
        b = self.body
        reasoning = b.get("reasoning") if isinstance(b.get("reasoning"), dict) else {}
        fmt = (b.get("text") or {}).get("format") if isinstance(b.get("text"), dict) else None
        now = int(time.time())
        return {"id": self.id, "object": "response", "created_at": now,
                "completed_at": now if status == "completed" else None, "status": status,
                "incomplete_details": None, "model": b.get("model"), "previous_response_id": None,
                "instructions": b.get("instructions") or None, "output": list(self.output), "error": None,
                "tools": b.get("tools") or [], "tool_choice": b.get("tool_choice") or "auto",
                "truncation": b.get("truncation") or "disabled", "parallel_tool_calls": True,
                "text": {"format": fmt or {"type": "text"}},
                "top_p": 1.0 if b.get("top_p") is None else b["top_p"], "presence_penalty": 0,
                "frequency_penalty": 0, "top_logprobs": 0,
                "temperature": 1.0 if b.get("temperature") is None else b["temperature"],
                "reasoning": {"effort": reasoning.get("effort"), "summary": reasoning.get("summary")}
                if reasoning.get("effort") or reasoning.get("summary") else None,
                "usage": usage, "max_output_tokens": b.get("max_output_tokens"), "max_tool_calls": None,
                "store": False, "background": False, "service_tier": "default", "metadata": {},
                "safety_identifier": None, "prompt_cache_key": None}

    def event(self, kind, **fields):
        fields = dict(type=kind, sequence_number=self.seq, **fields)
        self.seq += 1
        return fields

    def feed(self, item):
        """The events for one /api/chat item (a stream's first item also opens the response)."""
        msg = item.get("message") or {}
        if self.seq == 0:
            yield self.event("response.created", response=self.response("in_progress"))
            yield self.event("response.in_progress", response=self.response("in_progress"))
        if msg.get("thinking"):
            yield from self._thinking(msg["thinking"])
        if msg.get("tool_calls"):
            yield from self._calls(msg["tool_calls"])
        elif msg.get("content") and not self.calls:
            yield from self._text(msg["content"])
        if item.get("done"):
            yield from self._finish_thinking()
            yield from self._finish_text()
            yield self.event("response.completed", response=self.response("completed", _responses_usage(item)))

    def _thinking(self, piece):
        import secrets
        if self.reasoning_id is None:
            self.reasoning_id, self.thinking = "rs_" + secrets.token_hex(8), ""
            yield self.event("response.output_item.added", output_index=len(self.output),
                             item={"id": self.reasoning_id, "type": "reasoning", "summary": []})
        self.thinking += piece
        yield self.event("response.reasoning_summary_text.delta", item_id=self.reasoning_id,
                         output_index=len(self.output), summary_index=0, delta=piece)

    def _finish_thinking(self):
        if self.reasoning_id is None:
            return
        item = _reasoning_item(self.reasoning_id, self.thinking)
        yield self.event("response.reasoning_summary_text.done", item_id=self.reasoning_id,
                         output_index=len(self.output), summary_index=0, text=self.thinking)
        yield self.event("response.output_item.done", output_index=len(self.output), item=item)
        self.output.append(item)
        self.reasoning_id = None

    def _calls(self, calls):
        """The events for tool calls: open thinking and text items are finished first, then
        each call is a function_call output item (added, its arguments in one delta, done)."""
        import secrets
        yield from self._finish_thinking()
        yield from self._finish_text()
        for call in _openai_tool_calls(calls):
            item = _function_call_item("fc_" + secrets.token_hex(8), call)
            index = len(self.output)
            yield self.event("response.output_item.added", output_index=index,
                             item=dict(item, status="in_progress", arguments=""))
            yield self.event("response.function_call_arguments.delta", item_id=item["id"], output_index=index,
                             delta=item["arguments"])
            yield self.event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                             arguments=item["arguments"])
            yield self.event("response.output_item.done", output_index=index, item=item)
            self.output.append(item)
            self.calls += 1

    def _text(self, piece):
        yield from self._finish_thinking()
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        if self.text is None:
            self.text = ""
            yield self.event("response.output_item.added", output_index=len(self.output),
                             item={"id": self.msg_id, "type": "message", "status": "in_progress",
                                   "role": "assistant", "content": []})
            yield self.event("response.content_part.added", item_id=self.msg_id, output_index=len(self.output),
                             content_index=0, part=part)
        self.text += piece
        yield self.event("response.output_text.delta", item_id=self.msg_id, output_index=len(self.output),
                         content_index=0, delta=piece, logprobs=[])

    def _finish_text(self):
        if self.text is None:
            return
        item = _message_item(self.msg_id, self.text)
        index = len(self.output)
        yield self.event("response.output_text.done", item_id=self.msg_id, output_index=index, content_index=0,
                         text=self.text, logprobs=[])
        yield self.event("response.content_part.done", item_id=self.msg_id, output_index=index, content_index=0,
                         part=item["content"][0])
        yield self.event("response.output_item.done", output_index=index, item=item)
        self.output.append(item)
        self.text = None

    def whole(self, final):
        """The non-streamed answer from /api/chat's collapsed reply (openai.ToResponse): reasoning,
        then the function calls, or else the message."""
        msg = final.get("message") or {}
        if msg.get("thinking"):
            self.output.append(_reasoning_item("rs_" + self.id, msg["thinking"]))
        calls = _openai_tool_calls(msg.get("tool_calls"))
        for i, call in enumerate(calls):
            self.output.append(_function_call_item("fc_%s_%d" % (self.id, i), call))
        if not calls:
            self.output.append(_message_item(self.msg_id, msg.get("content", "")))
        return self.response("completed", _responses_usage(final))


def _reasoning_item(item_id, thinking):
    """A reasoning output item; the thinking rides as plain text in encrypted_content too, so a
    client that sends it back (as Codex does) gives it to the model again."""
    return {"id": item_id, "type": "reasoning", "summary": [{"type": "summary_text", "text": thinking}],
            "encrypted_content": thinking}


def _function_call_item(item_id, call):
    return {"id": item_id, "type": "function_call", "status": "completed", "call_id": call["id"],
            "name": call["function"]["name"], "arguments": call["function"]["arguments"]}


def _message_item(item_id, text):
    return {"id": item_id, "type": "message", "status": "completed", "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}


def _responses_usage(final):
    prompt, completion = final.get("prompt_eval_count", 0), final.get("eval_count", 0)
    return {"input_tokens": prompt, "output_tokens": completion, "total_tokens": prompt + completion,
            "input_tokens_details": {"cached_tokens": 0}, "output_tokens_details": {"reasoning_tokens": 0}}


def _fed_events(translator, first, items):
    """The /api/chat stream (first item, then the rest) through an answer translator's feed(item),
    which yields the events of another API's stream (Responses, Anthropic Messages)."""
    with contextlib.closing(_relay(first, items)) as stream:
        for item in stream:
            yield from translator.feed(item)


@route("POST", "/v1/responses")
@_openai
def v1_responses(req):
    """POST /v1/responses: OpenAI's Responses API, stateless (no store, no previous_response_id, as
    in Ollama), on top of /api/chat."""
    body = req.json()
    chat = _responses_chat(body)
    answer = ResponsesAnswer(body)
    first, items = _prime(api_chat(_forward(req, chat)))
    if not chat["stream"]:
        return answer.whole(first)
    return Stream(_fed_events(answer, first, items), content_type="text/event-stream", encode=_sse_event,
                  error_item=lambda msg: answer.event("error", code=None, message=msg, param=None),
                  headers={"Cache-Control": "no-cache"})


@route("POST", "/v1/embeddings")
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


@route("POST", "/v1/rerank")
@_openai
def v1_rerank(req):
    """POST /v1/rerank: the Jina/Cohere rerank shape llama-server, LocalAI and vLLM share (`query`,
    `documents`, `top_n`, `return_documents`) via /api/rerank: `results` [{index, relevance_score}]
    best first (with `document: {text}` when asked), and `usage`."""
    body = req.json()
    forward = {k: body[k] for k in ("model", "query", "documents", "top_n", "keep_alive") if k in body}
    result = api_rerank(_forward(req, forward))
    results = []
    for r in result["results"]:
        item = {"index": r["index"], "relevance_score": r["relevance_score"]}
        if body.get("return_documents"):
            item["document"] = {"text": r["document"]}
        results.append(item)
    count = result.get("prompt_eval_count", 0)
    return {"object": "list", "model": body.get("model"), "results": results,
            "usage": {"prompt_tokens": count, "total_tokens": count}}


@route("GET", "/v1/models")
@_openai
def v1_models(req):
    """GET /v1/models: every stored model, newest first."""
    models = sorted(req.server.store.list(), key=lambda m: -m[3])
    return {"object": "list", "data": [{"id": name.display(), "object": "model", "created": int(mtime),
                                        "owned_by": name.namespace} for name, _raw, _m, mtime in models]}


@route("GET", "/v1/models/:model")
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


# == HTTP API: Anthropic compatibility (/v1/messages) =========================

#: Anthropic's error "type" for an HTTP status (anthropic.NewError; 413 as Anthropic itself names it).
ANTHROPIC_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                         404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
                         503: "overloaded_error", 529: "overloaded_error"}
#: MessagesRequest fields with the JSON type each must have (Go's unmarshal errors).
MESSAGES_FIELDS = {"model": _STRING, "max_tokens": (int, "int"), "stream": _BOOL,
                   "messages": (list, "[]anthropic.MessageParam", dict, "anthropic.MessageParam"),
                   "temperature": ((int, float), "float64"), "top_p": ((int, float), "float64"),
                   "top_k": (int, "int"), "stop_sequences": (list, "[]string", str, "string"),
                   "tools": (list, "[]anthropic.Tool", dict, "anthropic.Tool"),
                   "tool_choice": (dict, "anthropic.ToolChoice"), "thinking": (dict, "anthropic.ThinkingConfig"),
                   "metadata": (dict, "anthropic.Metadata"), "output_config": (dict, "anthropic.OutputConfig")}


def _anthropic_id(prefix):
    import secrets
    return "%s_%s" % (prefix, secrets.token_hex(12))


def _anthropic_error(status, message):
    """{"type": "error", "error": {"type", "message"}, "request_id"}: what the SDKs turn into their
    exception for the status (BadRequestError, NotFoundError, ...)."""
    return Response.json(status, {"type": "error", "error": {
        "type": ANTHROPIC_ERROR_TYPES.get(status, "api_error"), "message": message},
        "request_id": _anthropic_id("req")})


_anthropic = _errors_as(_anthropic_error,       # the /v1/messages handlers (Anthropic's shape)
                        {"type": "error", "error": {"type": "authentication_error", "message": "invalid x-api-key"}})


def _block_list(content, where):
    """A message's content as blocks: a string is one text block."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list) or not all(isinstance(b, dict) for b in content):
        raise BadRequest("json: cannot unmarshal %s into Go struct field %s of type []anthropic.ContentBlock"
                         % (_json_kind(content), where))
    return content


def _anthropic_image(source):
    """An image block's source -> the base64 /api/chat takes; only base64 sources (no URLs), as Ollama."""
    if not isinstance(source, dict):
        raise BadRequest("invalid image source")
    if source.get("type") != "base64":
        raise BadRequest("invalid image source type: %s. Only base64 images are supported." % source.get("type"))
    data = source.get("data") or ""
    try:
        base64.b64decode(data, validate=True)
    except ValueError as e:
        raise BadRequest("invalid base64 image data: %s" % e) from None
    return data


def _tool_result_content(content):
    """A tool_result's content (a string, or text and image blocks) -> (text, images)."""
    if isinstance(content, str):
        return content, []
    text, images = [], []
    for block in content if isinstance(content, list) else []:
        if isinstance(block, dict) and block.get("type") == "text":
            text.append(block.get("text") or "")
        elif isinstance(block, dict) and block.get("type") == "image":
            images.append(_anthropic_image(block.get("source")))
    return "".join(text), images


def _from_anthropic_message(msg, earlier):
    """One Anthropic message -> /api/chat messages (anthropic.convertMessage): its text, images,
    tool_use and thinking blocks make one message; each tool_result becomes a "tool" message, put
    before a user's text (the results answer the previous turn) and after anything else's."""
    role = str(msg.get("role") or "").lower()
    text, images, calls, thinking, results = [], [], [], "", []
    for block in _block_list(msg.get("content"), "MessageParam.messages.content"):
        kind = block.get("type")
        if kind == "text":
            text.append(block.get("text") or "")
        elif kind == "image":
            images.append(_anthropic_image(block.get("source")))
        elif kind == "tool_use":
            for field in ("id", "name"):
                if not block.get(field):
                    raise BadRequest("tool_use block missing required '%s' field" % field)
            calls.append({"id": block["id"], "function": {"name": block["name"], "arguments": block.get("input")
                                                          or {}}})
        elif kind == "tool_result":
            content, result_images = _tool_result_content(block.get("content"))
            results.append(_tool_message(content, result_images, block.get("tool_use_id"), earlier))
        elif kind == "thinking":
            thinking = block.get("thinking") or ""
        # other blocks (redacted_thinking, server tools, documents) carry nothing a local model reads
    out = []
    if text or images or calls or thinking:
        m = {"role": role, "content": "".join(text)}
        for key, value in (("images", images), ("tool_calls", calls), ("thinking", thinking)):
            if value:
                m[key] = value
        out.append(m)
    return results + out if role == "user" else out + results


def _anthropic_system(system):
    """`system`: a string, or text blocks joined."""
    if isinstance(system, list):
        return "".join(b.get("text") or "" for b in system if isinstance(b, dict) and b.get("type") == "text")
    return system if isinstance(system, str) else ""


def _from_anthropic_tools(tools):
    """Anthropic tools ({name, description, input_schema}) -> /api/chat tools. Server tools
    (web_search_*, which Ollama answers through ollama.com) are left out: nothing here can reach it."""
    out = []
    for tool in tools or []:
        if str(tool.get("type") or "").startswith("web_search"):
            log.warning("/v1/messages: the %s server tool is not supported; left out", log_value(tool.get("type")))
            continue
        schema = tool.get("input_schema")
        if schema is not None and not isinstance(schema, dict):
            raise BadRequest("invalid input_schema for tool %s: json: cannot unmarshal %s into Go value of type "
                             "api.ToolFunctionParameters" % (json_dumps(tool.get("name") or ""), _json_kind(schema)))
        out.append({"type": "function", "function": {"name": tool.get("name") or "",
                                                      "description": tool.get("description") or "",
                                                      "parameters": schema or {"type": "object"}}})
    return out


def _anthropic_think(body):
    """thinking {"type": "enabled"|"disabled"} -> think true/false; else output_config.effort as a level."""
    kind = (body.get("thinking") or {}).get("type")
    if kind in ("enabled", "disabled"):
        return kind == "enabled"
    effort = str((body.get("output_config") or {}).get("effort") or "").strip().lower()
    effort = "high" if effort == "xhigh" else effort
    return effort if effort in ("low", "medium", "high", "max") else None


def _anthropic_chat(body):
    """A Messages request -> the /api/chat body it is answered with (anthropic.FromMessagesRequest)."""
    check_fields(body, MESSAGES_FIELDS, "MessagesRequest")
    if not body.get("model"):
        raise BadRequest("model is required")
    if not body.get("max_tokens") or body["max_tokens"] <= 0:
        raise BadRequest("max_tokens is required and must be positive")
    if not body.get("messages"):
        raise BadRequest("messages is required")
    messages = []
    system = _anthropic_system(body.get("system"))
    if system:
        messages.append({"role": "system", "content": system})
    for msg in body["messages"]:
        messages += _from_anthropic_message(msg, messages)
    options = {"num_predict": body["max_tokens"]}
    for key in ("temperature", "top_p", "top_k"):
        if body.get(key) is not None:
            options[key] = body[key]
    if body.get("stop_sequences"):
        options["stop"] = body["stop_sequences"]
    chat = {"model": body["model"], "messages": messages, "options": options, "stream": body.get("stream") is True}
    tools = _from_anthropic_tools(body.get("tools"))
    if tools and (body.get("tool_choice") or {}).get("type") != "none":
        chat["tools"] = tools
    think = _anthropic_think(body)
    if think is not None:
        chat["think"] = think
    fmt = (body.get("output_config") or {}).get("format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        chat["format"] = fmt.get("schema")
    return chat


def _estimate_tokens(body):
    """A rough input token count (4 characters a token, as Ollama estimates) for message_start,
    which is sent before the prompt is evaluated; message_delta then carries the real count."""
    chars = len(json_dumps([body.get("system"), body.get("messages"), body.get("tools")]))
    return max(1, chars // 4)


def _anthropic_stop(done_reason, has_calls):
    """/api/chat's done_reason -> stop_reason (anthropic.mapStopReason)."""
    if has_calls:
        return "tool_use"
    return {"stop": "end_turn", "length": "max_tokens", None: None, "": None}.get(done_reason, "stop_sequence")


def _anthropic_message(mid, model, final):
    """The non-streamed answer from /api/chat's collapsed reply: thinking, text, then tool_use blocks."""
    msg = final.get("message") or {}
    content = []
    if msg.get("thinking"):
        content.append({"type": "thinking", "thinking": msg["thinking"], "signature": ""})
    if msg.get("content"):
        content.append({"type": "text", "text": msg["content"]})
    for call in msg.get("tool_calls") or []:
        function = call.get("function") or {}
        content.append({"type": "tool_use", "id": call.get("id") or _anthropic_id("toolu"),
                        "name": function.get("name", ""), "input": function.get("arguments") or {}})
    return {"id": mid, "type": "message", "role": "assistant", "model": model, "content": content,
            "stop_reason": _anthropic_stop(final.get("done_reason"), bool(msg.get("tool_calls"))),
            "stop_sequence": None, "usage": _anthropic_usage(final)}


def _anthropic_usage(final):
    return {"input_tokens": final.get("prompt_eval_count", 0), "output_tokens": final.get("eval_count", 0)}


class MessageEvents:
    """/api/chat stream items -> Anthropic's event sequence: message_start, ping, then for each
    content block content_block_start / _delta (text_delta, thinking_delta, input_json_delta) /
    _stop, and at the end message_delta (stop_reason, usage) and message_stop. A change of kind
    (thinking -> text -> tool_use) closes the open block and starts the next index."""

    def __init__(self, mid, model, estimate):
        self.mid, self.model, self.estimate = mid, model, estimate
        self.started, self.open, self.index, self.calls = False, "", 0, 0

    def feed(self, item):
        """The Anthropic events for one /api/chat item: message_start and ping before the
        first, a block per change of kind, each tool call a whole block, and the closing events
        on done."""
        msg = item.get("message") or {}
        if not self.started:
            self.started = True
            yield {"type": "message_start", "message": {
                "id": self.mid, "type": "message", "role": "assistant", "model": self.model, "content": [],
                "stop_reason": None, "stop_sequence": None,
                "usage": {"input_tokens": self.estimate, "output_tokens": 0}}}
            yield {"type": "ping"}
        for kind, key in (("thinking", "thinking"), ("text", "content")):
            if msg.get(key):
                yield from self._start(kind)
                delta = {"type": kind + "_delta", kind: msg[key]}
                yield {"type": "content_block_delta", "index": self.index, "delta": delta}
        for call in msg.get("tool_calls") or []:
            yield from self._close()
            function = call.get("function") or {}
            yield {"type": "content_block_start", "index": self.index, "content_block": {
                "type": "tool_use", "id": call.get("id") or _anthropic_id("toolu"),
                "name": function.get("name", ""), "input": {}}}
            yield {"type": "content_block_delta", "index": self.index, "delta": {
                "type": "input_json_delta", "partial_json": json_dumps(function.get("arguments") or {})}}
            yield {"type": "content_block_stop", "index": self.index}
            self.index += 1
            self.calls += 1
        if item.get("done"):
            yield from self._close()
            yield {"type": "message_delta", "delta": {"stop_reason": _anthropic_stop(item.get("done_reason"),
                                                                                     self.calls > 0),
                                                      "stop_sequence": None}, "usage": _anthropic_usage(item)}
            yield {"type": "message_stop"}

    def _start(self, kind):
        if self.open == kind:
            return
        yield from self._close()
        self.open = kind
        yield {"type": "content_block_start", "index": self.index,
               "content_block": {"type": "thinking", "thinking": "", "signature": ""} if kind == "thinking"
               else {"type": "text", "text": ""}}

    def _close(self):
        if self.open:
            yield {"type": "content_block_stop", "index": self.index}
            self.index += 1
        self.open = ""


@route("POST", "/v1/messages")
@_anthropic
def v1_messages(req):
    """POST /v1/messages: Anthropic's Messages API on top of /api/chat. anthropic-version is accepted
    and not checked; x-api-key is checked only when OLLAMA_API_KEYS is set (see _api_key_ok)."""
    body = req.json()
    chat = _anthropic_chat(body)
    mid = _anthropic_id("msg")
    # relax_thinking: a model that cannot think answers anyway (Claude Code asks every model to).
    first, items = _prime(api_chat(_forward(req, chat, relax_thinking=True)))
    if not chat["stream"]:
        return _anthropic_message(mid, body["model"], first)
    events = MessageEvents(mid, body["model"], _estimate_tokens(body))
    return Stream(_fed_events(events, first, items), content_type="text/event-stream", encode=_sse_event,
                  error_item=lambda msg: {"type": "error", "error": {"type": "api_error", "message": msg}},
                  headers={"Cache-Control": "no-cache"})


@route("POST", "/v1/messages/count_tokens")
@_anthropic
def v1_messages_count_tokens(req):
    """POST /v1/messages/count_tokens: {"input_tokens": N} for a Messages request (no max_tokens
    needed), counted by the model's own tokenizer on the prompt its chat would run: the
    prompt_eval_count that request reports. Loads the model, as the chat would. (Not in Ollama.)"""
    body = req.json()
    chat = _anthropic_chat(dict(body, max_tokens=body.get("max_tokens") or 1, stream=False))
    out = api_chat(_forward(req, chat, relax_thinking=True, count_only=True))
    return {"input_tokens": out["prompt_eval_count"]}


###############################################################################
# CLI #########################################################################
###############################################################################
# The commands: a client of the HTTP API, one cmd_* per command, and the interactive REPL.

# == CLI: the client, and @command ============================================

class Client:
    """The CLI's side of the API: JSON calls and NDJSON streams to OLLAMA_HOST, one connection each,
    over a _Wire (http.client would import the email parser at every CLI start)."""

    def __init__(self, base_url, timeout=None, api_key=""):
        self.unix = parse_unix_host(base_url)          # "unix:PATH": serve's socket (Host: localhost)
        url = urllib.parse.urlsplit("http://localhost" if self.unix else base_url)
        self.scheme, self.host = url.scheme or "http", url.hostname
        self.port = url.port or (443 if self.scheme == "https" else 80)
        self.prefix = url.path.rstrip("/")
        self.timeout = timeout
        self.api_key = api_key                    # OLLAMA_API_KEY: sent as a bearer token

    def _open(self, method, path, body=None, headers=None):
        """Send one request; its _Reply when the status is below 400, else OllamaError (the
        server's "error" text, or the reason phrase) with that status."""
        hdrs = {"Accept": "application/x-ndjson, application/json",
                "User-Agent": "ollama.py/%s (%s %s) Python/%s" % (
                    __version__, os.uname().machine if hasattr(os, "uname") else "", sys.platform,
                    sys.version.split()[0])}
        if self.api_key:
            hdrs["Authorization"] = "Bearer " + self.api_key
        hdrs.update(headers or {})
        if isinstance(body, (dict, list)):
            body = json_dumps(body).encode()
            hdrs["Content-Type"] = "application/json"
        tls = None
        if self.scheme == "https":
            import ssl  # here, not at the top: only an https OLLAMA_HOST needs it (~5 ms to import)
            tls = ssl.create_default_context()   # the system CAs; SSL_CERT_FILE honoured
        wire = None
        try:
            wire = _Wire.request(self.host, self.port, method, self.prefix + path, body, hdrs, self.timeout, tls,
                                 unix=self.unix)
            status, chunked, length = wire.response_head()
        except (ConnectionRefusedError, FileNotFoundError):     # FileNotFoundError: no socket file
            raise OllamaError("could not connect to ollama server, run 'ollama.py serve' to start it") from None
        except PermissionError as e:
            if self.unix:       # 0600 (or 0660 and another group): the socket is its owner's only
                raise OllamaError("permission denied: the ollama.py server's socket %s is not this user's"
                                  % self.unix, 403) from None
            raise OllamaError("could not connect to ollama server: %s" % e) from None
        except (OSError, EOFError, ValueError, IndexError) as e:
            if wire is not None:
                wire.close()
            raise OllamaError("could not connect to ollama server: %s" % (e or type(e).__name__)) from None
        reply = _Reply(wire, status, None if method == "HEAD" or status in (204, 304) else (chunked, length))
        if status >= 400:
            with reply:
                data = reply.read()
            try:
                msg = json.loads(data)["error"]
                if isinstance(msg, dict):                       # OpenAI shape
                    msg = msg.get("message")
            except (ValueError, KeyError, TypeError):
                msg = data.decode(errors="replace").strip() or wire.reason
            raise OllamaError(msg, status)
        return reply

    def call(self, method, path, body=None, headers=None):
        """One request; the decoded JSON answer (None for an empty body). Raises OllamaError."""
        with self._open(method, path, body, headers) as reply:
            data = reply.read()
        return json.loads(data) if data.strip() else None

    def stream(self, method, path, body=None, headers=None):
        """Yield each NDJSON object of a streamed answer; an {"error"} line raises OllamaError."""
        with self._open(method, path, body, headers) as reply:
            for line in reply:
                if not line.strip():
                    continue
                obj = json.loads(line)
                if isinstance(obj, dict) and obj.get("error"):
                    raise OllamaError(obj["error"])
                yield obj

    def heartbeat(self):
        """HEAD /, as Ollama's commands do before their real work (list and ps go straight to theirs)."""
        self._open("HEAD", "/").close()


class _Reply:
    """The answer a Client got, as a file: read(n), lines by iteration, .status, .headers (lower-case
    names); a body cut short is a ConnectionError (an OSError). Closing it closes the connection."""

    def __init__(self, wire, status, framing):
        self.wire, self.status, self.headers = wire, status, wire.headers
        self._chunks = wire.chunks(*framing) if framing else iter(())   # framing: (chunked, length)
        self._buf = b""

    def _more(self):
        try:
            return next(self._chunks, b"")
        except EOFError:
            raise ConnectionError("unexpected EOF: the server closed the connection mid-answer") from None

    def read(self, n=-1):
        parts, have = [self._buf], len(self._buf)
        while n < 0 or have < n:
            data = self._more()
            if not data:
                break
            parts.append(data)
            have += len(data)
        buf = b"".join(parts)
        cut = len(buf) if n < 0 else n
        out, self._buf = buf[:cut], buf[cut:]
        return out

    def __iter__(self):
        buf, self._buf = self._buf, b""
        return _lines(itertools.chain([buf], iter(self._more, b"")))

    def close(self):
        self.wire.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _client():
    """A Client for the server at OLLAMA_HOST, with OLLAMA_API_KEY when set."""
    config = Config()
    return Client(config.base_url, api_key=config.api_key)


#: The CLI's commands: name -> (cmd_* function, aliases, argparse arguments), filled by @command.
COMMANDS = {}


def argument(*names, **kw):
    """One argparse argument of a command, for @command: argument("model"), argument("--x", ...)."""
    return names, kw


#: Shared by the commands that reach a registry.
INSECURE = argument("--insecure", action="store_true", help="use an insecure registry")


def command(name, *args, aliases=()):
    """Declare the decorated cmd_NAME(args) -> exit status as `ollama.py NAME`, taking `args`
    (each an argument(...)); its docstring's first line is its help, the rest its description.
    The flags sit beside the command, as RamaLama pairs *_parser with *_cli; build_parser()
    wires them all."""
    def register(func):
        COMMANDS[name] = (func, tuple(aliases), args)
        return func
    return register


# == CLI: commands ============================================================

# -- serve -------------------------------------------------------------------

#: The environment serve reads (Config), a row each: (name, default or "", meaning). `serve --help`
#: lists it and README.md's table is generated from it; tests/test_docs.py checks both, and that
#: every OLLAMA_* ollama.py names is here (`python3 tests/test_docs.py` rewrites README's table).
SERVE_ENVIRONMENT = (
    ("OLLAMA_HOST", "%s:%d" % (DEFAULT_HOST, DEFAULT_PORT),
     "IP address and port for the server, or unix:PATH (unix:///abs/path too) to listen on that "
     "socket only (0600)"),
    ("OLLAMA_SOCKET_GROUP", "",
     "with a unix: OLLAMA_HOST, a group whose members may use it too (0660)"),
    ("OLLAMA_MODELS", "~/.ollama/models", "the path to the models directory"),
    ("OLLAMA_KEEP_ALIVE", "5m", "how long models stay loaded in memory"),
    ("OLLAMA_MAX_LOADED_MODELS", str(DEFAULT_MAX_LOADED), "maximum number of loaded models"),
    ("OLLAMA_MAX_QUEUE", str(DEFAULT_MAX_QUEUE), "maximum number of queued requests"),
    ("OLLAMA_NUM_PARALLEL", "1", "maximum number of parallel requests per model"),
    ("OLLAMA_CONTEXT_LENGTH", str(DEFAULT_NUM_CTX),
     "context length to use unless otherwise specified"),
    ("OLLAMA_ORIGINS", "", "a comma separated list of allowed origins"),
    ("OLLAMA_DEBUG", "", "show additional debug information (e.g. OLLAMA_DEBUG=1)"),
    ("OLLAMA_NOHISTORY", "", "do not preserve readline history"),
    ("OLLAMA_NOPRUNE", "",
     "do not prune unused blobs at startup (partial downloads are never pruned)"),
    ("OLLAMA_LOAD_TIMEOUT", "5m", "how long to allow model loads to stall before giving up"),
    ("OLLAMA_FLASH_ATTENTION", "",
     "enable flash attention (0 disables it; unset, llama-server decides)"),
    ("OLLAMA_KV_CACHE_TYPE", "f16", "quantization type for the K/V cache"),
    ("OLLAMA_SPECULATIVE", "off",
     "n-gram speculative decoding: on, off, or one of " + ", ".join(SPECULATIVE_TYPES)),
    ("OLLAMA_LLAMA_SERVER", "", "path of the llama-server binary to run models with"),
    ("OLLAMA_RPC_SERVERS", "", "host:port,... of 'ollama.py worker's to split models' layers with"),
    ("OLLAMA_PROMPT_CACHE", "4GiB",
     "disk kept for long prompts' state across model unloads, e.g. 4GiB or 500MB; 0 turns it off"),
    ("OLLAMA_REPACK", "auto",
     "repack quantized weights for the CPU kernels: 1, 0; auto is off when OLLAMA_RPC_SERVERS is set"),
    ("OLLAMA_API_KEYS", "",
     "comma separated keys; when set, every request but GET / must carry one "
     "(Authorization: Bearer KEY, or x-api-key)"),
    ("OLLAMA_API_KEY", "",
     "the key a client sends to OLLAMA_HOST (a pulling serve: to its mirrors and local registries)"),
    ("OLLAMA_TLS_CERT", "", "PEM certificate (chain) to serve https with, with OLLAMA_TLS_KEY"),
    ("OLLAMA_TLS_KEY", "", "PEM private key for OLLAMA_TLS_CERT"),
    ("OLLAMA_NO_REGISTRY", "",
     "do not answer /v2 (the read-only OCI registry other machines pull from)"),
    ("OLLAMA_REGISTRY_MIRRORS", "",
     "host:port,... tried in order before registry.ollama.ai for its models"),
    ("OLLAMA_METRICS", "1",
     "GET /metrics for Prometheus, guarded by OLLAMA_API_KEYS when set; 0 turns it off"),
)


def _environment_help(rows=SERVE_ENVIRONMENT, width=100, column=28):
    """SERVE_ENVIRONMENT as serve's help lists it: each name, then its meaning and default
    wrapped to `width`."""
    out = []
    for name, default, meaning in rows:
        words = (meaning + (" (default %s)" % default if default else "")).split()
        line = "  " + name.ljust(column - 3)
        for word in words:
            if len(line) + 1 + len(word) > width and len(line) > column:
                out.append(line)
                line = " " * (column - 1)
            line += " " + word
        out.append(line)
    return "\n".join(out)


@command("serve", aliases=["start"])
def cmd_serve(args):
    """Start ollama.py's server."""
    config = Config()
    _setup_logging(config, to_file=True)
    ensure_keypair(config.home, out=sys.stdout)
    reap_orphans(config.home / "runners")   # a serve killed where the kernel could not reap for it
    raise_fd_limit()
    server = make_server(config)
    if not server.loopback and not config.api_keys:
        log.warning("OLLAMA_HOST=%s serves every network this machine is on, and anyone who can reach "
                    "it can use and change its models (OLLAMA_API_KEYS requires a key)", config.host)
    server.store.fix_blob_names()
    server.store.clean(prune=not config.noprune)   # partial downloads stay for their resume
    stop = threading.Event()

    def on_signal(signum, frame):
        stop.set()
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    log.info("Listening on %s (version %s, Ollama API %s)", server.url.split("://", 1)[-1], __version__, API_VERSION)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
    return 0


if cmd_serve.__doc__:                                   # None under python3 -OO
    cmd_serve.__doc__ += "\n\nEnvironment variables:\n" + _environment_help()


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


# -- check-engine ------------------------------------------------------------

#: About 90 byte-level tokens: a prompt batch large enough for the batched (matrix-matrix) kernels.
ENGINE_CHECK_PROMPT = "The quick brown fox jumps over the lazy dog. " * 2
ENGINE_CHECK_TOKENS = 8


def _check_generate(runner, timeout):
    """Start `runner`, run ENGINE_CHECK_PROMPT and ENGINE_CHECK_TOKENS greedy tokens with their
    probabilities, stop it; returns the final event's timings. Raises OllamaError on a bad answer."""
    try:
        runner.start(timeout)
        final, probs = {}, []
        for event in runner.completion({"prompt": ENGINE_CHECK_PROMPT, "n_predict": ENGINE_CHECK_TOKENS,
                                        "temperature": 0, "ignore_eos": True, "cache_prompt": False,
                                        "n_probs": 1}):
            final = event
            for p in event.get("completion_probabilities") or []:
                probs.append(p.get("logprob", p.get("prob")))
    finally:
        runner.stop()
    timings = final.get("timings") or {}
    made = final.get("tokens_predicted", timings.get("predicted_n"))
    if made != ENGINE_CHECK_TOKENS:
        raise OllamaError("llama-server generated %s tokens of %d" % (made, ENGINE_CHECK_TOKENS))
    if not probs or not all(isinstance(p, (int, float)) and math.isfinite(p) for p in probs):
        raise OllamaError("llama-server computed invalid probabilities (%s): its CPU kernels give wrong "
                          "results on this machine" % probs[:4])
    return timings


def check_engine(exe, log_path, launcher=(), timeout=DEFAULT_LOAD_TIMEOUT):
    """Run llama-server `exe` on the engine check's model (engine_check_model): load, one prompt batch,
    ENGINE_CHECK_TOKENS generated tokens with their probabilities, on every thread. Then, for the
    programs built beside it: llama-quantize turns the F16 variant into Q4_0, and an rpc-server
    worker takes the layers of a second run. Returns a summary line; raises OllamaError (a death by
    signal in words) when the engine cannot run here."""
    work = os.path.dirname(str(log_path))
    model = engine_check_model(os.path.join(work, "engine-check.gguf"))
    timings = _check_generate(Runner(exe, model, num_ctx=256, log_path=log_path, launcher=launcher), timeout)
    summary = "llama-server runs %s: %s prompt tokens at %.0f tok/s, %d generated at %.0f tok/s" % (
        "under " + " ".join(launcher) if launcher else "here", timings.get("prompt_n", "?"),
        timings.get("prompt_per_second", 0), ENGINE_CHECK_TOKENS, timings.get("predicted_per_second", 0))
    quantize = Path(exe).with_name("llama-quantize")
    if os.access(str(quantize), os.X_OK):           # built beside it: create --quantize uses it
        src = engine_check_model(os.path.join(work, "engine-check-f16.gguf"), f16=True)
        dst = src.replace("f16", "q4_0")
        for _ in quantize_gguf(str(quantize), src, dst, "Q4_0", launcher):
            pass
        if read_gguf(dst, 0).kv.get("general.file_type") != QUANTIZE_TYPES["Q4_0"][0]:
            raise OllamaError("llama-quantize did not write a Q4_0 model")
        summary += "; llama-quantize works"
    for name in ("rpc-server", "ggml-rpc-server"):  # installed name, and cmake's in a build dir
        rpc = Path(exe).with_name(name)
        if os.access(str(rpc), os.X_OK):            # built beside it: `ollama.py worker` runs it
            _check_rpc(exe, str(rpc), model, work, launcher, timeout)
            summary += "; RPC works"
            break
    return summary


def _check_rpc(exe, rpc, model, work, launcher, timeout):
    """An rpc-server on a free loopback port, and a llama-server that puts its layers there."""
    import subprocess
    address = "127.0.0.1:%d" % free_port()
    with open(os.path.join(work, "rpc-server.log"), "wb") as worker_log:
        worker = popen_tied(list(launcher) + [rpc, "--host", "127.0.0.1", "--port", address.split(":")[1],
                                              "--threads", "1"],
                            stdin=subprocess.DEVNULL, stdout=worker_log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout
        while not rpc_worker_answers(address, 0.2):
            if worker.poll() is not None:
                raise runner_exit_error(worker.returncode, program="rpc-server")
            if time.monotonic() > deadline:
                raise OllamaError("rpc-server did not listen on %s" % address)
            time.sleep(0.05)
        log_path = os.path.join(work, "llama-server-rpc.log")
        _check_generate(Runner(exe, model, num_ctx=256, log_path=log_path, launcher=launcher, rpc=[address]),
                        timeout)
        with open(log_path, "rb") as f:
            if ("RPC0[%s]" % address).encode() not in f.read():      # llama.cpp names the device so
                raise OllamaError("llama-server did not use the RPC worker at %s" % address)
    finally:
        worker.kill()
        worker.wait()


@command("check-engine",
         argument("--engine", metavar="PATH", help="the llama-server to check (default: the one serve uses)"),
         argument("--exec", dest="launcher", metavar="CMD",
             help='run it under an emulator or wrapper, e.g. "qemu-aarch64 -cpu cortex-a72 -L /usr/aarch64-linux-gnu"'))
def cmd_check_engine(args):
    """Check that the llama-server engine runs on this machine.

    Writes a tiny random-weight model (two layers, a tensor in each common quantized type), starts
    llama-server on it, and runs a prompt and a few generated tokens through its CPU kernels on every
    thread. build_llama.sh runs this before it installs a build; run it yourself after copying a
    binary to another machine. Prints a summary and exits 0 when the engine works; otherwise prints
    the end of the engine's log and why (for example: it uses CPU instructions this machine
    lacks), and exits 1.
    """
    import tempfile
    log.addHandler(logging.NullHandler())           # the runner's own error log: printed below instead
    exe = args.engine or find_llama_server(Config())
    if not (os.path.isfile(exe) and os.access(exe, os.X_OK)):
        raise OllamaError("%s is not an executable file" % exe)
    import shlex
    with tempfile.TemporaryDirectory(prefix="ollama-check-") as tmp:
        log_path = os.path.join(tmp, "llama-server.log")
        try:
            print(check_engine(exe, log_path, shlex.split(args.launcher or "")))
        except OllamaError:
            with contextlib.suppress(OSError), open(log_path, "rb") as f:
                tail = f.read()[-4096:].decode(errors="replace").splitlines()[-15:]
                print("\n".join(["llama-server's log ends:"] + ["  " + ln for ln in tail]), file=sys.stderr)
            raise
    return 0


# -- worker -------------------------------------------------------------------

DEFAULT_RPC_PORT = 50052              # rpc-server's own default

RPC_WARNING = ("WARNING: llama.cpp's RPC protocol has no authentication and no encryption. Anyone who can "
               "reach this port can use this machine's CPU, GPU and memory and see the model and what it "
               "computes. Use it only on a network you trust.")


@command("worker",
         argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)"),
         argument("--port", type=int, default=DEFAULT_RPC_PORT, help="port (default %d)" % DEFAULT_RPC_PORT),
         argument("--threads", type=int, help="CPU threads (default: half the cores, as rpc-server)"),
         argument("--device", help="devices to lend, e.g. CUDA0 (default: all)"),
         argument("--cache", action="store_true", help="cache received tensors on disk, so reloads are fast"))
def cmd_worker(args):
    """Lend this machine to another machine's serve, through llama.cpp's RPC backend.

    Runs rpc-server (built beside llama-server by ./build_llama.sh) in the foreground. A serve
    started with OLLAMA_RPC_SERVERS=host:port,host:port splits each model's layers between its own
    CPU or GPU and its workers, so a model too big for one machine runs on several. The worker
    binds 127.0.0.1 unless --host says otherwise. SIGTERM or Ctrl+C stops it.
    """
    import subprocess
    exe = find_engine_tool(Config(), "rpc-server")
    argv = [exe, "--host", args.host, "--port", str(args.port)]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    if args.device:
        argv += ["--device", args.device]
    if args.cache:
        argv += ["--cache"]
    print(RPC_WARNING, file=sys.stderr)
    if not _is_loopback(args.host):
        print("WARNING: listening on %s: every machine that can reach it can use this worker." % args.host,
              file=sys.stderr)
    print("worker: %s" % " ".join(_shell_quote(a) for a in argv), file=sys.stderr)
    proc = popen_tied(argv, stdin=subprocess.DEVNULL)
    stop = lambda signum, frame: proc.terminate()        # noqa: E731 -- forwarded, then we wait
    old = signal.signal(signal.SIGTERM, stop)
    try:
        code = proc.wait()
    except KeyboardInterrupt:                  # the terminal sent it SIGINT too
        proc.terminate()
        code = proc.wait()
        return 0
    finally:
        signal.signal(signal.SIGTERM, old)
    if code == -signal.SIGTERM:
        return 0
    if code:
        raise runner_exit_error(code, program="rpc-server")
    return 0


# -- models ------------------------------------------------------------------


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


def _send_blob(client, path, digest, status):
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
    """Whether the server runs on this machine (so it can read a file by its path)."""
    return _is_loopback(client.host)


@command("create", argument("model"),
         argument("-f", "--file", help='name of the Modelfile (default "Modelfile")'),
         argument("-q", "--quantize", help="quantize model to this level (e.g. q4_K_M)"))
def cmd_create(args):
    """Create a model from a Modelfile.

    Reads the Modelfile (-f, default ./Modelfile; without one, the current folder's GGUF file is
    used as if the Modelfile were "FROM ."), sends its local files to the server as blobs (linked
    instead of copied when the server runs on this machine and can read them), then asks the
    server to build the model.
    """
    client = _client()
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
        _send_blob(client, file_path, digest, status)
    req["model"] = args.model
    if args.quantize:
        req["quantize"] = args.quantize
    status.show("gathering model components")
    try:
        for item in client.stream("POST", "/api/create", req):
            if item.get("status") and item.get("total"):        # quantizing: a percentage on a TTY
                text = item["status"]
                if status.tty:
                    text += " %d%%" % (100 * item.get("completed", 0) // item["total"])
                status.show(text)
            elif item.get("status"):
                status.show(item["status"], final=not status.tty)
    finally:
        status.done()
    return 0


@command("list", argument("prefix", nargs="?", default=""), aliases=["ls"])
def cmd_list(args):
    """List models."""
    return _list_models(args.prefix)


def _list_models(prefix):
    """The `list` table of the models whose name starts with `prefix` (any case)."""
    client = _client()                  # no heartbeat first: the GET fails the same way, a round trip sooner
    resp = client.call("GET", "/api/tags") or {}
    prefix = (prefix or "").lower()
    rows = []
    for m in resp.get("models") or []:
        if prefix and not m["name"].lower().startswith(prefix):
            continue
        rows.append([m["name"], m["digest"][:12], human_bytes(m["size"]),
                     human_time(_parse_rfc3339(m["modified_at"], zero=True) or 0.0)])
    sys.stdout.write(_table(rows, ["NAME", "ID", "SIZE", "MODIFIED"]))
    return 0


def _show_value(v):
    """A metadata value as `ollama show --verbose` prints it: Go's %v, a list cut after about
    ten characters of items ("[a b ...+N more]")."""
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
    """Write an /api/show answer to `out` as `ollama show` (and /show info) prints it: Model,
    Capabilities, Projector, Parameters, System and License tables; `verbose` adds the metadata
    and the tensors."""
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
    for key, label in (("chat", "chat template"), ("layout", "layout")):
        if (resp.get("engine") or {}).get(key):
            rows.append(["", label, resp["engine"][key]])
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


@command("show", argument("model"),
         *(argument("--" + name, action="store_true", help="show %s of a model" % what)
           for name, what in (("license", "license"), ("modelfile", "Modelfile"), ("parameters", "parameters"),
                              ("system", "system message"), ("template", "template"))),
         argument("-v", "--verbose", action="store_true", help="show detailed model information"))
def cmd_show(args):
    """Show information for a model."""
    flags = [f for f in ("license", "modelfile", "parameters", "system", "template") if getattr(args, f)]
    if len(flags) > 1:
        raise OllamaError("only one of '--license', '--modelfile', '--parameters', '--system', "
                          "or '--template' can be specified")
    client = _client()
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


@command("cp", argument("source"), argument("destination"))
def cmd_cp(args):
    """Copy a model."""
    client = _client()
    client.heartbeat()
    client.call("POST", "/api/copy", {"source": args.source, "destination": args.destination})
    print("copied '%s' to '%s'" % (args.source, args.destination))
    return 0


@command("rm", argument("models", nargs="+", metavar="model"))
def cmd_rm(args):
    """Remove a model."""
    client = _client()
    client.heartbeat()
    for model in args.models:
        try:
            for _ in client.stream("POST", "/api/generate", {"model": model, "keep_alive": 0}):
                pass
        except OllamaError as e:
            if e.status != NotFound.status:
                print("Warning: unable to stop model '%s'" % model, file=sys.stderr)
        client.call("DELETE", "/api/delete", {"model": model})
        print("deleted '%s'" % model)
    return 0


# -- inference ---------------------------------------------------------------

_THINK_LEVELS = ("high", "medium", "low", "max")
_GREY, _BOLD, _RESET = "\x1b[38;5;245m", "\x1b[1m", "\x1b[0m"


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
        """Write and flush a piece of the answer, wrapped at the terminal's width: a word that
        would cross width-5 is erased with escape codes and written again on the next line."""
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


def _show_or_pull(client, name, insecure=False):
    """/api/show for the model, pulling it first when the server doesn't have it (404)."""
    try:
        return client.call("POST", "/api/show", {"model": name})
    except OllamaError as e:
        if e.status != 404:
            raise
    _transfer(name, insecure, "/api/pull")
    return client.call("POST", "/api/show", {"model": name})


def _apply_show(opts, info):
    opts.parent_model = ((info or {}).get("details") or {}).get("parent_model") or ""
    opts.capabilities = (info or {}).get("capabilities") or []
    if not opts.think_explicit and "thinking" in opts.capabilities:
        opts.think = True


def _cli_load_model(client, opts):
    """Load (or with keep_alive 0, unload) the model: an /api/generate without a prompt."""
    body = {"model": opts.model}
    if opts.keep_alive is not None:
        body["keep_alive"] = opts.keep_alive
    if opts.think is not None:
        body["think"] = opts.think                # unsupported thinking fails here, before any chat
    for _ in client.stream("POST", "/api/generate", body):
        pass


@command("run", argument("model"), argument("prompt", nargs="*"),
         argument("--format", help='response format (e.g. json)'),
         argument("--keepalive", help="duration to keep a model loaded (e.g. 5m)"),
         argument("--verbose", action="store_true", help="show timings for response"),
         INSECURE,
         argument("--nowordwrap", action="store_true", help="don't wrap words to the next line automatically"),
         argument("--think", nargs="?", const="true", help="enable thinking mode: true/false or high/medium/low"),
         argument("--hidethinking", action="store_true", help="hide thinking output (if provided)"),
         argument("--truncate", action="store_true",
             help="for embedding models: truncate inputs that exceed the context length"),
         argument("--dimensions", type=int, help="truncate output embeddings to specified dimension"))
def cmd_run(args):
    """Run a model."""
    client = _client()
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
    _cli_load_model(client, opts)
    for msg in (info or {}).get("messages") or []:
        if msg.get("role") == "user":
            print(">>> %s" % msg.get("content", ""))
        elif msg.get("role") == "assistant":
            opts.display().write(msg.get("content", ""))
            print("\n")
    return _Repl(client, opts).loop()


def _embed(client, opts, prompt, args):
    """`run` on an embedding model: print the embedding of `prompt` as a JSON array (with
    --truncate and --dimensions); OllamaError without input or when none comes back."""
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
        """Print the next piece of the answer: thinking opens a "Thinking..." block (unless
        hidden), the first content closes it with "...done thinking."; content is also kept,
        for the reply message."""
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


#: Ollama's extractFileNames: a path (an optional drive, then ./ / or \\; spaces escaped or not) of an
#: image; it may catch other text, so only files that exist count.
_IMAGE_PATH_RE = r"(?:[a-zA-Z]:)?(?:\./|/|\\)[\S\\ ]+?\.(?i:jpg|jpeg|png|webp)\b"
_IMAGE_MAX_BYTES = 100 << 20       # Ollama's getImageData limit
_PATH_ESCAPES = [("\\" + c, c) for c in " ()[]{}$&;'*?~"] + [("\\\\", "\\")]


def _image_type(head):
    """The MIME type Go's http.DetectContentType gives the first bytes of an image file (the four
    Ollama takes), else a plain description for the error."""
    if head[:3] == b"\xff\xd8\xff":
        return "image/jpeg"
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return "image/png"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return "application/octet-stream"
    return "application/octet-stream" if b"\0" in head else "text/plain; charset=utf-8"


def extract_images(text):
    """(text, images) as Ollama's `run` does it for a vision model: each image path in the prompt
    (/abs, ./rel, with escaped spaces) that names a file is read, said on stderr ("Added image
    'PATH'") and cut from the text; the images as base64. A file that is not a JPEG, PNG or WebP, or
    over 100 MB, is an OllamaError."""
    images = []
    for found in re.findall(_IMAGE_PATH_RE, text):
        path = found
        for escaped, plain in _PATH_ESCAPES:
            path = path.replace(escaped, plain)
        try:
            with open(path, "rb") as f:
                head = f.read(512)
                kind = _image_type(head)
                if not kind.startswith("image/"):
                    raise OllamaError("invalid file type: %s" % kind)
                if os.fstat(f.fileno()).st_size > _IMAGE_MAX_BYTES:
                    raise OllamaError("file size exceeds maximum limit (100MB)")
                data = head + f.read()
        except FileNotFoundError:
            continue
        except OSError as e:
            raise OllamaError("couldn't process file %r: %s" % (path, e.strerror or e)) from None
        sys.stderr.write("Added image '%s'\n" % path)
        for variant in ("'%s'" % path, "'%s'" % found, found):
            text = text.replace(variant, "")
        images.append(base64.b64encode(data).decode())
    return text.strip(), images


def _generate(client, opts, prompt):
    """One /api/generate, streamed to stdout; Ctrl+C stops it quietly."""
    images = []
    if "vision" in opts.capabilities:
        prompt, images = extract_images(prompt)
    body = opts.request(prompt=prompt)
    if images:
        body["images"] = images
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


@command("ps")
def cmd_ps(args):
    """List running models."""
    client = _client()                  # no heartbeat first, as in list
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
        if m.get("rpc_servers"):                # layers split with llama.cpp RPC workers
            proc = "%s + RPC %s" % (proc.split()[-1], ",".join(m["rpc_servers"]))
        expires = _parse_rfc3339(m.get("expires_at"))
        if expires is None:
            until = "Never"
        elif expires < now:
            until = "Stopping..."
        else:
            until = human_time(expires, now)
        rows.append([m.get("name", ""), (m.get("digest") or "")[:12], human_bytes(size), proc,
                     str(m.get("context_length") or 0), until])
    sys.stdout.write(_table(rows, ["NAME", "ID", "SIZE", "PROCESSOR", "CONTEXT", "UNTIL"]))
    return 0


@command("stop", argument("model"))
def cmd_stop(args):
    """Stop a running model."""
    client = _client()
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
        if e.status == NotFound.status:
            raise missing from None
        raise
    return 0


# -- launch ------------------------------------------------------------------
# Coding agents on a model of this server. What each tool needs (facts from Ollama's cmd/launch):
# Claude Code reads ANTHROPIC_BASE_URL/ANTHROPIC_AUTH_TOKEN and a model per tier; Codex's --oss
# provider reads CODEX_OSS_BASE_URL and asks /api/version (>= 0.13.4) and /api/tags; opencode takes
# an OpenAI-compatible provider as JSON in OPENCODE_CONFIG_CONTENT.

AGENT_CONTEXT = 32768             # tokens; an agent's first request is 15-30k (system prompt and tool schemas)
LAUNCH_MARK = "ollama.py launch"  # what --config writes carries it, so --restore finds only its own


class _Integration:
    """One tool `launch` starts: its program, where it may be installed, the npm package."""

    def __init__(self, name, title, program, package, fallbacks=()):
        self.name, self.title, self.program, self.package, self.fallbacks = name, title, program, package, fallbacks

    def find(self):
        """The tool's executable, or OllamaError with the command that installs it."""
        import shutil
        found = shutil.which(self.program)
        for path in [found] if found else [Path.home() / p for p in self.fallbacks]:
            if path and os.access(str(path), os.X_OK):
                return str(path)
        raise OllamaError("%s is not installed (no %r on PATH); install it with:\n  npm install -g %s"
                          % (self.title, self.program, self.package))


INTEGRATIONS = {i.name: i for i in (
    _Integration("claude", "Claude Code", "claude", "@anthropic-ai/claude-code",
                 (".local/bin/claude", ".claude/local/claude")),
    _Integration("codex", "Codex", "codex", "@openai/codex"),
    _Integration("opencode", "OpenCode", "opencode", "opencode-ai", (".opencode/bin/opencode",)))}
CODEX_SUBCOMMANDS = ("exec", "e", "review", "resume", "fork")    # take the model flags after them


def _launch_model(client, wanted):
    """The model as the server lists it (Codex asks /api/tags for that exact name, and pulls one it
    does not see there): `wanted` completed with :latest, or the newest model when none is named."""
    models = [m.get("name") or m.get("model") for m in (client.call("GET", "/api/tags") or {}).get("models") or []]
    if not wanted:
        if not models:
            raise OllamaError("no models on the server: pull or create one, then launch with --model NAME")
        return models[0]
    name = Name.parse_bare(wanted)
    for listed in models:
        if Name.parse_bare(listed) == name:
            return listed
    raise NotFound("model %r not found on the server; pull it first: ollama.py pull %s" % (wanted, wanted))


def _launch_context(client, model):
    """Load `model` as an agent's request will (no options: the server's context, or the model's
    num_ctx) and return the context it runs with, from /api/ps; OllamaError when it cannot hold an
    agent's first request, with what to set."""
    for _ in client.stream("POST", "/api/generate", {"model": model}):
        pass
    running = (client.call("GET", "/api/ps") or {}).get("models") or []
    ctx = next((int(m.get("context_length") or 0) for m in running
                if Name.parse_bare(m.get("name") or "") == Name.parse_bare(model)), 0)
    trained = 0
    info = (client.call("POST", "/api/show", {"model": model}) or {}).get("model_info") or {}
    for key, value in info.items():
        if key.endswith(".context_length") and isinstance(value, int):
            trained = value
    if ctx and ctx < AGENT_CONTEXT and ctx < trained:
        need = min(AGENT_CONTEXT, trained)
        raise OllamaError(
            "%s runs with a %d-token context here, and an agent's first request is 15-30k tokens (its system "
            "prompt and tool schemas). Give it more, then launch again:\n"
            "  restart the server with OLLAMA_CONTEXT_LENGTH=%d (every model), or\n"
            "  make a model that has it: printf 'FROM %s\\nPARAMETER num_ctx %d\\n' > Modelfile && "
            "ollama.py create %s-agent -f Modelfile" % (model, ctx, need, model, need, Name.parse_bare(model).model))
    if ctx and ctx < AGENT_CONTEXT:
        print("Warning: %s runs with a %d-token context, its most: less than an agent's first request may "
              "take" % (model, ctx), file=sys.stderr)
    return ctx


def _launch_env(tool, base_url, model, ctx):
    """The environment variables `tool` reads to use `model` on this server."""
    if tool == "claude":
        env = {"ANTHROPIC_BASE_URL": base_url, "ANTHROPIC_AUTH_TOKEN": "ollama", "ANTHROPIC_API_KEY": "",
               "ANTHROPIC_MODEL": model, "ANTHROPIC_DEFAULT_OPUS_MODEL": model,
               "ANTHROPIC_DEFAULT_SONNET_MODEL": model, "ANTHROPIC_DEFAULT_HAIKU_MODEL": model,
               "ANTHROPIC_SMALL_FAST_MODEL": model, "CLAUDE_CODE_SUBAGENT_MODEL": model,
               "CLAUDE_CODE_ATTRIBUTION_HEADER": "0", "DISABLE_ERROR_REPORTING": "1",
               "DISABLE_TELEMETRY": "1", "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1"}
        if ctx:
            env["CLAUDE_CODE_AUTO_COMPACT_WINDOW"] = str(ctx)
        return env
    if tool == "codex":
        return {"CODEX_OSS_BASE_URL": base_url + "/v1", "OPENAI_API_KEY": "ollama"}
    return {"OPENCODE_CONFIG_CONTENT": json_dumps(_opencode_config(base_url, model, ctx))}


def _codex_args(model, ctx, extra):
    """Codex's command line: its built-in --oss provider on `model`, before the user's arguments
    (after a subcommand such as `exec`, which takes the flags itself)."""
    ours = ["--oss", "--local-provider", "ollama", "-m", model]
    if ctx:
        ours += ["-c", "model_context_window=%d" % ctx]
    if extra and extra[0] in CODEX_SUBCOMMANDS:
        return extra[:1] + ours + extra[1:]
    return ours + extra


def _opencode_config(base_url, model, ctx):
    entry = {"name": model}
    if ctx:
        entry["limit"] = {"context": ctx, "output": min(ctx // 4, 32768)}
    return {"$schema": "https://opencode.ai/config.json", "model": "ollama-py/" + model,
            "provider": {"ollama-py": {"npm": "@ai-sdk/openai-compatible", "name": "ollama.py (%s)" % LAUNCH_MARK,
                                       "options": {"baseURL": base_url + "/v1"}, "models": {model: entry}}}}


def _read_json_file(path):
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return {}
    except ValueError as e:
        raise OllamaError("%s is not valid JSON (%s): fix or move it first" % (path, e)) from None
    if not isinstance(data, dict):
        raise OllamaError("%s does not hold a JSON object: fix or move it first" % path)
    return data


def _codex_profile(base_url, model, ctx):
    """Codex's profile file (~/.codex/NAME.config.toml, which `codex --profile NAME` reads; Codex 0.171
    refuses a [profiles.NAME] table in config.toml): the model on a provider at this server."""
    lines = ["# written by %s codex --config; --restore deletes it" % LAUNCH_MARK,
             "model = %s" % json_dumps(model), 'model_provider = "ollama-py"']
    if ctx:
        lines.append("model_context_window = %d" % ctx)
    return "\n".join(lines + ["", "[model_providers.ollama-py]", 'name = "ollama.py"',
                              "base_url = %s" % json_dumps(base_url + "/v1"), 'wire_api = "responses"', ""])


def _launch_config(tool, base_url, model, ctx, restore):
    """Write (or with `restore`, take out) the tool's own config for this server, leaving the rest
    of the file as it was; returns (path, how to start the tool now)."""
    home = Path.home()
    path = home / {"claude": ".claude/settings.json", "codex": ".codex/ollama-py.config.toml"}.get(
        tool, ".config/opencode/opencode.json")
    if restore and not path.exists():
        return path, ""
    if tool == "claude":
        settings = _read_json_file(path)
        ours = _launch_env(tool, base_url, model, ctx)
        env = {k: v for k, v in (settings.get("env") or {}).items() if k not in ours}
        if not restore:
            env.update(ours)
        settings["env"] = env
        if not env:
            del settings["env"]
        start = "claude"
    elif tool == "codex":
        if path.exists() and LAUNCH_MARK not in path.read_text().split("\n", 1)[0]:
            raise OllamaError("%s was not written by %s: move it first" % (path, LAUNCH_MARK))
        if restore:
            path.unlink()
        else:
            atomic_write(path, _codex_profile(base_url, model, ctx).encode())
        return path, "codex --profile ollama-py"
    else:
        settings = _read_json_file(path)
        providers = settings.get("provider") or {}
        providers.pop("ollama-py", None)
        if str(settings.get("model", "")).startswith("ollama-py/"):
            del settings["model"]
        if not restore:
            new = _opencode_config(base_url, model, ctx)
            providers.update(new["provider"])
            settings.setdefault("$schema", new["$schema"])
            settings["model"] = new["model"]
        settings["provider"] = providers
        if not providers:
            del settings["provider"]
        start = "opencode"
    atomic_write(path, (json.dumps(settings, indent=2) + "\n").encode())
    return path, start


@command("launch", argument("integration", choices=sorted(INTEGRATIONS), metavar="INTEGRATION",
                            help="claude, codex or opencode"),
         argument("--model", help="the model to use (default: the newest on the server)"),
         argument("--config", action="store_true", help="write the tool's own config instead of starting it"),
         argument("--restore", action="store_true", help="take out what --config wrote"))
def cmd_launch(args):
    """Start a coding agent (Claude Code, Codex, OpenCode) on a model of this server.

    ollama.py launch claude [--model M] [-- ARGS...]   e.g. -- -p "fix the tests"
    ollama.py launch codex [--model M] [-- ARGS...]    e.g. -- exec "fix the tests"
    ollama.py launch opencode [--model M] [-- ARGS...]

    Checks the server and the model (named as the server lists it, with its tag), loads it and
    makes sure its context holds an agent's first request (15-30k tokens: it says what to set when
    it does not), then runs the tool with what it needs to use this server, ARGS passed on.
    --config writes that into the tool's own config file instead (~/.claude/settings.json,
    ~/.codex/ollama-py.config.toml for `codex --profile ollama-py`, ~/.config/opencode/opencode.json),
    keeping the rest of the file; --restore takes it out again. Missing tools get their npm install command."""
    tool = INTEGRATIONS[args.integration]
    client = _client()
    config = Config()
    if config.host in ("0.0.0.0", "::"):          # serve's bind-all address: the tool connects to loopback
        config.host = "127.0.0.1" if config.host == "0.0.0.0" else "::1"
    base_url = config.base_url
    if args.restore:
        path, _ = _launch_config(tool.name, base_url, "", AGENT_CONTEXT, restore=True)   # a context: every key
        print("Took %s's settings for ollama.py out of %s" % (tool.title, path), file=sys.stderr)
        return 0
    program = None if args.config else tool.find()
    client.heartbeat()
    model = _launch_model(client, args.model)
    ctx = _launch_context(client, model)
    where = "%s on %s (context %s tokens) at %s" % (tool.title, model, ctx or "?", base_url)
    if args.config:
        path, start = _launch_config(tool.name, base_url, model, ctx, restore=False)
        print("Wrote %s for %s; start it with: %s" % (path, where, start), file=sys.stderr)
        return 0
    extra = list(getattr(args, "args", None) or [])
    argv = {"claude": ["--model", model] + extra, "codex": _codex_args(model, ctx, extra)}.get(tool.name, extra)
    print("Launching %s" % where, file=sys.stderr)
    sys.stderr.flush()
    os.execve(program, [program] + argv, dict(os.environ, **_launch_env(tool.name, base_url, model, ctx)))


# -- registry ----------------------------------------------------------------

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
        """Show one pull/push progress object: a blob's bar (from its first non-empty
        update) or a new status line; a TTY is redrawn at most every 0.1 s, but at once for a
        status line or "success"."""
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
        """A blob's line: "status: NN%", a bar of 25 cells and the sizes, then the speed
        and time left over the last 3 s; `plain` (no TTY) is "status: NN% SIZE"."""
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


def _transfer(model, insecure, path):
    """Pull or push `model` (path /api/pull or /api/push) with a progress display."""
    client = _client()
    client.heartbeat()
    display = _TransferProgress()
    last = None
    try:
        for last in client.stream("POST", path, {"model": model, "insecure": bool(insecure)}):
            display.update(last)
    except OSError as e:
        raise OllamaError("unexpected EOF: %s" % e) from None
    finally:
        display.close()
    if not last or last.get("status") != "success":
        raise OllamaError("unexpected EOF")                 # the server went away mid-stream


@command("pull", argument("model"), INSECURE)
def cmd_pull(args):
    """Pull a model from a registry

    Fetches the manifest and every missing blob (resuming interrupted downloads) from the model's
    registry: registry.ollama.ai, or the host in the name (host:port/namespace/model:tag).
    Credentials for other registries come from the docker config (~/.docker/config.json "auths",
    as written by 'docker login'); --insecure allows plain HTTP.
    """
    _transfer(args.model, args.insecure, "/api/pull")
    return 0


@command("push", argument("model"), INSECURE)
def cmd_push(args):
    """Push a model to a registry

    Uploads the blobs the registry lacks, then the manifest. Credentials as for 'pull'.
    """
    _transfer(args.model, args.insecure, "/api/push")
    name = Name.parse_bare(args.model)
    if name is not None and name.host.lower() == DEFAULT_REGISTRY:
        print("\nYou can find your model at:\n\n\thttps://ollama.com/%s/%s\n" % (name.namespace, name.model))
    return 0


@command("export", argument("models", nargs="+", metavar="model"), argument("file", help="FILE.tar, or - for stdout"))
def cmd_export(args):
    """Write models to an OCI image layout archive

    The archive (oci-layout, index.json, blobs/sha256/...) holds each model's manifest and blobs,
    each blob once; 'ollama.py import' reads it on another machine, and so do OCI tools
    (skopeo inspect oci-archive:FILE.tar). With - it is written to stdout, e.g.
    'ollama.py export gemma3 - | ssh pi python3 ollama.py import -'. A FILE is written in full
    or not at all.
    """
    client = _client()
    client.heartbeat()
    query = urllib.parse.urlencode([("model", m) for m in args.models])
    resp = client._open("GET", "/api/export?" + query)
    total = int(resp.headers.get("content-length") or 0)
    display = _TransferProgress()
    out, tmp = (sys.stdout.buffer, None) if args.file == "-" else _export_target(args.file)
    try:
        done = 0
        while True:
            chunk = resp.read(COPY_CHUNK)
            if not chunk:
                break
            out.write(chunk)
            done += len(chunk)
            display.update({"status": "exporting", "digest": "archive", "total": total, "completed": done})
        if done != total:
            raise OllamaError("export ended after %d of %d bytes" % (done, total))
        out.flush()
        if tmp is not None:
            os.fsync(out.fileno())
            out.close()
            os.replace(tmp, args.file)
            tmp = None
    except OSError as e:
        raise OllamaError("export failed: %s" % (e or type(e).__name__)) from None
    finally:
        display.close()
        resp.close()
        if tmp is not None:
            out.close()
            _unlink(tmp)
    display.update({"status": "success"})
    return 0


def _export_target(path):
    """(open file, its temp path) next to `path`: renamed onto it only once the archive is complete."""
    import tempfile
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".%s.tmp-" % os.path.basename(path))
    os.chmod(tmp, 0o666 & ~current_umask())         # as a file created with open(2) would be (mkstemp makes 0600)
    return os.fdopen(fd, "wb"), tmp


@command("import", argument("file", help="FILE.tar, or - for stdin"),
         argument("--name", help="the name of the model of a one-model archive (else its ref.name)"))
def cmd_import(args):
    """Add the models of an OCI image layout archive to the store

    Reads an archive written by 'ollama.py export' (or skopeo's oci-archive) and sends it to the
    server, which verifies every blob's sha256 and every manifest before anything enters the
    store: a truncated or hostile archive (absolute paths, .., links, devices) is refused and the
    store stays as it was. With - the archive is read from stdin.
    """
    client = _client()
    client.heartbeat()
    display = _TransferProgress()
    src = sys.stdin.buffer if args.file == "-" else open(args.file, "rb")
    total = None if args.file == "-" else os.fstat(src.fileno()).st_size

    class Reader:
        def __init__(self):
            self.n = 0

        def read(self, n=-1):
            data = src.read(COPY_CHUNK)
            self.n += len(data)
            if total:
                display.update({"status": "importing", "digest": "archive", "total": total, "completed": self.n})
            return data

    headers = {"Content-Type": "application/x-tar"}
    if total is not None:
        headers["Content-Length"] = str(total)
    path = "/api/import" + ("?" + urllib.parse.urlencode({"name": args.name}) if args.name else "")
    last = None
    try:
        display.update({"status": "sending archive"})
        for last in client.stream("POST", path, Reader(), headers):
            display.update(last)
    except OSError as e:
        raise OllamaError("import failed: %s" % (e or type(e).__name__)) from None
    finally:
        display.close()
        if src is not sys.stdin.buffer:
            src.close()
    if not last or last.get("status") != "success":
        raise OllamaError("unexpected EOF")
    return 0


# == CLI: the REPL (`run` without a prompt) ===================================

# Ollama's api.Options and Runner fields by type, for `/set parameter` (api.FormatParams).
_HISTORY_LIMIT = 100                  # lines kept in ~/.ollama/history, as Ollama's readline keeps


class _LineReader:
    """The REPL's input: GNU readline when importable (line editing, up-arrow history), plain
    input() otherwise; accepted lines go to ~/.ollama/history unless history is off."""

    def __init__(self, path, enabled=True):
        """Load the history file's last _HISTORY_LIMIT lines, into readline's history too
        (its auto-history off: a line is added once accepted)."""
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
        """Send one user message (with the images its text names, for a vision model) and keep
        the reply in the conversation; a think setting the model refuses is printed, not raised."""
        opts = self.opts
        message = {"role": "user", "content": text}
        if "vision" in opts.capabilities:
            message["content"], images = extract_images(text)
            if images:
                message["images"] = images
        opts.messages.append(message)
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
        if topic is None and "vision" in self.opts.capabilities:     # Ollama says it under the usage
            text = text[:-1] + "Use /path/to/file to include .jpg, .png, or .webp images.\n\n"
        sys.stderr.write(text)
        sys.stderr.flush()

    def cmd_list(self, args):
        try:
            _list_models(args[1] if len(args) > 1 else "")
        except OllamaError as e:
            print("Error: %s" % e)

    def cmd_load(self, args):
        """/load MODEL: switch the session to another model with a fresh conversation; on
        failure the previous model and conversation are kept."""
        if len(args) != 2:
            print("Usage:\n  /load <modelname>")
            return
        opts = self.opts
        saved = (opts.model, opts.messages, opts.parent_model, opts.capabilities, opts.think)
        opts.model, opts.messages = args[1], []
        print("Loading model '%s'" % opts.model)
        try:
            _apply_show(opts, self.client.call("POST", "/api/show", {"model": opts.model}))
            _cli_load_model(self.client, opts)
        except OllamaError as e:
            opts.model, opts.messages, opts.parent_model, opts.capabilities, opts.think = saved
            if e.status == NotFound.status:
                print("Couldn't find model '%s'" % args[1])
            else:
                print("error: %s" % e)

    def cmd_save(self, args):
        """/save MODEL: create a model from this session (its base model, system message,
        parameters and conversation so far) through /api/create."""
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
        """/set WHAT [VALUE...]: each setting has its method; an unknown one is reported."""
        if len(args) < 2:
            sys.stderr.write(_USAGE_SET)
            return
        what = args[1]
        setter = {"history": self._set_history, "nohistory": self._set_history,
                  "wordwrap": self._set_wordwrap, "nowordwrap": self._set_wordwrap,
                  "verbose": self._set_verbose, "quiet": self._set_verbose,
                  "think": self._set_think, "nothink": self._set_think,
                  "format": self._set_format, "noformat": self._set_format,
                  "parameter": self._set_parameter, "system": self._set_system}.get(what)
        if setter is None:
            print("Unknown command '/set %s'. Type /? for help" % what)
        else:
            setter(what, args)

    def _set_history(self, what, args):
        self.reader.enabled = what == "history"

    def _set_wordwrap(self, what, args):
        self.opts.wordwrap = what == "wordwrap"
        print("Set '%s' mode." % what)

    def _set_verbose(self, what, args):
        self.opts.verbose = what == "verbose"
        print("Set '%s' mode." % what)

    def _set_think(self, what, args):
        opts = self.opts
        if what == "nothink":
            opts.think, opts.think_explicit = False, True
            print("Set 'nothink' mode.")
            return
        opts.think, opts.think_explicit = (args[2] if len(args) > 2 else True), True
        print("Set 'think' mode to '%s'." % args[2] if len(args) > 2 else "Set 'think' mode.")

    def _set_format(self, what, args):
        if what == "noformat":
            self.opts.format = ""
            print("Disabled format.")
        elif len(args) < 3 or args[2] != "json":
            print("Invalid or missing format. For 'json' mode use '/set format json'")
        else:
            self.opts.format = args[2]
            print("Set format to '%s' mode." % args[2])

    def _set_parameter(self, what, args):
        if len(args) < 4:
            sys.stderr.write(_USAGE_PARAMETERS)
            return
        try:
            value = format_param(args[2], args[3:])
        except OllamaError as e:
            print("Couldn't set parameter: %s" % json.dumps(str(e)))
            return
        print("Set parameter '%s' to '%s'" % (args[2], ", ".join(args[3:])))
        self.opts.options[args[2]] = value

    def _set_system(self, what, args):
        """/set system TEXT: the session's system message, replacing a system message that
        ends the conversation; a text that opens with triple quotes goes on until they close."""
        opts = self.opts
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

    def cmd_show(self, args):
        """/show WHAT: info, license, modelfile, parameters (the model's and the session's),
        system or template, as /api/show answers with the session's system message and options."""
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
            _show_info(resp, False, sys.stderr)
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


def _doc(func):
    """A command's help: the first line of its docstring (the rest is its description)."""
    return (func.__doc__ or "").strip().splitlines()[0] if func.__doc__ else None


def _help_formatter(base=argparse.HelpFormatter):
    """argparse's formatter class `base`, as wide as the terminal less 2 as argparse makes it, without
    shutil.get_terminal_size: argparse imports shutil (and so bz2, lzma, zlib) at the first
    add_argument to learn the width, ~2 ms of every CLI start."""
    try:
        columns = int(os.environ.get("COLUMNS") or 0) or os.get_terminal_size(sys.__stdout__.fileno()).columns
    except (AttributeError, ValueError, OSError):
        columns = 0
    width = (columns or 80) - 2
    return lambda prog: base(prog, width=width)


def build_parser(only=None):
    """The argparse parser with every command of COMMANDS (see @command), routed to its cmd_* function;
    with `only` (a set of command names), just those: a CLI start builds the one it runs (building
    them all, with argparse's gettext calls, takes ~8 ms)."""
    parser = argparse.ArgumentParser(
        prog="ollama.py", description="Large language model runner", formatter_class=_help_formatter(),
        epilog="Environment: OLLAMA_HOST (default 127.0.0.1:11434), OLLAMA_MODELS (default "
               "~/.ollama/models); see 'ollama.py serve --help' for the rest.")
    parser.add_argument("-v", "--version", action="store_true", help="show version information")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in sorted(COMMANDS if only is None else only):
        func, aliases, args = COMMANDS[name]
        p = sub.add_parser(name, aliases=list(aliases), help=_doc(func), description=(func.__doc__ or "").strip(),
                           formatter_class=_help_formatter(argparse.RawDescriptionHelpFormatter))
        p.set_defaults(func=func)
        for names, kw in args:
            p.add_argument(*names, **kw)
    return parser


###############################################################################
# Main ########################################################################
###############################################################################
# The entry point.

def main(argv=None):
    """Entry point: parse the command line and run the command; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    passed_on = []                            # launch's `-- ARGS...`, for the tool it starts
    if argv[:1] == ["launch"] and "--" in argv:
        argv, passed_on = argv[:argv.index("--")], argv[argv.index("--") + 1:]
    names = {alias: name for name, (_f, aliases, _a) in COMMANDS.items() for alias in (name,) + aliases}
    if argv and argv[0] in names:
        only = {names[argv[0]]}
    elif argv in (["-v"], ["--version"]):
        only = set()
    else:
        only = None                           # help, or an error that lists the commands
    parser = build_parser(only)
    args, extra = parser.parse_known_args(argv)
    if extra and getattr(args, "command", None) == "run" and not any(x.startswith("-") for x in extra):
        args.prompt += extra            # flags may come between prompt words, as with Ollama's cobra
    elif extra:
        parser.error("unrecognized arguments: %s" % " ".join(extra))
    if args.version:
        print("ollama version is %s" % __version__)
        print("Ollama API version is %s" % API_VERSION)
        return 0
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    args.args = passed_on
    try:
        return args.func(args) or 0
    except OllamaError as e:
        print("Error: %s" % e, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _serve_from_bytecode(argv):
    """`python3 ollama.py serve` (a script, so compiled from source) carries on as `import ollama`
    from a fresh bytecode cache (build_llama.sh writes one), in this process (exec, same pid): the
    memory the compiler took stays with a process for good (~25 MB of an idle serve's ~50), and
    serve runs for days. Without such a cache, or with interpreter options it cannot pass on, serve
    runs as it is, only bigger."""
    if argv[:1] not in (["serve"], ["start"]) or not sys.executable or sys.flags.optimize:
        return
    import subprocess
    flags = getattr(subprocess, "_args_from_interpreter_flags", None)     # what multiprocessing uses
    if flags is None:
        return
    import importlib.util  # here: only this re-exec reads a cache header
    path = os.path.abspath(__file__)
    try:
        with open(importlib.util.cache_from_source(path), "rb") as f:
            head = f.read(16)
        st = os.stat(path)
    except (OSError, NotImplementedError, ValueError):
        return
    if head[:4] != importlib.util.MAGIC_NUMBER or head[4:16] != struct.pack(
            "<III", 0, int(st.st_mtime) & 0xFFFFFFFF, st.st_size & 0xFFFFFFFF):
        return                                              # stale, or hash-based: not worth checking here
    # the script's own path stays in argv, so ps shows ".../ollama.py serve" (pgrep -f "ollama.py serve")
    code = ("import os, sys; sys.path.insert(0, os.path.dirname(sys.argv.pop(1))); import ollama; "
            "sys.exit(ollama.main())")
    try:
        os.execv(sys.executable, [sys.executable] + flags() + ["-c", code, path] + argv)
    except OSError:
        return


if __name__ == "__main__":  # pragma: no cover
    _serve_from_bytecode(sys.argv[1:])
    sys.exit(main())
