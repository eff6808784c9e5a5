"""Routed experts for one MoE layer: hot ones computed on the worker, cold ones sent to their hosts.

Cold work for every host is sent first, the hot experts are computed while the hosts work, then the hosts'
results are gathered, so the two overlap. In a decode graph the hot experts' share is computed before the
routing reaches the host instead (with the layer's attention and router, in one replay), which spares the
host their launches but puts their GPU time before the sends.
"""

from __future__ import annotations

import functools
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch

from gpu_worker.cold_path import ColdPlanner
from gpu_worker.grouped import all_experts_grouped, experts_grouped, takes_device_counts
from gpu_worker.remote import RemoteExperts
from gpu_worker.soft_pool import SoftPool
from gpu_worker.step_profile import section
from shared.expert_cache import layer_expert_nbytes
from shared.expert_math import ExpertWeights, grouped_ffn
from shared.expert_source import ExpertSource
from shared.model_config import EXPERT_TENSOR_KINDS
from shared.placement import GPU, Placement
from shared.quant import matrix_tensors

if TYPE_CHECKING:
    from gpu_worker.crossing import DeviceCrossings
    from gpu_worker.decode_graphs import HotShare, MoEGraph


class DevicePart(NamedTuple):
    """What of a layer's MoE the device computes without waiting on the host: the hot experts' share."""

    moe: HotShare  # the routed pairs' weighted sum over the hot experts (zero rows where none is hot)
    whole: bool  # every expert of the layer is hot: the share is the layer's whole MoE


