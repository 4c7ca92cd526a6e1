"""The engine around ollama.py: build_llama.sh, the stdlib-only entry point, and the tiny GGUF in real
llama-server."""
import json
import os
import re
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import fixtures

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "build_llama.sh"
REAL_CACHE = fixtures.cache_dir()  # read at import, before the per-test HOME swap


def run_script(*args, env=None):
    """Run build_llama.sh with the real build cache; returns the CompletedProcess (text)."""
    env = dict(os.environ if env is None else env, XDG_CACHE_HOME=str(REAL_CACHE.parent))
    return subprocess.run(["bash", str(SCRIPT)] + list(args), env=env, stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, timeout=1800)


def script_flags():
    """Every long option build_llama.sh parses, read from its `case` arms."""
    flags = set()
    for arm in re.findall(r"^\s+((?:-[-\w]+(?:=\*)?\|?)+)\)", SCRIPT.read_text(), re.M):
        for flag in arm.split("|"):
            flag = flag.replace("=*", "")
            if flag.startswith("--") and len(flag) > 2:
                flags.add(flag)
    return flags


def path_without(tmp_path, names):
    """A PATH directory linking every command on the current PATH except `names`."""
    shadow = tmp_path / "path"
    shadow.mkdir()
    for directory in os.environ["PATH"].split(os.pathsep):
        if not os.path.isdir(directory):
            continue
        for entry in os.scandir(directory):
            link = shadow / entry.name
            if entry.name in names or link.exists() or link.is_symlink():
                continue
            if entry.is_file() and os.access(entry.path, os.X_OK):
                link.symlink_to(entry.path)
    return str(shadow)


def test_help_lists_every_flag():
    result = run_script("--help")
    assert result.returncode == 0
    flags = script_flags()
    assert {"--source", "--sdist", "--cpu", "--cuda", "--metal", "--vulkan", "--portable", "--rpc",
            "--jobs", "--prefix", "--force", "--help"} <= flags
    missing = [flag for flag in sorted(flags) if flag not in result.stdout]
    assert missing == []


def test_unknown_flag_is_an_error():
    result = run_script("--frobnicate")
    assert result.returncode != 0
    assert "unknown option '--frobnicate'" in result.stderr


def test_second_build_is_a_noop_that_says_so(llama_server_bin):
    first = run_script()
    assert first.returncode == 0, first.stderr
    second = run_script()
    assert second.returncode == 0, second.stderr
    assert "already built" in second.stdout and "(nothing to do" in second.stdout
    info = (ROOT / "bin" / "llama-server.build-info").read_text()
    assert "source_sha256: " in info and "cmake_flags: " in info and "compiler: " in info


def test_sdist_with_wrong_sha256_is_refused(tmp_path):
    fake = tmp_path / "llama_cpp_python-0.3.36.tar.gz"
    fake.write_bytes(b"not the real sdist")
    result = run_script("--cpu", "--sdist", str(fake), "--prefix", str(tmp_path / "bin"))
    assert result.returncode != 0
    assert "expected 832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e" in result.stderr
    assert not (tmp_path / "bin").exists()


@pytest.mark.parametrize("missing, what", [
    (("cmake",), "cmake not found"),
    (("cc", "gcc", "clang", "c++", "g++", "clang++"), "C compiler"),
])
def test_missing_build_tool_names_the_package(tmp_path, missing, what):
    env = dict(os.environ, PATH=path_without(tmp_path, set(missing) | {"nvcc"}))
    env.pop("CC", None)
    env.pop("CXX", None)
    result = run_script("--cpu", "--prefix", str(tmp_path / "bin"), env=env)
    assert result.returncode != 0
    assert what in result.stderr
    assert "apt-get install cmake g++" in result.stderr
    assert "dnf install cmake gcc-c++" in result.stderr and "brew install cmake" in result.stderr
    assert not (tmp_path / "bin" / "llama-server").exists()


def test_ollama_py_runs_without_site_packages():
    import ollama
    result = subprocess.run([sys.executable, "-S", "-I", str(ROOT / "ollama.py"), "--version"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert ollama.__version__ in result.stdout


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post_json(url, body):
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read())


def test_tiny_gguf_generates_in_real_llama_server(llama_server_bin, tiny_gguf, tmp_path):
    port = free_port()
    log = open(str(tmp_path / "llama-server.log"), "wb")
    proc = subprocess.Popen([str(llama_server_bin), "-m", str(tiny_gguf), "--host", "127.0.0.1",
                             "--port", str(port), "-c", "256", "-t", "1"], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60  # give up, not a performance assertion
        while True:
            assert proc.poll() is None, (tmp_path / "llama-server.log").read_text()
            try:
                with urllib.request.urlopen("http://127.0.0.1:%d/health" % port, timeout=5) as resp:
                    if resp.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError):
                pass
            assert time.monotonic() < deadline, "llama-server never became healthy"
            time.sleep(0.05)
        data = post_json("http://127.0.0.1:%d/completion" % port,
                         {"prompt": "Hello world", "n_predict": 8, "temperature": 0})
        assert data["tokens_predicted"] > 0
        assert data["content"]
        props = json.loads(urllib.request.urlopen("http://127.0.0.1:%d/props" % port, timeout=10).read())
        assert props["model_path"] == str(tiny_gguf)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_tiny_gguf_is_deterministic_per_seed(tiny_gguf, tmp_path):
    again = fixtures.write_tiny_gguf(tmp_path / "again.gguf", cache=REAL_CACHE)
    other = fixtures.write_tiny_gguf(tmp_path / "other.gguf", seed=1, cache=REAL_CACHE)
    assert again.read_bytes() == tiny_gguf.read_bytes()
    assert other.read_bytes() != tiny_gguf.read_bytes()


def test_tiny_gguf_carries_chat_template_and_vocab(tmp_path):
    import gguf
    path = fixtures.write_tiny_gguf(tmp_path / "chat.gguf", chat_template="{{ messages }}", cache=REAL_CACHE)
    fields = gguf.GGUFReader(str(path)).fields
    assert fields["tokenizer.chat_template"].contents() == "{{ messages }}"
    assert fields["general.architecture"].contents() == "llama"
    assert len(fields["tokenizer.ggml.tokens"].contents()) == fields["llama.vocab_size"].contents()


def test_gemma_is_a_gemma3_gguf(gemma_gguf):
    # GGUFReader would parse all 262144 tokens; the architecture is the first key/value.
    with open(str(gemma_gguf), "rb") as f:
        magic, _version, _tensors, _kvs, key_len = struct.unpack("<4sIQQQ", f.read(32))
        key = f.read(key_len)
        vtype, value_len = struct.unpack("<IQ", f.read(12))
        value = f.read(value_len)
    assert (magic, key, vtype, value) == (b"GGUF", b"general.architecture", 8, b"gemma3")
    assert gemma_gguf.stat().st_size == 253113024


def test_readme_gives_the_test_command_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text()
    cmd = re.search(r"^TEST_CMD=\((.+)\)$", ci, re.M).group(1)
    readme = (ROOT / "README.md").read_text()
    first_block = readme.split("```")[1]
    assert "./demo.sh" in first_block and "bash .ci/run" in first_block
    assert "\n%s " % cmd in readme
