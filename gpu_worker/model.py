"""The dense trunk on the worker's device: embeddings, attention over a paged KV cache, norms,
routers, shared experts and the output head. Routed experts are computed by whatever
`MoEFn` the caller passes, so the trunk knows nothing of where experts live. It marks the sections
a step profile times (gpu_worker/step_profile.py): prepare, each layer's attention, router, moe and
shared expert, and the lm head.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gpu_worker.step_profile import section
from shared.gguf_file import GGUFModel
from shared.model_config import EXPERT_TENSOR_KINDS
from shared.profile_table import LAYER
from shared.reference import attention_inputs, expert_ffn, rms_norm, route

# (layer, normed hidden (N, H), routing weights (N, k), expert ids (N, k)) -> routed experts' sum (N, H)
MoEFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Chunk:
    """Consecutive tokens of one sequence to run: positions start .. start+len-1."""

    token_ids: Sequence[int]
    start: int
    block_table: Sequence[int]


class Trunk:
    def __init__(self, model: GGUFModel, device: torch.device, dtype: torch.dtype, num_blocks: int, block_size: int):
        self.cfg = cfg = model.config
        self.device, self.dtype, self.block_size = device, dtype, block_size
        expert_names = {f"blk.{i}.{kind}.weight" for i in range(cfg.n_layers) for kind in EXPERT_TENSOR_KINDS}
        self.w = {n: model.tensor(n).to(device, dtype) for n in model.tensor_names() if n not in expert_names}
        self.w.setdefault("output.weight", self.w["token_embd.weight"])
        # K and V of every layer: (layers, 2, blocks * block_size slots, kv heads, head dim)
        self.kv = torch.zeros(cfg.n_layers, 2, num_blocks * block_size, cfg.n_kv_heads, cfg.head_dim,
                              device=device, dtype=dtype)

    def _slots(self, block_table: Sequence[int], positions: torch.Tensor) -> torch.Tensor:
        table = torch.tensor(block_table, dtype=torch.long, device=self.device)
        return table[positions // self.block_size] * self.block_size + positions % self.block_size

    def _attention(self, i: int, x: torch.Tensor, positions: torch.Tensor, chunks: Sequence[Chunk],
                   new_slots: torch.Tensor, context_slots: list[torch.Tensor]) -> torch.Tensor:
        c, w = self.cfg, self.w
        q, k, v = attention_inputs(c, w, i, x, positions)
        self.kv[i, 0, new_slots] = k
        self.kv[i, 1, new_slots] = v
        out = torch.empty_like(q)
        offset = 0
        for chunk, slots in zip(chunks, context_slots, strict=True):
            m = len(chunk.token_ids)
            keys = self.kv[i, 0, slots].transpose(0, 1)  # (kv heads, context, head dim)
            values = self.kv[i, 1, slots].transpose(0, 1)
            query = q[offset : offset + m].transpose(0, 1)
            # token j of the chunk sees every cached position up to its own: start + j
            visible = torch.arange(len(slots), device=self.device)[None, :] <= (
                chunk.start + torch.arange(m, device=self.device)[:, None])
            att = F.scaled_dot_product_attention(query, keys, values, attn_mask=visible, enable_gqa=True)
            out[offset : offset + m] = att.transpose(0, 1)
            offset += m
        return out.reshape(x.shape[0], c.q_dim) @ w[f"blk.{i}.attn_output.weight"].T

    @torch.inference_mode()
    def forward(self, chunks: Sequence[Chunk], moe: MoEFn) -> torch.Tensor:
        """Run the chunks as one batch; returns logits (len(chunks), vocab) at each chunk's last token."""
        c, w = self.cfg, self.w
        with section("prepare"):
            ids = torch.tensor([t for ch in chunks for t in ch.token_ids], dtype=torch.long, device=self.device)
            spans = [torch.arange(ch.start, ch.start + len(ch.token_ids), device=self.device) for ch in chunks]
            positions = torch.cat(spans)
            new_slots = torch.cat([self._slots(ch.block_table, span)
                                   for ch, span in zip(chunks, spans, strict=True)])
            context_slots = [self._slots(ch.block_table,
                                         torch.arange(ch.start + len(ch.token_ids), device=self.device))
                             for ch in chunks]
            x = w["token_embd.weight"][ids]
        for i in range(c.n_layers):
            b = f"blk.{i}."
            with section(LAYER):
                with section("attention"):
                    h = rms_norm(x, w[b + "attn_norm.weight"], c.norm_eps)
                    x = x + self._attention(i, h, positions, chunks, new_slots, context_slots)
                with section("router"):
                    h = rms_norm(x, w[b + "ffn_norm.weight"], c.norm_eps)
                    weights, expert_ids = route(h @ w[b + "ffn_gate_inp.weight"].T, c.n_experts_used,
                                                bool(c.norm_topk_prob))
                with section("moe"):
                    out = moe(i, h, weights, expert_ids)
                if c.shared_expert_ffn:
                    with section("shared_expert"):
                        shared = expert_ffn(h, w[b + "ffn_gate_shexp.weight"], w[b + "ffn_up_shexp.weight"],
                                            w[b + "ffn_down_shexp.weight"])
                        out = out + torch.sigmoid(h @ w[b + "ffn_gate_inp_shexp.weight"])[:, None] * shared
                x = x + out
        with section("lm_head"):
            last = torch.tensor([len(ch.token_ids) for ch in chunks], device=self.device).cumsum(0) - 1
            return (rms_norm(x[last], w["output_norm.weight"], c.norm_eps) @ w["output.weight"].T).float()
