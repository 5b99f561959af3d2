"""SDXL's refiner using the VAE and second text encoder of a loaded SDXL model, when they are equal.

stabilityai's refiner ships the base's VAE and OpenCLIP bigG text encoder (both frozen in
training); diffusers' documented usage hands the base's `vae` and `text_encoder_2` to the
refiner's pipeline. Here it is decided by the weights, never by the name: whenever a model
joins a worker's loaded models, `share` compares each loaded refiner-only model's VAE and
text_encoder_2 with those of every loaded SDXL model that is not refiner-only (the donors);
where one is equal (`same_module`: the same class, config, dtype, device, batch-invariance
wrapping and every tensor equal, `torch.equal`), the refiner's pipeline is pointed at the
donor's module and its own copy is dropped (its memory freed once the collector runs; the log
line says how much). A fine-tuned base (another VAE, a trained encoder) keeps the refiner's own
copy, module by module. Outputs are unchanged by construction: the refiner computes with a
module equal to its own, tensor for tensor.

The comparison runs on the worker thread between batches, where both models are on the same
device: on a GPU a few milliseconds for SDXL's 1.5 GB, on a CPU about a second in fp32. It is
made again only when a model joins, and a module already shared with a loaded donor is not
compared again.

What sharing changes, and how each is kept exact:
- LoRAs apply to the job's model only, but a LoRA with text-encoder-2 layers wraps the donor's
  encoder in place (PEFT), which is now the refiner's too. The layers are inactive outside the
  donor's own batches (LoraManager resets after each), and the worker suspends the job's model's
  LoRAs during the refiner's part of a pass where the refiner shares a module with it
  (`shares_with`), so the refiner always encodes with the plain weights.
- CPU batch invariance (app.engine.determinism) wraps each module's forward with its own
  pipeline's call state: `borrow` links the donor's state to the refiner's pipeline, so
  `jobs_in_call(refiner.pipe, n)` reaches the borrowed modules too.
- The refiner's prompt encoder (which holds its text encoders) is made again, and its task
  pipelines (made from its components) are dropped, so nothing keeps the old copies.

Life cycle: the refiner holds the donor's modules by reference. Evicting the donor (the LRU,
a reload) then frees its UNet and first text encoder but not the shared VAE and encoder,
which stay with the refiner (the memory the refiner's own copies would take anyway). When a
model with equal modules joins again (the donor reloaded, another base), the refiner moves to
its modules and the evicted donor's copies are freed. Nothing is shared with or between
models that are not refiner-only (an SDXL model used as another's refiner keeps its own).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from app.engine.determinism import borrow, is_wrapped
from app.engine.pipelines import LoadedModel
from app.engine.prompts import PromptEncoder

logger = logging.getLogger(__name__)

SHARED = ("vae", "text_encoder_2")

# Config entries that only record where a module came from, not what it computes (besides
# every key starting with "_": diffusers' class name and version, transformers' source path)
_PROVENANCE = frozenset({"name_or_path", "transformers_version", "architectures", "torch_dtype", "dtype"})


def _config(module: Any) -> dict:
    config = getattr(module, "config", None)
    if config is None:
        return {}
    values = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    out = {k: v for k, v in values.items() if not k.startswith("_") and k not in _PROVENANCE}
    # transformers' attention kernel (eager, sdpa, ...): the same maths, not the same bits
    out["attention"] = getattr(config, "_attn_implementation", None)
    return out


def _tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's parameters and buffers by name, without what a donor's LoRAs added: PEFT
    wraps a layer as `<layer>.base_layer` and adds `lora_*` adapter tensors beside it."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in module.state_dict(keep_vars=True).items():
        if ".lora_" in name or name.startswith("lora_"):
            continue
        out[name.replace(".base_layer.", ".")] = tensor
    return out


def _batch_invariant(module: torch.nn.Module) -> bool:
    return any(is_wrapped(part) for part in module.modules())


@torch.no_grad()
def same_module(mine: Any, theirs: Any) -> bool:
    """Whether `theirs` computes exactly what `mine` does: the same class and config, and every
    tensor of the same name, shape, strides (a transposed weight takes another GEMM path, with
    other last bits), dtype and device, and equal."""
    if mine is theirs:
        return True
    if type(mine) is not type(theirs) or not isinstance(mine, torch.nn.Module):
        return False
    if _config(mine) != _config(theirs) or _batch_invariant(mine) != _batch_invariant(theirs):
        return False
    a, b = _tensors(mine), _tensors(theirs)
    if a.keys() != b.keys():
        return False
    for name, tensor in a.items():
        other = b[name]
        if (tensor.shape != other.shape or tensor.stride() != other.stride() or tensor.dtype != other.dtype
                or tensor.device != other.device or not torch.equal(tensor, other)):
            return False
    return True


def module_bytes(module: torch.nn.Module) -> int:
    seen: dict[int, int] = {}
    for tensor in [*module.parameters(), *module.buffers()]:
        seen[id(tensor)] = tensor.numel() * tensor.element_size()
    return sum(seen.values())


def shares_with(refiner: LoadedModel, model: LoadedModel) -> bool:
    """Whether the refiner computes with one of `model`'s modules (the same object)."""
    return any(getattr(refiner.pipe, name, None) is getattr(model.pipe, name, None)
               for name in SHARED if getattr(refiner.pipe, name, None) is not None)


def share(models: dict[str, LoadedModel], worker: str = "") -> int:
    """Point every refiner-only model among `models` at the equal VAE / text_encoder_2 of a
    donor among them (module docstring). The number of modules re-pointed (their old copies
    are freed once the collector runs)."""
    donors = [(name, m) for name, m in models.items() if m.family == "sdxl" and not m.refiner_only]
    total = 0
    for name, refiner in models.items():
        if not refiner.refiner_only:
            continue
        moved: dict[str, str] = {}
        freed = 0
        for component in SHARED:
            mine = getattr(refiner.pipe, component, None)
            if mine is None or any(getattr(d.pipe, component, None) is mine for _, d in donors):
                continue  # none, or a loaded donor's already
            for donor_name, donor in donors:
                theirs = getattr(donor.pipe, component, None)
                if donor.device != refiner.device or theirs is None or not same_module(mine, theirs):
                    continue
                if component not in refiner.shared:  # its own copy, not an evicted donor's
                    freed += module_bytes(mine)
                refiner.pipe.register_modules(**{component: theirs})
                borrow(refiner.pipe, donor.pipe, component)
                refiner.shared[component] = donor_name
                moved[component] = donor_name
                break
        if not moved:
            continue
        refiner.prompts = PromptEncoder(refiner.pipe, refiner.family)
        refiner.variants.clear()
        total += len(moved)
        by_donor: dict[str, list[str]] = {}
        for component, donor_name in moved.items():
            by_donor.setdefault(donor_name, []).append(component)
        logger.info("%srefiner %s now uses %s (equal to its own, tensor for tensor): %s",
                    f"{worker}: " if worker else "", name,
                    " and ".join(f"the {' and '.join(c)} of {d}" for d, c in by_donor.items()),
                    f"{freed / 2**20:.1f} MiB of its own copies freed" if freed else
                    "the copies of an evicted model it held are freed")
    return total
