"""GGUF reading: config parsing, zero-copy views, dequantization, and clear errors for bad files."""

from __future__ import annotations

import os
import re
import struct
from dataclasses import replace

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFEndian, GGUFReader, GGUFValueType, GGUFWriter, quants

from shared.gguf_file import GGUFModel, dequantize, file_identity
from shared.gguf_write import _add_value, write_model
from shared.model_config import ModelConfig, ModelError, config_to_metadata, tensor_shapes


def tiny_config(arch: str = "qwen3moe") -> ModelConfig:
    return ModelConfig(
        arch=arch, n_layers=2, hidden=64, n_heads=4, n_kv_heads=4 if arch == "olmoe" else 2, head_dim=16,
        rope_base=10000.0, norm_eps=1e-6, n_experts=8, n_experts_used=2, expert_ffn=32, vocab_size=96,
        context_length=256, shared_expert_ffn=64 if arch == "qwen2moe" else 0,
    )


def random_tensors(cfg: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in tensor_shapes(cfg).items()}


@pytest.mark.parametrize("arch", ["qwen3moe", "qwen2moe", "llama", "olmoe"])
def test_config_round_trips_through_metadata(tmp_path, arch):
    cfg = tiny_config(arch)
    write_model(tmp_path / "m.gguf", cfg, random_tensors(cfg))
    model = GGUFModel(tmp_path / "m.gguf")
    assert model.config == cfg
    assert model.config.norm_topk_prob == (arch in ("qwen3moe", "llama"))


def test_views_are_zero_copy_and_experts_slice_the_merged_tensor(tmp_path):
    cfg = tiny_config()
    tensors = random_tensors(cfg)
    write_model(tmp_path / "m.gguf", cfg, tensors)
    model = GGUFModel(tmp_path / "m.gguf")
    raw = model.raw("blk.1.ffn_down_exps.weight")
    assert isinstance(raw.base, np.memmap) or isinstance(raw, np.memmap)
    assert not raw.flags.writeable
    with open(tmp_path / "m.gguf", "rb") as f:
        f.seek(model.file_offset("blk.1.ffn_down_exps.weight"))
        assert f.read(64) == tensors["blk.1.ffn_down_exps.weight"].tobytes()[:64]
    expected = torch.from_numpy(tensors["blk.1.ffn_down_exps.weight"][5])
    assert torch.equal(model.expert(1, "ffn_down_exps", 5), expected)
    assert model.expert(1, "ffn_gate_exps", 3).shape == (cfg.expert_ffn, cfg.hidden)


def test_shared_expert_gate_written_as_a_row_is_accepted(tmp_path):
    """Newer llama.cpp converters store qwen2moe's ffn_gate_inp_shexp as (1, H) instead of (H,)."""
    cfg = tiny_config("qwen2moe")
    tensors = random_tensors(cfg)
    tensors["blk.0.ffn_gate_inp_shexp.weight"] = tensors["blk.0.ffn_gate_inp_shexp.weight"][None, :]
    write_model(tmp_path / "m.gguf", cfg, tensors)
    assert GGUFModel(tmp_path / "m.gguf").tensor("blk.0.ffn_gate_inp_shexp.weight").shape == (cfg.hidden,)


