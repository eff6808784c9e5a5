"""The native grouped SwiGLU (shared/native/grouped_ffn.c through shared.native_kernels), compiled for real: its
results against the float computation on the decoded weights and against torch's per-expert kernels, when
grouped_ffn takes it, what it refuses, and how its build fails."""

from __future__ import annotations

import gc
import json
import logging
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from shared import native_kernels
from shared.expert_math import grouped_ffn
from shared.native_kernels import BuildError, build_library, grouped_swiglu, load_library, openmp_runtimes
from shared.process import torch_threads
from shared.quant import INT8_DEQUANTIZE_ROWS, Int8Matrix, dequantize_matrix, quantized_ffn
from tests.quant_stacks import expert_of, random_regions, reference_swiglu

# Against fp32 on the decoded weights: the kernel rounds x, the gate and up products, h and the output to bf16,
# each a relative error of at most 2^-9 per value; through two products of random-signed terms they add up to a
# few 1e-3 of the largest output (measured 3-5e-3), so 2e-2 has a margin of four, while a wrong nibble, scale,
# row or expert is an error of the order of the output itself.
REFERENCE_TOLERANCE = 2e-2
# Against torch's kernels on the same weights: the same roundings, only the fp32 sums in another order, so where
# they differ a bf16 rounding went the other way: at most one bf16 step of an output (2^-7 of the largest one),
# plus as much again for the steps of h that feed it (measured up to 3e-3 of the largest output).
TORCH_TOLERANCE = 2.0**-6
# Share of outputs whose bits differ from torch's: up to 2.3% on CPUs without bf16 instructions, 8.1% on one with
# AVX512-BF16 and AMX (torch's int8 kernel then sums its products in another order: 12.7% of one expert's rows). A
# rounding of h otherwise than torch's (bf16 activations) makes a quarter of them differ (25%): 12% tells it apart.
DIFFERING_SHARE = 0.12

# (format, ffn, hidden): int8 takes any rows and columns (96 and 80 are neither whole 64-row tiles nor whole
# 64-column steps of the kernel); int4 needs both multiples of 64. "a+b": gate and up in a, down in b (Q4_K_M's
# int4 beside int8), where int4 needs only its own rows in 64-row tiles and its columns in groups of 32.
SHAPES = [("int8", 128, 256), ("int8", 96, 80), ("int4", 128, 256), ("int4", 192, 64), ("int4+int8", 128, 96),
          ("int8+int4", 96, 128)]
COUNTS = [1, 15, 4, 0, 7, 2]  # rows per expert: every count of the native path's range, and an empty group


def experts(fmt: str, ffn: int, hidden: int, n: int, seed: int = 0) -> list[tuple]:
    """`n` random experts in format `fmt` (or gate and up in one, down in another: "int4+int8"), each matrix a
    view of its expert's region of a shared buffer, as the expert cache serves them."""
    fmt_in, _, fmt_out = fmt.partition("+")
    cpu = torch.device("cpu")
    if not fmt_out:
        gate, up, down = random_regions(fmt, n, [(ffn, hidden), (ffn, hidden), (hidden, ffn)], cpu, seed=seed)
    else:
        gate, up = random_regions(fmt_in, n, [(ffn, hidden), (ffn, hidden)], cpu, seed=seed)
        (down,) = random_regions(fmt_out, n, [(hidden, ffn)], cpu, seed=seed + 1)
    return [(expert_of(gate, e), expert_of(up, e), expert_of(down, e)) for e in range(n)]


def reference(x: torch.Tensor, weights: list[tuple], counts: list[int]) -> torch.Tensor:
    stacks = [type(weights[0][i])(*(torch.stack([w[i][j] for w in weights]) for j in range(2))) for i in range(3)]
    return reference_swiglu(x, *stacks, list(range(len(weights))), counts)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt, ffn, hidden", SHAPES)
