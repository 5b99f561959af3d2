"""Batch-invariant CPU inference: each image of a batch is byte-identical to that job alone.

Why batched CPU results differ
------------------------------
The worker batches compatible jobs into one diffusers call (a list of prompts, one
generator per image). Every random draw is per image, so the only thing that changes
for an image when it shares a batch is the *shape* its tensors have (batch B instead of
1, or 2B instead of 2 with classifier-free guidance). On the CPU several kernels pick
their algorithm, blocking or memory layout from the whole tensor's shape, so a row's
floating-point reduction order, and so its last bits, depend on how many other rows
there are. Measured on torch 2.13 CPU (MKL 2024.2, oneDNN 3.12, AVX-512):

* ``nn.Conv2d`` through oneDNN (mkldnn) picks a batch-dependent kernel: outputs differ
  by ~1 ulp between batch 1 and batch 4 (with ``torch.backends.mkldnn.enabled = False``
  the im2col + GEMM path is batch-invariant for contiguous input, but about 1.8x slower
  on a 320-channel 64x64 convolution).
* Memory format depends on the batch size: some ops return channels-last-strided
  tensors at batch > 1 but contiguous ones at batch 1, and GroupNorm/conv then take a
  different kernel.
* ``nn.Linear`` / ``addmm`` / ``mm`` go to MKL ``sgemm``, whose kernel depends on M (the
  number of rows = batch x tokens): on this machine a row's result is the same only
  for M in {4, 8} or M >= 12; M = 1 (GEMV), M = 2-3, 5-7 and 9-11 each round
  differently. The UNet's time embedding (M = batch) is the first op to diverge. The
  thresholds are MKL's internal, CPU-dependent heuristics (AVX2 and AVX-512 machines
  differ), so "pad M to at least 12" is not a fix one can rely on.

Those ~1e-7 relative differences go through 8-50 denoising steps and the VAE and end up
as +-1 in some uint8 pixels.

The fix
-------
Rather than chasing every shape-dependent kernel (and giving up oneDNN's speed), the
network components of a batched call run *one job at a time*, each with exactly the rows
that job would have alone: ``make_batch_invariant`` replaces the ``forward`` of the
pipeline's UNet/transformer, text encoders and the VAE's encoder, decoder and
(post_)quant_conv with a wrapper that, inside ``jobs_in_call(pipe, n)`` with n > 1, splits
every batch-first tensor argument into the n jobs' row groups (job i owns rows
i, n+i, 2n+i, ...: diffusers lays the classifier-free-guidance batch out as
[uncond_0..uncond_n-1, cond_0..cond_n-1]), makes each group contiguous, calls the original
forward on it and scatters the outputs back. A job's network evaluations then see the
same shapes, strides and kernels as when it runs alone, so they are bit-identical by
construction, with oneDNN and MKL left on. What stays batched (the guidance combination,
the scheduler step, latent scaling, post-processing) is element-wise arithmetic, exact
whatever the vector width and split. A job alone (n = 1) runs the plain forward: its
speed is untouched.

The cost is the batching efficiency of the network calls on the CPU: on a real SD/SDXL
model the CPU is compute-bound already at batch 1, so this is small; on the tiny test
pipelines the network calls are mostly Python overhead, so batching there saves only the
work outside the networks. ``CRAFTSERVE_CPU_EXACT_BATCHES=false`` trades exactness for that
throughput. GPUs do not need this (their contract is "within the precision's tolerance").

Scope: call it for CPU pipelines only, once after the pipeline is on the CPU (it is
idempotent). It changes no global torch flag. Reproducibility also assumes the same
``torch.get_num_threads()`` for the runs being compared: some CPU kernels split their
reductions by thread count.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Iterator
from typing import Any

import torch

_MARK = "_craftserve_batch_invariant"
_STATE = "_craftserve_call_state"
_LINKS = "_craftserve_borrowed_states"  # component -> the call state of the pipeline it came from

# Pipeline attributes whose modules run per sample.
_DIRECT = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3",
           "image_encoder", "controlnet", "prior")
# VAE sub-modules: ``decode``/``encode`` are not ``forward``, so wrap what they call.
_VAE_PARTS = ("encoder", "decoder", "quant_conv", "post_quant_conv")


class _CallState(threading.local):
    """How many jobs the pipeline call running on this thread carries."""

    jobs = 1


def _batch_size(args: tuple, kwargs: dict) -> int | None:
    for value in list(args) + list(kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    return None


def _take(value: Any, rows: torch.Tensor, batch: int) -> Any:
    """The given rows of every batch-first tensor in ``value`` (recursing into containers)."""
    if isinstance(value, torch.Tensor):
        if value.dim() > 0 and value.shape[0] == batch:
            return value.index_select(0, rows.to(value.device)).contiguous()
        return value
    if isinstance(value, dict):
        return type(value)((k, _take(v, rows, batch)) for k, v in value.items())
    if isinstance(value, list):
        return [_take(v, rows, batch) for v in value]
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(_take(v, rows, batch) for v in value)
    return value


def _contiguous(value: Any) -> Any:
    """Every tensor in ``value`` made contiguous (a no-op for those that are)."""
    if isinstance(value, torch.Tensor):
        return value.contiguous()
    if isinstance(value, dict):
        return type(value)((k, _contiguous(v)) for k, v in value.items())
    if isinstance(value, list):
        return [_contiguous(v) for v in value]
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(_contiguous(v) for v in value)
    return value


def _scatter(parts: list, groups: list[torch.Tensor], batch: int) -> Any:
    """Reassemble per-job outputs of identical structure into the batch's row order."""
    first = parts[0]
    if isinstance(first, torch.Tensor):
        if first.dim() == 0 or first.shape[0] != groups[0].numel():
            return first
        out = first.new_empty((batch, *first.shape[1:]))
        for part, rows in zip(parts, groups, strict=True):
            out[rows.to(out.device)] = part
        return out
    if isinstance(first, dict):  # diffusers BaseOutput and transformers ModelOutput too
        merged = {k: _scatter([p[k] for p in parts], groups, batch) for k in first}
        try:
            return type(first)(**merged)
        except TypeError:
            return type(first)(merged)
    if isinstance(first, list):
        return [_scatter([p[j] for p in parts], groups, batch) for j in range(len(first))]
    if isinstance(first, tuple):
        return tuple(_scatter([p[j] for p in parts], groups, batch) for j in range(len(first)))
    return first  # None or a non-tensor value, the same for every job


