"""The CLI's `run`, `ps` and `stop` as a user meets them: `python3 ollama.py ...` in a subprocess against
a real server with the real Gemma 3 270M (a base model, so answers are short completions), and the
interactive prompt driven through a pseudo-terminal."""
import fcntl
import io
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import pytest

import ollama
from test_inference import import_gguf

OLLAMA_PY = str(Path(ollama.__file__).resolve())
MODEL = "gemma3:270m"


class Spy:
    """Wraps a real streaming handler: records each request body, the text the server streamed back
    and whether the stream reached done (or was closed early), without changing what is sent."""

    def __init__(self, handler, field):
        self.handler, self.field = handler, field
        self.bodies, self.replies = [], {}
        self.first_chunk = threading.Event()
        self.closed = {}                     # call index -> Event set once the stream is finished

    def __call__(self, req):
        self.bodies.append(req.json())
        i = len(self.bodies) - 1
        self.closed[i] = threading.Event()
        result = self.handler(req)
        if isinstance(result, ollama.Stream):
            result.items = self._watch(result.items, i)
        else:
            self.closed[i].set()
        return result

    def _text(self, chunk):
        return chunk["message"].get("content", "") if self.field == "message" else chunk.get("response", "")

    def _watch(self, items, i):
        text, done, final = [], False, None
        try:
            for chunk in items:
                text.append(self._text(chunk))
                done = done or bool(chunk.get("done"))
                final = chunk
                yield chunk
                self.first_chunk.set()
        finally:
            items.close()
            self.replies[i] = ("".join(text), done, final if done else None)
            self.closed[i].set()


@pytest.fixture
def model(server, gemma_gguf, llama_server_bin):
    """Gemma 3 270M in the store, answers capped at 8 tokens by its params layer."""
    server.scheduler.exe = str(llama_server_bin)
    import_gguf(server.store, MODEL, gemma_gguf, params={"stop": ["<end_of_turn>"], "num_predict": 8})
    return MODEL


@pytest.fixture
def spies(server):
    """Spies on /api/generate and /api/chat."""
    gen, chat = Spy(ollama.api_generate, "response"), Spy(ollama.api_chat, "message")
    handlers = {"/api/generate": gen, "/api/chat": chat}
    server.routes = ollama.Routes([(m, p, handlers.get(p, h)) for m, p, h in ollama.ROUTES])
    return gen, chat


def cli(*args, stdin=""):
    """Run `python3 ollama.py ARGS` (stdin a pipe) and return the CompletedProcess."""
    return subprocess.run([sys.executable, OLLAMA_PY] + list(args), input=stdin, capture_output=True,
                          text=True, timeout=180)


def test_run_prompt_prints_streamed_answer_and_verbose_stats(model, spies):
    gen, _ = spies
    r = cli("run", model, "The capital of France is", "--verbose")
    assert r.returncode == 0, r.stderr
    assert gen.bodies[-1]["prompt"] == "The capital of France is"
    text, done, final = gen.replies[len(gen.bodies) - 1]
    assert done and text.strip()
    assert r.stdout == text + "\n\n"                      # every streamed piece, in order, then a blank line
    stats = r.stderr.splitlines()
    assert stats[0] == "total duration:       " + ollama.format_duration(final["total_duration"] / 1e9)
    assert stats[1] == "load duration:        " + ollama.format_duration(final["load_duration"] / 1e9)
    assert stats[2] == "prompt eval count:    %d token(s)" % final["prompt_eval_count"]
    assert re.fullmatch(r"prompt eval duration: [0-9.]+(ms|s)", stats[3])
    assert re.fullmatch(r"prompt eval rate:     \d+\.\d\d tokens/s", stats[4])
    assert stats[5] == "eval count:           %d token(s)" % final["eval_count"]
    assert re.fullmatch(r"eval duration:        [0-9.]+(ms|s)", stats[6])
    assert stats[7] == "eval rate:            %.2f tokens/s" % (
        final["eval_count"] / (final["eval_duration"] / 1e9))
    assert len(stats) == 8


