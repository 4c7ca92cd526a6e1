"""CLI model commands (create, list, show, cp, rm) against a real server."""
import hashlib
import os

import pytest

import ollama
from tiny_gguf import write_tiny_gguf


def run(*argv):
    return ollama.main(list(argv))


@pytest.fixture
def modeldir(tmp_path):
    d = tmp_path / "src"
    d.mkdir()
    write_tiny_gguf(d / "tiny.gguf")
    return d


def test_create_from_modelfile_uploads_by_link_and_prints_statuses(server, modeldir, capsys):
    (modeldir / "Modelfile").write_text('FROM ./tiny.gguf\nPARAMETER temperature 0.5\nSYSTEM """Be\nbrief"""\n')
    assert run("create", "tiny", "-f", str(modeldir / "Modelfile")) == 0
    err = capsys.readouterr().err.splitlines()
    digest = "sha256:" + hashlib.sha256((modeldir / "tiny.gguf").read_bytes()).hexdigest()
    assert err[0] == "copying file %s 100%%" % digest
    assert "gathering model components" in err and "parsing GGUF" in err
    assert err[-2:] == ["writing manifest", "success"]
    blob = server.store.blob_path(digest)
    assert os.path.samestat(blob.stat(), (modeldir / "tiny.gguf").stat())   # no copy on the same machine
    m = ollama.load_model(server.store, "tiny")
    assert m.system == "Be\nbrief" and m.params == {"temperature": 0.5}


def test_create_without_modelfile_uses_the_gguf_in_the_current_folder(server, modeldir, monkeypatch, capsys):
    monkeypatch.chdir(modeldir)
    assert run("create", "here") == 0
    assert ollama.load_model(server.store, "here").model_path


def test_create_uploads_when_the_server_cannot_link(server, modeldir, monkeypatch, capsys):
    monkeypatch.setattr(ollama, "_server_is_local", lambda client: False)
    (modeldir / "Modelfile").write_text("FROM tiny.gguf\n")
    assert run("create", "up", "-f", str(modeldir / "Modelfile")) == 0
    digest = "sha256:" + hashlib.sha256((modeldir / "tiny.gguf").read_bytes()).hexdigest()
    blob = server.store.blob_path(digest)
    assert blob.read_bytes() == (modeldir / "tiny.gguf").read_bytes()
    assert not os.path.samestat(blob.stat(), (modeldir / "tiny.gguf").stat())


@pytest.mark.parametrize("modelfile,error", [
    ("FROM tiny.gguf\nBOGUS x\n", 'Error: (line 2): command must be one of "from", "license", "template", '
                                  '"system", "adapter", "draft", "renderer", "parser", "parameter", "message", '
                                  'or "requires"'),
    ("FROM tiny.gguf\nPARAMETER nope 1\n", "Error: unknown parameter 'nope'"),
    ("FROM tiny.gguf\nPARAMETER top_k lots\n", "Error: invalid int value [lots]"),
    ("SYSTEM hi\n", "Error: no FROM line"),
    ('FROM tiny.gguf\nSYSTEM """oops\n', "Error: (line 2): unexpected EOF"),
    ("FROM ./missing.gguf\n", "Error: no such file: {dir}/missing.gguf"),   # Ollama: a model name to pull
    ("FROM missing.gguf\n", "Error: no such file: {dir}/missing.gguf"),
    ("FROM ./notes.txt\n", "Error: supplied file was not in GGUF format"),
])
def test_create_reports_modelfile_errors(server, modeldir, capsys, modelfile, error):
    (modeldir / "notes.txt").write_text("not a model")
    (modeldir / "Modelfile").write_text(modelfile)
    assert run("create", "bad", "-f", str(modeldir / "Modelfile")) == 1
    assert capsys.readouterr().err.splitlines()[-1] == error.format(dir=modeldir)
    assert server.store.resolve("bad") is None


def test_create_rejects_invalid_names_and_missing_modelfile(server, modeldir, capsys):
    assert run("create", "../evil", "-f", str(modeldir / "Modelfile")) == 1
    assert capsys.readouterr().err.strip() == "Error: invalid model name: ../evil"
    assert run("create", "ok", "-f", str(modeldir / "nope")) == 1
    assert capsys.readouterr().err.strip() == "Error: specified Modelfile wasn't found"


