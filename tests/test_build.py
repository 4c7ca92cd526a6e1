"""The engine around ollama.py: build_llama.sh, the stdlib-only entry point, and the tiny GGUF in real
llama-server."""
import json
import os
import re
import shutil
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
    gguf = pytest.importorskip("gguf")
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


# -- checked builds: fallback, portable, static, aarch64 ---------------------------------------------
# Each builds into the real cache (ccache shares everything outside ggml's CPU kernels), so a warm
# run is seconds and a cold one a few minutes per configuration; docs/development.md lists the times.

def build_info(prefix):
    """bin/llama-server.build-info as {key: value}; fallback_from lines as a list."""
    info = {"fallback_from": []}
    for line in (Path(prefix) / "llama-server.build-info").read_text().splitlines():
        key, sep, value = line.partition(": ")
        if sep and not line.startswith("#"):
            if key == "fallback_from":
                info[key].append(value)
            else:
                info[key] = value
    return info


def needs(*commands):
    """Skip without these commands; on CI (.ci/run installs them) their absence is a failure."""
    missing = [c for c in commands if not shutil.which(c)]
    if missing and os.environ.get("CI") == "true":
        pytest.fail("CI lacks %s (.ci/run installs them)" % " ".join(missing))
    if missing:
        pytest.skip("needs %s" % " ".join(missing))


def cpu_flags():
    with open("/proc/cpuinfo") as f:
        return set(next((ln for ln in f if ln.startswith("flags")), "").split())


def check_engine(exe, launcher=None):
    cmd = [sys.executable, str(ROOT / "ollama.py"), "check-engine", "--engine", str(exe)]
    return subprocess.run(cmd + (["--exec", launcher] if launcher else []), stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, timeout=600)


def test_check_engine_passes_on_the_installed_engine(llama_server_bin):
    result = check_engine(llama_server_bin)
    assert result.returncode == 0, result.stderr
    assert re.match(r"llama-server runs here: \d+ prompt tokens at \d+ tok/s, 8 generated at \d+ tok/s; "
                    r"llama-quantize works; RPC works$", result.stdout.strip())
    info = build_info(ROOT / "bin")
    assert info["check"].startswith("llama-server runs here: ")
    if info.get("target") == "x86_64":
        assert "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" in info["cmake_flags"]   # the AMX crash


TILE_INSTRUCTIONS = re.compile(r"\b(ldtilecfg|tilezero|tileloadd|tileloaddt1|tilestored"
                               r"|tdpbssd|tdpbsud|tdpbusd|tdpbuud|tdpbf16ps)\b")


@pytest.mark.parametrize("use_build_flags", [True, False])
def test_default_build_keeps_amx_tiles_out_even_on_an_amx_cpu(llama_server_bin, tmp_path, use_build_flags):
    # On an AMX Xeon -march=native means sapphirerapids (or newer): compile ggml's AMX kernel as the default
    # build would there, with the C++ flags build-info records, and look for tile instructions.
    info = build_info(ROOT / "bin")
    if info.get("target") != "x86_64":
        pytest.skip("an x86-64 build")
    flags = re.search(r"-DCMAKE_CXX_FLAGS=(.*?)(?: -D|$)", info["cmake_flags"]).group(1).split()
    tree = Path(info["source_tree"]) / "ggml"
    obj = tmp_path / "mmq.o"
    subprocess.run(["g++", "-std=c++17", "-O1", "-march=sapphirerapids"] + (flags if use_build_flags else []) +
                   ["-I%s" % (tree / d) for d in ("include", "src", "src/ggml-cpu")] +
                   ["-c", str(tree / "src/ggml-cpu/amx/mmq.cpp"), "-o", str(obj)], check=True, timeout=300)
    disassembly = subprocess.run(["objdump", "-d", str(obj)], stdout=subprocess.PIPE, universal_newlines=True,
                                 check=True).stdout
    tiles = len(TILE_INSTRUCTIONS.findall(disassembly))
    assert (tiles == 0) if use_build_flags else (tiles > 100)     # without the flags, the crashing kernel


def test_check_engine_model_has_every_common_weight_type(tmp_path):
    import ollama
    path = ollama.engine_check_model(str(tmp_path / "check.gguf"))
    g = ollama.read_gguf(path)
    assert {t.type_name for t in g.tensors} == {"F32", "F16", "Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"}
    assert g.architecture == "llama" and g.block_count == 2
    assert len(g.kv["tokenizer.ggml.tokens"]) == g.get("vocab_size")
    assert ollama.engine_check_model(str(tmp_path / "again.gguf")) and \
        (tmp_path / "again.gguf").read_bytes() == Path(path).read_bytes()      # seeded: same bytes


