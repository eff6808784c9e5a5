"""The deployment files stay in step with the code: the example config loads, and every metric the
Grafana dashboard queries is one a tierserve process exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

from shared.config import load_config

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ["coordinator/service.py", "gpu_worker/service.py", "expert_host/service.py"]


def test_example_config_loads():
    config = load_config(ROOT / "deploy" / "tierserve.example.toml")
    assert config.run_dir == "/run/tierserve"


def test_dashboard_queries_only_exported_metrics():
    dashboard = json.loads((ROOT / "grafana" / "tierserve-dashboard.json").read_text())
    queried = {name for panel in dashboard["panels"] for target in panel["targets"]
               for name in re.findall(r"\b(tierserve_[a-z_]+?)(?:_bucket|_total|_count|_sum)?\b", target["expr"])}
    code = "".join((ROOT / path).read_text() for path in SOURCES)
    missing = sorted(name for name in queried if f'"{name}' not in code)
    assert queried and not missing, missing
