"""The CPU-kernel benchmark end to end: `python -m bench.cpu_kernels_bench --quick` writes a table with a row of
positive figures for every format, rows per expert and thread count, and with more than one thread for each way
of sharing the work out; and a second one with a row for each grouped case on each path."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from bench.cpu_kernels_bench import (
    EXPERTS,
    FORMATS,
    GROUPED_FORMATS,
    GROUPED_HEAD,
    GROUPED_ROWS,
    HEAD,
    LANE,
    MATRICES,
    NATIVE,
    PER_EXPERT,
    ROWS,
    host_thread_counts,
    thread_counts,
)
from bench.native_ab import HEAD as AB_HEAD
from shared.native_kernels import SOURCE

REPO = Path(__file__).resolve().parents[1]


def test_thread_counts_double_up_to_every_core():
    assert thread_counts(1) == [1]
    assert thread_counts(2) == [1, 2]
    assert thread_counts(16) == [1, 2, 4, 8, 16]
    assert thread_counts(12) == [1, 2, 4, 8, 12]


def test_thread_counts_add_the_hosts_defaults_that_fit():
    assert thread_counts(16, [13, 6]) == [1, 2, 4, 6, 8, 13, 16]
    assert thread_counts(2, [1, 3]) == [1, 2]
    assert all(1 <= n <= (os.cpu_count() or 1) for n in host_thread_counts())


def test_quick_run_writes_every_row_with_positive_figures(tmp_path):
    out = tmp_path / "cpu_kernels.md"
    subprocess.run([sys.executable, "-m", "bench.cpu_kernels_bench", "--quick", "--out", str(out)], cwd=REPO,
                   check=True, capture_output=True, timeout=300)
    lines = [line for line in out.read_text().splitlines() if line.startswith("| ")]
    second = lines.index("| " + " | ".join(GROUPED_HEAD) + " |")
    assert lines[0] == "| " + " | ".join(HEAD) + " |"
    threads = thread_counts(os.cpu_count() or 1, host_thread_counts())
    expected = {(label, n, t, split) for label in FORMATS for n in ROWS for t in threads
                for split in ([MATRICES, EXPERTS] if t > 1 else [MATRICES])}
    assert rows_of(lines[1:second], len(HEAD)) == expected
    expected = {(label, n, t, path) for label in GROUPED_FORMATS for n in GROUPED_ROWS for t in threads
                for path in (NATIVE, LANE, PER_EXPERT)}
    assert rows_of(lines[second + 1:], len(GROUPED_HEAD)) == expected


def test_grouped_only_run_writes_only_the_grouped_table(tmp_path):
    out = tmp_path / "cpu_kernels.md"
    subprocess.run([sys.executable, "-m", "bench.cpu_kernels_bench", "--quick", "--grouped-only", "--out", str(out)],
                   cwd=REPO, check=True, capture_output=True, timeout=300)
    lines = [line for line in out.read_text().splitlines() if line.startswith("| ")]
    assert lines[0] == "| " + " | ".join(GROUPED_HEAD) + " |"
    threads = thread_counts(os.cpu_count() or 1, host_thread_counts())
    assert rows_of(lines[1:], len(GROUPED_HEAD)) == {(label, n, t, path) for label in GROUPED_FORMATS
                                                     for n in GROUPED_ROWS for t in threads
                                                     for path in (NATIVE, LANE, PER_EXPERT)}


def rows_of(lines: list[str], columns: int) -> set[tuple[str, int, int, str]]:
    """The (label, rows, threads, split or path) of each table row, once each, after checking that its figures
    are all there and positive."""
    rows = set()
    for line in lines:
        label, n_rows, threads, split, *figures = (cell.strip() for cell in line.strip("|").split("|"))
        assert (label, int(n_rows), int(threads), split) not in rows
        rows.add((label, int(n_rows), int(threads), split))
        assert len(figures) == columns - 4
        assert all(float(cell.rstrip("%")) > 0 for cell in figures), figures
    return rows


def test_two_versions_of_the_native_kernel_timed_in_turns(tmp_path):
    """`python -m bench.native_ab BEFORE`: a row of positive figures for every grouped case and path, here with
    the tree's own source as the other version."""
    before = tmp_path / "before.c"
    before.write_text(SOURCE.read_text())
    run = subprocess.run([sys.executable, "-m", "bench.native_ab", str(before), "--quick", "--rounds", "1",
                          "--threads", "1,2"], cwd=REPO, check=True, capture_output=True, text=True, timeout=300)
    lines = [line for line in run.stdout.splitlines() if line.startswith("| ")]
    assert lines[0] == "| " + " | ".join(AB_HEAD) + " |"
    assert rows_of(lines[1:], len(AB_HEAD)) == {(label, n, t, path) for label in GROUPED_FORMATS
                                                for n in GROUPED_ROWS for t in (1, 2) for path in (LANE, NATIVE)}
