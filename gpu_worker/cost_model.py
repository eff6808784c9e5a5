"""Per layer and batch, which cold experts run on their host's CPU and which are streamed over PCIe.

The two links work at once: each expert host computes its share on its CPU while the other
experts' weights are copied into GPU slots and computed there, so a layer ends when the
slowest of them ends. Host CPUs run in parallel with each other; every stream shares the
one PCIe link. The hot experts' GPU time runs while the hosts work and overlaps the host
crossing, so it is not part of a cold plan. Times are modelled as

    t_cpu(e) = bytes / cpu_read_bw[dtype] + tokens * flops_per_token / cpu_flops   (+ one round trip per host)
    t_dma(e) = bytes / pcie_bw + tokens * flops_per_token / gpu_flops

with constants measured at start-up, the hosts' refreshed from live timings (`LiveConstants`).
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from itertools import accumulate
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from shared.model_config import EXPERT_TENSOR_KINDS, ModelConfig, expert_tensor_name

if TYPE_CHECKING:
    from shared.expert_source import ExpertSource


@dataclass(frozen=True)
class CostConstants:
    pcie_bw: float  # host -> GPU bytes/s from page-locked memory
    cpu_read_bw: Mapping[str, float]  # bytes/s of expert weights a host's CPU kernels get through, per dtype key
    cpu_flops: float  # a host's CPU expert compute, flop/s
    round_trip_s: float  # one GPU -> host -> GPU crossing per layer
    gpu_flops: float  # expert compute on the GPU, flop/s

    def describe(self) -> str:
        cpu = ", ".join(f"{dtype} {bw / 1e9:.1f} GB/s" for dtype, bw in self.cpu_read_bw.items())
        return (f"PCIe {self.pcie_bw / 1e9:.1f} GB/s, CPU experts read at {cpu} and computed at "
                f"{self.cpu_flops / 1e12:.2f} Tflop/s, round trip {self.round_trip_s * 1e6:.0f} us, "
                f"GPU experts {self.gpu_flops / 1e12:.0f} Tflop/s")


# An H100 80 GB on PCIe Gen5 x16 with a 16-core Xeon (AVX512, AMX) and 128 GB: an example and the tests'
# machine. Serving uses the constants of the machine at hand, measured there and kept fresh by LiveConstants.
H100_MACHINE = CostConstants(
    pcie_bw=50.9e9,  # measured H2D from pinned memory in 2 MiB chunks (54.5e9 at 64 MiB); an expert is a few MB
    cpu_read_bw={"BF16": 27e9, "int8": 75e9},  # measured torch CPU expert FFN at batch 1; int8: _weight_int8pack_mm
    cpu_flops=4e12,  # not measured: an estimate for 16 AMX cores on expert-sized GEMMs
    round_trip_s=18.1e-6,  # measured flag-synchronised shared-memory crossing inside a CUDA graph
    gpu_flops=300e12,  # not measured: an estimate, well under the H100's bf16 peak, for small GEMMs
)


class ColdExpert(NamedTuple):  # made for every miss of every layer: 0.3 us each, a frozen dataclass 0.9
    expert: int
    host: int  # owning expert host
    tokens: int  # tokens of the batch routed to it in this layer
    nbytes: int  # its weights as served (stored float, or its int8 / int4 serving format)
    dtype: str  # key of CostConstants.cpu_read_bw (see expert_format)
    flops_per_token: float  # expert_flops_per_token(cfg)


@dataclass(frozen=True)
class LayerPlan:
    cpu: dict[int, list[int]]  # host -> experts it computes (ascending), for every host owning a cold expert
    stream: list[int]  # experts whose weights go to a GPU slot, ascending
    cpu_s: dict[int, float]  # predicted seconds of each host, its round trip included (0.0 when idle)
    stream_s: float  # predicted seconds of the PCIe link, GPU compute of the streamed experts included
    layer_s: float = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "layer_s", max(self.stream_s, *self.cpu_s.values(), 0.0))

    @property
    def n_cpu(self) -> int:
        return sum(len(experts) for experts in self.cpu.values())

    @property
    def cpu_share(self) -> float:
        """Fraction of the cold experts computed on a CPU (0.0 when there are none)."""
        n = self.n_cpu + len(self.stream)
        return self.n_cpu / n if n else 0.0

    @property
    def stream_share(self) -> float:
        n = self.n_cpu + len(self.stream)
        return len(self.stream) / n if n else 0.0


def expert_flops_per_token(cfg: ModelConfig) -> float:
    """A multiply and an add per parameter of gate, up and down."""
    return 2.0 * cfg.expert_params


def expert_format(source: ExpertSource, layer: int) -> str:
    """The dtype key of a layer's experts as served (their size: `source.expert_nbytes(layer)`): the serving
    format of quantized experts (int8, int4, or int4+int8 where down's differs: ExpertLayout.format); for float
    ones the GGML type name, or the names joined by '+' in gate, up, down order when they differ, because the
    CPU kernel's speed is that of the expert as served."""
    layout = source.layout(layer)
    if layout.format != "float":
        return layout.format
    names = [expert_tensor_name(layer, kind) for kind in EXPERT_TENSOR_KINDS]
    types = dict.fromkeys(source.model.qtype(name).name for name in names)
    return "+".join(types)


@dataclass
class _Host:
    """One host's experts sorted by t_cpu / t_dma, cheapest to compute on the CPU first.

    times[k]: the host's seconds when it computes its first k experts; rest[k]: stream seconds of the others.
    """

    host: int
    experts: tuple[int, ...]
    dma: tuple[float, ...]
    times: list[float]
    rest: list[float]


def _hosts(cold: Sequence[ColdExpert], c: CostConstants) -> list[_Host]:
    inv_pcie, inv_cpu_flops, inv_gpu_flops = 1.0 / c.pcie_bw, 1.0 / c.cpu_flops, 1.0 / c.gpu_flops
    read_bw = c.cpu_read_bw
    by_host: dict[int, list[tuple[float, int, float, float]]] = {}
    try:
        for e in cold:
            flops = e.tokens * e.flops_per_token
            cpu = e.nbytes / read_bw[e.dtype] + flops * inv_cpu_flops
            dma = e.nbytes * inv_pcie + flops * inv_gpu_flops
            by_host.setdefault(e.host, []).append((cpu / dma, e.expert, cpu, dma))
    except KeyError as err:
        raise ValueError(f"no CPU read rate for expert dtype {err.args[0]!r}; known: {', '.join(read_bw)}") from None
    hosts = []
    for host in sorted(by_host):
        # Ties broken by expert id: the plan does not depend on the order of the input.
        _, experts, cpu, dma = zip(*sorted(by_host[host]), strict=True)
        times = list(accumulate(cpu, initial=c.round_trip_s))
        times[0] = 0.0  # a host with nothing to compute is not crossed
        rest = list(accumulate(reversed(dma), initial=0.0))
        rest.reverse()
        hosts.append(_Host(host, experts, dma, times, rest))
    return hosts


def _split(hosts: list[_Host], ks: Sequence[int]) -> LayerPlan:
    """The plan in which host i computes its first ks[i] experts and streams the rest."""
    return LayerPlan(
        cpu={h.host: sorted(h.experts[:k]) for h, k in zip(hosts, ks, strict=True)},
        stream=sorted(e for h, k in zip(hosts, ks, strict=True) for e in h.experts[k:]),
        cpu_s={h.host: h.times[k] for h, k in zip(hosts, ks, strict=True)},
        stream_s=sum(h.rest[k] for h, k in zip(hosts, ks, strict=True)),
    )


def plan_layer(cold: Sequence[ColdExpert], constants: CostConstants) -> LayerPlan:
    """Split one layer's cold experts between their hosts' CPUs and PCIe so the layer ends soonest.

    For a budget T every host computes the longest prefix of its ratio-sorted experts that ends by T
    (ordering by t_cpu / t_dma makes each prefix the most PCIe time a host can take over for its CPU
    time) and streams the rest. The stream time falls as T grows, so the best T is where the stream
    time meets the host times: found by sweeping the hosts' prefix times upwards. The result is within
    one expert's stream time per host of the true optimum, and never worse than either single-link
    plan (both are among the budgets tried).
    """
    hosts = _hosts(cold, constants)
    # Each event: at this budget a host takes one more expert off the link.
    events = sorted((t, d) for h in hosts for t, d in zip(h.times[1:], h.dma, strict=True))
    budget, stream = 0.0, sum(h.rest[0] for h in hosts)
    prev_budget, prev_stream = budget, stream
    i, n = 0, len(events)
    while stream > budget and i < n:
        prev_budget, prev_stream = budget, stream
        budget = events[i][0]
        while i < n and events[i][0] == budget:
            stream -= events[i][1]
            i += 1
    # The first budget that covers the stream ends the layer at that budget; the one before it, with
    # the stream still the bottleneck, at its stream time: whichever is sooner.
    chosen = prev_budget if prev_stream < budget else budget
    return _split(hosts, [bisect_right(h.times, chosen) - 1 for h in hosts])


def single_link_plans(cold: Sequence[ColdExpert], constants: CostConstants) -> tuple[LayerPlan, LayerPlan]:
    """(every cold expert on its host's CPU, every cold expert streamed): what one link alone achieves."""
    hosts = _hosts(cold, constants)
    return _split(hosts, [len(h.experts) for h in hosts]), _split(hosts, [0] * len(hosts))


class LiveConstants:
    """Cost constants that follow the machine: start-up values, the hosts' refreshed from observed timings
    (the PCIe link's and the GPU's stay as measured at start-up: nothing else shares them).

    Each refreshed constant weighs recent observations more (an exponentially weighted moving
    average with weight `alpha` for the newest). The round trip is the averaged crossing time. A CPU work item
    (bytes of weights read, flops, seconds of compute on the host) mixes read and compute time, so
    the per-dtype read rates and the compute rate are fitted together by least squares on the
    averaged moments, each observation weighted by its relative error. Decode items alone (all with
    the same few tokens) cannot tell reading from computing apart: a small pull towards the start-up
    values (`prior`) settles what the observations leave open, while what they determine follows them.
    """

    def __init__(self, start: CostConstants, alpha: float = 0.05, prior: float = 1e-3) -> None:
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], not {alpha}")
        self.start, self.alpha, self.prior = start, alpha, prior
        # The CPU fit solves for multipliers of these reference rates (1.0 = the start-up value).
        self._dtypes = list(start.cpu_read_bw)
        self._ref_bw = dict(start.cpu_read_bw)
        n = len(self._dtypes) + 1  # one unknown per dtype, then the compute rate
        self._xx, self._x, self._cpu_w = np.zeros((n, n)), np.zeros(n), 0.0
        self._rtt_s = self._rtt_w = 0.0
        self._current: CostConstants | None = start

    def _keep(self) -> float:
        self._current = None
        return 1.0 - self.alpha

    def observe_cpu(self, dtype: str, nbytes: int, flops: float, seconds: float) -> None:
        """A host computed experts of `dtype` (`nbytes` of weights, `flops` in all) in `seconds`, crossing excluded."""
        if not 0.0 < seconds < math.inf:  # written so that NaN, which would poison every later refit, fails too
            raise ValueError(f"a CPU work item cannot take {seconds} s")
        if dtype not in self._ref_bw:
            # A dtype not measured at start-up: its first item, read as all reading, is its reference rate.
            self._ref_bw[dtype] = nbytes / seconds
            self._dtypes.append(dtype)
            n = len(self._dtypes) - 1  # new unknown's index, just before the compute rate
            self._xx = np.insert(np.insert(self._xx, n, 0.0, axis=0), n, 0.0, axis=1)
            self._x = np.insert(self._x, n, 0.0)
        x = np.zeros(len(self._x))
        x[self._dtypes.index(dtype)] = nbytes / self._ref_bw[dtype] / seconds
        x[-1] = flops / self.start.cpu_flops / seconds
        keep = self._keep()
        self._xx = keep * self._xx + self.alpha * np.outer(x, x)
        self._x = keep * self._x + self.alpha * x
        self._cpu_w = keep * self._cpu_w + self.alpha

    def observe_round_trip(self, seconds: float) -> None:
        """One GPU -> host -> GPU crossing's time beyond the host's compute."""
        if not 0.0 <= seconds < math.inf:
            raise ValueError(f"a crossing cannot take {seconds} s")
        keep = self._keep()
        self._rtt_s = keep * self._rtt_s + self.alpha * seconds
        self._rtt_w = keep * self._rtt_w + self.alpha

    @property
    def current(self) -> CostConstants:
        """The constants now; recomputed only after new observations."""
        if self._current is None:
            self._current = self._refresh()
        return self._current

    def _refresh(self) -> CostConstants:
        s = self.start
        theta = np.ones(len(self._x))
        if self._cpu_w > 0.0:
            ridge = self.prior * np.eye(len(self._x))
            # least squares, not solve: items far faster than the references (x far above 1) drown the pull in
            # rounding, and identical ones then leave the system singular, which must not fail a step
            theta = np.linalg.lstsq(self._xx / self._cpu_w + ridge, self._x / self._cpu_w + self.prior, rcond=None)[0]
            # Noise can push a barely-seen term to zero or below; no rate is taken as 100x its reference.
            theta = np.maximum(theta, 0.01)
        return replace(  # the PCIe link's and the GPU's constants stay the start-up ones
            s,
            cpu_read_bw={d: self._ref_bw[d] / float(theta[i]) for i, d in enumerate(self._dtypes)},
            cpu_flops=s.cpu_flops / float(theta[-1]),
            round_trip_s=self._rtt_s / self._rtt_w if self._rtt_w > 0.0 else s.round_trip_s,
        )
