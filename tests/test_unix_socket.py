"""OLLAMA_HOST=unix:PATH: serve on a private Unix socket only, the CLI and the official client over it,
the socket's owner trusted by SO_PEERCRED, and another user on the box kept out."""
import grp
import hashlib
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
import textwrap
import uuid
from pathlib import Path

import pytest

import fixtures
import ollama
from test_inference import import_gguf

ROOT = Path(__file__).resolve().parent.parent
OLLAMA_PY = str(ROOT / "ollama.py")


@pytest.fixture
def sock_path(tmp_path, monkeypatch):
    path = tmp_path / "run" / "ollama.sock"          # its directory is made by serve
    monkeypatch.setenv("OLLAMA_HOST", "unix:" + str(path))
    return path


@pytest.fixture
def unix_server(sock_path):
    with fixtures.serving(ollama.make_server(ollama.Config())) as srv:
        yield srv


def cli(*args, env=None, user=None, python=sys.executable):
    program = OLLAMA_PY
    if user is not None:              # the checkout may sit in a folder only its owner enters (mktemp -d)
        program = os.path.join(tempfile.mkdtemp(prefix="ollama-py-"), "ollama.py")
        shutil.copy(OLLAMA_PY, program)
        os.chmod(os.path.dirname(program), 0o755)
        os.chmod(program, 0o644)
    try:
        return subprocess.run([python, program] + list(args), capture_output=True, text=True,
                              timeout=300, env=env or dict(os.environ), user=user)
    finally:
        if program != OLLAMA_PY:
            shutil.rmtree(os.path.dirname(program), ignore_errors=True)


def world_python():
    """A Python >= 3.9 that another user may run (ours may sit in root's home), else None."""
    for path in (sys.executable, shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")):
        if path and all(os.stat(p).st_mode & 0o001 for p in _dirs_and_file(os.path.realpath(path))):
            version = subprocess.run([path, "-c", "import sys; print(sys.version_info >= (3, 9))"],
                                     capture_output=True, text=True).stdout.strip()
            if version == "True":
                return path
    return None


def _dirs_and_file(path):
    parts = Path(path).parents
    return [str(p) for p in parts] + [path]


@pytest.mark.parametrize("value, expected", [
    ("unix:/run/user/1000/ollama.sock", "/run/user/1000/ollama.sock"),
    ("unix:///run/user/1000/ollama.sock", "/run/user/1000/ollama.sock"),
    ("unix://run/ollama.sock", os.path.abspath("run/ollama.sock")),
    ("unix:ollama.sock", os.path.abspath("ollama.sock")),
    ("127.0.0.1:11434", None),
    ("http://unix:80", None),
])
def test_unix_host_spellings_name_the_socket_path(value, expected):
    assert ollama.parse_unix_host(value) == expected
    config = ollama.Config({"OLLAMA_HOST": value})
    assert config.unix == expected
    if expected:
        assert config.base_url == "unix:" + expected


def test_unix_host_without_a_path_is_an_error():
    with pytest.raises(ollama.OllamaError, match="names no socket path"):
        ollama.Config({"OLLAMA_HOST": "unix:"})


def test_serve_listens_only_on_a_0600_socket_and_the_cli_works_over_it(unix_server, sock_path):
    st = os.stat(sock_path)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.geteuid()
    assert stat.S_IMODE(os.stat(sock_path.parent).st_mode) == 0o700
    assert unix_server.socket.family == socket.AF_UNIX and unix_server.url == "unix:" + str(sock_path)
    result = cli("list")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("NAME")
    assert cli("ps").returncode == 0
    result = cli("show", "nosuch")
    assert result.returncode == 1 and "not found" in result.stderr


def test_create_over_the_socket_links_the_gguf_trusting_the_peer_uid(unix_server, sock_path):
    pytest.importorskip("gguf")
    from tiny_gguf import write_tiny_gguf         # here: the rest of this module runs with only pytest
    src = sock_path.parent.parent / "src"
    src.mkdir()
    write_tiny_gguf(src / "tiny.gguf")
    (src / "Modelfile").write_text("FROM ./tiny.gguf\n")
    result = cli("create", "sockmodel", "-f", str(src / "Modelfile"))
    assert result.returncode == 0, result.stderr
    digest = "sha256:" + hashlib.sha256((src / "tiny.gguf").read_bytes()).hexdigest()
    # linked, not uploaded: X-Ollama-Path was trusted by the peer's uid (SO_PEERCRED)
    assert os.path.samestat(unix_server.store.blob_path(digest).stat(), (src / "tiny.gguf").stat())
    result = cli("list")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("NAME") and "sockmodel:latest" in result.stdout


def test_official_client_and_run_chat_over_the_socket(engine, tiny_gguf, unix_server, sock_path):
    import_gguf(unix_server.store, "tiny", tiny_gguf, params={"seed": 1, "temperature": 0})
    out = official_over_socket(sock_path, """
        a = client.generate(model="tiny", prompt="hello", options={"num_predict": 4})
        c = client.chat(model="tiny", messages=[{"role": "user", "content": "hi"}], options={"num_predict": 3})
        print(json.dumps([[m.model for m in client.list().models], a.done, a.eval_count, c.done, c.eval_count]))
    """)
    assert out == [["tiny:latest"], True, 4, True, 3]
    result = cli("run", "tiny", "hello", "--verbose")
    assert result.returncode == 0, result.stderr
    assert "eval count:" in result.stderr
    assert "tiny:latest" in cli("ps").stdout


def official_over_socket(sock_path, code):
    """Run `code` with the pip-installed `ollama` client on the socket (an httpx transport with uds=, as
    docs/security.md shows) bound to `client`; what it prints, as JSON. `-I`: our ollama.py off sys.path."""
    script = ("import json, httpx, ollama\nclient = ollama.Client(host='http://localhost', "
              "transport=httpx.HTTPTransport(uds=%r))\n%s" % (str(sock_path), textwrap.dedent(code)))
    out = subprocess.run([sys.executable, "-I", "-c", script], capture_output=True, text=True, timeout=300,
                         cwd=tempfile.gettempdir())
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)


