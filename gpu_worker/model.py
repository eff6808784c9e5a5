"""The dense trunk on the worker's device: embeddings, attention over a paged KV cache, norms,
routers, shared experts and the output head. Routed experts are computed by whatever
`MoEFn` the caller passes, so the trunk knows nothing of where experts live. It marks the sections
a step profile times (gpu_worker/step_profile.py): prepare, each layer's attention, router, moe and
shared expert, and the lm head.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from gpu_worker.decode_graphs import DecodeGraphs, HotShare, MoEGraph, StaticBatch
from gpu_worker.step_profile import section
from shared.gguf_file import GGUFModel
from shared.model_config import EXPERT_TENSOR_KINDS, ModelConfig, ModelError
from shared.profile_table import LAYER
from shared.reference import expert_ffn, qk_norm, rope, rope_table, route


class MoEFn(Protocol):
    """(layer, normed hidden (N, H), routing weights (N, k), expert ids (N, k)) -> routed experts' sum (N, H).

    It may also offer on_device(layer, rows, padded_rows) (gpu_worker.experts.MoEDispatch): for a layer, the share
    it computes without waiting on the device (`.moe`, a function of the next three arguments, which a decode graph
    may capture) and whether that is all of it (`.whole`); the share's result then comes as `hot`. In a decode
    step whose rows lie in a graph's static buffers, `graph` runs the MoE's own device work as a graph of the
    step's (decode_graphs.MoEGraph)."""

    def __call__(self, layer: int, h: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor,
                 hot: torch.Tensor | None = None, graph: MoEGraph | None = None) -> torch.Tensor: ...


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """shared.reference.rms_norm in one fused kernel where torch has one (CUDA), fp32 inside either way."""
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


@dataclass
class _BatchSlots:
    """A step's positions and KV slots on the device, and per chunk its row span, its context's slots and
    its attention mask (None where SDPA's own causal or full attention is the same). A step of several
    sequences decoding one token each has instead every context's slots padded to the longest, (sequences,
    longest), and which of them are real, (sequences, 1, 1, longest): one attention for all of them."""

    positions: torch.Tensor
    new_slots: torch.Tensor
    context_slots: list[torch.Tensor]
    spans: list[tuple[int, int]]
    masks: list[torch.Tensor | None]
    padded: tuple[torch.Tensor, torch.Tensor] | None = None


@dataclass
class Chunk:
    """Consecutive tokens of one sequence to run: positions start .. start+len-1."""

    token_ids: Sequence[int]
    start: int
    block_table: Sequence[int]


def kv_cache_shape(cfg: ModelConfig, num_blocks: int, block_size: int) -> tuple[int, ...]:
    """K and V of every layer: (layers, 2, blocks * block_size slots and a spare one, kv heads, head dim); the spare
    slot is where a decode graph's padding rows write."""
    return cfg.n_layers, 2, num_blocks * block_size + 1, cfg.n_kv_heads, cfg.head_dim


def _finite(model: GGUFModel, name: str) -> torch.Tensor:
    """The trunk's tensor, refused (ModelError) where it holds NaN or inf: every token passes through it, so the
    system would say it was ready and then fail every request. The token embeddings are the exception: a damaged
    row fails only the prompts holding its token, which the step names (a request whose logits are not finite fails)."""
    t = model.tensor(name)
    if name != "token_embd.weight" and not torch.isfinite(t).all():
        raise ModelError(f"{model.path}: tensor {name} holds NaN or infinite values")
    return t


