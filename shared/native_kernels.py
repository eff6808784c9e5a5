"""The expert hosts' native CPU kernel: a whole grouped SwiGLU over int8 / int4 experts in one OpenMP parallel
region (shared/native/grouped_ffn.c), built on first use with the system C compiler and called through ctypes.

torch has no grouped int8 / int4 CPU product, and at a few rows per expert its per-matrix calls spend as long on
Python, dispatch and thread start-up as on reading the weights (bench/cpu_kernels.md). The library is compiled
once per source, flags, compiler and CPU into a cache directory; without a compiler, or if the build fails, one
warning says why and every caller falls back to torch's kernels.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
import weakref
from array import array
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from shared.quant import (
    INT4_GROUP,
    INT4_ROW_TILE,
    INT8_DEQUANTIZE_ROWS,
    ExpertWeights,
    Int4Matrix,
    Int8Matrix,
    tensor_specs,
)

SOURCE = Path(__file__).with_name("native") / "grouped_ffn.c"
FLAGS = ("-O3", "-march=native", "-ffast-math", "-fopenmp", "-std=c11", "-fPIC")
# Linked in a step of its own, without -ffast-math: given it, the driver links crtfastmath.o, whose constructor sets
# flush-to-zero and denormals-are-zero for the loading thread and every thread started after, so all of the
# process's float arithmetic (torch's, numpy's) would lose its subnormals
LINK_FLAGS = ("-shared", "-fopenmp")
LIBS = ("-lm",)  # after the object: expf, vectorized through libmvec
CPU_SETSIZE = 1024  # CPUs glibc's cpu_set_t holds: pin_threads binds none beyond
FORMAT_CODES = {Int8Matrix: 0, Int4Matrix: 1}  # the C side's FMT_INT8 / FMT_INT4
FORMAT_NAMES = {Int8Matrix: "int8", Int4Matrix: "int4"}
ERRORS = {1: "unknown format", 2: "shapes the layout does not allow", 3: "too many rows for one expert",
          4: "out of memory"}

log = logging.getLogger(__name__)
_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_loaded = False  # whether loading was tried (it is tried once per process)


class BuildError(RuntimeError):
    """Why the native library cannot be built here."""


def cache_dir() -> Path:
    """Where built libraries are kept: one file per source, flags, compiler and CPU. Under systemd the services'
    CacheDirectory (deploy/), else the user's cache."""
    if os.environ.get("CACHE_DIRECTORY"):
        return Path(os.environ["CACHE_DIRECTORY"].split(":")[0]) / "native"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tierserve" / "native"


