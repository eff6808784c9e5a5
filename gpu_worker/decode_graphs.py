"""A decode step's attention and router as one CUDA graph replay per layer, with the layer's hot experts too
(all of the layer where its experts are all in VRAM).

A decode step is bound by kernel launches, not by bytes: each layer's attention and router are a few dozen
small kernels, launched from Python between two crossings of the MoE layer. Captured once per layer and
shape, they are one replay each. Shapes are bucketed so a few graphs serve every step: the batch is padded
to a power of two sequences, every context to a power of two slots, masked. Padding rows read and write
only the spare KV slot past the cache's last block, so they touch no sequence's cache.

The hot experts' share of a layer's MoE is in its graph (it needs no host), so the host plans and launches only
the cold experts. A layer whose routed experts are all hot is captured whole instead (attention, router, experts
and the residual add, the next layer's input written into the static rows), so it crosses no Python between
layers at all. Graphs read the hot experts' stacks where they lie, so a new hot set drops its layer's
(drop_layers). The MoE may keep graphs of its own device work in the batch too (run_moe): its slot experts' share,
from indices the host copies into buffers the MoE keeps, which a new MoE drops (drop_moe).

Graphs are captured the first time a step needs them (a layer at a time, while that step runs, so the
capture's warm-up computes the step's real values). Without capture (on a CPU) the same static buffers are
run eagerly, which is how the padding and masking are tested without a GPU.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

log = logging.getLogger(__name__)
K = TypeVar("K")  # what a layer's graphs are found by

# (normed rows for the MoE (N, H), routing weights (N, k), expert ids (N, k)) -> the hot experts' share of one
# layer's MoE (N, H): their routed pairs' weighted sum
HotShare = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# (layer, input rows, batch slots, the layer's HotShare or None) -> (rows after attention, normed rows for the MoE,
# routing weights, expert ids, and the hot share where one was given)
FrontFn = Callable[[int, torch.Tensor, "StaticBatch", HotShare | None], tuple[torch.Tensor, ...]]
# (key, body) -> None: runs `body`, which reads and writes only buffers that stay where they are, as the step's
# static batch's graph for `key` (captured the first time)
MoEGraph = Callable[[Hashable, Callable[[], None]], None]

MIN_CONTEXT = 64
# Steps whose padded batch x context is larger run eagerly: each layer gathers every padded slot's K and V
# (and the attention widens them to every query head), and a graph keeps its largest intermediates reserved.
MAX_PADDED_SLOTS = 32768


def bucket(n: int, floor: int = 1) -> int:
    """The power of two at or above n (at least floor)."""
    return max(floor, 1 << (n - 1).bit_length())


@dataclass
class StaticBatch:
    """One bucket's fixed buffers: the layer input rows and the step's indices (filled before each step), and
    what a layer's graph leaves for the MoE."""

    x: torch.Tensor  # (B, hidden): the layer's input rows
    positions: torch.Tensor  # (B,)
    new_slots: torch.Tensor  # (B,) KV slot each row's token is written to
    slots: torch.Tensor  # (B, C) each row's context slots, padded
    visible: torch.Tensor  # (B, 1, 1, C) which of them are real
    cos: torch.Tensor  # (B, 1, rope dims)
    sin: torch.Tensor
    out: list[torch.Tensor] = field(default_factory=list)  # the fronts' results, once fronts ran (not whole layers)
    # per (layer, whether with its hot share): its front
    graphs: dict[tuple[int, bool], torch.cuda.CUDAGraph] = field(default_factory=dict)
    whole_graphs: dict[int, torch.cuda.CUDAGraph] = field(default_factory=dict)  # per layer: all of it
    moe_graphs: dict[Hashable, torch.cuda.CUDAGraph] = field(default_factory=dict)  # the MoE's own (run_moe)


