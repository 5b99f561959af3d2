"""models.yaml → typed model and LoRA specs.

The file is validated at start-up; any error names the file, the key and the fix, and
the server refuses to start rather than fail on the first request.

```yaml
models:
  sdxl-base:
    source: stabilityai/stable-diffusion-xl-base-1.0  # HF repo id, folder, .safetensors, builtin:tiny-sdxl
    family: sdxl            # optional: sdxl | sd15; read from the checkpoint when absent
    default_sampler: DPM++ 2M Karras
    dtype: auto             # auto | float16 | bfloat16 | float32
    vae: madebyollin/sdxl-vae-fp16-fix
    preload: true
loras:
  my-style: {path: loras/my-style.safetensors, family: sdxl}
lora_dirs: [loras]
embedding_dirs: [embeddings]   # textual inversion files (.safetensors), one word each: the stem
upscaler_dirs: [upscalers]     # ESRGAN/Real-ESRGAN/SwinIR/... .safetensors or weights-only .pth: the stem
annotator_dir: annotators      # ControlNet preprocessor weights (ControlNetHED.pth, sk_model.pth, ...)
model_dirs: [checkpoints]   # every *.safetensors checkpoint registers by its file stem
styles_file: styles.csv     # A1111's prompt styles (name,prompt,negative_prompt), app.styles
```
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from app.annotator_files import AnnotatorFiles, discover_annotators
from app.checkpoints import (
    CHECKPOINT_SUFFIXES,
    PICKLE_SUFFIXES,
    REFINER_CONFIG,
    CheckpointError,
    config_family,
    inspect_checkpoint,
    inspect_vae,
)
from app.controlnet_files import ControlNetSpec, discover_controlnets
from app.errors import CraftError, LoraError
from app.families import PIPELINE_FAMILIES, Family, family_label, is_refiner_layout
from app.lora_files import check_lora_file, read_header
from app.samplers import resolve_sampler
from app.styles import PromptStyle, StylesFileError, read_styles
from app.upscaler_files import UpscalerSpec, discover_upscalers

logger = logging.getLogger(__name__)

# tiny-*: offline smoke-test models; random-sdxl: full-size SDXL architecture with random
# weights, for speed measurements where no weights can be downloaded; sleep-sdxl: a
# load-testing model, not an image model: each step takes a fixed wall time without using
# the CPU (app.engine.tiny.build_sleep_sdxl), for measuring routing and batching.
BUILTIN_SOURCES = {
    "builtin:tiny-sdxl": "sdxl",
    "builtin:tiny-sd15": "sd15",
    "builtin:random-sdxl": "sdxl",
    "builtin:sleep-sdxl": "sdxl",
}
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class RegistryError(Exception):
    """models.yaml is unusable; the message names the file, the key and the fix."""


class _ModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    source: str
    family: Family | None = None
    default_sampler: str | None = None
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = "auto"
    vae: str | None = None
    preload: bool = False
    description: str | None = None
    config: str | None = None
    prediction: Literal["epsilon", "v"] = "epsilon"
    zero_terminal_snr: bool | None = None


class _LoraEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str
    family: Family | None = None


class _File(BaseModel):
    model_config = ConfigDict(extra="forbid")
    models: dict[str, _ModelEntry]
    loras: dict[str, _LoraEntry] = {}
    lora_dirs: list[str] = []
    embedding_dirs: list[str] = []
    upscaler_dirs: list[str] = []
    controlnet_dirs: list[str] = []
    annotator_dir: str | None = None
    model_dirs: list[str] = []
    styles_file: str | None = None


@dataclass(frozen=True)
class ModelSpec:
    name: str
    source: str  # builtin:..., an absolute local folder or .safetensors file, or a Hub repo id
    kind: Literal["builtin", "local", "hub", "single_file"]
    family: Family
    family_known: bool  # False when guessed from the name (corrected once loaded)
    default_sampler: str | None
    dtype: str
    vae: str | None
    preload: bool
    description: str | None = None
    # single_file only: the diffusers-format folder describing the architecture (None: the
    # bundled app/configs/<family>), see app.checkpoints.config_folder
    config: str | None = None
    prediction: Literal["epsilon", "v"] = "epsilon"
    zero_terminal_snr: bool = False  # v-prediction trained to zero terminal SNR
    # single_file only: the UNet's input channels read from the file (4 text to image, 9 a
    # dedicated inpainting checkpoint); the config folder's unet is built with this many
    in_channels: int = 4
    # SDXL's refiner layout (app.families.is_refiner_layout): served as a refiner only
    refiner_only: bool = False


@dataclass
class LoraSpec:
    name: str
    path: Path
    family: Family | None  # declared in models.yaml: only models of this family are tried
    error: str | None = None  # why the file cannot be used, found at registration
    # model name → None (its layers fit that model) or why not; filled at start-up by
    # app.engine.lora_fit against each model's architecture. A model missing here has an
    # architecture that could not be read: the load-time check decides.
    fits: dict[str, str | None] = field(default_factory=dict)

    def misfit(self, model: ModelSpec) -> str | None:
        """Why this LoRA cannot serve `model` (its own error first), or None."""
        if self.error:
            return self.error
        if model.name in self.fits:
            return self.fits[model.name]
        if self.family is not None and self.family != model.family:
            return f"is declared for another model family ({self.family})"
        return None


@dataclass(frozen=True)
class EmbeddingSpec:
    """A textual inversion embedding: prompts of its family use it by its name (the file stem)."""

    name: str
    path: Path
    family: Family
    vectors: int  # how many token positions it takes
    width: int  # per vector (SDXL: CLIP-L's and OpenCLIP-G's together)


@dataclass
class Registry:
    path: Path
    models: dict[str, ModelSpec]
    loras: dict[str, LoraSpec] = field(default_factory=dict)
    embeddings: list[EmbeddingSpec] = field(default_factory=list)
    # model upscalers of upscaler_dirs, by name (the file stem); app.engine.upscalers runs them
    upscalers: dict[str, UpscalerSpec] = field(default_factory=dict)
    # ControlNets of controlnet_dirs, by name; app.engine.controlnet runs them
    controlnets: dict[str, ControlNetSpec] = field(default_factory=dict)
    # the ControlNet preprocessors' weight files of annotator_dir; app.engine.annotators runs them
    annotators: AnnotatorFiles = field(default_factory=AnnotatorFiles)
    # A1111's prompt styles (models.yaml `styles_file:`), by name in the file's order
    styles: dict[str, PromptStyle] = field(default_factory=dict)
    styles_file: Path | None = None

    def embeddings_for(self, family: Family) -> dict[str, EmbeddingSpec]:
        """The embeddings prompts of `family` can use, by name; a file made for the other
        family is not among them (its word stays plain text there)."""
        return {e.name: e for e in self.embeddings if e.family == family}

    def model_names(self, family: Family | None = None) -> list[str]:
        return [n for n, m in self.models.items() if family is None or m.family == family]

    def lora_names(self, family: Family | None = None) -> list[str]:
        """The usable LoRAs that fit at least one model (of `family`, if given)."""
        models = [m for m in self.models.values() if family is None or m.family == family]
        return sorted(
            n for n, lora in self.loras.items()
            if any(lora.misfit(m) is None for m in models)
        )


def _resolve_source(raw: str, base: Path, where: str) -> tuple[str, str]:
    if raw in BUILTIN_SOURCES:
        return raw, "builtin"
    if raw.startswith("builtin:"):
        raise RegistryError(
            f"{where}.source: unknown builtin {raw!r}; use one of {sorted(BUILTIN_SOURCES)}"
        )
    expanded = Path(raw).expanduser()
    local = expanded if expanded.is_absolute() else base / expanded
    looks_local = raw.startswith(("/", ".", "~")) or local.exists()
    if looks_local:
        if local.suffix.lower() in CHECKPOINT_SUFFIXES + PICKLE_SUFFIXES:
            if not local.is_file():
                raise RegistryError(
                    f"{where}.source: {local} does not exist; fix the path (relative paths "
                    "resolve against the models file's folder)"
                )
            return str(local.resolve()), "single_file"
        if not local.is_dir():
            raise RegistryError(
                f"{where}.source: {local} is not a folder; give a diffusers model folder "
                "(with model_index.json), a .safetensors checkpoint or a Hugging Face repo id such as "
                "stabilityai/stable-diffusion-xl-base-1.0"
            )
        if not (local / "model_index.json").is_file():
            raise RegistryError(
                f"{where}.source: {local} has no model_index.json; point it at a diffusers "
                "folder (as saved by pipeline.save_pretrained)"
            )
        return str(local.resolve()), "local"
    if _REPO_ID.match(raw):
        return raw, "hub"
    raise RegistryError(
        f"{where}.source: {raw!r} is neither an existing folder nor a Hugging Face repo id "
        "(owner/name); relative folders resolve against the models file's folder"
    )


def _read_index(index_file: Path | str | None) -> dict:
    if not index_file:
        return {}
    try:
        index = json.loads(Path(index_file).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return index if isinstance(index, dict) else {}


def _family_from_index(index_file: Path | str | None) -> Family | None:
    return PIPELINE_FAMILIES.get(_read_index(index_file).get("_class_name"))


def _index_file(source: str, kind: str) -> Path | str | None:
    if kind == "local":
        return Path(source) / "model_index.json"
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(source, "model_index.json")
    except Exception:  # noqa: BLE001 - a broken cache only means "unknown"
        cached = None
    return cached if isinstance(cached, str) else None


def _detect_family(source: str, kind: str) -> Family | None:
    if kind == "builtin":
        return BUILTIN_SOURCES[source]  # type: ignore[return-value]
    return _family_from_index(_index_file(source, kind))


def _detect_refiner(source: str, kind: str) -> bool:
    """A folder or cached Hub repo in SDXL's refiner layout (a Hub repo not cached yet: False,
    and the engine refuses it as a job's model once loaded)."""
    if kind not in ("local", "hub"):
        return False
    return is_refiner_layout(_read_index(_index_file(source, kind)))


