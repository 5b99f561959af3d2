"""ControlNet units on a loaded model: the nets, their pipelines and the extension's rules.

A job's units (`ControlUnit`, frozen and hashable: part of the batch key) name the ControlNets,
their weights, guidance windows and control modes; each job brings its own control images
(`ControlImages`, compared by identity so they never split a batch), already preprocessed and
resized to the generated size (app.engine.control_images). Jobs with the same units run in one
call, each with its own images.

- The nets are loaded once per worker (`ControlNets`, an LRU as the upscalers) on the model's
  device and dtype: a diffusers folder with `from_pretrained`, a single file with its config
  read from the model's own UNet config and the file's layer shapes (the fit check already
  proved the shapes are the UNet's). A file in the original (LDM) layout is read by name: each
  parameter of the net takes the tensor its original name gives (app.engine.single_file's UNet
  mapping for the encoder copy; `zero_convs.i.0` → `controlnet_down_blocks.i`,
  `middle_block_out.0` → `controlnet_mid_block`, the even convolutions of `input_hint_block` →
  `controlnet_cond_embedding`'s conv_in, blocks and conv_out); a pickle goes through torch's
  weights-only unpickler.
- The pipelines are diffusers' ControlNet pipelines for txt2img / img2img / inpainting made with
  `from_pipe` from the loaded model (no weight copied), once per task; their `controlnet` is one
  `CraftControlNets` whose nets are swapped per call.
- `CraftControlNets.forward` applies sd-webui-controlnet's rules rather than diffusers':
  the step window (a unit runs at step i of n when start <= i/n <= end; diffusers' end test
  is (i+1)/n <= end, one step earlier), and the control modes:
  * Balanced: every residual times the weight, on both halves of the CFG batch;
  * "My prompt is more important" (the extension's soft injection): residual k of the 13
    (SD 1.5) times weight * 0.825^(12-k), on both halves; SDXL (10 residuals) takes the first
    10 of those 13 factors, as the extension does;
  * "ControlNet is more important" (soft injection + CFG injection): the same factors, and the
    residuals only on the conditional half (the unconditional half gets none), which is what
    diffusers' guess_mode does with other factors.
  A unit outside its window is not run at all (the extension skips it too).
- CPU batches stay exact: the per-job forward wrapper of app.engine.determinism wraps the
  `CraftControlNets` module, so each job's rows (uncond_i, cond_i) go through the nets alone.
- A1111's hires fix: the units whose hr_option includes the second pass guide it through the
  image-to-image ControlNet pipeline, with their maps fitted to the hires size and the window
  counted over that pass's steps (app.engine.control_units). SDXL's refiner runs without the
  units (the extension hooks the job's model only): they guide the model's part of the pass.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import ControlNetModel
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

from app.engine.control_units import BALANCED, CONTROL_MORE, ControlUnit, block_factors, runs_at
from app.engine.single_file import unet_mapper
from app.errors import ErrorKind, Unavailable

logger = logging.getLogger(__name__)

class CraftControlNets(MultiControlNetModel):
    """A MultiControlNetModel that applies the extension's window and control modes (module
    docstring). Before a call the worker sets `units`, `total` (the call's denoising steps) and
    `cfg` (whether the batch has an unconditional half); `step` counts the calls."""

    def __init__(self, nets: Sequence[ControlNetModel]) -> None:
        super().__init__(list(nets))
        self.units: tuple[ControlUnit, ...] = ()
        self.total = 1
        self.cfg = True
        self.step = 0
        self._last: float | None = None

    def set_units(self, nets: Sequence[ControlNetModel], units: Sequence[ControlUnit], total: int,
                  cfg: bool) -> None:
        self.nets = torch.nn.ModuleList(list(nets))
        self.units = tuple(units)
        self.total = max(1, total)
        self.cfg = cfg
        self.restart()

    def restart(self) -> None:
        """Count the steps from 0 again: before each call with the same units."""
        self.step = 0
        self._last = None

    def forward(self, sample: torch.Tensor, timestep: Any, encoder_hidden_states: torch.Tensor,  # type: ignore[override]
                controlnet_cond: list, conditioning_scale: list, guess_mode: bool = False,
                return_dict: bool = True, **kwargs: Any) -> Any:
        # The step: counted by the timestep's changes, since the per-job wrapper of
        # app.engine.determinism calls this once per job at each step.
        now = float(timestep.flatten()[0]) if isinstance(timestep, torch.Tensor) else float(timestep)
        if self._last is not None and now != self._last:
            self.step += 1
        self._last = now
        step = self.step
        down: list[torch.Tensor] | None = None
        mid: torch.Tensor | None = None
        for image, unit, net in zip(controlnet_cond, self.units, self.nets, strict=True):
            if not runs_at(unit, step, self.total):
                continue
            balanced = unit.mode == BALANCED
            d, m = net(sample=sample, timestep=timestep, encoder_hidden_states=encoder_hidden_states,
                       controlnet_cond=image, conditioning_scale=unit.weight if balanced else 1.0,
                       guess_mode=False, return_dict=False, **kwargs)
            residuals = [*d, m]
            if not balanced:
                factors = block_factors(unit.mode, len(residuals))
                residuals = [r * (unit.weight * f) for r, f in zip(residuals, factors, strict=True)]
            if unit.mode == CONTROL_MORE and self.cfg:
                half = sample.shape[0] // 2  # diffusers' CFG batch: [uncond..., cond...]
                keep = torch.ones((sample.shape[0], 1, 1, 1), dtype=sample.dtype, device=sample.device)
                keep[:half] = 0
                residuals = [r * keep for r in residuals]
            if down is None:
                down, mid = residuals[:-1], residuals[-1]
            else:
                down = [a + b for a, b in zip(down, residuals[:-1], strict=True)]
                mid = mid + residuals[-1]
        if down is None:  # no unit in its window: residuals of zero change nothing
            return self._zeros(sample, timestep, encoder_hidden_states, controlnet_cond, kwargs)
        return down, mid

    def _zeros(self, sample: torch.Tensor, timestep: Any, hidden: torch.Tensor, conds: list,
               kwargs: dict) -> tuple[list[torch.Tensor], torch.Tensor]:
        shapes = getattr(self, "_shapes", {}).get(tuple(sample.shape))
        if shapes is None:  # the residuals' shapes: one run at scale 0 (once per shape)
            d, m = self.nets[0](sample=sample, timestep=timestep, encoder_hidden_states=hidden,
                                controlnet_cond=conds[0], conditioning_scale=0.0, return_dict=False,
                                **kwargs)
            shapes = ([tuple(x.shape) for x in d], tuple(m.shape))
            self.__dict__.setdefault("_shapes", {})[tuple(sample.shape)] = shapes
        down_shapes, mid_shape = shapes
        zeros = [sample.new_zeros(s) for s in down_shapes]
        return zeros, sample.new_zeros(mid_shape)


# --------------------------------------------------------------------------- loading

def _cond_channels(shapes: Mapping[str, tuple[int, ...]]) -> tuple[int, tuple[int, ...]]:
    """(conditioning channels, conditioning_embedding_out_channels) from a file's shapes."""
    first = shapes["controlnet_cond_embedding.conv_in.weight"]
    channels = [first[0]]
    k = 1
    while f"controlnet_cond_embedding.blocks.{k}.weight" in shapes:
        channels.append(shapes[f"controlnet_cond_embedding.blocks.{k}.weight"][0])
        k += 2
    return first[1], tuple(channels)


def _hint_names(names: Sequence[str]) -> dict[str, str]:
    """controlnet_cond_embedding parameter -> its original `input_hint_block` name: the hint
    block's convolutions are its even indices (SiLUs between), the first is conv_in, the last
    conv_out, those between blocks.0, blocks.1, ..."""
    convs = sorted({int(n.split(".")[1]) for n in names if n.startswith("input_hint_block.")})
    out: dict[str, str] = {}
    for part in ("weight", "bias"):
        out[f"controlnet_cond_embedding.conv_in.{part}"] = f"input_hint_block.{convs[0]}.{part}"
        out[f"controlnet_cond_embedding.conv_out.{part}"] = f"input_hint_block.{convs[-1]}.{part}"
        for k, index in enumerate(convs[1:-1]):
            out[f"controlnet_cond_embedding.blocks.{k}.{part}"] = f"input_hint_block.{index}.{part}"
    return out


def original_name(name: str, unet_config: Any, hint: Mapping[str, str]) -> str:
    """The original (LDM) name of a diffusers ControlNet parameter."""
    if name in hint:
        return hint[name]
    head, _, rest = name.partition(".")
    if head == "controlnet_down_blocks":
        index, _, part = rest.partition(".")
        return f"zero_convs.{index}.0.{part}"
    if head == "controlnet_mid_block":
        return f"middle_block_out.0.{rest}"
    return unet_mapper(dict(unet_config))(name)


def _read_tensors(weights: Path) -> dict[str, torch.Tensor]:
    if weights.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(weights))
    state = torch.load(str(weights), map_location="cpu", weights_only=True, mmap=True)
    if isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    return state


