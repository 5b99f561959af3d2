"""MiDaS DPT-Hybrid, the net of sd-webui-controlnet's `depth_midas` (`dpt_hybrid-midas-501f0c75.pt`),
run as transformers' `DPTForDepthEstimation` (`is_hybrid=True`) with the original file's
tensors renamed onto it.

The original net (isl-org/MiDaS `DPTDepthModel(backbone="vitb_rn50_384", non_negative=True)`,
the extension's `annotator/midas`): timm's `vit_base_resnet50_384` (a BiT ResNet-50 stem of
3 stages, weight-standardised 'same'-padded convolutions and group norms, under a ViT-B/16 of
12 blocks whose 24x24 position embeddings are resized bilinearly to the picture's grid), the
activations of the stem's first two stages and of blocks 8 and 11, the latter two
reassembled ("project" readout, a 1x1 convolution, for the last one a 3x3 stride-2 one), the
four maps through `scratch.layer*_rn` and four fusion blocks, and the head (conv, 2x bilinear
upsampling, conv, ReLU, 1x1 conv, ReLU). transformers' hybrid DPT is that net module for
module; what its `forward` does not do is run at other sizes than `image_size` (its
embeddings refuse them, and its reassembly assumes a square grid), so `DepthNet.depth` runs
the same modules itself with the position embeddings resized and the grid given.

`original_to_transformers` renames the file's keys (`pretrained.model.*`, `pretrained.act_postprocess*`,
`scratch.*`) and splits each block's fused `qkv` into query, key and value. The one group of
tensors it drops on purpose is `pretrained.model.head.*`, timm's ImageNet classifier, which the
original never runs either. A key it does not know is kept under its own name, so the strict
load (app.engine.annotators.build_net) reports it as unexpected.
"""

from __future__ import annotations

import re

import torch
from transformers import BitConfig, DPTConfig, DPTForDepthEstimation

FILE = "dpt_hybrid-midas-501f0c75.pt"

# the original's ImageNet classifier: in the file, never used by the depth net
DROPPED = re.compile(r"pretrained\.model\.head\.(weight|bias)")

_BACKBONE = "dpt.embeddings.backbone.bit."
_BLOCK, _LAYER = r"pretrained\.model\.blocks\.(\d+)\.", r"dpt.encoder.layer.\1."
_RENAMES: list[tuple[re.Pattern[str], str]] = [(re.compile(p), r) for p, r in [
    (r"pretrained\.model\.cls_token", "dpt.embeddings.cls_token"),
    (r"pretrained\.model\.pos_embed", "dpt.embeddings.position_embeddings"),
    (r"pretrained\.model\.patch_embed\.proj\.(\w+)", r"dpt.embeddings.projection.\1"),
    (r"pretrained\.model\.patch_embed\.backbone\.stem\.conv\.(\w+)", _BACKBONE + r"embedder.convolution.\1"),
    (r"pretrained\.model\.patch_embed\.backbone\.stem\.norm\.(\w+)", _BACKBONE + r"embedder.norm.\1"),
    (r"pretrained\.model\.patch_embed\.backbone\.stages\.(\d+)\.blocks\.(\d+)\."
     r"((?:downsample\.)?(?:conv|norm)\d?\.\w+)", _BACKBONE + r"encoder.stages.\1.layers.\2.\3"),
    (_BLOCK + r"norm1\.(\w+)", _LAYER + r"layernorm_before.\2"),
    (_BLOCK + r"norm2\.(\w+)", _LAYER + r"layernorm_after.\2"),
    (_BLOCK + r"attn\.proj\.(\w+)", _LAYER + r"attention.output.dense.\2"),
    (_BLOCK + r"mlp\.fc1\.(\w+)", _LAYER + r"intermediate.dense.\2"),
    (_BLOCK + r"mlp\.fc2\.(\w+)", _LAYER + r"output.dense.\2"),
    (r"pretrained\.model\.norm\.(\w+)", r"dpt.layernorm.\1"),
    (r"pretrained\.act_postprocess3\.0\.project\.0\.(\w+)", r"neck.reassemble_stage.readout_projects.2.0.\1"),
    (r"pretrained\.act_postprocess4\.0\.project\.0\.(\w+)", r"neck.reassemble_stage.readout_projects.3.0.\1"),
    (r"pretrained\.act_postprocess3\.3\.(\w+)", r"neck.reassemble_stage.layers.2.projection.\1"),
    (r"pretrained\.act_postprocess4\.3\.(\w+)", r"neck.reassemble_stage.layers.3.projection.\1"),
    (r"pretrained\.act_postprocess4\.4\.(\w+)", r"neck.reassemble_stage.layers.3.resize.\1"),
    (r"scratch\.output_conv\.([024])\.(\w+)", r"head.head.\1.\2"),
]]
_QKV = re.compile(r"pretrained\.model\.blocks\.(\d+)\.attn\.qkv\.(\w+)")
_LAYER_RN = re.compile(r"scratch\.layer([1-4])_rn\.(\w+)")
_REFINE = re.compile(r"scratch\.refinenet([1-4])\.(out_conv|resConfUnit([12])\.conv([12]))\.(\w+)")