@pytest.mark.parametrize("qtype", [Q.F32, Q.Q8_0])
def test_experts_stored_with_a_fourth_dimension_of_one_are_read_by_expert(tmp_path, qtype):
    """ggml's tensors have four dimensions; a writer that keeps the fourth (1) gives the reader (1, E, F, H), which
    llama.cpp loads. Each expert's matrix and bytes are those of the same model written with three."""
    cfg = tiny_config()
    tensors = random_tensors(cfg)
    name = "blk.0.ffn_gate_exps.weight"
    qtypes = {} if qtype == Q.F32 else {name: qtype}
    if qtypes:
        a = tensors[name]
        tensors[name] = quants.quantize(a.reshape(-1, a.shape[-1]), qtype).reshape(*a.shape[:-1], -1)
    write_model(tmp_path / "three.gguf", cfg, tensors, qtypes=qtypes)
    tensors[name] = tensors[name][None]
    write_model(tmp_path / "four.gguf", cfg, tensors, qtypes=qtypes)
    three, four = GGUFModel(tmp_path / "three.gguf"), GGUFModel(tmp_path / "four.gguf")
    stored = next(t for t in GGUFReader(tmp_path / "four.gguf").tensors if t.name == name)
    assert len(stored.shape) == 4 and stored.data.shape[0] == 1
    for index in (0, cfg.n_experts - 1):
        assert np.array_equal(four.expert_bytes(0, "ffn_gate_exps", index),
                              three.expert_bytes(0, "ffn_gate_exps", index))
        assert torch.equal(four.expert(0, "ffn_gate_exps", index), three.expert(0, "ffn_gate_exps", index))
        assert torch.equal(four.expert_view(0, "ffn_gate_exps", index), three.expert_view(0, "ffn_gate_exps", index))


def _q4_k_block_reference(block: bytes) -> np.ndarray:
    """Scalar decoding of one Q4_K super-block, straight from llama.cpp's dequantize_row_q4_K."""
    d, dmin = np.frombuffer(block[:4], dtype=np.float16).astype(np.float32)
    scales, qs = block[4:16], block[16:]

    def scale_min(j: int) -> tuple[int, int]:
        if j < 4:
            return scales[j] & 63, scales[j + 4] & 63
        return (scales[j + 4] & 0xF) | ((scales[j - 4] >> 6) << 4), (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4)

    out = []
    for j in range(0, 8, 2):
        chunk = qs[j * 16 : j * 16 + 32]
        for half, shift in ((j, 0), (j + 1, 4)):
            sc, m = scale_min(half)
            out += [d * sc * ((q >> shift) & 0xF) - dmin * m for q in chunk]
    return np.array(out, dtype=np.float32)


