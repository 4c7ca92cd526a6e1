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


def test_version_is_reported(server):
    import ollama
    resp, data = _request(server, "GET", "/api/version")
    assert resp.status == 200
    assert json.loads(data) == {"version": ollama.__version__}


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
    assert len({(m, p) for m, p, _h in ollama.ROUTES}) == len(ollama.ROUTES) == 33


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
    server.max_connections = 3
    idle = [socket.create_connection(("127.0.0.1", server.server_port)) for _ in range(3)]
    deadline = time.monotonic() + 10
    while server.connections < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    resp, data = _request(server, "GET", "/api/version")
    assert resp.status == 503 and json.loads(data) == {
        "error": "server busy, please try again.  maximum connections exceeded"}
    idle.pop().close()
    while server.connections > 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _request(server, "GET", "/api/version")[0].status == 200
    for s in idle:
        s.close()


def test_500_idle_connections_do_not_starve_a_request(server):
    idle = [socket.create_connection(("127.0.0.1", server.server_port)) for _ in range(500)]
    try:
        assert _request(server, "GET", "/api/tags")[0].status == 200
    finally:
        for s in idle:
            s.close()


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
