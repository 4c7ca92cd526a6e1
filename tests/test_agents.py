"""Coding agents on a local model: `ollama.py launch` starts the real Claude Code, Codex and OpenCode
(their npm packages, installed once into the cache) against a real serve, on scripted models with Qwen3's chat
template (fixtures.write_scripted_gguf): a plain answer is printed, and a tool call (Claude Code's
Write, Codex's exec_command) leaves its file on disk. Skipped, saying why, when npm cannot install
them. The agents' prompts are ~100k of these byte tokens, so the server runs with a 128k context.

Bounded: a scripted model answers its tool call again after the tool's result, so the tool tests stop
the agent once the file is there (Claude Code with --max-turns 1; Codex is killed)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import fixtures
import ollama
from test_inference import import_gguf

ROOT = Path(__file__).resolve().parent.parent
CACHE = fixtures.cache_dir()                  # read before a test swaps HOME
#: The versions tried (a newer Codex or Claude Code may ask the server for more); bump them together.
pytestmark = pytest.mark.timeout(420)         # a cold npm install (at most 120 s) and Claude Code's first prompt
PACKAGES = ("@anthropic-ai/claude-code@2.1.197", "@openai/codex@0.171.0", "opencode-ai@1.18.33")
ANSWER = "The scripted answer: 42."
THINK = ["<think>", "\nLet me see.\n", "</think>", "\n\n"]


def _call(name, arguments):
    return ["<tool_call>", "\n" + json.dumps({"name": name, "arguments": arguments}) + "\n", "</tool_call>"]


@pytest.fixture(scope="module")
def agents():
    """The bin folder of the npm packages, installed once under the cache; a skip when npm cannot."""
    prefix = CACHE / "agents" / "-".join(p.rsplit("@", 1)[1] for p in PACKAGES)
    bin_dir = prefix / "node_modules" / ".bin"
    if not all((bin_dir / tool).exists() for tool in ("claude", "codex", "opencode")):
        if not shutil.which("npm"):
            pytest.skip("npm is not installed: the coding agents come from npm")
        try:
            out = subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--prefix", str(prefix)]
                                 + list(PACKAGES), capture_output=True, text=True, timeout=120)
        except subprocess.TimeoutExpired:
            pytest.skip("npm install of %s took over 120 s (registry unreachable?)" % " ".join(PACKAGES))
        if out.returncode or not all((bin_dir / tool).exists() for tool in ("claude", "codex", "opencode")):
            pytest.skip("npm could not install %s (registry unreachable?): %s"
                        % (" ".join(PACKAGES), out.stderr.strip()[-300:]))
    return bin_dir


@pytest.fixture(scope="module")
def lab(tmp_path_factory, llama_server_bin):
    """A real server with a 128k context and the scripted models; its HOME (where the agents keep
    their settings) and a work folder for what their tools write."""
    home, work = tmp_path_factory.mktemp("agent-home"), tmp_path_factory.mktemp("agent-work")
    models = {"answer": THINK + [ANSWER],
              "writer": THINK + _call("Write", {"file_path": str(work / "made-by-claude.txt"),
                                                "content": "made by claude\n"}),
              "runner": THINK + _call("exec_command", {"cmd": "echo made by codex > made-by-codex.txt"})}
    config = ollama.Config({"HOME": str(home), "OLLAMA_CONTEXT_LENGTH": "131072", "OLLAMA_MAX_LOADED_MODELS": "4",
                            "OLLAMA_LLAMA_SERVER": str(llama_server_bin)})
    srv = ollama.make_server(config, "127.0.0.1", 0)
    template = (fixtures.llama_cpp_source(CACHE) / "models" / "templates" / "Qwen-Qwen3-0.6B.jinja").read_text()
    for name, script in models.items():
        gguf = fixtures.write_scripted_gguf(home / (name + ".gguf"), script, template, context_length=262144)
        import_gguf(srv.store, name, gguf)
    with fixtures.serving(srv):
        srv.home, srv.work = home, work
        yield srv


def launch(lab, agents, *argv, wait_for=None, timeout=240):
    """Run `ollama.py launch ARGV` in the work folder; (exit status, output). With `wait_for` (a file),
    stop the agent once that file is there (or at the timeout), and the status is None."""
    env = dict(os.environ, HOME=str(lab.home), OLLAMA_HOST=lab.url, PATH=str(agents) + os.pathsep + os.environ["PATH"])
    proc = subprocess.Popen([sys.executable, str(ROOT / "ollama.py"), "launch"] + list(argv), cwd=str(lab.work),
                            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        if wait_for is None:
            out, _ = proc.communicate(timeout=timeout)
            return proc.returncode, out
        deadline = time.monotonic() + timeout
        while not wait_for.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(0.5)                                      # the file written, not just created
        return None, ""
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()


def test_claude_code_prints_the_models_answer(lab, agents):
    status, out = launch(lab, agents, "claude", "--model", "answer", "--", "-p", "Say something.")
    assert status == 0, out
    assert ANSWER in out and "Let me see." not in out                 # the thinking stays hidden
    assert "Launching Claude Code on answer:latest (context 131072 tokens)" in out


def test_claude_codes_write_tool_call_leaves_the_file(lab, agents):
    target = lab.work / "made-by-claude.txt"
    # A small prompt (one tool, a short system prompt) and one turn: the scripted model writes again.
    status, out = launch(lab, agents, "claude", "--model", "writer", "--", "-p", "Make the file.", "--max-turns", "1",
                         "--tools", "Write", "--system-prompt", "You write files.", "--permission-mode", "acceptEdits")
    assert target.read_text() == "made by claude\n", out


def test_codex_prints_the_models_answer(lab, agents):
    # `answer`, not `answer:latest`: launch names it as /api/tags lists it, or Codex would pull it.
    status, out = launch(lab, agents, "codex", "--model", "answer", "--", "exec", "--skip-git-repo-check", "Say it.")
    assert status == 0, out
    assert ANSWER in out and "model: answer:latest" in out and "provider: ollama" in out


def test_codexs_exec_command_tool_call_leaves_the_file(lab, agents):
    target = lab.work / "made-by-codex.txt"
    launch(lab, agents, "codex", "--model", "runner", "--", "exec", "--skip-git-repo-check",
           "--dangerously-bypass-approvals-and-sandbox", "Make the file.", wait_for=target)
    assert target.read_text() == "made by codex\n"


def test_opencode_prints_the_models_answer(lab, agents):
    status, out = launch(lab, agents, "opencode", "--model", "answer", "--", "run", "Say something.")
    assert status == 0, out
    assert ANSWER in out and "answer:latest" in out


def test_config_writes_the_tools_settings_that_the_tools_then_use_and_restore_takes_only_them_out(lab, agents):
    claude, codex = lab.home / ".claude" / "settings.json", lab.home / ".codex" / "ollama-py.config.toml"
    claude.parent.mkdir(exist_ok=True)
    claude.write_text(json.dumps({"theme": "dark", "env": {"MINE": "1"}}))
    for tool in ("claude", "codex"):
        status, out = launch(lab, agents, tool, "--model", "answer", "--config")
        assert status == 0 and "Wrote " in out, out
    env = json.loads(claude.read_text())["env"]
    assert env["ANTHROPIC_BASE_URL"] == lab.url and env["ANTHROPIC_DEFAULT_HAIKU_MODEL"] == "answer:latest"
    assert env["CLAUDE_CODE_SUBAGENT_MODEL"] == "answer:latest" and env["MINE"] == "1"
    assert env["CLAUDE_CODE_AUTO_COMPACT_WINDOW"] == "131072"
    assert 'base_url = "%s/v1"' % lab.url in codex.read_text()
    # The tools themselves, started plainly, find the server through what was written (the prompts
    # are those of the tests above, so the runner has them cached).
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "OLLAMA_", "CODEX_"))}
    env = dict(clean, HOME=str(lab.home), PATH=str(agents) + os.pathsep + os.environ["PATH"])
    for argv in (["claude", "-p", "Say something."], ["codex", "exec", "--profile", "ollama-py",
                                                      "--skip-git-repo-check", "Say it."]):
        out = subprocess.run(argv, cwd=str(lab.work), env=env, stdin=subprocess.DEVNULL, capture_output=True,
                             text=True, timeout=240)
        assert out.returncode == 0 and ANSWER in out.stdout, (argv[0], out.stdout[-2000:], out.stderr[-2000:])
    for tool in ("claude", "codex"):
        assert launch(lab, agents, tool, "--restore")[0] == 0
    assert json.loads(claude.read_text()) == {"theme": "dark", "env": {"MINE": "1"}}
    assert not codex.exists()


def test_a_missing_tool_gets_its_npm_install_command(tmp_path):
    if shutil.which("codex", path="/usr/bin:/bin"):
        pytest.skip("codex is installed system-wide")
    out = subprocess.run([sys.executable, str(ROOT / "ollama.py"), "launch", "codex"], capture_output=True, text=True,
                         env=dict(os.environ, PATH="/usr/bin:/bin", HOME=str(tmp_path)), timeout=60)
    assert out.returncode == 1
    assert "Codex is not installed" in out.stderr and "npm install -g @openai/codex" in out.stderr


def test_launch_refuses_a_context_too_small_for_an_agent_and_says_what_to_set(server, engine, tmp_path):
    text = "{% for m in messages %}{{ m.content }}{% endfor %}"
    import_gguf(server.store, "small", fixtures.write_scripted_gguf(tmp_path / "s.gguf", ["ok"], text,
                                                                      context_length=262144))
    out = subprocess.run([sys.executable, str(ROOT / "ollama.py"), "launch", "claude", "--model", "small", "--config"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1, out.stderr
    assert "small:latest runs with a 4096-token context here" in out.stderr
    assert "OLLAMA_CONTEXT_LENGTH=32768" in out.stderr and "PARAMETER num_ctx 32768" in out.stderr
    assert not (Path(os.environ["HOME"]) / ".claude" / "settings.json").exists()