def _local_path(raw: str, base: Path) -> Path:
    path = Path(raw).expanduser()
    return (path if path.is_absolute() else base / path).resolve()


def _folders(raws: list[str], key: str, base: Path, file: Path) -> list[Path]:
    """The folders of a `*_dirs:` list (relative ones against the models file's folder); a
    missing one stops the start, naming the key."""
    folders = [_local_path(raw, base) for raw in raws]
    for folder in folders:
        if not folder.is_dir():
            raise RegistryError(f"{file}: {key}: {folder} is not a folder; create it or remove the entry")
    return folders


def _config_folder(entry: _ModelEntry, kind: str, base: Path, where: str,
                   refiner: bool = False) -> str | None:
    """The entry's `config:` folder, checked; `refiner`: the file is SDXL's refiner, whose
    folder has no first text encoder or tokenizer (app/configs/sdxl-refiner's layout)."""
    if entry.config is None:
        return None
    if kind != "single_file":
        raise RegistryError(
            f"{where}.config: only a single-file `source:` (.safetensors) takes a config folder; "
            "remove `config:`"
        )
    folder = _local_path(entry.config, base)
    if not folder.is_dir():
        raise RegistryError(
            f"{where}.config: {folder} is not a folder; give a diffusers-format folder "
            "(model_index.json, unet/, vae/, text_encoder/, tokenizer/, ... configs, no weights) "
            "or remove `config:` to use the bundled stock configs"
        )
    parts = (("model_index.json", "unet/config.json", "vae/config.json", "text_encoder_2/config.json",
              "tokenizer_2") if refiner else
             ("model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json",
              "tokenizer"))
    missing = [part for part in parts if not (folder / part).exists()]
    if missing:
        raise RegistryError(
            f"{where}.config: {folder} lacks {', '.join(missing)}; a config folder is laid out "
            "like a diffusers model folder (as pipeline.save_pretrained writes it), without weights"
        )
    return str(folder)


