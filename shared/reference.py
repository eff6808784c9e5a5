"""The correctness oracle: a plain, dense, fp32 forward pass of every supported architecture.

Written for clarity, not speed. Every serving path in tierserve must reproduce
these logits (exactly the same greedy tokens on fp32 tiny models). It works on
the GGUF layout directly, so Mixtral's Q/K rows are in llama.cpp's permuted
order and RoPE rotates adjacent pairs for it; the other architectures rotate
the two halves of each head.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

from shared.gguf_file import GGUFModel
from shared.model_config import ModelConfig


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()  # the mean of squares needs fp32 even when the model runs in bf16
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


@functools.lru_cache(maxsize=8)
def rope_table(head_dim: int, base: float, n_positions: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of every position below n_positions, (n_positions, head_dim/2) in fp32: built once per model
    shape and device, so a step only gathers its positions' rows. Each entry is computed as for a lone position
    (fp64 angle, rounded to fp32, then cos/sin), so a gathered row equals one computed on its own bit for bit."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim))
    angles = (torch.arange(n_positions, dtype=torch.float64, device=device)[:, None] * inv_freq[None, :]).float()
    return angles.cos(), angles.sin()


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, style: str) -> torch.Tensor:
    """Rotate (T, heads, head_dim) by the (T, 1, head_dim/2) angles of its positions (`rope_angles`);
    `style` is 'neox' (halves) or 'interleaved' (pairs)."""
    d = x.shape[-1]
    xf = x.float()
    if style == "neox":
        a, b = xf[..., : d // 2], xf[..., d // 2 :]
        return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1).to(x.dtype)
    a, b = xf[..., 0::2], xf[..., 1::2]
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2).to(x.dtype)


def rope_angles(c: ModelConfig, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (T, 1, head_dim/2) of the positions, every one below the model's context length."""
    cos, sin = rope_table(c.head_dim, c.rope_base, c.context_length, positions.device)
    return cos[positions][:, None, :], sin[positions][:, None, :]


