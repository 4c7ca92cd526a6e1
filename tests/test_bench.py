"""bench/bench.py keeps running: a fast subset (footprint: serve, 50 stored models, list) end to end."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_footprint_runs_and_prints_the_table(tmp_path):
    out = tmp_path / "bench.json"
    cp = subprocess.run([sys.executable, str(ROOT / "bench" / "bench.py"), "--quick", "--only", "footprint",
                         "--json", str(out)], capture_output=True, text=True, timeout=240)
    assert cp.returncode == 0, cp.stderr
    header = cp.stdout.splitlines()[1].split()
    assert header[:2] == ["metric", "ollama.py"] and header[-1] == "met?"
    rows = json.loads(out.read_text())["rows"]
    assert any(r["metric"] == "serve RSS idle" and r["ollama_py"] > 0 for r in rows)


def test_bench_rejects_an_unknown_section():
    cp = subprocess.run([sys.executable, str(ROOT / "bench" / "bench.py"), "--only", "nope"],
                        capture_output=True, text=True, timeout=60)
    assert cp.returncode == 2 and "unknown section" in cp.stderr


def test_bench_knows_the_prompt_cache_and_interactive_sections():
    cp = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, 'bench'); import bench; "
                         "print(all(s in bench.FUNCS and s in bench.NEEDS and s in bench.TITLES "
                         "for s in ('promptcache', 'interactive')))"],
                        cwd=str(ROOT), capture_output=True, text=True, timeout=60)
    assert cp.stdout.strip() == "True", cp.stderr
