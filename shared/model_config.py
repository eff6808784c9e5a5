"""The typed description of a MoE model and its llama.cpp-compatible GGUF names.

One place knows how each supported architecture spells its hyperparameters in
GGUF metadata and which tensors (with which shapes) it must contain; the reader,
the model generator and the tests all go through it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

ARCHITECTURES = ("qwen3moe", "qwen2moe", "llama", "olmoe")

# llama.cpp hard-codes top-k weight renormalisation per architecture.
_NORM_TOPK_DEFAULT = {"qwen3moe": True, "llama": True, "qwen2moe": False, "olmoe": False}
# llama.cpp's converter permutes Mixtral's Q/K rows so that RoPE rotates adjacent pairs;
# the others rotate the two halves of each head (NeoX style).
_ROPE_STYLE = {"qwen3moe": "neox", "qwen2moe": "neox", "olmoe": "neox", "llama": "interleaved"}
# Where a QK-norm sits: per head (qwen3moe), over the whole projection (olmoe), or nowhere.
_QK_NORM = {"qwen3moe": "head", "olmoe": "full", "qwen2moe": "none", "llama": "none"}


class ModelError(ValueError):
    """A model file tierserve cannot serve; the message names the problem."""


@dataclass(frozen=True)
class ModelConfig:
    arch: str
    n_layers: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rope_base: float
    norm_eps: float
    n_experts: int
    n_experts_used: int
    expert_ffn: int
    vocab_size: int
    context_length: int
    shared_expert_ffn: int = 0
    norm_topk_prob: bool | None = None  # None: the architecture's llama.cpp default

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise ModelError(f"unknown architecture {self.arch!r}; supported: {', '.join(ARCHITECTURES)}")
        if self.norm_topk_prob is None:
            object.__setattr__(self, "norm_topk_prob", _NORM_TOPK_DEFAULT[self.arch])
        sizes = ("n_layers", "hidden", "n_heads", "n_kv_heads", "head_dim", "n_experts", "expert_ffn", "vocab_size",
                 "context_length")
        for name in sizes:
            if getattr(self, name) < 1:
                raise ModelError(f"{name} must be at least 1, not {getattr(self, name)}")
        if self.shared_expert_ffn < 0:
            raise ModelError(f"shared_expert_ffn must be >= 0, not {self.shared_expert_ffn}")
        # RoPE raises the base to fractional powers and RMSNorm takes a square root beside epsilon: NaN otherwise
        if not self.rope_base > 0:
            raise ModelError(f"rope_base must be above 0, not {self.rope_base}")
        if not self.norm_eps >= 0:
            raise ModelError(f"norm_eps must be >= 0, not {self.norm_eps}")
        if self.n_heads % self.n_kv_heads:
            raise ModelError(f"{self.n_heads} attention heads is not a multiple of {self.n_kv_heads} KV heads")
        if self.head_dim % 2:  # RoPE rotates a head's dimensions in pairs
            raise ModelError(f"an attention head of {self.head_dim} dimensions: RoPE needs an even number")
        if not 0 < self.n_experts_used <= self.n_experts:
            raise ModelError(f"experts used per token ({self.n_experts_used}) must be in 1..{self.n_experts}")
        if self.qk_norm == "full" and self.n_kv_heads != self.n_heads:
            raise ModelError("olmoe needs as many KV heads as query heads (llama.cpp's k_norm spans n_embd)")

    @property
    def rope_style(self) -> str:
        return _ROPE_STYLE[self.arch]

    @property
    def qk_norm(self) -> str:
        return _QK_NORM[self.arch]

    @property
    def attn_bias(self) -> bool:
        return self.arch == "qwen2moe"

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def expert_params(self) -> int:
        """Parameters of one routed expert (gate, up and down projections)."""
        return 3 * self.hidden * self.expert_ffn

    @property
    def kv_values_per_token(self) -> int:
        """K and V values one token stores across all layers."""
        return 2 * self.n_layers * self.kv_dim


def config_to_metadata(cfg: ModelConfig) -> dict[str, Any]:
    """The GGUF key/value pairs llama.cpp reads for this model (values typed by the writer)."""
    p = cfg.arch
    md: dict[str, Any] = {
        "general.architecture": cfg.arch,
        f"{p}.context_length": cfg.context_length,
        f"{p}.embedding_length": cfg.hidden,
        f"{p}.block_count": cfg.n_layers,
        f"{p}.attention.head_count": cfg.n_heads,
        f"{p}.attention.head_count_kv": cfg.n_kv_heads,
        f"{p}.attention.key_length": cfg.head_dim,
        f"{p}.attention.value_length": cfg.head_dim,
        f"{p}.rope.freq_base": float(cfg.rope_base),
        f"{p}.attention.layer_norm_rms_epsilon": float(cfg.norm_eps),
        f"{p}.expert_count": cfg.n_experts,
        f"{p}.expert_used_count": cfg.n_experts_used,
        f"{p}.vocab_size": cfg.vocab_size,
        f"{p}.expert_weights_norm": bool(cfg.norm_topk_prob),
    }
    if cfg.arch == "llama":
        md[f"{p}.feed_forward_length"] = cfg.expert_ffn
        md[f"{p}.rope.dimension_count"] = cfg.head_dim
    else:
        md[f"{p}.expert_feed_forward_length"] = cfg.expert_ffn
        md[f"{p}.feed_forward_length"] = cfg.expert_ffn
    if cfg.arch == "qwen2moe":
        md[f"{p}.expert_shared_feed_forward_length"] = cfg.shared_expert_ffn
    return md


def config_from_metadata(md: Mapping[str, Any], tensor_shapes: Mapping[str, tuple[int, ...]]) -> ModelConfig:
    """Parse the hyperparameters of a supported MoE architecture from GGUF metadata.

    `tensor_shapes` (numpy order) fills in what some files leave implicit: the vocabulary
    size and, for Mixtral-style files, that the model has experts at all.
    """
    arch = md.get("general.architecture")
    if arch is None:
        raise ModelError("not a model file: metadata has no general.architecture")
    if arch not in ARCHITECTURES:
        raise ModelError(f"unknown architecture {arch!r}; supported: {', '.join(ARCHITECTURES)}")
    p = arch

    def need(key: str) -> Any:
        if f"{p}.{key}" not in md:
            raise ModelError(f"metadata key {p}.{key} is missing")
        return md[f"{p}.{key}"]

    def opt(key: str, default: Any) -> Any:
        return md.get(f"{p}.{key}", default)

    def integer(key: str, default: int | None = None) -> int:
        value = need(key) if default is None else opt(key, default)
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
            raise ModelError(f"metadata key {p}.{key} is {value!r}, not an integer")
        return int(value)

    def number(key: str, default: float | None = None) -> float:
        value = need(key) if default is None else opt(key, default)
        if not isinstance(value, (int, float, np.integer, np.floating)) or isinstance(value, bool) or \
                not np.isfinite(value):
            raise ModelError(f"metadata key {p}.{key} is {value!r}, not a finite number")
        return _shortest_float(value)

    n_layers = integer("block_count")
    if n_layers > len(tensor_shapes):  # each layer has tensors of its own; a corrupt count must not size loops
        raise ModelError(f"metadata key {p}.block_count is {n_layers}, but the file has only {len(tensor_shapes)} "
                         "tensors")
    hidden = integer("embedding_length")
    n_heads = integer("attention.head_count")
    n_experts = integer("expert_count", 0)
    if n_experts == 0:
        raise ModelError(f"{arch} model has no experts ({p}.expert_count missing or 0): tierserve serves MoE models")
    if "token_embd.weight" not in tensor_shapes:
        raise ModelError("tensor token_embd.weight is missing")
    if len(tensor_shapes["token_embd.weight"]) != 2:  # its rows are the vocabulary
        raise ModelError(f"tensor token_embd.weight has shape {tensor_shapes['token_embd.weight']}, expected "
                         f"(vocab, {hidden})")
    vocab_size = int(tensor_shapes["token_embd.weight"][0])
    tokens = md.get("tokenizer.ggml.tokens")
    if tokens is not None and not isinstance(tokens, list):
        raise ModelError(f"metadata key tokenizer.ggml.tokens is {tokens!r}, not an array")
    if tokens is not None and len(tokens) != vocab_size:
        # as llama.cpp refuses it: an id past the embedding cannot be read, a logit past the tokens not decoded
        raise ModelError(f"the tokenizer has {len(tokens)} tokens (tokenizer.ggml.tokens) but token_embd.weight "
                         f"has {vocab_size} rows: a model's tokens and embeddings are one vocabulary")
    if arch == "llama":
        expert_ffn = integer("feed_forward_length")
    else:
        expert_ffn = integer("expert_feed_forward_length", 0) or integer("feed_forward_length")
    if n_heads < 1:
        raise ModelError(f"metadata key {p}.attention.head_count is {n_heads}: a model needs attention heads")
    head_dim = integer("attention.key_length", 0) or hidden // n_heads
    # llama.cpp scales RoPE's angles and rotates only rope.dimension_count dimensions where a file says so; the
    # forward rotates every dimension of a head by the unscaled angles. As llama.cpp reads it, a factor with no
    # type is linear scaling, and an older file gives the factor as rope.scale_linear.
    scaling = opt("rope.scaling.type", "linear")
    factor = opt("rope.scaling.factor", 0.0) or opt("rope.scale_linear", 0.0)
    if scaling != "none" and factor not in (0.0, 1.0):
        raise ModelError(f"rope scaling {scaling!r} by {factor} ({p}.rope.scaling.type, .factor or "
                         f"{p}.rope.scale_linear) is not supported")
    rope_dims = integer("rope.dimension_count", head_dim)
    if rope_dims != head_dim:
        raise ModelError(f"{p}.rope.dimension_count: RoPE rotates {rope_dims} of each head's {head_dim} dimensions; "
                         "only rotating all of them is supported")
    norm_topk = opt("expert_weights_norm", None)
    if norm_topk is not None and not isinstance(norm_topk, bool):  # bool("false") would be True
        raise ModelError(f"metadata key {p}.expert_weights_norm is {norm_topk!r}, not a boolean")
    return ModelConfig(
        arch=arch,
        n_layers=n_layers,
        hidden=hidden,
        n_heads=n_heads,
        n_kv_heads=integer("attention.head_count_kv", n_heads),
        head_dim=head_dim,
        rope_base=number("rope.freq_base", 10000.0),
        norm_eps=number("attention.layer_norm_rms_epsilon"),
        n_experts=n_experts,
        n_experts_used=integer("expert_used_count"),
        expert_ffn=expert_ffn,
        vocab_size=vocab_size,
        context_length=integer("context_length", 4096),
        shared_expert_ffn=integer("expert_shared_feed_forward_length", 0),
        norm_topk_prob=norm_topk,
    )


def _shortest_float(value: Any) -> float:
    """GGUF stores float32: give back the shortest decimal that rounds to it (1e-06, not 9.99999997e-07)."""
    return float(str(np.float32(value)))


def tensor_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the model needs, in file order, with its numpy-order shape.

    Numpy order is the reverse of ggml's, so a linear layer is (out, in) as in torch,
    and merged experts are (E, F, H) for gate/up and (E, H, F) for down.
    """
    h, e, f = cfg.hidden, cfg.n_experts, cfg.expert_ffn
    shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (cfg.vocab_size, h)}
    for i in range(cfg.n_layers):
        b = f"blk.{i}."
        shapes[b + "attn_norm.weight"] = (h,)
        shapes[b + "attn_q.weight"] = (cfg.q_dim, h)
        shapes[b + "attn_k.weight"] = (cfg.kv_dim, h)
        shapes[b + "attn_v.weight"] = (cfg.kv_dim, h)
        if cfg.attn_bias:
            shapes[b + "attn_q.bias"] = (cfg.q_dim,)
            shapes[b + "attn_k.bias"] = (cfg.kv_dim,)
            shapes[b + "attn_v.bias"] = (cfg.kv_dim,)
        if cfg.qk_norm == "head":
            shapes[b + "attn_q_norm.weight"] = (cfg.head_dim,)
            shapes[b + "attn_k_norm.weight"] = (cfg.head_dim,)
        elif cfg.qk_norm == "full":
            shapes[b + "attn_q_norm.weight"] = (cfg.q_dim,)
            shapes[b + "attn_k_norm.weight"] = (cfg.kv_dim,)
        shapes[b + "attn_output.weight"] = (h, cfg.q_dim)
        shapes[b + "ffn_norm.weight"] = (h,)
        shapes[b + "ffn_gate_inp.weight"] = (e, h)
        shapes[b + "ffn_gate_exps.weight"] = (e, f, h)
        shapes[b + "ffn_up_exps.weight"] = (e, f, h)
        shapes[b + "ffn_down_exps.weight"] = (e, h, f)
        if cfg.shared_expert_ffn:
            s = cfg.shared_expert_ffn
            shapes[b + "ffn_gate_inp_shexp.weight"] = (h,)
            shapes[b + "ffn_gate_shexp.weight"] = (s, h)
            shapes[b + "ffn_up_shexp.weight"] = (s, h)
            shapes[b + "ffn_down_shexp.weight"] = (h, s)
    shapes["output_norm.weight"] = (h,)
    shapes["output.weight"] = (cfg.vocab_size, h)
    return shapes


OPTIONAL_TENSORS = frozenset({"output.weight"})  # absent when the output head is tied to the embeddings

EXPERT_TENSOR_KINDS = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")


def expert_tensor_name(layer: int, kind: str) -> str:
    return f"blk.{layer}.{kind}.weight"
