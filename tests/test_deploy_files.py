"""The deployment files stay in step with the code: the example config loads, and every metric the
Grafana dashboard queries is one a tierserve process exports, the units stop the roles in drain order, and do not
restart a member that another process took its id over from."""

from __future__ import annotations

import json
import re
from pathlib import Path

from shared.config import load_config
from shared.run_files import SUPERSEDED_EXIT_STATUS

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
