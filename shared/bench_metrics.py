"""The gpu_worker's expert-tier counters, read from its Prometheus /metrics, and their change over a phase.

The worker's metrics port comes from the coordinator's health reply (each member reports its own);
the names are those gpu_worker/service.py exports.
"""

from __future__ import annotations

import urllib.request
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from prometheus_client.parser import text_string_to_metric_families

from shared.protocol import HealthReply

PATHS = ("hot", "soft_hit", "streamed", "staged", "cpu")  # how a routed (token, expert) pair was computed
DISPATCH = "tierserve_worker_expert_dispatch_total"
SOFT_LOOKUPS = "tierserve_worker_soft_tier_lookups_total"  # by result: hit or miss
STREAMED_BYTES = "tierserve_worker_streamed_bytes_total"
STARTED = "process_start_time_seconds"  # prometheus_client's own: a restarted worker counts from zero again
# the cold planner's constants (gpu_worker/service.py's COST_* gauges): metric -> key in TierSnapshot.cost
COST = {"tierserve_worker_cost_pcie_bytes_per_second": "pcie_bw",
        "tierserve_worker_cost_cpu_read_bytes_per_second": "cpu_read_bw",
        "tierserve_worker_cost_cpu_flops": "cpu_flops",
        "tierserve_worker_cost_round_trip_seconds": "round_trip_s"}


def worker_metrics_url(health: HealthReply, client_endpoint: str) -> str:
    """The gpu_worker's /metrics, on the client endpoint's host (every process serves on one host)."""
    worker = next((m for m in health.members if m.get("role") == "gpu_worker"), None)
    if worker is None or not worker.get("metrics_port"):
        raise RuntimeError("the health reply names no gpu_worker with a metrics port")
    host = urlparse(client_endpoint).hostname if client_endpoint.startswith("tcp://") else None
    if host in (None, "*", "0.0.0.0"):
        host = "127.0.0.1"
    return f"http://{host}:{worker['metrics_port']}/metrics"


@dataclass(frozen=True)
class TierSnapshot:
    pairs: dict[str, float]  # routed pairs by path since the worker started
    soft_lookups: dict[str, float]  # the soft tier's lookups by result (hit, miss) since start
    streamed_bytes: float  # since start
    # the cold planner's constants now (empty without soft slots): cpu_read_bw by served format, the others a number
    cost: dict[str, Any]
    started: float  # the worker process's start time (0 where the page has none)


def parse_tiers(text: str) -> TierSnapshot:
    """The tier counters out of a /metrics page (a path never taken has no sample yet: 0)."""
    pairs = dict.fromkeys(PATHS, 0.0)
    lookups = {"hit": 0.0, "miss": 0.0}  # none without soft slots
    values: dict[str, float] = {}
    cost: dict[str, Any] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == DISPATCH and sample.labels.get("path") in pairs:
                pairs[sample.labels["path"]] = sample.value
            elif sample.name == SOFT_LOOKUPS and sample.labels.get("result") in lookups:
                lookups[sample.labels["result"]] = sample.value
            elif sample.name in (STREAMED_BYTES, STARTED):
                values[sample.name] = sample.value
            elif sample.name in COST and "format" in sample.labels:
                cost.setdefault(COST[sample.name], {})[sample.labels["format"]] = sample.value
            elif sample.name in COST:
                cost[COST[sample.name]] = sample.value
    # a worker without a planner (no soft slots) never sets these gauges, and prometheus_client exports them as 0;
    # a planner's PCIe bandwidth is measured at start-up, so it is never 0
    planned = cost if cost.get("pcie_bw") else {}
    return TierSnapshot(pairs, lookups, values.get(STREAMED_BYTES, 0.0), planned,
                        values.get(STARTED, 0.0))


def scrape_tiers(url: str, timeout_s: float = 10.0) -> TierSnapshot:
    with urllib.request.urlopen(url, timeout=timeout_s) as reply:
        return parse_tiers(reply.read().decode())


def tier_delta(before: TierSnapshot, after: TierSnapshot, seconds: float) -> dict[str, Any]:
    """What a phase of `seconds` did: pairs by path and their shares, the share served from VRAM (hot pool
    plus soft-tier hits), the soft tier's hit rate over the phase, the streaming rate achieved, and the cold
    planner's constants at the end. A worker restarted during the phase counts from zero again: the phase's
    figures are then its successor's alone."""
    restarted = after.started != before.started
    pairs = {p: after.pairs[p] - (0.0 if restarted else before.pairs[p]) for p in PATHS}
    total = sum(pairs.values())
    streamed = after.streamed_bytes - (0.0 if restarted else before.streamed_bytes)
    hits, misses = (after.soft_lookups[r] - (0.0 if restarted else before.soft_lookups[r]) for r in ("hit", "miss"))
    return {
        "pairs": pairs,
        "share": {p: (n / total if total else 0.0) for p, n in pairs.items()},
        "vram_hit_rate": (pairs["hot"] + pairs["soft_hit"]) / total if total else 0.0,
        "cold_share": (pairs["streamed"] + pairs["staged"] + pairs["cpu"]) / total if total else 0.0,
        "soft_tier_hit_rate": hits / (hits + misses) if hits + misses else 0.0,
        "streamed_bytes": streamed,
        "streamed_gb_s": streamed / seconds / 1e9 if seconds > 0 else 0.0,
        "seconds": seconds,
        "cost_model": after.cost,
        "worker_restarted": restarted,
    }