def test_q4_k_dequantization_matches_llama_cpp_formula():
    rng = np.random.default_rng(1)
    blocks = rng.integers(0, 256, size=(3, 144), dtype=np.uint8)
    blocks[:, :4] = np.frombuffer(np.array([0.02, 0.01], dtype=np.float16).tobytes(), dtype=np.uint8)
    got = dequantize(blocks.reshape(1, -1), Q.Q4_K).reshape(3, 256).numpy()
    for b in range(3):
        np.testing.assert_allclose(got[b], _q4_k_block_reference(blocks[b].tobytes()), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("qtype, tolerance", [(Q.F16, 1e-3), (Q.BF16, 1e-2), (Q.Q8_0, 1e-2), (Q.Q4_0, 0.2)])
def test_quantized_tensors_read_back_close_to_the_original(tmp_path, qtype, tolerance):
    cfg = tiny_config()
    tensors = random_tensors(cfg)
    name = "blk.0.ffn_up_exps.weight"
    stored = quants.quantize(tensors[name], qtype)
    if qtype == Q.F16:
        tensors[name] = stored
        qtypes = {}
    else:
        tensors[name] = stored.view(np.uint8)
        qtypes = {name: qtype}
    write_model(tmp_path / "m.gguf", cfg, tensors, qtypes=qtypes)
    model = GGUFModel(tmp_path / "m.gguf")
    assert model.qtype(name) == qtype
    original = torch.from_numpy(random_tensors(cfg)[name])
    got = model.tensor(name)
    assert got.shape == original.shape
    relative = ((got - original).norm() / original.norm()).item()
    assert relative < tolerance


# --- bad files: each names its problem ---------------------------------------------------------------


def _write(tmp_path, cfg, tensors, metadata=(), qtypes=()):
    path = tmp_path / "bad.gguf"
    write_model(path, cfg, tensors, metadata, qtypes)
    return path


def test_unknown_architecture(tmp_path):
    cfg = tiny_config()
    path = _write(tmp_path, cfg, random_tensors(cfg), {"general.architecture": "gpt5moe"})
    with pytest.raises(ModelError, match="unknown architecture 'gpt5moe'"):
        GGUFModel(path)


def test_dense_model_without_experts(tmp_path):
    cfg = tiny_config("llama")
    path = _write(tmp_path, cfg, random_tensors(cfg), {"llama.expert_count": 0})
    with pytest.raises(ModelError, match="has no experts"):
        GGUFModel(path)


def test_missing_tensor(tmp_path):
    cfg = tiny_config()
    tensors = random_tensors(cfg)
    del tensors["blk.1.ffn_up_exps.weight"]
    with pytest.raises(ModelError, match=r"tensor blk\.1\.ffn_up_exps\.weight is missing"):
        GGUFModel(_write(tmp_path, cfg, tensors))


def test_a_tensor_the_metadata_does_not_call_for_is_refused(tmp_path):
    """As llama.cpp refuses it: a block_count one short served the model without its last layer."""
    cfg = tiny_config()
    path = _write(tmp_path, cfg, random_tensors(cfg), {"qwen3moe.block_count": 1})
    with pytest.raises(ModelError, match=r"bad.gguf: tensor blk\.1\.attn_norm\.weight \(and \d+ more\) is not part of "
                                         "the model its metadata describes"):
        GGUFModel(path)


def test_qwen2moe_shared_expert_without_its_length_is_refused(tmp_path):
    """Without expert_shared_feed_forward_length the model was served without its shared expert, whose tensors
    were in the file."""
    cfg = tiny_config("qwen2moe")
    path = _write(tmp_path, cfg, random_tensors(cfg))
    key = b"qwen2moe.expert_shared_feed_forward_length"
    path.write_bytes(path.read_bytes().replace(key, key[:-1] + b"X"))
    with pytest.raises(ModelError, match=r"bad.gguf: tensor blk\.0\.ffn_gate_inp_shexp\.weight \(and \d+ more\) is "
                                         "not part of the model its metadata describes"):
        GGUFModel(path)


def test_missing_metadata_key(tmp_path):
    cfg = tiny_config()
    path = _write(tmp_path, cfg, random_tensors(cfg))
    data = path.read_bytes().replace(b"qwen3moe.block_count", b"qwen3moe.block_cnt__")
    path.write_bytes(data)
    with pytest.raises(ModelError, match=r"metadata key qwen3moe\.block_count is missing"):
        GGUFModel(path)


@pytest.mark.parametrize("key, value, text", [
    ("qwen3moe.block_count", "x", r"qwen3moe\.block_count is 'x', not an integer"),
    ("qwen3moe.embedding_length", [1, 2], r"qwen3moe\.embedding_length is \[1, 2\], not an integer"),
    ("qwen3moe.attention.head_count", 0, "head_count is 0: a model needs attention heads"),
    ("qwen3moe.attention.head_count_kv", 0, "n_kv_heads must be at least 1, not 0"),
    ("qwen3moe.attention.key_length", 15, "an attention head of 15 dimensions: RoPE needs an even number"),
    ("qwen3moe.context_length", 0, "context_length must be at least 1, not 0"),
    ("qwen3moe.attention.layer_norm_rms_epsilon", "tiny", r"layer_norm_rms_epsilon is 'tiny', not a finite number"),
    ("qwen3moe.rope.freq_base", 0.0, r"rope_base must be above 0, not 0\.0"),
    ("qwen3moe.rope.freq_base", -1e4, r"rope_base must be above 0, not -10000\.0"),
    ("qwen3moe.attention.layer_norm_rms_epsilon", -1.0, r"norm_eps must be >= 0, not -1\.0"),
    ("qwen3moe.expert_weights_norm", "false", r"qwen3moe\.expert_weights_norm is 'false', not a boolean"),
    ("tokenizer.ggml.tokens", 96, r"tokenizer\.ggml\.tokens is 96, not an array"),
])
def test_metadata_of_the_wrong_type_or_range_is_named(tmp_path, key, value, text):
    """Values the config is built from: a division by zero or a bare TypeError deep inside was all a user saw, and
    a RoPE base of 0 or below or a negative norm epsilon loaded and gave NaN logits."""
    cfg = tiny_config()
    path = _write(tmp_path, cfg, random_tensors(cfg), {key: value})
    with pytest.raises(ModelError, match=f"bad.gguf: .*{text}"):
        GGUFModel(path)


def test_a_block_count_beyond_the_files_tensors_is_refused_before_layers_are_listed(tmp_path):
    """The expected tensors are listed layer by layer: a corrupt count of 10**9 layers kept the loader busy, its
    memory growing, long before any tensor was found missing."""
    cfg = tiny_config()
    path = _write(tmp_path, cfg, random_tensors(cfg), {"qwen3moe.block_count": 10**9})
    with pytest.raises(ModelError, match=r"bad.gguf: .*block_count is 1000000000, but the file has only \d+ tensors"):
        GGUFModel(path)


@pytest.mark.parametrize("metadata, text", [
    ({"qwen3moe.rope.scaling.type": "yarn", "qwen3moe.rope.scaling.factor": 4.0}, "rope scaling 'yarn'"),
    ({"qwen3moe.rope.scaling.type": "linear", "qwen3moe.rope.scaling.factor": 2.0}, "rope scaling 'linear'"),
    # a factor with no type, and an older file's factor: llama.cpp scales linearly (they were served unscaled)
    ({"qwen3moe.rope.scaling.factor": 4.0}, "rope scaling 'linear' by 4.0"),
    ({"qwen3moe.rope.scale_linear": 4.0}, "rope scaling 'linear' by 4.0"),
    ({"qwen3moe.rope.dimension_count": 8}, "rotates 8 of each head's 16 dimensions"),
])
def test_rope_the_forward_does_not_compute_is_named(tmp_path, metadata, text):
    """llama.cpp scales RoPE's angles (YaRN, linear) or rotates part of each head where the file says so; the
    forward rotates every dimension by the unscaled angles, so such a file would be served with other logits."""
    cfg = tiny_config()
    path = _write(tmp_path, cfg, random_tensors(cfg), metadata)
    with pytest.raises(ModelError, match=text):
        GGUFModel(path)


def test_rope_scaling_that_changes_nothing_is_accepted(tmp_path):
    cfg = tiny_config()
    metadata = {"qwen3moe.rope.scaling.type": "none", "qwen3moe.rope.dimension_count": cfg.head_dim}
    assert GGUFModel(_write(tmp_path, cfg, random_tensors(cfg), metadata)).config == cfg


@pytest.mark.parametrize("extra", [-1, 1])
def test_a_tokenizer_that_is_not_the_embeddings_vocabulary_is_named(tmp_path, extra):
    """More tokens than embedding rows: a valid-looking prompt id would index past the table; fewer: a sampled id
    could not be decoded, and its stream would never end."""
    cfg = tiny_config()
    tokens = [f"t{i}" for i in range(cfg.vocab_size + extra)]
    path = _write(tmp_path, cfg, random_tensors(cfg), {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": tokens})
    with pytest.raises(ModelError, match=f"the tokenizer has {len(tokens)} tokens .* token_embd.weight has "
                                         f"{cfg.vocab_size} rows"):
        GGUFModel(path)


def test_metadata_strings_that_are_not_utf8_are_a_corrupt_file(tmp_path):
    cfg = tiny_config()
    path = _write(tmp_path, cfg, random_tensors(cfg), {"general.name": "tierserve-test"})
    data = path.read_bytes()
    at = data.index(b"tierserve-test")
    path.write_bytes(data[:at] + b"\xff\xfe" + data[at + 2 :])
    with pytest.raises(ModelError, match="GGUF metadata is corrupt"):
        GGUFModel(path)


def test_wrong_shape(tmp_path):
    cfg = tiny_config()
    tensors = random_tensors(cfg)
    tensors["blk.0.ffn_gate_inp.weight"] = np.zeros((cfg.n_experts + 1, cfg.hidden), dtype=np.float32)
    expected = r"tensor blk\.0\.ffn_gate_inp\.weight has shape \(9, 64\), expected \(8, 64\)"
    with pytest.raises(ModelError, match=expected):
        GGUFModel(_write(tmp_path, cfg, tensors))


@pytest.mark.parametrize("name, value", [
    ("blk.0.attn_norm.weight", np.nan), ("blk.1.attn_k_norm.weight", -np.inf), ("output_norm.weight", np.inf),
])
def test_a_norm_that_is_not_finite_is_refused(tmp_path, name, value):
    """One NaN in a norm makes every token's logits NaN: the model loaded and served garbage."""
    cfg = tiny_config()
    tensors = random_tensors(cfg)
    tensors[name][3] = value
    with pytest.raises(ModelError, match=f"bad.gguf: tensor {re.escape(name)} holds NaN or infinite values"):
        GGUFModel(_write(tmp_path, cfg, tensors))


def test_an_embedding_of_no_dimensions_is_refused(tmp_path):
    """The vocabulary's size is read from the embedding's rows: a 0-d one failed with a bare IndexError."""
    cfg = tiny_config()
    path = tmp_path / "bad.gguf"
    writer = GGUFWriter(path, cfg.arch)
    for key, value in config_to_metadata(cfg).items():
        if key != "general.architecture":
            _add_value(writer, key, value)
    for name, array in {**random_tensors(cfg), "token_embd.weight": np.zeros((), dtype=np.float32)}.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelError, match=r"bad.gguf: tensor token_embd\.weight has shape \(\), expected \(vocab, 64\)"):
        GGUFModel(path)


def test_unsupported_quant_type(tmp_path):
    cfg = tiny_config()
    tensors = random_tensors(cfg)
    name = "blk.0.ffn_down_exps.weight"
    e, h, f = tensors[name].shape
    # Q4_1 is a real ggml type that tierserve does not serve.
    tensors[name] = np.zeros((e, h, f // 32 * 20), dtype=np.uint8)
    with pytest.raises(ModelError, match=r"tensor blk\.0\.ffn_down_exps\.weight has unsupported quant type Q4_1"):
        GGUFModel(_write(tmp_path, cfg, tensors, qtypes={name: Q.Q4_1}))


def test_truncated_file(tmp_path):
    cfg = tiny_config()
    path = _write(tmp_path, cfg, random_tensors(cfg))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 4096])
    with pytest.raises(ModelError, match="truncated"):
        GGUFModel(path)


def _tensor_offset_field(data: bytes, name: str) -> int:
    """Where the tensor index stores the tensor's data offset: after its name, dimensions and type."""
    at = data.index(name.encode()) + len(name)
    n_dims = struct.unpack_from("<I", data, at)[0]
    return at + 4 + 8 * n_dims + 4


def _tiny_file_edited(tmp_path, edit):
    """A tiny model's file, its bytes changed in place by `edit`."""
    cfg = tiny_config()
    path = _write(tmp_path, cfg, random_tensors(cfg))
    data = bytearray(path.read_bytes())
    edit(data)
    path.write_bytes(bytes(data))
    return path


def _share_gate_bytes_with_up(data: bytearray) -> None:
    gate, up = (_tensor_offset_field(data, f"blk.0.ffn_{kind}_exps.weight") for kind in ("gate", "up"))
    data[up : up + 8] = data[gate : gate + 8]


def _misalign_down(data: bytearray) -> None:
    at = _tensor_offset_field(data, "blk.1.ffn_down_exps.weight")
    struct.pack_into("<Q", data, at, struct.unpack_from("<Q", data, at)[0] + 4)


def test_tensors_that_share_bytes_are_refused(tmp_path):
    """As llama.cpp refuses them: two tensors over the same bytes were served, one with the other's weights."""
    path = _tiny_file_edited(tmp_path, _share_gate_bytes_with_up)
    with pytest.raises(ModelError, match=r"bad.gguf: tensors blk\.0\.ffn_(gate|up)_exps\.weight and "
                                         r"blk\.0\.ffn_(gate|up)_exps\.weight overlap"):
        GGUFModel(path)


def test_a_tensor_off_the_files_alignment_is_refused(tmp_path):
    """As llama.cpp refuses it: an offset off the alignment is a corrupt tensor index, and was served as it read."""
    path = _tiny_file_edited(tmp_path, _misalign_down)
    with pytest.raises(ModelError, match=r"bad.gguf: tensor blk\.1\.ffn_down_exps\.weight starts at \d+ bytes into "
                                         r"the data, not a multiple of the file's alignment \(32\)"):
        GGUFModel(path)


def test_truncated_header(tmp_path):
    cfg = tiny_config()
    path = _write(tmp_path, cfg, random_tensors(cfg))
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ModelError, match="truncated or corrupt"):
        GGUFModel(path)


def test_a_tensor_type_the_gguf_package_does_not_know_is_named_so(tmp_path):
    """It was reported as a truncated or corrupt file."""
    cfg = tiny_config()
    path = _write(tmp_path, cfg, random_tensors(cfg))
    data = bytearray(path.read_bytes())
    at = data.index(b"token_embd.weight") + len(b"token_embd.weight")  # its tensor info: dims, then its type
    struct.pack_into("<I", data, at + 4 + 8 * struct.unpack_from("<I", data, at)[0], 99)
    path.write_bytes(bytes(data))
    with pytest.raises(ModelError, match=r"a tensor's type is not one the gguf package knows \(.*99\)? is not a valid "
                                         r"GGMLQuantizationType\): a quant type newer than the package, or a corrupt"):
        GGUFModel(path)


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "random.bin"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(ModelError, match="not a GGUF file"):
        GGUFModel(path)


def test_corrupt_counts_in_header(tmp_path):
    cfg = tiny_config()
    path = _write(tmp_path, cfg, random_tensors(cfg))
    data = bytearray(path.read_bytes())
    data[16:24] = (2**40).to_bytes(8, "little")  # metadata key count
    path.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="truncated or corrupt"):
        GGUFModel(path)


