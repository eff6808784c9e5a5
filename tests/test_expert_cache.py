"""The expert cache file and the expert source: layouts and their views, one build shared by every process,
rebuilds of bad files, and experts served zero-copy in every format."""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import re
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q

from shared import expert_cache
from shared.cli import main as tierserve
from shared.config import Config
from shared.expert_cache import (
    _PREFIX,
    WORKER_NBYTES,
    CacheError,
    ConversionStopped,
    ExpertLayout,
    _default_workers,
    content_hash,
    ensure_expert_cache,
    expert_layouts,
)
from shared.expert_source import ExpertSource, open_expert_source
from shared.gguf_file import GGUFModel
from shared.make_model import make_model
from shared.model_config import EXPERT_TENSOR_KINDS, ModelError, expert_tensor_name
from shared.quant import Int4Matrix, Int8Matrix, dequantize_matrix, int4_from_blocks, matrix_tensors
from tests.expert_host.test_migration import page_cache_droppable
from tests.expert_host.test_store import resident
from tests.test_quant import write_quantized

FORK = multiprocessing.get_context("fork")  # the children only convert a few small matrices single-threaded


def quiet(*_: object) -> None:
    """A progress callback that prints nothing."""


class Calls:
    """A progress callback that remembers it was called (i.e. that a build ran)."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int, int, float]] = []

    def __call__(self, *args) -> None:
        self.calls.append(args)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    paths = {}
    for dtype in ("q4_0", "q4_k", "q8_0", "q4_k_m", "f32"):
        d = tmp_path_factory.mktemp(dtype)
        make_model(d / f"small-{dtype}.gguf", preset="small", dtype=dtype, seed=1)
        paths[dtype] = d / f"small-{dtype}.gguf"
    return paths


# ---- layouts


@pytest.mark.parametrize("fmt", ["int4", "int8", "float"])
def test_layout_views_of_a_region_and_of_a_stack(fmt):
    shapes = [((128, 64), torch.bfloat16), ((128, 64), torch.bfloat16), ((64, 128), torch.bfloat16)]
    layout = ExpertLayout.build((fmt,) * 3, shapes)
    assert layout.region_nbytes % 4096 == 0
    for slots in layout.matrices:
        assert all(slot.offset % 64 == 0 for slot in slots)
    stack = torch.randint(0, 256, (3, layout.region_nbytes), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(0))
    stacked = layout.views(stack)
    for s in range(3):
        single = layout.views(stack[s])
        for (shape, _), m_single, m_stacked in zip(shapes, single, stacked, strict=True):
            assert m_single.shape[-2:] == shape and m_stacked.shape == (3, *shape)
            for t_single, t_stacked in zip(matrix_tensors(m_single), matrix_tensors(m_stacked), strict=True):
                assert t_stacked.stride(0) == layout.region_nbytes // t_stacked.element_size()
                assert t_single.data_ptr() == t_stacked[s].data_ptr()  # views, no copies
                assert torch.equal(t_single.view(torch.uint8), t_stacked[s].view(torch.uint8))
            torch.testing.assert_close(dequantize_matrix(m_stacked)[s], dequantize_matrix(m_single), rtol=0, atol=0,
                                       equal_nan=True)  # random bytes: some scales are NaN
    # filling a region writes exactly what the views read back
    region = torch.zeros(layout.region_nbytes, dtype=torch.uint8)
    layout.fill(region, layout.views(stack[1]))
    for a, b in zip(layout.views(region), layout.views(stack[1]), strict=True):
        assert all(torch.equal(x.view(torch.uint8), y.view(torch.uint8))
                   for x, y in zip(matrix_tensors(a), matrix_tensors(b), strict=True))
    assert ExpertLayout.from_json(layout.to_json()) == layout


def test_layout_views_on_any_device():
    layout = ExpertLayout.build(("int4",) * 3, [((64, 256), torch.float32)] * 3)
    gate, _, _ = layout.views(torch.empty(5, layout.region_nbytes, dtype=torch.uint8, device="meta"))
    assert isinstance(gate, Int4Matrix) and gate.packed.device.type == "meta"
    assert gate.packed.shape == (5, 64, 128) and gate.scale_zero.shape == (5, 8, 64, 2)
    with pytest.raises(ValueError, match="uint8"):
        layout.views(torch.empty(layout.region_nbytes + 1, dtype=torch.uint8))


def test_bits_per_weight_as_stored_and_as_served(models):
    """int4 from Q4_0 keeps the 4-bit codes and stores a bf16 scale and zero per 32 values: 5.0 bits per weight
    against Q4_0's 4.5 (one f16 scale per 32). int8 from Q8_0: 8 bits plus a bf16 scale per row (8.0625 for
    256-value rows) against Q8_0's 8.5."""
    for dtype, stored_bits, served_bits in (("q4_0", 4.5, 5.0), ("q4_k", 4.5, 5.0), ("q8_0", 8.5, 8 + 16 / 256)):
        model = GGUFModel(models[dtype])
        params = model.config.expert_params
        layout = expert_layouts(model)[0]
        assert model.expert_nbytes(0) * 8 / params == stored_bits
        assert layout.expert_nbytes * 8 / params == served_bits
        assert layout.region_nbytes == -(-layout.expert_nbytes // 4096) * 4096  # the 64-byte alignment fits


# ---- the file


def test_float_models_need_no_cache(models, tmp_path):
    assert ensure_expert_cache(GGUFModel(models["f32"]), tmp_path, progress=quiet) is None
    assert list(tmp_path.iterdir()) == []


def test_cache_is_built_once_next_to_the_model_then_reused(models):
    model = GGUFModel(models["q4_0"])
    first = Calls()
    cache = ensure_expert_cache(model, workers=1, progress=first)
    assert cache.built and first.calls[-1][:2] == (4, 4)
    assert cache.path.parent == models["q4_0"].parent
    assert cache.path.name == f"small-q4_0.{content_hash(models['q4_0'])[:16]}.experts"
    mtime = cache.path.stat().st_mtime_ns
    cache.close()
    again = Calls()
    cache = ensure_expert_cache(GGUFModel(models["q4_0"]), workers=1, progress=again)
    assert not cache.built and again.calls == [] and cache.path.stat().st_mtime_ns == mtime
    assert [p.name for p in cache.path.parent.iterdir() if ".tmp" in p.name] == []
    cache.close()


def test_the_same_content_under_another_name_maps_the_cache_it_has(models, tmp_path):
    """A model served through a symlink, or renamed, was converted again (minutes, and as much disk again) into a
    cache of its new name."""
    first = ensure_expert_cache(GGUFModel(models["q4_k"]), tmp_path, workers=1, progress=quiet)
    assert first.built
    link = tmp_path / "current.gguf"
    link.symlink_to(models["q4_k"])
    renamed = tmp_path / "renamed.gguf"
    os.link(models["q4_k"], renamed)
    for model in (link, renamed):
        built = Calls()
        cache = ensure_expert_cache(GGUFModel(model), tmp_path, workers=1, progress=built)
        assert not cache.built and built.calls == [] and cache.path == first.path
        cache.close()
    assert len(list(tmp_path.glob("*.experts"))) == 1
    first.close()
    # a symlink in another directory, its target's cache beside the target
    (tmp_path / "models").mkdir()
    target = tmp_path / "models" / "m.gguf"
    shutil.copy(models["q4_k"], target)
    beside = ensure_expert_cache(GGUFModel(target), workers=1, progress=quiet)
    (tmp_path / "serving").mkdir()
    (tmp_path / "serving" / "cur.gguf").symlink_to(target)
    cache = ensure_expert_cache(GGUFModel(tmp_path / "serving" / "cur.gguf"), workers=1, progress=quiet)
    assert not cache.built and cache.path == beside.path
    assert not list((tmp_path / "serving").glob("*.experts"))
    for c in (cache, beside):
        c.close()


def test_conversion_processes_are_no_more_than_the_cpus_this_process_may_run_on():
    """Sized from the machine's CPU count, a build inside a cpuset (a container, taskset, a unit's CPUAffinity)
    started a process per host CPU, each some 0.4 GB."""
    code = ("import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
            "from shared.expert_cache import _default_workers; print(_default_workers(1 << 40))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert run.stdout.strip() == "1"


def test_conversion_processes_leave_the_host_memory_floor_free(monkeypatch):
    """Sized from MemAvailable alone, they could take the memory the floor keeps for the system and the page cache."""
    assert _default_workers(1 << 40, "100%") == 1  # nothing above the floor: one process, the least a build needs
    floors = []
    monkeypatch.setattr(expert_cache, "room_above_floor", lambda floor: floors.append(floor) or (3 * WORKER_NBYTES, 0))
    assert _default_workers(1 << 40, "5GiB") == min(3, len(os.sched_getaffinity(0))) and floors == ["5GiB"]


def test_a_killed_builds_leftovers_are_removed(models, tmp_path):
    model = GGUFModel(models["q8_0"])
    name = f"small-q8_0.{content_hash(models['q8_0'])[:16]}.experts"
    (tmp_path / f"{name}.tmp999999").write_bytes(b"half a cache")
    cache = ensure_expert_cache(model, tmp_path, workers=1, progress=quiet)
    memo = next(tmp_path.glob("small-q8_0.*.source-hash")).name
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([name, f"{name}.lock", memo, f"{memo}.lock"])
    cache.close()


@pytest.mark.parametrize("workers", [1, 2], ids=["in-process", "conversion-processes"])
def test_a_build_told_to_stop_ends_with_its_layers_in_progress_and_keeps_nothing(models, tmp_path, workers):
    """A worker or host told to stop while it converted converted to the end first (28 s of a 4 GB model)."""
    model = GGUFModel(models["q8_0"])
    done: list[int] = []
    with pytest.raises(ConversionStopped, match=f"stopped after converting 1 of {model.config.n_layers} layers"):
        ensure_expert_cache(model, tmp_path, workers=workers, progress=lambda *p: done.append(p[0]),
                            stopping=lambda: bool(done))
    assert done == [1]
    assert not [p.name for p in tmp_path.iterdir() if ".experts" in p.name and not p.name.endswith(".lock")]
    cache = ensure_expert_cache(model, tmp_path, workers=1, progress=quiet)  # the next start converts it whole
    assert cache is not None and not cache.verify()
    cache.close()


def signal_dispositions() -> tuple[object, object]:
    """SIGTERM's and SIGINT's handlers in the calling process (run in a conversion process)."""
    return signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)


def test_conversion_processes_leave_a_stop_to_the_process_that_started_them(models, tmp_path):
    """systemd's SIGTERM goes to every process of a unit, a terminal's Ctrl-C to the process group: the conversion
    processes died mid-layer and the worker, taking them for OOM-killed, failed to start rather than stop."""
    out = tmp_path / "cache.tmp"
    out.write_bytes(b"")
    spawn = multiprocessing.get_context("spawn")  # as _build starts them
    initargs = (str(models["q8_0"]), GGUFModel(models["q8_0"]).opened, str(out), os.getpid())
    with spawn.Pool(1, initializer=expert_cache._worker_init, initargs=initargs) as pool:
        assert pool.apply(signal_dispositions) == (signal.SIG_IGN, signal.SIG_IGN)


@pytest.mark.parametrize("replaced_by", ["another model", "nothing"])
def test_a_conversion_process_that_reopens_another_file_than_its_parents_converts_nothing(models, tmp_path,
                                                                                          replaced_by):
    """Conversion processes reopen the model's path: a file renamed over it after the parent opened its own is
    another model, whose experts would go into the parent's cache; one removed (a download's rm, then mv) broke
    the pool, and the build blamed the out-of-memory killer."""
    path, out = tmp_path / "m.gguf", tmp_path / "cache.tmp"
    path.write_bytes(models["q8_0"].read_bytes())
    parents = GGUFModel(path)
    path.unlink()
    if replaced_by == "another model":
        path.write_bytes(models["q4_0"].read_bytes())
    out.write_bytes(b"")
    layout = expert_cache.expert_layouts(parents)[0]
    with multiprocessing.get_context("spawn").Pool(
            1, initializer=expert_cache._worker_init, initargs=(str(path), parents.opened, str(out), os.getpid())
    ) as pool, pytest.raises(ModelError, match="the model file was replaced or changed while its expert cache"):
        pool.apply(expert_cache._worker_convert, (0, layout, 0, 0))
    assert out.stat().st_size == 0


def test_a_process_told_to_stop_before_it_builds_does_not_start(models, tmp_path):
    """One that waited on the build lock while another built, both told to stop, began a build of its own."""
    with pytest.raises(ConversionStopped, match="stopped before converting"):
        ensure_expert_cache(GGUFModel(models["q8_0"]), tmp_path, workers=1, progress=quiet, stopping=lambda: True)
    assert not [p.name for p in tmp_path.iterdir() if ".experts" in p.name and not p.name.endswith(".lock")]


def test_config_cache_dir_is_where_the_cache_goes(models, tmp_path):
    source = open_expert_source(GGUFModel(models["q8_0"]), Config(expert_cache_dir=str(tmp_path / "cache")))
    assert source.cache is not None and source.cache.path.parent == tmp_path / "cache"
    assert source.format(0) == "int8"
    source.close()


@pytest.mark.parametrize("damage", ["truncated", "bad magic", "other model", "empty", "older version",
                                    "size not a number"])
def test_a_bad_cache_file_is_rebuilt(models, tmp_path, damage, capsys):
    model = GGUFModel(models["q4_k"])
    good = ensure_expert_cache(model, tmp_path, workers=1, progress=quiet)
    path, original = good.path, good.path.read_bytes()
    good.close()
    if damage == "truncated":
        path.write_bytes(original[:-4096])
    elif damage == "bad magic":
        path.write_bytes(b"X" + original[1:])
    elif damage == "older version":  # version 2 kept no digests
        path.write_bytes(original[:8] + struct.pack("<I", 2) + original[12:])
    elif damage == "size not a number":  # compared with the file's size, "12" raised a bare TypeError
        magic, version, length = _PREFIX.unpack(original[: _PREFIX.size])
        header = json.loads(original[_PREFIX.size : _PREFIX.size + length])
        header["data_nbytes"] = str(header["data_nbytes"])
        text = json.dumps(header).encode()
        path.write_bytes(_PREFIX.pack(magic, version, len(text)) + text + original[_PREFIX.size + length :])
    elif damage == "other model":  # a valid cache of another model under this one's name
        other = ensure_expert_cache(GGUFModel(models["q4_0"]), tmp_path / "other", workers=1, progress=quiet)
        path.write_bytes(other.path.read_bytes())
        other.close()
    else:
        path.write_bytes(b"")
    capsys.readouterr()
    cache = ensure_expert_cache(model, tmp_path, workers=1, progress=quiet)
    assert cache.built and cache.path == path and path.read_bytes() == original
    reasons = {"truncated": "bytes, its header says", "bad magic": "bad magic number",
               "other model": "another model", "empty": "shorter than its header",
               "older version": "format version 2, this is version 4", "size not a number": "data_nbytes '"}
    assert reasons[damage] in capsys.readouterr().err
    cache.close()


def cache_files(directory) -> list[str]:
    """The expert cache files (finished or being written) in a directory, without their lock files."""
    return sorted(p.name for p in directory.iterdir() if ".experts" in p.name and not p.name.endswith(".lock"))


def test_short_writes_are_written_to_the_end(models, tmp_path, monkeypatch):
    """A write may come back short (a signal, a disk filling up for a moment): the rest is written too. A short
    write taken as done left a hole in the file, read back as zeros (or a SIGBUS on tmpfs) by every start, since
    the file passed every check."""
    write = os.pwrite
    monkeypatch.setattr(os, "pwrite", lambda fd, data, offset: write(fd, memoryview(data).cast("B")[:65536], offset))
    cache = ensure_expert_cache(GGUFModel(models["q8_0"]), tmp_path / "short", workers=1, progress=quiet)
    monkeypatch.undo()
    whole = ensure_expert_cache(GGUFModel(models["q8_0"]), tmp_path / "whole", workers=1, progress=quiet)
    assert cache.verify() == [] and cache.path.read_bytes() == whole.path.read_bytes()
    cache.close()
    whole.close()


def test_a_disk_that_fills_up_during_the_build_fails_it_and_leaves_no_file(models, tmp_path, monkeypatch):
    """Another writer (or a quota) takes the space after the free-space check: a write comes back short, the next
    one fails. The build fails with the same clear error as the check's, and leaves no file behind."""
    room = [3 << 20]  # bytes the disk has left
    write = os.pwrite

    def filling_disk(fd: int, data, offset: int) -> int:
        data = memoryview(data).cast("B")
        if room[0] == 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        n = write(fd, data[: room[0]], offset)
        room[0] -= n
        return n

    monkeypatch.setattr(os, "pwrite", filling_disk)
    with pytest.raises(OSError, match=f"not enough disk space for the expert cache {tmp_path}/.*No space left"):
        ensure_expert_cache(GGUFModel(models["q8_0"]), tmp_path, workers=1, progress=quiet)
    assert room[0] == 0 and cache_files(tmp_path) == []


def test_a_build_reserves_its_disk_space_first(models, tmp_path, monkeypatch):
    """The file's blocks are allocated before anything is written (a sparse file would fill up, or fail with a
    SIGBUS on tmpfs, only when its pages are written or read): no room for them is a clear error at once."""
    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(OSError, match=f"not enough disk space for the expert cache {tmp_path}/small-q8_0.*: it needs "
                                      r"0\.\d+ GB, \d+\.\d+ GB free \(writing it failed: No space left on device\)"):
        ensure_expert_cache(GGUFModel(models["q8_0"]), tmp_path, workers=1, progress=quiet)
    assert cache_files(tmp_path) == []


def rewrite_header(path: os.PathLike, version: int, **changes) -> None:
    """Give a cache file another version number and header keys (a key set to None is left out)."""
    data = open(path, "rb").read()
    magic, _, length = _PREFIX.unpack(data[: _PREFIX.size])
    header = json.loads(data[_PREFIX.size : _PREFIX.size + length]) | changes
    text = json.dumps({key: value for key, value in header.items() if value is not None}).encode()
    assert len(text) <= length  # the data stays on the page it starts on
    text += b" " * (length - len(text))
    open(path, "wb").write(_PREFIX.pack(magic, version, length) + text + data[_PREFIX.size + length :])


def two_models_of_one_name(models, tmp_path) -> tuple:
    """a/m.gguf (the q8_0 model) and b/m.gguf (the q4_0 one) under tmp_path."""
    paths = []
    for directory, dtype in (("a", "q8_0"), ("b", "q4_0")):
        (tmp_path / directory).mkdir()
        paths.append(tmp_path / directory / "m.gguf")
        paths[-1].write_bytes(models[dtype].read_bytes())
    return tuple(paths)


def test_a_changed_model_files_earlier_caches_are_removed_and_no_other(models, tmp_path, capsys):
    """Each content of a model file gets a cache of its own name: the earlier ones, tens to hundreds of GB each,
    were left behind for good. They are removed once the new one is built, in every directory the cache is
    looked for in, and only they: another model of the same file name sharing the directory keeps its cache, and
    so does a file of an older version, which does not record the model it was built from. A process that maps a
    removed file goes on reading it."""
    cache_dir, a, b = tmp_path / "cache", *two_models_of_one_name(models, tmp_path)
    running = ensure_expert_cache(GGUFModel(a), cache_dir, workers=1, progress=quiet)
    beside = ensure_expert_cache(GGUFModel(a), workers=1, progress=quiet)  # next to the model, the default
    other_model = ensure_expert_cache(GGUFModel(b), cache_dir, workers=1, progress=quiet)
    unrecorded = cache_dir / "m.0123456789abcdef.experts"  # as version 3 wrote it: no record of the model file
    unrecorded.write_bytes(running.path.read_bytes())
    rewrite_header(unrecorded, 3, built_from=None)
    bystanders = sorted([other_model.path.name, unrecorded.name])
    assert cache_files(cache_dir) == sorted([running.path.name, *bystanders])

    a.write_bytes(models["q4_k"].read_bytes())  # a new version of the model, under the same path
    capsys.readouterr()
    rebuilt = ensure_expert_cache(GGUFModel(a), cache_dir, workers=1, progress=quiet)
    assert rebuilt.built
    assert cache_files(cache_dir) == sorted([rebuilt.path.name, *bystanders])
    assert cache_files(a.parent) == []
    err = capsys.readouterr().err
    for old in (running, beside):
        assert f"removed {old.path} ({old.nbytes / 1e9:.2f} GB), built from an earlier content of {a}" in err
    assert running.verify() == [] and running.weights(0, 0)[0].q.abs().max() > 0  # still mapped, still whole
    for cache in (running, beside, other_model, rebuilt):
        cache.close()


def test_an_earlier_content_cache_made_through_a_link_of_another_name_is_removed(models, tmp_path, capsys):
    """A cache is named after the path a model was opened by: one built through a link of another name was left
    behind once the file was rewritten, since only caches of the file's own name were looked at."""
    cache_dir, model = tmp_path / "cache", tmp_path / "m.gguf"
    shutil.copy(models["q8_0"], model)
    (tmp_path / "alias.gguf").symlink_to(model)
    through_link = ensure_expert_cache(GGUFModel(tmp_path / "alias.gguf"), cache_dir, workers=1, progress=quiet)
    assert through_link.path.name.startswith("alias.")
    model.write_bytes(models["q4_k"].read_bytes())  # rewritten in place: the same file, another content
    capsys.readouterr()
    rebuilt = ensure_expert_cache(GGUFModel(model), cache_dir, workers=1, progress=quiet)
    assert cache_files(cache_dir) == [rebuilt.path.name]
    assert f"removed {through_link.path} " in capsys.readouterr().err
    for cache in (through_link, rebuilt):
        cache.close()


def test_the_current_contents_cache_under_another_name_is_kept(models, tmp_path, capsys):
    """The same content's cache built again under another name (through a link, into another cache directory) was
    taken for one of an earlier content and removed, rebuilt by the next start, and lost to a host that held it."""
    model = tmp_path / "m.gguf"
    shutil.copy(models["q8_0"], model)
    (tmp_path / "alias.gguf").symlink_to(model)
    beside = ensure_expert_cache(GGUFModel(model), workers=1, progress=quiet)
    capsys.readouterr()
    elsewhere = ensure_expert_cache(GGUFModel(tmp_path / "alias.gguf"), tmp_path / "cache", workers=1, progress=quiet)
    assert elsewhere.built and "removed" not in capsys.readouterr().err
    assert cache_files(tmp_path) == [beside.path.name]
    again = ensure_expert_cache(GGUFModel(model), workers=1, progress=quiet)
    assert not again.built and again.path == beside.path
    for cache in (beside, elsewhere, again):
        cache.close()


def test_a_content_hash_that_cannot_be_remembered_is_used_all_the_same(models, tmp_path, capsys):
    """Remembering the hash is what fails on a full disk, where the cache already built needs no room: the start
    failed with the bare OSError and left the memo's temporary file behind."""
    path = tmp_path / "m.gguf"
    path.write_bytes(models["q8_0"].read_bytes())
    built = ensure_expert_cache(GGUFModel(path), workers=1, progress=quiet)
    (memo,) = tmp_path.glob("m.*.source-hash")
    memo.unlink()
    memo.mkdir()  # a memo that cannot be written, as on a full disk
    capsys.readouterr()
    again = ensure_expert_cache(GGUFModel(path), workers=1, progress=quiet)
    assert not again.built and again.path == built.path
    assert f"could not remember the model's content hash in {memo}" in capsys.readouterr().err
    assert list(tmp_path.glob("m.*.source-hash.tmp*")) == []
    for cache in (built, again):
        cache.close()


def test_a_cache_of_the_version_before_serves_on_without_a_rebuild(models, tmp_path):
    """Version 3 differs only in not recording the model file it was built from: rebuilt on upgrade, a disk sized
    for the model and one cache had no room for the second copy a rebuild writes before the rename."""
    model = GGUFModel(models["q4_k"])
    cache = ensure_expert_cache(model, tmp_path, workers=1, progress=quiet)
    cache.close()
    rewrite_header(cache.path, 3, built_from=None)
    before = cache.path.read_bytes()
    again = ensure_expert_cache(model, tmp_path, workers=1, progress=quiet)
    assert not again.built and again.path.read_bytes() == before
    again.close()


def test_caches_of_a_model_file_replaced_or_changed_during_the_build_are_not_removed(models, tmp_path, capsys):
    """Only the caches of this very file's earlier contents go. A new version renamed over the path is another
    file, as another container's model at the same path on a shared cache directory is: its caches stay. And a
    build whose model file changed meanwhile removes nothing: here a second start built the new content's cache
    while the first finished the content before, which it took for the file's, and removed it after."""
    a = tmp_path / "m.gguf"
    a.write_bytes(models["q8_0"].read_bytes())
    first = ensure_expert_cache(GGUFModel(a), tmp_path, workers=1, progress=quiet)
    replacement = tmp_path / "new.tmp"
    replacement.write_bytes(models["q4_0"].read_bytes())
    os.replace(replacement, a)
    second = ensure_expert_cache(GGUFModel(a), tmp_path, workers=1, progress=quiet)
    assert second.built and cache_files(tmp_path) == sorted([first.path.name, second.path.name])
    first.close()
    first.path.unlink()

    a.write_bytes(models["q8_0"].read_bytes())  # in place: the same file as second's
    model = GGUFModel(a)
    nested: list = []

    def a_second_start_meanwhile(layers_done: int, layers: int, *_) -> None:
        if layers_done == layers:  # every layer converted: what follows no longer reads the model
            a.write_bytes(models["q4_k"].read_bytes())
            nested.append(ensure_expert_cache(GGUFModel(a), tmp_path, workers=1, progress=quiet))

    rebuilt = ensure_expert_cache(model, tmp_path, workers=1, progress=a_second_start_meanwhile)
    assert rebuilt.built and nested and nested[0].built
    # the second start removed q4_0's cache, this file's earlier content; the first, q8_0's build, none
    assert cache_files(tmp_path) == sorted([rebuilt.path.name, nested[0].path.name])
    assert capsys.readouterr().err.count("removed") == 1
    for cache in (second, rebuilt, *nested):
        cache.close()


def test_a_model_file_replaced_after_it_was_opened_gets_no_cache(models, tmp_path, monkeypatch):
    """The cache is found by the content hash of the model's path and converted from what the path names: a model
    renamed over it (a download finishing) after this process opened the old one, before or while it was hashed,
    gave the process the new model's experts under its old trunk, or a cache of the new experts labelled with the
    old content's hash. Now that is refused by name, and nothing is built."""
    a = tmp_path / "m.gguf"
    a.write_bytes(models["q8_0"].read_bytes())

    def replaced() -> None:
        replacement = tmp_path / "new.tmp"
        replacement.write_bytes(models["q4_0"].read_bytes())
        os.replace(replacement, a)

    opened = GGUFModel(a)
    replaced()
    with pytest.raises(ModelError, match="the model file was replaced or changed after this process opened it"):
        ensure_expert_cache(opened, tmp_path, workers=1, progress=quiet)

    a.write_bytes(models["q8_0"].read_bytes())
    opened = GGUFModel(a)
    hash_of = expert_cache.content_hash

    def hashed_as_it_is_replaced(path):
        replaced()
        return hash_of(path)

    monkeypatch.setattr(expert_cache, "content_hash", hashed_as_it_is_replaced)
    with pytest.raises(ModelError, match="the model file was replaced or changed after this process opened it"):
        ensure_expert_cache(opened, tmp_path, workers=1, progress=quiet)
    assert cache_files(tmp_path) == []


BLOCK_SCALE_AT = {Q.Q8_0: 0, Q.Q4_K: 0, Q.Q6_K: 208}  # where a block's f16 scale d lies in its bytes


@pytest.mark.parametrize("dtype, layer, kind, value", [("q8_0", 1, "ffn_up_exps", np.inf),  # int8
                                                       ("q4_k", 3, "ffn_gate_exps", np.nan),  # int4
                                                       ("q4_k_m", 2, "ffn_down_exps", -np.inf)])  # Q6_K to int8
def test_an_expert_with_a_non_finite_block_scale_fails_the_build_naming_it(models, tmp_path, dtype, layer, kind,
                                                                          value, capsys):
    """One block's f16 scale inf or NaN: its values are not numbers, int8 spread them over the whole row (scale
    NaN), and every token routed to the expert came out NaN, from a build that said "built"."""
    path = tmp_path / "m.gguf"
    path.write_bytes(models[dtype].read_bytes())
    model = GGUFModel(path)
    name = expert_tensor_name(layer, kind)
    rows = model.expert_bytes(layer, kind, 5)
    block_bytes = GGML_QUANT_SIZES[model.qtype(name)][1]
    offset = (model.file_offset(name) + rows.ctypes.data - model.raw(name).ctypes.data + 7 * rows.shape[1]
              + block_bytes + BLOCK_SCALE_AT[model.qtype(name)])  # row 7's second block
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(np.array([value], dtype=np.float16).tobytes())
    with pytest.raises(ModelError, match=f"{path}: tensor {re.escape(name)} holds NaN or infinite values in expert "
                                         f"5 of layer {layer}"):
        ensure_expert_cache(GGUFModel(path), tmp_path / "cache", workers=1, progress=quiet)
    assert cache_files(tmp_path / "cache") == []
    assert tierserve(["convert-experts", str(path), "--cache-dir", str(tmp_path / "cache"), "--workers", "1"]) == 2
    assert f"tensor {name} holds NaN or infinite values in expert 5" in capsys.readouterr().err
    assert cache_files(tmp_path / "cache") == []


def _build_in_child(path: str, directory: str, barrier, results) -> None:
    barrier.wait()
    cache = ensure_expert_cache(GGUFModel(path), directory, workers=1, progress=quiet)
    results.put((cache.built, str(cache.path), os.stat(cache.path).st_ino))


def test_processes_starting_together_build_it_once(models, tmp_path):
    barrier, results = FORK.Barrier(2), FORK.Queue()
    children = [FORK.Process(target=_build_in_child, args=(str(models["q4_0"]), str(tmp_path), barrier, results))
                for _ in range(2)]
    for child in children:
        child.start()
    outcomes = [results.get(timeout=60) for _ in children]
    for child in children:
        child.join(10)
        assert child.exitcode == 0
    assert sorted(built for built, _, _ in outcomes) == [False, True]
    assert len({(path, inode) for _, path, inode in outcomes}) == 1
    assert sorted(p.name.rsplit(".", 1)[-1] for p in tmp_path.iterdir()) == ["experts", "lock", "lock",
                                                                             "source-hash"]


@pytest.mark.slow
def test_a_process_pool_writes_the_same_file(models, tmp_path):
    """Layers converted by spawned pool processes, each writing its own regions, give the bytes one process does."""
    model = GGUFModel(models["q4_k"])
    one = ensure_expert_cache(model, tmp_path / "one", workers=1, progress=quiet)
    pool = ensure_expert_cache(model, tmp_path / "pool", workers=2, progress=quiet)
    assert pool.built and pool.path.read_bytes() == one.path.read_bytes()
    one.close()
    pool.close()


def test_convert_experts_command(models, tmp_path, capsys):
    assert tierserve(["convert-experts", str(models["q8_0"]), "--cache-dir", str(tmp_path), "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert str(tmp_path) in out and "built" in out and "int8" in out
    assert tierserve(["convert-experts", str(models["f32"])]) == 0
    assert "nothing to convert" in capsys.readouterr().out


def test_convert_experts_sizes_its_processes_above_the_memory_floor_given(models, tmp_path, capsys, monkeypatch):
    """Run by hand it took the default floor, with no way to leave more RAM free on a machine serving already."""
    floors = []
    monkeypatch.setattr(expert_cache, "room_above_floor", lambda floor: floors.append(floor) or (WORKER_NBYTES, 0))
    assert tierserve(["convert-experts", str(models["q4_0"]), "--cache-dir", str(tmp_path),
                      "--memory-floor", "30%"]) == 0
    assert floors == ["30%"] and "built" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        tierserve(["convert-experts", str(models["q4_0"]), "--memory-floor", "2XB"])
    assert exit_.value.code == 2 and "--memory-floor: not a size: '2XB'" in capsys.readouterr().err


@pytest.mark.parametrize("workers", ["0", "-3"])
def test_convert_experts_refuses_fewer_than_one_process(models, capsys, workers):
    """0 or -3 ran one process, saying nothing, where 0 reads as "the default\"."""
    with pytest.raises(SystemExit) as exit_:
        tierserve(["convert-experts", str(models["q4_0"]), "--workers", workers])
    assert exit_.value.code == 2 and f"argument --workers: must be 1 or more, not {workers}" in capsys.readouterr().err


# ---- the expert source


def test_cached_experts_are_zero_copy_views_of_the_cache_file(models, tmp_path):
    model = GGUFModel(models["q4_0"])
    cache = ensure_expert_cache(model, tmp_path, workers=1, progress=quiet)
    source = ExpertSource(model, cache)
    gate, up, down = source.weights(2, 5)
    region = cache.region(2, 5)
    assert isinstance(gate, Int4Matrix) and gate.packed.data_ptr() == region.ctypes.data
    assert not region.flags.writeable
    expected = int4_from_blocks(model.expert_bytes(2, "ffn_down_exps", 5), Q.Q4_0, (256, 256))
    assert torch.equal(down.packed, expected.packed) and torch.equal(down.scale_zero, expected.scale_zero)
    assert torch.equal(dequantize_matrix(up), dequantize_matrix(int4_from_blocks(
        model.expert_bytes(2, "ffn_up_exps", 5), Q.Q4_0, (256, 256))))
    assert source.expert_nbytes(2) == source.layout(2).expert_nbytes
    source.close()


@pytest.mark.parametrize("dtype", ["q8_0", "f32"])
def test_fill_region_fills_a_region_that_reads_as_the_served_expert(models, tmp_path, dtype):
    """What pinned arenas and VRAM slots do: fill a region with an expert, read it through the layout."""
    model = GGUFModel(models[dtype])
    source = ExpertSource(model, ensure_expert_cache(model, tmp_path, workers=1, progress=quiet))
    layout = source.layout(1)
    region = torch.zeros(layout.region_nbytes, dtype=torch.uint8)
    copied = source.fill_region(1, 7, region)
    for got, served in zip(layout.views(region), source.weights(1, 7), strict=True):
        assert type(got) is type(served)
        assert all(torch.equal(a, b) for a, b in zip(matrix_tensors(got), matrix_tensors(served), strict=True))
    if dtype == "f32":
        assert source.cache is None and layout.format == "float"
        assert copied == layout.expert_nbytes  # the matrices' bytes, without the region's padding
        gate = source.weights(1, 7)[0]
        assert gate.data_ptr() == model.expert_bytes(1, "ffn_gate_exps", 7).ctypes.data
    else:
        assert isinstance(source.weights(1, 7)[0], Int8Matrix)
        assert copied == layout.region_nbytes  # the cache's region, padding and all, in one copy


def test_layers_and_matrices_in_different_formats(tmp_path):
    """Layer 0 stored as F32 (served from the model file), layer 1 as Q4_K (int4 from the cache), layer 2 as Q8_0
    (int8), layer 3 as Q4_K_M files mix them (Q4_0 gate and up, Q8_0 down: int4 beside int8), layer 4 with an F32
    gate beside Q4_0 up and down (gate and up int8, in one format as the kernels read them, so the whole region is
    in the cache): the cache holds only the quantized layers, each matrix at its own format's size."""
    model = write_quantized(tmp_path / "mixed.gguf", {0: Q.F32, 1: Q.Q4_K, 2: Q.Q8_0, 3: (Q.Q4_0, Q.Q4_0, Q.Q8_0),
                                                      4: (Q.F32, Q.Q4_0, Q.Q4_0)})
    cache = ensure_expert_cache(model, tmp_path, workers=1, progress=quiet)
    source = ExpertSource(model, cache)
    assert [source.format(layer) for layer in range(5)] == ["float", "int4", "int8", "int4+int8", "int8+int4"]
    assert source.layout(3).formats == ("int4", "int4", "int8") and source.layout(4).formats == ("int8", "int8", "int4")
    n = model.config.expert_ffn * model.config.hidden
    int4, int8 = n // 2 + n // 32 * 4, n + model.config.hidden * 2  # codes and (scale, zero) per 32 / scale per row
    assert source.expert_nbytes(3) == 2 * int4 + int8 < source.expert_nbytes(2)
    assert type(source.weights(3, 0)[0]) is Int4Matrix and type(source.weights(3, 0)[2]) is Int8Matrix
    regions = sum(source.layout(layer).region_nbytes for layer in (1, 2, 3, 4)) * model.config.n_experts
    assert regions < cache.nbytes <= regions + 2 * 4096  # plus the header's page(s)
    with pytest.raises(KeyError, match="float"):
        cache.region(0, 0)
    for layer in range(5):
        for kind, m in zip(EXPERT_TENSOR_KINDS, source.weights(layer, 1), strict=True):
            reference = model.expert(layer, kind, 1)
            assert (dequantize_matrix(m) - reference).abs().max() <= 0.01 * reference.abs().max()
    with pytest.raises(ValueError, match="expert cache"):
        ExpertSource(model, None)
    source.close()


def test_the_content_hash_is_remembered_while_the_model_file_is_unchanged(models, tmp_path):
    path = tmp_path / "m.gguf"
    path.write_bytes(models["q8_0"].read_bytes())
    ensure_expert_cache(GGUFModel(path), workers=1, progress=quiet).close()
    (memo,) = tmp_path.glob("m.*.source-hash")
    identity, digest = memo.read_text().split()
    assert digest == content_hash(path)
    os.utime(path, ns=(0, 0))  # same bytes, another mtime: hashed again, same cache reused
    killed_writer = memo.with_name(f"{memo.name}.tmp4242")  # what a process killed while writing the memo leaves
    killed_writer.write_text("half")
    again = ensure_expert_cache(GGUFModel(path), workers=1, progress=quiet)
    assert not again.built and memo.read_text().split() == [identity.rsplit(":", 1)[0] + ":0", digest]
    assert not killed_writer.exists()
    again.close()


def test_models_of_one_name_sharing_a_cache_directory_keep_their_own_remembered_hash(models, tmp_path,
                                                                                     monkeypatch):
    """The memo was named after the model's file name alone: two models of one name sharing a cache directory
    overwrote each other's, and every start hashed its whole file (up to hundreds of GB) again. Whether a start
    used its memo shows in the one thing the memo decides: a model rewritten in place with its size and mtime
    kept is taken as unchanged (the memo's identity, as git and ccache judge a file)."""
    cache_dir, a, b = tmp_path / "cache", *two_models_of_one_name(models, tmp_path)
    first = ensure_expert_cache(GGUFModel(a), cache_dir, workers=1, progress=quiet)
    first.close()
    ensure_expert_cache(GGUFModel(b), cache_dir, workers=1, progress=quiet).close()
    st = a.stat()
    flip_a_byte(a, GGUFModel(a).file_offset("blk.1.ffn_up_exps.weight") + 10)  # a code of an expert's block
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns))
    monkeypatch.setattr(expert_cache, "_HASHES", {})  # as a new process: no hash remembered in memory
    again = ensure_expert_cache(GGUFModel(a), cache_dir, workers=1, progress=quiet)
    assert not again.built and again.path == first.path
    again.close()


def test_a_build_leaves_the_converted_experts_out_of_the_page_cache(models, tmp_path):
    if not page_cache_droppable(tmp_path):
        pytest.skip("this file system keeps files in memory (tmpfs?): its pages cannot be dropped")
    path = tmp_path / "m.gguf"
    path.write_bytes(models["q4_0"].read_bytes())
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)  # only clean pages can be dropped, as a model file's long since are
    os.close(fd)
    model = GGUFModel(path)
    experts = [torch.from_numpy(np.asarray(model.raw(f"blk.{layer}.{kind}.weight")).view(np.uint8))
               for layer in range(model.config.n_layers) for kind in EXPERT_TENSOR_KINDS]
    assert resident(experts) > 0.9
    cache = ensure_expert_cache(model, workers=1, progress=quiet)
    cache.close()
    assert resident(experts) < 0.1