def _single_file_family(source: str, entry: _ModelEntry, where: str) -> tuple[Family, bool, int, bool]:
    """(family, zero terminal SNR, UNet input channels, SDXL's refiner) read from the
    checkpoint; RegistryError with the reason."""
    try:
        info = inspect_checkpoint(source, prediction=entry.prediction)
    except CheckpointError as exc:
        raise RegistryError(f"{where}.source: cannot be served: {exc.reason}") from None
    ztsnr = entry.zero_terminal_snr if entry.zero_terminal_snr is not None else info.zero_terminal_snr
    return info.family, ztsnr, info.in_channels, info.refiner


def _vae_source(raw: str | None, base: Path, where: str) -> str | None:
    """A Hub repo id or folder as given; a single-file VAE as an absolute path, checked."""
    if raw is None:
        return None
    path = _local_path(raw, base)
    if path.suffix.lower() not in CHECKPOINT_SUFFIXES + PICKLE_SUFFIXES:
        return str(path) if path.is_dir() else raw
    if not path.is_file():
        raise RegistryError(f"{where}.vae: {path} does not exist; fix the path or remove `vae:`")
    try:
        inspect_vae(path)
    except CheckpointError as exc:
        raise RegistryError(f"{where}.vae: cannot be used: {exc.reason}") from None
    return str(path)