def _cpu_flags() -> str:
    """The instruction sets -march=native compiles for: a library built on another CPU is another file."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return ""
    return next((line for line in lines if line.startswith(("flags", "Features"))), "")


def build_library(directory: Path | None = None, source: Path = SOURCE) -> Path:
    """The compiled library of `source`, built now unless this source, flags, compiler and CPU already have one.
    The build writes a private temporary file and renames it into place, so processes starting together can all
    build and none loads a half-written file. Raises BuildError."""
    compiler = os.environ.get("CC") or "cc"
    if shutil.which(compiler) is None:
        raise BuildError(f"no C compiler ({compiler!r} is not on PATH)")
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise BuildError(f"{compiler} --version failed: {e}") from e
    key = hashlib.sha256("\0".join([source.read_text(), *FLAGS, *LINK_FLAGS, *LIBS, compiler, version,
                                    _cpu_flags()]).encode())
    directory = directory or cache_dir()
    target = directory / f"grouped_ffn-{key.hexdigest()[:20]}.so"
    if target.exists():
        return target
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".grouped_ffn-", suffix=".so.tmp")
        os.close(fd)
    except OSError as e:
        raise BuildError(f"cannot write the library to {directory}: {e}") from e
    obj = f"{tmp}.o"
    try:
        for command in ([*FLAGS, "-c", str(source), "-o", obj], [*LINK_FLAGS, obj, "-o", tmp, *LIBS]):
            done = subprocess.run([compiler, *command], capture_output=True, text=True, timeout=300)
            if done.returncode != 0:
                raise BuildError(f"{compiler} exited {done.returncode}: {done.stderr.strip()[-2000:]}")
        os.chmod(tmp, 0o755)  # mkstemp's 0600 would survive the linker's write
        os.replace(tmp, target)
    except (OSError, subprocess.SubprocessError) as e:
        raise BuildError(f"{compiler} failed: {e}") from e
    finally:
        for path in (obj, tmp):
            if os.path.exists(path):
                os.unlink(path)
    return target


def openmp_runtimes() -> list[str]:
    """The OpenMP runtime libraries mapped into this process (Linux; empty elsewhere)."""
    try:
        maps = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    paths = {line.split()[-1] for line in maps if line.count(" ") >= 5 and "/" in line}
    return sorted(p for p in paths if os.path.basename(p).startswith(("libgomp", "libiomp", "libomp")))


def load_library() -> ctypes.CDLL | None:
    """The library, built and loaded on the first call of the process; None (after one warning) if it cannot be."""
    global _library, _loaded
    with _lock:
        if not _loaded:
            _loaded = True
            try:
                # torch is imported, so its OpenMP runtime is loaded: where that is a libgomp.so.1 (pip's torch
                # ships one), the library's libgomp.so.1 resolves to it, one thread pool for torch's ops and
                # this kernel instead of two competing for the cores
                lib = ctypes.CDLL(str(build_library()))
            except Exception as e:  # whatever stops the build or the load, torch's kernels still serve
                log.warning("native grouped int8/int4 kernel unavailable, experts use torch's per-expert kernels: "
                            "%s", e)
            else:
                runtimes = openmp_runtimes()
                if len(runtimes) > 1:
                    log.warning("two OpenMP runtimes in this process (%s): torch's threads and the native kernel's "
                                "are separate pools, whose idle spinning slows the other's work",
                                ", ".join(runtimes))
                _library = _declared(lib)
        return _library


def _declared(lib: ctypes.CDLL) -> ctypes.CDLL:
    """`lib` with its functions' signatures, which ctypes needs to pass 64-bit integers and pointers."""
    lib.tierserve_grouped_swiglu.restype = ctypes.c_int
    lib.tierserve_grouped_swiglu.argtypes = [
        ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int64,
        ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
    lib.tierserve_lane_swiglu.restype = ctypes.c_int64
    lib.tierserve_lane_swiglu.argtypes = [
        ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int64, ctypes.c_int64,
        ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int]
    lib.tierserve_pin_threads.restype = ctypes.c_int
    lib.tierserve_pin_threads.argtypes = [ctypes.c_void_p, ctypes.c_int]
    return lib


def library_of(source: Path, directory: Path | None = None) -> ctypes.CDLL:
    """Another source's library (an earlier version of grouped_ffn.c, say), built and loaded beside the
    process's own, for `using`. Raises BuildError."""
    return _declared(ctypes.CDLL(str(build_library(directory, source))))


@contextlib.contextmanager
def using(lib: ctypes.CDLL | None) -> Iterator[None]:
    """Every call in the block goes through `lib` (library_of's, or load_library's), so that two versions of the
    kernel are timed in turns in one process, on the same experts: between processes, where the weights' pages
    land moved one kernel's time by up to 2x on the development VM."""
    global _library
    load_library()
    with _lock:
        saved, _library = _library, lib
    try:
        yield
    finally:
        with _lock:
            _library = saved


def pin_threads(cores: Sequence[int]) -> bool:
    """Binds this process's OpenMP threads (torch's too, where the runtimes are one) to the logical CPUs `cores`:
    in teams of len(cores) threads, thread i > 0 to cores[i] alone, and the calling thread to all of them, which
    the threads it starts later inherit. False (not every thread bound) where the library is unavailable or a CPU
    cannot be used."""
    lib = load_library()
    if lib is None or not cores or not all(0 <= core < CPU_SETSIZE for core in cores):
        return False
    numbers = array("i", cores)  # alive until the call returns
    return lib.tierserve_pin_threads(numbers.buffer_info()[0], len(numbers)) == 0


# Each expert's six pointers (native-endian uint64 bytes) once its tensors passed the checks, keyed by the kernel's
# formats, the shapes and the tensors' identities: at a few rows per expert the checks (48 tensors' types, dtypes,
# shapes and flags: 33 us on a Zen 4 core for 8 experts) cost a tenth of a layer on 16 threads. A served expert's
# tensors are fixed views, so they pass once; an entry leaves when one of its tensors dies, before Python can
# reuse the tensor's id.
_checked: dict[tuple, bytes] = {}


def _expert_pointers(matrices: ExpertWeights, kinds: tuple[type, type], ffn: int, hidden: int, index: int
                     ) -> bytes | None:
    """An expert's gate, up and down tensors' addresses in the order the kernel reads them; None when gate or up
    is not of type kinds[0], down not of type kinds[1], or a tensor is not a contiguous CPU tensor. ValueError
    when the expert is not three matrices or a tensor's dtype or shape is not its layout's: the kernel reads them
    through bare pointers."""
    if len(matrices) != 3:
        raise ValueError(f"expert {index} is {len(matrices)} matrices, expected gate, up and down")
    gate, up, down = matrices
    if not (type(gate) is kinds[0] and type(up) is kinds[0] and type(down) is kinds[1]):
        return None
    tensors = (*gate, *up, *down)
    key = (*kinds, ffn, hidden, *map(id, tensors))
    pointers = _checked.get(key)
    if pointers is not None:
        return pointers
    if not all(t.is_cpu and t.is_contiguous() for t in tensors):
        return None
    fmt_in, fmt_out = (FORMAT_NAMES[kind] for kind in kinds)
    layout = [*tensor_specs(fmt_in, (ffn, hidden)), *tensor_specs(fmt_in, (ffn, hidden)),
              *tensor_specs(fmt_out, (hidden, ffn))]
    for i, (t, (dtype, shape)) in enumerate(zip(tensors, layout, strict=True)):
        if t.dtype != dtype or t.shape != shape:
            name = ("gate", "up", "down")[i // 2]
            kind = kinds[i // 4]
            raise ValueError(f"expert {index} {name}: expected a {dtype} {shape} tensor of a {kind.__name__}, got "
                             f"{t.dtype} {tuple(t.shape)} (gate and up ({ffn}, {hidden}), down ({hidden}, {ffn}))")
    pointers = _checked[key] = array("Q", [t.data_ptr() for t in tensors]).tobytes()
    for t in tensors:
        weakref.finalize(t, _checked.pop, key, None)
    return pointers


def _pointers(weights: Sequence[ExpertWeights], kinds: tuple[type, type], ffn: int, hidden: int) -> bytes | None:
    """Every expert's pointers (_expert_pointers), expert after expert; None if any expert's is None."""
    pointers = []
    for index, matrices in enumerate(weights):
        mine = _expert_pointers(matrices, kinds, ffn, hidden, index)
        if mine is None:
            return None
        pointers.append(mine)
    return b"".join(pointers)


def grouped_swiglu(x: torch.Tensor, weights: Sequence[ExpertWeights], counts: Sequence[int]) -> torch.Tensor | None:
    """Rows of `x` grouped by expert (counts[i] rows for the expert of weights[i]) through their SwiGLU experts in
    one native call on torch's number of threads, as x's dtype; None where the kernel does not apply and the
    caller's torch path should run: x not on the CPU, float weights, gate and up in different formats, experts
    in different formats, tensors not contiguous, an expert with INT8_DEQUANTIZE_ROWS rows or more (those batches
    are GEMMs, where torch does well), or no library. Down may differ from gate and up (int4 gate and up with int8
    down, as Q4_K_M layers are served). Raises ValueError for shapes that do not fit together."""
    if not x.is_cpu or not counts or max(counts) >= INT8_DEQUANTIZE_ROWS:
        return None
    kinds = (type(weights[0][0]), type(weights[0][-1])) if weights and weights[0] else None  # _pointers checks 3
    if kinds is None or not all(kind in FORMAT_CODES for kind in kinds):
        return None
    if x.dim() != 2:
        raise ValueError(f"x has shape {tuple(x.shape)}, expected (rows, hidden)")
    rows, hidden = x.shape
    if len(counts) != len(weights) or min(counts) < 0 or sum(counts) != rows:
        raise ValueError(f"counts {list(counts)} do not describe {rows} rows for {len(weights)} experts")
    ffn = weights[0][0][0].shape[0]
    if kinds[0] is Int4Matrix and (ffn % INT4_ROW_TILE or hidden % INT4_GROUP):
        raise ValueError(f"int4 gate and up need ffn a multiple of {INT4_ROW_TILE} and hidden of {INT4_GROUP}, "
                         f"got {ffn} and {hidden}")
    if kinds[1] is Int4Matrix and (hidden % INT4_ROW_TILE or ffn % INT4_GROUP):
        raise ValueError(f"int4 down needs hidden a multiple of {INT4_ROW_TILE} and ffn of {INT4_GROUP}, "
                         f"got {hidden} and {ffn}")
    ptrs = _pointers(weights, kinds, ffn, hidden)
    if ptrs is None:
        return None
    lib = load_library()
    if lib is None:
        return None
    bf16 = x.dtype == torch.bfloat16
    xb = x if bf16 and x.is_contiguous() else x.to(torch.bfloat16).contiguous()  # torch's int8 / int4 kernels take bf16
    out = torch.empty(rows, hidden, dtype=torch.bfloat16)
    counts_a = array("q", counts)  # alive until the call returns
    status = lib.tierserve_grouped_swiglu(FORMAT_CODES[kinds[0]], FORMAT_CODES[kinds[1]], len(counts_a),
                                          counts_a.buffer_info()[0], ptrs, hidden, ffn, xb.data_ptr(),
                                          out.data_ptr(), torch.get_num_threads(), bf16)
    if status:
        raise ValueError(f"native grouped SwiGLU refused its input: {ERRORS.get(status, status)}")
    return out if bf16 else out.to(x.dtype)


@dataclass(frozen=True)
class LayerTable:
    """A layer's experts as the lane kernel looks them up by id: their formats and each expert's six addresses
    (zeros for the experts this host does not hold), valid while the tensors they were taken from live."""

    kinds: tuple[type, type]
    pointers: bytes
    n_experts: int
    hidden: int
    ffn: int


def layer_table(weights: Mapping[int, ExpertWeights], n_experts: int, hidden: int, ffn: int) -> LayerTable | None:
    """The table of a layer's held experts (`weights` by id); None where the native kernel does not take them:
    none held, float weights, experts in different formats, shapes its int4 tiles do not fit, or tensors that are
    not contiguous. Raises ValueError for an expert whose tensors are not its layout's."""
    if not weights:
        return None
    first = next(iter(weights.values()))
    kinds = (type(first[0]), type(first[-1]))
    if not all(kind in FORMAT_CODES for kind in kinds) or \
            (kinds[0] is Int4Matrix and (ffn % INT4_ROW_TILE or hidden % INT4_GROUP)) or \
            (kinds[1] is Int4Matrix and (hidden % INT4_ROW_TILE or ffn % INT4_GROUP)):
        return None
    table = bytearray(6 * 8 * n_experts)
    for e, matrices in weights.items():
        if not 0 <= e < n_experts:
            raise ValueError(f"expert {e} is not one of the layer's {n_experts}")
        pointers = _expert_pointers(matrices, kinds, ffn, hidden, e)
        if pointers is None:
            return None
        table[48 * e : 48 * (e + 1)] = pointers
    return LayerTable(kinds, bytes(table), n_experts, hidden, ffn)


def lane_swiglu(table: LayerTable, ids: torch.Tensor, weights: torch.Tensor, owned: torch.Tensor, x: torch.Tensor,
                out: torch.Tensor) -> int | None:
    """A lane request's whole answer in one native call (shared/native/grouped_ffn.c): the rows of x (rows,
    hidden), each routed to the experts of its row of ids with its row of weights (rows, k), through the experts
    `owned` marks (a bool per expert id), each row's weighted sum written to out (padded, hidden), zeros below the
    real rows. Returns the pairs computed; None, having written nothing, where the kernel does not answer it: x
    neither fp32 nor bf16, an expert with INT8_DEQUANTIZE_ROWS pairs or more, an id out of range, an owned
    expert not in the table, or no library. The grouped path then computes it or names what is wrong."""
    if ids.dim() != 2:
        return None
    rows, k = ids.shape
    if x.dtype not in (torch.float32, torch.bfloat16) or out.dtype != x.dtype or ids.dtype != torch.int32 or \
            weights.dtype != torch.float32 or owned.dtype != torch.bool or owned.shape != (table.n_experts,) or \
            x.shape != (rows, table.hidden) or out.dim() != 2 or out.shape[0] < rows or out.shape[1] != table.hidden \
            or weights.shape != ids.shape or \
            not all(t.is_cpu and t.is_contiguous() for t in (ids, weights, owned, x, out)):
        return None
    lib = load_library()
    if lib is None:
        return None
    pairs = lib.tierserve_lane_swiglu(FORMAT_CODES[table.kinds[0]], FORMAT_CODES[table.kinds[1]], rows, out.shape[0],
                                      k, ids.data_ptr(), weights.data_ptr(), owned.data_ptr(), table.pointers,
                                      table.n_experts, table.hidden, table.ffn, x.data_ptr(), out.data_ptr(),
                                      x.dtype == torch.bfloat16, INT8_DEQUANTIZE_ROWS - 1, torch.get_num_threads())
    return pairs if pairs >= 0 else None
