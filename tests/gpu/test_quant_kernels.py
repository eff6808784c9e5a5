"""Quantized-expert kernels (gpu_worker.quant_kernels) against a float32 reference from the dequantized weights.

Run on a CUDA machine with `pytest -m gpu tests/gpu/test_quant_kernels.py`; on a CPU with triton installed the
cases on small shapes run under Triton's interpreter (TRITON_INTERPRET=1, which
tests/gpu_worker/test_quant_kernels_interpreted.py sets up).

Stated tolerance: the worst row's relative L2 error below 1e-2. The kernels multiply bf16 activations by
exact bf16 codes (int8 codes; int4 decode's 128 + q) with float32 accumulation and scale in float32, except
int4 prefill and int4 decode at 9-16 rows, which round the weights to bf16 (2^-9 relative; measured worst rows
4.7e-3 against 2.9e-3 exact at Qwen3-30B-A3B's shapes); outputs (and the SwiGLU activations
between the two products) are rounded to bf16: a few 1e-3 per row. Under the interpreter 2e-2: it truncates
float32 to bf16 instead of rounding to nearest, which biases every rounding toward zero. int4 decode, and int8's
down of a few experts launched as a dependent of gate/up (quant_kernels.int8_down_on_mma), run a CUDA kernel
(gpu_worker/mma_decode.cu), which the interpreter cannot run: its cases need a GPU.
"""

from __future__ import annotations

import os

import pytest
import torch

from gpu_worker import mma_decode
from shared.quant import Int8Matrix
from tests.quant_stacks import random_regions, reference_linear, reference_swiglu, worst_row_error

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (torch.cuda.is_available() or INTERPRETED),
                       reason="needs a CUDA GPU (or TRITON_INTERPRET=1 to run the kernels on the CPU)"),
]
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOLERANCE = 2e-2 if INTERPRETED else 1e-2
SMALL, MID = (64, 32), (256, 512)  # (N, K)
GATE, DOWN = (768, 2048), (2048, 768)  # gate/up and down of Qwen3-30B-A3B experts
# uneven, with an empty group; int4 decode takes up to 8 rows per group in one 8-row tile of x, more in two
DECODE_COUNTS, FEW_ROWS_COUNTS, PREFILL_COUNTS = [1, 0, 16, 2], [1, 0, 8, 3], [40, 0, 3, 17]
COUNTS = {"decode": DECODE_COUNTS, "decode8": FEW_ROWS_COUNTS, "prefill": PREFILL_COUNTS}
CUDA_KERNEL_SKIP = "the CUDA decode kernel (int4's, int8's dependent down) is not run by Triton's interpreter"


@pytest.fixture(scope="module")
def qk():
    return pytest.importorskip("gpu_worker.quant_kernels")


def needs_int4_decode(fmt: str, counts: list[int]) -> None:
    if INTERPRETED and fmt == "int4" and 0 < max(counts) <= 16:
        pytest.skip(CUDA_KERNEL_SKIP)


def needs_cuda_kernel() -> None:
    if INTERPRETED:
        pytest.skip(CUDA_KERNEL_SKIP)


def rows(counts: list[int], k: int, seed: int) -> torch.Tensor:
    g = torch.Generator(DEVICE).manual_seed(seed)
    return torch.randn(sum(counts), k, generator=g, device=DEVICE).to(torch.bfloat16)