def test_run_prepends_piped_stdin_to_prompt(model, spies):
    gen, _ = spies
    r = cli("run", model, "and then", stdin="Once upon a time\n")
    assert r.returncode == 0, r.stderr
    assert gen.bodies[-1]["prompt"] == "Once upon a time\n and then"
    assert r.stdout == gen.replies[len(gen.bodies) - 1][0] + "\n\n"
    assert r.stderr == ""                                 # no stats without --verbose


def test_run_unknown_model_tries_to_pull_and_fails(server, spies):
    # a registry on a closed local port: whatever the pull API does, it can only fail
    r = cli("run", "127.0.0.1:9/library/nope:latest", "hi", "--insecure")
    assert r.returncode == 1
    assert r.stderr.splitlines()[-1].startswith("Error: pull model manifest: ") and r.stdout == ""
    assert spies[0].bodies == []                          # nothing was generated


def test_run_rejects_bad_keepalive(model, spies):
    r = cli("run", model, "hi", "--keepalive", "5")
    assert (r.returncode, r.stderr) == (1, 'Error: time: missing unit in duration "5"\n')


def test_ps_lists_loaded_model_and_stop_unloads_it(model, spies, client):
    assert cli("run", model, "Hello", "--keepalive", "1h").returncode == 0
    assert spies[0].bodies[-1]["keep_alive"] == "1h0m0s"
    running = client.call("GET", "/api/ps")["models"][0]
    r = cli("ps")
    assert r.returncode == 0, r.stderr
    header, row = r.stdout.splitlines()
    assert header.startswith("NAME           ID              SIZE      PROCESSOR    CONTEXT    UNTIL")
    assert re.split(r"\s{4,}", row.strip()) == [
        MODEL, running["digest"][:12], ollama.human_bytes(running["size"]), "100% CPU",
        str(running["context_length"]), "59 minutes from now"]

    r = cli("stop", model)
    assert (r.returncode, r.stderr) == (0, "")
    assert spies[0].bodies[-1] == {"model": model, "keep_alive": 0}
    assert client.call("GET", "/api/ps")["models"] == []
    assert cli("ps").stdout == "NAME    ID    SIZE    PROCESSOR    CONTEXT    UNTIL    \n"


def test_stop_of_model_not_running_is_an_error(model, spies):
    r = cli("stop", model)
    assert (r.returncode, r.stderr) == (1, 'Error: couldn\'t find model "%s" to stop\n' % model)
    assert spies[0].bodies == []


def test_ps_shows_forever_for_negative_keepalive(model, spies):
    assert cli("run", model, "Hi", "--keepalive=-1m").returncode == 0
    assert spies[0].bodies[-1]["keep_alive"] == -1
    assert re.split(r"\s{4,}", cli("ps").stdout.splitlines()[1].strip())[-1] == "Forever"


