"""The expert hosts' CPU kernels (shared.quant.quantized_ffn, torch's int8 / int4 / bf16 CPU kernels) on the
Qwen3-30B-A3B expert shape, against the memory-read bandwidth measured in the same run with the same threads.

    python -m bench.cpu_kernels_bench [--out FILE] [--quick]

For each format (int8, int4, and bf16 for the float path), rows per expert (1, 4, 16, 64) and torch thread
count (1, 2, 4, ... up to every core, and the counts an expert host takes by default beside a worker on a GPU),
one full expert FFN (gate, up, SwiGLU, down) is timed on bf16
activations, rotating over 64 experts laid out as the expert cache serves them (ExpertLayout regions of one
uint8 buffer, ~300 MB in int8) so that the weights come from RAM, not from the caches. GB/s counts the
weight bytes an expert is stored as (codes and scales); the % is of `cpu_read_bandwidth` with the same thread
count, measured in the same run. Both are the best of a few sweeps through every case: what the machine can
do, not what it did while something else ran. A last column gives each format's call floor: the same call on
experts small enough that their weights take no time.

A second table times a layer's grouped work for int8 and int4: 8 experts at 1 row each (decode at batch 1 with
top-8 routing) and at 4 rows, through shared.native_kernels' one call for all of them, next to torch's kernels
one expert after another (quantized_ffn per expert, the path grouped_ffn took before).

With --pin, n threads (for every measurement, the read bandwidth too) are bound to the first n logical CPUs
this process may use, one each, by shared.native_kernels.pin_threads, as an expert host binds its threads to its
own (the last ones) with pin_host_threads.
"""

from __future__ import annotations

import argparse
import os
import platform
import textwrap
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from shared.bench_measure import cpu_read_bandwidth
from shared.config import Config
from shared.expert_cache import ExpertLayout
from shared.expert_math import ExpertWeights
from shared.native_kernels import grouped_swiglu, lane_swiglu, layer_table, load_library, pin_threads
from shared.process import torch_threads
from shared.quant import matrix_tensors, quantized_ffn

FORMATS = {"int8": "int8", "int4": "int4", "bf16": "float"}  # label -> serving format
ROWS = (1, 4, 16, 64)
MATRICES, EXPERTS = "one expert's matrices", "whole experts"  # what a case's threads share out
FLOOR_SIZE = 64  # experts of (64, 64) matrices: their FFN time is Python, dispatch and thread start-up
# those the native kernel computes; int4+int8: gate and up int4, down int8, as Q4_K_M's Q6_K-down layers are served
GROUPED_FORMATS = ("int8", "int4", "int4+int8")
GROUPED_EXPERTS = 8  # experts per layer call: top-8 routing
GROUPED_ROWS = (1, 4)
NATIVE, PER_EXPERT, LANE = "native, one call", "torch, per expert", "lane request"


@dataclass(frozen=True)
class Settings:
    ffn: int  # gate / up rows, down columns
    hidden: int  # gate / up columns, down rows
    experts: int  # experts rotated over, so that their weights outgrow the caches
    sweeps: int  # passes through every case, each timing one pass over the experts (the best counts)
    bandwidth_bytes: int  # buffer cpu_read_bandwidth sums
    outgrow_cache: bool = True  # rotate over enough experts to outgrow the last-level cache (rotated_experts)


FULL = Settings(ffn=768, hidden=2048, experts=64, sweeps=5, bandwidth_bytes=2 << 30)  # Qwen3-30B-A3B experts
QUICK = Settings(ffn=128, hidden=256, experts=8, sweeps=1, bandwidth_bytes=64 << 20, outgrow_cache=False)


def thread_counts(cores: int, also: Sequence[int] = ()) -> list[int]:
    """1, 2, 4, ... below `cores`, then `cores` itself, with the counts in `also` up to `cores`, in order."""
    counts = [1]
    while counts[-1] * 2 < cores:
        counts.append(counts[-1] * 2)
    return sorted({*counts, cores, *(n for n in also if 1 <= n <= cores)})