def poison_allocator(nbytes: int) -> None:
    """Leave NaNs where the next allocations land (CUDA's caching allocator), so a row the kernels never
    write reads as NaN, not as a lucky leftover."""
    if DEVICE.type == "cuda":
        blocks = [torch.full((nbytes // 2,), torch.nan, dtype=torch.bfloat16, device=DEVICE) for _ in range(4)]
        del blocks


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("strided", [True, False], ids=["regions", "stack"])
@pytest.mark.parametrize("regime", COUNTS)
@pytest.mark.parametrize("shape", [SMALL, GATE, DOWN], ids=["tiny", "gate", "down"])
def test_grouped_linear(qk, fmt, strided, regime, shape):
    n, k = shape
    counts = COUNTS[regime]
    needs_int4_decode(fmt, counts)
    (w,) = random_regions(fmt, 6, [shape], DEVICE, seed=n + k + len(counts), strided=strided)
    assert strided == (not w[0].is_contiguous())
    groups = [0, 2, 3, 5]
    x = rows(counts, k, seed=n)
    poison_allocator(sum(counts) * max(n, k) * 2)
    y = qk.grouped_linear(x, w, groups, counts)
    assert y.shape == (sum(counts), n) and y.dtype == torch.bfloat16
    assert worst_row_error(y, reference_linear(x, w, groups, counts)) < TOLERANCE


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("strided", [True, False], ids=["regions", "stack"])
@pytest.mark.parametrize("regime", COUNTS)
@pytest.mark.parametrize("dims", [(64, 64), (768, 2048)], ids=["tiny", "qwen3-30b-a3b"])
def test_swiglu(qk, fmt, strided, regime, dims):
    """strided: gate, up and down of each expert in one region, as streamed into VRAM slots."""
    f, h = dims
    counts = COUNTS[regime]
    needs_int4_decode(fmt, counts)
    gate, up, down = random_regions(fmt, 6, [(f, h), (f, h), (h, f)], DEVICE, seed=f + len(counts),
                                    strided=strided)
    groups = [0, 1, 4, 5]
    x = rows(counts, h, seed=f)
    poison_allocator(sum(counts) * 2 * f * 2)
    y = qk.quant_swiglu_grouped(x, gate, up, down, groups, counts)
    assert y.shape == (sum(counts), h)
    assert worst_row_error(y, reference_swiglu(x, gate, up, down, groups, counts)) < TOLERANCE


@pytest.mark.parametrize("dims", [(768, 2048)], ids=["qwen3-30b-a3b"])
def test_int8_gate_up_of_a_few_experts_takes_one_configuration(qk, dims, monkeypatch):
    """Not the autotuner's pick, which moved between starts (quant_kernels._FEW_EXPERTS_GATE_UP): Triton's pruning
    hook must see the launch's size class and leave that configuration alone, not timed against the others."""
    kernel = qk._int8_decode_kernel
    configs = [(c.kwargs, c.num_warps, c.num_stages) for c in kernel.configs]
    assert configs.count(qk._FEW_EXPERTS_GATE_UP) == 1
    kept_for_gate_up = []
    hook = kernel.early_config_prune

    def spy(candidates, named_args, **kwargs):
        kept = hook(candidates, named_args, **kwargs)
        if kwargs.get("SWIGLU", named_args.get("SWIGLU")):
            kept_for_gate_up.append([(c.kwargs, c.num_warps, c.num_stages) for c in kept])
        return kept
    monkeypatch.setattr(kernel, "early_config_prune", spy)
    f, h = dims
    for key in [key for key in kernel.cache if key[:4] == (f, h, True, qk.FEW_EXPERTS)]:
        del kernel.cache[key]  # an earlier test's launch of the same shape tuned it: tune it here again
    gate, up, down = random_regions("int8", 6, [(f, h), (f, h), (h, f)], DEVICE, seed=3)
    groups, counts = [0, 2, 5], [1, 4, 2]
    x = rows(counts, h, seed=4)
    y = qk.quant_swiglu_grouped(x, gate, up, down, groups, counts)
    assert worst_row_error(y, reference_swiglu(x, gate, up, down, groups, counts)) < TOLERANCE
    assert kept_for_gate_up == [[qk._FEW_EXPERTS_GATE_UP]]


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_many_experts_decode(qk, fmt):
    """Most of a 48-expert stack in one launch (the tuning class for many experts), 1-3 rows each."""
    f, h = MID
    gate, up, down = random_regions(fmt, 48, [(f, h), (f, h), (h, f)], DEVICE, seed=9)
    groups = [g for g in range(48) if g % 7]
    counts = [1 + g % 3 for g in groups]
    needs_int4_decode(fmt, counts)
    x = rows(counts, h, seed=10)
    y = qk.quant_swiglu_grouped(x, gate, up, down, groups, counts)
    assert worst_row_error(y, reference_swiglu(x, gate, up, down, groups, counts)) < TOLERANCE


@pytest.mark.parametrize("rows_each, unrolled", [((1, 3), False), ((9, 8), False), ((9, 8), True)],
                         ids=["one-x-tile", "two-x-tiles", "two-x-tiles-unrolled"])
def test_int4_gate_up_of_a_deeper_ring_matches_the_reference(qk, rows_each, unrolled, monkeypatch):
    """gate/up over every expert of a large model takes a deeper ring (mma_decode.ring_stages), here from any launch,
    at one tile of x and at two: Qwen3-30B-A3B's shapes, 4 warps cutting K, each walking 16 groups of it, so that the
    ring wraps; at two tiles one group at a time, as these 12 experts take it, and in unrolled rounds, as more would."""
    least, spread = rows_each
    f, h = GATE
    gate, up, down = random_regions("int4", 24, [(f, h), (f, h), (h, f)], DEVICE, seed=31)
    groups = list(range(0, 24, 2))
    counts = [least + g % spread for g in groups]
    needs_int4_decode("int4", counts)
    monkeypatch.setattr(mma_decode, "DEEP_RING_BLOCKS", 1)
    if unrolled:
        monkeypatch.setattr(mma_decode, "ONE_GROUP_LOOP_EXPERTS", range(0))
    x_tiles = mma_decode._x_tiles(max(counts))
    assert mma_decode.ring_stages(f, len(groups), True, x_tiles) == mma_decode.DEEP_STAGES[x_tiles - 1]
    assert mma_decode.unrolled_rounds(len(groups), x_tiles) == unrolled
    mma_decode._launch_shape.cache_clear()  # shapes sized before the threshold moved
    try:
        x = rows(counts, h, seed=32)
        y = qk.quant_swiglu_grouped(x, gate, up, down, groups, counts)
    finally:
        mma_decode._launch_shape.cache_clear()
    assert worst_row_error(y, reference_swiglu(x, gate, up, down, groups, counts)) < TOLERANCE


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("dims", [(64, 64), MID], ids=["tiny", "mid"])
@pytest.mark.parametrize("counts", [[0, 3, 0, 0, 1, 16, 0, 0, 0, 2, 0, 0], [0, 1, 0, 0, 1, 1, 0, 0, 0, 1, 0, 0]],
                         ids=["many-rows", "one-row"])
def test_all_experts_with_counts_on_the_device(qk, fmt, dims, counts):
    """Every expert of a stack in the launch, most with no rows (a decode step with its layer all in VRAM):
    the empty ones write nothing and the others match the reference (one row each: one token's step)."""
    f, h = dims
    gate, up, down = random_regions(fmt, 12, [(f, h), (f, h), (h, f)], DEVICE, seed=13)
    needs_int4_decode(fmt, counts)
    x = rows(counts, h, seed=14)
    poison_allocator(sum(counts) * 2 * f * 2)
    y = qk.quant_swiglu_all_experts(x, gate, up, down, torch.tensor(counts, device=DEVICE), used_at_most=4,
                                    rows_at_most=max(counts))
    used = [(g, c) for g, c in enumerate(counts) if c]
    want = reference_swiglu(x, gate, up, down, [g for g, _ in used], [c for _, c in used])
    assert worst_row_error(y, want) < TOLERANCE


def cuda_decode(x, w1, w2, plan, n, k_warps=None):
    """The CUDA kernel's launch on a plan (for int8 too, whose launches decode_linear gives Triton's)."""
    out = x.new_empty((x.shape[0], n))
    mma_decode.decode(x, w1, w2 if w2 is not None else w1, w2 is not None, plan.meta, plan.n_used, plan.used_at_most,
                      plan.rows_at_most, out, k_warps)
    return out


def down_launched_after(qk, x, gate, up, down, plan):
    """The FFN with down on the kernel a dependent launch of it takes, but launched plainly, after gate/up."""
    f, h = gate.shape[1:]
    act = qk.decode_linear(x, gate, up, plan, x.new_empty((x.shape[0], f)))
    if isinstance(down, Int8Matrix) and not qk.int8_down_on_mma(h, f, plan, DEVICE):
        return qk.decode_linear(act, down, None, plan, x.new_empty((x.shape[0], h)))
    return cuda_decode(act, down, None, plan, h)


@pytest.mark.parametrize("strided", [True, False], ids=["regions", "stack"])
@pytest.mark.parametrize("formats", [("int4", "int8"), ("int8", "int4"), ("int8", "int8")],
                         ids=["int4-gate-up", "int8-gate-up", "int8"])
@pytest.mark.parametrize("counts", [FEW_ROWS_COUNTS, [1, 1, 1, 1]], ids=["few-rows", "one-row"])
def test_decode_with_down_launched_as_a_dependent(qk, strided, formats, counts):
    """Q4_K_M's experts (int4 gate/up, int8 down from Q6_K), the reverse, and int8's. Down may start while gate/up
    ends (a dependent launch), whichever kernel gate/up runs: it reads gate/up's output only once that has finished,
    and gives the bits of a launch that starts after."""
    f, h = GATE
    gate_up_fmt, down_fmt = formats
    gate, up, down = random_regions([gate_up_fmt, gate_up_fmt, down_fmt], 6, [(f, h), (f, h), (h, f)], DEVICE,
                                    seed=21, strided=strided)
    groups = [0, 1, 4, 5]
    needs_int4_decode("int4", counts)
    x = rows(counts, h, seed=22)
    y = qk.quant_swiglu_grouped(x, gate, up, down, groups, counts)
    assert worst_row_error(y, reference_swiglu(x, gate, up, down, groups, counts)) < TOLERANCE
    assert torch.equal(down_launched_after(qk, x, gate, up, down, qk.plan_groups(groups, counts, DEVICE)), y)


@pytest.mark.parametrize("down_fmt", ["int4", "int8"], ids=["int4", "q4_k_m-int8-down"])
@pytest.mark.parametrize("unrolled", [False, True], ids=["one-group-loop", "unrolled-rounds"])
def test_down_of_a_few_experts_at_two_x_tiles_on_the_shallowest_ring(qk, down_fmt, unrolled, monkeypatch):
    """8 experts of 9-16 rows: int4's down, and int8's after int4's gate/up (Q4_K_M's experts), take a 2-stage ring
    (mma_decode.ring_stages) on the CUDA kernel, where each warp walks 3 groups of K, one at a time as 8 experts do,
    or (as 4 or 64 experts would) in an unrolled round and the group after it. Launched as a dependent of gate/up
    it gives the reference's rows and the bits of a launch that starts after."""
    needs_cuda_kernel()
    if unrolled:
        monkeypatch.setattr(mma_decode, "ONE_GROUP_LOOP_EXPERTS", range(0))
    assert mma_decode.unrolled_rounds(8, 2) == unrolled
    mma_decode._launch_shape.cache_clear()  # shapes sized with the other loop
    f, h = GATE
    gate, up, down = random_regions(["int4", "int4", down_fmt], 8, [(f, h), (f, h), (h, f)], DEVICE, seed=41)
    groups = list(range(8))
    counts = [9 + g for g in groups]
    assert mma_decode.ring_stages(h, len(groups), False, 2, down_fmt == "int8") == mma_decode.SHALLOWEST_DOWN_STAGES
    assert qk.int8_down_on_mma(h, f, qk.plan_groups(groups, counts, DEVICE), DEVICE) or down_fmt == "int4"
    try:
        x = rows(counts, h, seed=42)
        y = qk.quant_swiglu_grouped(x, gate, up, down, groups, counts)
        launched_after = down_launched_after(qk, x, gate, up, down, qk.plan_groups(groups, counts, DEVICE))
    finally:
        mma_decode._launch_shape.cache_clear()
    assert worst_row_error(y, reference_swiglu(x, gate, up, down, groups, counts)) < TOLERANCE
    assert torch.equal(launched_after, y)


@pytest.mark.parametrize("gate_up_fmt, dims, used, rows_each, on_mma", [
    ("int8", GATE, 4, 3, True), ("int8", GATE, 10, 3, False), ("int4", GATE, 10, 3, False),
    ("int8", GATE, 4, 16, True), ("int8", (96, 80), 4, 3, False)],
    ids=["few-experts", "many-experts", "many-experts-after-int4", "two-x-tiles", "rows-not-in-64s"])
def test_int8_down_launched_as_a_dependent_on_either_kernel(qk, gate_up_fmt, dims, used, rows_each, on_mma):
    """int8's down as a dependent of gate/up runs on the CUDA kernel for up to INT8_MMA_DOWN_EXPERTS experts of up to
    16 rows, where it takes the shape (not 80 rows); else on Triton's, launched as a dependent from
    INT8_DEPENDENT_LAUNCH_FROM experts (its first tile of weights loaded before it waits), after either gate/up
    (Q4_K_M's is int4). Either gives the reference's rows and the bits of a launch that starts after."""
    f, h = dims
    gate, up, down = random_regions([gate_up_fmt, gate_up_fmt, "int8"], 12, [(f, h), (f, h), (h, f)], DEVICE,
                                    seed=23)
    groups = list(range(used))
    counts = [rows_each - g % 3 for g in groups]  # at most rows_each, none empty
    plan = qk.plan_groups(groups, counts, DEVICE)
    assert qk.int8_down_on_mma(h, f, plan, DEVICE) == (on_mma and qk._grid_dependency(DEVICE))
    x = rows(counts, h, seed=24)
    y = qk.quant_swiglu_grouped(x, gate, up, down, groups, counts)
    assert worst_row_error(y, reference_swiglu(x, gate, up, down, groups, counts)) < TOLERANCE
    assert torch.equal(down_launched_after(qk, x, gate, up, down, plan), y)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_prefill_over_more_experts_than_one_pass_dequantizes(qk, fmt):
    """A prompt whose rows reach more experts than prefill dequantizes at once: done in passes, every row right.
    Widths of 256 and 512: at 64, bf16 rounding alone puts the worst of some 200 rows near the tolerance."""
    f, h = MID
    n = qk.PREFILL_EXPERTS_PER_PASS + 9
    gate, up, down = random_regions(fmt, n + 2, [(f, h), (f, h), (h, f)], DEVICE, seed=11)
    groups = [g for g in range(n + 2) if g != 3]
    counts = [17 if g % 5 == 0 else g % 4 for g in groups]  # some above the decode limit, some empty
    x = rows(counts, h, seed=12)
    poison_allocator(sum(counts) * 2 * f * 2)
    y = qk.quant_swiglu_grouped(x, gate, up, down, groups, counts)
    assert worst_row_error(y, reference_swiglu(x, gate, up, down, groups, counts)) < TOLERANCE


def test_decode_and_prefill_agree(qk):
    """The two regimes compute the same function: the same rows through both give near-equal outputs."""
    needs_int4_decode("int4", [16, 16])
    (w,) = random_regions("int4", 4, [MID], DEVICE, seed=11)
    x = rows([16, 16], MID[1], seed=12)
    plan = qk.plan_groups([1, 3], [16, 16], DEVICE)
    decoded = qk.decode_linear(x, w, None, plan, x.new_empty((32, MID[0])))
    dense = qk.dequantize_used(w, plan, x.new_empty((2, *MID)))
    prefilled = torch._grouped_mm(x, dense.transpose(-2, -1), offs=plan.ends)
    assert worst_row_error(decoded, prefilled.float()) < TOLERANCE


def test_no_rows(qk):
    (w,) = random_regions("int4", 2, [SMALL], DEVICE, seed=0)
    y = qk.grouped_linear(torch.empty(0, SMALL[1], dtype=torch.bfloat16, device=DEVICE), w, [0, 1], [0, 0])
    assert y.shape == (0, SMALL[0])


@pytest.mark.parametrize("fmt, swiglu", [("int4", False), ("int4", True), ("int8", False)],
                         ids=["int4", "int4-swiglu", "int8"])
@pytest.mark.parametrize("counts", [[1, 16, 2], [1, 8, 2], [1, 1, 1]], ids=["two-x-tiles", "one-x-tile", "one-row"])
def test_mma_decode_cut_along_k_matches_the_reference(qk, fmt, swiglu, counts):
    """Warps of a block cut K and add their sums: any number of them (cuts of unequal length included) gives
    the reference's rows. A plan of one row per expert takes the kernel that computes only x's first row and keeps
    two sums a lane, which also gives the general kernel's bits on the same plan (8 warps: one sum a warp in the
    block's reduction; fewer: the sums shared out by (i, nt))."""
    needs_cuda_kernel()
    f, h = MID
    w1, w2 = random_regions(fmt, 4, [(f, h), (f, h)], DEVICE, seed=21)
    groups = [0, 2, 3]
    x = rows(counts, h, seed=22)
    plan = qk.plan_groups(groups, counts, DEVICE)
    want = reference_linear(x, w1, groups, counts)
    if swiglu:
        want = torch.nn.functional.silu(want) * reference_linear(x, w2, groups, counts)
    for k_warps in (1, 3, 4, 8):  # as many as a block holds: warps x tiles of x, and shared memory
        warps = k_warps * (2 if swiglu else 1)
        x_tiles = mma_decode._x_tiles(max(counts))
        stages = mma_decode.ring_stages(f, len(groups), swiglu, x_tiles, fmt == "int8")
        if (warps * x_tiles > mma_decode._BLOCK_WARPS
                or mma_decode._shared_bytes(warps, x_tiles, stages, fmt == "int8") > mma_decode._shared_limit(DEVICE)):
            continue
        poison_allocator(sum(counts) * f * 2)
        y = cuda_decode(x, w1, w2 if swiglu else None, plan, f, k_warps)
        assert worst_row_error(y, want) < TOLERANCE, k_warps
        if plan.rows_at_most == 1:
            general = cuda_decode(x, w1, w2 if swiglu else None, plan._replace(rows_at_most=2), f, k_warps)
            assert torch.equal(y, general), k_warps


@pytest.mark.parametrize("fmt", ["int4", "int8"])
@pytest.mark.parametrize("misaligned", ["start", "stride"])
def test_mma_decode_takes_rows_that_are_not_16_byte_aligned(qk, fmt, misaligned):
    """The CUDA kernel copies x 16 bytes at a time: rows that start off a 16-byte boundary, or lie a stride apart
    that is not a multiple of 16 bytes, give the same output as the same rows packed (two tiles of x)."""
    needs_cuda_kernel()
    counts = DECODE_COUNTS
    n, k = MID
    (w,) = random_regions(fmt, 4, [(n, k)], DEVICE, seed=31)
    groups = [0, 1, 2, 3]
    x = rows(counts, k, seed=32)
    first, width = (2, k + 8) if misaligned == "start" else (0, k + 4)  # 4 bytes in / 1,032 bytes apart
    wide = torch.zeros(x.shape[0], width, dtype=x.dtype, device=DEVICE)
    wide[:, first : first + k] = x
    view = wide[:, first : first + k]
    assert (view.data_ptr() % 16 != 0, view.stride(0) % 8 != 0) == (misaligned == "start", misaligned == "stride")
    plan = qk.plan_groups(groups, counts, DEVICE)
    packed = cuda_decode(x, w, None, plan, n)
    assert torch.equal(cuda_decode(view, w, None, plan, n), packed)
    assert worst_row_error(packed, reference_linear(x, w, groups, counts)) < TOLERANCE