class Terminal:
    """`python3 ollama.py ARGS` on a pseudo-terminal (its controlling tty, 200 columns wide)."""

    def __init__(self, args, env):
        pid, fd = pty.fork()
        if pid == 0:                                       # child: exec at once
            os.execve(sys.executable, [sys.executable, OLLAMA_PY] + args, env)
        self.pid, self.fd = pid, fd
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
        self.out, self.pos = "", 0
        self.status = None

    def send(self, text):
        os.write(self.fd, text.encode())

    def line(self, text):
        self.send(text + "\r")

    def expect(self, pattern, timeout=60):
        """Wait for `pattern` (a regex) in the output after the last match; returns the text between."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            m = regex.search(self.out, self.pos)
            if m:
                before, self.pos = self.out[self.pos:m.start()], m.end()
                return before
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.fd], [], [], left)[0]:
                raise AssertionError("no %r in %r" % (pattern, self.out[self.pos:]))
            try:
                data = os.read(self.fd, 65536)
            except OSError:                                 # EIO: the child has gone
                data = b""
            if not data:
                raise AssertionError("exited before %r; output %r" % (pattern, self.out[self.pos:]))
            self.out += data.decode(errors="replace").replace("\r\n", "\n")

    def wait(self):
        while select.select([self.fd], [], [], 5)[0]:
            try:
                if not os.read(self.fd, 65536):
                    break
            except OSError:
                break
        status = os.waitpid(self.pid, 0)[1]
        self.status = os.WEXITSTATUS(status) if os.WIFEXITED(status) else -1
        return self.status

    def close(self):
        """Kill the child if it is still running (a failed test), and release the terminal."""
        if self.status is None:
            os.kill(self.pid, 9)
            os.waitpid(self.pid, 0)
        os.close(self.fd)


def test_repl_chats_and_handles_commands(model, spies, ollama_home):
    gen, chat = spies
    term = Terminal(["run", model], dict(os.environ, TERM="dumb"))
    try:
        term.expect(r">>> ")
        assert gen.bodies == [{"model": model}]            # the model was loaded with an empty generate

        term.line("/set parameter num_predict 8")
        term.expect(r"Set parameter 'num_predict' to '8'\n>>> ")

        term.line("Why is the sky blue?")
        term.expect(r">>> ")
        assert chat.bodies[0]["messages"] == [{"role": "user", "content": "Why is the sky blue?"}]
        assert chat.bodies[0]["options"] == {"num_predict": 8}
        first_reply = chat.replies[0][0]

        term.line("/set verbose")
        term.expect(r"Set 'verbose' mode\.\n>>> ")
        term.line("Tell me more.")
        shown = term.expect(r"eval rate:            \d+\.\d\d tokens/s\n>>> ")
        assert "total duration:       " in shown and "prompt eval count:    " in shown
        assert chat.bodies[1]["messages"] == [       # the conversation is kept
            {"role": "user", "content": "Why is the sky blue?"},
            {"role": "assistant", "content": first_reply},
            {"role": "user", "content": "Tell me more."}]
        term.line("/set quiet")
        term.expect(r"Set 'quiet' mode\.\n>>> ")

        term.line('"""First line')
        term.expect(r"\.\.\. ")
        term.line('second line"""')
        term.expect(r">>> ")
        assert chat.bodies[2]["messages"][-1] == {"role": "user", "content": "First line\nsecond line"}

        term.line("/set system You are a pirate.")
        term.expect(r"Set system message\.\n>>> ")
        term.line("/show system")
        term.expect(r"You are a pirate\.\n\n>>> ")
        term.line("/show parameters")
        shown = term.expect(r">>> ")
        assert "Model defined parameters:" in shown
        assert re.search(r"User defined parameters:\n  num_predict +8\n", shown)

        term.line("/clear")
        term.expect(r"Cleared session context\n>>> ")
        term.line("Hello")
        term.expect(r">>> ")
        assert chat.bodies[3]["messages"] == [{"role": "system", "content": "You are a pirate."},
                                              {"role": "user", "content": "Hello"}]

        term.line("/nope")
        term.expect(r"Unknown command '/nope'\. Type /\? for help\n>>> ")
        term.line("/?")
        term.expect(r"Available Commands:\n  /set            Set session variables\n")
        term.expect(r"Use \"\"\" to begin a multi-line message\.\n\n>>> ")
        term.line("/show info")
        term.expect(r"  Model\n    architecture +gemma3 *\n[\s\S]*?  Capabilities\n    completion *\n[\s\S]*?>>> ")
        term.line("/load nope")
        term.expect(r"Loading model 'nope'\nCouldn't find model 'nope'\n>>> ")

        # Ctrl+C while the model is answering stops that answer and returns to the prompt
        term.line("/set parameter num_predict 400")
        term.expect(r">>> ")
        chat.first_chunk.clear()
        term.line("Write a long story about the sea.")
        assert chat.first_chunk.wait(120)
        term.send("\x03")
        term.expect(r">>> ")
        assert chat.closed[4].wait(30)
        assert chat.replies[4][1] is False                 # the stream was cut, not finished

        term.send("\x03")                                  # Ctrl+C at an empty prompt
        term.expect(r"Use Ctrl \+ d or /bye to exit\.\n>>> ")

        term.line("/bye")
        assert term.wait() == 0
    finally:
        term.close()
    history = (ollama_home / ".ollama" / "history").read_text().splitlines()
    assert history[:3] == ["/set parameter num_predict 8", "Why is the sky blue?", "/set verbose"]
    assert history[-1] == "/bye"


