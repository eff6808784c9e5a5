"""The experts one host owns, in the memory kind its configuration names (see expert_host.memory)."""

from __future__ import annotations

import collections
import itertools
from collections.abc import Callable

import numpy as np
import torch

from expert_host import memory
from shared.config import Config
from shared.device_caps import HOST_DMA, DeviceCaps, read_device_caps
from shared.expert_math import ExpertWeights, grouped_ffn
from shared.expert_source import ExpertSource
from shared.mailbox import LaneRequest
from shared.memory_use import HostMemoryError, host_memory, safety_floor
from shared.native_kernels import LayerTable, lane_swiglu, layer_table
from shared.placement import Placement
from shared.quant import matrix_tensors


class PlacementStopped(Exception):
    """Raised by a store's keep_alive when the process is told to stop while it waits to take a placement on or
    fills its memory for one."""


class ExpertStore:
    """Mapped experts are zero-copy views of the model file (float experts) or of its expert cache file
    (quantized ones), so RAM is the pages they touch; pinned experts are copies of the same bytes that the host
    owns, migrated in one layer at a time.

    Before anything is copied, `apply` checks that a pinned placement fits in the RAM free
    now (less the safety floor) and raises HostMemoryError, saying what would fit, if it does not."""

    def __init__(self, source: ExpertSource, host_index: int, kind: str = "mapped", floor: str = "2GiB",
                 caps: DeviceCaps | None = None) -> None:
        memory.check_kind(kind)
        self.source, self.model = source, source.model
        self.host_index, self.kind, self.floor, self.caps = host_index, kind, floor, caps
        self.weights: dict[tuple[int, int], ExpertWeights] = {}
        self.placement_version = 0
        self._arena: memory.SharedSegment | None = None
        self._lane_tables: dict[int, LayerTable | None] = {}  # layer -> its held experts' addresses, made on use
        # called while a placement waits for the memory lock and between the regions it copies: the host's
        # heartbeat, since both can outlast the coordinator's heartbeat timeout, and where a stop is heard (raising
        # PlacementStopped: cut short in the fill, the store then holds nothing; in the wait, what it held)
        self.keep_alive: Callable[[], None] = lambda: None

    @classmethod
    def from_config(cls, source: ExpertSource, host_index: int, config: Config) -> ExpertStore:
        """The store expert host `host_index` runs with; only kinds that involve the GPU look for one."""
        kind = config.host_memory_for(host_index)
        caps = read_device_caps() if kind != "mapped" and config.device != "cpu" else None
        # the worker page-locks its map where the GPU DMAs from host memory (soft_pool.register_for_dma)
        if kind == "pinned" and caps is not None and caps.decision == HOST_DMA and config.soft_slots > 0:
            raise HostMemoryError(
                f"expert host {host_index} would copy its experts into pinned memory while the gpu worker streams "
                f"cold experts (soft_slots {config.soft_slots}) from its own page-locked map of the file, which keeps "
                "every expert's pages in RAM: that is two copies of this host's experts. Use host_memory = mapped "
                "(the host then reads the pages the worker's map holds), or soft_slots = 0")
        return cls(source, host_index, kind, config.host_memory_floor, caps)

    def apply(self, placement: Placement) -> None:
        """Hold exactly the experts the placement gives this host, never two copies of them at once."""
        wanted = {layer: placement.on_host(layer, self.host_index) for layer in range(placement.n_layers)}
        self._lane_tables = {}  # their addresses go with the experts
        if self.kind == "mapped":
            self._apply_mapped(wanted)
        else:
            self._migrate(wanted)
        self.placement_version = placement.version

    def _apply_mapped(self, wanted: dict[int, list[int]]) -> None:
        """Views of the files' pages: nothing to fit, nothing copied."""
        keys = {(layer, e) for layer, experts in wanted.items() for e in experts}
        for key in set(self.weights) - keys:
            del self.weights[key]
        for layer, e in sorted(keys - set(self.weights)):
            self.weights[(layer, e)] = self.source.weights(layer, e)

    def _migrate(self, wanted: dict[int, list[int]]) -> None:
        """Check the fit and fill a new arena under the host memory lock, so another host measures free memory
        only once this one's pages are taken."""
        sizes = {layer: len(experts) * self.source.layout(layer).region_nbytes for layer, experts in wanted.items()}
        need = sum(sizes.values())
        if need == 0:
            self.close()
            return
        old = self._arena
        with memory.host_memory_lock(self.keep_alive):
            self._check_fit(need, sum(len(experts) for experts in wanted.values()), old.nbytes if old else 0)
            new = memory.SharedSegment([sizes[layer] for layer in sorted(sizes)],
                                       register=self.caps is not None and self.caps.decision == HOST_DMA)
            self._fill(new, old, wanted)
        self._close_arena()
        self._arena = new

    def _fill(self, new: memory.SharedSegment, old: memory.SharedSegment | None, wanted: dict[int, list[int]]
              ) -> None:
        """Layer by layer, one region per expert: each expert comes from the old arena if held there,
        else from its file, whose pages are then dropped; the old arena's layer is freed before the next one.
        Layers that shrink go first, so the memory they give back is free before layers that grow take theirs."""
        old_weights, self.weights = self.weights, {}
        held = collections.Counter(layer for layer, _ in old_weights)

        def growth(layer: int) -> tuple[int, int]:
            return (len(wanted[layer]) - held[layer]) * self.source.layout(layer).region_nbytes, layer

        try:
            for layer in sorted(wanted, key=growth):
                layout = self.source.layout(layer)
                regions = new.region(layer).view(len(wanted[layer]), layout.region_nbytes)
                from_file = []
                for region, e in zip(regions, wanted[layer], strict=True):
                    self.keep_alive()
                    held = old_weights.pop((layer, e), None)
                    if held is None:
                        self.source.fill_region(layer, e, region)
                        from_file.append(e)
                    else:
                        layout.fill(region, held)
                    self.weights[(layer, e)] = layout.views(region)
                if from_file:
                    self.source.check_digests(layer, from_file, torch.get_num_threads())
                    memory.drop_file_pages(self.source, layer, from_file)
                for key in [key for key in old_weights if key[0] == layer]:
                    del old_weights[key]
                if old is not None:
                    old.release(layer)
            new.finish()
        except BaseException:
            new.close()
            self.close()  # half moved: hold nothing rather than an unknown part of either placement
            raise

    def _check_fit(self, need: int, n_experts: int, freed: int) -> None:
        mem = host_memory()
        largest = max(self.source.layout(layer).region_nbytes for layer in range(self.model.config.n_layers))
        shm_free = memory.shm_free_bytes() if self.kind == "pinned" else None
        memory.check_fit(self.kind, need, n_experts, largest, mem, safety_floor(self.floor, mem), shm_free,
                         freed)

    def _close_arena(self) -> None:
        if self._arena is not None:
            self._arena.close()
            self._arena = None

    def close(self) -> None:
        """Let go of every expert and free the memory they were copied into."""
        self.weights = {}
        self._lane_tables = {}
        self.placement_version = 0
        self._close_arena()

    def prefetch(self, layer: int, experts: list[int]) -> None:
        """Ask the kernel to read mapped experts' pages ahead of use (e.g. the next layer's routed experts);
        copied kinds are resident already."""
        if self.kind == "mapped":
            memory.prefetch([t for e in experts if self.owns(layer, e)
                             for m in self.weights[(layer, e)] for t in matrix_tensors(m)])

    def prefetch_next_layer(self, layer: int) -> None:
        """Start reading every expert this host holds of the next layer in: a batch that reached most of this
        layer's experts (a prompt being prefilled) reaches most of the next one's too, a moment from now."""
        if layer + 1 < self.model.config.n_layers:
            self.prefetch(layer + 1, [e for held_layer, e in self.weights if held_layer == layer + 1])

    def owns(self, layer: int, expert: int) -> bool:
        return (layer, expert) in self.weights

    def of_layer(self, layer: int) -> Callable[[int], ExpertWeights]:
        return lambda e: self.weights[(layer, e)]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for w in self.weights.values() for m in w for t in matrix_tensors(m))

    def routed_work(self, layer: int, ids: np.ndarray, owned: np.ndarray) -> tuple[list[int], list[int], np.ndarray]:
        """A layer's routing (ids: (rows, k) expert ids) as a work item of the experts `owned` marks (a bool per
        expert): (experts ascending, rows for each, each of those rows' (token, k) pair index, grouped by expert).
        numpy, not torch: a decode step's few pairs cost microseconds per torch call. ValueError for ids out of
        range."""
        flat = ids.ravel()
        if flat.size and not 0 <= flat.min() <= flat.max() < owned.shape[0]:
            raise ValueError(f"layer {layer}: expert ids out of range 0..{owned.shape[0] - 1}")
        mine = np.flatnonzero(owned[flat])
        pairs = mine[np.argsort(flat[mine], kind="stable")]
        routed = flat[pairs]
        starts = np.flatnonzero(np.concatenate(([True], routed[1:] != routed[:-1]))).tolist() if routed.size else []
        counts = [end - start for start, end in itertools.pairwise([*starts, routed.size])]
        return routed[starts].tolist(), counts, pairs

    def answer_lane(self, request: LaneRequest) -> int:
        """Compute a lane request into its `out`: each real row's weighted sum over its pairs with the experts the
        request's owner table gives this host, zeros in the padding's rows. Returns the pairs computed; ValueError
        names what is wrong with the request. Quantized experts in one native call (lane_swiglu), others grouped
        here and summed row by row in fp32."""
        table = self._lane_table(request.layer)
        if table is not None:
            pairs = lane_swiglu(table, request.ids, request.weights, request.owned, request.hidden, request.out)
            if pairs is not None:
                return pairs
        experts, counts, pairs = self.routed_work(request.layer, request.ids.numpy(), request.owned.numpy())
        rows, k = request.ids.shape
        out = request.out[:rows]
        if experts:
            tokens = pairs // k
            output = self.compute(request.layer, experts, counts, request.hidden[torch.from_numpy(tokens)])
            # each row's pairs added into that row alone: as one product of (rows, pairs) routing weights, mostly
            # zeros, a row's NaN or inf made every row NaN (0 x inf), one sequence spoiling the whole step's. In
            # numpy: with torch's index_add_ the demo decoded at 147-179 tok/s on 2 cores, against 227-237
            weighted = output.float().numpy() * request.weights.numpy().ravel()[pairs, None]
            sums = np.zeros((rows, out.shape[1]), dtype=np.float32)  # fp32: CPUs without bf16 products
            np.add.at(sums, tokens, weighted)
            out.copy_(torch.from_numpy(sums))
        else:
            out.zero_()
        request.out[rows:] = 0  # the padding's rows: the device adds every row
        return len(pairs)

    def _lane_table(self, layer: int) -> LayerTable | None:
        if layer not in self._lane_tables:
            cfg = self.model.config
            held = {e: w for (held_layer, e), w in self.weights.items() if held_layer == layer}
            self._lane_tables[layer] = layer_table(held, cfg.n_experts, cfg.hidden, cfg.expert_ffn)
        return self._lane_tables[layer]

    def compute(self, layer: int, experts: list[int], counts: list[int], hidden: torch.Tensor) -> torch.Tensor:
        """Validate a work item against what this host holds, then run it; ValueError names what is wrong."""
        hidden_size = self.model.config.hidden
        if hidden.dim() != 2 or hidden.shape[1] != hidden_size or not hidden.dtype.is_floating_point:
            raise ValueError(f"hidden is {hidden.dtype} of shape {tuple(hidden.shape)}, expected floats of shape "
                             f"(rows, {hidden_size})")
        if len(experts) != len(counts) or sum(counts) != hidden.shape[0] or any(n <= 0 for n in counts):
            raise ValueError(f"counts {counts} do not describe {hidden.shape[0]} rows for {len(experts)} experts")
        missing = [e for e in experts if not self.owns(layer, e)]
        if missing:
            raise ValueError(f"layer {layer}: experts {missing} are not held by this host")
        return grouped_ffn(hidden, experts, counts, self.of_layer(layer))