def _per_job(forward, state: _CallState):
    @functools.wraps(forward)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        jobs = state.jobs
        batch = _batch_size(args, kwargs)
        if jobs <= 1 or batch is None or batch % jobs:
            # Contiguous as each job's rows are made below: a picture's latents come out of the
            # VAE encoder channels-last, and a job alone must see the layout it sees batched.
            return forward(*_contiguous(args), **_contiguous(kwargs))
        groups = [torch.arange(i, batch, jobs) for i in range(jobs)]
        outs = [forward(*_take(args, g, batch), **_take(kwargs, g, batch)) for g in groups]
        return _scatter(outs, groups, batch)

    setattr(wrapper, _MARK, True)
    return wrapper


def _wrap(module: Any, state: _CallState) -> None:
    if not isinstance(module, torch.nn.Module):
        return
    if getattr(module.forward, _MARK, False):
        return
    module.forward = _per_job(module.forward, state)


def make_batch_invariant(pipe: Any) -> None:
    """Make each job of a batched CPU call bit-identical to that job generated alone.

    Installs per-job forwards on the pipeline's networks (see the module docstring); they
    split only inside ``jobs_in_call``. Idempotent; changes no global state. Only for CPU
    pipelines: on CUDA it would serialise the batch for nothing.
    """
    state = getattr(pipe, _STATE, None)
    if state is None:
        state = _CallState()
        setattr(pipe, _STATE, state)
    for name in _DIRECT:
        _wrap(getattr(pipe, name, None), state)
    vae = getattr(pipe, "vae", None)
    if isinstance(vae, torch.nn.Module):
        for part in _VAE_PARTS:
            _wrap(getattr(vae, part, None), state)


def is_wrapped(module: Any) -> bool:
    """Whether the module's forward is a per-job one (make_batch_invariant)."""
    return bool(getattr(getattr(module, "forward", None), _MARK, False))


def borrow(pipe: Any, owner: Any, component: str) -> None:
    """`pipe` now runs `owner`'s module `component` (app.engine.sharing): that module's per-job
    forward reads `owner`'s call state, so `jobs_in_call(pipe, n)` sets that state too. Holds
    the state only (not `owner`). Nothing to do where `owner` was not made batch-invariant."""
    state = getattr(owner, _STATE, None)
    links = pipe.__dict__.setdefault(_LINKS, {})
    if state is None:
        links.pop(component, None)
    else:
        links[component] = state


@contextlib.contextmanager
def jobs_in_call(pipe: Any, jobs: int) -> Iterator[None]:
    """Within this block, the pipeline call on this thread carries `jobs` jobs (in order)."""
    own = getattr(pipe, _STATE, None)
    states = ([own] if own is not None else []) + list(getattr(pipe, _LINKS, {}).values())
    if not states:  # not made batch-invariant: nothing to tell
        yield
        return
    previous = [state.jobs for state in states]
    for state in states:
        state.jobs = jobs
    try:
        yield
    finally:
        for state, value in zip(reversed(states), reversed(previous), strict=True):
            state.jobs = value
