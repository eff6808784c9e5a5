"""Model files damaged on purpose, as a corrupt download or a bad conversion leaves them."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from shared.gguf_file import GGUFModel


def nan_embedding(path: Path, token: int) -> None:
    """Overwrite `token`'s row of an f32 model's token embeddings with NaN: a prompt ending in it samples from NaN
    logits."""
    model = GGUFModel(path)
    hidden = model.config.hidden
    offset = model.file_offset("token_embd.weight") + token * hidden * 4
    del model
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(np.full(hidden, np.nan, np.float32).tobytes())


def nan_value(path: Path, name: str) -> None:
    """Overwrite the first value of an f32 model's tensor `name` with NaN."""
    offset = GGUFModel(path).file_offset(name)
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(np.float32(np.nan).tobytes())
