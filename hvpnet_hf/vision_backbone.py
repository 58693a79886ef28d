"""
The timm feature pyramid a visual prefix is read from (paper §3.1: the backbone's feature maps F_1 ... F_c), the base
of the prefix encoders that run it, and the per-layer prefix they hand to the text model's attention
(`VisualPrefix`). Building a backbone never downloads weights.

Saved with a model (`modeling_hvpnet.py` imports it): it imports only timm, torch and the configuration.
"""

from dataclasses import dataclass

import timm
import torch
from timm.layers import Format
from torch import nn

from .configuration_hvpnet import HVPNetConfig


@dataclass
class VisualPrefix:
    """Per-layer visual prefix: keys and values, tuples of L tensors (B, H, P, h), mask (B, P) True where an image is
    present, gate weights (B, n, L, c).

    One tensor per layer rather than one (L, B, H, P, h) tensor: the backward of a layer's slice of a stacked tensor
    would fill a zero tensor of the whole stack for each layer."""

    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]
    mask: torch.Tensor
    gate_weights: torch.Tensor


# When `vision_out_indices` is None, the prefix reads this many backbone levels: the paper's four ResNet stages.
NUM_DEFAULT_LEVELS = 4


def create_feature_backbone(config: HVPNetConfig, pretrained: bool | str = False) -> nn.Module:
    """The timm feature extractor (`features_only=True`) of `config.vision_backbone` at the levels
    `config.vision_out_indices`, or `default_out_indices` when None; its `feature_info.out_indices` are the levels
    used. `pretrained`: False (random weights, nothing downloaded), True (timm's pretrained weights) or the path of a
    local checkpoint file."""
    levels = config.vision_out_indices
    if levels is None:
        levels = default_out_indices(config.vision_backbone, config.vision_model_args)
    return _timm_features(
        config.vision_backbone,
        config.vision_model_args,
        pretrained=bool(pretrained),
        out_indices=tuple(levels),
        pretrained_cfg_overlay={"file": pretrained} if isinstance(pretrained, str) else None,
    )