def test_a_model_hashed_again_leaves_its_experts_out_of_the_page_cache(models, tmp_path, monkeypatch):
    """A model file touched or copied is hashed again at the next start, reading all of it: with its cache already
    built, nothing dropped the model's pages after, and RAM held the experts twice (the page cache's copy)."""
    if not page_cache_droppable(tmp_path):
        pytest.skip("this file system keeps files in memory (tmpfs?): its pages cannot be dropped")
    path = tmp_path / "m.gguf"
    path.write_bytes(models["q4_0"].read_bytes())
    ensure_expert_cache(GGUFModel(path), workers=1, progress=quiet).close()
    path.read_bytes()  # back in the page cache
    os.utime(path, ns=(0, 0))  # the hash remembered is of another mtime
    monkeypatch.setattr(expert_cache, "_HASHES", {})  # as a new process
    model = GGUFModel(path)
    experts = [torch.from_numpy(np.asarray(model.raw(f"blk.{layer}.{kind}.weight")).view(np.uint8))
               for layer in range(model.config.n_layers) for kind in EXPERT_TENSOR_KINDS]
    assert resident(experts) > 0.9
    cache = ensure_expert_cache(model, workers=1, progress=quiet)
    assert not cache.built and resident(experts) < 0.1
    cache.close()