@pytest.mark.timeout(3600)
def test_a_build_that_dies_in_its_check_is_rebuilt_on_a_baseline(llama_server_bin, tmp_path):
    # qemu-x86_64 has no AVX-512: to it, this machine's native build is a binary from another CPU.
    needs("qemu-x86_64")
    if "avx512f" not in cpu_flags():
        pytest.skip("the native build runs under qemu-x86_64 here: nothing to fall back from")
    prefix = tmp_path / "bin"
    result = run_script("--cpu", "--check-with", "qemu-x86_64", "--prefix", str(prefix))
    assert result.returncode == 0, result.stderr[-3000:]
    assert ("the cpu-native build failed its check: llama-server process has terminated: SIGILL (illegal "
            "instruction): the engine uses CPU instructions this machine cannot run") in result.stderr
    assert "rebuilding with the x86-64-v3 baseline (AVX2, FMA, F16C, BMI2)" in result.stderr
    info = build_info(prefix)
    assert info["cpu_config"] == "x86-64-v3" and info["check_with"] == "qemu-x86_64"
    assert info["fallback_from"] == [
        "native: llama-server process has terminated: SIGILL (illegal instruction): the engine uses CPU "
        "instructions this machine cannot run; rebuild it with ./build_llama.sh (with --portable if the "
        "binary came from another machine)"]
    assert info["check"].startswith("llama-server runs under qemu-x86_64: ")
    assert check_engine(prefix / "llama-server", "qemu-x86_64").returncode == 0
    again = run_script("--cpu", "--check-with", "qemu-x86_64", "--prefix", str(prefix))
    assert again.returncode == 0 and "already built" in again.stdout and "x86-64-v3" in again.stdout


def objdump_registers(exe):
    """How many instructions of `exe` name ymm / zmm / AVX-512 mask registers: the whole binary, since
    a non-dispatching build has no code path that is not compiled for its baseline."""
    out = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(exe)], stdout=subprocess.PIPE,
                         universal_newlines=True, check=True).stdout
    return {"ymm": len(re.findall(r"%ymm\d", out)), "zmm": len(re.findall(r"%zmm\d", out)),
            "k": len(re.findall(r"%k[0-7]\b", out))}


def needed_libraries(exe):
    """The DT_NEEDED entries of an ELF file of any architecture (readelf does not run it)."""
    out = subprocess.run(["readelf", "-d", str(exe)], stdout=subprocess.PIPE, universal_newlines=True,
                         check=True).stdout
    return sorted(re.findall(r"\(NEEDED\).*\[(.+)\]", out))


def shared_libraries(exe):
    out = subprocess.run(["ldd", str(exe)], stdout=subprocess.PIPE, universal_newlines=True, check=True).stdout
    return sorted(ln.split()[0] for ln in out.splitlines() if ln.strip())


@pytest.mark.timeout(3600)
def test_portable_build_has_no_avx512_anywhere(llama_server_bin, tmp_path):
    needs("objdump")
    prefix = tmp_path / "bin"
    result = run_script("--cpu", "--portable", "--prefix", str(prefix))
    assert result.returncode == 0, result.stderr[-3000:]
    info = build_info(prefix)
    assert info["cpu_config"] == "x86-64-v3" and info["check"].startswith("llama-server runs here")
    regs = objdump_registers(prefix / "llama-server")
    assert regs["zmm"] == 0 and regs["k"] == 0, regs
    assert regs["ymm"] > 1000, regs                      # AVX2 code is there: objdump did read it
    if "avx512f" in cpu_flags():
        assert objdump_registers(llama_server_bin)["zmm"] > 0   # and the native build differs


@pytest.mark.timeout(3600)
def test_static_build_needs_only_the_c_library(llama_server_bin, tmp_path):
    needs("objdump", "ldd")
    prefix = tmp_path / "bin"
    result = run_script("--cpu", "--portable", "--baseline", "x86-64-v2", "--static", "--prefix", str(prefix))
    assert result.returncode == 0, result.stderr[-3000:]
    before, after = shared_libraries(llama_server_bin), shared_libraries(prefix / "llama-server")
    assert {"libstdc++.so.6", "libgcc_s.so.1"} <= set(before)
    assert not [lib for lib in after if not re.match(r"(linux-vdso|libc|libm|/lib64/ld-linux-x86-64)\.so", lib)], after
    info = build_info(prefix)
    assert info["cpu_config"] == "x86-64-v2" and info["static"].startswith("libstdc++ and libgcc linked in")
    assert needed_libraries(prefix / "llama-server") == ["ld-linux-x86-64.so.2", "libc.so.6", "libm.so.6"]
    assert objdump_registers(prefix / "llama-server") == {"ymm": 0, "zmm": 0, "k": 0}   # SSE4.2 only
    assert check_engine(prefix / "llama-server").returncode == 0


def test_no_configuration_passing_installs_nothing(llama_server_bin, tmp_path):
    # `false` as the emulator fails every check; x86-64-v2 is the last configuration, so none is left.
    prefix = tmp_path / "bin"
    result = run_script("--cpu", "--portable", "--baseline", "x86-64-v2", "--static", "--check-with", "false",
                        "--prefix", str(prefix))
    assert result.returncode != 0
    assert "no CPU configuration passed the check; nothing was installed" in result.stderr
    assert not prefix.exists()