def _model_spec(name: str, entry: _ModelEntry, base: Path, file: Path) -> ModelSpec:
    where = f"{file}: models.{name}"
    source, kind = _resolve_source(entry.source, base, where)
    ztsnr = bool(entry.zero_terminal_snr)
    in_channels = 4
    refiner_only = False
    if kind == "single_file":
        detected, ztsnr, in_channels, refiner_only = _single_file_family(source, entry, where)
        config = _config_folder(entry, kind, base, where, refiner_only)
        from_config = config_family(config) if config else None
        if from_config and from_config != detected:
            raise RegistryError(
                f"{where}.config: the folder describes a {from_config} pipeline but the "
                f"checkpoint is {detected}; point `config:` at a {detected} folder"
            )
        if config and refiner_only != is_refiner_layout(_read_index(Path(config) / "model_index.json")):
            what = ("SDXL's refiner (one text encoder) but the folder describes a model with two"
                    if refiner_only else "not SDXL's refiner but the folder describes the refiner's layout")
            raise RegistryError(
                f"{where}.config: the checkpoint is {what} (model_index.json); point `config:` at a "
                "folder of the checkpoint's layout, or remove it to use the bundled "
                f"app/configs/{REFINER_CONFIG if refiner_only else detected}"
            )
    else:
        config = _config_folder(entry, kind, base, where)
        if entry.prediction != "epsilon" or entry.zero_terminal_snr is not None:
            raise RegistryError(
                f"{where}.prediction: only single-file sources take `prediction:` / "
                "`zero_terminal_snr:` (a diffusers folder's scheduler config says it); remove them"
            )
        detected = _detect_family(source, kind)
        refiner_only = _detect_refiner(source, kind)
    family = entry.family or detected
    known = family is not None
    if family is None:
        family = "sdxl" if "xl" in f"{name} {source}".lower() else "sd15"
        logger.warning(
            "%s: family not declared and not readable before download; assuming %s "
            "(set `family:` to be sure)",
            where,
            family,
        )
    elif entry.family and detected and entry.family != detected:
        raise RegistryError(
            f"{where}.family: declared {entry.family} but the checkpoint is {detected}; "
            "remove `family:` or correct it"
        )
    if entry.default_sampler is not None:
        _check_sampler(entry.default_sampler, f"{where}.default_sampler")
    return ModelSpec(
        name=name,
        source=source,
        kind=kind,  # type: ignore[arg-type]
        family=family,
        family_known=known,
        default_sampler=entry.default_sampler,
        dtype=entry.dtype,
        vae=_vae_source(entry.vae, base, where),
        preload=entry.preload,
        description=entry.description,
        config=config,
        prediction=entry.prediction,
        zero_terminal_snr=ztsnr,
        in_channels=in_channels,
        refiner_only=refiner_only,
    )


def _check_sampler(name: str, where: str) -> None:
    try:
        resolve_sampler(name)
    except CraftError as exc:
        raise RegistryError(f"{where}: {exc.message}") from None


