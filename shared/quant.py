"""Quantized expert matrices as served: int8 and int4 layouts, their CPU kernels, and conversion from GGUF blocks.

Block-quantized GGUF experts are converted once into one of two serving formats (the expert cache file holds
them); every kernel then reads those bytes directly:

- int8: `Int8Matrix(q (N, K) int8, scale (N,) bf16)`, W[n, k] = q[n, k] * scale[n], a per-row absmax
  re-quantisation of the GGUF-dequantized values (Q8_0, Q5_K, Q6_K, and 4-bit shapes int4 cannot take).
- int4: `Int4Matrix(packed (N, K // 2) uint8, scale_zero (K // 32, N, 2) bf16)`, W[n, k] = (q - 8) * s + z per
  32-value group, in the layout torch's CPU int4 kernel takes; Q4_0 and Q4_K convert into it exactly (up to the
  bf16 rounding of s and z). The GPU decodes the same bytes.

Float matrices stay plain tensors, so `Matrix` is any of the three and `linear` computes x @ W.T for each.
A layer's int8 / int4 experts at a few rows each are computed instead by shared.native_kernels, one native
call over all of them that reads the same layouts (expert_math.grouped_ffn picks it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType, quants

from shared.gguf_file import ZERO_COPY_TYPES, dequantize

Q = GGMLQuantizationType
FORMATS = ("float", "int8", "int4")
INT4_GROUP = 32  # values sharing one (scale, zero) pair
INT4_ROW_TILE = 64  # torch's CPU int4 layout interleaves rows in tiles of 64
INT8_K_MULTIPLE = 16  # torch's CPU int8 kernel reads rows in chunks of 16 (other K give wrong results)
INT8_DEQUANTIZE_ROWS = 16  # from this many rows on, int8 runs as a bf16 GEMM over the converted codes
# Rows converted to int8 at a time (each row's scale is its own): a few float32 temporaries of this many rows,
# where the whole matrix's took ~19x its stored bytes (924 MB for a Q6_K (4096, 14336)), in each of a build's
# one-per-core conversion processes.
INT8_CONVERT_ROWS = 256


class Int8Matrix(NamedTuple):
    q: torch.Tensor  # (..., N, K) int8
    scale: torch.Tensor  # (..., N) bfloat16

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.q.shape)


class Int4Matrix(NamedTuple):
    packed: torch.Tensor  # (..., N, K // 2) uint8, torch's CPU int4pack layout
    scale_zero: torch.Tensor  # (..., K // 32, N, 2) bfloat16

    @property
    def shape(self) -> tuple[int, ...]:
        *lead, n, half_k = self.packed.shape
        return (*lead, n, 2 * half_k)


Matrix = torch.Tensor | Int8Matrix | Int4Matrix
ExpertWeights = tuple[Matrix, Matrix, Matrix]  # an expert: gate (F, H), up (F, H), down (H, F)


def matrix_tensors(m: Matrix) -> list[torch.Tensor]:
    """The tensors a matrix is stored as, in layout order."""
    return [m] if isinstance(m, torch.Tensor) else list(m)


def tensor_specs(fmt: str, shape: tuple[int, int], float_dtype: torch.dtype = torch.float32
                 ) -> list[tuple[torch.dtype, tuple[int, ...]]]:
    """(dtype, shape) of each tensor an (N, K) matrix is stored as in format `fmt`."""
    n, k = shape
    if fmt == "float":
        return [(float_dtype, (n, k))]
    if fmt == "int8":
        return [(torch.int8, (n, k)), (torch.bfloat16, (n,))]
    if fmt == "int4":
        return [(torch.uint8, (n, k // 2)), (torch.bfloat16, (k // INT4_GROUP, n, 2))]
    raise ValueError(f"unknown serving format {fmt!r}; formats: {', '.join(FORMATS)}")


def from_tensors(fmt: str, tensors: list[torch.Tensor]) -> Matrix:
    """The matrix whose stored tensors these are (the inverse of `matrix_tensors`)."""
    if fmt == "float":
        (m,) = tensors
        return m
    return (Int8Matrix if fmt == "int8" else Int4Matrix)(*tensors)


# ---- compute


def linear(x: torch.Tensor, m: Matrix) -> torch.Tensor:
    """x @ W.T in x's dtype. Quantized matrices run torch's CPU kernels on bf16 activations (the kernels'
    fast path); on a GPU the worker's grouped kernels read these bytes instead."""
    if isinstance(m, torch.Tensor):
        if m.dtype == torch.bfloat16 and m.device.type == "cpu" and x.numel() == x.shape[-1]:
            return _bf16_row_linear(x, m)
        return (x.to(m.dtype) @ m.T).to(x.dtype)
    if m[0].device.type != "cpu":
        raise NotImplementedError("quantized experts on a GPU are computed by gpu_worker's grouped int8/int4 "
                                  "kernels, not shared.quant.linear")
    n, k = m.shape[-2:]
    rows = x.reshape(-1, k).to(torch.bfloat16).contiguous()
    if isinstance(m, Int8Matrix):
        if k % INT8_K_MULTIPLE:
            raise ValueError(f"int8 matrices need K % {INT8_K_MULTIPLE} == 0 for torch's CPU kernel, got K = {k}")
        if rows.shape[0] >= INT8_DEQUANTIZE_ROWS:
            # torch's int8 kernel decodes the whole matrix again for every 4 rows, so past a few rows one
            # conversion of the codes to bf16 and oneDNN's GEMM is faster (bench/cpu_kernels.md)
            y = F.linear(rows, m.q.to(torch.bfloat16)) * m.scale
        else:
            y = torch._weight_int8pack_mm(rows, m.q, m.scale)
    else:
        y = torch._weight_int4pack_mm_for_cpu(rows, m.packed, INT4_GROUP, m.scale_zero)
    return y.to(x.dtype).reshape(*x.shape[:-1], n)


