"""Where every expert lives: a versioned map the coordinator computes and sends to every process.

Owner GPU means the gpu_worker holds and computes the expert; otherwise the index of
the expert host that holds it. The tier planner replaces the rule that fills the map,
not the map.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from typing import Any

from shared.model_config import ModelConfig

GPU = -1


def expert_host_id(index: int) -> str:
    return f"expert-host-{index}"


@dataclass(frozen=True)
class Placement:
    version: int
    hosts: tuple[str, ...]  # member ids of the expert hosts, indexed by owner
    owner: tuple[tuple[int, ...], ...]  # owner[layer][expert]: GPU or a host index

    @property
    def n_layers(self) -> int:
        return len(self.owner)

    def hot(self, layer: int) -> list[int]:
        return [e for e, o in enumerate(self.owner[layer]) if o == GPU]

    def on_host(self, layer: int, host: int) -> list[int]:
        return [e for e, o in enumerate(self.owner[layer]) if o == host]

    def hosts_in_use(self) -> list[int]:
        return sorted({o for layer in self.owner for o in layer if o != GPU})

    def count_hot(self) -> int:
        return sum(o == GPU for layer in self.owner for o in layer)

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "hosts": list(self.hosts), "owner": [list(layer) for layer in self.owner]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Placement:
        return cls(int(d["version"]), tuple(d["hosts"]), tuple(tuple(int(o) for o in layer) for layer in d["owner"]))


def hot_experts_for_budget(cfg: ModelConfig, budget_bytes: int, bytes_per_expert: int) -> int:
    """How many experts per layer fit in a byte budget (the same number in every layer)."""
    return max(0, min(cfg.n_experts, budget_bytes // max(1, bytes_per_expert * cfg.n_layers)))


def versioned(placement: Placement, model: str) -> Placement:
    """The placement with a version made from what it says and the model it is of (1 .. 2^31 - 1): a coordinator
    restarted with another placement or model welcomes every member again, one restarted with the same does not
    make them load it again."""
    text = repr((model, placement.hosts, placement.owner)).encode()
    return replace(placement, version=int.from_bytes(hashlib.blake2b(text, digest_size=4).digest()) % (2**31 - 1) + 1)


def round_robin_placement(cfg: ModelConfig, hot_per_layer: int, n_hosts: int, version: int = 1) -> Placement:
    """The first `hot_per_layer` experts of each layer on the GPU, the rest dealt to hosts in turn."""
    if not 0 <= hot_per_layer <= cfg.n_experts:
        raise ValueError(f"hot experts per layer must be in 0..{cfg.n_experts}, not {hot_per_layer}")
    if hot_per_layer < cfg.n_experts and n_hosts == 0:
        raise ValueError(f"{cfg.n_experts - hot_per_layer} experts per layer are cold but there are no expert hosts")
    owner = []
    turn = 0
    for _ in range(cfg.n_layers):
        layer = []
        for e in range(cfg.n_experts):
            if e < hot_per_layer:
                layer.append(GPU)
            else:
                layer.append(turn % n_hosts)
                turn += 1
        owner.append(tuple(layer))
    return Placement(version, tuple(expert_host_id(i) for i in range(n_hosts)), tuple(owner))