class DecodeGraphs:
    """Static buffers and graphs per (batch bucket, context bucket), for steps where every sequence decodes
    one token. `spare_slot` is a KV slot no sequence owns."""

    def __init__(self, front: FrontFn, hidden: int, rope_cos: torch.Tensor, rope_sin: torch.Tensor,
                 spare_slot: int, dtype: torch.dtype, capture: bool) -> None:
        self.front, self.hidden, self.dtype, self.capture = front, hidden, dtype, capture
        self.rope_cos, self.rope_sin, self.spare_slot = rope_cos, rope_sin, spare_slot
        self.device = rope_cos.device
        self.batches: dict[tuple[int, int], StaticBatch] = {}
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        self.stream = torch.cuda.Stream(self.device) if capture else None

    def fits(self, n_seqs: int, longest_context: int) -> bool:
        return bucket(n_seqs) * bucket(longest_context, MIN_CONTEXT) <= MAX_PADDED_SLOTS

    def prepare(self, x: torch.Tensor, positions: Sequence[int], contexts: Sequence[torch.Tensor]) -> StaticBatch:
        """The bucket for these rows (one per sequence: its new token's position and its context's KV slots,
        the new one last) with their indices and input rows copied in, in one host-to-device copy."""
        n, longest = len(contexts), max(len(s) for s in contexts)
        b, c = bucket(n), bucket(longest, MIN_CONTEXT)
        batch = self.batches.get((b, c))
        if batch is None:
            batch = self.batches[(b, c)] = self._allocate(b, c)
        spare, padding = self.spare_slot, b - n
        slots = F.pad(pad_sequence(list(contexts), batch_first=True, padding_value=spare),
                      (0, c - longest, 0, padding), value=spare)
        # a padding row writes and sees only the spare slot, so its softmax is defined and touches no sequence
        lengths = torch.tensor([len(s) for s in contexts] + [1] * padding)
        new_slots = torch.tensor([int(s[-1]) for s in contexts] + [spare] * padding)
        pos = torch.tensor(list(positions) + [0] * padding)
        host = torch.cat([pos, new_slots, slots.flatten(), lengths])
        device = host.to(self.device, non_blocking=True)
        pos_d, new_d, slots_d, lengths_d = device.split([b, b, b * c, b])
        batch.positions.copy_(pos_d)
        batch.new_slots.copy_(new_d)
        batch.slots.copy_(slots_d.view(b, c))
        torch.lt(torch.arange(c, device=self.device)[None, :], lengths_d[:, None], out=batch.visible.view(b, c))
        torch.index_select(self.rope_cos, 0, batch.positions, out=batch.cos.view(b, -1))
        torch.index_select(self.rope_sin, 0, batch.positions, out=batch.sin.view(b, -1))
        batch.x[:n] = x
        # padding rows copy a real one: a row of zeros normalized to 0 x rsqrt(norm_eps), NaN where a model's
        # epsilon is 0, and its key and value in the spare slot, masked but still multiplied, made every row NaN
        batch.x[n:] = x[:1]
        return batch

    def _allocate(self, b: int, c: int) -> StaticBatch:
        d, long = self.device, torch.long
        rope = self.rope_cos.shape[-1]
        return StaticBatch(
            x=torch.zeros(b, self.hidden, device=d, dtype=self.dtype),
            positions=torch.zeros(b, device=d, dtype=long), new_slots=torch.zeros(b, device=d, dtype=long),
            slots=torch.zeros(b, c, device=d, dtype=long), visible=torch.zeros(b, 1, 1, c, device=d, dtype=torch.bool),
            cos=torch.zeros(b, 1, rope, device=d, dtype=self.rope_cos.dtype),
            sin=torch.zeros(b, 1, rope, device=d, dtype=self.rope_sin.dtype))

    def run(self, layer: int, batch: StaticBatch, hot: HotShare | None = None) -> list[torch.Tensor]:
        """Layer `layer`'s front on the batch's rows, with its hot share where `hot` computes one: the buffers it
        leaves its results in (all bucket rows)."""
        self._run(batch.graphs, (layer, hot is not None),
                  lambda: self._store(batch, self.front(layer, batch.x, batch, hot)))
        return batch.out[: 4 if hot is None else 5]

    def run_whole(self, layer: int, batch: StaticBatch, body: Callable[[], None]) -> None:
        """The whole of layer `layer`: `body` reads the batch's rows and leaves the next layer's in them."""
        self._run(batch.whole_graphs, layer, body)

    def run_moe(self, batch: StaticBatch, key: Hashable, body: Callable[[], None]) -> None:
        """A graph of the MoE's device work in a decode step (see MoEGraph)."""
        self._run(batch.moe_graphs, key, body)

    def drop_moe(self) -> None:
        """Forget the MoE's graphs (they read buffers of an MoE that was replaced)."""
        for batch in self.batches.values():
            batch.moe_graphs.clear()
        self._new_pool()

    def drop_layers(self, layers: list[int]) -> None:
        """Forget these layers' graphs (their hot experts changed)."""
        for batch in self.batches.values():
            for layer in layers:
                batch.whole_graphs.pop(layer, None)
                for with_hot in (False, True):
                    batch.graphs.pop((layer, with_hot), None)
        self._new_pool()

    def _new_pool(self) -> None:
        """Later graphs capture into a new pool: torch's allocators (the device's and the pinned host one) release
        a pool once its last graph goes, and a capture into the same id then trips their internal asserts (on the
        H200, after a failed lane exchange dropped every whole layer's graph, every later step failed; a
        MemPool held by the worker kept the device's pool but not the host's). The graphs kept keep theirs."""
        if self.capture:
            self.pool = torch.cuda.graph_pool_handle()

    def _run(self, graphs: dict[K, torch.cuda.CUDAGraph], key: K, body: Callable[[], None]) -> None:
        if not self.capture:
            body()
            return
        graph = graphs.get(key)
        if graph is not None:
            graph.replay()
            return
        graph = self._capture(body)  # its warm-up ran this step's layer
        if graph is not None:
            graphs[key] = graph

    @staticmethod
    def _store(batch: StaticBatch, results: tuple[torch.Tensor, ...]) -> None:
        """Copy a front's results into the batch's output buffers (made from the first results that have them)."""
        batch.out += [torch.empty_like(r) for r in results[len(batch.out) :]]
        for dst, src in zip(batch.out, results, strict=False):  # a front without a hot share leaves its buffer
            dst.copy_(src)

    def _capture(self, body: Callable[[], None]) -> torch.cuda.CUDAGraph | None:
        # The warm-up (which capturing on a side stream needs first) computes this step's real values, and the
        # capture only records, so the step does not replay what it just captured: a whole layer's body updates
        # its input rows in place. Captured without torch.cuda.graph's context manager, which empties the
        # allocator's caches for every graph: mid-serving, that would cost every later step its cached blocks.
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            body()
            graph: torch.cuda.CUDAGraph | None = torch.cuda.CUDAGraph()
            try:
                # capture_begin inside: it can fail in an allocator after the stream began capturing
                graph.capture_begin(pool=self.pool, capture_error_mode="thread_local")
                body()
                graph.capture_end()
            except BaseException as e:
                # Any error (a KeyboardInterrupt too) must end the capture, or the stream stays in capture mode
                # and every later launch on it fails; the capture's own error is the one to report.
                with contextlib.suppress(RuntimeError):
                    graph.capture_end()
                if not isinstance(e, RuntimeError):
                    raise
                # e.g. a kernel this torch cannot capture, or an allocator's assert: the step has its values
                # from the warm-up, and decode runs eagerly from now on rather than failing every step
                log.warning("CUDA graph capture failed (%s); decode steps run without graphs", e)
                self.capture, graph = False, None
        current.wait_stream(self.stream)
        return graph