def test_matches_the_decoded_weights_and_torchs_kernels(fmt, ffn, hidden, dtype):
    """In both activation dtypes: bf16 ones also round silu(gate) on torch's path (a GPU worker sends bf16)."""
    weights = experts(fmt, ffn, hidden, len(COUNTS))
    x = torch.randn(sum(COUNTS), hidden, generator=torch.Generator().manual_seed(1)).to(dtype)
    got = grouped_swiglu(x, weights, COUNTS)
    assert got is not None and got.dtype == x.dtype and got.shape == x.shape
    ref = reference(x.float(), weights, COUNTS)
    scale = float(ref.abs().max())
    assert float((got.float() - ref).abs().max()) <= REFERENCE_TOLERANCE * scale
    starts = torch.tensor([0, *COUNTS]).cumsum(0).tolist()
    by_torch = torch.cat([quantized_ffn(x[a:b], *w) for a, b, w in zip(starts[:-1], starts[1:], weights, strict=True)])
    assert float((got.float() - by_torch.float()).abs().max()) <= TORCH_TOLERANCE * scale
    # and few outputs differ at all, where the sums' order flips a rounding (DIFFERING_SHARE)
    assert float((got != by_torch).float().mean()) <= DIFFERING_SHARE


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_ffn_takes_the_native_path_below_the_gemm_threshold(dtype, monkeypatch):
    weights = experts("int8", 128, 256, 3, seed=2)
    x = torch.randn(9, 256, generator=torch.Generator().manual_seed(3)).to(dtype)
    native = grouped_swiglu(x, weights, [2, 3, 4])
    assert native is not None

    def per_expert(*args: object) -> None:
        raise AssertionError("grouped_ffn took torch's per-expert path")
    monkeypatch.setattr("shared.expert_math.quantized_ffn", per_expert)  # the two paths may give the same bits
    assert torch.equal(grouped_ffn(x, [0, 1, 2], [2, 3, 4], weights.__getitem__), native)


def test_batches_of_gemm_size_and_float_weights_stay_on_torchs_path():
    weights = experts("int4", 64, 128, 2, seed=4)
    x = torch.randn(INT8_DEQUANTIZE_ROWS + 1, 128)
    counts = [INT8_DEQUANTIZE_ROWS, 1]
    assert grouped_swiglu(x, weights, counts) is None
    loop = torch.cat([quantized_ffn(x[:INT8_DEQUANTIZE_ROWS], *weights[0]), quantized_ffn(x[-1:], *weights[1])])
    assert torch.equal(grouped_ffn(x, [0, 1], counts, weights.__getitem__), loop)
    floats = [tuple(torch.randn(shape) for shape in ((64, 128), (64, 128), (128, 64)))]
    assert grouped_swiglu(x[:2], floats, [2]) is None


def test_experts_or_gates_and_ups_in_different_formats_and_strided_tensors_are_left_to_torch():
    int8, int4 = experts("int8", 64, 128, 1)[0], experts("int4", 64, 128, 1)[0]
    x = torch.randn(2, 128)
    assert grouped_swiglu(x, [int8, int4], [1, 1]) is None
    assert grouped_swiglu(x[:1], [(int4[0], int8[1], int4[2])], [1]) is None  # gate and up read x in one order
    gate = int8[0]
    strided = Int8Matrix(gate.q.t().contiguous().t(), gate.scale)  # same values, column-major
    assert grouped_swiglu(x[:1], [(strided, *int8[1:])], [1]) is None