def _lora_spec(name: str, path: Path, family: Family | None) -> LoraSpec:
    """The LoRA's spec, its file checked to be a plain LoRA (header only). Which models it fits
    is matched later against their architectures (app.engine.lora_fit); a declared family
    limits it to the models of that family."""
    spec = LoraSpec(name=name, path=path, family=family)
    try:
        check_lora_file(path, name=name)
    except LoraError as exc:
        spec.error = exc.reason
        logger.warning("LoRA %r (%s) cannot be used: %s", name, path, exc.reason)
    return spec


def _collect_loras(data: _File, base: Path, file: Path) -> dict[str, LoraSpec]:
    loras: dict[str, LoraSpec] = {}
    for folder in _folders(data.lora_dirs, "lora_dirs", base, file):
        for path in sorted(folder.glob("*.safetensors")):
            loras[path.stem] = _lora_spec(path.stem, path.resolve(), None)
    for name, entry in data.loras.items():
        path = Path(entry.path).expanduser()
        path = path if path.is_absolute() else base / path
        if not path.is_file():
            raise RegistryError(
                f"{file}: loras.{name}.path: {path} does not exist; fix the path "
                "(relative paths resolve against the models file's folder) or remove the entry"
            )
        loras[name] = _lora_spec(name, path.resolve(), entry.family)
    return loras


def _embedding_spec(path: Path) -> EmbeddingSpec | None:
    """The embedding in a .safetensors file (A1111's formats: SD 1.x `emb_params` [n, width],
    SDXL `clip_l` + `clip_g`), or None with a warning naming the file."""
    try:
        header = read_header(path, name=path.stem)
    except LoraError as exc:
        logger.warning("embedding %r (%s) cannot be used: %s", path.stem, path,
                       exc.reason.replace("LoRA", "embedding"))
        return None
    shapes = header.shapes
    if set(shapes) >= {"clip_l", "clip_g"}:
        family: Family = "sdxl"
        shape = shapes["clip_l"]
        fits = len(shape) == 2 and len(shapes["clip_g"]) == 2 and shape[0] == shapes["clip_g"][0]
        width = shape[-1] + shapes["clip_g"][-1] if fits else 0
    elif "emb_params" in shapes:
        family = "sd15"
        shape = shapes["emb_params"]
        fits = len(shape) == 2
        width = shape[-1] if fits else 0
    else:
        logger.warning("embedding %r (%s) cannot be used: it has neither `emb_params` (SD 1.x) nor "
                       "`clip_l` and `clip_g` (SDXL) tensors of shape [vectors, width]", path.stem, path)
        return None
    if not fits or shape[0] < 1:
        logger.warning("embedding %r (%s) cannot be used: its tensors are not [vectors, width] with "
                       "the same number of vectors", path.stem, path)
        return None
    return EmbeddingSpec(name=path.stem, path=path.resolve(), family=family, vectors=shape[0],
                         width=width)


def _collect_embeddings(data: _File, base: Path, file: Path,
                        models: dict[str, ModelSpec]) -> list[EmbeddingSpec]:
    found: dict[tuple[str, str], EmbeddingSpec] = {}
    served = {m.family for m in models.values()}
    for folder in _folders(data.embedding_dirs, "embedding_dirs", base, file):
        for path in sorted(folder.iterdir()):
            if path.suffix.lower() in (".pt", ".bin", ".ckpt"):
                logger.warning("embedding %r (%s) is not read: only .safetensors embeddings are "
                               "(a %s file is a pickle, which can run code); convert it",
                               path.stem, path, path.suffix)
                continue
            if path.suffix != ".safetensors" or not path.is_file():
                continue
            spec = _embedding_spec(path)
            if spec is None:
                continue
            if (spec.name, spec.family) in found:
                logger.warning("embedding %r (%s): another file of that name came first; ignored",
                               spec.name, path)
                continue
            if spec.family not in served:
                logger.warning("embedding %r is made for %s and no %s model is served: prompts of "
                               "the other family keep the word %r as plain text", spec.name,
                               family_label(spec.family), family_label(spec.family), spec.name)
            found[(spec.name, spec.family)] = spec
    return list(found.values())