def test_list_prints_ollamas_table(server, modeldir, capsys):
    (modeldir / "Modelfile").write_text("FROM tiny.gguf\n")
    run("create", "alpha", "-f", str(modeldir / "Modelfile"))
    run("cp", "alpha", "me/beta:v1")
    capsys.readouterr()
    assert run("list") == 0
    out = capsys.readouterr().out
    tags = {m["name"]: m for m in ollama.Client(server.url).call("GET", "/api/tags")["models"]}
    size = ollama.human_bytes(tags["alpha:latest"]["size"])
    rows = out.splitlines()
    # newest first (cp wrote me/beta later); every column padded to its width plus 4 spaces
    beta, alpha = tags["me/beta:v1"], tags["alpha:latest"]
    sw = max(len(size), 4)
    start = 12 + 4 + 12 + 4 + sw + 4
    whens = [r[start:].rstrip() for r in rows[1:]]
    assert all(x.endswith(" ago") for x in whens)
    w = max(len(x) for x in whens + ["MODIFIED"])
    cells = [["NAME", "ID", "SIZE", "MODIFIED"], ["me/beta:v1", beta["digest"][:12], size, whens[0]],
             ["alpha:latest", alpha["digest"][:12], size, whens[1]]]
    assert rows == [c[0].ljust(12) + "    " + c[1].ljust(12) + "    " + c[2].ljust(sw) + "    " + c[3].ljust(w) + "    "
                    for c in cells]
    assert size.endswith(" KB") and len(size) >= 4
    assert run("ls", "ME/") == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and out[1].startswith("me/beta:v1    ")


def test_show_prints_sections_and_single_fields(server, modeldir, capsys):
    (modeldir / "Modelfile").write_text("FROM tiny.gguf\nPARAMETER stop <end>\nSYSTEM one\\ntwo\nLICENSE l1\n")
    run("create", "s", "-f", str(modeldir / "Modelfile"))
    capsys.readouterr()
    assert run("show", "s") == 0
    out = capsys.readouterr().out
    assert out.startswith("  Model\n    architecture        llama     \n    parameters          128       \n"
                          "    context length      2048      \n    embedding length    16        \n"
                          "    quantization        Q4_K_M    \n\n  Capabilities\n    completion    \n\n")
    assert "  Parameters\n    stop    \"<end>\"    \n" in out
    assert "  System\n    one\\ntwo    \n" in out and "  License\n    l1    \n" in out
    assert run("show", "s", "--parameters") == 0
    assert capsys.readouterr().out == 'stop                           "<end>"\n'
    assert run("show", "s", "--template") == 0
    assert capsys.readouterr().out == "{{ .Prompt }}\n"
    assert run("show", "s", "--modelfile") == 0
    assert "# FROM s:latest" in capsys.readouterr().out
    assert run("show", "s", "-v") == 0
    out = capsys.readouterr().out
    assert "  Metadata\n" in out and "  Tensors\n" in out and "token_embd.weight" in out
    assert "tokenizer.ggml.tokens" in out and "...+" in out
    assert run("show", "s", "--system", "--license") == 1
    assert "only one of" in capsys.readouterr().err
    assert run("show", "ghost") == 1
    assert capsys.readouterr().err.strip() == "Error: model 'ghost' not found"


def test_cp_and_rm(server, modeldir, capsys):
    (modeldir / "Modelfile").write_text("FROM tiny.gguf\n")
    run("create", "a", "-f", str(modeldir / "Modelfile"))
    capsys.readouterr()
    assert run("cp", "a", "b") == 0
    assert capsys.readouterr().out == "copied 'a' to 'b'\n"
    assert run("rm", "a", "b") == 0
    captured = capsys.readouterr()
    assert captured.out == "deleted 'a'\ndeleted 'b'\n"
    assert server.store.list() == []
    assert run("rm", "a") == 1
    assert capsys.readouterr().err.strip().endswith("Error: model 'a' not found")


def test_commands_fail_cleanly_without_a_server(monkeypatch, capsys):
    monkeypatch.setenv("OLLAMA_HOST", "127.0.0.1:9")
    assert run("list") == 1
    assert "could not connect to ollama server" in capsys.readouterr().err


GEMMA = "/root/.cache/ollama-py/gemma/gemma-3-270m-q4_k_m.gguf"


@pytest.mark.skipif(not os.path.isfile(GEMMA), reason="Gemma 3 270M not downloaded")
def test_create_and_show_real_gemma_without_copying(server, tmp_path, capsys):
    (tmp_path / "Modelfile").write_text("FROM %s\n" % GEMMA)
    assert run("create", "gemma3:270m", "-f", str(tmp_path / "Modelfile")) == 0
    capsys.readouterr()
    assert run("show", "gemma3:270m") == 0
    out = capsys.readouterr().out
    assert out == ("  Model\n    architecture        gemma3     \n    parameters          268.10M    \n"
                   "    context length      32768      \n    embedding length    640        \n"
                   "    quantization        Q4_K_M     \n\n  Capabilities\n    completion    \n\n")
