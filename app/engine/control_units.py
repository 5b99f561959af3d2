"""ControlNet units as jobs carry them: torch-free, so the HTTP side and the queue can hold them.

`ControlUnit` (frozen, hashable: part of a batch key) is a unit as the worker runs it, with
what the infotext says of its preprocessing (not compared: units that differ only there share
a batch); each job's control images are a `ControlImages` (compared by identity). `runs_at` and
`block_factors` are sd-webui-controlnet's step window and control-mode factors, which
app.engine.controlnet applies.

With A1111's hires fix a unit's `hr_option` says which passes it guides (the extension's
HiResFixOption): "Both", "Low res only" (the first pass), "High res only" (the second). The
second pass takes the unit's map fitted to the hires size (`ControlImages.hires`), its window
counted over that pass's steps, and its `hires_mode`: the extension forces its soft weights on
canny and mlsd maps in the hires pass ("important! use the soft weights with high-res fix can
significantly reduce artifacts"), so a Balanced canny unit runs there as "My prompt is more
important".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

BALANCED, PROMPT_MORE, CONTROL_MORE = 0, 1, 2
CONTROL_MODES = ("Balanced", "My prompt is more important", "ControlNet is more important")
BOTH, LOW_RES_ONLY, HIGH_RES_ONLY = "Both", "Low res only", "High res only"
HR_OPTIONS = (BOTH, LOW_RES_ONLY, HIGH_RES_ONLY)
# The preprocessors whose maps the extension weights softly in the hires pass (hook.py)
SOFT_IN_HIRES = ("canny", "mlsd")
SOFT_FACTOR = 0.825


@dataclass(frozen=True)
class ControlUnit:
    """One enabled unit as the worker runs it (everything but its images), and the facts of its
    preprocessing that the `ControlNet N` infotext entry reports (app.imaging), left out of
    comparisons: the images were preprocessed before the job was queued."""

    name: str  # the ControlNet's name in the registry
    weights: str  # its weights file (a changed file is another net)
    weight: float = 1.0
    start: float = 0.0
    end: float = 1.0
    mode: int = BALANCED
    # Which passes of the hires fix it guides ("Both" without the hires fix, as the extension)
    hr_option: str = BOTH
    hires_mode: int | None = None  # its control mode in the hires pass; None: `mode`

    title: str = field(default="", compare=False)  # "<name> [<old hash>]", as A1111 lists it
    module: str = field(default="none", compare=False)  # the preprocessor's name
    resize_mode: int = field(default=1, compare=False)  # 0 Just Resize, 1 Crop and Resize, 2 Resize and Fill
    processor_res: float = field(default=-1, compare=False)  # as sent (-1: the preprocessor's default)
    threshold_a: float = field(default=-1, compare=False)
    threshold_b: float = field(default=-1, compare=False)
    pixel_perfect: bool = field(default=False, compare=False)

    @property
    def low_res(self) -> bool:
        """It guides the job's own (first) pass."""
        return self.hr_option != HIGH_RES_ONLY

    @property
    def high_res(self) -> bool:
        """It guides the hires fix's second pass."""
        return self.hr_option != LOW_RES_ONLY

    def in_hires(self) -> ControlUnit:
        """The unit as the hires pass runs it (its hires control mode)."""
        if self.hires_mode is None or self.hires_mode == self.mode:
            return self
        return replace(self, mode=self.hires_mode)


def hires_mode(module: str, mode: int) -> int | None:
    """The control mode of a unit in the hires pass (None: its own): the extension's forced
    soft injection for canny and mlsd maps turns Balanced into "My prompt is more important"
    (the other two modes are soft already)."""
    if mode == BALANCED and any(name in module for name in SOFT_IN_HIRES):
        return PROMPT_MORE
    return None


class ControlImages:
    """A job's control images, one per unit (PIL RGB at the generated size), and with the hires
    fix, one per unit at the second pass's size (None for a unit that does not guide it);
    compared by identity, so jobs with other images still share a batch."""

    __slots__ = ("hires", "images")

    def __init__(self, images: Sequence[Any], hires: Sequence[Any] = ()) -> None:
        self.images = tuple(images)
        self.hires = tuple(hires)

    def __repr__(self) -> str:
        return f"ControlImages({len(self.images)})"

    def __reduce__(self) -> tuple:
        # Crosses to a Ray replica pickled with its job (app.cluster.wire), as Source does.
        return (ControlImages, (self.images, self.hires))


def runs_at(unit: ControlUnit, step: int, total: int) -> bool:
    """The extension's window: a unit is dropped at step i when i/total < start or > end."""
    fraction = step / total
    return not (fraction < unit.start or fraction > unit.end)


def block_factors(mode: int, count: int) -> list[float]:
    """The per-residual factors of a control mode (before the weight): 1 for Balanced, else
    0.825^(12-k) for k = 0..12 (the first `count` of them: SD 1.5 has 13 residuals, SDXL 10)."""
    if mode == BALANCED:
        return [1.0] * count
    return [SOFT_FACTOR ** float(12 - k) for k in range(13)][:count]