def test_a_metadata_array_longer_than_the_file_is_refused_before_it_is_read(tmp_path):
    """The reader walks an array item by item, and past the end of the file an item reads as nothing: a corrupt
    length of 2**40 one-byte items went on looping, its lists growing, for as long as the length said."""
    cfg = tiny_config()
    path = _write(tmp_path, cfg, random_tensors(cfg), {"general.tags": [7, 7]})
    data = bytearray(path.read_bytes())
    at = data.index(b"general.tags") + len(b"general.tags") + 4  # past the key and its value type (array)
    data[at : at + 12] = struct.pack("<IQ", GGUFValueType.UINT8, 2**40)
    path.write_bytes(bytes(data))
    with pytest.raises(ModelError, match=f"truncated or corrupt .*array claims {2**40} items"):
        GGUFModel(path)


def test_a_metadata_array_of_numbers_is_one_view_and_an_array_of_arrays_is_refused(tmp_path):
    """Read item by item, a corrupt count the file could still hold took about 700 bytes of RAM an item (27 million
    items in a 112 MB model ran the process out of memory); nested arrays, 2,000 deep, overflowed the recursion."""
    cfg = tiny_config()
    path = _write(tmp_path, cfg, random_tensors(cfg), {"general.tags": [7, 7]})
    data = bytearray(path.read_bytes())
    at = data.index(b"general.tags") + len(b"general.tags") + 4  # past the key and its value type (array)
    item_type, _ = struct.unpack_from("<IQ", data, at)
    count = (len(data) - at - 12) // GGUFReader.gguf_scalar_to_np[GGUFValueType(item_type)]().itemsize
    data[at : at + 12] = struct.pack("<IQ", item_type, count)  # items to the end of the file
    path.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="truncated or corrupt"):  # nothing left for the tensors' descriptions
        GGUFModel(path)
    data[at : at + 12] = struct.pack("<IQ", item_type, 2)
    path.write_bytes(bytes(data))
    model = GGUFModel(path)
    # the key's three parts, then the array's item type, count and items
    assert model.metadata["general.tags"] == [7, 7] and len(model._reader.fields["general.tags"].parts) == 6
    data[at : at + 12] = struct.pack("<IQ", GGUFValueType.ARRAY, 2)
    path.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="truncated or corrupt .*a metadata array of arrays"):
        GGUFModel(path)


