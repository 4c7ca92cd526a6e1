"""GGUF section: the stdlib header/metadata reader against files written by the `gguf` package."""
import os
import struct
from pathlib import Path

import gguf
import pytest

import ollama
from tiny_gguf import write_tiny_gguf

GEMMA = Path.home().joinpath(".cache/ollama-py/gemma/gemma-3-270m-q4_k_m.gguf")
REAL_GEMMA = Path("/root/.cache/ollama-py/gemma/gemma-3-270m-q4_k_m.gguf")


def test_reader_gives_architecture_sizes_and_tensors(tmp_path):
    path = tmp_path / "m.gguf"
    count = write_tiny_gguf(path, arch="llama", file_type=15, context_length=4096, embedding_length=16)
    g = ollama.read_gguf(path)
    assert g.version == 3
    assert g.architecture == "llama"
    assert g.parameter_count == count == 6 * 16 + 16 + 16
    assert g.file_type == "Q4_K_M"
    assert g.context_length == 4096 and g.embedding_length == 16
    assert [t.to_dict() for t in g.tensors] == [
        {"name": "token_embd.weight", "type": "F32", "shape": [16, 6]},
        {"name": "blk.0.attn_norm.weight", "type": "F32", "shape": [16]},
        {"name": "output_norm.weight", "type": "F32", "shape": [16]}]
    assert g.kv["tokenizer.ggml.tokens"] == ["<unk>", "<s>", "</s>", "a", "b", "c"]


@pytest.mark.parametrize("code,name", [(0, "F32"), (1, "F16"), (2, "Q4_0"), (7, "Q8_0"), (15, "Q4_K_M"),
                                       (17, "Q5_K_M"), (18, "Q6_K"), (32, "BF16"), (999, "unknown")])
def test_file_type_names_follow_ollama(tmp_path, code, name):
    write_tiny_gguf(tmp_path / "m.gguf", file_type=code)
    assert ollama.read_gguf(tmp_path / "m.gguf").file_type == name


def test_every_value_type_and_nested_arrays_are_read(tmp_path):
    T = gguf.GGUFValueType
    extra = {"t.u8": (200, T.UINT8), "t.i8": (-5, T.INT8), "t.u16": (60000, T.UINT16), "t.i16": (-30000, T.INT16),
             "t.u32": (4000000000, T.UINT32), "t.i32": (-2000000000, T.INT32), "t.f32": (0.1, T.FLOAT32),
             "t.bool": (True, T.BOOL), "t.str": ("héllo", T.STRING), "t.u64": (2 ** 63, T.UINT64),
             "t.i64": (-2 ** 62, T.INT64), "t.f64": (0.1, T.FLOAT64),
             "t.arr": [1, 2, 3], "t.strs": ["x", "yy"], "t.nested": [[1, 2], [3]]}
    write_tiny_gguf(tmp_path / "m.gguf", extra=extra)
    kv = ollama.read_gguf(tmp_path / "m.gguf").kv
    assert kv["t.u8"] == 200 and kv["t.i8"] == -5 and kv["t.u16"] == 60000 and kv["t.i16"] == -30000
    assert kv["t.u32"] == 4000000000 and kv["t.i32"] == -2000000000
    assert kv["t.f32"] == 0.1                       # shortest float32 text, as Go prints it
    assert kv["t.bool"] is True and kv["t.str"] == "héllo"
    assert kv["t.u64"] == 2 ** 63 and kv["t.i64"] == -2 ** 62 and kv["t.f64"] == 0.1
    assert kv["t.arr"] == [1, 2, 3] and kv["t.strs"] == ["x", "yy"] and kv["t.nested"] == [[1, 2], [3]]


def test_version_2_files_are_read(tmp_path):
    path = tmp_path / "m.gguf"
    write_tiny_gguf(path)
    data = bytearray(path.read_bytes())
    data[4:8] = struct.pack("<I", 2)                 # v2 and v3 share the little-endian layout
    path.write_bytes(bytes(data))
    g = ollama.read_gguf(path)
    assert g.version == 2 and g.architecture == "llama"


def test_long_arrays_can_be_skipped_without_losing_later_keys(tmp_path):
    path = tmp_path / "m.gguf"
    write_tiny_gguf(path, extra={"z.after": "still here"})
    g = ollama.read_gguf(path, max_array=3)
    assert g.kv["tokenizer.ggml.tokens"] == [] and g.array_lengths["tokenizer.ggml.tokens"] == 6
    assert g.kv["z.after"] == "still here" and len(g.tensors) == 3


def test_non_gguf_file_is_rejected(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello, I am not a model\n")
    with pytest.raises(ollama.BadRequest, match="supplied file was not in GGUF format"):
        ollama.read_gguf(path)


@pytest.mark.parametrize("cut", [6, 20, 100, -40])
def test_truncated_file_is_rejected_with_offset(tmp_path, cut):
    path = tmp_path / "m.gguf"
    write_tiny_gguf(path)
    data = path.read_bytes()
    header_end = data.index(b"output_norm.weight") + len(b"output_norm.weight") + 4 + 8 + 4 + 8
    path.write_bytes(data[:cut if cut > 0 else header_end + cut])
    with pytest.raises(ollama.BadRequest, match="invalid GGUF file: .*"):
        ollama.read_gguf(path)


def test_big_endian_file_is_rejected(tmp_path):
    path = tmp_path / "be.gguf"
    write_tiny_gguf(path, endian=gguf.GGUFEndian.BIG)
    with pytest.raises(ollama.BadRequest, match="big-endian"):
        ollama.read_gguf(path)


def test_model_info_drops_name_and_template_and_empties_long_arrays(tmp_path):
    path = tmp_path / "m.gguf"
    write_tiny_gguf(path, template="{{ .Prompt }}", extra={"t.short": [1, 2, 3]})
    info = ollama.read_gguf(path).model_info()
    assert "general.name" not in info and "tokenizer.chat_template" not in info
    assert info["tokenizer.ggml.tokens"] == [] and info["t.short"] == [1, 2, 3]
    assert info["general.parameter_count"] == 128
    verbose = ollama.read_gguf(path).model_info(verbose=True)
    assert len(verbose["tokenizer.ggml.tokens"]) == 6


def test_embedding_and_projector_detection(tmp_path):
    write_tiny_gguf(tmp_path / "e.gguf", arch="bert", extra={"bert.pooling_type": 1})
    assert ollama.read_gguf(tmp_path / "e.gguf").is_embedding
    write_tiny_gguf(tmp_path / "p.gguf", arch="clip", extra={"general.type": "mmproj"})
    assert ollama.read_gguf(tmp_path / "p.gguf").is_projector
    write_tiny_gguf(tmp_path / "m.gguf")
    g = ollama.read_gguf(tmp_path / "m.gguf")
    assert not g.is_embedding and not g.is_projector


@pytest.mark.skipif(not (GEMMA.is_file() or REAL_GEMMA.is_file()), reason="Gemma 3 270M not downloaded")
def test_reads_real_gemma_header_only():
    path = GEMMA if GEMMA.is_file() else REAL_GEMMA
    g = ollama.read_gguf(path, max_array=0)
    assert g.architecture == "gemma3" and g.file_type == "Q4_K_M"
    assert ollama.human_number(g.parameter_count) == "268.10M"    # as `ollama show gemma3:270m` prints
    assert g.context_length == 32768 and g.embedding_length == 640
    assert g.tensors[-1].offset + 1 < os.path.getsize(path)
