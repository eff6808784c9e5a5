"""Random quantized expert stacks for the quantized-kernel tests and benchmark, and their float32 reference.

Streamed experts sit in VRAM slots as raw expert regions: each matrix's tensors at 64-byte aligned
offsets of a 4096-rounded region, so a stacked matrix is a strided view with stride(0) = region size.
Hot experts are plain contiguous stacks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from shared.quant import Int4Matrix, Int8Matrix, dequantize_matrix, from_tensors, tensor_specs

QuantMatrix = Int8Matrix | Int4Matrix
_ALIGN, _PAGE = 64, 4096


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _sane_scales(fmt: str, t: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Scales around 0.01 (and int4 zeros around +-0.05): the magnitudes GGUF experts have."""
    u = torch.rand(t.shape, generator=generator, device=t.device)
    if fmt == "int8":
        return (0.005 + 0.01 * u).to(t.dtype)
    return torch.where(torch.arange(2, device=t.device) == 0, 0.005 + 0.01 * u, 0.1 * u - 0.05).to(t.dtype)


def random_regions(fmt: str | list[str], experts: int, shapes: list[tuple[int, int]], device: torch.device,
                   seed: int, strided: bool = True) -> list[QuantMatrix]:
    """Random matrices of the given (N, K) shapes for `experts` experts, in format fmt (or fmt[i] for shape i).
    strided: laid out one after another in each expert's region of one (experts, region_bytes) uint8 buffer; else
    each matrix's own contiguous stack."""
    formats = [fmt] * len(shapes) if isinstance(fmt, str) else fmt
    specs = [tensor_specs(f, shape) for f, shape in zip(formats, shapes, strict=True)]
    offsets, end = [], 0
    for matrix in specs:
        for dtype, shape in matrix:
            offsets.append(end)
            end = _round_up(end + dtype.itemsize * torch.Size(shape).numel(), _ALIGN)
    generator = torch.Generator(device).manual_seed(seed)
    buf = torch.randint(0, 256, (experts, _round_up(end, _PAGE)), dtype=torch.uint8, device=device,
                        generator=generator)
    views = iter(offsets)
    matrices = []
    for matrix_fmt, matrix in zip(formats, specs, strict=True):
        tensors = []
        for i, (dtype, shape) in enumerate(matrix):
            start = next(views)
            nbytes = dtype.itemsize * torch.Size(shape).numel()
            t = buf[:, start:start + nbytes].view(dtype).view(experts, *shape)
            if i == 1:  # the scales: random bytes would give NaNs and huge values
                t.copy_(_sane_scales(matrix_fmt, t, generator))
            tensors.append(t if strided else t.contiguous())
        matrices.append(from_tensors(matrix_fmt, tensors))
    return matrices


def expert_of(w: QuantMatrix, g: int) -> QuantMatrix:
    return type(w)(*(t[g] for t in w))


def reference_linear(x: torch.Tensor, w: QuantMatrix, groups: list[int], counts: list[int]) -> torch.Tensor:
    """float32 per-group x @ W.T from the dequantized weights."""
    out, start = [], 0
    for g, c in zip(groups, counts, strict=True):
        out.append(x[start:start + c].float() @ dequantize_matrix(expert_of(w, g)).T)
        start += c
    return torch.cat(out)


def reference_swiglu(x: torch.Tensor, gate: QuantMatrix, up: QuantMatrix, down: QuantMatrix, groups: list[int],
                     counts: list[int]) -> torch.Tensor:
    h = F.silu(reference_linear(x, gate, groups, counts)) * reference_linear(x, up, groups, counts)
    return reference_linear(h, down, groups, counts)


def worst_row_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest per-row relative L2 error (NaN if any output is NaN, e.g. a row the kernel never wrote)."""
    y = y.float()
    err = (y - ref).norm(dim=1) / ref.norm(dim=1).clamp_min(1e-30)
    return float(torch.where(torch.isfinite(y).all(dim=1), err, torch.nan).max())