def test_a_big_endian_file_and_a_tensor_offset_that_wraps_around_are_refused_by_name(tmp_path):
    """A big-endian f16 file failed with numpy's byte-order ValueError (a traceback in every role), an f32 one while
    serving; an offset past 2^64 wrapped in the reader's sum and pointed a tensor at the file's header."""
    cfg = tiny_config()
    path = tmp_path / "big.gguf"
    writer = GGUFWriter(path, cfg.arch, endianess=GGUFEndian.BIG)
    for key, value in config_to_metadata(cfg).items():
        if key != "general.architecture":
            _add_value(writer, key, value)
    for name, array in random_tensors(cfg).items():
        writer.add_tensor(name, array.astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelError, match="a big-endian GGUF file"):
        GGUFModel(path)
    path = _write(tmp_path, cfg, random_tensors(cfg))
    model = GGUFModel(path)
    name = "blk.0.ffn_gate_inp.weight"
    offset = model.file_offset(name) - model._reader.data_offset  # its offset as the file stores it
    data = bytearray(path.read_bytes())
    at = data.index(struct.pack("<Q", offset), data.index(name.encode()))
    data[at : at + 8] = struct.pack("<Q", 2**64 - model._reader.data_offset)
    path.write_bytes(bytes(data))
    with pytest.raises(ModelError, match=f"tensor {name} starts before the file's tensor data"):
        GGUFModel(path)


