"""The CPU-kernel benchmark end to end: `python -m bench.cpu_kernels_bench --quick` writes a table with a row of
positive figures for every format, rows per expert and thread count, and with more than one thread for each way
of sharing the work out."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from bench.cpu_kernels_bench import EXPERTS, FORMATS, HEAD, MATRICES, ROWS, thread_counts

REPO = Path(__file__).resolve().parents[1]


def test_thread_counts_double_up_to_every_core():
    assert thread_counts(1) == [1]
    assert thread_counts(2) == [1, 2]
    assert thread_counts(16) == [1, 2, 4, 8, 16]
    assert thread_counts(12) == [1, 2, 4, 8, 12]


def test_quick_run_writes_every_row_with_positive_figures(tmp_path):
    out = tmp_path / "cpu_kernels.md"
    subprocess.run([sys.executable, "-m", "bench.cpu_kernels_bench", "--quick", "--out", str(out)], cwd=REPO,
                   check=True, capture_output=True, timeout=300)
    lines = [line for line in out.read_text().splitlines() if line.startswith("| ")]
    assert lines[0] == "| " + " | ".join(HEAD) + " |"
    rows = {}
    for line in lines[1:]:
        label, n_rows, threads, split, *figures = (cell.strip() for cell in line.strip("|").split("|"))
        rows[label, int(n_rows), int(threads), split] = figures
    expected = {(label, n, t, split) for label in FORMATS for n in ROWS for t in thread_counts(os.cpu_count() or 1)
                for split in ([MATRICES, EXPERTS] if t > 1 else [MATRICES])}
    assert set(rows) == expected
    for figures in rows.values():
        assert len(figures) == len(HEAD) - 4
        assert all(float(cell.rstrip("%")) > 0 for cell in figures), figures
