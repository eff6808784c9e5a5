"""`tierserve make-model`: write a synthetic MoE model as a llama.cpp-loadable GGUF file.

Shapes come from the presets below (the real models' for the named ones), weights from
`shared.weights_gen` (deterministic for a seed, with `--routing-skew` controlling expert popularity),
the tokenizer from `shared.bpe_vocab`. The file is written tensor by tensor, unit by unit, so even
a 235B-parameter model never needs more than a few units in memory; a thread pool draws the next
units while the main thread writes.

    tierserve make-model OUT.gguf --preset qwen3-30b-a3b --dtype q4_0 --seed 0 --routing-skew 1.2
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gguf import GGMLQuantizationType, LlamaFileType
from gguf.constants import GGML_QUANT_SIZES

from shared.bpe_vocab import padding_start, tokenizer_metadata
from shared.gguf_write import GGUFModelWriter
from shared.model_config import ModelConfig, ModelError, tensor_shapes
from shared.weights_gen import WeightGenerator

Q = GGMLQuantizationType

# --arch names -> GGUF architecture (llama.cpp stores Mixtral as "llama" with expert tensors).
ARCHS = {"qwen3moe": "qwen3moe", "qwen2moe": "qwen2moe", "mixtral": "llama", "olmoe": "olmoe"}
DTYPES = {
    "f32": (Q.F32, LlamaFileType.ALL_F32),
    "f16": (Q.F16, LlamaFileType.MOSTLY_F16),
    "bf16": (Q.BF16, LlamaFileType.MOSTLY_BF16),
    "q8_0": (Q.Q8_0, LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (Q.Q4_0, LlamaFileType.MOSTLY_Q4_0),
    "q4_k": (Q.Q4_K, LlamaFileType.MOSTLY_Q4_K_S),
    "q4_k_m": (Q.Q4_K, LlamaFileType.MOSTLY_Q4_K_M),
    "q5_k": (Q.Q4_K, LlamaFileType.MOSTLY_Q5_K_S),
}
# The routed experts' type where it is not the trunk's: the generator makes Q5_K blocks, but not the edits of a
# first column the trunk's embedding and output need, so a q5_k file's trunk is Q4_K.
EXPERT_TYPES = {"q5_k": Q.Q5_K}
# llama.cpp's Q4_K_M stores the down projections of about half the layers (use_more_bits) as Q6_K: layers of
# 4-bit gate and up beside 6-bit down, the mix a server must keep apart. Here the routed experts' down
# projections get it; the rest of the trunk stays Q4_K.
MORE_BITS = {"q4_k_m": Q.Q6_K}


# `step`: the fraction of the residual's rms each attention / MoE sub-layer adds (see weights_gen).
# `shared_expert_ffn` is used only when the architecture is qwen2moe (default 4 x expert_ffn).
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(arch="qwen3moe", n_layers=4, hidden=64, n_heads=4, n_kv_heads=2, head_dim=16, n_experts=8,
                 n_experts_used=2, expert_ffn=32, shared_expert_ffn=64, vocab_size=512, context_length=512,
                 rope_base=1e6, norm_eps=1e-6, step=0.3),
    # expert_ffn 256 so that every matrix splits into Q4_K's 256-value blocks.
    "small": dict(arch="qwen3moe", n_layers=4, hidden=256, n_heads=8, n_kv_heads=2, head_dim=32, n_experts=32,
                  n_experts_used=4, expert_ffn=256, vocab_size=4096, context_length=2048,
                  rope_base=1e6, norm_eps=1e-6, step=0.3),
    "qwen3-30b-a3b": dict(arch="qwen3moe", n_layers=48, hidden=2048, n_heads=32, n_kv_heads=4, head_dim=128,
                          n_experts=128, n_experts_used=8, expert_ffn=768, vocab_size=151936,
                          context_length=40960, rope_base=1e6, norm_eps=1e-6, step=0.07),
    "qwen3-235b-a22b": dict(arch="qwen3moe", n_layers=94, hidden=4096, n_heads=64, n_kv_heads=4, head_dim=128,
                            n_experts=128, n_experts_used=8, expert_ffn=1536, vocab_size=151936,
                            context_length=40960, rope_base=1e6, norm_eps=1e-6, step=0.05),
    "mixtral-8x7b": dict(arch="mixtral", n_layers=32, hidden=4096, n_heads=32, n_kv_heads=8, head_dim=128,
                         n_experts=8, n_experts_used=2, expert_ffn=14336, vocab_size=32000,
                         context_length=32768, rope_base=1e6, norm_eps=1e-5, step=0.07),
    "olmoe-1b-7b": dict(arch="olmoe", n_layers=16, hidden=2048, n_heads=16, n_kv_heads=16, head_dim=128,
                        n_experts=64, n_experts_used=8, expert_ffn=1024, vocab_size=50304,
                        context_length=4096, rope_base=1e4, norm_eps=1e-5, step=0.1),
}

_DISK_MARGIN = 64 << 20  # metadata, alignment padding and some room for the file system


@dataclass(frozen=True)
class MakeStats:
    path: str
    bytes: int
    seconds: float
    # matrices stored in a fallback type (storage_type) because their rows do not split into the dtype's blocks
    fallbacks: dict[str, int] = field(default_factory=dict)


def preset_config(preset: str, arch: str | None = None) -> tuple[ModelConfig, float]:
    """(ModelConfig, step) of a preset built as `arch` (an --arch name; default the preset's own)."""
    if preset not in PRESETS:
        raise ModelError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    p = dict(PRESETS[preset])
    default_arch = p.pop("arch")
    arch = arch or default_arch
    if arch not in ARCHS:
        raise ModelError(f"unknown architecture {arch!r}; choose from {', '.join(ARCHS)}")
    step = p.pop("step")
    shared = p.pop("shared_expert_ffn", 4 * p["expert_ffn"])
    if arch == "olmoe":
        p["n_kv_heads"] = p["n_heads"]  # llama.cpp's OLMoE k_norm spans all heads
    cfg = ModelConfig(arch=ARCHS[arch], shared_expert_ffn=shared if arch == "qwen2moe" else 0, **p)
    return cfg, step


def more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's use_more_bits: the first and last eighth of the layers and every third layer between."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def storage_type(name: str, shape: tuple[int, ...], dtype: str, n_layers: int) -> GGMLQuantizationType:
    """Norms, biases and routers stay F32 as in llama.cpp's files; a matrix whose rows do not split
    into the dtype's blocks falls back to Q4_0 (from the K-quants: the tiny preset's 32-value rows), else F16."""
    if len(shape) == 1 or ".ffn_gate_inp." in name:
        return Q.F32
    qtype = DTYPES[dtype][0]
    if name.endswith("_exps.weight"):
        qtype = EXPERT_TYPES.get(dtype, qtype)
        if dtype in MORE_BITS and ".ffn_down_exps." in name and more_bits(int(name.split(".")[1]), n_layers):
            qtype = MORE_BITS[dtype]
    candidates = (qtype, Q.Q4_0, Q.F16) if qtype in (Q.Q4_K, Q.Q5_K, Q.Q6_K) else (qtype, Q.F16)
    return next(c for c in candidates if shape[-1] % GGML_QUANT_SIZES[c][0] == 0)


def make_model(
    path: str | os.PathLike[str],
    arch: str | None = None,
    preset: str = "tiny",
    dtype: str = "f32",
    seed: int = 0,
    routing_skew: float = 0.0,
    progress: Callable[[int, int, float], None] | None = None,
) -> MakeStats:
    """Write the model; `progress(bytes written, total bytes, seconds)` is called as the data goes out."""
    if dtype not in DTYPES:
        raise ModelError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    if seed < 0 or not 0 <= routing_skew < math.inf:  # a NaN skew wrote a model whose every route was NaN
        raise ModelError(f"seed must not be negative and routing skew must be a finite number >= 0, not {seed} and "
                         f"{routing_skew}")
    cfg, step = preset_config(preset, arch)
    file_type = DTYPES[dtype][1]
    metadata = tokenizer_metadata(cfg.arch, cfg.vocab_size)
    metadata.update({
        "general.name": f"tierserve synthetic {preset} ({arch or PRESETS[preset]['arch']}, {dtype}, seed {seed}, "
                        f"routing skew {routing_skew:g})",
        "general.file_type": int(file_type),
        "general.quantization_version": 2,
    })
    start = time.monotonic()
    writer = GGUFModelWriter(path, cfg, metadata)
    tensors = [(name, shape, storage_type(name, shape, dtype, cfg.n_layers))
               for name, shape in tensor_shapes(cfg).items()]
    total = sum(writer.add_tensor(name, shape, q) for name, shape, q in tensors)
    _check_disk(Path(path), total + _DISK_MARGIN)
    gen = WeightGenerator(cfg, seed, routing_skew, step, padding_start(cfg.arch, cfg.vocab_size))
    jobs = ((name, shape, q, i) for name, shape, q in tensors for i in range(gen.units(shape)))
    workers = min(os.cpu_count() or 1, 4)  # 16 were slower on the H200 machine: 61 GB of bf16 in ~260 s, not 192
    written = 0
    writer.begin()
    try:
        with ThreadPoolExecutor(workers) as pool:
            pending: deque[Future] = deque()
            for job in jobs:
                pending.append(pool.submit(gen.unit, *job))
                if len(pending) > 2 * workers:
                    written += _write(writer, pending.popleft())
                    if progress:
                        progress(written, total, time.monotonic() - start)
            while pending:
                written += _write(writer, pending.popleft())
        writer.close()
    except BaseException:
        Path(path).unlink(missing_ok=True)  # a half-written model would only fail later, less clearly
        raise
    if progress:
        progress(written, total, time.monotonic() - start)
    fallbacks = Counter(q.name for _, shape, q in tensors
                        if len(shape) > 1 and q in (Q.Q4_0, Q.F16) and q != DTYPES[dtype][0])
    return MakeStats(os.fspath(path), Path(path).stat().st_size, time.monotonic() - start, dict(fallbacks))


def _write(writer: GGUFModelWriter, unit: Future) -> int:
    data = unit.result()
    writer.write(data)
    return data.nbytes


def _check_disk(path: Path, need: int) -> None:
    free = shutil.disk_usage(path.parent if str(path.parent) else ".").free
    if path.exists():
        free += path.stat().st_size  # the old file is replaced
    if free < need:
        raise OSError(f"not enough disk space for {path}: the model needs {need / 1e9:.1f} GB, "
                      f"{free / 1e9:.1f} GB free on {path.parent.resolve()}")


class _Progress:
    """Prints bytes written and throughput to stderr every few seconds."""

    def __init__(self, every_s: float = 3.0) -> None:
        self.every_s, self.next_s = every_s, every_s

    def __call__(self, written: int, total: int, seconds: float) -> None:
        if seconds >= self.next_s or written == total:
            self.next_s = seconds + self.every_s
            rate = written / max(seconds, 1e-9) / 1e6
            print(f"make-model: {written / 1e9:.2f} / {total / 1e9:.2f} GB, {rate:.0f} MB/s", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tierserve make-model", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="GGUF file to write")
    parser.add_argument("--arch", choices=list(ARCHS), help="architecture (default: the preset's)")
    parser.add_argument("--preset", choices=list(PRESETS), default="tiny")
    parser.add_argument("--dtype", choices=list(DTYPES), default="f32", help="storage type of the matrices")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--routing-skew", type=float, default=0.0, metavar="S",
                        help="expert popularity per layer follows rank^-S (0: uniform)")
    args = parser.parse_args(argv)
    # '' ended in gguf's traceback, and "dir/" wrote a file named "dir"
    if not args.out or args.out.endswith(os.sep) or os.path.isdir(args.out):
        parser.error(f"the output must be a file's path, not {'a directory, ' if args.out else ''}{args.out!r}")
    try:
        stats = make_model(args.out, args.arch, args.preset, args.dtype, args.seed, args.routing_skew, _Progress())
    except ModelError as e:
        print(f"tierserve make-model: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"tierserve make-model: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {stats.path}: {stats.bytes} bytes in {stats.seconds:.1f} s "
          f"({stats.bytes / max(stats.seconds, 1e-9) / 1e6:.0f} MB/s)")
    if stats.fallbacks:  # the file's type still says the dtype asked for
        stored = ", ".join(f"{n} are stored as {name}" for name, n in stats.fallbacks.items())
        print(f"make-model: note: the {args.preset} preset's rows do not split into {args.dtype}'s blocks, so of its "
              f"matrices {stored} (the file's type still says {args.dtype}; the small preset's rows split into every "
              f"dtype's blocks)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