def flip_a_byte(cache_path: os.PathLike, offset: int) -> None:
    with open(cache_path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x10]))


def test_a_damaged_expert_is_found_by_its_digest_and_verify_rebuilds_the_file(models, tmp_path, capsys):
    """A bit flipped on the disk or in the page cache would be served for as long as the file is used: each
    region's digest, written with it, names the expert, and `convert-experts --verify` builds the file anew."""
    path = tmp_path / "m.gguf"
    path.write_bytes(models["q4_0"].read_bytes())
    cache = ensure_expert_cache(GGUFModel(path), workers=1, progress=quiet)
    assert cache.verify(threads=2) == []
    flip_a_byte(cache.path, cache.file_offset(2, 5) + 100)
    assert cache.verify(threads=2) == [(2, 5)]
    assert cache.damaged(2, [4, 5, 6]) == [5]
    cache.close()

    assert tierserve(["convert-experts", str(path), "--verify", "--workers", "1"]) == 0
    out, err = capsys.readouterr()
    assert "1 experts do not match their digests (layer 2 expert 5): rebuilding it" in err
    rebuilt = ensure_expert_cache(GGUFModel(path), workers=1, progress=quiet)
    assert rebuilt.verify() == []
    rebuilt.close()
    assert tierserve(["convert-experts", str(path), "--verify"]) == 0
    assert "every expert matches its digest" in capsys.readouterr().out


