"""The expert cache file: a model's block-quantized experts converted once into their serving format.

Every expert is one page-aligned region of the file (gate, up and down one after another, each matrix its
quantized tensor then its scales, every tensor on a 64-byte boundary), in (layer, expert) order, after a
header naming the model's content hash, the model file it was built from and every layer's `ExpertLayout`;
after the regions, each one's SHA-256 digest, in the same order. Every process maps the file and reads experts
as zero-copy views; a region copied anywhere (pinned RAM, a VRAM slot) reads the same way through
`ExpertLayout.views`.

    tierserve convert-experts MODEL.gguf [--cache-dir DIR] [--workers N] [--memory-floor SIZE] [--verify]
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import glob
import hashlib
import json
import math
import mmap
import multiprocessing
import os
import shlex
import shutil
import signal
import struct
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shared.config import Config, parse_bytes_or_percent, positive_int
from shared.expert_math import ExpertWeights
from shared.gguf_file import ZERO_COPY_TYPES, GGUFModel, stat_identity
from shared.memory_use import room_above_floor
from shared.model_config import EXPERT_TENSOR_KINDS, ModelError, expert_tensor_name, tensor_shapes
from shared.pages import advise, read_only_tensor
from shared.quant import (
    INT8_K_MULTIPLE,
    Matrix,
    convert_matrix,
    from_tensors,
    layer_formats,
    matrix_tensors,
    serving_format,
    tensor_specs,
)
from shared.run_files import die_with_parent

PAGE = 4096  # regions start and end on page boundaries: mappable, DMA-able and freeable one by one
ALIGN = 64  # every tensor of a region starts on a cache line
MAGIC = b"TSEXPRTS"
VERSION = 4  # 2: a format per matrix; 3: a digest per region; 4: the model file it was built from
# Read as well: version 3 differs only in not recording the model file, so its caches serve on (never removed
# as an earlier content's) rather than being rebuilt, which on a disk sized for one cache would not fit.
READABLE_VERSIONS = (3, VERSION)
# The header's record of the model file it was built from (resolved path, device and inode): which earlier
# caches are that file's to remove once its content changes. Not matched: a moved or copied model of the same
# content uses the file.
BUILT_FROM = "built_from"
DIGEST_NBYTES = 32  # SHA-256: with the SHA extensions of current x86 CPUs it hashes ~1.4 GB/s per core
_PREFIX = struct.Struct("<8sIQ")  # magic, version, length of the JSON header that follows
HEADER_MAX_NBYTES = 16 << 20  # a header takes about 1 kB a layer
HASH_CHUNK = 64 << 20
BYTES_PER_WORKER = 512 << 20  # by default one conversion process per this much of the cache, one per core at most
# a conversion process's peak resident memory, rounded up: about 0.4 GB converting a 4096 x 14336 Q6_K matrix, and
# 688 MiB was seen in another build
WORKER_NBYTES = 768 << 20
DEFAULT_MEMORY_FLOOR = Config.host_memory_floor

Progress = Callable[[int, int, int, float], None]  # (layers done, layers, bytes written, seconds)


class ConversionStopped(Exception):
    """The process was told to stop while it converted: nothing of the cache is kept, and the next start converts."""


class CacheError(ValueError):
    """An expert cache file that cannot be used (it is rebuilt); the message says why."""


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


@dataclass(frozen=True)
class TensorSlot:
    """One tensor's place in an expert region."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class ExpertLayout:
    """Where an expert's gate, up and down matrices lie in its region; the same for every expert of a layer."""

    formats: tuple[str, ...]  # gate, up, down: each float | int8 | int4
    matrices: tuple[tuple[TensorSlot, ...], ...]  # gate, up, down: each its stored tensors in order
    region_nbytes: int  # whole pages

    @classmethod
    def build(cls, formats: Sequence[str], matrices: Sequence[tuple[tuple[int, int], torch.dtype]]) -> ExpertLayout:
        """The layout of (shape (N, K), float dtype) gate, up and down matrices served in `formats`
        (the float dtype matters only for 'float')."""
        offset, placed = 0, []
        for fmt, (shape, float_dtype) in zip(formats, matrices, strict=True):
            slots = []
            for dtype, tensor_shape in tensor_specs(fmt, shape, float_dtype):
                offset = _round_up(offset, ALIGN)
                slots.append(TensorSlot(dtype, tensor_shape, offset))
                offset += slots[-1].nbytes
            placed.append(tuple(slots))
        return cls(tuple(formats), tuple(placed), _round_up(offset, PAGE))

    @property
    def format(self) -> str:
        """The layer's formats as one name: 'float', 'int8' or 'int4' when its matrices share one, else the
        distinct ones joined by '+' in gate, up, down order ('int4+int8' for int4 gate and up, int8 down)."""
        return "+".join(dict.fromkeys(self.formats))

    @property
    def expert_nbytes(self) -> int:
        """Bytes of one expert's tensors, without the alignment padding of its region."""
        return sum(slot.nbytes for slots in self.matrices for slot in slots)

    def views(self, buf: torch.Tensor) -> ExpertWeights:
        """(gate, up, down) as views over a uint8 region (..., region_nbytes) on any device; a stack of regions
        (S, region_nbytes) gives matrices with a leading S dimension (stride(0) = region_nbytes / itemsize)."""
        if buf.dtype != torch.uint8 or buf.dim() == 0 or buf.shape[-1] != self.region_nbytes:
            raise ValueError(f"an expert region is a uint8 tensor (..., {self.region_nbytes}), "
                             f"got {buf.dtype} {tuple(buf.shape)}")
        lead = tuple(buf.shape[:-1])
        return tuple(  # type: ignore[return-value]
            from_tensors(fmt, [buf[..., s.offset : s.offset + s.nbytes].view(s.dtype).view(*lead, *s.shape)
                               for s in slots])
            for fmt, slots in zip(self.formats, self.matrices, strict=True)
        )

    def fill(self, buf: torch.Tensor, weights: ExpertWeights) -> None:
        """Copy an expert's matrices into their places in a region (padding is left as it is)."""
        for dst, src in zip(self.views(buf), weights, strict=True):
            for d, s in zip(matrix_tensors(dst), matrix_tensors(src), strict=True):
                d.copy_(s)

    def to_json(self) -> dict[str, Any]:
        return {"formats": list(self.formats), "region_nbytes": self.region_nbytes,
                "matrices": [[{"dtype": str(s.dtype).removeprefix("torch."), "shape": list(s.shape),
                               "offset": s.offset} for s in slots] for slots in self.matrices]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ExpertLayout:
        matrices = tuple(tuple(TensorSlot(getattr(torch, s["dtype"]), tuple(s["shape"]), s["offset"]) for s in slots)
                         for slots in data["matrices"])
        return cls(tuple(data["formats"]), matrices, data["region_nbytes"])


def expert_layouts(model: GGUFModel) -> list[ExpertLayout]:
    """Each layer's layout as served: float for float tensors (views of the model file), else int4 / int8 per
    matrix (`layer_formats`)."""
    shapes = tensor_shapes(model.config)
    layouts = []
    for layer in range(model.config.n_layers):
        names = [expert_tensor_name(layer, kind) for kind in EXPERT_TENSOR_KINDS]
        formats = layer_formats([serving_format(model.qtype(name), shapes[name][1:]) for name in names])
        for fmt, name in zip(formats, names, strict=True):
            if fmt == "int8" and shapes[name][-1] % INT8_K_MULTIPLE:
                raise ModelError(f"{model.path}: tensor {name} would be served as int8, whose CPU kernel needs rows "
                                 f"of a multiple of {INT8_K_MULTIPLE} values, not {shapes[name][-1]}")
        matrices = [(shapes[name][1:], ZERO_COPY_TYPES.get(model.qtype(name), torch.float32)) for name in names]
        layouts.append(ExpertLayout.build(formats, matrices))
    return layouts


def layer_expert_nbytes(layout: ExpertLayout, expert_params: int, float_dtype: torch.dtype) -> int:
    """What one hot expert of a layer of `layout` takes on the worker: a quantized expert is its cache region (whole
    pages; layers may differ: int4, and int4+int8 where down is Q6_K), a float one its tensors in `float_dtype`,
    the worker's, which it converts them to whatever the file stores."""
    return layout.region_nbytes if layout.format != "float" else expert_params * float_dtype.itemsize


def hot_expert_nbytes(model: GGUFModel, float_dtype: torch.dtype) -> int:
    """What one hot expert takes on the worker (layer_expert_nbytes), the mean over layers rounded up."""
    sizes = [layer_expert_nbytes(layout, model.config.expert_params, float_dtype) for layout in expert_layouts(model)]
    return -(-sum(sizes) // len(sizes))


# ---- content hash


_HASHES: dict[tuple[str, int, int, int, int], str] = {}


def content_hash(path: str | os.PathLike[str]) -> str:
    """Tree hash of a file: 64 MiB chunks hashed in parallel (hashlib releases the GIL), then the chunk digests.
    SHA-256 rather than BLAKE2b: with the SHA extensions of current x86 CPUs it hashes ~1.4 GB/s per core, twice
    BLAKE2b's ~0.7. Remembered per process for an unchanged file (same inode, size and mtime)."""
    def key_of(st: os.stat_result) -> tuple[str, int, int, int, int]:
        return os.path.realpath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns

    key = key_of(os.stat(path))
    if key in _HASHES:
        return _HASHES[key]
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mapped:
        st = os.fstat(f.fileno())
        key = key_of(st)  # the file read, should the path have been renamed over since
        mapped.madvise(mmap.MADV_SEQUENTIAL)
        whole = memoryview(mapped)
        chunks = [whole[i : i + HASH_CHUNK] for i in range(0, st.st_size, HASH_CHUNK)]
        with ThreadPoolExecutor(min(32, len(os.sched_getaffinity(0)))) as pool:
            digests = list(pool.map(lambda chunk: hashlib.sha256(chunk).digest(), chunks))
        for chunk in chunks:
            chunk.release()
        whole.release()
    _HASHES[key] = hashlib.sha256(b"".join(digests)).hexdigest()
    return _HASHES[key]


# ---- the file


def _header(model: GGUFModel, layouts: list[ExpertLayout], source_hash: str) -> dict[str, Any]:
    """Everything the file's header says, as it reads back from JSON (so headers compare with ==). Layer
    offsets count from the start of the data, the first page after the header."""
    n_experts, offset, offsets = model.config.n_experts, 0, []
    for layout in layouts:
        offsets.append(None if layout.format == "float" else offset)
        if layout.format != "float":
            offset += n_experts * layout.region_nbytes
    n_regions = n_experts * sum(layout.format != "float" for layout in layouts)
    header = {"source": model.path.name, "source_hash": source_hash, "n_layers": len(layouts),
              "n_experts": n_experts, "formats": [layout.format for layout in layouts],
              "layouts": [layout.to_json() for layout in layouts], "layer_offsets": offsets, "data_nbytes": offset,
              "digests_nbytes": n_regions * DIGEST_NBYTES}
    return json.loads(json.dumps(header))


def _encode_header(header: dict[str, Any]) -> bytes:
    text = json.dumps(header).encode()
    return _PREFIX.pack(MAGIC, VERSION, len(text)) + text


def _data_offset(header_nbytes: int) -> int:
    return _round_up(header_nbytes, PAGE)


def _read_header(data: bytes | mmap.mmap, size: int) -> tuple[dict[str, Any], int]:
    """(header, offset of the data) of a cache file of `size` bytes whose first bytes are `data`."""
    if size < _PREFIX.size:
        raise CacheError("is shorter than its header")
    magic, version, length = _PREFIX.unpack(data[: _PREFIX.size])
    if magic != MAGIC:
        raise CacheError("is not an expert cache file (bad magic number)")
    if version not in READABLE_VERSIONS:
        raise CacheError(f"was written in format version {version}, this is version {VERSION}")
    if _PREFIX.size + length > min(size, len(data)):
        raise CacheError("is truncated in its header")
    try:
        header = json.loads(bytes(data[_PREFIX.size : _PREFIX.size + length]))
        sizes = {key: header[key] for key in ("data_nbytes", "digests_nbytes")}
    except (UnicodeDecodeError, json.JSONDecodeError, TypeError, KeyError) as e:
        raise CacheError(f"has a corrupt header ({type(e).__name__}: {e})") from None
    for key, value in sizes.items():
        if type(value) is not int or value < 0:
            raise CacheError(f"has a corrupt header ({key} {value!r})")
    offset = _data_offset(_PREFIX.size + length)
    if size != offset + sum(sizes.values()):
        raise CacheError(f"is {size} bytes, its header says {offset + sum(sizes.values())}")
    return header, offset


def _file_header(path: Path) -> dict[str, Any]:
    """The header of the cache file at `path`; CacheError unless it is a complete cache file of this version."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            prefix = f.read(_PREFIX.size)
            length = _PREFIX.unpack(prefix)[2] if len(prefix) == _PREFIX.size else 0
            head = prefix + f.read(min(length, HEADER_MAX_NBYTES))  # a corrupt length reads no more than this
    except FileNotFoundError:
        raise CacheError("does not exist") from None
    return _read_header(head, size)[0]


def _check_file(path: Path, expected: dict[str, Any]) -> None:
    """Raise CacheError unless `path` is a complete cache file for exactly this header, whatever the name of the
    model file it was built from."""
    header = _file_header(path)
    header.pop(BUILT_FROM, None)
    header["source"] = expected["source"]
    if header != expected:
        differ = sorted(key for key in expected if header.get(key) != expected[key])
        raise CacheError(f"was made for another model or layout (differs in {', '.join(differ) or 'keys'})")


class ExpertCache:
    """A cache file mapped read-only: regions as zero-copy numpy arrays, experts as views over them."""

    def __init__(self, path: str | os.PathLike[str], built: bool = False) -> None:
        self.path = Path(path)
        self.built = built  # whether the call that opened it wrote it
        with open(self.path, "rb") as f:
            self._mmap = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
        try:
            header, data_offset = _read_header(self._mmap, len(self._mmap))
        except CacheError as e:
            self._mmap.close()
            raise CacheError(f"{self.path}: {e}") from None
        self.n_experts: int = header["n_experts"]
        self.formats: list[str] = header["formats"]
        self._layouts = [ExpertLayout.from_json(layout) for layout in header["layouts"]]
        self._offsets: list[int | None] = header["layer_offsets"]
        self._bytes = np.frombuffer(self._mmap, dtype=np.uint8)
        self._data = self._bytes[data_offset:]
        self._digests = self._data[header["data_nbytes"] :].reshape(-1, DIGEST_NBYTES)
        # each cached layer's first row of digests
        self._first_digest = _first_digests(self._offsets, self.n_experts)

    @property
    def nbytes(self) -> int:
        return len(self._bytes)

    def layout(self, layer: int) -> ExpertLayout:
        return self._layouts[layer]

    def regions(self, layer: int) -> np.ndarray:
        """All of a layer's regions, (n_experts, region_nbytes) uint8, zero-copy."""
        offset = self._offsets[layer]
        if offset is None:
            raise KeyError(f"layer {layer} is served as float from the model file; the cache does not hold it")
        size = self._layouts[layer].region_nbytes
        return self._data[offset : offset + self.n_experts * size].reshape(self.n_experts, size)

    def region(self, layer: int, expert: int) -> np.ndarray:
        return self.regions(layer)[expert]

    def file_offset(self, layer: int, expert: int) -> int:
        """Where the expert's region starts in the file (for page-cache advice on it)."""
        return self.region(layer, expert).ctypes.data - self._bytes.ctypes.data

    def weights(self, layer: int, expert: int) -> ExpertWeights:
        return self._layouts[layer].views(read_only_tensor(self.region(layer, expert)))

    def damaged(self, layer: int, experts: Sequence[int], threads: int = 1) -> list[int]:
        """Those of the layer's experts whose region no longer has the digest it was written with (read again
        from the page cache or the disk: a flipped bit there would be served), hashed on `threads` threads."""
        regions = self.regions(layer)
        first = self._first_digest[layer]

        def intact(expert: int) -> bool:
            return hashlib.sha256(regions[expert]).digest() == self._digests[first + expert].tobytes()

        with ThreadPoolExecutor(max(1, threads)) as pool:  # hashlib lets go of the GIL while it hashes
            return [e for e, ok in zip(experts, pool.map(intact, experts), strict=True) if not ok]

    def verify(self, threads: int = 1) -> list[tuple[int, int]]:
        """(layer, expert) of every damaged region in the file."""
        return [(layer, e) for layer in self._first_digest
                for e in self.damaged(layer, range(self.n_experts), threads)]

    def close(self) -> None:
        """Unmap the file once no view of it is left (views still alive keep it mapped)."""
        if not hasattr(self, "_bytes"):
            return
        del self._bytes, self._data, self._digests
        try:
            self._mmap.close()
        except BufferError:
            pass


def _first_digests(layer_offsets: Sequence[int | None], n_experts: int) -> dict[int, int]:
    """Cached layer -> the index of its first expert's digest: the cached layers' experts in order."""
    cached = [layer for layer, offset in enumerate(layer_offsets) if offset is not None]
    return {layer: k * n_experts for k, layer in enumerate(cached)}


# ---- building it


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tierserve" / "experts"


def ensure_expert_cache(model: GGUFModel, directory: str | os.PathLike[str] | None = None,
                        workers: int | None = None, progress: Progress | None = None,
                        stopping: Callable[[], bool] = lambda: False,
                        memory_floor: str = DEFAULT_MEMORY_FLOOR) -> ExpertCache | None:
    """The model's expert cache, built first if no valid one exists; None when every expert is float.

    Looked for (and built) in `directory`, else next to the model, else in the user cache directory
    ($XDG_CACHE_HOME/tierserve/experts). Processes starting together build it once: one holds a lock on
    `<name>.lock` while it converts, the others wait for it and then map the finished file. A build asks
    `stopping` after each layer and raises ConversionStopped once it says so; unless `workers` is given, it starts
    as many conversion processes as fit in the RAM free above `memory_floor` (host_memory_floor's form).
    """
    layouts = expert_layouts(model)
    if all(layout.format == "float" for layout in layouts):
        return None
    dirs = [Path(directory)] if directory else [model.path.parent, default_cache_dir()]
    source_hash, hashed_now = _remembered_hash(model.path, dirs)
    # the hash is of the file the path names, and conversion processes reopen the path: both must be this model's
    model.check_unchanged()
    built_from = _built_from_record(model.path, model.opened)
    header = _header(model, layouts, source_hash)

    def found(path: Path) -> ExpertCache:
        if hashed_now:  # hashing read the whole model file: the page cache would hold its experts beside the cache's
            _drop_converted_pages(model, layouts)
        return ExpertCache(path)

    name = f"{model.path.stem}.{header['source_hash'][:16]}.experts"
    # this name's first, then the same content under another name (a renamed model, or one served through a
    # symlink, whose target's cache lies beside the target unless a directory is given): a rebuild would take as
    # long and as much disk as the first. Each file is checked once.
    others = dirs if directory else [*dirs, model.path.resolve().parent]
    candidates = [d / name for d in dirs] + [path for d in dict.fromkeys(others)
                                             for path in sorted(d.glob(f"*.{header['source_hash'][:16]}.experts"))]
    for candidate in dict.fromkeys(candidates):
        if _problem(candidate, header) is None:
            return found(candidate)
    target = _writable_dir(dirs) / name
    with _locked(target):
        problem = _problem(target, header)
        if problem is None:  # built by another process while this one waited
            return found(target)
        if stopping():  # told to stop while it waited for another's build, which gave up for the same reason
            raise ConversionStopped("stopped before converting")
        if target.exists():
            print(f"expert cache: {target} {problem}; rebuilding it", file=sys.stderr)
        for stale in target.parent.glob(f"{glob.escape(name)}.tmp*"):  # left by a build that was killed
            stale.unlink(missing_ok=True)
        if workers is None:  # pool processes take a second or two to start: small caches convert faster here
            workers = _default_workers(header["data_nbytes"], memory_floor)
        _build(model, target, header, layouts, workers, progress or _PrintProgress(), built_from, stopping)
        cache = ExpertCache(target, built=True)  # mapped before the lock goes: no other start can remove it first
    # Only while the file is still the content this cache was built from: changed meanwhile (another start may have
    # built the new content's cache already), the other caches may be the current one's.
    if stat_identity(model.path) == model.opened:
        _remove_superseded(model, dirs, built_from, header["source_hash"])
    return cache


def _built_from_record(path: Path, identity: tuple[int, int, int, int]) -> dict[str, Any]:
    """BUILT_FROM's record of the model file at `path`: the file itself, not only its name. Another file at the same
    path (another container's model on a cache directory they share, another machine's over NFS, a new version
    renamed over the old) is another file, whose caches are not this one's to remove."""
    return {"path": str(path.resolve()), "device": identity[0], "inode": identity[1]}


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold `<name>.lock`, the lock `path` is built, checked and removed under."""
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def discard(path: Path) -> None:
    """Remove a damaged cache file under its build lock, so that the next `ensure_expert_cache` builds it anew
    (processes that map it keep their map until they close it)."""
    try:
        with _locked(path):
            path.unlink(missing_ok=True)
    except OSError as e:  # a read-only directory: the bare error named the lock file, not what to do
        raise OSError(f"cannot remove the damaged expert cache {path} ({e.strerror}): delete it, or build the "
                      f"cache in a writable directory with --cache-dir DIR and serve it with expert_cache_dir "
                      f"set to DIR") from e


def rebuild_command(model_path: Path, cache_path: Path) -> str:
    """The command that checks the cache file at `cache_path` and rebuilds it if it is damaged: with its
    directory as --cache-dir unless it lies next to the model, where the command looks first (elsewhere,
    the command would check, or build, another file and leave this one as it is)."""
    command = ["tierserve", "convert-experts", "--verify", str(model_path)]
    if cache_path.parent.resolve() != model_path.parent.resolve():
        command += ["--cache-dir", str(cache_path.parent)]
    return shlex.join(command)


def _remove_superseded(model: GGUFModel, dirs: list[Path], built_from: dict[str, Any], source_hash: str) -> None:
    """Remove the caches built from this model file's earlier contents, tens to hundreds of GB each: each content
    gets a cache of its own name, and nothing else removes the old one. From the directories searched now and
    by default (an earlier start may have had no expert_cache_dir), and only files whose header records this
    same file (`built_from`) and another content than `source_hash`, the current one's: another model of the same
    name may share a directory, a file of an older version records nothing (a copy of the earlier content at
    another path that used the file builds it again), and the current content's cache under another name (built
    through a link, or with another cache directory) is as current as this one's. A process that maps one goes
    on reading it (its inode lives until it is unmapped)."""
    pattern = f"*.{'[0-9a-f]' * 16}.experts"
    searched = dict.fromkeys([*dirs, model.path.parent, default_cache_dir()])
    for old in (path for d in searched for path in d.glob(pattern)):
        if not _superseded(old, built_from, source_hash):
            continue
        try:
            with _locked(old):  # not from under a process that is building or checking it
                if not _superseded(old, built_from, source_hash):  # removed, or rebuilt, while this one waited
                    continue
                nbytes = old.stat().st_size
                old.unlink()
        except OSError as e:
            print(f"expert cache: could not remove {old}, built from an earlier content of {built_from['path']}: "
                  f"{e}", file=sys.stderr)
            continue
        print(f"expert cache: removed {old} ({nbytes / 1e9:.2f} GB), built from an earlier content of "
              f"{built_from['path']}", file=sys.stderr)


def _superseded(path: Path, built_from: dict[str, Any], source_hash: str) -> bool:
    """Whether the cache file at `path` was built from the model file `built_from` records, from another content
    than `source_hash`; False where there is no cache file at `path`."""
    try:
        header = _file_header(path)
    except (OSError, CacheError):
        return False
    return header.get(BUILT_FROM) == built_from and header.get("source_hash") != source_hash


def _problem(path: Path, header: dict[str, Any]) -> str | None:
    """Why `path` is not a usable cache file for this header, or None if it is one."""
    try:
        _check_file(path, header)
    except CacheError as e:
        return str(e)
    return None


def _remembered_hash(path: Path, dirs: list[Path]) -> tuple[str, bool]:
    """The model's content hash, remembered across starts in `<stem>.<path hash>.source-hash` beside the cache
    for as long as the file is unchanged (same device, inode, size and mtime, as git and ccache judge it), so a
    start neither hashes a big file again nor pulls its expert pages back into the page cache. Processes
    starting together hash it once: the first holds the memo's `.lock` while it hashes. Returns the hash and whether
    this process read the file for it."""
    identity = ":".join(map(str, stat_identity(path)))
    # A memo per model file, not per file name: models of one name sharing a cache directory overwrote each
    # other's, and each start hashed its whole file again.
    memo_name = f"{path.stem}.{hashlib.sha256(os.fsencode(path.resolve())).hexdigest()[:16]}.source-hash"

    def remembered() -> str | None:
        for d in dirs:
            with contextlib.suppress(OSError, ValueError):
                remembered_identity, digest = (d / memo_name).read_text().split()
                if remembered_identity == identity and len(digest) == 64:
                    return digest
        return None

    digest = remembered()
    if digest is not None:
        return digest, False
    try:
        memo = _writable_dir(dirs) / memo_name
    except OSError:  # nowhere to remember it: hash on every start
        return content_hash(path), True
    with _locked(memo):
        digest = remembered()  # hashed by another process while this one waited
        hashed_now = digest is None
        for stale in memo.parent.glob(f"{glob.escape(memo_name)}.tmp*"):  # left by a writer killed holding the lock
            stale.unlink(missing_ok=True)
        if digest is None:
            digest = content_hash(path)
            tmp = memo.with_name(f"{memo_name}.tmp{os.getpid()}")
            try:
                tmp.write_text(f"{identity} {digest}\n")
                os.replace(tmp, memo)  # readers see the old line or the new one, never half of it
            except OSError as e:  # a full disk: the cache itself may need no room, and the next start hashes again
                tmp.unlink(missing_ok=True)
                print(f"expert cache: could not remember the model's content hash in {memo}: {e.strerror}",
                      file=sys.stderr)
    return digest, hashed_now


def _writable_dir(dirs: list[Path]) -> Path:
    for d in dirs:
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(d, os.W_OK):
            return d
    raise OSError(f"no writable directory for the expert cache among {', '.join(map(str, dirs))} "
                  f"(set expert_cache_dir)")


def _build(model: GGUFModel, path: Path, header: dict[str, Any], layouts: list[ExpertLayout],
           workers: int, progress: Progress, built_from: dict[str, Any], stopping: Callable[[], bool]) -> None:
    """Write the file under a temporary name, layer by layer in parallel, then rename it into place."""

    def layer_done(done: int, written: int) -> None:
        progress(done, len(jobs), written, time.monotonic() - start)
        if stopping():  # a stop waits for the layers in progress, not for the whole model (28 s of a 4 GB one)
            raise ConversionStopped(f"stopped after converting {done} of {len(jobs)} layers")

    encoded = _encode_header({**header, BUILT_FROM: built_from})
    data_offset = _data_offset(len(encoded))
    nbytes = data_offset + header["data_nbytes"] + header["digests_nbytes"]
    free = shutil.disk_usage(path.parent).free
    if free < nbytes:
        raise _not_enough_space(path, nbytes, free)
    digests_offset = data_offset + header["data_nbytes"]
    first_digest = _first_digests(header["layer_offsets"], model.config.n_experts)
    jobs = [(layer, layouts[layer], data_offset + offset, digests_offset + first_digest[layer] * DIGEST_NBYTES)
            for layer, offset in enumerate(header["layer_offsets"]) if offset is not None]
    workers = max(1, min(workers, len(jobs)))
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    start, done, written = time.monotonic(), 0, 0
    try:
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.posix_fallocate(fd, 0, nbytes)  # reserve every block now: ENOSPC here, not a hole later
            _pwrite_all(fd, encoded, 0)
            if workers == 1:
                for job in jobs:
                    written += _convert_layer(model, fd, *job)
                    done += 1
                    layer_done(done, written)
            else:
                # spawn: a forked child of a process that has run torch's thread pool can hang in it
                with ProcessPoolExecutor(workers, multiprocessing.get_context("spawn"), initializer=_worker_init,
                                         initargs=(str(model.path), model.opened, str(tmp), os.getpid())) as pool:
                    try:
                        for future in as_completed([pool.submit(_worker_convert, *job) for job in jobs]):
                            written += future.result()
                            done += 1
                            layer_done(done, written)
                    except BrokenProcessPool as e:  # most often killed, by the out-of-memory killer
                        pool.shutdown(cancel_futures=True)
                        if stopping():  # or by a stop sent to the whole process group (Ctrl-C)
                            raise ConversionStopped(f"stopped after converting {done} of {len(jobs)} layers") from e
                        raise OSError(f"a conversion process ended abruptly ({e}); if the out-of-memory killer took "
                                      f"it, convert with fewer processes (tierserve convert-experts --workers N; "
                                      f"{workers} were running)") from e
                    except BaseException:
                        pool.shutdown(cancel_futures=True)  # the layers not started yet would be wasted work
                        raise
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):  # taken since the check, or a quota
            raise _not_enough_space(path, nbytes, shutil.disk_usage(path.parent).free, e) from e
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a crash
    finally:
        os.close(dir_fd)
    _drop_converted_pages(model, layouts)


def _default_workers(data_nbytes: int, memory_floor: str = DEFAULT_MEMORY_FLOOR) -> int:
    """One conversion process per BYTES_PER_WORKER of the cache, no more than the CPUs this process may run on (a
    container's cpuset, taskset, a unit's CPUAffinity: not the machine's count) nor than fit in the memory available
    above `memory_floor`; one at least."""
    by_memory = room_above_floor(memory_floor)[0] // WORKER_NBYTES
    return max(1, min(len(os.sched_getaffinity(0)), -(-data_nbytes // BYTES_PER_WORKER), by_memory))


def _not_enough_space(path: Path, nbytes: int, free: int, failure: OSError | None = None) -> OSError:
    failed = f" (writing it failed: {failure.strerror})" if failure else ""
    return OSError(f"not enough disk space for the expert cache {path}: it needs {nbytes / 1e9:.2f} GB, "
                   f"{free / 1e9:.2f} GB free{failed}")


def _pwrite_all(fd: int, data: bytes | np.ndarray, offset: int) -> None:
    """pwrite every byte: a write may come back short (a signal, a disk filling up), and the bytes it left out
    would be a hole in the file, read back as zeros."""
    view = memoryview(data).cast("B")
    while view:
        n = os.pwrite(fd, view, offset)
        if n == 0:  # no progress, no error: do not spin
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view, offset = view[n:], offset + n


def _drop_converted_pages(model: GGUFModel, layouts: list[ExpertLayout]) -> None:
    """Converted experts are read from the cache from now on: unmap the model file's copies of them from this
    process and let the page cache drop the file, so RAM does not end up holding the experts twice. The whole
    file, because a large page-cache folio spans tensor boundaries and is dropped only whole; pages a process
    still maps (the trunk being loaded, a float layer being served) stay, and any other is read again if used."""
    for layer, layout in enumerate(layouts):
        if layout.format != "float":
            for kind in EXPERT_TENSOR_KINDS:
                raw = model.raw(expert_tensor_name(layer, kind))
                advise(raw.ctypes.data, raw.nbytes, mmap.MADV_DONTNEED)
    fd = os.open(model.path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _convert_layer(model: GGUFModel, fd: int, layer: int, layout: ExpertLayout, offset: int,
                   digests_offset: int) -> int:
    """Convert one layer's experts and write their regions at `offset` and their digests at `digests_offset`;
    returns the bytes of regions written."""
    shapes = tensor_shapes(model.config)
    region = torch.zeros(layout.region_nbytes, dtype=torch.uint8)
    digests = []
    for e in range(model.config.n_experts):
        weights = tuple(_convert_expert_matrix(model, layer, kind, e, shapes[expert_tensor_name(layer, kind)][1:], fmt)
                        for kind, fmt in zip(EXPERT_TENSOR_KINDS, layout.formats, strict=True))
        layout.fill(region, weights)  # type: ignore[arg-type]
        _pwrite_all(fd, region.numpy(), offset + e * layout.region_nbytes)
        digests.append(hashlib.sha256(region.numpy()).digest())
    _pwrite_all(fd, b"".join(digests), digests_offset)
    return model.config.n_experts * layout.region_nbytes


def _convert_expert_matrix(model: GGUFModel, layer: int, kind: str, expert: int, shape: tuple[int, int],
                           fmt: str) -> Matrix:
    """One expert's matrix in serving format `fmt`; ModelError if it stands for a value that is not finite (an inf
    or NaN block scale: int8 spreads it over the whole row, and every token routed to the expert comes out NaN).
    The served matrix's float tensors (int8's row scales, int4's scales and zeros) are all finite exactly when
    every value it stands for is, so they are what is checked."""
    name = expert_tensor_name(layer, kind)
    # One sequential copy of the stored bytes first: parsing blocks straight off the map touches every page
    # out of order, which reads a cold file several times slower than the kernel's readahead does.
    matrix = convert_matrix(np.array(model.expert_bytes(layer, kind, expert)), model.qtype(name), shape, fmt)
    if not all(bool(t.isfinite().all()) for t in matrix_tensors(matrix) if t.is_floating_point()):
        raise ModelError(f"{model.path}: tensor {name} holds NaN or infinite values in expert {expert} of layer "
                         f"{layer}")
    return matrix


# a pool process's own map of the model, or why it has none that is the parent's, and a handle on the output
_worker: tuple[GGUFModel | ModelError, int] | None = None


def _worker_init(model_path: str, opened: tuple[int, int, int, int], out_path: str, parent: int) -> None:
    global _worker
    # a converting process killed outright (a worker stopped by `up` past its drain) left its pool's processes
    # blocked for ever, each holding memory and the deleted temporary file
    die_with_parent(signal.SIGKILL)
    if os.getppid() != parent:  # it ended before the line above
        os._exit(1)
    # a stop is the parent's to act on, after the layers in progress: systemd's SIGTERM to every process of the unit,
    # or a terminal's Ctrl-C to the process group, killed these mid-layer and the parent took them for OOM-killed
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    torch.set_num_threads(1)  # the pool's processes are the parallelism
    # it reopens the path: another file renamed over it, or it rewritten, is not the model the parent serves. Said
    # by each conversion, not raised here, where it would break the pool and read as the out-of-memory killer's work
    replaced = f"{model_path}: the model file was replaced or changed while its expert cache was being built"
    try:
        model: GGUFModel | ModelError = GGUFModel(model_path)
        if model.opened != opened:
            model = ModelError(f"{replaced}; start again to serve the new one")
    except (ModelError, OSError) as e:
        model = ModelError(f"{replaced} ({e})")
    _worker = (model, os.open(out_path, os.O_WRONLY))


def _worker_convert(layer: int, layout: ExpertLayout, offset: int, digests_offset: int) -> int:
    assert _worker is not None, "pool process not initialised"
    model, fd = _worker
    if isinstance(model, ModelError):
        raise model
    return _convert_layer(model, fd, layer, layout, offset, digests_offset)


class _PrintProgress:
    """Prints layers converted and throughput to stderr every few seconds and at the end."""

    def __init__(self, every_s: float = 3.0) -> None:
        self.every_s, self.next_s = every_s, every_s

    def __call__(self, done: int, total: int, written: int, seconds: float) -> None:
        if seconds >= self.next_s or done == total:
            self.next_s = seconds + self.every_s
            rate = written / max(seconds, 1e-9) / 1e6
            print(f"expert cache: {done}/{total} layers converted, {written / 1e9:.2f} GB, {rate:.0f} MB/s",
                  file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tierserve convert-experts",
                                     description="Convert a model's quantized experts into the expert cache file "
                                                 "every tierserve process maps (done on first start otherwise).")
    parser.add_argument("model", help="GGUF model file")
    parser.add_argument("--cache-dir", help="where to write it (default: next to the model, else "
                                            "$XDG_CACHE_HOME/tierserve/experts)")
    parser.add_argument("--workers", type=positive_int, help=f"conversion processes (default: one per "
                                                    f"{BYTES_PER_WORKER >> 20} MiB of the cache, at most one per CPU "
                                                    f"this process may run on and as many as fit, "
                                                    f"{WORKER_NBYTES >> 20} MiB each, in the RAM free above "
                                                    f"--memory-floor)")
    parser.add_argument("--memory-floor", default=DEFAULT_MEMORY_FLOOR, metavar="SIZE",
                        help=f"RAM the conversion leaves free when it sizes its processes (without --workers), as "
                             f"host_memory_floor: a size or a %% of MemTotal (default {DEFAULT_MEMORY_FLOOR})")
    parser.add_argument("--verify", action="store_true", help="check every expert of an existing cache against "
                                                              "its digest, and rebuild the file if one differs")
    args = parser.parse_args(argv)
    try:
        parse_bytes_or_percent(args.memory_floor)
    except ValueError as e:
        parser.error(f"--memory-floor: {e}")
    try:
        model = GGUFModel(args.model)
        cache = ensure_expert_cache(model, args.cache_dir, args.workers, memory_floor=args.memory_floor)
        if cache is not None and args.verify and not cache.built:
            damaged = cache.verify(threads=len(os.sched_getaffinity(0)))
            if damaged:
                shown = ", ".join(f"layer {layer} expert {e}" for layer, e in damaged[:8])
                print(f"{cache.path}: {len(damaged)} experts do not match their digests ({shown}"
                      f"{', ...' if len(damaged) > 8 else ''}): rebuilding it", file=sys.stderr)
                cache.close()
                discard(cache.path)
                cache = ensure_expert_cache(model, args.cache_dir, args.workers, memory_floor=args.memory_floor)
            else:
                print(f"{cache.path}: every expert matches its digest")
    except (ModelError, OSError) as e:
        print(f"tierserve convert-experts: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, ModelError) else 1
    if cache is None:
        print(f"{args.model}: every expert tensor is float and is served from the model file; nothing to convert")
        return 0
    print(f"{cache.path}: {cache.nbytes} bytes ({'built' if cache.built else 'already up to date'}); "
          f"formats per layer: {', '.join(sorted(set(cache.formats)))}")
    cache.close()
    return 0
