"""A decode-step profile as it travels and as it is read: the sums of one window of profiled steps (the
gpu_worker's step profile makes them, gpu_worker/step_profile.py) and the table made from them.

The table has a row for the step, one for every section, depth first, and for each section with sections inside
it an "other" row: its time outside them (the Python between kernels, small tensors built on the way). Each row
gives ms per step, ms per layer for sections inside the trunk's layer section, and its share of the step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

LAYER = "layer"  # the section the trunk opens around each layer
OTHER = "other"
STEP = "step"


@dataclass
class ProfileWindow:
    """Sums over `steps` profiled steps: their wall time, and each section's time and number of entries, by path
    ("layer/moe/hot"), in the order the sections first ended. `index` counts the windows (1 is the first)."""

    index: int
    steps: int
    step_s: float
    sections: list[tuple[str, float, int]]

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "steps": self.steps, "step_s": self.step_s,
                "sections": [list(s) for s in self.sections]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ProfileWindow:
        return cls(int(d["index"]), int(d["steps"]), float(d["step_s"]),
                   [(str(p), float(s), int(n)) for p, s, n in d["sections"]])


@dataclass(frozen=True)
class Row:
    path: str  # "step", a section's path, or "<parent>/other": the parent's time outside its sections
    ms_per_step: float
    ms_per_layer: float | None  # for sections inside a layer
    share: float  # of the step's time

    @property
    def depth(self) -> int:
        return 0 if self.path == STEP else self.path.count("/") + 1

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]


def _parent(path: str) -> str:
    return path.rsplit("/", 1)[0] if "/" in path else ""


def rows(window: ProfileWindow) -> list[Row]:
    """The table of a window: the step, then every section depth first, each parent's "other" after its
    sections. Times are per profiled step; ms per layer divides by the layers entered per step."""
    seconds = {path: s for path, s, _ in window.sections}
    entries = {path: n for path, _, n in window.sections}
    children: dict[str, list[str]] = {}
    for path in seconds:
        children.setdefault(_parent(path), []).append(path)
    layers_per_step = entries.get(LAYER, 0) / window.steps

    def row(path: str, total_s: float) -> Row:
        ms = 1e3 * total_s / window.steps
        in_layer = path == LAYER or path.startswith(LAYER + "/")
        return Row(path, ms, ms / layers_per_step if in_layer and layers_per_step else None,
                   total_s / window.step_s if window.step_s > 0 else 0.0)

    out = [row(STEP, window.step_s)]

    def walk(parent: str, parent_s: float) -> None:
        inside = children.get(parent, [])
        for path in inside:
            out.append(row(path, seconds[path]))
            walk(path, seconds[path])
        if inside:
            out.append(row(f"{parent}/{OTHER}" if parent else OTHER, parent_s - sum(seconds[p] for p in inside)))

    walk("", window.step_s)
    return out


def format_table(window: ProfileWindow) -> str:
    """The window's rows as aligned text, sections indented under their parents."""
    lines = [f"{'section':<28} {'ms/step':>9} {'ms/layer':>9} {'share':>7}"]
    for r in rows(window):
        per_layer = f"{r.ms_per_layer:9.3f}" if r.ms_per_layer is not None else " " * 9
        lines.append(f"{'  ' * r.depth + r.name:<28} {r.ms_per_step:9.3f} {per_layer} {100 * r.share:6.1f}%")
    return "\n".join(lines)