class HotExperts:
    """The experts the placement keeps on the worker.

    Each layer's hot experts are stacked so one grouped launch computes all of them where a grouped kernel
    takes them: float experts in bf16 for torch._grouped_mm (on a GPU or a CPU), quantized ones on a GPU as a
    stack of their cache regions (the served bytes, copied as they are) for the int8 / int4 kernels. Otherwise
    they are kept one by one: float ones in the worker's dtype, quantized ones as views of the expert cache
    file, computed as an expert host does.
    """

    def __init__(self, source: ExpertSource, device: torch.device, dtype: torch.dtype) -> None:
        self.source, self.device, self.dtype = source, device, dtype
        self.ids: dict[int, list[int]] = {}
        self.stack_index: dict[int, dict[int, int]] = {}  # layer -> expert -> its place in the layer's stack
        self.weights: dict[tuple[int, int], ExpertWeights] = {}  # per expert, where not stacked
        self.stacks: dict[int, ExpertWeights] = {}  # per layer, (gate_up, down) or quantized (gate, up, down)
        # per stacked layer, on the device: each expert's place in the stack, len(stack) for one not in it
        self.places: dict[int, torch.Tensor] = {}

    def _grouped(self, layer: int) -> bool:
        """Whether the layer's experts are stacked for grouped kernels: bf16 for torch._grouped_mm, or
        quantized for the int8 / int4 kernels on a GPU."""
        if self.source.format(layer) == "float":
            return self.dtype == torch.bfloat16
        return self.device.type == "cuda"

    def _float(self, layer: int, e: int) -> ExpertWeights:
        model = self.source.model
        return tuple(model.expert(layer, kind, e).to(self.device, self.dtype)  # type: ignore[return-value]
                     for kind in EXPERT_TENSOR_KINDS)

    def _stack(self, layer: int, ids: list[int]) -> ExpertWeights:
        layout = self.source.layout(layer)
        if layout.format == "float":
            # each expert copied into its place in the stacks: stacking copies made first held a layer's hot
            # experts 2.3 times over at the peak, past what added_nbytes counts
            model = self.source.model
            ffn, hidden = model.config.expert_ffn, model.config.hidden
            gate_up = torch.empty(len(ids), 2 * ffn, hidden, device=self.device, dtype=self.dtype)
            downs = torch.empty(len(ids), hidden, ffn, device=self.device, dtype=self.dtype)
            for i, e in enumerate(ids):
                gate, up, down = (model.expert(layer, kind, e) for kind in EXPERT_TENSOR_KINDS)
                gate_up[i, :ffn].copy_(gate)
                gate_up[i, ffn:].copy_(up)
                downs[i].copy_(down)
            return gate_up, downs
        regions = torch.zeros(len(ids), layout.region_nbytes, dtype=torch.uint8, device=self.device)
        for region, e in zip(regions, ids, strict=True):
            self.source.fill_region(layer, e, region)
        self.source.check_digests(layer, ids, torch.get_num_threads())
        return layout.views(regions)

    def _held_nbytes(self, layer: int, n: int) -> int:
        """Bytes apply() allocates on the worker's device for `n` hot experts of a layer: float ones are copied in
        the worker's dtype, quantized ones stacked (on a GPU); quantized ones kept one by one are views of the
        expert cache file, which take only page cache."""
        if self.source.format(layer) != "float" and not self._grouped(layer):
            return 0
        return n * layer_expert_nbytes(self.source.layout(layer), self.source.model.config.expert_params, self.dtype)

    def added_nbytes(self, placement: Placement) -> int:
        """Bytes applying `placement` adds to what the worker holds. apply() frees a layer's old experts before it
        makes its new ones, but the layers go in turn: a layer that shrinks is counted as freeing nothing, so no
        order of the layers takes more than this at any point."""
        return sum(max(0, self._held_nbytes(layer, len(placement.hot(layer)))
                       - self._held_nbytes(layer, len(self.ids.get(layer, ()))))
                   for layer in range(placement.n_layers))

    def apply(self, placement: Placement, after_layer: Callable[[], None] = lambda: None) -> list[int]:
        """Load each layer's hot set; the layers whose set changed. `after_layer` runs between layers (a full pool
        takes seconds to load)."""
        changed = []
        for layer in range(placement.n_layers):
            after_layer()
            ids = placement.hot(layer)
            if self.ids.get(layer) == ids:
                continue
            changed.append(layer)
            self.ids[layer] = ids
            self.stack_index[layer] = {e: i for i, e in enumerate(ids)}
            for key in [k for k in self.weights if k[0] == layer]:
                del self.weights[key]
            self.stacks.pop(layer, None)
            self.places.pop(layer, None)
            if not ids:
                continue
            if self._grouped(layer):
                self.stacks[layer] = self._stack(layer, ids)
                places = torch.full((self.source.model.config.n_experts,), len(ids), dtype=torch.int64)
                places[ids] = torch.arange(len(ids))
                self.places[layer] = places.to(self.device)
            elif self.source.format(layer) == "float":
                for e in ids:
                    self.weights[(layer, e)] = self._float(layer, e)
            else:
                for e in ids:
                    self.weights[(layer, e)] = self.source.weights(layer, e)
        return changed

    @property
    def nbytes(self) -> int:
        """Bytes of expert weights the worker holds (views of the expert cache file are the page cache's)."""
        held = [m for stack in self.stacks.values() for m in stack]
        held += [m for w in self.weights.values() for m in w if isinstance(m, torch.Tensor)]
        return sum(t.numel() * t.element_size() for m in held for t in matrix_tensors(m))

    def on_device(self, layer: int, rows_at_most: int) -> bool:
        """Whether the layer has a stack that takes up to `rows_at_most` rows per expert from counts on the
        device (compute_all)."""
        return layer in self.stacks and takes_device_counts(self.stacks[layer], rows_at_most)

    def all_hot(self, layer: int) -> bool:
        return len(self.ids.get(layer, ())) == self.source.model.config.n_experts

    def compute_all(self, layer: int, x: torch.Tensor, counts: torch.Tensor, used_at_most: int,
                    rows_at_most: int) -> torch.Tensor:
        """An on_device layer's stack over x's first rows, sorted by their place in the stack, with `counts` per
        place on the device; the rows after the counted ones come out undefined."""
        return all_experts_grouped(x, self.stacks[layer], counts, used_at_most, rows_at_most)

    def compute(self, layer: int, x: torch.Tensor, experts: list[int], counts: list[int]) -> torch.Tensor:
        """Rows of x grouped by expert (ascending ids, as group_by_expert sorts them) through their experts."""
        if layer not in self.stacks:
            return grouped_ffn(x, experts, counts, lambda e: self.weights[(layer, e)])
        index = self.stack_index[layer]
        return experts_grouped(x, self.stacks[layer], [index[e] for e in experts], counts)