def _from_original(state: Mapping[str, torch.Tensor], prefix: str, unet: Any) -> dict[str, torch.Tensor]:
    """An original-layout ControlNet's tensors (under `prefix`) renamed to diffusers' names."""
    own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    hint = _hint_names(list(own))
    shapes = {name: tuple(own[source].shape) for name, source in hint.items() if source in own}
    channels, embedding = _cond_channels(shapes)
    with torch.device("meta"):
        net = ControlNetModel.from_unet(unet, load_weights_from_unet=False,
                                        conditioning_embedding_out_channels=embedding,
                                        conditioning_channels=channels)
    renamed: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for name in net.state_dict():
        source = original_name(name, unet.config, hint)
        if source in own:
            renamed[name] = own[source]
            used.add(source)
    leftover = sorted(set(own) - used)
    if leftover:
        raise ValueError(f"original-layout tensors no ControlNet parameter takes: {leftover[:3]}")
    return renamed


def load_controlnet(weights: Path, folder: Path | None, unet: Any, device: torch.device,
                    dtype: torch.dtype, *, layout: str = "diffusers", prefix: str = "") -> ControlNetModel:
    """A ControlNet on `device` in `dtype`: a diffusers folder as it is, a single file (either
    layout) with the config of `unet` (the model it serves) and the file's conditioning layers."""
    if folder is not None:
        net = ControlNetModel.from_pretrained(str(folder), torch_dtype=dtype, local_files_only=True)
    else:
        state = _read_tensors(weights)
        if layout == "ldm":
            state = _from_original(state, prefix, unet)
        channels, embedding = _cond_channels({k: tuple(v.shape) for k, v in state.items()})
        with torch.device("meta"):
            net = ControlNetModel.from_unet(unet, load_weights_from_unet=False,
                                            conditioning_embedding_out_channels=embedding,
                                            conditioning_channels=channels)
        missing = sorted(set(net.state_dict()) - set(state))
        extra = sorted(set(state) - set(net.state_dict()))
        if missing or extra:
            raise ValueError(f"{weights}: the file does not describe a ControlNet of the model's UNet "
                             f"(missing {missing[:3]}, unexpected {extra[:3]})")
        if weights.suffix.lower() != ".safetensors":  # own memory, not the memory-mapped pickle's
            state = {k: v.to(dtype=dtype, copy=True) for k, v in state.items()}
        net.load_state_dict(state, strict=True, assign=True)
    return net.to(device=device, dtype=dtype).eval().requires_grad_(False)