def aarch64_build(board, tmp_path):
    needs("aarch64-linux-gnu-g++", "qemu-aarch64")
    prefix = tmp_path / board
    result = run_script("--board", board, "--static", "--prefix", str(prefix))
    assert result.returncode == 0, result.stderr[-3000:]
    exe = prefix / "llama-server"
    with open(str(exe), "rb") as f:
        header = f.read(20)
    assert header[:4] == b"\x7fELF" and struct.unpack("<H", header[18:20])[0] == 183    # EM_AARCH64
    return exe, build_info(prefix)


@pytest.mark.timeout(3600)
def test_pi4_cross_build_generates_under_a_cortex_a72(llama_server_bin, tmp_path):
    exe, info = aarch64_build("pi4", tmp_path)
    assert info["target"] == "aarch64 (cross-built on x86_64)" and info["cpu_config"] == "aarch64-pi4"
    assert info["check"].startswith("llama-server runs under qemu-aarch64 -cpu cortex-a72 -L /usr/aarch64-linux-gnu: ")
    assert needed_libraries(exe) == ["libc.so.6", "libm.so.6"]     # --static: the C library only


@pytest.mark.timeout(3600)
def test_pi5_build_is_refused_by_a_pi4_cpu_in_words(llama_server_bin, tmp_path):
    exe, info = aarch64_build("pi5", tmp_path)
    assert info["check"].startswith("llama-server runs under qemu-aarch64 -cpu cortex-a76 ")  # its own CPU
    result = check_engine(exe, "qemu-aarch64 -cpu cortex-a72 -L /usr/aarch64-linux-gnu")
    assert result.returncode == 1                                       # dot products: SIGILL on a Pi 4
    assert result.stderr.strip().endswith(
        "Error: llama-server process has terminated: SIGILL (illegal instruction): the engine uses CPU "
        "instructions this machine cannot run; rebuild it with ./build_llama.sh (with --portable if the "
        "binary came from another machine)")


def test_launcher_runs_ollama_py_from_its_cached_bytecode(llama_server_bin, tmp_path):
    import importlib.util
    launcher = ROOT / "bin" / "ollama"
    assert launcher.is_file() and os.access(str(launcher), os.X_OK)
    cache = Path(importlib.util.cache_from_source(str(ROOT / "ollama.py")))
    assert cache.is_file()                                  # build_llama.sh wrote it, whatever the env says
    import ollama
    out = subprocess.run([str(launcher), "--version"], stdout=subprocess.PIPE, universal_newlines=True, timeout=60,
                         env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"), cwd=str(tmp_path))
    assert out.stdout.splitlines() == ["ollama version is %s" % ollama.__version__,
                                       "Ollama API version is %s" % ollama.API_VERSION]
    # Fresh for this ollama.py (the header's source mtime and size match), so import runs it uncompiled.
    flags, mtime, size = struct.unpack("<III", cache.read_bytes()[4:16])
    st = (ROOT / "ollama.py").stat()
    assert flags == 0 and (mtime, size) == (int(st.st_mtime) & 0xFFFFFFFF, st.st_size & 0xFFFFFFFF)


def test_the_launcher_build_llama_sh_writes_shows_ollama_py_serve_in_ps(tmp_path):
    # install_launcher alone, cut out of the script (running the script would build the engine), writing
    # bin/ollama beside a copy of ollama.py; then serve started through it, as `ps` and pgrep -f see it.
    text = SCRIPT.read_text()
    func = re.search(r"^install_launcher\(\) \{\n.*?^\}\n", text, re.M | re.S).group(0)
    here = tmp_path / "checkout"
    here.mkdir()
    shutil.copy(str(ROOT / "ollama.py"), str(here / "ollama.py"))
    subprocess.run(["bash", "-c", 'note() { echo "$*" >&2; }\n%s\nHERE="$1" cross=0 install_launcher' % func,
                    "bash", str(here)], check=True, timeout=60)
    launcher = here / "bin" / "ollama"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, HOME=str(tmp_path), OLLAMA_HOST="127.0.0.1:%d" % port)
    proc = subprocess.Popen([str(launcher), "serve"], env=env, cwd=str(tmp_path), stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen("http://127.0.0.1:%d/" % port, timeout=5) as resp:
                    assert resp.read() == b"Ollama is running"
                break
            except OSError:
                assert proc.poll() is None
                time.sleep(0.1)
        with open("/proc/%d/cmdline" % proc.pid, "rb") as f:
            argv = f.read().split(b"\0")[:-1]
        # the launcher exec'd Python in its own process: serve, found by `pgrep -f "ollama.py serve"`
        assert argv[-2:] == [str(here / "ollama.py").encode(), b"serve"]
        assert re.search(rb"ollama\.py serve", b" ".join(argv))
    finally:
        proc.terminate()
        proc.wait(30)