def _rename(key: str) -> str | None:
    """The transformers name of an original key that maps one to one (None: it does not)."""
    for pattern, replacement in _RENAMES:
        if pattern.fullmatch(key):
            return pattern.sub(replacement, key)
    if found := _LAYER_RN.fullmatch(key):
        return f"neck.convs.{int(found[1]) - 1}.{found[2]}"
    if found := _REFINE.fullmatch(key):
        # refinenet4 (the deepest) is the fusion stage's first layer
        layer = f"neck.fusion_stage.layers.{4 - int(found[1])}"
        if found[2] == "out_conv":
            return f"{layer}.projection.{found[5]}"
        return f"{layer}.residual_layer{found[3]}.convolution{found[4]}.{found[5]}"
    return None


def original_to_transformers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The original file's tensors under transformers' names (see the module docstring)."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if DROPPED.fullmatch(key):
            continue
        if (found := _QKV.fullmatch(key)) and tensor.shape[0] % 3 == 0:
            for part, name in zip(tensor.chunk(3, dim=0), ("query", "key", "value"), strict=True):
                out[f"dpt.encoder.layer.{found[1]}.attention.attention.{name}.{found[2]}"] = part.clone()
            continue
        out[_rename(key) or key] = tensor
    return out


def dpt_hybrid_config(*, hidden_size: int = 768, heads: int = 12, mlp: int = 3072,
                      stem: int = 64, stages: tuple[int, int, int] = (256, 512, 1024),
                      depths: tuple[int, int, int] = (3, 4, 9), groups: int = 32,
                      neck: tuple[int, int] = (768, 768), fusion: int = 256) -> DPTConfig:
    """DPT-Hybrid's configuration, built here (no download). The defaults are MiDaS's
    `vitb_rn50_384`; the other sizes exist for tests on a narrower net of the same layout."""
    backbone = BitConfig(global_padding="same", layer_type="bottleneck", depths=list(depths),
                         hidden_sizes=[*stages, stages[-1] * 2], embedding_size=stem, num_groups=groups,
                         out_features=["stage1", "stage2", "stage3"], embedding_dynamic_padding=True)
    return DPTConfig(
        is_hybrid=True, backbone_config=backbone, backbone_featmap_shape=[1, stages[-1], 24, 24],
        hidden_size=hidden_size, num_hidden_layers=12, num_attention_heads=heads, intermediate_size=mlp,
        hidden_act="gelu", layer_norm_eps=1e-6,  # timm's ViT
        image_size=384, patch_size=16, qkv_bias=True, readout_type="project",
        backbone_out_indices=[0, 1, 8, 11], neck_hidden_sizes=[stages[0], stages[1], *neck],
        reassemble_factors=[1, 1, 1, 0.5], fusion_hidden_size=fusion, head_in_index=-1,
        use_batch_norm_in_fusion_residual=False, add_projection=False,
    )


class DepthNet(DPTForDepthEstimation):
    """transformers' DPT-Hybrid depth net, built from `dpt_hybrid_config()` unless given one;
    `from_file_state` names a file's tensors for it, `depth` runs it at any size."""

    def __init__(self, config: DPTConfig | None = None) -> None:
        super().__init__(config or dpt_hybrid_config())

    @staticmethod
    def from_file_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return original_to_transformers(state)

    def depth(self, pixels: torch.Tensor) -> torch.Tensor:
        """The relative inverse depth (N x H x W) of pictures (N x 3 x H x W, sides multiples of
        32): the modules of `forward`, with the position embeddings resized to the grid."""
        height, width = pixels.shape[-2:]
        embedded = self.dpt.embeddings(pixels, interpolate_pos_encoding=True)
        hidden = embedded.last_hidden_states
        picked = list(embedded.intermediate_activations)
        wanted = self.config.backbone_out_indices[2:]
        for index, layer in enumerate(self.dpt.encoder.layer[: max(wanted) + 1]):
            hidden = layer(hidden)
            if index in wanted:
                picked.append(hidden)
        patch = self.config.patch_size
        return self.head(self.neck(picked, height // patch, width // patch))