def test_shapes_that_do_not_fit_raise_value_error():
    weights = experts("int8", 64, 128, 2)
    x = torch.randn(3, 128)
    with pytest.raises(ValueError, match="counts"):
        grouped_swiglu(x, weights, [1, 1])  # 2 rows counted, 3 given
    with pytest.raises(ValueError, match="x has shape"):
        grouped_swiglu(x[0], weights, [1, 2])
    with pytest.raises(ValueError, match="expert 0 is 2 matrices"):
        grouped_swiglu(x, [weights[0][:2], weights[1]], [1, 2])
    with pytest.raises(ValueError, match="expert 1 down"):
        grouped_swiglu(x, [weights[0], (*weights[1][:2], experts("int8", 64, 64, 1)[0][2])], [1, 2])
    with pytest.raises(ValueError, match="expert 0 gate"):
        grouped_swiglu(torch.randn(3, 64), weights, [1, 2])  # hidden 64 against (64, 128) matrices
    with pytest.raises(ValueError, match="int4 down needs hidden a multiple of 64"):
        grouped_swiglu(torch.randn(1, 96), experts("int4", 64, 96, 1), [1])
    with pytest.raises(ValueError, match="int4 gate and up need ffn a multiple of 64"):
        grouped_swiglu(torch.randn(1, 128), experts("int4+int8", 96, 128, 1), [1])


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_gates_far_below_zero_give_silus_zero_not_nan(fmt):
    """Large activations put some gate products below -88, where exp(-gate) overflows: silu is -0 there, as on
    torch's path, not the NaN an unclamped exponent gives under -ffast-math."""
    weights = experts(fmt, 128, 256, 1, seed=9)
    x = 40 * torch.randn(8, 256, generator=torch.Generator().manual_seed(10))
    assert float((x @ dequantize_matrix(weights[0][0]).float().t()).min()) < -88, "the case this test is about"
    got = grouped_swiglu(x, weights, [8])
    by_torch = quantized_ffn(x, *weights[0])
    assert got is not None and bool(torch.isfinite(got).all())
    scale = float(by_torch.float().abs().max())
    assert float((got.float() - by_torch.float()).abs().max()) <= TORCH_TOLERANCE * scale


def test_int4_matrices_of_a_million_columns_fit_the_usual_8_mib_stacks():
    """The kernel's stack use does not grow with a matrix's columns: an int4 down matrix of 2^20 (its ffn) under
    8 MiB stacks, the usual default for a process and for the threads it starts. In a process of its own: an
    overflow is a segfault."""
    script = """
import torch
from shared.native_kernels import grouped_swiglu
from shared.quant import quantized_ffn
from tests.quant_stacks import expert_of, random_regions
shapes = [(1 << 20, 64), (1 << 20, 64), (64, 1 << 20)]
weights = tuple(expert_of(m, 0) for m in random_regions("int4", 1, shapes, torch.device("cpu"), seed=11))
x = torch.randn(4, 64, generator=torch.Generator().manual_seed(12)).bfloat16()
got, by_torch = grouped_swiglu(x, [weights], [4]).float(), quantized_ffn(x, *weights).float()
print(float((got - by_torch).abs().max() / by_torch.abs().max()))
"""
    stack = 8 << 20
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1],
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_STACK, (stack, stack)))
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout) <= TORCH_TOLERANCE


# A lane request: 3 real rows of 5, 3 experts each among 6; experts 0-2, 4 and 5 held here, 3 not; 0, 1, 2 and 5
# owned (4 is held but another host's in this request). Pair order within an expert is the rows' order.
LANE_IDS = [[0, 5, 4], [2, 0, 3], [5, 1, 0]]
LANE_HELD = [0, 1, 2, 4, 5]
LANE_OWNED = [0, 1, 2, 5]


def lane_request(fmt: str, ffn: int, hidden: int, dtype: torch.dtype, ids: list[list[int]] = LANE_IDS,
                 padded: int = 5) -> tuple:
    weights = experts(fmt, ffn, hidden, 6, seed=7)
    table = native_kernels.layer_table({e: weights[e] for e in LANE_HELD}, 6, hidden, ffn)
    generator = torch.Generator().manual_seed(8)
    x = torch.randn(len(ids), hidden, generator=generator).to(dtype)
    route = torch.rand(len(ids), len(ids[0]), generator=generator)
    owned = torch.zeros(6, dtype=torch.bool)
    owned[LANE_OWNED] = True
    out = torch.full((padded, hidden), 7.0, dtype=dtype)  # nothing the kernel writes
    return weights, table, torch.tensor(ids, dtype=torch.int32), route, owned, x, out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt, ffn, hidden", SHAPES)
