"""Open a GGUF MoE model over mmap: metadata, validated tensors, zero-copy views, dequantization."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, quants

from shared.model_config import (
    EXPERT_TENSOR_KINDS,
    OPTIONAL_TENSORS,
    ModelConfig,
    ModelError,
    config_from_metadata,
    expert_tensor_name,
    tensor_shapes,
)
from shared.pages import read_only_tensor

Q = GGMLQuantizationType
SUPPORTED_TYPES = (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_K, Q.Q5_K, Q.Q6_K)
# Stored types an expert is served from as a zero-copy view, with the torch dtype of that view.
ZERO_COPY_TYPES = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}


def dequantize(data: np.ndarray, qtype: GGMLQuantizationType) -> torch.Tensor:
    """Float32 values of a tensor stored as `qtype` (numpy shape of the stored bytes or values)."""
    if qtype == Q.F32:
        return torch.from_numpy(np.array(data, dtype=np.float32))
    if qtype == Q.F16:
        return torch.from_numpy(np.array(data)).float()
    if qtype == Q.BF16:
        # bf16 is the top half of an fp32: a widening view, no arithmetic.
        return torch.from_numpy(np.array(data).view(np.int16)).view(torch.bfloat16).float()
    return torch.from_numpy(quants.dequantize(np.asarray(data), qtype))


IDENTITY_SPAN = 1 << 20


def stat_identity(path: str | os.PathLike[str]) -> tuple[int, int, int, int]:
    """What tells a file's content has not changed: device, inode, size and mtime (as git and ccache judge it)."""
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def file_identity(path: str | os.PathLike[str]) -> str:
    """A model file by its content, cheaply: its size and a hash of its first and last MiB (the header and the
    tensor index, and the last tensor's bytes). The same in every process that reads the same model, whatever
    path, link or copy it comes through, and another for another model."""
    size = os.stat(path).st_size
    digest = hashlib.blake2b(digest_size=8)
    with open(path, "rb") as f:
        digest.update(f.read(IDENTITY_SPAN))
        f.seek(max(0, size - IDENTITY_SPAN))
        digest.update(f.read(IDENTITY_SPAN))
    return f"{size} bytes, {digest.hexdigest()}"


class _Reader(GGUFReader):
    """GGUFReader, refusing a metadata array longer than the rest of the file before walking it: the reader reads
    an array item by item, and past the end of the file an item reads as empty rather than failing, so a corrupt
    length looped (and grew lists) for as many items as it claimed. An array of numbers is read as one view: item
    by item took about 700 bytes of RAM an item, so a corrupt count the file could hold (27 million in a 112 MB
    model) ran the process out of memory. An array of arrays is refused: no model's metadata holds one, and a
    deep nesting of them overflowed the reader's recursion."""

    def _get_field_parts(
        self, orig_offs: int, raw_type: int,
    ) -> tuple[int, list[np.ndarray], list[int], list[GGUFValueType]]:
        if raw_type == GGUFValueType.ARRAY:
            head = [self._get(orig_offs, np.uint32), self._get(orig_offs + 4, np.uint64)]  # item type, count
            item_type, count = int(head[0][0]), int(head[1][0])
            if item_type == GGUFValueType.ARRAY:
                raise ValueError("a metadata array of arrays")
            scalar = self.gguf_scalar_to_np.get(GGUFValueType(item_type))
            smallest = np.dtype(scalar).itemsize if scalar else 8  # a string starts with its length
            if count * smallest > len(self.data) - (orig_offs + 12):
                raise ValueError(f"a metadata array claims {count} items, more than the rest of the file holds")
            if scalar is not None:
                items = self._get(orig_offs + 12, scalar, count)
                return 12 + int(items.nbytes), [*head, items], [2], [GGUFValueType.ARRAY, GGUFValueType(item_type)]
        return super()._get_field_parts(orig_offs, raw_type)