@pytest.mark.parametrize("where", ["expert_cache_dir", "next to the model"])
def test_a_damaged_experts_error_names_the_command_that_rebuilds_that_file(models, tmp_path, where, capsys):
    """The command the error suggests must rebuild the damaged file itself: without the cache's directory, one in
    an expert_cache_dir was left as it was while the command built another next to the model and said "built"."""
    path = tmp_path / "model" / "m.gguf"
    path.parent.mkdir()
    path.write_bytes(models["q8_0"].read_bytes())
    cache_dir = str(tmp_path / "cache") if where == "expert_cache_dir" else ""
    source = open_expert_source(GGUFModel(path), Config(expert_cache_dir=cache_dir))
    damaged = source.cache.path
    flip_a_byte(damaged, source.cache.file_offset(1, 3) + 100)
    with pytest.raises(CacheError, match=r"layer 1 experts \[3\] do not match their digests") as error:
        source.check_digests(1, [3])
    source.close()
    command = shlex.split(re.search(r"rebuild it with `([^`]*)`", str(error.value))[1])
    assert command[:2] == ["tierserve", "convert-experts"]
    assert tierserve(command[1:] + ["--workers", "1"]) == 0
    rebuilt = ensure_expert_cache(GGUFModel(path), cache_dir or None, workers=1, progress=quiet)
    assert not rebuilt.built and rebuilt.path == damaged and rebuilt.verify() == []
    assert cache_files(path.parent) == ([] if cache_dir else [damaged.name])
    assert "rebuilding it" in capsys.readouterr().err
    assert ("--cache-dir" in command) == bool(cache_dir)  # the default directory goes without saying
    rebuilt.close()