class ControlNets:
    """The ControlNets loaded on one worker's device, least recently used first out (at most
    `capacity`); loaded on the worker's thread when a batch needs them."""

    def __init__(self, device: torch.device, capacity: int = 4) -> None:
        self.device = device
        self.capacity = capacity
        self._loaded: OrderedDict[tuple[str, str], ControlNetModel] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, unit: ControlUnit, spec: Any, unet: Any) -> ControlNetModel:
        """The net of `unit` (spec: its ControlNetSpec) for a model whose UNet is `unet`."""
        key = (unit.weights, str(unet.dtype))
        with self._lock:
            net = self._loaded.get(key)
            if net is not None:
                self._loaded.move_to_end(key)
                return net
        try:
            net = load_controlnet(spec.weights, spec.folder, unet, self.device, unet.dtype,
                                  layout=getattr(spec, "layout", "diffusers"),
                                  prefix=getattr(spec, "prefix", ""))
        except Exception as exc:
            logger.exception("loading ControlNet %s failed", unit.name)
            raise Unavailable(f"ControlNet '{unit.name}' cannot be used now: loading {spec.weights} "
                              f"failed ({type(exc).__name__}); the server log has the details",
                              kind=ErrorKind.MODEL_UNAVAILABLE) from exc
        with self._lock:
            self._loaded[key] = net
            while len(self._loaded) > self.capacity:
                self._loaded.popitem(last=False)
        return net


# --------------------------------------------------------------------------- pipelines

def _classes() -> dict[tuple[str, str], Any]:
    from diffusers import (
        StableDiffusionControlNetImg2ImgPipeline,
        StableDiffusionControlNetInpaintPipeline,
        StableDiffusionControlNetPipeline,
        StableDiffusionXLControlNetImg2ImgPipeline,
        StableDiffusionXLControlNetInpaintPipeline,
        StableDiffusionXLControlNetPipeline,
    )

    return {
        ("sd15", "txt2img"): StableDiffusionControlNetPipeline,
        ("sd15", "img2img"): StableDiffusionControlNetImg2ImgPipeline,
        ("sd15", "inpaint"): StableDiffusionControlNetInpaintPipeline,
        ("sdxl", "txt2img"): StableDiffusionXLControlNetPipeline,
        ("sdxl", "img2img"): StableDiffusionXLControlNetImg2ImgPipeline,
        ("sdxl", "inpaint"): StableDiffusionXLControlNetInpaintPipeline,
    }


def controlnet_pipeline(model: Any, task: str, first_net: ControlNetModel) -> Any:
    """The model's ControlNet pipeline for `task`, made once with `from_pipe` (its controlnet a
    CraftControlNets, whose nets each call sets). Made batch-invariant as the model's pipe is."""
    from app.engine.determinism import make_batch_invariant
    from app.engine.img2img import shared_from_pipe

    key = f"{task}+controlnet"
    made = model.variants.get(key)
    if made is None:
        holder = CraftControlNets([first_net])
        made = shared_from_pipe(_classes()[(model.family, task)], model.pipe, controlnet=holder)
        made.set_progress_bar_config(disable=True)
        if getattr(model.pipe, "_craftserve_call_state", None) is not None:
            made._craftserve_call_state = model.pipe._craftserve_call_state  # noqa: SLF001
            make_batch_invariant(made)
        model.variants[key] = made
    return made
