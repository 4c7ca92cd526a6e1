"""Modelfile section: Ollama's parser, PARAMETER typing, API options, serialising, Go formatting."""
import pytest

import ollama


def parse(text):
    return ollama.parse_modelfile(text)


def test_parses_every_instruction_case_insensitively():
    cmds = parse('from llama3.2\nParameter temperature 0.7\nTEMPLATE """{{ .Prompt }}"""\n'
                 'system You are Mario.\nlicense MIT\nMESSAGE user Hi there\nadapter ./lora.gguf\n')
    assert cmds == [("model", "llama3.2"), ("temperature", "0.7"), ("template", "{{ .Prompt }}"),
                    ("system", "You are Mario."), ("license", "MIT"), ("message", "user: Hi there"),
                    ("adapter", "./lora.gguf")]


def test_comments_only_at_line_start_and_hash_is_literal_in_values():
    cmds = parse("# a comment\n   # indented comment\nFROM m # not a comment\nSYSTEM use #tags\n")
    assert cmds == [("model", "m # not a comment"), ("system", "use #tags")]


def test_quoted_values_span_lines_and_keep_newlines():
    cmds = parse('FROM m\nSYSTEM """\nline one\n  line two\n"""\nTEMPLATE "a\nb"\n')
    assert cmds[1] == ("system", "\nline one\n  line two\n")
    assert cmds[2] == ("template", "a\nb")


def test_utf8_and_utf16_boms_are_handled():
    text = "FROM m\nSYSTEM héllo\n"
    assert parse(b"\xef\xbb\xbf" + text.encode()) == [("model", "m"), ("system", "héllo")]
    assert parse(text.encode("utf-16")) == [("model", "m"), ("system", "héllo")]


@pytest.mark.parametrize("text,error", [
    ("FROM m\nFOO bar\n", '(line 2): command must be one of "from", "license", "template", "system", '
                          '"adapter", "draft", "renderer", "parser", "parameter", "message", or "requires"'),
    ("FROM m\nMESSAGE robot hi\n", '(line 2): message role must be one of "system", "user", or "assistant"'),
    ("SYSTEM hi\n", "no FROM line"),
    ("FROM m\nSYSTEM \"\"\"never\nclosed\n", "(line 2): unexpected EOF"),
    ("FROM m\n\nTEMPLATE \"open\n", "(line 3): unexpected EOF"),
])
def test_parse_errors_carry_ollamas_texts_and_line_numbers(text, error):
    with pytest.raises(ollama.BadRequest) as e:
        parse(text)
    assert str(e.value) == error


@pytest.mark.parametrize("line,error", [
    ("PARAMETER nope 1", "unknown parameter 'nope'"),
    ("PARAMETER num_ctx big", "invalid int value [big]"),
    ("PARAMETER top_p high", "invalid float value [high]"),
    ("PARAMETER use_mmap maybe", "invalid bool value [maybe]"),
    ("PARAMETER Temperature 1", "unknown parameter 'Temperature'"),
])
def test_bad_parameters_are_rejected(tmp_path, line, error):
    with pytest.raises(ollama.BadRequest) as e:
        ollama.modelfile_request(parse("FROM m\n" + line + "\n"), str(tmp_path))
    assert str(e.value) == error


def test_parameters_are_typed_and_stop_repeats_collect(tmp_path, capsys):
    text = ("FROM m\nPARAMETER temperature 0.7\nPARAMETER num_ctx 8192\nPARAMETER use_mmap true\n"
            "PARAMETER stop <|eot_id|>\nPARAMETER stop \"<|end|>\"\nPARAMETER mirostat 2\n")
    req, local = ollama.modelfile_request(parse(text), str(tmp_path))
    assert req == {"from": "m", "parameters": {"temperature": 0.7, "num_ctx": 8192, "use_mmap": True,
                                               "stop": ["<|eot_id|>", "<|end|>"]}}
    assert local == {}
    assert "warning: parameter mirostat is deprecated" in capsys.readouterr().out


def test_from_path_expands_relative_to_modelfile_and_home(tmp_path, monkeypatch):
    (tmp_path / "dir").mkdir()
    weights = tmp_path / "dir" / "w.gguf"
    weights.write_bytes(b"GGUF" + b"\0" * 20)
    req, local = ollama.modelfile_request(parse("FROM ./w.gguf\nLICENSE a\nLICENSE b\n"), str(tmp_path / "dir"))
    digest = ollama.file_digest(str(weights))
    assert req == {"files": {"w.gguf": digest}, "license": ["a", "b"]}
    assert local == {str(weights): digest}
    monkeypatch.setenv("HOME", str(tmp_path / "dir"))
    req, _ = ollama.modelfile_request(parse("FROM ~/w.gguf\n"), "/elsewhere")
    assert req["files"] == {"w.gguf": digest}


def test_from_a_missing_file_is_an_error_not_a_model_name(tmp_path):
    for arg in ("./missing.gguf", "missing.gguf", "~/nope/x.gguf", "/abs/x.safetensors"):
        with pytest.raises(ollama.BadRequest, match="no such file: "):
            ollama.modelfile_request(parse("FROM %s\n" % arg), str(tmp_path))
    req, local = ollama.modelfile_request(parse("FROM user/model:tag\n"), str(tmp_path))
    assert req == {"from": "user/model:tag"} and local == {}


