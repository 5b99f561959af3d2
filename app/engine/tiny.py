"""Tiny random-weight Stable Diffusion pipelines built in code.

These are the offline smoke-test models: the real diffusers pipeline classes with
components a few thousand times smaller than the real ones, built from a fixed seed so
every process gets the same weights. They need no download and run on a CPU in
milliseconds. Their images are noise-like; they prove the plumbing, not the art.

The VAE has four blocks, so latents are image/8 as in the real models, and the CLIP
tokenizer is written from a byte-level vocabulary with ``model_max_length=77``.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch

TINY_SEED = 0
# builtin:sleep-sdxl: the wall time of one denoising step (one UNet call), whatever the batch
SLEEP_STEP_S = 0.05
_TEXT_DIM = 32
_SPECIAL = ["<|startoftext|>", "<|endoftext|>"]
# A handful of merges so common words are single tokens, like the real vocabulary.
_MERGES = ["t h", "th e</w>", "a n", "an d</w>", "i n", "o n</w>", "e r</w>", "a t</w>"]


def bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible byte -> printable-unicode table."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars), strict=True))


def _write_tokenizer_files(folder: Path) -> tuple[Path, Path]:
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols]
    tokens += ["".join(m.split()) for m in _MERGES] + _SPECIAL
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    vocab_path = folder / "vocab.json"
    merges_path = folder / "merges.txt"
    vocab_path.write_text(json.dumps(vocab), encoding="utf-8")
    merges_path.write_text("#version: 0.2\n" + "\n".join(_MERGES) + "\n", encoding="utf-8")
    return vocab_path, merges_path


def tiny_tokenizer():
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        vocab_path, merges_path = _write_tokenizer_files(Path(tmp))
        tokenizer = CLIPTokenizer(
            vocab=str(vocab_path), merges=str(merges_path), model_max_length=77
        )
    return tokenizer


def _text_encoder(with_projection: bool, vocab_size: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
        hidden_size=_TEXT_DIM,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=vocab_size,
        max_position_embeddings=77,
        projection_dim=_TEXT_DIM,
        hidden_act="gelu",
    )
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(config)


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=[32, 32, 32, 32],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=32,
        sample_size=128,
        scaling_factor=0.13025,
    )


def _scheduler():
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
        num_train_timesteps=1000,
    )


def build_tiny_sdxl():
    """A StableDiffusionXLPipeline with tiny random weights (fixed seed)."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(TINY_SEED)
    tokenizer = tiny_tokenizer()
    vocab_size = len(tokenizer)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=6 * 8 + _TEXT_DIM,
        cross_attention_dim=2 * _TEXT_DIM,
        norm_num_groups=32,
    )
    components = {
        "unet": unet,
        "vae": _vae(),
        "text_encoder": _text_encoder(False, vocab_size),
        "text_encoder_2": _text_encoder(True, vocab_size),
        "tokenizer": tokenizer,
        "tokenizer_2": tiny_tokenizer(),
        "scheduler": _scheduler(),
    }
    return StableDiffusionXLPipeline(**components)


def build_sleep_sdxl(step_s: float = SLEEP_STEP_S):
    """`builtin:sleep-sdxl`, a load-testing model, not an image model: tiny-sdxl whose UNet
    does no work and sleeps `step_s` a call instead (one call a denoising step for the whole
    batch, as on a GPU that a batch does not saturate), so a job's time is fixed (steps x
    step_s, plus the tiny text encoders and VAE) and uses no CPU. Routing and batching can then
    be measured with more replicas than the host has cores (scripts/bench_scale.py). Its
    images are the scheduler's treatment of the seed's noise: nothing to look at.

    The pipeline carries `fixed_time_steps` (the step time): CPU batch-invariance wrapping
    (app.engine.determinism) is skipped for it, as it would call the UNet once per job."""
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

    pipe = build_tiny_sdxl()

    def forward(sample: torch.Tensor, *args, return_dict: bool = True, **kwargs):  # noqa: ANN002, ANN003, ANN202
        time.sleep(step_s)
        out = torch.zeros_like(sample)
        return UNet2DConditionOutput(sample=out) if return_dict else (out,)

    pipe.unet.forward = forward
    pipe.fixed_time_steps = step_s
    return pipe


def build_tiny_sd15():
    """A StableDiffusionPipeline (SD 1.x layout) with tiny random weights (fixed seed)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(TINY_SEED)
    tokenizer = tiny_tokenizer()
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        # As in real SD 1.x (and unlike SDXL), the first down block has attention.
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(2, 4),
        cross_attention_dim=_TEXT_DIM,
        norm_num_groups=32,
    )
    return StableDiffusionPipeline(
        unet=unet,
        vae=_vae(),
        text_encoder=_text_encoder(False, len(tokenizer)),
        tokenizer=tokenizer,
        scheduler=_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