def test_a_lane_request_in_one_call_is_the_weighted_sum_of_the_grouped_calls_outputs(fmt, ffn, hidden, dtype):
    weights, table, ids, route, owned, x, out = lane_request(fmt, ffn, hidden, dtype)
    assert table is not None
    pairs = native_kernels.lane_swiglu(table, ids, route, owned, x, out)
    assert pairs == sum(e in LANE_OWNED for row in LANE_IDS for e in row) == 7
    # the grouped call on the same groups (an expert's rows in the rows' order: int4 sums a block of rows at once)
    pairs_of = {e: [(r, j) for r, row in enumerate(LANE_IDS) for j, f in enumerate(row) if f == e] for e in LANE_OWNED}
    slots = [pair for e in LANE_OWNED for pair in pairs_of[e]]
    outputs = grouped_swiglu(x[[r for r, _ in slots]], [weights[e] for e in LANE_OWNED],
                             [len(pairs_of[e]) for e in LANE_OWNED]).float()
    want = torch.zeros(len(LANE_IDS), hidden)
    for (r, j), output in zip(slots, outputs, strict=True):
        want[r] += route[r, j] * output
    got = out.float()
    # the same bf16 outputs summed in another order: fp32 rounding, then bf16's where the lane is bf16
    tolerance = (2.0**-7 if dtype == torch.bfloat16 else 1e-5) * float(want.abs().max())
    assert float((got[: len(LANE_IDS)] - want).abs().max()) <= tolerance
    assert not got[len(LANE_IDS) :].any(), "the padding's rows are zeros"


def test_a_lane_request_the_kernel_does_not_take_is_left_unwritten():
    """An id out of range, an owned expert not held, an expert with a GEMM's rows or activations in fp16: None
    and nothing written, so the grouped path computes it or names what is wrong."""
    for ids in ([[0, 6, 1]], [[0, 3, 1]]):
        weights, table, ids_t, route, owned, x, out = lane_request("int8", 128, 256, torch.float32, ids, padded=2)
        if ids[0][1] == 3:
            owned[3] = True
        before = out.clone()
        assert native_kernels.lane_swiglu(table, ids_t, route, owned, x, out) is None
        assert torch.equal(out, before)
    gemm = [[0, 1]] * INT8_DEQUANTIZE_ROWS
    weights, table, ids_t, route, owned, x, out = lane_request("int4", 128, 256, torch.float32, gemm, padded=16)
    assert native_kernels.lane_swiglu(table, ids_t, route, owned, x, out) is None
    assert native_kernels.lane_swiglu(table, ids_t[:-1], route[:-1], owned, x[:-1], out) == 2 * 15
    half = lane_request("int8", 128, 256, torch.float16, padded=3)
    assert native_kernels.lane_swiglu(*half[1:]) is None


def test_a_layer_table_takes_only_what_the_kernel_computes():
    assert native_kernels.layer_table({}, 6, 256, 128) is None
    floats = {0: tuple(torch.randn(shape) for shape in ((64, 128), (64, 128), (128, 64)))}
    assert native_kernels.layer_table(floats, 6, 128, 64) is None
    assert native_kernels.layer_table({0: experts("int4+int8", 96, 128, 1)[0]}, 6, 128, 96) is None  # int4 tiles
    table = native_kernels.layer_table({5: experts("int8", 64, 128, 1)[0]}, 6, 128, 64)
    assert table is not None and table.pointers[: 5 * 48] == bytes(5 * 48) and any(table.pointers[5 * 48 :])
    with pytest.raises(ValueError, match="expert 6 is not one of the layer's 6"):
        native_kernels.layer_table({6: experts("int8", 64, 128, 1)[0]}, 6, 128, 64)