def _dir_models(data: _File, base: Path, file: Path, explicit: dict[str, ModelSpec]) -> dict[str, ModelSpec]:
    """Every checkpoint file of `model_dirs:` as a model named by its stem, family detected.
    Two files with one name stop the start; a file that cannot be served is logged and skipped."""
    found: dict[str, Path] = {}
    for folder in _folders(data.model_dirs, "model_dirs", base, file):
        for path in sorted(folder.iterdir()):
            if path.suffix.lower() not in CHECKPOINT_SUFFIXES + PICKLE_SUFFIXES or not path.is_file():
                continue
            other = found.get(path.stem)
            if other is None and path.stem in explicit and explicit[path.stem].source != str(path):
                other = Path(explicit[path.stem].source)
            if other is not None and other != path:
                raise RegistryError(
                    f"{file}: model_dirs: two models named {path.stem!r}: {other} and {path}; "
                    "rename one of the files (a model is named by its file stem)"
                )
            found[path.stem] = path
    models: dict[str, ModelSpec] = {}
    for name, path in found.items():
        if name in explicit:
            continue  # listed under models: with its own settings
        try:
            info = inspect_checkpoint(path)
        except CheckpointError as exc:
            logger.warning("model_dirs: %s is not served: %s", path, exc.reason)
            continue
        models[name] = ModelSpec(
            name=name,
            source=str(path),
            kind="single_file",
            family=info.family,
            family_known=True,
            default_sampler=None,
            dtype="auto",
            vae=None,
            preload=False,
            zero_terminal_snr=info.zero_terminal_snr,
            in_channels=info.in_channels,
            refiner_only=info.refiner,
        )
    return models


def _styles(data: _File, base: Path, file: Path) -> tuple[dict[str, PromptStyle], Path | None]:
    """The styles of `styles_file:` (relative to the models file's folder) and its path; a
    file that is missing or unreadable stops the start (or the reload), naming it."""
    if data.styles_file is None:
        return {}, None
    path = _local_path(data.styles_file, base)
    if not path.is_file():
        raise RegistryError(f"{file}: styles_file: {path} is not a file; create it (A1111's "
                            "styles.csv: name,prompt,negative_prompt) or remove the entry")
    try:
        return read_styles(path), path
    except StylesFileError as exc:
        raise RegistryError(f"{file}: styles_file: {exc}") from None


def _annotators(data: _File, base: Path, file: Path) -> AnnotatorFiles:
    """The weight files of `annotator_dir:` (relative to the models file's folder); a folder
    that is missing stops the start (or the reload), naming the key."""
    if data.annotator_dir is None:
        return AnnotatorFiles()
    return discover_annotators(_folders([data.annotator_dir], "annotator_dir", base, file)[0])


def _format_validation(exc: ValidationError, file: Path) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            lines.append(f"{file}: {key}: unknown key; remove it or check its spelling")
        else:
            lines.append(f"{file}: {key}: {err['msg']}")
    return "\n".join(lines)


def load_registry(path: Path) -> Registry:
    """Read and validate a models file. Raises RegistryError with a message fit for a user."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RegistryError(
            f"{path}: no such models file; pass --models PATH or set CRAFTSERVE_MODELS"
        ) from None
    except yaml.YAMLError as exc:
        raise RegistryError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise RegistryError(f"{path}: expected a mapping with a `models:` key")
    try:
        data = _File.model_validate(raw)
    except ValidationError as exc:
        raise RegistryError(_format_validation(exc, path)) from None
    if not data.models and not data.model_dirs:
        raise RegistryError(f"{path}: models: is empty; declare at least one model")
    base = path.resolve().parent
    models = {name: _model_spec(name, e, base, path) for name, e in data.models.items()}
    models.update(_dir_models(data, base, path, models))
    if not models:
        raise RegistryError(f"{path}: model_dirs: no servable checkpoint found; see the warnings above")
    styles, styles_file = _styles(data, base, path)
    return Registry(path=path, models=models, loras=_collect_loras(data, base, path),
                    embeddings=_collect_embeddings(data, base, path, models),
                    upscalers=discover_upscalers(_folders(data.upscaler_dirs, "upscaler_dirs", base, path)),
                    controlnets=discover_controlnets(_folders(data.controlnet_dirs, "controlnet_dirs",
                                                              base, path)),
                    annotators=_annotators(data, base, path),
                    styles=styles, styles_file=styles_file)