class GGUFModel:
    """A GGUF file held open read-only through the `gguf` package's memory map.

    Nothing is copied at open: `raw()` returns views into the mapping and only
    `tensor()` / `expert()` produce float tensors, for exactly what they are asked for.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        if not os.fspath(path):  # Path("") would be the current directory
            raise ModelError("no model given: name a GGUF file with --model or `model` in the config file")
        self.path = Path(path)
        if self.path.is_dir():
            raise ModelError(f"{self.path}: a directory, not a model file")
        if not self.path.is_file():
            raise ModelError(f"{self.path}: no such model file")
        self.opened = stat_identity(self.path)  # the file this model maps (check_unchanged)
        self.file_size = self.opened[2]
        self.identity = file_identity(self.path)
        try:
            self._reader = _Reader(self.path, "r")
        except ValueError as e:
            if "magic" in str(e):
                raise ModelError(f"{self.path}: not a GGUF file (bad magic number)") from e
            if "GGMLQuantizationType" in str(e):  # the enum's own refusal of a type id it does not list
                raise ModelError(f"{self.path}: a tensor's type is not one the gguf package knows ({e}): a quant "
                                 f"type newer than the package, or a corrupt file") from e
            raise ModelError(f"{self.path}: GGUF file is truncated or corrupt ({e})") from e
        except (IndexError, OverflowError, UnicodeDecodeError, KeyError) as e:
            raise ModelError(f"{self.path}: GGUF file is truncated or corrupt ({type(e).__name__}: {e})") from e
        if self._reader.byte_order == "S":  # its values would be read byte-swapped where numpy cannot view them
            raise ModelError(f"{self.path}: a big-endian GGUF file; this machine reads little-endian ones (as "
                             "llama.cpp, convert it on a little-endian machine)")
        try:  # the reader decodes the metadata's strings and arrays only when asked
            self.metadata: dict[str, Any] = {
                name: field.contents() for name, field in self._reader.fields.items() if not name.startswith("GGUF.")
            }
        except (IndexError, OverflowError, UnicodeDecodeError, ValueError) as e:
            raise ModelError(f"{self.path}: GGUF metadata is corrupt ({type(e).__name__}: {e})") from e
        self._tensors = {t.name: t for t in self._reader.tensors}
        try:
            self.config: ModelConfig = config_from_metadata(
                self.metadata, {n: tuple(int(d) for d in reversed(t.shape)) for n, t in self._tensors.items()}
            )
        except ModelError as e:
            raise ModelError(f"{self.path}: {e}") from None
        self._expected_shapes = tensor_shapes(self.config)
        self._validate()
        self.check_unchanged()

    def check_unchanged(self) -> None:
        """Raise ModelError if the model's path no longer names the file this model maps, unchanged: what reopens the
        path (an expert cache's conversion processes) or is named by it (the cache's content hash) would be of
        another model (one renamed over it as a download finished, or rewritten in place)."""
        if stat_identity(self.path) != self.opened:
            raise ModelError(f"{self.path}: the model file was replaced or changed after this process opened it; "
                             "start again to serve the new one")

    def _validate(self) -> None:
        # in file order, as llama.cpp checks them: aligned, and none over another's bytes
        alignment, end, previous = self._reader.alignment, 0, ""
        for t in sorted(self._tensors.values(), key=lambda t: t.data_offset):
            if t.data_offset + t.n_bytes > self.file_size:
                raise ModelError(f"{self.path}: GGUF file is truncated: tensor {t.name} ends past the end of the file")
            start = int(t.data_offset) - int(self._reader.data_offset)
            if start < 0:  # an offset past 2^64 wraps around in the reader's uint64 sum, to the file's header
                raise ModelError(f"{self.path}: tensor {t.name} starts before the file's tensor data")
            if start % alignment:
                raise ModelError(f"{self.path}: tensor {t.name} starts at {start} bytes into the data, not a multiple "
                                 f"of the file's alignment ({alignment})")
            if t.data_offset < end:
                raise ModelError(f"{self.path}: tensors {previous} and {t.name} overlap")
            end, previous = t.data_offset + t.n_bytes, t.name
        for name, shape in self._expected_shapes.items():
            t = self._tensors.get(name)
            if t is None:
                if name in OPTIONAL_TENSORS:
                    continue
                raise ModelError(f"{self.path}: tensor {name} is missing")
            got = tuple(int(d) for d in reversed(t.shape))
            if len(shape) == 3:  # experts are read by index along the first axis: it must be there, 1 for one expert
                fits = len(got) >= 3 and got[-3:] == shape and set(got[:-3]) <= {1}
            else:
                fits = _without_leading_ones(got) == _without_leading_ones(shape)
            if not fits:
                raise ModelError(f"{self.path}: tensor {name} has shape {got}, expected {shape}")
            if len(got) > len(shape) == 3:  # experts are read by index along the first axis: drop those of 1 ahead
                self._tensors[name] = t._replace(data=t.data.reshape(t.data.shape[len(got) - len(shape):]))
            if t.tensor_type not in SUPPORTED_TYPES:
                names = ", ".join(q.name for q in SUPPORTED_TYPES)
                raise ModelError(
                    f"{self.path}: tensor {name} has unsupported quant type {t.tensor_type.name} (supported: {names})"
                )
            # a vector (a norm, a bias) touches every token, so one NaN in it makes every logit NaN; vectors are
            # small enough to check at every load
            if len(shape) == 1 and not torch.isfinite(self.tensor(name)).all():
                raise ModelError(f"{self.path}: tensor {name} holds NaN or infinite values")

        # as llama.cpp refuses it: a tensor the forward never reads means the metadata misdescribes the model (a
        # block_count one short, a shared expert without its length) and serving it would drop weights silently
        unused = [name for name in self._tensors if name not in self._expected_shapes]
        if unused:
            raise ModelError(f"{self.path}: tensor {unused[0]} (and {len(unused) - 1} more) is not part of the model "
                             "its metadata describes")

    def has(self, name: str) -> bool:
        return name in self._tensors

    def qtype(self, name: str) -> GGMLQuantizationType:
        return self._tensors[name].tensor_type

    def raw(self, name: str) -> np.ndarray:
        """Zero-copy view of the stored tensor: values for float types, block bytes for quantized ones."""
        return self._tensors[name].data

    def nbytes(self, name: str) -> int:
        return int(self._tensors[name].n_bytes)

    def file_offset(self, name: str) -> int:
        """Absolute byte offset of the tensor's data in the file (for mmap / DMA of slices)."""
        return int(self._tensors[name].data_offset)

    def tensor(self, name: str) -> torch.Tensor:
        """The whole tensor dequantized to float32, in numpy (= torch) shape order."""
        t = self._tensors[name]
        out = dequantize(t.data, t.tensor_type)
        return out.reshape(self._expected_shapes.get(name) or tuple(int(d) for d in reversed(t.shape)))

    def expert(self, layer: int, kind: str, index: int) -> torch.Tensor:
        """One expert's matrix (float32) out of a merged `*_exps` tensor, dequantizing only its slice."""
        t = self._tensors[expert_tensor_name(layer, kind)]
        return dequantize(t.data[index], t.tensor_type).reshape(tuple(int(d) for d in reversed(t.shape[:2])))

    def expert_view(self, layer: int, kind: str, index: int) -> torch.Tensor:
        """One expert's matrix as a zero-copy tensor over the file's pages when it is stored as F32, F16
        or BF16 (the `mapped` memory kind: RAM is only what the page cache holds); block-quantized
        experts are dequantized to float32."""
        t = self._tensors[expert_tensor_name(layer, kind)]
        if t.tensor_type not in ZERO_COPY_TYPES:
            return self.expert(layer, kind, index)
        raw = np.asarray(t.data[index])
        if t.tensor_type == Q.BF16:
            return read_only_tensor(raw.view(np.int16)).view(torch.bfloat16)
        return read_only_tensor(raw)

    def expert_nbytes(self, layer: int) -> int:
        """Stored bytes of one expert (gate, up and down) of a layer."""
        names = [expert_tensor_name(layer, kind) for kind in EXPERT_TENSOR_KINDS]
        return sum(self.nbytes(name) for name in names) // self.config.n_experts

    def expert_bytes(self, layer: int, kind: str, index: int) -> np.ndarray:
        """Zero-copy view of one expert's stored bytes within a merged tensor."""
        return self._tensors[expert_tensor_name(layer, kind)].data[index]

    def tensor_names(self) -> list[str]:
        return list(self._tensors)

    def dense_elements(self) -> int:
        """Elements of the tensors that are no experts': the trunk a worker holds (and dequantizes) whole."""
        experts = {expert_tensor_name(layer, kind) for layer in range(self.config.n_layers)
                   for kind in EXPERT_TENSOR_KINDS}
        return sum(int(t.n_elements) for name, t in self._tensors.items() if name not in experts)


def _without_leading_ones(shape: tuple[int, ...]) -> tuple[int, ...]:
    """llama.cpp writes some vectors as (1, n) and others as (n,); both load, so both are accepted."""
    while len(shape) > 1 and shape[0] == 1:
        shape = shape[1:]
    return shape