def test_same_bits_on_any_number_of_threads_and_alternating_with_torchs_threads():
    """Each output is one task's sum in a fixed order, so threads change no bit. torch's parallel ops in between
    share its OpenMP runtime (one pool of threads: pip's torch ships the libgomp.so.1 the library links)."""
    weights = experts("int4", 128, 256, 4, seed=5)
    x = torch.randn(8, 256)
    counts = [1, 3, 2, 2]
    with torch_threads(1):
        one = grouped_swiglu(x, weights, counts)
    big = torch.randn(512, 512)
    with torch_threads(2):
        for _ in range(20):
            assert torch.equal(grouped_swiglu(x, weights, counts), one)
            big = torch.tanh(big @ big)  # torch's own parallel region between the kernel's
    if (Path(torch.__file__).parent / "lib" / "libgomp.so.1").exists():  # else torch's runtime has another name
        assert len(openmp_runtimes()) == 1


@pytest.mark.parametrize("fmt", ["int4", "int8", "int4+int8"])
def test_down_tiles_wait_for_their_own_experts_h_however_the_threads_run(fmt):
    """Threads out of phase-1 tasks start on down tiles without a barrier, each waiting for its own expert's h.
    The first expert's 15 rows make its phase-1 tiles the slowest, and its down tiles come first: the other
    threads reach them long before its h is written. Calls alternate between two inputs, since a down tile that
    did not wait would read the h the call before left in the same scratch memory. More threads than CPUs,
    experts of no rows, and a lane request (the same 15 rows on the first expert) alike give the bits of one
    thread, every time."""
    weights = experts(fmt, 256, 512, 6, seed=11)
    counts = [15, 0, 1, 1, 0, 1]
    inputs = [torch.randn(sum(counts), 512) for _ in range(2)]
    lanes = [lane_request(fmt, 256, 512, torch.float32, [[0, 1 + r % 5] for r in range(15)], padded=15)
             for _ in range(2)]
    lanes[1][5].neg_()  # its x: the other lane request's, negated
    with torch_threads(1):
        expected = [grouped_swiglu(x, weights, counts) for x in inputs]
        for lane in lanes:
            assert native_kernels.lane_swiglu(*lane[1:]) is not None
        expected_lanes = [lane[-1].clone() for lane in lanes]
    with torch_threads(7):
        for i in range(100):
            assert torch.equal(grouped_swiglu(inputs[i % 2], weights, counts), expected[i % 2])
            lane = lanes[i % 2]
            lane[-1].fill_(7.0)
            native_kernels.lane_swiglu(*lane[1:])
            assert torch.equal(lane[-1], expected_lanes[i % 2])


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="two threads on two CPUs of their own need two CPUs")
def test_binding_takes_torchs_threads_and_keeps_later_ones_on_the_cpus():
    """In a process of its own (binding this one would hold the rest of the tests to two CPUs): torch's second
    thread, started before, is bound to the second CPU alone and the calling thread to both; threads started
    after (a team of three) run on the two CPUs, not on the calling thread's first one."""
    script = """
import json, os, torch
from shared.native_kernels import pin_threads
cores = sorted(os.sched_getaffinity(0))[-2:][::-1]
tasks = lambda: set(os.listdir("/proc/self/task"))
torch.set_num_threads(2)
torch.ones(1 << 22).sum()
before = tasks()
bound = pin_threads(cores)
masks = {tid: sorted(os.sched_getaffinity(int(tid))) for tid in tasks()}
torch.set_num_threads(3)
torch.ones(1 << 24).sum()
later = [sorted(os.sched_getaffinity(int(tid))) for tid in tasks() - set(masks)]
print(json.dumps({"cores": cores, "bound": bound, "main": masks[str(os.getpid())], "new": sorted(set(masks) - before),
                  "started_before_on_second": [tid for tid in before if masks[tid] == [cores[1]]], "later": later}))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen["bound"] and seen["new"] == [] and seen["started_before_on_second"], seen
    assert seen["main"] == sorted(seen["cores"]), seen
    assert seen["later"] and all(mask == sorted(seen["cores"]) for mask in seen["later"]), seen


def test_loading_the_library_leaves_the_processs_floating_point_mode_alone():
    """A library linked with -ffast-math's start-up code would set flush-to-zero and denormals-are-zero for the
    thread that loads it and every thread started after: torch's and numpy's arithmetic everywhere in the process
    would turn subnormal floats into zeros. In a process of its own, since that mode cannot be undone here."""
    script = """