def test_a_stale_socket_is_taken_over_and_a_live_one_refused(sock_path):
    sock_path.parent.mkdir(mode=0o700)
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)    # what a SIGKILLed serve leaves behind
    dead.bind(str(sock_path))
    dead.listen(1)
    dead.close()
    assert stat.S_ISSOCK(os.lstat(sock_path).st_mode)
    with fixtures.serving(ollama.make_server(ollama.Config())):
        assert ollama.Client("unix:" + str(sock_path)).call("GET", "/api/version")["version"]
        with pytest.raises(ollama.OllamaError, match="another server is already listening"):
            ollama.make_server(ollama.Config())
        result = cli("serve")
        assert result.returncode == 1
        assert "cannot listen on %s: another server is already listening" % sock_path in result.stderr
        assert ollama.Client("unix:" + str(sock_path)).call("GET", "/api/tags") == {"models": []}
    assert not sock_path.exists()                  # a clean stop removes its socket


def test_a_file_that_is_not_a_socket_is_never_removed(sock_path):
    sock_path.parent.mkdir()
    sock_path.write_text("precious")
    with pytest.raises(ollama.OllamaError, match="not a socket"):
        ollama.make_server(ollama.Config())
    assert sock_path.read_text() == "precious"


def test_socket_group_makes_it_0660_for_that_group(sock_path, monkeypatch):
    group = grp.getgrgid(os.getegid()).gr_name
    monkeypatch.setenv("OLLAMA_SOCKET_GROUP", group)
    with fixtures.serving(ollama.make_server(ollama.Config())):
        st = os.stat(sock_path)
        assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == os.getegid()
    monkeypatch.setenv("OLLAMA_SOCKET_GROUP", "no-such-group-%s" % uuid.uuid4().hex[:8])
    with pytest.raises(ollama.OllamaError, match="OLLAMA_SOCKET_GROUP=no-such-group-.*: no such group"):
        ollama.make_server(ollama.Config())


def test_cli_without_a_server_on_the_socket_says_how_to_start_it(sock_path):
    result = cli("list")
    assert result.returncode == 1 and "run 'ollama.py serve' to start it" in result.stderr


def test_more_connections_on_the_socket_than_a_network_peer_may_hold_are_all_served(unix_server, sock_path):
    """A Unix socket's clients are this machine's users, like loopback's: the per-peer cap for network
    peers is not theirs, and each connection is one of its own (they all share one 'address')."""
    conns = []
    try:
        for _ in range(ollama.MAX_PEER_CONNECTIONS + 6):
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            c.connect(str(sock_path))
            conns.append(c)
        for c in conns:
            c.sendall(b"GET /api/version HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        answers = []
        for c in conns:
            c.settimeout(30)
            answers.append(b"".join(iter(lambda c=c: c.recv(65536), b"")).split(b"\r\n", 1)[0])
        assert set(answers) == {b"HTTP/1.1 200 OK"}
    finally:
        for c in conns:
            c.close()


def _raw_request(path, method, target, headers):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(path))
    s.sendall(("%s %s HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\nConnection: close\r\n%s\r\n" % (
        method, target, "".join("%s: %s\r\n" % kv for kv in headers.items()))).encode())
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    s.close()
    return int(data.split()[1]), data.split(b"\r\n\r\n", 1)[1]


