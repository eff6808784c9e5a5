"""Write llama.cpp-compatible GGUF model files tensor by tensor, never holding the model in RAM.

The generator streams random weights through it and tests use it to write the
weights of Hugging Face models; both declare every tensor first (GGUF puts the
tensor directory before the data) and then hand over the data in file order,
in as many chunks as they like.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType, GGUFWriter
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import quant_shape_from_byte_shape, quant_shape_to_byte_shape

from shared.model_config import ModelConfig, config_to_metadata


def stored_nbytes(shape: tuple[int, ...], qtype: GGMLQuantizationType) -> int:
    block, size = GGML_QUANT_SIZES[qtype]
    if shape[-1] % block:
        raise ValueError(f"rows of {shape[-1]} values do not split into {qtype.name} blocks of {block}")
    return int(np.prod(shape[:-1], dtype=np.int64)) * (shape[-1] // block) * size


def _add_value(writer: GGUFWriter, key: str, value: Any) -> None:
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif isinstance(value, (list, tuple)):
        if value and isinstance(value[0], int) and not isinstance(value[0], bool):
            writer.add_key_value(key, list(value), GGUFValueType.ARRAY, sub_type=GGUFValueType.INT32)
        else:
            writer.add_array(key, list(value))
    else:
        raise TypeError(f"metadata {key}: cannot store a {type(value).__name__}")


class GGUFModelWriter:
    """Declare tensors with `add_tensor`, call `begin`, then `write` their bytes in order, then `close`."""

    def __init__(self, path: str | os.PathLike[str], cfg: ModelConfig, metadata: Mapping[str, Any] = ()) -> None:
        self.path = os.fspath(path)
        md = config_to_metadata(cfg)
        md.update(metadata)
        # GGUFWriter writes general.architecture itself from `arch`.
        self._writer = GGUFWriter(self.path, md.pop("general.architecture"))
        self._declared: list[tuple[str, int]] = []
        self._next = 0
        self._written = 0
        for key, value in md.items():
            _add_value(self._writer, key, value)

    def add_tensor(self, name: str, shape: tuple[int, ...], qtype: GGMLQuantizationType) -> int:
        """Declare a tensor (numpy-order shape); returns its stored size in bytes."""
        nbytes = stored_nbytes(shape, qtype)
        float_dtype = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16}.get(qtype)
        if float_dtype is not None:
            self._writer.add_tensor_info(name, shape, np.dtype(float_dtype), nbytes, raw_dtype=qtype)
        else:  # GGUFWriter takes block types as a uint8 array shape
            byte_shape = quant_shape_to_byte_shape(shape, qtype)
            self._writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), nbytes, raw_dtype=qtype)
        self._declared.append((name, nbytes))
        return nbytes

    def begin(self) -> None:
        self._writer.write_header_to_file()
        self._writer.write_kv_data_to_file()
        self._writer.write_ti_data_to_file()
        self._out = self._writer.fout[0]
        self._writer.write_padding(self._out, self._out.tell())

    def write(self, data: np.ndarray | bytes | memoryview) -> None:
        """Append the next bytes of the current tensor; tensors are completed in declaration order."""
        buf = memoryview(np.ascontiguousarray(data)).cast("B") if isinstance(data, np.ndarray) else memoryview(data)
        while len(buf):
            name, nbytes = self._declared[self._next]
            take = min(len(buf), nbytes - self._written)
            self._out.write(buf[:take])
            buf = buf[take:]
            self._written += take
            if self._written == nbytes:
                self._writer.write_padding(self._out, nbytes)
                self._next += 1
                self._written = 0

    def close(self) -> None:
        if self._next != len(self._declared):
            missing = self._declared[self._next][0]
            raise ValueError(f"{self.path}: closed before the data of tensor {missing} was written")
        self._writer.close()


def write_model(
    path: str | os.PathLike[str],
    cfg: ModelConfig,
    tensors: Mapping[str, np.ndarray],
    metadata: Mapping[str, Any] = (),
    qtypes: Mapping[str, GGMLQuantizationType] = (),
) -> None:
    """Write a small in-memory model. float32 / float16 arrays are stored as F32 / F16; a tensor
    named in `qtypes` is a uint8 array already holding that type's blocks (gguf.quants.quantize)."""
    w = GGUFModelWriter(path, cfg, metadata)
    qtypes = dict(qtypes)
    for name, array in tensors.items():
        if name in qtypes:
            w.add_tensor(name, tuple(quant_shape_from_byte_shape(array.shape, qtypes[name])), qtypes[name])
        elif array.dtype == np.float16:
            w.add_tensor(name, tuple(array.shape), GGMLQuantizationType.F16)
        else:
            w.add_tensor(name, tuple(array.shape), GGMLQuantizationType.F32)
    w.begin()
    for name, array in tensors.items():
        w.write(array if name in qtypes or array.dtype == np.float16 else array.astype(np.float32, copy=False))
    w.close()
