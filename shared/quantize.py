"""Random weight matrices straight in GGUF storage formats, and the quantizers the generator needs.

Drawing Gaussian floats and quantizing them runs at ~100 M values/s on one core, far too slow for a
17 GB model, so quantized random matrices are made as blocks directly: random bits (SFC64 raw output,
GB/s) give the 4-, 6- or 8-bit codes and every block gets the same magnitude of scale, chosen so the values
have the requested standard deviation. The values are uniform over the codes rather than Gaussian.
The scale's sign bit is left random: codes 0..15 around 8 (or -128..127) have a mean of -0.5 code,
which would otherwise add the same small offset to every weight of a matrix.

Stored matrices are uint8 arrays of shape (rows, bytes per row) for every type, floats included.
All-zero bytes are the value 0 in every type here, so callers zero a row by assigning 0.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType, quants
from gguf.constants import GGML_QUANT_SIZES

Q = GGMLQuantizationType

# Root mean square of the integer each code stands for, when codes are uniform.
_Q4_RMS = float(np.sqrt(np.mean((np.arange(16) - 8.0) ** 2)))
_Q8_RMS = float(np.sqrt(np.mean(np.arange(-128, 128, dtype=np.float64) ** 2)))

# Q4_K blocks made here give each of their eight sub-blocks a random scale sc in 1..7 and the min
# 8 * sc with dmin = d, so a value is d * sc * (q - 8): zero-mean like Q4_0, and the 6-bit scale and
# min packing, high bits included, is exercised. Scales uniform in 1..7 have a mean square of 20.
_Q4_K_SC_RMS = float(np.sqrt(np.mean(np.arange(1, 8) ** 2)))

# Q5_K blocks made here: as Q4_K's, with 5-bit codes 0..31 around 16, so the min is 16 * sc: 8 * sc with dmin = 2 d
# (mins are 6-bit, at most 63).
_Q5_RMS = float(np.sqrt(np.mean((np.arange(32) - 16.0) ** 2)))

# Q6_K blocks made here: 6-bit codes 0..63 around 32 and sixteen int8 sub-block scales in 1..7, d last.
_Q6_RMS = float(np.sqrt(np.mean((np.arange(64) - 32.0) ** 2)))
_Q6_K_D = 208  # byte offset of d in the 210-byte block (ql 128, qh 64, scales 16)

# Where element 0 of a block's code sits and the bits that make it 0: (byte, bits kept, bits set) for each byte
# holding part of it (Q5_K: the low nibble in qs, the fifth bit in qh).
_ZERO_FIRST = {Q.Q4_0: ((2, 0xF0, 8),), Q.Q8_0: ((2, 0x00, 0),), Q.Q4_K: ((16, 0xF0, 8),),
               Q.Q5_K: ((48, 0xF0, 0), (16, 0xFE, 1))}


def row_nbytes(cols: int, qtype: GGMLQuantizationType) -> int:
    block, size = GGML_QUANT_SIZES[qtype]
    return cols // block * size


def random_matrix(
    rng: np.random.Generator, rows: int, cols: int, qtype: GGMLQuantizationType, std: float,
    zero_first_column: bool = False,
) -> np.ndarray:
    """A (rows, cols) matrix of zero-mean random values with standard deviation `std`, stored as `qtype`."""
    if qtype in (Q.F32, Q.F16, Q.BF16):
        values = rng.standard_normal((rows, cols), dtype=np.float32)
        values *= np.float32(std)
        if zero_first_column:
            values[:, 0] = 0.0
        return quantize_rows(values, qtype)
    block, size = GGML_QUANT_SIZES[qtype]
    n = rows * (cols // block) * size
    blocks = rng.bit_generator.random_raw(-(-n // 8)).view(np.uint8)[:n].reshape(rows, cols // block, size)
    code_rms = {Q.Q8_0: _Q8_RMS, Q.Q4_0: _Q4_RMS, Q.Q4_K: _Q4_RMS * _Q4_K_SC_RMS, Q.Q5_K: _Q5_RMS * _Q4_K_SC_RMS,
                Q.Q6_K: _Q6_RMS * _Q4_K_SC_RMS}
    d = np.float16(std / code_rms[qtype])
    scale = d.view(np.uint16)
    lo, hi = np.uint8(scale & 0xFF), np.uint8(scale >> 8)
    d_at = _Q6_K_D if qtype == Q.Q6_K else 0
    blocks[..., d_at] = lo
    blocks[..., d_at + 1] = (blocks[..., d_at + 1] & 0x80) | hi
    if qtype == Q.Q6_K:
        blocks[..., 192:208] = rng.integers(1, 8, size=blocks.shape[:2] + (16,), dtype=np.uint8)
    if qtype in (Q.Q4_K, Q.Q5_K):
        dmin = (d if qtype == Q.Q4_K else np.float16(2 * d)).view(np.uint16)
        blocks[..., 2] = np.uint8(dmin & 0xFF)
        blocks[..., 3] = (blocks[..., 1] & 0x80) | np.uint8(dmin >> 8)  # dmin takes d's sign: min and scale agree
        sc = rng.integers(1, 8, size=blocks.shape[:2] + (8,), dtype=np.uint8)
        blocks[..., 4:16] = _pack_q4_k_scales(sc, sc * np.uint8(8))
    if zero_first_column:
        if qtype not in _ZERO_FIRST:
            raise ValueError(f"a first column of zeros is not made for {qtype.name} blocks")
        for byte, keep, code in _ZERO_FIRST[qtype]:
            blocks[:, 0, byte] = (blocks[:, 0, byte] & keep) | code
    return blocks.reshape(rows, -1)


def quantize_rows(values: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """Store float rows (rows, cols) as `qtype`: uint8 (rows, bytes per row)."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    if qtype == Q.Q4_K:
        return _quantize_q4_k(values).reshape(values.shape[0], -1)
    if qtype == Q.BF16:  # the same round-to-nearest-even as gguf's, at twice its speed and without the GIL
        return torch.from_numpy(values).to(torch.bfloat16).view(torch.uint8).numpy()
    return np.ascontiguousarray(quants.quantize(values, qtype)).view(np.uint8)


