"""The physical limits of decode and prefill for one model, placement and machine: pure arithmetic.

A decode token must bring every routed expert it uses through some link: experts held in VRAM (the hot
pool and the soft tier's hits) are read from device memory, the cold rest from host memory, either by
the hosts' CPUs (RAM read bandwidth) or over PCIe into a VRAM slot. Both links can work in parallel, so
the cold bytes of one token take at least cold / (PCIe + CPU read) seconds. Prefill moves each used cold
expert over PCIe once per chunk and is otherwise bound by compute. On a machine without CUDA every byte
and every flop goes through the CPU and its RAM.

Bandwidths are bytes/s, compute flop/s; the bounds are tokens/s; None where a link does not exist.
"""

from __future__ import annotations

from dataclasses import dataclass

from shared.model_config import ModelConfig, tensor_shapes


@dataclass(frozen=True)
class ModelTraffic:
    """What one token of a model reads and computes."""

    n_layers: int
    n_experts: int
    experts_used: int  # routed experts per token per layer (top-k)
    bytes_per_expert: float  # bytes of one routed expert as served (gate, up, down), mean over layers
    expert_params: int
    trunk_params: int  # matrix parameters a token passes through besides the routed experts
    attn_flops_per_position: float  # attention score and value flops per cached position, all layers
    quantized: bool = False  # experts served as int8 / int4: held in VRAM in that format, not at the device's dtype

    @property
    def experts_per_token(self) -> int:
        return self.n_layers * self.experts_used

    def flops_per_token(self, context: float) -> float:
        """Flops of one token attending over `context` cached positions: a multiply-add per parameter."""
        return 2.0 * (self.trunk_params + self.experts_per_token * self.expert_params) \
            + self.attn_flops_per_position * context


def model_traffic(cfg: ModelConfig, bytes_per_expert: float, quantized: bool = False) -> ModelTraffic:
    """The traffic of `cfg`; the embedding table is looked up, not multiplied, so it is not trunk work."""
    trunk = sum(shape[0] * shape[1] for name, shape in tensor_shapes(cfg).items()
                if len(shape) == 2 and name != "token_embd.weight")  # merged experts are 3-D
    return ModelTraffic(cfg.n_layers, cfg.n_experts, cfg.n_experts_used, bytes_per_expert, cfg.expert_params,
                        trunk, 4.0 * cfg.n_heads * cfg.head_dim * cfg.n_layers, quantized)


@dataclass(frozen=True)
class Machine:
    """Measured links and compute of the machine the model is served on."""

    cpu_read_bw: float  # RAM read by all cores
    pcie_bw: float | None  # host-to-device from pinned memory; None without CUDA
    device_mem_bw: float  # where the trunk and the VRAM-held experts are read (HBM; RAM on a CPU-only machine)
    device_flops: float  # the compute that runs the trunk and the VRAM-held experts
    device_bytes_per_param: int  # the trunk's and hot experts' dtype on that device (bf16 on GPU, fp32 on CPU)

    @property
    def has_gpu(self) -> bool:
        return self.pcie_bw is not None


def cold_share(hot_per_layer: float, n_experts: int, soft_hit_rate: float = 0.0) -> float:
    """Share of routed (token, expert) pairs that must come from host memory: those missing the hot set
    (uniform routing) and then missing the soft tier."""
    if not 0 <= hot_per_layer <= n_experts:
        raise ValueError(f"hot experts per layer must be in 0..{n_experts}, not {hot_per_layer}")
    if not 0 <= soft_hit_rate <= 1:
        raise ValueError(f"a hit rate must be in 0..1, not {soft_hit_rate}")
    return (1 - hot_per_layer / n_experts) * (1 - soft_hit_rate)


def _rate(nbytes: float, bandwidth: float | None) -> float | None:
    """Tokens/s when one token needs `nbytes` over a link; None for no link or nothing to move."""
    if bandwidth is None or nbytes <= 0:
        return None
    return bandwidth / nbytes


@dataclass(frozen=True)
class DecodeBound:
    cold_bytes_per_token: float
    resident_bytes_per_token: float  # trunk at the device's dtype and VRAM-held experts
    links_parallel_tok_s: float | None  # cold bytes over PCIe and CPU reads together
    pcie_only_tok_s: float | None
    cpu_only_tok_s: float | None
    device_tok_s: float  # reading the resident bytes from device memory
    bound_tok_s: float  # the slowest of what must happen for one token


def decode_bound(traffic: ModelTraffic, machine: Machine, share_cold: float) -> DecodeBound:
    """Single-stream decode: every token brings its cold experts through the links and reads the rest
    from device memory. On a CPU-only machine both come out of the same RAM, so their times add."""
    cold = traffic.experts_per_token * share_cold * traffic.bytes_per_expert
    vram_expert = traffic.bytes_per_expert if traffic.quantized \
        else machine.device_bytes_per_param * traffic.expert_params
    resident = machine.device_bytes_per_param * traffic.trunk_params \
        + traffic.experts_per_token * (1 - share_cold) * vram_expert
    links = _rate(cold, machine.cpu_read_bw + (machine.pcie_bw or 0.0))
    device_s = resident / machine.device_mem_bw
    if machine.has_gpu:
        seconds = max(device_s, 1 / links if links else 0.0)
    else:
        seconds = device_s + cold / machine.cpu_read_bw
    return DecodeBound(cold, resident, links, _rate(cold, machine.pcie_bw), _rate(cold, machine.cpu_read_bw),
                       1 / device_s, 1 / seconds)


def expected_used_experts(n_experts: int, experts_used: int, tokens: int) -> float:
    """Distinct experts of a layer that `tokens` tokens route to, each picking `experts_used` of
    `n_experts` uniformly: n (1 - (1 - k/n)^tokens)."""
    return n_experts * (1 - (1 - experts_used / n_experts) ** tokens)


@dataclass(frozen=True)
class PrefillBound:
    prompt_tokens: int
    moved_bytes: float  # expert bytes that must reach the compute once for this prompt
    move_s: float  # over PCIe (GPU) or out of RAM (CPU-only)
    compute_s: float
    bound_tok_s: float
    limited_by: str  # pcie | cpu-memory | compute


def prefill_bound(traffic: ModelTraffic, machine: Machine, hot_per_layer: float, prompt_tokens: int) -> PrefillBound:
    """One prompt as one chunk: on a GPU its used cold experts cross PCIe once while the GPU computes the
    prompt, whichever takes longer; on a CPU-only machine the CPU reads every used expert once and
    computes everything. Attention sees on average half the prompt."""
    if prompt_tokens < 1:
        raise ValueError("a prompt has at least one token")
    used = expected_used_experts(traffic.n_experts, traffic.experts_used, prompt_tokens)
    experts = used * (1 - hot_per_layer / traffic.n_experts) if machine.has_gpu else used
    moved = traffic.n_layers * experts * traffic.bytes_per_expert
    move_s = moved / (machine.pcie_bw if machine.has_gpu else machine.cpu_read_bw)
    compute_s = prompt_tokens * traffic.flops_per_token(prompt_tokens / 2) / machine.device_flops
    limited_by = "compute" if compute_s >= move_s else "pcie" if machine.has_gpu else "cpu-memory"
    return PrefillBound(prompt_tokens, moved, move_s, compute_s, prompt_tokens / max(move_s, compute_s), limited_by)


def efficiency(measured: float | None, bound: float | None) -> float | None:
    """Measured over bound (1.0: at the physical limit); None when either is unknown."""
    if not measured or not bound:
        return None
    return measured / bound