def default_out_indices(backbone: str, model_args: dict) -> list[int]:
    """The backbone levels a prefix reads by default. A plain ViT's levels are its blocks, all of one resolution:
    four of them spread evenly over its depth, as DPT (Ranftl et al., ICCV 2021) reads blocks 3, 6, 9 and 12 of a
    ViT-B (its last four blocks would see nearly the same features). Any other backbone (CNN, Swin): its last four
    levels, the four ResNet stages of the paper."""
    with torch.device("meta"):  # only the layout of the levels is read: no weights are allocated or initialized
        levels = _timm_features(backbone, model_args, pretrained=False).feature_info.info
    count = len(levels)
    if len({level["reduction"] for level in levels}) == 1 and count > NUM_DEFAULT_LEVELS:
        return [count * (level + 1) // NUM_DEFAULT_LEVELS - 1 for level in range(NUM_DEFAULT_LEVELS)]
    return list(range(max(count - NUM_DEFAULT_LEVELS, 0), count))


def _timm_features(backbone: str, model_args: dict, **kwargs) -> nn.Module:
    """`timm.create_model(backbone, features_only=True, ...)`, with an error naming the backbone when timm cannot
    build it as a feature extractor (an unknown name, a model without feature maps, a wrong model argument)."""
    # Without a classifier (`num_classes=0`): the feature extractor drops it, and building it would only allocate
    # and free its weights.
    try:
        return timm.create_model(backbone, features_only=True, **{"num_classes": 0, **model_args}, **kwargs)
    except (AssertionError, AttributeError, RuntimeError, TypeError) as error:
        raise ValueError(
            f"vision_backbone {backbone!r}: timm cannot build it with features_only=True, which HVPNeT reads its "
            f"visual prefix from ({type(error).__name__}: {error})"
        ) from error


class HVPNetVisionEncoderBase(nn.Module):
    """What the prefix encoders share: sizes read from the config and the timm feature pyramid
    (`features_only=True`, levels `config.vision_out_indices`), frozen when `config.freeze_vision`: no autograd
    through it and fixed BatchNorm statistics. Building it never downloads weights.

    Every encoder has a fixed part, `visual_features` (backbone and pooling to the prefix grid: what a feature cache
    stores when the backbone is frozen), and a trainable part, `prefix_from_features`; `forward` chains the two.
    """

    def __init__(self, config: HVPNetConfig):
        super().__init__()
        text_config = config.text_config
        self.num_layers = text_config.num_hidden_layers
        self.num_heads = text_config.num_attention_heads
        self.hidden_size = text_config.hidden_size
        self.grid = config.prefix_grid
        self.freeze_backbone = config.freeze_vision
        self.chunk_size = config.vision_chunk_size
        self.backbone = create_feature_backbone(config)
        # EfficientNet and MobileNetV3 features come from timm classes of their own, channels first, that do not
        # set `output_fmt`.
        self.maps_channels_last = Format(getattr(self.backbone, "output_fmt", Format.NCHW)) == Format.NHWC
        # timm zero-initializes the last BatchNorm weight of every residual block (`zero_init_last`); mark those
        # BatchNorms so that `_init_weights` does the same for weights missing from a checkpoint.
        for block in self.backbone.modules():
            if hasattr(block, "zero_init_last"):
                [*_, last_norm] = (child for child in block.children() if isinstance(child, nn.BatchNorm2d))
                last_norm.zero_init_weight = True
        if self.freeze_backbone:
            self.backbone.requires_grad_(False)
            self.backbone.eval()

    def train(self, mode: bool = True) -> "HVPNetVisionEncoderBase":
        super().train(mode)
        if self.freeze_backbone:
            self.backbone.eval()
        return self

    def visual_features(self, images: torch.Tensor) -> torch.Tensor:
        """images (N, 3, H, W) → (N, g*g, C) the pooled backbone features, C channels over the used stages.

        The backbone sees at most `config.vision_chunk_size` images per call, so its peak memory follows the chunk.
        """
        # An exported graph runs all images in one call: the number of chunks would tie it to one batch size.
        chunked = self.chunk_size and not torch.compiler.is_exporting()
        chunks = images.split(self.chunk_size) if chunked else (images,)
        # Pixels arrive in float32; a backbone in bfloat16 (a bf16 model, or a frozen backbone held in bfloat16)
        # takes them in its own dtype.
        dtype = next(self.backbone.parameters()).dtype
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_backbone):
            return torch.cat([self.pool_feature_maps(self.backbone(chunk.to(dtype))) for chunk in chunks])

    def pool_feature_maps(self, feature_maps: list[torch.Tensor]) -> torch.Tensor:
        """One map (N, C_i, H_i, W_i) per pyramid level → (N, g*g, C) the features the trainable part reads."""
        raise NotImplementedError

    def prefix_from_features(self, features: torch.Tensor, present: torch.Tensor) -> VisualPrefix:
        """features (B, n, g*g, C) from `visual_features`, present (B, n) bool → the per-layer visual prefix."""
        raise NotImplementedError

    def load_pretrained_backbone(self, pretrained: bool | str, config: HVPNetConfig) -> None:
        """Load timm's pretrained weights (`True`) or a local checkpoint file (a path) into the backbone."""
        self.backbone.load_state_dict(create_feature_backbone(config, pretrained).state_dict())

    def channels_first(self, feature_maps: list[torch.Tensor]) -> list[torch.Tensor]:
        """The backbone's maps as (N, C_i, H_i, W_i). Hierarchical transformers such as Swin give them channels last,
        (N, H_i, W_i, C_i), as timm's `output_fmt` says; plain ViTs come as grids of their patch tokens, without the
        class and register tokens (timm's `forward_intermediates` leaves those out)."""
        if self.maps_channels_last:
            return [feature_map.permute(0, 3, 1, 2) for feature_map in feature_maps]
        return feature_maps


__all__ = ["HVPNetVisionEncoderBase", "VisualPrefix", "create_feature_backbone", "default_out_indices"]