def test_the_experts_axis_of_a_one_expert_model_must_be_there(tmp_path):
    """A model of one expert whose expert tensors were stored as matrices passed the shape check (leading ones are
    dropped for vectors), then each expert read as a row: the system said it was ready and every request failed."""
    cfg = replace(tiny_config(), n_experts=1, n_experts_used=1)
    tensors = random_tensors(cfg)
    name = "blk.0.ffn_gate_exps.weight"
    tensors[name] = tensors[name][0]
    with pytest.raises(ModelError, match=re.escape(f"tensor {name} has shape (32, 64), expected (1, 32, 64)")):
        GGUFModel(_write(tmp_path, cfg, tensors))


def test_missing_file(tmp_path):
    with pytest.raises(ModelError, match="no such model file"):
        GGUFModel(tmp_path / "nope.gguf")


def test_no_model_or_a_directory_is_named_as_such(tmp_path):
    """An unset model (the config's empty string) was reported as ".: no such model file"."""
    with pytest.raises(ModelError, match="^no model given: name a GGUF file with --model"):
        GGUFModel("")
    with pytest.raises(ModelError, match="a directory, not a model file"):
        GGUFModel(tmp_path)


def test_float_experts_are_zero_copy_views_of_the_file(tmp_path):
    cfg = tiny_config()
    tensors = random_tensors(cfg)
    name = "blk.1.ffn_gate_exps.weight"
    tensors[name] = quants.quantize(tensors[name], Q.BF16).view(np.uint8)
    write_model(tmp_path / "m.gguf", cfg, tensors, qtypes={name: Q.BF16})
    model = GGUFModel(tmp_path / "m.gguf")
    for layer in (0, 1):  # f32 and bf16
        view = model.expert_view(layer, "ffn_gate_exps", 6)
        assert view.data_ptr() == model.expert_bytes(layer, "ffn_gate_exps", 6).ctypes.data
        assert torch.equal(view.float(), model.expert(layer, "ffn_gate_exps", 6))
    assert model.expert_view(1, "ffn_gate_exps", 6).dtype == torch.bfloat16


def test_a_model_is_known_by_its_content_not_its_path_or_modification_time(tmp_path):
    cfg = tiny_config()
    path = tmp_path / "m.gguf"
    write_model(path, cfg, random_tensors(cfg))
    copy = tmp_path / "copy.gguf"
    copy.write_bytes(path.read_bytes())
    link = tmp_path / "link.gguf"
    link.symlink_to(path)
    os.utime(copy, (1, 1))
    assert file_identity(path) == file_identity(copy) == file_identity(link) == GGUFModel(link).identity
    other = tmp_path / "other.gguf"
    write_model(other, cfg, random_tensors(cfg, seed=1))
    assert file_identity(other) != file_identity(path)
