"""The planning benchmark end to end: `python -m bench.plan_cost` on a small preset prints a row of positive
figures for every step size asked for, the soft tier having both hit and admitted experts on the way."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_plan_cost_prints_a_row_per_step_size():
    out = subprocess.run([sys.executable, "-m", "bench.plan_cost", "--preset", "small", "--tokens", "1,4",
                          "--steps", "5", "--soft-slots", "8"], cwd=REPO, capture_output=True, text=True,
                         timeout=300, check=True).stdout
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [int(r[0]) for r in rows] == [1, 4]
    assert all(float(r[1]) > 0 and float(r[2]) > 0 for r in rows)
    assert "4 layers, top-4 of 32 experts, 25% hot, 8 soft slots" in out
    hits, misses, evictions = (int(w) for w in re.search(r"(\d+) hits, (\d+) misses, (\d+) evictions", out).groups())
    assert hits > 0 and misses > 0 and evictions > 0