@pytest.fixture
def other_user():
    """A throwaway second user (only as root: useradd); removed afterwards."""
    if os.geteuid() != 0 or not shutil.which("useradd"):
        pytest.skip("a second user needs root (useradd); run as root to test another user on the box")
    name = "ollt%s" % uuid.uuid4().hex[:8]
    subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", name], check=True)
    try:
        import pwd
        python = world_python()
        if python is None:
            pytest.skip("no Python >= 3.9 that another user may run")
        yield pwd.getpwnam(name), python
    finally:
        subprocess.run(["userdel", name], check=False)


@pytest.fixture
def public_dir():
    """A directory every user can pass through (pytest's tmp dirs are 0700: they would hide the socket
    from another user for a reason that is not the socket's own mode)."""
    path = Path(tempfile.mkdtemp(prefix="ollama-sock-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_another_user_gets_a_permission_error_and_nothing_of_the_store(other_user, public_dir, monkeypatch,
                                                                       tiny_gguf):
    sock = public_dir / "ollama.sock"
    monkeypatch.setenv("OLLAMA_HOST", "unix:" + str(sock))
    with fixtures.serving(ollama.make_server(ollama.Config())) as srv:
        import_gguf(srv.store, "secret-model", tiny_gguf)
        home = public_dir / "otherhome"
        home.mkdir(mode=0o777)
        home.chmod(0o777)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "OLLAMA_HOST": "unix:" + str(sock)}
        result = cli("list", env=env, user=other_user[0].pw_uid, python=other_user[1])
        assert result.returncode == 1
        assert "permission denied" in result.stderr and str(sock) in result.stderr
        assert "secret-model" not in result.stdout + result.stderr
        owner = cli("list")                                  # the owner, meanwhile, is served
        assert owner.returncode == 0 and "secret-model" in owner.stdout


def test_path_import_trusts_only_the_servers_uid_by_peer_credentials(other_user, public_dir, monkeypatch):
    sock = public_dir / "ollama.sock"
    monkeypatch.setenv("OLLAMA_HOST", "unix:" + str(sock))
    blob = public_dir / "weights.bin"
    blob.write_bytes(b"some weights")
    blob.chmod(0o644)
    digest = "sha256:" + hashlib.sha256(b"some weights").hexdigest()
    with fixtures.serving(ollama.make_server(ollama.Config())) as srv:
        sock.chmod(0o666)          # opened up by hand: the header must still trust the owner alone
        probe = ("import socket,sys\n"
                 "s=socket.socket(socket.AF_UNIX);s.connect(sys.argv[1])\n"
                 "s.sendall(('POST /api/blobs/%s HTTP/1.1\\r\\nHost: localhost\\r\\nContent-Length: 0\\r\\n'"
                 "'X-Ollama-Path: %s\\r\\nConnection: close\\r\\n\\r\\n'%(sys.argv[2],sys.argv[3])).encode())\n"
                 "d=b''\n"
                 "while True:\n c=s.recv(65536)\n if not c: break\n d+=c\n"
                 "sys.stdout.write(d.decode())\n")
        other = subprocess.run([other_user[1], "-c", probe, str(sock), digest, str(blob)], capture_output=True,
                               text=True, timeout=60, user=other_user[0].pw_uid, env={"HOME": str(public_dir)})
        assert other.stdout.startswith("HTTP/1.1 403"), other.stdout + other.stderr
        assert "only honoured for a local client running as the server's user" in other.stdout
        assert not srv.store.has_blob(digest)
        status, body = _raw_request(sock, "POST", "/api/blobs/" + digest, {"X-Ollama-Path": str(blob)})
        assert status == 201, body
        assert srv.store.has_blob(digest)


def test_the_socket_of_a_sigkilled_serve_is_taken_over_by_the_next(sock_path):
    first = subprocess.Popen([sys.executable, OLLAMA_PY, "serve"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = ollama.Client("unix:" + str(sock_path))
        deadline = time.monotonic() + 30
        while True:
            try:
                client.heartbeat()
                break
            except ollama.OllamaError:
                assert time.monotonic() < deadline and first.poll() is None, "serve did not start"
                time.sleep(0.05)
    finally:
        first.kill()
        first.wait()
    assert stat.S_ISSOCK(os.lstat(sock_path).st_mode)          # left behind: nothing removed it
    with fixtures.serving(ollama.make_server(ollama.Config())):
        assert client.call("GET", "/api/tags") == {"models": []}