def expert_ffn(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """SwiGLU feed-forward: down(silu(gate x) * up x); weights in (out, in) layout."""
    return (F.silu(x @ gate.T) * (x @ up.T)) @ down.T


def route(logits: torch.Tensor, k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax router with top-k; returns (weights, expert ids), each (T, k)."""
    probs = logits.softmax(dim=-1)
    weights, ids = probs.topk(k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def qk_norm(c: ModelConfig, w: dict[str, torch.Tensor], i: int, q: torch.Tensor, k: torch.Tensor, where: str,
            norm: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor] = rms_norm
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer i's QK-norm of q and k if the architecture applies it `where`: 'full' (over the whole projection,
    before it is split into heads) or 'head' (per head); otherwise q and k as they are."""
    if c.qk_norm != where:
        return q, k
    b = f"blk.{i}."
    return norm(q, w[b + "attn_q_norm.weight"], c.norm_eps), norm(k, w[b + "attn_k_norm.weight"], c.norm_eps)


def attention_inputs(c: ModelConfig, w: dict[str, torch.Tensor], i: int, x: torch.Tensor,
                     positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Layer i's queries (T, heads, d), keys and values (T, kv heads, d): projections, biases,
    QK-norm where the architecture has one, and RoPE."""
    b = f"blk.{i}."
    q, k, v = (x @ w[b + f"attn_{n}.weight"].T for n in "qkv")
    if c.attn_bias:
        q, k, v = q + w[b + "attn_q.bias"], k + w[b + "attn_k.bias"], v + w[b + "attn_v.bias"]
    q, k = qk_norm(c, w, i, q, k, "full")
    t = x.shape[0]
    q = q.view(t, c.n_heads, c.head_dim)
    k = k.view(t, c.n_kv_heads, c.head_dim)
    v = v.view(t, c.n_kv_heads, c.head_dim)
    q, k = qk_norm(c, w, i, q, k, "head")
    cos, sin = rope_angles(c, positions)
    return rope(q, cos, sin, c.rope_style), rope(k, cos, sin, c.rope_style), v


ExpertFn = Callable[[int, int, torch.Tensor], torch.Tensor]  # (layer, expert, x) -> the expert's FFN of x


class ReferenceModel:
    """All weights dequantized to fp32 in memory: only for tiny and small models."""

    def __init__(self, model: GGUFModel, expert: ExpertFn | None = None) -> None:
        """`expert(layer, e, x)`: routed expert e's FFN of x, by default through the dequantized fp32 weights;
        another one (e.g. quantized kernels) measures that computation against this forward."""
        self.cfg: ModelConfig = model.config
        self.w = {name: model.tensor(name) for name in model.tensor_names()}
        if "output.weight" not in self.w:
            self.w["output.weight"] = self.w["token_embd.weight"]
        self.expert = expert or self.dense_expert

    def dense_expert(self, i: int, e: int, x: torch.Tensor) -> torch.Tensor:
        w, b = self.w, f"blk.{i}."
        return expert_ffn(x, w[b + "ffn_gate_exps.weight"][e], w[b + "ffn_up_exps.weight"][e],
                          w[b + "ffn_down_exps.weight"][e])

    def attention(self, i: int, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        c, t = self.cfg, x.shape[0]
        q, k, v = attention_inputs(c, self.w, i, x, positions)
        group = c.n_heads // c.n_kv_heads
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, k) / c.head_dim**0.5
        causal = torch.ones(t, t, dtype=torch.bool).triu(1)
        probs = scores.masked_fill(causal, float("-inf")).softmax(dim=-1)
        out = torch.einsum("hqk,khd->qhd", probs, v).reshape(t, c.q_dim)
        return out @ self.w[f"blk.{i}.attn_output.weight"].T

    def moe(self, i: int, x: torch.Tensor, routing: list[torch.Tensor] | None = None) -> torch.Tensor:
        c, w, b = self.cfg, self.w, f"blk.{i}."
        weights, ids = route(x @ w[b + "ffn_gate_inp.weight"].T, c.n_experts_used, bool(c.norm_topk_prob))
        if routing is not None:
            routing.append(ids)
        out = torch.zeros_like(x)
        for t in range(x.shape[0]):
            for weight, e in zip(weights[t], ids[t].tolist(), strict=False):
                out[t] += weight * self.expert(i, e, x[t])
        if c.shared_expert_ffn:
            shared = expert_ffn(x, w[b + "ffn_gate_shexp.weight"], w[b + "ffn_up_shexp.weight"],
                                w[b + "ffn_down_shexp.weight"])
            out += torch.sigmoid(x @ w[b + "ffn_gate_inp_shexp.weight"])[:, None] * shared
        return out

    @torch.no_grad()
    def forward(self, tokens: list[int], routing: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Logits (T, vocab) for a token sequence starting at position 0.

        If `routing` is a list, the expert ids (T, k) chosen in each layer are appended to it.
        """
        c, w = self.cfg, self.w
        x = w["token_embd.weight"][torch.tensor(tokens)]
        positions = torch.arange(len(tokens))
        for i in range(c.n_layers):
            x = x + self.attention(i, rms_norm(x, w[f"blk.{i}.attn_norm.weight"], c.norm_eps), positions)
            x = x + self.moe(i, rms_norm(x, w[f"blk.{i}.ffn_norm.weight"], c.norm_eps), routing)
        return rms_norm(x, w["output_norm.weight"], c.norm_eps) @ w["output.weight"].T

    def greedy(self, tokens: list[int], max_new_tokens: int) -> list[int]:
        """Greedy continuation, recomputing the whole sequence each step (no KV cache: the oracle stays simple)."""
        seq = list(tokens)
        for _ in range(max_new_tokens):
            seq.append(int(self.forward(seq)[-1].argmax()))
        return seq[len(tokens):]
