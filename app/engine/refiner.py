"""SDXL's refiner: where a pass is handed over from the job's model to the refiner.

diffusers splits one schedule between two pipelines by timestep: the first, called with
`denoising_end=f`, runs the timesteps t >= round(T x (1 - f)) (T: the scheduler's training
timesteps, 1000) and answers latents; the second, the refiner's image-to-image pipeline called
with `denoising_start=f` and those latents, runs the timesteps below that cut-off, adding no
noise. A1111 switches the same way by default (by timestep, not by step count: its
"Refiner switch by sampling steps" option is off). `plan` says how many timesteps of a pass
each side runs, by diffusers' own rules, so the worker knows the progress offset of the
refiner's part and the edge cases:

- the refiner runs nothing (the cut-off is at or below the last timestep): the job's model
  runs the pass alone, as A1111 never switches then;
- the job's model runs nothing in an image-to-image pass (its strength starts it below the
  cut-off): the refiner runs the whole pass alone, from the picture, at the pass's strength
  (A1111 switches before the first step). In text to image the model's call runs no step and
  answers its starting noise, which the refiner then denoises from the first timestep.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

# diffusers takes denoising_end/start only strictly between 0 and 1; a switch at 0 (A1111: the
# refiner from the first step) is this, which cuts at timestep T: every timestep is below it.
SWITCH_AT_START = 1e-6


@dataclass(frozen=True)
class Handover:
    base_steps: int  # timesteps the job's model runs (entries of the scheduler's list)
    refiner_steps: int  # timesteps the refiner runs
    switch: float  # the fraction to pass diffusers (0 < switch < 1)

    @property
    def refiner_alone(self) -> bool:
        return self.base_steps == 0


def plan(scheduler: Any, steps: int, strength: float, switch_at: float) -> Handover | None:
    """The split of a pass of `steps` at `strength` (1.0: text to image) on a fresh scheduler of
    the job's sampler; None when the refiner would run no timestep."""
    switch = max(switch_at, SWITCH_AT_START)
    scheduler.set_timesteps(steps, device="cpu")
    timesteps: torch.Tensor = scheduler.timesteps
    total = int(scheduler.config.num_train_timesteps)
    cutoff = int(round(total - switch * total))
    # the image-to-image pipelines' start (diffusers' get_timesteps without denoising_start)
    start = max(steps - min(int(steps * strength), steps), 0) * scheduler.order
    base = int((timesteps[start:] >= cutoff).sum())
    refined = int((timesteps < cutoff).sum())
    if refined == 0:
        return None
    return Handover(base_steps=base, refiner_steps=refined, switch=switch)