def host_thread_counts() -> list[int]:
    """The threads an expert host takes by default beside a worker on a GPU (Config.threads_for), as the only
    host and as one of the default number of hosts: 13 and 6 on the GPU machine's 16 cores."""
    default = Config()
    return sorted({replace(default, expert_hosts=hosts).threads_for("expert_host", worker_on_gpu=True)
                   for hosts in (1, default.expert_hosts)})


def last_level_cache_bytes() -> int:
    """The CPU's largest cache (Linux sysfs; 0 where unknown): the GPU machine's Xeon has 300 MiB of L3."""
    sizes = [0]
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            size = (index / "size").read_text().strip()
        except OSError:
            continue
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
        sizes.append(int(size[:-1]) * units[size[-1]] if size[-1] in units else int(size))
    return max(sizes)


def rotated_experts(region_nbytes: int, settings: Settings) -> int:
    """settings.experts, or with settings.outgrow_cache at least as many as make twice the last-level cache (so a
    pass reads them from RAM), in whole layers of GROUPED_EXPERTS."""
    if not settings.outgrow_cache:
        return settings.experts
    wanted = max(settings.experts, -(-2 * last_level_cache_bytes() // region_nbytes))
    return -(-wanted // GROUPED_EXPERTS) * GROUPED_EXPERTS


def served_experts(fmt: str, settings: Settings, seed: int = 0) -> tuple[ExpertLayout, list[ExpertWeights]]:
    """rotated_experts experts of one layout (`fmt`, or "a+b": gate and up in a, down in b), each a view of its
    region of one uint8 buffer: random codes, scales (and int4 zeros) of the magnitudes GGUF experts have, bf16
    values of std 0.02 for the float path."""
    f, h = settings.ffn, settings.hidden
    fmt_in, _, fmt_out = fmt.partition("+")
    layout = ExpertLayout.build((fmt_in, fmt_in, fmt_out or fmt_in),
                                [((f, h), torch.bfloat16), ((f, h), torch.bfloat16), ((h, f), torch.bfloat16)])
    generator = torch.Generator().manual_seed(seed)
    experts = rotated_experts(layout.region_nbytes, settings)
    buf = torch.randint(0, 256, (experts, layout.region_nbytes), dtype=torch.uint8, generator=generator)
    for matrix in layout.views(buf):  # matrices with a leading expert dimension
        values, *scales = matrix_tensors(matrix)
        if fmt == "float":
            values.copy_(torch.randn(values.shape, generator=generator) * 0.02)
        for t in scales:  # random bytes would make NaNs and huge scales
            t.copy_(0.005 + 0.01 * torch.rand(t.shape, generator=generator))
    return layout, [layout.views(buf[e]) for e in range(experts)]


def seconds_per_expert(x: torch.Tensor, experts: list[ExpertWeights], warm_up: bool = False,
                       pool: ThreadPoolExecutor | None = None) -> float:
    """Seconds of one quantized_ffn per expert, over one pass through all of them (after an untimed one if
    `warm_up`: first-call setup, oneDNN primitives and thread pools); with `pool`, its threads take whole
    experts at once (the kernels release the GIL) instead of one expert after another."""
    def one_pass() -> None:
        if pool is None:
            for weights in experts:
                quantized_ffn(x, *weights)
        else:
            list(pool.map(lambda weights: quantized_ffn(x, *weights), experts))
    return pass_seconds(one_pass, warm_up) / len(experts)


def pass_seconds(one_pass: Callable[[], None], warm_up: bool) -> float:
    """Seconds of one call of `one_pass`, after an untimed one if `warm_up`."""
    if warm_up:
        one_pass()
    start = time.perf_counter()
    one_pass()
    return time.perf_counter() - start


@dataclass(frozen=True)
class Result:
    label: str
    rows: int
    threads: int
    split: str  # what the threads share out: one expert's matrices (torch's threads) or whole experts
    seconds: float  # per expert FFN
    weight_bytes: int  # per expert
    read_bandwidth: float  # bytes/s, same threads
    floor_seconds: float  # the same call, one row, on experts small enough to stay in cache

    @property
    def bytes_per_second(self) -> float:
        return self.weight_bytes / self.seconds

    def cells(self) -> tuple[str, ...]:
        share = 100 * self.bytes_per_second / self.read_bandwidth
        return (self.label, str(self.rows), str(self.threads), self.split, figure(self.seconds * 1e6),
                figure(self.rows / self.seconds), figure(self.bytes_per_second / 1e9),
                figure(self.read_bandwidth / 1e9), f"{figure(share)}%", figure(self.floor_seconds * 1e6))


def seconds_per_layer(x: torch.Tensor, experts: list[ExpertWeights], path: str, warm_up: bool = False) -> float:
    """Seconds of one layer's grouped work, GROUPED_EXPERTS experts of x.shape[0] rows each, over one pass through
    `experts` in groups of that many: one native call per group, torch's quantized_ffn per expert, or a lane
    request per group (each row of x routed to the group's experts, each row's weighted sum answered)."""
    grouped = x.repeat(GROUPED_EXPERTS, 1)
    counts = [x.shape[0]] * GROUPED_EXPERTS
    groups = [experts[i : i + GROUPED_EXPERTS] for i in range(0, len(experts), GROUPED_EXPERTS)]
    hidden, ffn = x.shape[1], experts[0][0][0].shape[0]
    tables = [layer_table(dict(enumerate(group)), GROUPED_EXPERTS, hidden, ffn) for group in groups]
    ids = torch.arange(GROUPED_EXPERTS, dtype=torch.int32).repeat(x.shape[0], 1)
    route, owned = torch.full(ids.shape, 1 / GROUPED_EXPERTS), torch.ones(GROUPED_EXPERTS, dtype=torch.bool)
    out = torch.empty_like(x)

    def one_pass() -> None:
        for group, table in zip(groups, tables, strict=True):
            if path == NATIVE:
                declined = grouped_swiglu(grouped, group, counts) is None
            elif path == LANE:
                declined = table is None or lane_swiglu(table, ids, route, owned, x, out) is None
            else:
                declined = False
                for weights in group:
                    quantized_ffn(x, *weights)
            if declined:
                raise RuntimeError("the native kernel declined the benchmark's experts")
    return pass_seconds(one_pass, warm_up) / len(groups)


@dataclass(frozen=True)
class GroupedResult:
    label: str
    rows: int  # per expert
    threads: int
    path: str  # native (one call for the layer's experts), lane (a lane request's answer) or torch (per expert)
    seconds: float  # per layer call of GROUPED_EXPERTS experts
    weight_bytes: int  # per expert
    read_bandwidth: float  # bytes/s, same threads

    @property
    def bytes_per_second(self) -> float:
        return GROUPED_EXPERTS * self.weight_bytes / self.seconds

    def cells(self) -> tuple[str, ...]:
        share = 100 * self.bytes_per_second / self.read_bandwidth
        return (self.label, str(self.rows), str(self.threads), self.path, figure(self.seconds * 1e6),
                figure(self.bytes_per_second / 1e9), figure(self.read_bandwidth / 1e9), f"{figure(share)}%")


def figure(value: float) -> str:
    """Three significant digits, or whole numbers from 100 up: a slow case still reads as a positive number."""
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}"


HEAD = ("format", "rows", "threads", "threads share", "us per expert FFN", "rows/s", "GB/s of weight bytes",
        "read bandwidth GB/s", "% of read bandwidth", f"call floor us ({FLOOR_SIZE}x{FLOOR_SIZE} experts)")
GROUPED_HEAD = ("format", "rows per expert", "threads", "path", f"us per layer ({GROUPED_EXPERTS} experts)",
                "GB/s of weight bytes", "read bandwidth GB/s", "% of read bandwidth")


def measure(settings: Settings, threads: list[int], per_expert: bool = True, pin: bool = False
            ) -> tuple[list[Result], list[GroupedResult]]:
    """Every (format, rows, threads) case timed once per sweep, `settings.sweeps` sweeps, the best of each case
    kept (and the best read bandwidth per thread count): spreading a case's passes over the run keeps a burst of
    other work on the machine from spoiling all of them. Also each format's call floor per thread count: one row
    through experts small enough that the weights take no time; and the grouped cases (no native ones when the
    kernel cannot be built here). Without `per_expert`, only the grouped cases. With `pin`, n threads are bound to
    the first n logical CPUs."""
    per_expert_labels = list(FORMATS) if per_expert else []  # grouped only: no bf16 or floor experts to make
    labels = dict.fromkeys([*per_expert_labels, *GROUPED_FORMATS])
    served = {label: served_experts(FORMATS.get(label, label), settings) for label in labels}
    tiny = replace(settings, ffn=FLOOR_SIZE, hidden=FLOOR_SIZE, outgrow_cache=False)
    served_tiny = {label: served_experts(FORMATS[label], tiny)[1] for label in per_expert_labels}
    inputs = {rows: torch.randn(rows, settings.hidden).to(torch.bfloat16) for rows in ROWS}
    tiny_row = torch.randn(1, FLOOR_SIZE).to(torch.bfloat16)
    bandwidth: dict[int, float] = {}
    best: dict[tuple[str, int, int, str], float] = {}
    floor: dict[tuple[str, int], float] = {}
    grouped: dict[tuple[str, int, int, str], float] = {}
    paths = [NATIVE, LANE, PER_EXPERT] if load_library() is not None else [PER_EXPERT]
    cores = sorted(os.sched_getaffinity(0))  # before binding changes this thread's
    for sweep in range(settings.sweeps):
        for n in threads:
            if pin and not pin_threads(cores[:n]):
                raise SystemExit(f"--pin: could not bind {n} threads to CPUs {cores[:n]} (no native library?)")
            bandwidth[n] = max(bandwidth.get(n, 0.0), cpu_read_bandwidth(settings.bandwidth_bytes, threads=n))
            for label in per_expert_labels:
                experts = served[label][1]
                with torch_threads(n):
                    seconds = seconds_per_expert(tiny_row, served_tiny[label], warm_up=sweep == 0)
                floor[label, n] = min(floor.get((label, n), float("inf")), seconds)
                for rows, x in inputs.items():
                    with torch_threads(n):
                        cases = {MATRICES: seconds_per_expert(x, experts, warm_up=sweep == 0)}
                    if n > 1:
                        with torch_threads(1), ThreadPoolExecutor(n) as pool:
                            cases[EXPERTS] = seconds_per_expert(x, experts, warm_up=sweep == 0, pool=pool)
                    for split, seconds in cases.items():
                        key = (label, rows, n, split)
                        best[key] = min(best.get(key, float("inf")), seconds)
            for label in GROUPED_FORMATS:
                for rows in GROUPED_ROWS:
                    # each sweep starts with another path, so that no path is always the one run right after
                    # another case (bench/cpu_kernels.md: the one call, always first, was the slower)
                    for path in paths[sweep % len(paths):] + paths[:sweep % len(paths)]:
                        with torch_threads(n):
                            seconds = seconds_per_layer(inputs[rows], served[label][1], path, warm_up=sweep == 0)
                        key = (label, rows, n, path)
                        grouped[key] = min(grouped.get(key, float("inf")), seconds)
        print(f"sweep {sweep + 1} of {settings.sweeps} done", flush=True)
    results = [Result(label, rows, n, split, seconds, served[label][0].expert_nbytes, bandwidth[n], floor[label, n])
               for (label, rows, n, split), seconds in best.items()]
    return results, [GroupedResult(label, rows, n, path, seconds, served[label][0].expert_nbytes, bandwidth[n])
                     for (label, rows, n, path), seconds in grouped.items()]


def markdown_table(results: list[Result]) -> str:
    """Rows grouped by format and rows per expert, threads ascending, so scaling reads down a group."""
    order = {label: i for i, label in enumerate(FORMATS)}
    return table(HEAD, sorted(results, key=lambda r: (order[r.label], r.rows, r.split, r.threads)))


def grouped_table(results: list[GroupedResult]) -> str:
    """Grouped by format and rows per expert, the two paths next to each other for each thread count."""
    order = {label: i for i, label in enumerate(GROUPED_FORMATS)}
    paths = [NATIVE, LANE, PER_EXPERT]
    return table(GROUPED_HEAD, sorted(results, key=lambda r: (order[r.label], r.rows, r.threads, paths.index(r.path))))


def table(head: tuple[str, ...], ordered: list[Result] | list[GroupedResult]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(r.cells()) + " |" for r in ordered])


def machine_name() -> str:
    """The CPU's model name (what lscpu prints), its cores and torch's build."""
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        model = names[0] if names else model
    return (f"{model}, {os.cpu_count()} cores (os.cpu_count()), torch {torch.__version__} "
            f"({torch.backends.cpu.get_cpu_capability()} kernels)")


def report(results: list[Result], grouped: list[GroupedResult], settings: Settings, command: str, pin: bool) -> str:
    f, h = settings.ffn, settings.hidden
    rotation = (f"at least {settings.experts} experts and enough to fill twice the {last_level_cache_bytes() >> 20} "
                "MiB last-level cache" if settings.outgrow_cache else f"{settings.experts} experts")
    method = (
        f"One expert FFN (gate ({f}, {h}), up ({f}, {h}), down ({h}, {f}), SwiGLU) through shared.quant.quantized_ffn "
        f"on bf16 activations, rotating over {rotation} in the expert cache's region layout, so the weights come "
        f"from RAM; the best of {settings.sweeps} passes, one per sweep through every case. GB/s "
        "counts the bytes an expert is stored as (codes + scales; bf16 values for the float path); read bandwidth is "
        f"`cpu_read_bandwidth` (torch summing a {settings.bandwidth_bytes >> 20} MiB float32 buffer) with the same "
        "thread count, the best of its measurements in the same run. The call floor is the same FFN call on one row "
        f"through ({FLOOR_SIZE}, {FLOOR_SIZE}) experts that stay in cache: Python, dispatch and thread start-up, "
        "which every expert FFN pays whatever its size. Threads share out either one expert's matrices (torch's "
        "threads, experts one after another, as the expert hosts did before the native kernel) or whole experts "
        "(one torch thread each, a pool taking the experts, whose kernels release the GIL).")
    grouped_method = (
        f"A layer's grouped work: {GROUPED_EXPERTS} experts of the same shape at 1 and 4 rows each (bf16 "
        f"activations), the same experts taken {GROUPED_EXPERTS} at a time so the weights come from "
        "RAM; one shared.native_kernels.grouped_swiglu call per layer (its Python side included), one "
        "lane_swiglu call per layer (an expert host's answer to a decode step's lane request: the rows routed to "
        "the layer's experts, their grouping and each row's weighted sum in the call), or "
        "shared.quant.quantized_ffn once per expert. GB/s counts the layer's stored bytes; read bandwidth as above."
        + ("" if any(r.path == NATIVE for r in grouped) else
           " The native kernel could not be built on this machine, so only torch's path is listed."))
    per_expert = [textwrap.fill(method, width=115), "", markdown_table(results), ""] if results else []
    threads = ("n threads are bound to the first n logical CPUs, one each (--pin)." if pin else
               "Threads are not bound to CPUs.")
    return "\n".join([f"Command: `{command}` on {machine_name()}. {threads}", "", *per_expert,
                      "## A layer's experts in one call", "", textwrap.fill(grouped_method, width=115), "",
                      grouped_table(grouped), ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="also write the report to this file (cpu_kernels.md is kept by hand)")
    parser.add_argument("--quick", action="store_true",
                        help=f"({QUICK.ffn}, {QUICK.hidden}) experts, {QUICK.experts} of them, one pass: a check that "
                             "every figure comes out, in seconds")
    parser.add_argument("--grouped-only", action="store_true",
                        help="only a layer's experts in one call (native against torch per expert): minutes less")
    parser.add_argument("--pin", action="store_true", help="bind n threads to the first n logical CPUs, one each")
    args = parser.parse_args()
    settings = QUICK if args.quick else FULL
    threads = thread_counts(len(os.sched_getaffinity(0)), host_thread_counts())
    results, grouped = measure(settings, threads, per_expert=not args.grouped_only, pin=args.pin)
    command = " ".join(["python -m bench.cpu_kernels_bench", *(["--quick"] if args.quick else []),
                        *(["--grouped-only"] if args.grouped_only else []), *(["--pin"] if args.pin else [])])
    text = report(results, grouped, settings, command, pin=args.pin)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