def test_a_damaged_cache_in_a_read_only_directory_is_named_with_what_to_do(models, tmp_path):
    """--verify finds a damaged expert in a cache it cannot remove: it says which file and what to do, not a bare
    "Read-only file system" about a lock file."""
    path, read_only = tmp_path / "m.gguf", tmp_path / "read-only"
    path.write_bytes(models["q8_0"].read_bytes())
    cache = ensure_expert_cache(GGUFModel(path), read_only, workers=1, progress=quiet)
    flip_a_byte(cache.path, cache.file_offset(2, 5) + 100)
    cache.close()
    if subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode != 0:
        pytest.skip("no user namespaces to mount a read-only directory in")
    script = 'mount --bind "$1" "$1" && mount -o remount,ro,bind "$1" && shift && exec "$@"'
    done = subprocess.run(["unshare", "-rm", "sh", "-c", script, "sh", str(read_only), sys.executable, "-m",
                           "shared.cli", "convert-experts", str(path), "--verify", "--cache-dir", str(read_only)],
                          capture_output=True, text=True, timeout=120, cwd=Path(__file__).parent.parent)
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert (f"error: cannot remove the damaged expert cache {cache.path} (Read-only file system): delete it, or "
            f"build the cache in a writable directory with --cache-dir DIR") in done.stderr


def test_the_conversion_processes_of_a_process_killed_outright_end_with_it(tmp_path):
    """A worker converting when `up` killed it (past its drain) left its pool's processes blocked for ever, each
    holding memory and the deleted temporary file."""
    path = tmp_path / "m.gguf"
    make_model(path, preset="small", dtype="q4_0", seed=0)
    converting = subprocess.Popen([sys.executable, "-m", "shared.cli", "convert-experts", str(path), "--cache-dir",
                                   str(tmp_path / "cache"), "--workers", "2"], stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not (pool := children(converting.pid)):
        assert time.monotonic() < deadline and converting.poll() is None, "no conversion process started"
        time.sleep(0.01)
    converting.kill()
    converting.wait()
    deadline = time.monotonic() + 30
    while alive := [pid for pid in pool if Path(f"/proc/{pid}").exists() and not zombie(pid)]:
        assert time.monotonic() < deadline, f"conversion processes {alive} outlived their parent"
        time.sleep(0.05)


def children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True