@dataclass
class _PathGroups:
    """One path's share of a layer's (token, expert) pairs, grouped: `keys[i]` (an expert, or a soft slot)
    takes `counts[i]` consecutive pairs of the path's span [start, end) of the layer's pair order."""

    keys: list[int]
    counts: list[int]
    start: int
    end: int


class MoEDispatch:
    """The trunk's MoE function for one placement. `on_dispatch(path, pairs)` counts (token, expert)
    pairs by path: hot, soft_hit (already in a VRAM slot), streamed (copied into a slot it keeps), staged
    (copied into a staging slot for this step only) or cpu.

    A layer's routing comes to the host once (one wait on the device per layer); the pairs are grouped there by
    path and expert and their order goes back in one copy, so a decode step launches few small kernels. The hot
    experts' share needs no host: their pairs are grouped on the device and nothing waits for them, so a decode
    step may capture it in a CUDA graph with the layer's attention (on_device), and a layer whose experts are
    all hot skips the host altogether. In a decode step the experts in VRAM slots are one graph too, replayed
    once the host has copied their pairs and the slots' counts over (_slot_share).

    `before_layer` runs before each layer's cold work (the worker's heartbeat: cold experts can take long)."""

    def __init__(self, placement: Placement, hot: HotExperts, remote: RemoteExperts | None,
                 pool: SoftPool | None = None, planner: ColdPlanner | None = None,
                 on_dispatch: Callable[[str, int], None] = lambda path, n: None,
                 before_layer: Callable[[], None] = lambda: None, crossings: DeviceCrossings | None = None) -> None:
        self.hot, self.remote, self.pool, self.planner, self.on_dispatch = hot, remote, pool, planner, on_dispatch
        self.before_layer = before_layer
        self.top_k = hot.source.model.config.n_experts_used
        self.owners = [np.asarray(layer, dtype=np.int64) for layer in placement.owner]
        self.crossings = crossings
        # per layer: the hosts that own its cold experts, the lanes a layer that crosses from the device posts to
        self.hosts_of = [sorted(set(owner.tolist()) - {GPU}) for owner in self.owners]
        self.crossed = 0  # pairs of this step's layers that crossed from the device (end_step counts them)
        if crossings is not None:
            crossings.set_owners(torch.from_numpy(np.stack(self.owners)))
        # per decode batch's rows: _slot_index's indices and _slot_share's result, where a decode graph reads them
        self._slot_buffers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def _soft_slots(self, layer: int, cold: dict[int, int], slots: dict[int, int]) -> set[int]:
        """Into `slots` (expert -> slot), each pinned as it goes in, the slots of this layer's cold experts (expert
        -> pairs) computed on the GPU this step: resident ones, then the ones the planner streams in; returned,
        the experts it streams that the policy finds no slot for, which go through the staging slots (or, with
        none, stay on their host)."""
        if self.pool is None or not cold:
            return set()
        tier = self.pool.tier
        staged = set()
        with section("soft"):
            for e in cold:  # pinned as found, so streaming this layer's misses cannot evict them
                slot = tier.lookup((layer, e))
                if slot is not None:
                    tier.pin((layer, e))
                    slots[e] = slot
            self.on_dispatch("soft_hit", sum(cold[e] for e in slots))
            misses = [(e, int(self.owners[layer][e]), n) for e, n in cold.items() if e not in slots]
            streamed = 0
            for e in self.planner.to_stream(layer, misses) if self.planner else []:
                slot = self.pool.stream(layer, e)
                if slot is not None:
                    tier.pin((layer, e))
                    slots[e] = slot
                    streamed += cold[e]
                elif self.pool.staging_slots:
                    staged.add(e)
            if streamed:
                self.on_dispatch("streamed", streamed)
            if staged:
                self.on_dispatch("staged", sum(cold[e] for e in staged))
        return staged

    def _plan(self, layer: int, ids: np.ndarray, slots: dict[int, int]
              ) -> tuple[np.ndarray, dict[str | int, _PathGroups]]:
        """The layer's pair order and each path's groups in it (plan_pairs); the soft slots in use into `slots`,
        pinned: the caller unpins them, whether this returns or raises."""
        owner = self.owners[layer]
        per_expert = np.bincount(ids, minlength=len(owner))  # not np.unique: it takes several times as long
        cold = np.flatnonzero((per_expert > 0) & (owner != GPU))
        staged = self._soft_slots(layer, dict(zip(cold.tolist(), per_expert[cold].tolist(), strict=True)), slots)
        return plan_pairs(ids, per_expert, owner, slots, staged)

    def _first_pass(self, layer: int, staged: _PathGroups | None) -> list[int]:
        """Start copying the layer's staged experts into the staging slots, as many as there are slots; the slots
        they fill. Queued before the hot and soft experts are launched, so PCIe moves them while the host launches
        the rest (on one stream, those launches then run after the copies)."""
        if staged is None:
            return []
        assert self.pool is not None
        with section("staged"):
            return self.pool.stage(layer, staged.keys[: len(self.pool.staging_slots)])

    def _in_slots(self, layer: int, h: torch.Tensor, tokens: torch.Tensor, soft: _PathGroups | None,
                  staged: _PathGroups | None, first_pass: list[int]) -> list[torch.Tensor]:
        """The rows of the experts in VRAM slots: the soft tier's with the staged experts' first pass in one
        launch, the staged ones' slots coming after the tier's as their pairs do; then the staged experts' further
        passes, each filling the staging slots again. A step of one stream has one pass at most: a layer's cold
        experts take one launch."""
        pool = self.pool
        keys = (soft.keys if soft else []) + first_pass
        if not keys:
            return []
        assert pool is not None
        counts = (soft.counts if soft else []) + (staged.counts[: len(first_pass)] if staged else [])
        start = soft.start if soft else staged.start  # type: ignore[union-attr]
        end = start + sum(counts)
        with section("soft"):
            out = [pool.compute(layer, h[tokens[start:end]], keys, counts)]
        if staged is None:
            return out
        width = len(pool.staging_slots)
        with section("staged"):
            for i in range(len(first_pass), len(staged.keys), width):
                counts = staged.counts[i : i + width]
                slots = pool.stage(layer, staged.keys[i : i + width])
                out.append(pool.compute(layer, h[tokens[end : end + sum(counts)]], slots, counts))
                end += sum(counts)
        return out

    def on_device(self, layer: int, rows: int, padded_rows: int) -> DevicePart | None:
        """The hot experts' share of the layer's MoE for `padded_rows` rows (of which `rows` are real) as a function
        that never waits on the device, where the layer has hot experts stacked for it; else None. Where they are
        all the layer's experts, their pairs are counted now: the host never sees the layer's routing. Where the
        layer's cold experts cross to their hosts from the device (_crosses), the function is the whole MoE."""
        hot_share = self.hot.on_device(layer, padded_rows)
        if self._crosses(layer, rows, padded_rows, hot_share):
            self.crossed += rows * self.top_k
            return DevicePart(functools.partial(self._crossing_layer, layer, hot_share), True)
        if not hot_share:
            return None
        whole = self.hot.all_hot(layer)
        if whole:
            self.on_dispatch("hot", rows * self.top_k)
        return DevicePart(functools.partial(self._hot_share, layer), whole)

    def _crosses(self, layer: int, rows: int, padded_rows: int, hot_share: bool) -> bool:
        """Whether the layer's cold experts cross to their hosts from the device in this decode step: crossings
        on, the layer's hot experts (if any) computed on the device too, and every host's lane ready."""
        hosts = self.hosts_of[layer]
        if self.crossings is None or not hosts or not (hot_share or not self.hot.ids.get(layer)):
            return False
        cfg = self.hot.source.model.config
        return self.crossings.open(hosts, rows, padded_rows, self.top_k, cfg.hidden, self.hot.dtype)

    def _crossing_layer(self, layer: int, hot_share: bool, h: torch.Tensor, weights: torch.Tensor,
                        expert_ids: torch.Tensor) -> torch.Tensor:
        """The whole of a crossing layer's MoE: its hosts' share (their lanes) and the hot experts' share."""
        assert self.crossings is not None
        hosts = self.hosts_of[layer]
        self.crossings.post(layer, hosts, h, weights, expert_ids)
        hot = self._hot_share(layer, h, weights, expert_ids) if hot_share else None  # while the hosts compute
        cold = self.crossings.collect(layer, hosts, h)
        return cold if hot is None else cold + hot

    def begin_step(self) -> None:
        """Before a step's forward: nothing has crossed yet."""
        self.crossed = 0
        if self.crossings is not None:
            self.crossings.begin_step()

    def end_step(self) -> None:
        """After a step's forward: where layers crossed from the device, wait for it to finish the step (the
        hosts answer the lanes meanwhile) and count their pairs: the hosts' as cpu, the rest as hot."""
        crossed, self.crossed = self.crossed, 0
        if not crossed:
            return
        assert self.crossings is not None
        # an answer to a request an earlier, failed step abandoned may land in this step's count: at most crossed
        cold = min(self.crossings.end_step(), crossed)
        self.on_dispatch("cpu", cold)
        self.on_dispatch("hot", crossed - cold)

    def abandon_step(self) -> None:
        """After a step's forward raised: drain what its crossing layers queued on the device."""
        self.crossed = 0
        if self.crossings is not None:
            self.crossings.abandon()

    def _hot_share(self, layer: int, h: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor
                   ) -> torch.Tensor:
        tokens, k = expert_ids.shape
        n_hot = len(self.hot.ids[layer])
        place = self.hot.places[layer][expert_ids.flatten()]
        pairs = torch.argsort(place, stable=True)  # the cold experts' pairs (place n_hot) last
        token_of = pairs // k
        # not bincount: on CUDA it reads the largest id back to size its output, a wait on the device
        counts = torch.zeros(n_hot + 1, dtype=torch.int64, device=place.device)
        counts.index_add_(0, place, torch.ones_like(place))
        # no profile section here: a decode graph may be capturing this, and a section waits on the device
        y = self.hot.compute_all(layer, h[token_of], counts[:n_hot], used_at_most=tokens * k, rows_at_most=tokens)
        if not self.hot.all_hot(layer):
            y = torch.where((place[pairs] < n_hot)[:, None], y, 0)  # the cold pairs' rows are undefined
        return _combined(token_of, y, weights.flatten()[pairs], torch.zeros_like(h))

    def __call__(self, layer: int, h: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor,
                 hot: torch.Tensor | None = None, graph: MoEGraph | None = None) -> torch.Tensor:
        """`hot`: the hot experts' share, already computed (on_device's function, in a decode graph's front).
        `graph`: h, weights and hot lie in a decode step's static buffers, and the experts in VRAM slots may be
        computed as a graph of that step's (_slot_share)."""
        if hot is None and self.hot.all_hot(layer):
            part = self.on_device(layer, h.shape[0], h.shape[0])
            if part is not None:
                return part.moe(h, weights, expert_ids)
        self.before_layer()
        if self.crossed:  # crossing layers queued before this one: the device waits on hosts that may be gone
            self.crossings.settle()  # type: ignore[union-attr]
        slots: dict[int, int] = {}
        try:
            pair_order, groups = self._plan(layer, expert_ids.flatten().cpu().numpy(), slots)
            return self._dispatch(layer, h, weights, expert_ids, hot, graph, pair_order, groups)
        finally:
            # raised or not: a pin left behind would hold its expert in its slot, unevictable, for good
            for e in slots:
                self.pool.tier.unpin((layer, e))  # type: ignore[union-attr]

    def _dispatch(self, layer: int, h: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor,
                  hot: torch.Tensor | None, graph: MoEGraph | None, pair_order: np.ndarray,
                  groups: dict[str | int, _PathGroups]) -> torch.Tensor:
        """The layer's MoE by `_plan`'s paths: the hosts', hot, soft-tier (pinned meanwhile) and staged experts."""
        k = expert_ids.shape[1]
        soft, staged = groups.get("soft"), groups.get("staged")
        index = None
        if graph is not None and (soft or staged) and (hot is not None or GPU not in groups):
            index = self._slot_index(layer, h, pair_order, k, soft, staged)
        if index is not None:
            pairs, tokens = index[-2 * len(pair_order) :].view(2, -1)
        else:  # the pairs and their tokens in one copy (a step of one stream spends its time on the host, per call)
            pairs, tokens = torch.from_numpy(np.stack([pair_order, pair_order // k])).to(h.device, non_blocking=True)
        sent = []
        for host, g in groups.items():
            if not isinstance(host, int) or host == GPU:
                continue
            assert self.remote is not None, "placement has cold experts but the worker has no expert hosts"
            self.remote.send(host, layer, g.keys, g.counts, h, tokens[g.start : g.end])
            self.on_dispatch("cpu", g.end - g.start)
            sent.append((host, g, time.perf_counter()))
        # after the sends: a send to a host waits for the device, which must not wait for these copies
        first_pass = self._first_pass(layer, staged)
        ys = []
        # the pairs ys will hold come after `done`: the hot ones come first, where the front computed them
        done = groups[GPU].end if hot is not None and GPU in groups else 0
        if GPU in groups:
            g = groups[GPU]
            self.on_dispatch("hot", g.end - g.start)
            if hot is None:
                with section("hot"):
                    ys.append(self.hot.compute(layer, h[tokens[g.start : g.end]], g.keys, g.counts))
        if index is not None:
            with section("soft"):
                hot = self._slot_share(layer, h, weights, hot, index, graph)  # type: ignore[arg-type]
            done = (staged or soft).end  # type: ignore[union-attr]
        else:
            ys += self._in_slots(layer, h, tokens, soft, staged, first_pass)
        for host, g, sent_at in sent:
            # An answer already there came back some time before now: the crossing it took is not known then,
            # only bounded by the GPU work launched meanwhile, which the cost model must not take for crossing.
            waited = not self.remote.answered(host)  # type: ignore[union-attr]
            y, compute_s = self.remote.receive(host, layer)  # type: ignore[union-attr]
            if self.planner is not None:
                self.planner.observe_host(layer, len(g.keys), g.end - g.start, compute_s,
                                          time.perf_counter() - sent_at if waited else None)
            ys.append(y.to(h.device, h.dtype))
        if hot is not None and not ys:
            return hot  # every pair is in it
        return _combined(tokens[done:], ys[0] if len(ys) == 1 else torch.cat(ys), weights.flatten()[pairs[done:]],
                         torch.zeros_like(h) if hot is None else hot)

    def _slot_index(self, layer: int, h: torch.Tensor, pair_order: np.ndarray, k: int, soft: _PathGroups | None,
                    staged: _PathGroups | None) -> torch.Tensor | None:
        """Where the layer's experts in VRAM slots (the soft tier's and one pass of staged ones) can be computed
        from counts on the device, the step's indices in one copy to a buffer that stays put, for _slot_share:
        the slots' pairs and their tokens, both padded to every pair's length, the rows of each slot, then every
        pair and its token; else None."""
        pool = self.pool
        assert pool is not None
        n_pairs, rows = len(pair_order), h.shape[0]
        if (staged and len(staged.keys) > len(pool.staging_slots)) or not pool.on_device(layer, rows):
            return None
        buffers = self._slot_buffers.get(rows)
        if buffers is None:
            buffers = self._slot_buffers[rows] = (
                torch.zeros(4 * n_pairs + pool.n_slots, dtype=torch.int64, device=h.device),
                torch.empty_like(h))
        start = soft.start if soft else staged.start  # type: ignore[union-attr]
        end = staged.end if staged else soft.end  # type: ignore[union-attr]
        host = np.zeros(4 * n_pairs + pool.n_slots, dtype=np.int64)
        host[: end - start] = pair_order[start:end]
        host[n_pairs : n_pairs + end - start] = pair_order[start:end] // k
        # staged experts fill the staging slots in order (SoftPool.stage), after the tier's slots their pairs follow
        keys = (soft.keys if soft else []) + (pool.staging_slots[: len(staged.keys)] if staged else [])
        host[2 * n_pairs + np.asarray(keys)] = (soft.counts if soft else []) + (staged.counts if staged else [])
        host[2 * n_pairs + pool.n_slots : 3 * n_pairs + pool.n_slots] = pair_order
        host[3 * n_pairs + pool.n_slots :] = pair_order // k
        index = buffers[0]
        index.copy_(torch.from_numpy(host), non_blocking=True)
        return index

    def _slot_share(self, layer: int, h: torch.Tensor, weights: torch.Tensor, hot: torch.Tensor | None,
                    index: torch.Tensor, graph: MoEGraph) -> torch.Tensor:
        """The slots' pairs (as _slot_index laid them out) through their experts, weighted and added to the hot
        share (or to zeros), as the step's graph for the layer's layout and the batch's rows, so every layer of a
        layout replays one graph: the host copies one index over and replays, where launching the slots' experts
        itself took it ~100 us a layer (bench/README.md). The result is left in a buffer the MoE keeps, which the
        trunk reads before the next layer's."""
        pool = self.pool
        assert pool is not None
        rows, k = weights.shape
        n_pairs, n_slots = rows * k, pool.n_slots
        out = self._slot_buffers[rows][1]

        def body() -> None:
            pairs, tokens, counts = index[:n_pairs], index[n_pairs : 2 * n_pairs], index[2 * n_pairs :][:n_slots]
            y = pool.compute_all(layer, h[tokens], counts, min(n_pairs, n_slots), rows)
            counted = torch.arange(n_pairs, device=y.device) < counts.sum()  # the padding's rows are undefined
            y = torch.where(counted[:, None], y, 0)
            if hot is None:
                out.zero_()
            else:
                out.copy_(hot)
            _combined(tokens, y, weights.flatten()[pairs], out)

        graph((self.hot.source.layout(layer), rows, hot is not None), body)
        return out


_HOT, _SOFT, _STAGED, _FIRST_HOST = 0, 1, 2, 3  # paths in the order a layer's pairs take them


def plan_pairs(ids: np.ndarray, per_expert: np.ndarray, owner: np.ndarray, slots: dict[int, int], staged: set[int]
               ) -> tuple[np.ndarray, dict[str | int, _PathGroups]]:
    """A layer's (token, expert) pairs (`ids`, flattened (token, k) expert ids, counted per expert of the layer in
    `per_expert`, np.bincount's) ordered by path, then key: hot pairs by expert, soft ones by slot (`slots`: expert
    -> slot), `staged` ones by expert, then each host's (`owner[expert]`, GPU for hot) by expert, a pair's own
    order kept within its expert; and each path's groups in that order. Vectorized: a decode step plans every
    layer, at up to 128 experts of pairs each."""
    experts = np.flatnonzero(per_expert)
    counts = per_expert[experts]
    owners = owner[experts]
    rank = np.where(owners == GPU, _HOT, _FIRST_HOST + owners)
    key = experts.copy()
    if slots:
        at = np.searchsorted(experts, list(slots))
        rank[at], key[at] = _SOFT, list(slots.values())
    if staged:
        rank[np.searchsorted(experts, list(staged))] = _STAGED
    by_path = np.lexsort((key, rank))  # the experts in the pairs' new order
    position = np.empty_like(per_expert)
    position[experts[by_path]] = np.arange(len(by_path))
    pair_order = np.argsort(position[ids], kind="stable")
    ranks, keys, sizes = rank[by_path], key[by_path].tolist(), counts[by_path].tolist()
    ends = np.cumsum(counts[by_path]).tolist()
    cuts = [0, *(np.flatnonzero(np.diff(ranks)) + 1).tolist(), len(ranks)] if len(ranks) else []
    groups: dict[str | int, _PathGroups] = {}
    for a, b in itertools.pairwise(cuts):
        r = int(ranks[a])
        path = GPU if r == _HOT else "soft" if r == _SOFT else "staged" if r == _STAGED else r - _FIRST_HOST
        groups[path] = _PathGroups(keys[a:b], sizes[a:b], ends[a - 1] if a else 0, ends[b - 1])
    return pair_order, groups


def _combined(tokens: torch.Tensor, y: torch.Tensor, pair_weights: torch.Tensor, into: torch.Tensor) -> torch.Tensor:
    """Each token's expert outputs (rows of y, one per pair, token of pair i is tokens[i]) weighted and added to
    its row of `into`, in place (a decode graph's buffer of the hot share, read before its next replay)."""
    return into.index_add_(0, tokens, y * pair_weights[:, None])
