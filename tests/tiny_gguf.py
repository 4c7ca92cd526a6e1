"""Small GGUF files written with the `gguf` package, for the store tests (not loadable models)."""
import numpy as np
import gguf


def write_tiny_gguf(path, arch="llama", file_type=15, context_length=2048, embedding_length=16,
                    template=None, extra=None, tensors=None, endian=gguf.GGUFEndian.LITTLE):
    """A tiny `arch` GGUF: a few tensors, a 6-token vocabulary and the usual metadata keys.

    `extra` adds keys: {key: value} (type inferred by gguf) or {key: (value, GGUFValueType)}.
    Returns the total parameter count (sum of tensor element counts).
    """
    w = gguf.GGUFWriter(str(path), arch, endianess=endian)
    w.add_name("tiny test model")
    w.add_file_type(file_type)
    w.add_context_length(context_length)
    w.add_embedding_length(embedding_length)
    w.add_block_count(1)
    w.add_tokenizer_model("llama")
    w.add_token_list(["<unk>", "<s>", "</s>", "a", "b", "c"])
    w.add_token_scores([0.0, 0.0, 0.0, -1.0, -2.0, -3.0])
    if template is not None:
        w.add_chat_template(template)
    for key, value in (extra or {}).items():
        if isinstance(value, tuple):
            w.add_key_value(key, value[0], value[1])
        elif isinstance(value, list):
            w.add_array(key, value)
        elif isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        else:
            w.add_string(key, value)
    count = 0
    for name, shape in (tensors or {"token_embd.weight": (6, embedding_length),
                                    "blk.0.attn_norm.weight": (embedding_length,),
                                    "output_norm.weight": (embedding_length,)}).items():
        data = np.zeros(shape, dtype=np.float32)
        w.add_tensor(name, data)
        count += data.size
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return count