def test_repl_multiline_system_ctrl_d_and_nohistory(model, spies, ollama_home):
    term = Terminal(["run", model], dict(os.environ, TERM="dumb", OLLAMA_NOHISTORY="1"))
    try:
        term.expect(r">>> ")
        term.line("/set format json")
        term.expect(r"Set format to 'json' mode\.\n>>> ")
        term.line('/set system """You are')
        term.expect(r"\.\.\. ")
        term.line('a pirate."""')
        term.expect(r"Set system message\.\n>>> ")
        term.line("/show system")
        term.expect(r"You are\na pirate\.\n\n>>> ")
        term.send("\x04")                                  # Ctrl+D
        assert term.wait() == 0
    finally:
        term.close()
    assert not (ollama_home / ".ollama" / "history").exists()


def test_repl_save_creates_model_with_session(model, spies, client):
    term = Terminal(["run", model], dict(os.environ, TERM="dumb"))
    try:
        term.expect(r">>> ")
        term.line("/set system Be brief.")
        term.expect(r"Set system message\.\n>>> ")
        term.line("/set parameter temperature 0.5")
        term.expect(r">>> ")
        term.line("/save brief")
        term.expect(r"Created new model 'brief'\n>>> ")
        term.line("/bye")
        assert term.wait() == 0
    finally:
        term.close()
    shown = client.call("POST", "/api/show", {"model": "brief"})
    assert shown["system"] == "Be brief." and "temperature" in shown["parameters"]


def test_commands_without_server_say_how_to_start_it(ollama_home, monkeypatch):
    monkeypatch.setenv("OLLAMA_HOST", "127.0.0.1:9")
    for args in (["ps"], ["stop", MODEL], ["run", MODEL, "hi"]):
        r = cli(*args)
        assert (r.returncode, r.stderr) == (
            1, "Error: could not connect to ollama server, run 'ollama.py serve' to start it\n")


# -- pieces, without a model --------------------------------------------------

def test_thinking_is_framed_and_can_be_hidden(capsys):
    opts = ollama._RunOptions(MODEL)
    out = ollama._Streamer(opts)                          # stdout is captured: plain text
    for thinking, content in (("Let me", ""), (" see.", ""), ("", "Blue."), ("", " Done")):
        out.feed(thinking, content)
    assert capsys.readouterr().out == "Thinking...\nLet me see.\n...done thinking.\n\nBlue. Done"
    opts.hide_thinking = True
    out = ollama._Streamer(opts)
    out.feed("hmm", "")
    out.feed("", "Blue.")
    assert capsys.readouterr().out == "Blue."


@pytest.mark.parametrize("value, expected", [
    ("", True), ("true", True), ("false", False), ("high", "high"),
    ("loud", 'invalid value for --think: "loud" (must be true, false, high, medium, low, or max)'),
])
def test_think_flag_values(value, expected):
    try:
        assert ollama._think_option(value) == expected
    except ollama.OllamaError as e:
        assert str(e) == expected


