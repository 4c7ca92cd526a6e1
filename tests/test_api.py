"""HTTP API conventions: heartbeat, version, unknown routes, methods, host checks."""
import http.client
import json


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


def test_wrong_method_is_405(server):
    resp, _ = _request(server, "GET", "/api/generate")
    assert resp.status == 405


def test_foreign_host_header_is_forbidden_on_loopback(server):
    resp, _ = _request(server, "GET", "/api/version", headers={"Host": "evil.example.com"})
    assert resp.status == 403
    resp, _ = _request(server, "GET", "/api/version", headers={"Host": "localhost:11434"})
    assert resp.status == 200