import threading, torch
from shared.native_kernels import load_library
assert load_library() is not None
tiny = torch.tensor([1e-39])
seen = [float(tiny * 1.0)]
thread = threading.Thread(target=lambda: seen.append(float(tiny * 1.0)))
thread.start()
thread.join()
print(seen)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    assert all(value > 0 for value in json.loads(done.stdout)), done.stdout


def test_build_is_reused_and_atomic(tmp_path):
    path = build_library(tmp_path)
    stamp = path.stat().st_mtime_ns
    assert build_library(tmp_path) == path and path.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind


def test_the_build_goes_to_systemds_cache_directory_when_a_service_has_one(monkeypatch, tmp_path):
    monkeypatch.setenv("CACHE_DIRECTORY", f"{tmp_path}:/elsewhere")
    assert native_kernels.cache_dir() == tmp_path / "native"
    monkeypatch.delenv("CACHE_DIRECTORY")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert native_kernels.cache_dir() == tmp_path / "tierserve" / "native"


def test_without_a_compiler_one_warning_and_torchs_kernels(monkeypatch, caplog):
    monkeypatch.setenv("CC", "no-such-compiler-tierserve")
    with pytest.raises(BuildError, match="no-such-compiler-tierserve"):
        build_library()
    monkeypatch.setattr(native_kernels, "_library", None)
    monkeypatch.setattr(native_kernels, "_loaded", False)
    weights = experts("int8", 64, 128, 1)
    x = torch.randn(1, 128)
    with caplog.at_level(logging.WARNING, logger="shared.native_kernels"):
        assert load_library() is None
        assert grouped_swiglu(x, weights, [1]) is None
        assert torch.equal(grouped_ffn(x, [0], [1], weights.__getitem__), quantized_ffn(x, *weights[0]))
    assert [r.getMessage() for r in caplog.records if "no-such-compiler" in r.getMessage()] != []
    assert len(caplog.records) == 1


def test_an_experts_checked_pointers_go_with_its_tensors():
    """The checks' cache keeps no tensor alive and forgets an expert once its tensors die, so a new tensor that
    takes a dead one's id is checked again."""
    weights = experts("int4", 64, 128, 2, seed=5)
    x = torch.randn(2, 128)
    gc.collect()  # entries of earlier tests' dead experts leave now, not during this test
    before = len(native_kernels._checked)
    first = grouped_swiglu(x, weights, [1, 1])
    assert len(native_kernels._checked) == before + 2
    assert torch.equal(grouped_swiglu(x, weights, [1, 1]), first)  # the second call takes the checked pointers
    del weights
    gc.collect()
    assert len(native_kernels._checked) == before


def test_calls_go_through_the_library_using_names_and_back_after(tmp_path):
    """bench.native_ab times another version of the kernel in the same process: inside `using`, every call is
    that library's (here one whose grouped call refuses everything), after it the process's own again."""
    refusing = tmp_path / "refusing.c"
    source = native_kernels.SOURCE.read_text()
    marker = "    int status = check_shape(fmt_in, ffn, hidden);\n"
    assert source.count(marker) == 2  # the grouped call's, then the lane call's
    refusing.write_text(source.replace(marker, "    if (n_experts >= 0) return ERR_ROWS;\n" + marker, 1))
    weights = experts("int8", 64, 128, 2)
    x = torch.randn(2, 128)
    expected = grouped_swiglu(x, weights, [1, 1])
    with native_kernels.using(native_kernels.library_of(refusing, tmp_path)):
        with pytest.raises(ValueError, match="too many rows for one expert"):
            grouped_swiglu(x, weights, [1, 1])
    assert torch.equal(grouped_swiglu(x, weights, [1, 1]), expected)