def test_wordwrap_moves_the_word_that_would_cross_the_margin():
    out = io.StringIO()
    display = ollama._Display(width=20, out=out)          # wrap before column 15
    for piece in ["The quick", " brownie", " fox"]:
        display.write(piece)
    assert out.getvalue() == "The quick brown\x1b[5D\x1b[K\nbrownie fox"
    plain = io.StringIO()
    ollama._Display(width=0, out=plain).write("The quick brown fox jumps over")
    assert plain.getvalue() == "The quick brown fox jumps over"


@pytest.mark.parametrize("text, expected", [
    ("2024-05-01T10:00:00Z", 1714557600.0),
    ("2024-05-01T12:00:00+02:00", 1714557600.0),
    ("2024-05-01T10:00:00.123456789Z", 1714557600.123456789),
    ("2024-05-01T04:30:00.5-05:30", 1714557600.5),
    ("0001-01-01T00:00:00Z", None),
    ("yesterday", None),
])
def test_rfc3339_parser_takes_z_offsets_and_nanoseconds(text, expected):
    got = ollama._parse_rfc3339(text)
    assert got == expected if expected is None else abs(got - expected) < 1e-6


@pytest.mark.parametrize("key, values, expected", [
    ("num_predict", ["8"], 8),
    ("temperature", ["0.5"], 0.5),
    ("use_mmap", ["false"], False),
    ("stop", ["<a>", "<b>"], ["<a>", "<b>"]),
    ("num_ctx", ["big"], "invalid int value [big]"),
    ("flux", ["1"], "unknown parameter 'flux'"),
])
def test_set_parameter_types_values_like_ollama(key, values, expected):
    try:
        assert ollama.format_param(key, values) == expected
    except ollama.BadRequest as e:
        assert str(e) == expected


def test_table_pads_columns_like_tablewriter():
    assert ollama._table([["gemma3:270m", "abc"]], ["NAME", "ID"]) == \
        "NAME           ID     \ngemma3:270m    abc    \n"


@pytest.mark.parametrize("line, state, out", [
    ("/set nohistory", {"history": False}, ""),
    ("/set history", {"history": True}, ""),
    ("/set nowordwrap", {"wordwrap": False}, "Set 'nowordwrap' mode.\n"),
    ("/set verbose", {"verbose": True}, "Set 'verbose' mode.\n"),
    ("/set quiet", {"verbose": False}, "Set 'quiet' mode.\n"),
    ("/set think high", {"think": "high", "think_explicit": True}, "Set 'think' mode to 'high'.\n"),
    ("/set think", {"think": True, "think_explicit": True}, "Set 'think' mode.\n"),
    ("/set nothink", {"think": False, "think_explicit": True}, "Set 'nothink' mode.\n"),
    ("/set format json", {"format": "json"}, "Set format to 'json' mode.\n"),
    ("/set format xml", {"format": ""}, "Invalid or missing format. For 'json' mode use '/set format json'\n"),
    ("/set noformat", {"format": ""}, "Disabled format.\n"),
    ("/set parameter top_k 5", {"options": {"top_k": 5}}, "Set parameter 'top_k' to '5'\n"),
    ("/set parameter stop a b", {"options": {"stop": ["a", "b"]}}, "Set parameter 'stop' to 'a, b'\n"),
    ("/set parameter top_k x", {"options": {}}, 'Couldn\'t set parameter: "invalid int value [x]"\n'),
    ("/set system Be brief.", {"system": "Be brief.", "messages": [{"role": "system", "content": "Be brief."}]},
     "Set system message.\n"),
    ('/set system """Be', {"system": "", "multiline": "system", "buf": ["Be\n"]}, ""),
    ("/set bogus", {}, "Unknown command '/set bogus'. Type /? for help\n"),
])
def test_repl_set_changes_the_session_and_says_so(line, state, out, capsys):
    repl = ollama._Repl(None, ollama._RunOptions("m"))
    repl.command(line)
    seen = dict(vars(repl.opts), history=repl.reader.enabled, multiline=repl.multiline, buf=repl.buf)
    assert {k: seen[k] for k in state} == state
    assert capsys.readouterr().out == out
