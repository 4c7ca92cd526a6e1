#!/usr/bin/env python3
"""chaos.py: kill `serve` (SIGKILL) at a random moment of create, rm, cp, a blob upload and a no-copy
import, restart it, and check the store each time: every manifest's blobs present and hashing right,
no temp file or delete journal left. At the end, a startup one grace period later (as the next day's
serve) must leave no unreferenced blob but resumable partial downloads.

    python3 tests/chaos.py [--kills N] [--seed S] [--size MB]

N kills per operation (default 15), at a uniformly random time within the operation's own unkilled
duration, measured first. About 1 s per kill on the 2-core CI machine. Standard library only, plus the
repository's ollama.py; everything runs in a temp dir with its own HOME, on loopback. Exits 1 on the
first broken invariant, printing it.
"""
import argparse
import hashlib
import http.client
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import ollama  # noqa: E402


class Broken(Exception):
    """An invariant of the store does not hold."""


class Serve:
    def __init__(self, home):
        self.home, self.port, self.proc = home, None, None

    @property
    def env(self):
        return dict(os.environ, HOME=str(self.home), OLLAMA_MODELS=str(self.home / ".ollama" / "models"),
                    OLLAMA_HOST="127.0.0.1:%d" % self.port)

    def start(self):
        self.port = ollama.free_port()
        log = open(str(self.home / "serve.log"), "ab")
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "ollama.py"), "serve"], env=self.env,
                                     stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1)
                conn.request("GET", "/")
                if conn.getresponse().read() == b"Ollama is running":
                    return self
            except OSError:
                time.sleep(0.02)
        raise Broken("serve did not start; see %s" % (self.home / "serve.log"))

    def stop(self, sig=signal.SIGTERM):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(30)

    def cli(self, *args):
        return subprocess.Popen([sys.executable, str(ROOT / "ollama.py")] + list(args), env=self.env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def upload(self, path, digest, local=False):
        """POST /api/blobs: streamed from a child process (killable mid-body), or a no-copy import."""
        code = ("import http.client, os, sys\n"
                "c = http.client.HTTPConnection('127.0.0.1', %d, timeout=120)\n" % self.port)
        if local:
            code += "c.request('POST', '/api/blobs/%s', b'', {'X-Ollama-Path': %r})\n" % (digest, str(path))
        else:
            code += ("f = open(%r, 'rb')\n"
                     "c.request('POST', '/api/blobs/%s', f, {'Content-Length': str(os.path.getsize(%r))})\n"
                     % (str(path), digest, str(path)))
        code += "sys.exit(0 if c.getresponse().status in (200, 201) else 1)\n"
        return subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)


def sha256_file(path):
    h = hashlib.sha256()
    with open(str(path), "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def check(store):
    """The invariants after a restart: returns the number of manifests checked."""
    temps = [p.name for p in store.blobs.iterdir() if p.name.startswith("sha256-tmp-") or ".tmp-" in p.name
             or p.name.startswith(".rm-")] if store.blobs.is_dir() else []
    if temps:
        raise Broken("left behind after a restart: %s" % temps)
    n = 0
    for name, _raw, manifest, _ in store.list():
        for digest in ollama.manifest_digests(manifest):
            path = store.blob_path(digest)
            if not path.is_file():
                raise Broken("%s names %s, which is missing" % (name, digest))
            if sha256_file(path) != digest:
                raise Broken("%s: blob %s does not hash to its name" % (name, digest))
        n += 1
    return n


def big_gguf(path, size_mb, seed):
    """A valid GGUF of about size_mb MB (the engine check's model plus one large F32 tensor): the bigger
    the file, the wider the window in which a kill lands mid-operation."""
    rng = random.Random(seed)
    n = size_mb * (1 << 20) // 4
    data = rng.getrandbits(8 * 4 * 1024).to_bytes(4 * 1024, "little") * (n // 1024)
    ollama.write_gguf(str(path), [("general.architecture", 8, "llama"), ("general.name", 8, "chaos %d" % seed)],
                      [("pad.weight", 0, [len(data) // 4], data)])
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=15, help="kills per operation (default 15)")
    p.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    p.add_argument("--size", type=int, default=64, help="size of the model file in MB (default 64)")
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="ollama-chaos-"))
    home = work / "home"
    home.mkdir()
    store = ollama.Store(home / ".ollama" / "models")
    serve = Serve(home).start()
    started, killed = time.monotonic(), 0
    try:
        base = big_gguf(work / "base.gguf", args.size, 0)
        modelfile = work / "Modelfile"
        modelfile.write_text("FROM %s\n" % base)
        if serve.cli("create", "keep", "-f", str(modelfile)).wait(120) != 0:
            raise Broken("the first create failed; see %s" % (home / "serve.log"))

        def fresh_file(i):
            path = big_gguf(work / ("f%d.gguf" % i), args.size, 1000 + i)
            return path, sha256_file(path)

        counter = [0]

        def op(kind):
            """Start one operation; returns its process (a CLI or an uploading client)."""
            counter[0] += 1
            i = counter[0]
            if kind == "create":
                mf = work / ("Modelfile%d" % i)
                mf.write_text("FROM %s\nSYSTEM run %d\n" % (fresh_file(i)[0], i))
                return serve.cli("create", "m%d" % i, "-f", str(mf))
            if kind == "rm":
                if serve.cli("cp", "keep", "rm%d" % i).wait(60) != 0:
                    raise Broken("cp before rm failed")
                return serve.cli("rm", "rm%d" % i)
            if kind == "cp":
                return serve.cli("cp", "keep", "cp%d" % i)
            path, digest = fresh_file(i)
            return serve.upload(path, digest, local=(kind == "import"))

        for kind in ("create", "rm", "cp", "upload", "import"):
            t0 = time.monotonic()
            if op(kind).wait(120) != 0:
                raise Broken("an unkilled %s failed; see %s" % (kind, home / "serve.log"))
            took = time.monotonic() - t0
            for _ in range(args.kills):
                proc = op(kind)
                time.sleep(rng.uniform(0, took))
                serve.stop(signal.SIGKILL)           # the server dies at any moment of the operation
                proc.kill()
                proc.wait()
                killed += 1
                serve.start()                        # its startup repairs what the kill left
                check(store)
            print("%-7s %d kills within %.2f s each: store consistent after every restart"
                  % (kind, args.kills, took))
        serve.stop()
        removed, _ = store.clean(now=time.time() + ollama.BLOB_GRACE + 1)     # the next day's startup
        refs = store.referenced()
        strays = [b.name for b in store.blobs.iterdir() if ollama._BLOB_NAME_RE.match(b.name)
                  and b.name.replace("-", ":", 1) not in refs]
        if strays:
            raise Broken("unreferenced blobs after a later startup: %s" % strays)
        print("%d kills in %.0f s: 0 temp files, 0 unreferenced blobs after the grace period (%d swept), "
              "%d manifests whose blobs all hash right" % (killed, time.monotonic() - started, removed, check(store)))
        return 0
    except Broken as e:
        print("chaos.py: BROKEN after %d kills: %s" % (killed, e), file=sys.stderr)
        return 1
    finally:
        serve.stop(signal.SIGKILL)
        shutil.rmtree(str(work), ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
