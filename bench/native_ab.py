"""Two versions of the expert hosts' native kernel (shared/native/grouped_ffn.c) timed in turns in one process.

    git show REV:shared/native/grouped_ffn.c > /tmp/before.c
    python -m bench.native_ab /tmp/before.c [--rounds 9] [--threads 13,16] [--quick]

A layer's grouped work as bench.cpu_kernels_bench times it (8 experts of the Qwen3-30B-A3B shape at 1 and 4 rows,
each path: a lane request and one call), alternating the two libraries pass by pass on the same experts, and
the median of each. Between processes, where the experts' pages land moved one kernel's time by up to 2x on the
development VM (bench/cpu_kernels.md), more than most changes to the kernel are worth; in turns, both see the
same pages and the same neighbours.
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

import torch

from bench.cpu_kernels_bench import (
    FULL,
    GROUPED_FORMATS,
    GROUPED_ROWS,
    LANE,
    NATIVE,
    QUICK,
    Settings,
    host_thread_counts,
    seconds_per_layer,
    served_experts,
    thread_counts,
)
from shared.native_kernels import library_of, load_library, using
from shared.process import torch_threads

HEAD = ("format", "rows per expert", "threads", "path", "before, us per layer", "this tree, us", "before / this tree")


def compare(before: Path, settings: Settings, threads: list[int], rounds: int) -> list[tuple[str, ...]]:
    """A row of HEAD per (format, rows, threads, path): medians of `rounds` passes each, the two libraries
    alternating (and which goes first, round by round)."""
    libraries = {"before": library_of(before), "this tree": load_library()}
    rows_out = []
    for label in GROUPED_FORMATS:
        experts = served_experts(label, settings)[1]
        for rows in GROUPED_ROWS:
            x = torch.randn(rows, settings.hidden).to(torch.bfloat16)
            for n in threads:
                for path in (LANE, NATIVE):
                    times: dict[str, list[float]] = {name: [] for name in libraries}
                    with torch_threads(n):
                        for lib in libraries.values():  # first calls: thread pools, page faults
                            with using(lib):
                                seconds_per_layer(x, experts, path)
                        for r in range(rounds):
                            for name, lib in list(libraries.items())[:: 1 if r % 2 else -1]:
                                with using(lib):
                                    times[name].append(seconds_per_layer(x, experts, path))
                    old, new = (statistics.median(times[name]) for name in libraries)
                    rows_out.append((label, str(rows), str(n), path, f"{old * 1e6:.0f}", f"{new * 1e6:.0f}",
                                     f"{old / new:.3f}"))
    return rows_out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before", type=Path, help="the other version of grouped_ffn.c")
    parser.add_argument("--rounds", type=int, default=9, help="passes per library and case (default 9)")
    parser.add_argument("--threads", type=lambda text: [int(n) for n in text.split(",")],
                        help="thread counts (default: as bench.cpu_kernels_bench)")
    parser.add_argument("--quick", action="store_true", help="small experts, a check that it runs")
    args = parser.parse_args()
    if not args.before.is_file():
        parser.error(f"{args.before}: no such file")
    if load_library() is None:
        raise SystemExit("the native kernel cannot be built here")
    threads = args.threads or thread_counts(len(os.sched_getaffinity(0)), host_thread_counts())
    rows = compare(args.before, QUICK if args.quick else FULL, threads, args.rounds)
    print("\n".join(["| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD),
                     *("| " + " | ".join(row) + " |" for row in rows)]))


if __name__ == "__main__":
    main()