def _bf16_row_linear(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """One row through bf16 weights on the CPU by ATen's own gemv, which reads the weights at about twice the speed
    of oneDNN's bf16 matmul (bench/cpu_kernels.md). oneDNN is a process-wide switch, set back at once: no process
    computes experts from two threads."""
    enabled = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        return (x.to(m.dtype) @ m.T).to(x.dtype)
    finally:
        torch.backends.mkldnn.enabled = enabled


def quantized_ffn(x: torch.Tensor, gate: Matrix, up: Matrix, down: Matrix) -> torch.Tensor:
    """SwiGLU feed-forward down(silu(gate x) * up x), the oracle's expert_ffn for any matrix format
    (for float weights of x's dtype the very same operations, so the same bits, but for a single row on bf16
    weights, which takes ATen's gemv)."""
    return linear(F.silu(linear(x, gate)) * linear(x, up), down)


def dequantize_matrix(m: Matrix) -> torch.Tensor:
    """Float32 (..., N, K) values of a matrix or a stack of them, decoded from the layout with plain tensor ops
    (the reference the kernels are checked against; works on any device)."""
    if isinstance(m, torch.Tensor):
        return m.float()
    if isinstance(m, Int8Matrix):
        return m.q.float() * m.scale.float()[..., None]
    n, k = m.shape[-2:]
    rows = torch.arange(n, device=m.packed.device)[:, None]
    cols = torch.arange(k, device=m.packed.device)[None, :]
    index = (rows // INT4_ROW_TILE) * (k * 32) + cols * 32 + rows % 32
    byte = m.packed.flatten(-2)[..., index].int()
    q = torch.where(rows % INT4_ROW_TILE < 32, byte & 0xF, byte >> 4).float()
    s, z = (m.scale_zero[..., i].float().repeat_interleave(INT4_GROUP, dim=-2).transpose(-1, -2) for i in (0, 1))
    return (q - 8) * s + z


# ---- which format a GGUF matrix is served in


def serving_format(qtype: GGMLQuantizationType, shape: tuple[int, int]) -> str:
    """'float' for float types (served as views of the file), 'int4' for Q4_0 / Q4_K whose shape the int4 layout
    takes (N % 64, K % 32), else 'int8'."""
    if qtype in ZERO_COPY_TYPES:
        return "float"
    n, k = shape
    if qtype in (Q.Q4_0, Q.Q4_K) and n % INT4_ROW_TILE == 0 and k % INT4_GROUP == 0:
        return "int4"
    return "int8"


def layer_formats(formats: Sequence[str]) -> tuple[str, ...]:
    """The formats a layer's gate, up and down are served in, from each one's `serving_format`: all float when
    all are float (views of the model file), else each quantized one in its own format and a float one among
    them as int8 (the layer's regions then all live in the expert cache), with gate and up in one format (int8
    where theirs differ), since the kernels read x once for both. A Q4_K_M layer with Q6_K down experts stays
    int4 gate and up beside int8 down, not int8 throughout."""
    if all(fmt == "float" for fmt in formats):
        return tuple(formats)
    gate, up, down = ("int8" if fmt == "float" else fmt for fmt in formats)
    if gate != up:
        gate = up = "int8"
    return gate, up, down


# ---- conversion from GGUF storage


def int8_from_float(w: torch.Tensor) -> Int8Matrix:
    """Per-row absmax int8: |W - q * scale| <= scale / 2 per weight, scale being the stored (bf16) one."""
    return _int8_by_rows(w.shape, lambda start, stop: w[start:stop])


def int8_from_blocks(raw: np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, int]) -> Int8Matrix:
    """int8 from a matrix stored as any GGUF type (`raw`: its stored values or block bytes), dequantized a few
    rows at a time (a row is whole blocks)."""
    rows = np.asarray(raw).reshape(shape[0], -1)
    return _int8_by_rows(shape, lambda start, stop: dequantize(rows[start:stop], qtype).reshape(stop - start, -1))


def _int8_by_rows(shape: Sequence[int], float_rows: Callable[[int, int], torch.Tensor]) -> Int8Matrix:
    """Per-row absmax int8 of an (N, K) matrix whose rows [start, stop) are float_rows(start, stop), converted
    INT8_CONVERT_ROWS at a time."""
    n, k = shape
    q, scale = torch.empty(n, k, dtype=torch.int8), torch.empty(n, dtype=torch.bfloat16)
    for start in range(0, n, INT8_CONVERT_ROWS):
        stop = min(start + INT8_CONVERT_ROWS, n)
        w = float_rows(start, stop).float()
        absmax = w.abs().amax(dim=-1)
        rounded = (absmax / 127).to(torch.bfloat16)
        # bf16 keeps 8 significant bits down to 2^-126 (about 1.2e-38), fewer below: a scale rounded down there (or
        # to 0) would clamp the row's largest codes past half a step. One unit up puts it above absmax / 127.
        clamped = absmax > 127.5 * rounded.float()
        scale[start:stop] = torch.where(clamped, torch.nextafter(rounded, torch.full_like(rounded, torch.inf)), rounded)
        s = scale[start:stop].float()[:, None]
        codes = w / s
        codes.masked_fill_(~(s > 0), 0).round_().clamp_(-127, 127)  # an all-zero (or NaN) row: codes 0
        q[start:stop] = codes
    return Int8Matrix(q, scale)


def int4_from_blocks(raw: np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, int]) -> Int4Matrix:
    """int4 from Q4_0 or Q4_K block bytes (N, bytes per row), keeping every 4-bit code as stored."""
    n, k = shape
    if serving_format(qtype, shape) != "int4":
        raise ValueError(f"a {qtype.name} matrix of shape {shape} cannot be served as int4")
    groups = k // INT4_GROUP
    if qtype == Q.Q4_0:
        blocks = np.asarray(raw, dtype=np.uint8).reshape(n, groups, 18)
        s = blocks[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)  # (N, groups)
        z = np.zeros_like(s)
        nibbles = blocks[..., 2:]  # value j in the low nibble of byte j, value 16 + j in the high one
        codes = np.concatenate([nibbles & 0xF, nibbles >> 4], axis=-1)  # (N, groups, 32)
    else:
        blocks = np.asarray(raw, dtype=np.uint8).reshape(n * (k // 256), 144)
        d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)  # (B, 1)
        dmin = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
        sc, mn = quants.Q4_K.get_scale_min(blocks[:, 4:16])  # (B, 8) each
        s = d * sc.astype(np.float32)
        z = 8 * s - dmin * mn.astype(np.float32)  # d*sc*q - dmin*m == (q - 8)*s + z
        qs = blocks[:, 16:].reshape(-1, 4, 1, 32)  # 32 bytes hold sub-blocks 2c (low) and 2c + 1 (high)
        codes = np.concatenate([qs & 0xF, qs >> 4], axis=2)  # (B, 4, 2, 32)
        s, z, codes = s.reshape(n, groups), z.reshape(n, groups), codes.reshape(n, groups, 32)
    packed = torch.from_numpy(pack_int4(codes.reshape(n, k)))
    scale_zero = torch.from_numpy(np.stack([s.T, z.T], axis=-1)).to(torch.bfloat16).contiguous()
    return Int4Matrix(packed, scale_zero)


def pack_int4(codes: np.ndarray) -> np.ndarray:
    """(N, K) codes 0..15 -> (N, K // 2) uint8 in torch's CPU int4pack layout (what
    torch._convert_weight_to_int4pack_for_cpu(codes, 2) returns, at twice its speed): in each tile of 64 rows,
    the byte for (column k, row j < 32) holds row j in its low nibble and row j + 32 in its high one."""
    n, k = codes.shape
    tiles = codes.astype(np.uint8, copy=False).reshape(n // INT4_ROW_TILE, 2, 32, k)
    return np.ascontiguousarray((tiles[:, 0] | tiles[:, 1] << 4).transpose(0, 2, 1)).reshape(n, k // 2)


def convert_matrix(raw: np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, int], fmt: str) -> Matrix:
    """A GGUF matrix (stored values or block bytes) in quantized serving format `fmt`."""
    if fmt == "int4":
        return int4_from_blocks(raw, qtype, shape)
    if fmt == "int8":
        return int8_from_blocks(raw, qtype, shape)
    raise ValueError(f"float matrices are served from the model file, not converted (format {fmt!r})")