def set_first_column(stored: np.ndarray, qtype: GGMLQuantizationType, value: float) -> None:
    """Set element 0 of every row of a stored matrix to `value`, requantizing only the first block."""
    block, size = GGML_QUANT_SIZES[qtype]
    first = quants.dequantize(stored[:, :size], qtype).reshape(-1, block)
    first[:, 0] = value
    stored[:, :size] = quantize_rows(first, qtype)


def _quantize_q4_k(values: np.ndarray) -> np.ndarray:
    """Q4_K blocks (n, 144) with a per-sub-block min/max fit; llama.cpp's search for better scales is skipped."""
    sub = values.reshape(-1, 8, 32)
    low = np.minimum(sub.min(axis=-1), 0.0)
    scale = (sub.max(axis=-1) - low) / 15
    d = (scale.max(axis=-1) / 63).astype(np.float16)
    dmin = ((-low).max(axis=-1) / 63).astype(np.float16)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.nan_to_num(np.rint(scale / d.astype(np.float32)[:, None])).clip(0, 63).astype(np.uint8)
        mn = np.nan_to_num(np.rint(-low / dmin.astype(np.float32)[:, None])).clip(0, 63).astype(np.uint8)
        step = (d.astype(np.float32)[:, None] * sc)[..., None]
        offset = (dmin.astype(np.float32)[:, None] * mn)[..., None]
        q = np.nan_to_num(np.rint((sub + offset) / step)).clip(0, 15).astype(np.uint8)
    q = q.reshape(-1, 4, 2, 32)
    qs = (q[:, :, 0] | q[:, :, 1] << 4).reshape(-1, 128)
    packed = _pack_q4_k_scales(sc, mn)
    return np.concatenate([d[:, None].view(np.uint8), dmin[:, None].view(np.uint8), packed, qs], axis=1)


def _pack_q4_k_scales(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """llama.cpp's 12-byte packing of eight 6-bit scales and mins (..., 8) each: bytes 0-3 and 4-7
    hold the first four scales and mins with the top two bits of the last four, bytes 8-11 the
    low nibbles of the last four scales and mins."""
    packed = np.empty(sc.shape[:-1] + (12,), dtype=np.uint8)
    packed[..., 0:4] = sc[..., :4] | (sc[..., 4:] >> 4) << 6
    packed[..., 4:8] = mn[..., :4] | (mn[..., 4:] >> 4) << 6
    packed[..., 8:12] = (sc[..., 4:] & 0x0F) | (mn[..., 4:] & 0x0F) << 4
    return packed
