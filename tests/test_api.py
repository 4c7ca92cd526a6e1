"""HTTP API conventions: heartbeat, version, unknown routes, methods, host checks."""
import errno
import http.client
import http.server
import json
import socket
import threading
import time

import pytest

import ollama


def _request(server, method, path, body=None, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", server.server_port, timeout=10)
    conn.request(method, path, body=body, headers=headers or {})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp, data


def test_root_says_ollama_is_running(server):
    resp, data = _request(server, "GET", "/")
    assert resp.status == 200 and data == b"Ollama is running"
    resp, data = _request(server, "HEAD", "/")
    assert resp.status == 200 and data == b""


def test_version_is_the_ollama_api_we_implement_with_ours_beside_it(server):
    import ollama
    resp, data = _request(server, "GET", "/api/version")
    assert resp.status == 200
    assert json.loads(data) == {"version": ollama.API_VERSION, "ollama_py": ollama.__version__}
    major, minor, patch = (int(x) for x in ollama.API_VERSION.split("."))
    assert (major, minor, patch) >= (0, 14, 0)         # /v1/messages came with 0.14.0; Codex wants >= 0.13.4


def test_version_through_the_official_client(server):
    import subprocess
    import sys
    from test_embed import official_ollama
    if subprocess.run([sys.executable, "-I", "-c", "import ollama"], cwd="/").returncode:
        pytest.skip("needs the official ollama package")
    # The client has no version(); its own request path (host parsing, headers, errors) is what a tool uses.
    out = official_ollama(server, "print(json.dumps(client._request_raw('GET', '/api/version').json()))")
    assert out["version"] == ollama.API_VERSION and out["ollama_py"] == ollama.__version__


def test_unknown_route_is_gin_404(server):
    resp, data = _request(server, "GET", "/api/nope")
    assert resp.status == 404 and data == b"404 page not found"


def test_every_api_handler_is_routed_once_by_its_decorator():
    import ollama
    routed = [handler.__name__ for _method, _pattern, handler in ollama.ROUTES]
    handlers = [name for name in vars(ollama) if name.startswith(("api_", "v1_", "v2_"))]
    assert sorted(set(routed)) == sorted(handlers)
    # only the /v2 registry answers several methods (writes: UNSUPPORTED) or spellings with one handler
    assert sorted(n for n in routed if not n.startswith("v2_")) == sorted(h for h in handlers if h[:3] != "v2_")
    # + messages, responses, count_tokens, metrics, /api/rerank and /v1/rerank
    assert len({(m, p) for m, p, _h in ollama.ROUTES}) == len(ollama.ROUTES) == 39


def test_wrong_method_is_405(server):
    resp, _ = _request(server, "GET", "/api/generate")
    assert resp.status == 405


def test_foreign_host_header_is_forbidden_on_loopback(server):
    resp, _ = _request(server, "GET", "/api/version", headers={"Host": "evil.example.com"})
    assert resp.status == 403
    resp, _ = _request(server, "GET", "/api/version", headers={"Host": "localhost:11434"})
    assert resp.status == 200


def test_trace_and_unknown_methods_go_to_the_router_not_the_stdlib_501_page(server):
    resp, data = _request(server, "TRACE", "/api/tags")
    assert (resp.status, data) == (405, b"405 method not allowed")
    resp, data = _request(server, "BREW", "/nowhere")
    assert (resp.status, data) == (404, b"404 page not found")


# -- load ----------------------------------------------------------------------

def _raw(server, data, read=True):
    s = socket.create_connection(("127.0.0.1", server.server_port), timeout=10)
    s.sendall(data)
    if not read:
        return s
    out = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        out += chunk
    s.close()
    return out


def test_the_listen_backlog_is_somaxconn_like_go():
    with open("/proc/sys/net/core/somaxconn") as f:
        assert ollama.listen_backlog() == min(int(f.read()), 65535)


def test_200_concurrent_requests_are_all_answered(server):
    statuses = []

    def one():
        try:
            statuses.append(_request(server, "GET", "/api/tags")[0].status)
        except OSError as e:
            statuses.append(repr(e))

    threads = [threading.Thread(target=one) for _ in range(200)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert statuses == [200] * 200


def test_connections_over_the_cap_get_a_503_and_a_freed_slot_serves_again(server):
    # The cap counts requests in progress (see OllamaServer's "Connection slots"): three requests
    # waiting for the bodies they announced hold the three slots; idle sockets would hold none.
    server.max_connections = 3
    busy = [_raw(server, b"POST /api/show HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100\r\n\r\n{",
                 read=False) for _ in range(3)]
    deadline = time.monotonic() + 10
    while server.requests < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    resp, data = _request(server, "GET", "/api/version")
    assert resp.status == 503 and json.loads(data) == {
        "error": "server busy, please try again.  maximum connections exceeded"}
    busy.pop().close()
    while server.requests > 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _request(server, "GET", "/api/version")[0].status == 200
    for s in busy:
        s.close()


def test_500_idle_connections_do_not_starve_a_request(server):
    idle = [socket.create_connection(("127.0.0.1", server.server_port)) for _ in range(500)]
    try:
        assert _request(server, "GET", "/api/tags")[0].status == 200
    finally:
        for s in idle:
            s.close()


def test_a_request_head_sent_a_byte_at_a_time_is_closed_at_the_head_deadline(server, monkeypatch):
    monkeypatch.setattr(ollama, "HEAD_TIMEOUT", 1.0, raising=False)
    # waiting for a request's first byte is the idle timeout's business, not the head deadline's
    with socket.create_connection(("127.0.0.1", server.server_port), timeout=10) as s:
        time.sleep(1.5)
        s.sendall(b"GET /api/version HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert s.recv(65536).startswith(b"HTTP/1.1 200 ")
    # one byte every 0.2 s never stalls a read for STALL_TIMEOUT: only the deadline on the whole head ends it
    s = socket.create_connection(("127.0.0.1", server.server_port), timeout=10)
    started, closed = time.monotonic(), False
    try:
        for byte in b"GET /api/version HTTP/1.1\r\nHost: localhost\r\nX-Slow: " + b"a" * 100:
            s.sendall(bytes([byte]))
            time.sleep(0.2)
            if time.monotonic() - started > 12:
                break
    except OSError:                                       # reset: the server closed it
        closed = True
    if not closed:
        s.settimeout(5)
        try:
            closed = s.recv(65536) == b""
        except socket.timeout:                            # still open
            pass
        except OSError:
            closed = True
    s.close()
    assert closed and time.monotonic() - started < 12


def test_sockets_dribbling_request_heads_cannot_make_an_authorised_request_get_a_503(server):
    server.config.api_keys = ["secret"]
    server.max_connections, server.max_open = 8, 50
    slow = []
    try:
        for _ in range(200):                              # each sends one byte of a request line
            s = socket.create_connection(("127.0.0.1", server.server_port), timeout=10)
            s.sendall(b"G")
            slow.append(s)
        resp, data = _request(server, "GET", "/api/tags", headers={"Authorization": "Bearer secret"})
        assert resp.status == 200 and "models" in json.loads(data)
        assert _request(server, "GET", "/api/tags")[0].status == 401
        assert server.connections <= server.max_open + 1  # the longest idle were closed to make room
        for s in slow[-10:]:                              # the newest are still being read
            s.sendall(b"ET /api/tags HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer secret\r\n\r\n")
            assert s.recv(65536).startswith(b"HTTP/1.1 200 ")
    finally:
        for s in slow:
            s.close()


def test_a_non_loopback_peer_over_its_cap_gets_a_503_and_loopback_is_not_capped(server):
    # Connections accepted here and handed to the server as if from other addresses.
    server.max_per_peer = 4
    listener = socket.create_server(("127.0.0.1", 0))
    clients = []

    def admit(address):
        c = socket.create_connection(listener.getsockname(), timeout=10)
        clients.append(c)
        s, _ = listener.accept()
        server.process_request(s, address)
        return c

    def refused(c):
        c.settimeout(0.5)
        try:
            return c.recv(65536).startswith(b"HTTP/1.1 503 ")
        except socket.timeout:                            # admitted: the server waits for its request
            return False

    try:
        assert [refused(admit(("192.0.2.7", 40000 + i))) for i in range(5)] == [False] * 4 + [True]
        assert not refused(admit(("192.0.2.8", 40000)))   # another peer has its own share
        # an IPv6 peer is its /64: a host there can pick any of its addresses
        v6 = [refused(admit(("2001:db8:1:2::%x" % (i + 1), 40000, 0, 0))) for i in range(5)]
        assert v6 == [False] * 4 + [True] and not refused(admit(("2001:db8:1:3::1", 40000, 0, 0)))
        local = [socket.create_connection(("127.0.0.1", server.server_port)) for _ in range(20)]
        clients.extend(local)
        assert _request(server, "GET", "/api/version")[0].status == 200
    finally:
        for c in clients:
            c.close()
        listener.close()


def test_clients_that_hang_up_are_a_debug_line_not_a_traceback(server, capfd, caplog):
    import struct
    caplog.set_level("DEBUG", logger="ollama")
    socks = []
    for i in range(40):
        s = socket.create_connection(("127.0.0.1", server.server_port), timeout=10)
        s.sendall(b"GET /api/version HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        if i % 2:
            s.recv(65536)                                # answered: the server waits for the next request
        socks.append(s)
    time.sleep(0.3)
    for s in socks:                                      # hang up with a reset, as a killed client does
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
    deadline = time.monotonic() + 10
    while server.connections and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.connections == 0
    assert "Traceback" not in capfd.readouterr().err
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= 30]
    assert any("connection from 127.0.0.1 ended" in r.getMessage() for r in caplog.records)


def test_request_paths_are_quoted_in_the_access_log_so_escapes_never_reach_a_terminal(server, caplog):
    caplog.set_level("DEBUG", logger="ollama")
    with socket.create_connection(("127.0.0.1", server.server_port), timeout=10) as s:
        s.sendall(b"GET /api/\x1b[2J\x07x HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        while s.recv(65536):
            pass
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert '"/api/\\x1b[2J\\ax"' in text
    assert "\x1b" not in text and "\x07" not in text


def test_a_connection_that_sends_nothing_is_closed_after_the_idle_timeout(server, monkeypatch):
    monkeypatch.setattr(ollama, "IDLE_TIMEOUT", 0.2)
    s = socket.create_connection(("127.0.0.1", server.server_port), timeout=30)
    assert s.recv(1) == b""                               # closed by the server, not by our timeout
    s.close()


def test_accept_without_file_descriptors_backs_off_instead_of_spinning(server, monkeypatch):
    def no_fds():
        raise OSError(errno.EMFILE, "Too many open files")

    sleeps = []
    monkeypatch.setattr(ollama.time, "sleep", sleeps.append)
    monkeypatch.setattr(http.server.HTTPServer, "get_request", lambda self: no_fds())
    for _ in range(10):
        with pytest.raises(OSError):
            server.get_request()
    monkeypatch.undo()
    assert sleeps == [0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.0, 1.0]


# -- request framing and size ----------------------------------------------------

def test_bad_content_lengths_and_chunk_sizes_are_400_in_ollamas_shape(server):
    for head in (b"Content-Length: -1\r\n", b"Content-Length: abc\r\n", b"Content-Length: +5\r\n",
                 b"Content-Length: 5\r\nContent-Length: 6\r\n"):
        out = _raw(server, b"POST /api/show HTTP/1.1\r\nHost: localhost\r\n" + head + b"\r\n{}")
        status, _, body = out.partition(b"\r\n")[0], None, out.split(b"\r\n\r\n", 1)[1]
        assert status == b"HTTP/1.1 400 Bad Request" and json.loads(body)["error"].startswith(
            "invalid Content-Length"), head
    out = _raw(server, b"POST /api/show HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
                       b"zz\r\n{}\r\n0\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 400 ") and b'"error":"invalid chunk size \\"zz\\""' in out


def test_a_json_body_over_the_limit_is_413_before_it_is_read(server):
    s = _raw(server, b"POST /api/chat HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\n\r\n{"
             % (ollama.MAX_JSON_BODY + 1), read=False)
    out = b""
    while not out.endswith(b"}"):
        chunk = s.recv(65536)
        if not chunk:
            break
        out += chunk
    s.close()
    assert out.startswith(b"HTTP/1.1 413 ") and b'{"error":"http: request body too large"}' in out


# -- bad inputs ------------------------------------------------------------------

_UNMARSHAL = "json: cannot unmarshal %s into Go struct field %s of type %s"


@pytest.mark.parametrize("path, body, error", [
    ("/api/generate", {"model": "m", "template": 5}, _UNMARSHAL % ("number", "api.GenerateRequest.template", "string")),
    ("/api/generate", {"model": "m", "context": "abc"},
     _UNMARSHAL % ("string", "api.GenerateRequest.context", "[]int")),
    ("/api/generate", {"model": "m", "context": [1, "x"]},
     _UNMARSHAL % ("string", "api.GenerateRequest.context", "int")),
    ("/api/generate", {"model": "m", "prompt": ["x"]}, _UNMARSHAL % ("array", "api.GenerateRequest.prompt", "string")),
    ("/api/generate", {"model": "m", "options": []}, _UNMARSHAL % ("array", "api.GenerateRequest.options",
                                                                  "map[string]interface {}")),
    ("/api/chat", {"model": "m", "messages": "hi"},
     _UNMARSHAL % ("string", "api.ChatRequest.messages", "[]api.Message")),
    ("/api/chat", {"model": "m", "messages": [1]}, _UNMARSHAL % ("number", "api.ChatRequest.messages", "api.Message")),
    ("/api/chat", {"model": "m", "stream": "yes"}, _UNMARSHAL % ("string", "api.ChatRequest.stream", "bool")),
])
def test_a_field_of_the_wrong_type_is_a_400_with_gos_message(server, path, body, error):
    resp, data = _request(server, "POST", path, json.dumps(body))
    assert (resp.status, json.loads(data)) == (400, {"error": error})


@pytest.mark.parametrize("raw, error", [
    (b'{"model": NaN}', "invalid character 'N' looking for beginning of value"),
    (b'{"model": "m", "options": {"temperature": Infinity}}', "invalid character 'I' looking for beginning of value"),
    (b'{"model": -Infinity}', "invalid character 'I' in numeric literal"),
    (b"[" * 100000, "invalid character '[' exceeded max depth"),
])
def test_json_go_refuses_is_a_400(server, raw, error):
    resp, data = _request(server, "POST", "/api/show", raw)
    assert (resp.status, json.loads(data)) == (400, {"error": error})


def test_a_lone_surrogate_becomes_the_replacement_character_as_in_go(server):
    assert ollama.parse_json(b'{"a": ["x\\ud800y", {"\\udfff": "\\ud83d\\ude00"}]}') == \
        {"a": ["x\ufffdy", {"\ufffd": "\U0001f600"}]}
    assert ollama.parse_json(b'{"a": "\xff"}') == {"a": "\ufffd"}          # invalid UTF-8 too
    for body in (b'{"model": "x\\ud800y"}', b'{"model": "m", "prompt": "\\udc00"}'):
        resp, data = _request(server, "POST", "/api/generate", body)
        assert resp.status in (400, 404) and json.loads(data)["error"]


# -- OLLAMA_API_KEYS and OLLAMA_TLS_CERT/KEY ------------------------------------

@pytest.fixture
def keyed(ollama_home, monkeypatch):
    """A server that requires one of two keys."""
    from fixtures import serving
    config = ollama.Config({"HOME": str(ollama_home), "OLLAMA_API_KEYS": "sekrit-1, sekrit-2"})
    with serving(ollama.make_server(config, "127.0.0.1", 0)) as srv:
        monkeypatch.setenv("OLLAMA_HOST", "127.0.0.1:%d" % srv.server_port)
        yield srv


@pytest.mark.parametrize("path, body", [
    ("/api/tags", {"error": "unauthorized"}),
    ("/v1/models", {"error": {"message": "Incorrect API key provided", "type": "invalid_request_error",
                              "param": None, "code": "invalid_api_key"}}),
    ("/v1/messages", {"type": "error", "error": {"type": "authentication_error", "message": "invalid x-api-key"}}),
    ("/v2/", {"errors": [{"code": "UNAUTHORIZED", "message": "authentication required", "detail": None}]}),
])
def test_api_keys_refuse_each_api_in_its_own_shape(keyed, path, body):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"x-api-key": "sekrit-"}):
        resp, data = _request(keyed, "GET", path, headers=headers)
        assert (resp.status, json.loads(data)) == (401, body)
        assert resp.getheader("WWW-Authenticate") == 'Bearer realm="ollama.py"'


def test_api_keys_admit_bearer_and_x_api_key_and_leave_the_heartbeat_open(keyed):
    assert _request(keyed, "GET", "/api/tags", headers={"Authorization": "Bearer sekrit-2"})[0].status == 200
    assert _request(keyed, "GET", "/api/tags", headers={"x-api-key": "sekrit-1"})[0].status == 200
    assert _request(keyed, "HEAD", "/")[0].status == 200        # `ollama.py` and load balancers probe it


def test_api_keys_work_from_the_cli(keyed, ollama_home):
    import os
    import subprocess
    import sys
    cli = [sys.executable, os.path.join(os.path.dirname(ollama.__file__), "ollama.py"), "list"]
    env = dict(os.environ, OLLAMA_HOST="127.0.0.1:%d" % keyed.server_port, HOME=str(ollama_home))
    refused = subprocess.run(cli, env=env, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1 and refused.stderr.strip() == "Error: unauthorized"
    admitted = subprocess.run(cli, env=dict(env, OLLAMA_API_KEY="sekrit-1"), capture_output=True, text=True,
                              timeout=60)
    assert admitted.returncode == 0 and admitted.stdout.startswith("NAME")


def test_api_keys_work_from_the_official_clients(keyed):
    import os
    import subprocess
    import sys
    from test_embed import official_ollama
    if subprocess.run([sys.executable, "-I", "-c", "import ollama, openai"], cwd="/").returncode:
        pytest.skip("needs the official ollama and openai packages")
    os.environ["OLLAMA_API_KEY"] = "sekrit-2"                 # the official client reads it
    try:
        assert official_ollama(keyed, "print(json.dumps(len(client.list().models)))") == 0
    finally:
        del os.environ["OLLAMA_API_KEY"]
    script = ("import json, openai\nc = openai.OpenAI(base_url=%r, api_key=%r)\n"
              "try:\n    c.models.list()\n    print(json.dumps('ok'))\n"
              "except openai.AuthenticationError as e:\n    print(json.dumps(e.status_code))\n")
    for key, want in (("sekrit-1", "ok"), ("nope", 401)):
        out = subprocess.run([sys.executable, "-I", "-c", script % (keyed.url + "/v1", key)], capture_output=True,
                             text=True, timeout=60, cwd="/")
        assert json.loads(out.stdout) == want, out.stderr


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1 and localhost, made with openssl."""
    import shutil
    import subprocess
    if not shutil.which("openssl"):
        pytest.skip("needs openssl")
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout", str(d / "key.pem"),
                    "-out", str(d / "cert.pem")], check=True, capture_output=True, timeout=60)
    return d / "cert.pem", d / "key.pem"


def test_tls_serves_https_to_the_cli_and_refuses_plain_http(ollama_home, certificate, monkeypatch):
    import os
    import ssl
    import subprocess
    import sys
    from fixtures import serving
    cert, key = certificate
    config = ollama.Config({"HOME": str(ollama_home), "OLLAMA_TLS_CERT": str(cert), "OLLAMA_TLS_KEY": str(key)})
    with serving(ollama.make_server(config, "127.0.0.1", 0)) as srv:
        assert srv.url.startswith("https://127.0.0.1:")
        context = ssl.create_default_context(cafile=str(cert))
        conn = http.client.HTTPSConnection("127.0.0.1", srv.server_port, timeout=10, context=context)
        conn.request("GET", "/api/version")
        assert json.loads(conn.getresponse().read())["version"] == ollama.API_VERSION
        conn.close()
        env = dict(os.environ, OLLAMA_HOST=srv.url, HOME=str(ollama_home), SSL_CERT_FILE=str(cert))
        out = subprocess.run([sys.executable, os.path.join(os.path.dirname(ollama.__file__), "ollama.py"), "list"],
                             env=env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        with pytest.raises((http.client.HTTPException, ConnectionError, OSError)):   # plain HTTP gets no answer
            _request(srv, "GET", "/api/version")
        conn = http.client.HTTPSConnection("127.0.0.1", srv.server_port, timeout=10, context=context)
        conn.request("GET", "/")                     # and the server still serves after it
        assert conn.getresponse().read() == b"Ollama is running"


def test_tls_needs_both_files_and_says_why(ollama_home, tmp_path):
    with pytest.raises(ollama.OllamaError) as e:
        ollama.make_server(ollama.Config({"HOME": str(ollama_home), "OLLAMA_TLS_CERT": "/x.pem"}), "127.0.0.1", 0)
    assert str(e.value) == "OLLAMA_TLS_CERT and OLLAMA_TLS_KEY must be set together"
    (tmp_path / "bad.pem").write_text("not a certificate")
    with pytest.raises(ollama.OllamaError) as e:
        ollama.make_server(ollama.Config({"HOME": str(ollama_home), "OLLAMA_TLS_CERT": str(tmp_path / "bad.pem"),
                                          "OLLAMA_TLS_KEY": str(tmp_path / "bad.pem")}), "127.0.0.1", 0)
    assert str(e.value).startswith("cannot load OLLAMA_TLS_CERT/OLLAMA_TLS_KEY: ")
