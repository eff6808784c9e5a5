"""The deployment files stay in step with the code: the example config loads, and every metric the
Grafana dashboard queries is one a tierserve process exports, the units stop the roles in drain order, and do not
restart a member that another process took its id over from."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client.metrics import MetricWrapperBase

import coordinator.service
import expert_host.service
import gpu_worker.service
from shared.config import load_config
from shared.run_files import SUPERSEDED_EXIT_STATUS

ROOT = Path(__file__).resolve().parents[1]


def test_example_config_loads():
    config = load_config(ROOT / "deploy" / "tierserve.example.toml")
    assert config.run_dir == "/run/tierserve"


def exported_series() -> dict[str, str]:
    """Every series name the three roles' metrics export (as prometheus_client names them: a counter's with
    `_total`, a histogram's `_bucket`, `_sum` and `_count`) -> the metric's type."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    series = {}
    for module in (coordinator.service, gpu_worker.service, expert_host.service):
        for metric in vars(module).values():
            if isinstance(metric, MetricWrapperBase):
                for family in metric.describe():
                    series.update({family.name + suffix: family.type for suffix in suffixes[family.type]})
    return series


def test_dashboard_queries_only_exported_series_and_rates_only_counters():
    dashboard = json.loads((ROOT / "grafana" / "tierserve-dashboard.json").read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    series = exported_series()
    queried = {name for expr in exprs for name in re.findall(r"\btierserve_\w+", expr)}
    assert queried and not queried - series.keys(), sorted(queried - series.keys())
    rated = {name for expr in exprs for name in re.findall(r"\brate\((tierserve_\w+)", expr)}
    assert rated and not {name for name in rated if series[name] == "gauge"}


def test_units_stop_the_coordinator_first_then_the_worker_then_the_hosts():
    """systemd stops units in the reverse of their start order: each role starts before the one that sends it work,
    so the coordinator drains its requests while the worker and the expert hosts still serve them."""
    def ordered_before(unit: str) -> set[str]:
        text = (ROOT / "deploy" / unit).read_text()
        return {name for line in re.findall(r"^Before=(.*)$", text, re.M) for name in line.split()}

    assert "tierserve-gpu-worker.service" in ordered_before("tierserve-expert-host@.service")
    assert "tierserve-coordinator.service" in ordered_before("tierserve-gpu-worker.service")
    assert not ordered_before("tierserve-coordinator.service")


def test_the_series_of_a_panel_have_legends_of_their_own():
    """Two queries of one panel with one legend draw lines that no one can tell apart: p50 from p99, running
    requests from waiting ones."""
    dashboard = json.loads((ROOT / "grafana" / "tierserve-dashboard.json").read_text())
    alike = [panel["title"] for panel in dashboard["panels"]
             if len({target["legendFormat"] for target in panel["targets"]}) < len(panel["targets"])]
    assert not alike, alike


def test_a_legend_names_only_labels_its_query_keeps():
    """A legend of labels that an aggregation removed shows nothing: the token panels' sum() series had empty
    legends. Where a query aggregates, its legend may name only the labels of its `by` clauses (histogram_quantile
    takes `le`)."""
    dashboard = json.loads((ROOT / "grafana" / "tierserve-dashboard.json").read_text())
    aggregation = re.compile(r"\b(?:sum|avg|min|max|count)\s*(?:by\s*\([^)]*\)\s*)?\(")
    lost = []
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            expr = target["expr"]
            if not aggregation.search(expr):
                continue
            assert "without" not in expr, f"{panel['title']}: name the labels kept (by), not those dropped"
            clauses = re.findall(r"\bby\s*\(([^)]*)\)", expr)  # before its aggregation's argument or after it
            kept = {label.strip() for clause in clauses for label in clause.split(",") if label.strip()} - {"le"}
            named = set(re.findall(r"{{\s*(\w+)\s*}}", target["legendFormat"]))
            if named - kept:
                lost.append((panel["title"], target["refId"], sorted(named - kept)))
    assert not lost, lost


def test_the_member_units_do_not_restart_a_process_another_took_its_member_id_over_from():
    """Restarted, it would take the id back, and the other would stop in turn, for ever."""
    for unit in ("tierserve-gpu-worker.service", "tierserve-expert-host@.service"):
        text = (ROOT / "deploy" / unit).read_text()
        assert re.findall(r"^RestartPreventExitStatus=(.*)$", text, re.M) == [str(SUPERSEDED_EXIT_STATUS)], unit


def test_the_units_give_up_on_a_role_that_keeps_failing_to_start():
    """With RestartSec alone, a role failing a few seconds into each start (a config typo: torch loads first) was
    restarted every 4-7 s for ever, under systemd's default limit of 5 starts in 10 s."""
    for unit in ("tierserve-coordinator.service", "tierserve-gpu-worker.service", "tierserve-expert-host@.service"):
        text = (ROOT / "deploy" / unit).read_text()
        section = text.split("[Service]")[0]
        interval = int(re.search(r"^StartLimitIntervalSec=(\d+)$", section, re.M).group(1))
        burst = int(re.search(r"^StartLimitBurst=(\d+)$", section, re.M).group(1))
        restart_s = int(re.search(r"^RestartSec=(\d+)$", text, re.M).group(1))
        assert burst * restart_s < interval, unit  # starts that fail at once trip the limit