def test_message_roles_and_content_go_to_messages(tmp_path):
    req, _ = ollama.modelfile_request(parse("FROM m\nMESSAGE user hi: there\nMESSAGE assistant ok\n"), str(tmp_path))
    assert req["messages"] == [{"role": "user", "content": "hi: there"}, {"role": "assistant", "content": "ok"}]


@pytest.mark.parametrize("value,quoted", [
    ("plain", "plain"), ("two\nlines", '"two\nlines"'), (" lead", '" lead"'), ("trail ", '"trail "'),
    ('say "hi"\nnow', '"""say "hi"\nnow"""'), ('in "quotes"', 'in "quotes"'),
])
def test_serialised_values_are_quoted_like_ollama(value, quoted):
    assert ollama.quote_modelfile_value(value) == quoted
    assert ollama.modelfile_command("system", value) == "SYSTEM " + quoted
    assert parse("FROM m\nSYSTEM " + quoted + "\n")[1] == ("system", value.strip() if quoted == value else value)


def test_parse_options_converts_and_validates():
    out = ollama.parse_options({"temperature": 1, "num_ctx": 2048.9, "stop": ["a"], "use_mmap": False,
                                "nonsense": 3, "seed": None})
    assert out == {"temperature": 1.0, "num_ctx": 2048, "stop": ["a"], "use_mmap": False}
    assert isinstance(out["temperature"], float) and isinstance(out["num_ctx"], int)


@pytest.mark.parametrize("opts,error", [
    ({"num_ctx": "big"}, 'option "num_ctx" must be of type integer'),
    ({"num_ctx": True}, 'option "num_ctx" must be of type integer'),
    ({"top_p": "0.5"}, 'option "top_p" must be of type float32'),
    ({"use_mmap": 1}, 'option "use_mmap" must be of type boolean'),
    ({"stop": "x"}, 'option "stop" must be of type array'),
    ({"stop": [1]}, 'option "stop" must be of an array of strings'),
])
def test_parse_options_type_errors(opts, error):
    with pytest.raises(ollama.BadRequest) as e:
        ollama.parse_options(opts)
    assert str(e.value) == error


def test_unknown_options_are_logged(caplog):
    with caplog.at_level("WARNING", logger="ollama"):
        assert ollama.parse_options({"bogus": 1}) == {}
    assert "invalid option provided" in caplog.text


def test_an_unknown_option_key_is_quoted_in_the_log_as_slog_does(caplog):
    with caplog.at_level("WARNING", logger="ollama"):
        ollama.parse_options({"x\ntime=0 level=ERROR msg=forged \x1b[31m": 1, "plain_key": 2})
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ['invalid option provided option="x\\ntime=0 level=ERROR msg=forged \\x1b[31m"',
                     "invalid option provided option=plain_key"]


@pytest.mark.parametrize("value,text", [(0.7, "0.7"), (40.0, "40"), (1e6, "1e+06"), (123456.0, "123456"),
                                        (1.5e-05, "1.5e-05"), (0.0001, "0.0001"), (-2.5, "-2.5"), (3, "3"),
                                        ("<|x|>", '"<|x|>"'), (True, "true")])
def test_go_sharp_v_formatting(value, text):
    assert ollama.go_sprint(value, sharp=True) == text


def test_go_json_escapes_html_and_sorts_maps():
    assert ollama.go_json({"temperature": 0.7, "stop": ["<|eot_id|>", "a&b"], "num_ctx": 4096.0},
                          sort_keys=True) == \
        '{"num_ctx":4096,"stop":["\\u003c|eot_id|\\u003e","a\\u0026b"],"temperature":0.7}'
    assert ollama.go_json([1e-7, 1e21, 0.5]) == "[1e-7,1e+21,0.5]"


@pytest.mark.parametrize("n,text", [(8030261248, "8.0B"), (8000000000, "8B"), (3212749888, "3.2B"),
                                    (268098176, "268.10M"), (7000000, "7M"), (1500, "2K"), (999, "999")])
def test_human_number_matches_ollama(n, text):
    assert ollama.human_number(n) == text


@pytest.mark.parametrize("n,text", [(512, "512 B"), (1000, "1 KB"), (1500, "1.5 KB"), (934_000_000, "934 MB"),
                                    (4_700_000_000, "4.7 GB"), (12_345_678_901, "12 GB"), (2e12, "2 TB")])
def test_human_bytes_matches_ollama(n, text):
    assert ollama.human_bytes(n) == text


@pytest.mark.parametrize("ago,text", [(0.5, "Less than a second ago"), (1, "1 second ago"), (59, "59 seconds ago"),
                                      (90, "About a minute ago"), (300, "5 minutes ago"), (3600, "About an hour ago"),
                                      (5 * 86400, "5 days ago"), (-240, "4 minutes from now"),
                                      (-30 * 365 * 86400, "Forever")])
def test_human_time_matches_ollama(ago, text):
    assert ollama.human_time(1_000_000_000 - ago, now=1_000_000_000) == text
