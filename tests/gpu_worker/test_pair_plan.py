"""gpu_worker.experts.plan_pairs: a layer's (token, expert) pairs ordered by path and key, on random layers."""

from __future__ import annotations

import numpy as np

from gpu_worker.experts import plan_pairs
from shared.placement import GPU

PATH_ORDER = [GPU, "soft", "staged"]  # then the hosts, ascending


def random_layer(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, dict[int, int], set[int]]:
    """Routing of up to 19 tokens over up to 128 experts, owners among up to 3 hosts and the GPU, and some of
    the routed cold experts in soft slots (random slot numbers) or staged."""
    n_experts, top_k, tokens = int(rng.integers(4, 129)), int(rng.integers(1, 9)), int(rng.integers(1, 20))
    owner = rng.integers(0, int(rng.integers(1, 4)), n_experts)
    owner[rng.random(n_experts) < 0.3] = GPU
    ids = np.stack([rng.choice(n_experts, min(top_k, n_experts), replace=False) for _ in range(tokens)]).ravel()
    cold = [int(e) for e in np.unique(ids) if owner[e] != GPU]
    rng.shuffle(cold)
    n_soft = int(rng.integers(0, len(cold) + 1))
    n_staged = int(rng.integers(0, len(cold) - n_soft + 1))
    slots = dict(zip(cold[:n_soft], rng.permutation(200)[:n_soft].tolist(), strict=True))
    return ids, owner, slots, set(cold[n_soft:n_soft + n_staged])


def test_pairs_in_path_then_key_order_with_each_groups_span():
    rng = np.random.default_rng(0)
    for _ in range(300):
        check_plan(*random_layer(rng))


def check_plan(ids: np.ndarray, owner: np.ndarray, slots: dict[int, int], staged: set[int]) -> None:
    order, groups = plan_pairs(ids, np.bincount(ids, minlength=len(owner)), owner, slots, staged)
    assert sorted(order.tolist()) == list(range(len(ids)))  # every pair once

    def path_of(e: int) -> str | int:
        return "soft" if e in slots else "staged" if e in staged else int(owner[e])

    hosts = sorted({p for p in map(path_of, ids.tolist()) if isinstance(p, int) and p != GPU})
    assert list(groups) == [p for p in PATH_ORDER + hosts if any(path_of(e) == p for e in ids.tolist())]
    start = 0
    for path, g in groups.items():
        assert g.start == start and g.end == start + sum(g.counts)
        assert g.keys == sorted(g.keys)  # by expert, or by slot for the soft path
        pairs = order[g.start:g.end].tolist()
        at = g.start
        for key, n in zip(g.keys, g.counts, strict=True):
            span = order[at:at + n].tolist()
            expert = next(e for e, s in slots.items() if s == key) if path == "soft" else key
            assert [int(ids[p]) for p in span] == [expert] * n and span == sorted(span)  # a pair's own order kept
            assert path_of(expert) == path
            at += n
        assert sum(g.counts) == len(pairs)
        start = g.end
    assert start == len(ids)