class Trunk:
    def __init__(self, model: GGUFModel, device: torch.device, dtype: torch.dtype, num_blocks: int, block_size: int,
                 decode_graphs: bool | None = None):
        """decode_graphs: run decode steps' attention and router from captured CUDA graphs, and whole layers whose
        experts are all hot (default: on a GPU); on a CPU, True runs the same bucketed static buffers eagerly
        (gpu_worker/decode_graphs.py)."""
        self.cfg = cfg = model.config
        self.device, self.dtype, self.block_size = device, dtype, block_size
        expert_names = {f"blk.{i}.{kind}.weight" for i in range(cfg.n_layers) for kind in EXPERT_TENSOR_KINDS}
        self.w = {n: _finite(model, n).to(device, dtype) for n in model.tensor_names() if n not in expert_names}
        self.w.setdefault("output.weight", self.w["token_embd.weight"])
        # One projection per layer for q, k and v: a decode step is bound by kernel launches, not by bytes.
        for i in range(cfg.n_layers):
            for kind in ("weight", "bias") if cfg.attn_bias else ("weight",):
                parts = [self.w.pop(f"blk.{i}.attn_{n}.{kind}") for n in "qkv"]
                self.w[f"blk.{i}.attn_qkv.{kind}"] = torch.cat(parts)
        # no position lies past the KV cache's slots, and a file's context_length is only a claim (2**32 - 1 asked
        # for a table of tens of GB)
        positions = min(cfg.context_length, num_blocks * block_size)
        self.rope_cos, self.rope_sin = rope_table(cfg.head_dim, cfg.rope_base, positions, device)
        self.spare_slot = spare = num_blocks * block_size  # the spare slot, after the blocks'
        self.kv = torch.zeros(kv_cache_shape(cfg, num_blocks, block_size), device=device, dtype=dtype)
        if decode_graphs is None:
            decode_graphs = device.type == "cuda"
        self.graphs = DecodeGraphs(self._front, cfg.hidden, self.rope_cos, self.rope_sin, spare, dtype,
                                   capture=device.type == "cuda") if decode_graphs else None

    def _attention_inputs(self, i: int, x: torch.Tensor, cos: torch.Tensor,
                          sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """shared.reference.attention_inputs with fewer kernels: one projection for q, k and v, and q and k
        rotated together."""
        c, w, b = self.cfg, self.w, f"blk.{i}."
        qkv = x @ w[b + "attn_qkv.weight"].T
        if c.attn_bias:
            qkv = qkv + w[b + "attn_qkv.bias"]
        q, k, v = qkv.split([c.q_dim, c.kv_dim, c.kv_dim], dim=-1)
        q, k = qk_norm(c, w, i, q, k, "full", rms_norm)
        t = x.shape[0]
        q = q.reshape(t, c.n_heads, c.head_dim)
        k = k.reshape(t, c.n_kv_heads, c.head_dim)
        q, k = qk_norm(c, w, i, q, k, "head", rms_norm)
        qk = rope(torch.cat([q, k], dim=1), cos, sin, c.rope_style)
        return qk[:, : c.n_heads], qk[:, c.n_heads :], v.reshape(t, c.n_kv_heads, c.head_dim)

    def _attention(self, i: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   batch: _BatchSlots) -> torch.Tensor:
        c = self.cfg
        q, k, v = self._attention_inputs(i, x, cos, sin)
        self.kv[i, 0, batch.new_slots] = k
        self.kv[i, 1, batch.new_slots] = v
        if batch.padded is not None:
            slots, visible = batch.padded
            keys = self.kv[i, 0, slots].transpose(1, 2)  # (sequences, kv heads, longest context, head dim)
            values = self.kv[i, 1, slots].transpose(1, 2)
            att = F.scaled_dot_product_attention(q[:, :, None], keys, values, attn_mask=visible, enable_gqa=True)
            return att.reshape(x.shape[0], c.q_dim) @ self.w[f"blk.{i}.attn_output.weight"].T
        outs = []
        for (offset, m), slots, visible in zip(batch.spans, batch.context_slots, batch.masks, strict=True):
            # SDPA's fused kernels, which never write out the scores of a long prompt, take only 4-d inputs
            # (1, heads, tokens, head dim); and the one that takes a mask (memory-efficient) does not group
            # query heads, so a masked chunk gets every query head its own copy of its K and V.
            keys = self.kv[i, 0, slots].transpose(0, 1)[None]
            values = self.kv[i, 1, slots].transpose(0, 1)[None]
            query = q[offset : offset + m].transpose(0, 1)[None]
            if visible is not None and c.n_heads != c.n_kv_heads:
                group = c.n_heads // c.n_kv_heads
                keys, values = keys.repeat_interleave(group, dim=1), values.repeat_interleave(group, dim=1)
            att = F.scaled_dot_product_attention(query, keys, values, attn_mask=visible,
                                                 is_causal=visible is None and m > 1, enable_gqa=visible is None)
            outs.append(att[0].transpose(0, 1))
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        return out.reshape(x.shape[0], c.q_dim) @ self.w[f"blk.{i}.attn_output.weight"].T

    def _context_slots(self, ch: Chunk) -> torch.Tensor:
        """The KV slots of every position of the chunk's sequence up to its last token, in order."""
        seen = torch.arange(ch.start + len(ch.token_ids))
        table = torch.tensor(ch.block_table, dtype=torch.long)
        return table[seen // self.block_size] * self.block_size + seen % self.block_size

    def _attention_block(self, i: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         batch: _BatchSlots) -> torch.Tensor:
        return x + self._attention(i, rms_norm(x, self.w[f"blk.{i}.attn_norm.weight"], self.cfg.norm_eps), cos, sin,
                                   batch)

    def _router(self, i: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(normed rows for the MoE, routing weights, expert ids)."""
        c, w = self.cfg, self.w
        h = rms_norm(x, w[f"blk.{i}.ffn_norm.weight"], c.norm_eps)
        weights, expert_ids = route(h @ w[f"blk.{i}.ffn_gate_inp.weight"].T, c.n_experts_used, bool(c.norm_topk_prob))
        return h, weights, expert_ids

    def _front(self, i: int, x: torch.Tensor, static: StaticBatch, hot: HotShare | None = None
               ) -> tuple[torch.Tensor, ...]:
        """Layer i's attention and router over a decode graph's static buffers (what a graph captures), and the
        share of its MoE that `hot` computes from the router's results."""
        batch = _BatchSlots(static.positions, static.new_slots, [], [], [], (static.slots, static.visible))
        x = self._attention_block(i, x, static.cos, static.sin, batch)
        routed = self._router(i, x)
        return (x, *routed) if hot is None else (x, *routed, hot(*routed))

    def _batch_slots(self, chunks: Sequence[Chunk]) -> _BatchSlots:
        """Every index the step's layers share, built on the host and copied over once."""
        positions, new_slots, context, spans, masks = [], [], [], [], []
        offset = 0
        for ch in chunks:
            m, end = len(ch.token_ids), ch.start + len(ch.token_ids)
            seen = torch.arange(end)
            slots = self._context_slots(ch)
            positions.append(seen[ch.start :])
            new_slots.append(slots[ch.start :])
            context.append(slots)
            spans.append((offset, m))
            offset += m
            # token j of the chunk sees every cached position up to its own, start + j: no mask for one token
            # (it sees all), a causal one for a chunk that starts the sequence
            masks.append(None if m == 1 or ch.start == 0 else
                         (seen[None, :] <= ch.start + torch.arange(m)[:, None]).to(self.device, non_blocking=True))
        lengths = [len(s) for s in context]
        if len(chunks) > 1 and offset == len(chunks):  # decode only: one padded attention
            # padding: the spare slot, masked out. Not slot 0: a sequence's NaN there (damaged weights) came through
            # the mask into every shorter row's attention
            padded = torch.nn.utils.rnn.pad_sequence(context, batch_first=True, padding_value=self.spare_slot)
            host = torch.cat([torch.cat(positions), torch.cat(new_slots), padded.flatten(), torch.tensor(lengths)])
            device = host.to(self.device, non_blocking=True)
            positions_d, new_slots_d, padded_d, lengths_d = device.split([offset, offset, padded.numel(), offset])
            visible = torch.arange(padded.shape[1], device=self.device)[None, :] < lengths_d[:, None]
            return _BatchSlots(positions_d, new_slots_d, [], spans, masks,
                               (padded_d.view(padded.shape), visible[:, None, None, :]))
        host = torch.cat([torch.cat(positions), torch.cat(new_slots), *context])
        device = host.to(self.device, non_blocking=True)
        positions_d, new_slots_d, *context_d = device.split([offset, offset, *lengths])
        return _BatchSlots(positions_d, new_slots_d, context_d, spans, masks)

    def _with_shared_expert(self, i: int, h: torch.Tensor, routed: torch.Tensor) -> torch.Tensor:
        """The routed experts' sum plus the gated shared expert (models that have one)."""
        b, w = f"blk.{i}.", self.w
        shared = expert_ffn(h, w[b + "ffn_gate_shexp.weight"], w[b + "ffn_up_shexp.weight"],
                            w[b + "ffn_down_shexp.weight"])
        return routed + torch.sigmoid(h @ w[b + "ffn_gate_inp_shexp.weight"])[:, None] * shared

    def _whole_layer(self, i: int, static: StaticBatch, moe: Callable[..., torch.Tensor]) -> None:
        """Layer i over every row of a decode graph's static batch, its output written over its input rows."""
        x, h, weights, expert_ids = self._front(i, static.x, static)
        out = moe(h, weights, expert_ids)
        if self.cfg.shared_expert_ffn:
            out = self._with_shared_expert(i, h, out)
        torch.add(x, out, out=static.x)

    @torch.inference_mode()
    def forward(self, chunks: Sequence[Chunk], moe: MoEFn) -> torch.Tensor:
        """Run the chunks as one batch; returns logits (len(chunks), vocab) at each chunk's last token."""
        c, w = self.cfg, self.w
        n = len(chunks)
        static = None
        with section("prepare"):
            ids = torch.tensor([t for ch in chunks for t in ch.token_ids], dtype=torch.long).to(self.device)
            x = w["token_embd.weight"][ids]
            if self.graphs is not None and len(ids) == n:
                contexts = [self._context_slots(ch) for ch in chunks]
                if self.graphs.fits(n, max(len(s) for s in contexts)):
                    static = self.graphs.prepare(x, [ch.start for ch in chunks], contexts)
            if static is None:
                batch = self._batch_slots(chunks)
                cos = self.rope_cos[batch.positions][:, None, :]
                sin = self.rope_sin[batch.positions][:, None, :]
        on_device = getattr(moe, "on_device", None) if static is not None else None
        graph = functools.partial(self.graphs.run_moe, static) if static is not None else None  # type: ignore[union-attr]
        for i in range(c.n_layers):
            with section(LAYER):
                part = on_device(i, n, static.x.shape[0]) if on_device is not None else None
                if part is not None and part.whole:
                    with section("whole_layer"):  # one graph: attention, router, experts and crossings
                        self.graphs.run_whole(i, static, functools.partial(self._whole_layer, i, static, part.moe))  # type: ignore[union-attr]
                    x = static.x[:n]
                    continue
                hot = None
                if static is not None:
                    with section("attention"):  # the router and the hot experts' share are in the same graph
                        x, h, weights, expert_ids, *share = (t[:n] for t in self.graphs.run(  # type: ignore[union-attr]
                            i, static, part.moe if part is not None else None))
                    hot = share[0] if share else None
                else:
                    with section("attention"):
                        x = self._attention_block(i, x, cos, sin, batch)
                    with section("router"):
                        h, weights, expert_ids = self._router(i, x)
                with section("moe"):
                    out = moe(i, h, weights, expert_ids, hot, graph)
                if c.shared_expert_ffn:
                    with section("shared_expert"):
                        out = self._with_shared_expert(i, h, out)
                if static is not None:  # the next layer's graph reads its rows from the static input
                    x = torch.add(x, out, out=static.x[:n])
                else:
                    x = x + out
        with section("lm_head"):
            if len(ids) > n:  # not when each chunk is one token: the copy would wait for the device, and a decode
                # step's device may wait on a dead host's lane until the worker answers it with poison (crossing)
                last = torch.tensor([len(ch.token_ids) for ch in chunks], device=self.device).cumsum(0) - 1
                x = x[last]
            return (rms_norm(x, w["output_norm.weight"], c.norm_eps) @ w["output.weight"].T).float()
