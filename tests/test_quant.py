"""Quantized serving formats: exact conversion from GGUF blocks, error bounds, the CPU kernels against a plain
decoding of the layout, and the accuracy of a whole forward with quantized experts against the oracle."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import quants

from shared.expert_cache import ensure_expert_cache
from shared.expert_source import ExpertSource
from shared.gguf_file import GGUFModel
from shared.gguf_write import write_model
from shared.make_model import make_model
from shared.model_config import EXPERT_TENSOR_KINDS, ModelConfig, expert_tensor_name, tensor_shapes
from shared.quant import (
    INT8_CONVERT_ROWS,
    INT8_DEQUANTIZE_ROWS,
    Int4Matrix,
    Int8Matrix,
    dequantize_matrix,
    int4_from_blocks,
    int8_from_blocks,
    int8_from_float,
    layer_formats,
    linear,
    pack_int4,
    quantized_ffn,
    serving_format,
)
from shared.quantize import quantize_rows
from shared.reference import ReferenceModel, expert_ffn

BF16_ROUNDING = 2.0**-8  # relative error of rounding a float32 to bfloat16 (8 significant bits)


def wide_config(n_layers: int = 2) -> ModelConfig:
    """Experts with 256-value rows and 256 rows, so every matrix splits into Q4_K blocks and int4 row tiles."""
    return ModelConfig(arch="qwen3moe", n_layers=n_layers, hidden=256, n_heads=4, n_kv_heads=2, head_dim=16,
                       rope_base=1e6, norm_eps=1e-6, n_experts=4, n_experts_used=2, expert_ffn=256, vocab_size=96,
                       context_length=128)


def write_quantized(path, qtypes: dict[int, Q | tuple[Q, Q, Q]], seed: int = 0) -> GGUFModel:
    """A model whose layer i's experts are stored as qtypes[i] (one type, or gate's, up's and down's), from
    Gaussian values with per-row offsets (so Q4_K blocks get non-zero mins, unlike make_model's zero-mean ones);
    everything else F32."""
    cfg = wide_config(len(qtypes))
    rng = np.random.default_rng(seed)
    tensors, stored = {}, {}
    for name, shape in tensor_shapes(cfg).items():
        values = (rng.standard_normal(shape) * 0.05).astype(np.float32)
        layer = int(name.split(".")[1]) if name.startswith("blk.") else -1
        kinds = qtypes[layer] if isinstance(qtypes.get(layer), tuple) else (qtypes.get(layer),) * 3
        qtype = next((q for kind, q in zip(EXPERT_TENSOR_KINDS, kinds, strict=True) if f".{kind}." in name), Q.F32)
        if qtype != Q.F32:
            values += rng.uniform(-0.05, 0.05, size=shape[:-1] + (1,)).astype(np.float32)
            rows = values.reshape(-1, shape[-1])
            tensors[name] = quantize_rows(rows, qtype).reshape(*shape[:-1], -1)
            stored[name] = qtype
        else:
            tensors[name] = values
    write_model(path, cfg, tensors, qtypes=stored)
    return GGUFModel(path)


@pytest.fixture(scope="module")
def wide_models(tmp_path_factory):
    d = tmp_path_factory.mktemp("wide")
    return {q.name: write_quantized(d / f"{q.name}.gguf", {0: q, 1: q}) for q in (Q.Q4_0, Q.Q4_K, Q.Q8_0)}


@pytest.fixture(scope="module")
def small_models(tmp_path_factory):
    d = tmp_path_factory.mktemp("small")
    paths = {}
    for dtype in ("q8_0", "q4_0", "q4_k", "q4_k_m", "q5_k"):
        make_model(d / f"small-{dtype}.gguf", preset="small", dtype=dtype, seed=3)
        paths[dtype] = GGUFModel(d / f"small-{dtype}.gguf")
    return paths


def expert_matrices(model: GGUFModel, layer: int, e: int):
    shapes = tensor_shapes(model.config)
    for kind in EXPERT_TENSOR_KINDS:
        name = expert_tensor_name(layer, kind)
        yield model.expert_bytes(layer, kind, e), model.qtype(name), shapes[name][1:], model.expert(layer, kind, e)


# ---- formats


def test_serving_format_rule():
    assert serving_format(Q.BF16, (100, 70)) == "float"
    assert serving_format(Q.F32, (64, 64)) == "float"
    assert serving_format(Q.Q4_0, (128, 64)) == "int4"
    assert serving_format(Q.Q4_K, (64, 256)) == "int4"
    assert serving_format(Q.Q4_0, (32, 64)) == "int8"  # rows not in 64-row tiles
    assert serving_format(Q.Q8_0, (128, 64)) == "int8"
    assert serving_format(Q.Q6_K, (128, 256)) == "int8"
    assert serving_format(Q.Q5_K, (128, 256)) == "int8"
    assert layer_formats(["int4", "int4", "int4"]) == ("int4", "int4", "int4")
    assert layer_formats(["int4", "int4", "int8"]) == ("int4", "int4", "int8")  # a Q4_K_M layer with Q6_K down
    assert layer_formats(["float", "float", "float"]) == ("float", "float", "float")
    assert layer_formats(["float", "float", "int4"]) == ("int8", "int8", "int4")  # all of a layer in the cache
    assert layer_formats(["float", "int4", "int4"]) == ("int8", "int8", "int4")  # gate and up in one format
    assert layer_formats(["int4", "int8", "int8"]) == ("int8", "int8", "int8")


def test_int4_decoding_follows_the_spec_layout_of_torchs_packing():
    """dequantize_matrix reads (n, k) at byte (n // 64) * K * 32 + k * 32 + n % 32, low nibble for n % 64 < 32;
    torch's packing of known codes must decode back to them."""
    n, k = 192, 96
    gen = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (n, k), dtype=torch.int32, generator=gen)
    scale_zero = torch.randn(k // 32, n, 2, generator=gen).to(torch.bfloat16)
    m = Int4Matrix(torch._convert_weight_to_int4pack_for_cpu(q, 2), scale_zero)
    s, z = (scale_zero[..., i].float().repeat_interleave(32, dim=0).T for i in (0, 1))
    assert torch.equal(dequantize_matrix(m), (q.float() - 8) * s + z)
    assert m.shape == (n, k)


def test_int4_packing_is_torchs():
    codes = np.random.default_rng(5).integers(0, 16, (192, 96), dtype=np.uint8)
    expected = torch._convert_weight_to_int4pack_for_cpu(torch.from_numpy(codes.astype(np.int32)), 2)
    assert np.array_equal(pack_int4(codes), expected.numpy())


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_K"])
def test_int4_from_q4_blocks_equals_ggufs_dequantization_up_to_bf16_scales(wide_models, qtype):
    """Every 4-bit code is kept: W = (q - 8) s + z with s, z the block's exact values rounded to bf16, so per weight
    |int4 - gguf| <= 2^-8 (8 |s| + |z|) (|q - 8| <= 8), plus float32 rounding of gguf's own arithmetic."""
    model = wide_models[qtype]
    for layer, e in ((0, 0), (1, 3)):
        for raw, stored, shape, reference in expert_matrices(model, layer, e):
            m = int4_from_blocks(raw, stored, shape)
            s, z = (m.scale_zero[..., i].float().abs().repeat_interleave(32, dim=0).T for i in (0, 1))
            bound = BF16_ROUNDING / (1 - BF16_ROUNDING) * (8 * s + z) + 1e-6 * reference.abs().max()
            error = (dequantize_matrix(m) - reference).abs()
            assert (error <= bound).all(), float((error - bound).max())
            assert error.max() > 0 or qtype == "Q4_0"  # Q4_K's bf16 scales do round (a test that can fail)
            if qtype == "Q4_K":
                assert m.scale_zero[..., 1].abs().max() > 0  # these blocks have mins: z is exercised


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K"])
def test_int8_error_is_within_half_a_step_per_row(wide_models, qtype):
    """Per-row absmax: |W - q scale| <= scale / 2 per weight (scale the stored bf16 one)."""
    for raw, stored, shape, reference in expert_matrices(wide_models[qtype], 1, 2):
        m = int8_from_blocks(raw, stored, shape)
        error = (dequantize_matrix(m) - reference).abs()
        assert (error <= m.scale.float()[:, None] / 2 * (1 + 1e-6) + 1e-9).all()
        assert m.q.abs().max() == 127  # the absmax of each row uses the full range


@pytest.mark.parametrize("qtype, scales_at", [(Q.Q5_K, 0), (Q.Q6_K, 208)])
def test_int8_from_k_quant_blocks_is_within_half_a_step(qtype, scales_at):
    """Q5_K and Q6_K (which make_model does not write): random blocks with sane f16 super-block scales."""
    n, k = 64, 512
    block_bytes = {Q.Q5_K: 176, Q.Q6_K: 210}[qtype]
    blocks = np.random.default_rng(4).integers(0, 256, (n, k // 256, block_bytes), dtype=np.uint8)
    scales = np.full(2, 0.001, dtype=np.float16).view(np.uint8)  # Q5_K: d and dmin; Q6_K: d
    scales = scales[: block_bytes - scales_at]
    blocks[..., scales_at : scales_at + len(scales)] = scales
    raw = blocks.reshape(n, -1)
    reference = torch.from_numpy(quants.dequantize(raw, qtype)).reshape(n, k)
    m = int8_from_blocks(raw, qtype, (n, k))
    error = (dequantize_matrix(m) - reference).abs()
    assert reference.abs().max() > 0
    assert (error <= m.scale.float()[:, None] / 2 * (1 + 1e-6) + 1e-9).all()


def test_int8_error_is_within_half_a_step_for_rows_of_tiny_values():
    """Rows whose scale (largest value / 127) is below bf16's smallest normal, 2^-126 (largest values below about
    1.5e-36), where it has fewer significant bits or rounds to 0, still keep every weight within half a step of the
    stored scale."""
    gen = torch.Generator().manual_seed(5)
    magnitudes = torch.tensor([1.0, 1e-36, 3e-38, 1e-39, 1e-41, 1e-44])
    w = torch.randn(len(magnitudes), 64, generator=gen) * magnitudes[:, None]
    m = int8_from_float(w)
    error = (dequantize_matrix(m) - w).abs()
    assert (m.scale.float() > 0).all()
    assert (error <= m.scale.float()[:, None] / 2).all()


def test_int8_codes_and_scales_of_known_rows_on_both_sides_of_a_conversion_chunk():
    """Rows [1, -1/2, 1/4, 0] times powers of two: scale bf16(1/127) = 2^-7 * 1.0078125 times the same power (bf16
    keeps 8 significant bits), codes round(w / scale) = [127, -64, 32, 0] in every row; an all-zero row (the last
    of a chunk and the first of the next) has scale 0 and codes 0."""
    n = INT8_CONVERT_ROWS + 3
    powers = 2.0 ** (torch.arange(n) % 7 - 3)
    w = torch.tensor([1.0, -0.5, 0.25, 0.0]) * powers[:, None]
    zero = [INT8_CONVERT_ROWS - 1, INT8_CONVERT_ROWS]
    w[zero] = 0
    m = int8_from_float(w)
    expected_q = torch.tensor([127, -64, 32, 0], dtype=torch.int8).repeat(n, 1)
    expected_q[zero] = 0
    expected_scale = 2.0**-7 * 1.0078125 * powers
    expected_scale[zero] = 0
    assert torch.equal(m.q, expected_q)
    assert torch.equal(m.scale, expected_scale.to(torch.bfloat16)) and torch.equal(m.scale.float(), expected_scale)


# A child process converts one Q6_K matrix of (8192, 4096) (28 MB stored, 134 MB as float32) to int8 and prints
# how far the conversion raised its peak resident memory.
_CONVERSION_PEAK_CHILD = """
import resource
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from shared.quant import convert_matrix
torch.set_num_threads(1)
n, k = 8192, 4096
blocks = np.random.default_rng(0).integers(0, 256, (n, k // 256, 210), dtype=np.uint8)
blocks[..., 208:210] = np.array([0.001], np.float16).view(np.uint8)  # sane super-block scales
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
m = convert_matrix(blocks.reshape(n, -1), Q.Q6_K, (n, k), "int8")
print(blocks.nbytes, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""


def test_int8_conversion_needs_a_few_times_the_stored_bytes_not_many_float_copies_of_the_matrix():
    """A build converts in one process per core: converting the whole matrix at once took ~19x its stored bytes
    (whole-matrix float32 temporaries), here ~530 MB. Chunks of rows need the int8 result (1.2x the stored bytes
    of Q6_K) and a few chunks' temporaries: measured 2.5x."""
    done = subprocess.run([sys.executable, "-c", _CONVERSION_PEAK_CHILD], capture_output=True, text=True,
                          timeout=120, cwd=Path(__file__).parent.parent)
    assert done.returncode == 0, done.stderr
    stored, growth = map(int, done.stdout.split())
    assert growth < 4 * stored, f"converting {stored / 1e6:.0f} MB raised the peak RSS by {growth / 1e6:.0f} MB"


@pytest.mark.parametrize("qtype", ["Q4_0", "Q8_0"])
def test_kernels_match_the_decoded_matrix(wide_models, qtype):
    """torch's CPU kernels (bf16 in, bf16 out) against the decoded matrix times the same bf16 activations in fp32:
    they differ by the bf16 rounding of the result and accumulation order, well under 2^-7 of the largest output."""
    convert = int4_from_blocks if qtype == "Q4_0" else int8_from_blocks
    x = torch.randn(7, 256, generator=torch.Generator().manual_seed(1))
    for raw, stored, shape, _ in expert_matrices(wide_models[qtype], 0, 1):
        m = convert(raw, stored, shape)
        expected = x.bfloat16().float() @ dequantize_matrix(m).T
        got = linear(x, m)
        assert got.dtype == torch.float32 and got.shape == (7, shape[0])
        assert (got - expected).abs().max() <= 2.0**-7 * expected.abs().max()
        assert torch.equal(linear(x[3], m), got[3])  # a lone row (the oracle's per-token call)
        assert linear(x[:0], m).shape == (0, shape[0])


def test_quantized_ffn_of_float_weights_is_the_oracles_expert_ffn_bit_for_bit():
    gen = torch.Generator().manual_seed(2)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(5, 64, generator=gen).to(dtype)
        gate, up, down = (torch.randn(shape, generator=gen).to(dtype) for shape in ((32, 64), (32, 64), (64, 32)))
        assert torch.equal(quantized_ffn(x, gate, up, down), expert_ffn(x, gate, up, down))


def test_quantized_matrices_on_another_device_are_left_to_the_gpu_kernels():
    m = Int8Matrix(torch.empty(64, 64, dtype=torch.int8, device="meta"), torch.empty(64, dtype=torch.bfloat16,
                                                                                       device="meta"))
    with pytest.raises(NotImplementedError, match="gpu_worker"):
        linear(torch.empty(2, 64, device="meta"), m)


# ---- a whole forward


def log_likelihood(logits: torch.Tensor, tokens: list[int]) -> float:
    """Mean log-probability of each next token of the sequence."""
    return float(logits[:-1].log_softmax(-1).gather(1, torch.tensor(tokens[1:])[:, None]).mean())


@pytest.mark.parametrize("dtype, max_logit_error", [("q8_0", 0.05), ("q4_0", 0.01), ("q4_k", 0.01), ("q4_k_m", 0.02),
                                                    ("q5_k", 0.05)])
def test_forward_with_quantized_experts_stays_close_to_the_oracle(small_models, tmp_path, dtype, max_logit_error):
    """The oracle's forward on the GGUF-dequantized weights against the same forward whose routed experts run
    quantized_ffn on the served format (bf16 activations into torch's int8 / int4 kernels), over a fixed 64-token
    sequence of the small preset. Bounds: mean log-likelihood difference < 0.01 nats; at positions whose top-k
    routing is the same in every layer, max |logit difference| < 1% of max |logit| for int4 (every 4-bit code
    kept; measured 0.3-0.6%) and < 5% for int8 (Q8_0's per-block codes requantized per row, which adds up to
    half a step per weight; measured 2.9%, and < 5% for q5_k, whose experts are requantized likewise: an int8
    step of up to 0.9 of Q5_K's finest; measured 1.2%, and 0.006 nats), < 2% for q4_k_m (int4 gate and up; down
    int4 in half the layers and Q6_K requantized per row to int8 in the others; measured 0.4%); routing differs
    at no more than 4 of the 64 positions (near-ties of the router flip under any perturbation: bf16 activations
    with the float weights flip some too, and there a logit moves by up to ~15% of the largest)."""
    model = small_models[dtype]
    cache = ensure_expert_cache(model, tmp_path, workers=1, progress=lambda *a: None)
    source = ExpertSource(model, cache)
    oracle = ReferenceModel(model)
    tokens = np.random.default_rng(7).integers(0, model.config.vocab_size, 64).tolist()
    expected_routing: list[torch.Tensor] = []
    expected = oracle.forward(tokens, expected_routing)
    oracle.expert = lambda layer, e, x: quantized_ffn(x, *source.weights(layer, e))
    routing: list[torch.Tensor] = []
    got = oracle.forward(tokens, routing)
    same = torch.stack([(a.sort(1).values == b.sort(1).values).all(1)
                        for a, b in zip(expected_routing, routing, strict=True)]).all(0)
    error = (got - expected).abs().max(1).values / expected.abs().max()
    nats = abs(log_likelihood(got, tokens) - log_likelihood(expected, tokens))
    formats = ", ".join(dict.fromkeys(map(source.format, range(model.config.n_layers))))
    print(f"{dtype} as {formats}: max |logit diff| / max |logit| = {float(error[same].max()):.2e} at "
          f"{int(same.sum())} positions routed alike, {float(error.max()):.2e} at all; mean log-likelihood "
          f"difference {nats:.2e} nats")
    assert nats < 0.01
    assert int((~same).sum()) <= 4
    assert 0 < float(error[same].max()) < max_logit_error  # > 0: the quantized path really ran


@pytest.mark.parametrize("rows", [INT8_DEQUANTIZE_ROWS - 1, INT8_DEQUANTIZE_ROWS, 64])
def test_int8_linear_is_within_its_bound_on_both_sides_of_the_dequantize_threshold(rows):
    gen = torch.Generator().manual_seed(rows)
    m = int8_from_float(torch.randn(256, 512, generator=gen) * 0.05)
    x = torch.randn(rows, 512, generator=gen)
    expected = x.bfloat16().float() @ dequantize_matrix(m).T
    got = linear(x, m)
    assert got.dtype == torch.float32 and got.shape == (rows, 256)
    assert (got - expected).abs().max() <= 2.0**-7 * expected.abs().max()

def test_one_row_on_bf16_weights_takes_the_gemv_and_leaves_onednn_as_it_was():
    gen = torch.Generator().manual_seed(3)
    w = (torch.randn(96, 256, generator=gen) * 0.05).bfloat16()
    x = torch.randn(2, 256, generator=gen)
    expected = x.bfloat16().float() @ w.float().T
    for row in (x[:1], x[0]):  # a (1, K) batch and the oracle's lone 1-D row
        got = linear(row, w)
        assert got.shape == (*row.shape[:-1], 96)
        assert (got.reshape(-1) - expected[0]).abs().max() <= 2.0**-7 * expected[0].abs().max()
    assert torch.backends.mkldnn.enabled
