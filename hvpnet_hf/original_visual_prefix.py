"""
The visual prefix as the authors' released HVPNeT code computes it (`prefix_mode="original"`).

That code (which produced the paper's Table 1) differs from the paper's text. It is kept as its own class, apart
from the paper mode, so that checkpoints trained with it can be converted (`convert_original_checkpoint.py`) and
give the same outputs. What it does, per image:

1. Average-pool every backbone stage with `AvgPool2d(k, stride=k)`, `k = size // g` (a 7x7 map gets k=3: a 2x2
   grid over its top-left 6x6 corner), concatenate the pooled maps on channels: (C, g, g).
2. Reinterpret that memory with a raw view as g*g tokens of C features (not a transpose).
3. `encoder_conv`: Linear(C, 800) -> Tanh -> Linear(800, c * 2d), split into c chunks of 2d: the gate's "stages".
4. For layer l: gate = softmax(leaky_relu(W_l(mean of the chunks, flattened))), gated sum of the chunks: (g*g, 2d).
5. Concatenate the images of an example on the token axis, split key (first d) and value (last d), and turn each
   (P, d) into heads with a raw reshape to (H, P, h) (again not a transpose).

Absent images are all-zero images that are still gated and attended, as in that code: unlike the paper mode, a
masked image is not the same as no image. Only a forward without any pixel values is text-only.

Shapes: B = batch, n = images per example, N = B * n, L = text layers, c = chunks (one per backbone stage),
g = prefix grid side, t = g * g tokens per image, P = n * t, d = hidden size, H = heads, h = head size.

Saved with a model (`modeling_hvpnet.py` builds it for `prefix_mode="original"`).
"""

import torch
from torch import nn

from .configuration_hvpnet import HVPNetConfig
from .vision_backbone import HVPNetVisionEncoderBase, VisualPrefix

# Width of the hidden layer of the original `encoder_conv` MLP.
ORIGINAL_MLP_HIDDEN_SIZE = 800


class HVPNetOriginalVisualPrefixEncoder(HVPNetVisionEncoderBase):
    """Images → per-layer visual prefix in the layout of the authors' code, for all images in batched backbone calls.

    Module names follow that code (`encoder_conv`, one linear `gate` holding its L `gates`) so that its checkpoints
    map key by key.
    """

    def __init__(self, config: HVPNetConfig):
        super().__init__(config)
        reductions = self.backbone.feature_info.reduction()
        if self.maps_channels_last or len(set(reductions)) < len(reductions):
            layout = "channels-last maps" if self.maps_channels_last else "several levels of one resolution"
            raise ValueError(
                "prefix_mode='original' reproduces the authors' code, which pools the stage pyramid of a ResNet-50 "
                f"(channels first, one resolution per stage); vision_backbone {config.vision_backbone!r} gives "
                f"{layout}. Use prefix_mode='pyramid' with it."
            )
        self.num_stages = len(self.backbone.feature_info.channels())
        tokens = self.grid**2
        self.encoder_conv = nn.Sequential(
            nn.Linear(sum(self.backbone.feature_info.channels()), ORIGINAL_MLP_HIDDEN_SIZE),
            nn.Tanh(),
            nn.Linear(ORIGINAL_MLP_HIDDEN_SIZE, self.num_stages * 2 * self.hidden_size),
        )
        # The original's L gate layers Linear(t * 2d, c), stacked as one layer t * 2d -> L * c.
        self.gate = nn.Linear(tokens * 2 * self.hidden_size, self.num_layers * self.num_stages)

    def pool_feature_maps(self, feature_maps: list[torch.Tensor]) -> torch.Tensor:
        """(N, t, C): every stage pooled to g x g, concatenated on channels, raw-viewed."""
        pooled = []
        for stage, feature_map in enumerate(feature_maps):
            kernel = feature_map.shape[-2] // self.grid  # from the map's height, as in the original
            grid = nn.functional.avg_pool2d(feature_map, kernel_size=kernel, stride=kernel) if kernel > 0 else None
            if grid is None or grid.shape[-2:] != (self.grid, self.grid):
                raise ValueError(
                    f"prefix_mode='original' pools backbone stage {stage} (a {tuple(feature_map.shape[-2:])} map) "
                    f"with kernel height // prefix_grid, which does not give a {self.grid}x{self.grid} grid; use "
                    "square images large enough (the original code uses 224x224)"
                )
            pooled.append(grid)
        channels_first = torch.cat(pooled, dim=1).contiguous()  # (N, C, g, g)
        return channels_first.view(channels_first.shape[0], self.grid**2, -1)

    def forward(self, images: torch.Tensor, present: torch.Tensor) -> VisualPrefix:
        """images (B, n, 3, H, W) global image first, then object crops; present (B, n) bool.

        Absent images are replaced by zero images and, like every other image, attended.
        """
        present = present.to(device=images.device, dtype=torch.bool)
        images = images.masked_fill(~present[:, :, None, None, None], 0.0)
        features = self.visual_features(images.flatten(0, 1))
        return self.prefix_from_features(features.view(*present.shape, *features.shape[1:]), present)

    def prefix_from_features(self, features: torch.Tensor, present: torch.Tensor) -> VisualPrefix:
        """features (B, n, t, C) from `visual_features`; present (B, n). An absent image must hold the features of
        a zero image (what `forward` and the feature cache give it): it is attended like any other."""
        batch_size, num_images = present.shape
        features = features.flatten(0, 1).to(self.gate.weight.dtype)  # to the layers' dtype
        chunks = self.encoder_conv(features)
        chunks = chunks.view(features.shape[0], self.grid**2, self.num_stages, 2 * self.hidden_size)  # (N, t, c, 2d)
        gate_logits = self.gate(chunks.mean(dim=2).flatten(1)).view(-1, self.num_layers, self.num_stages)
        gate_weights = nn.functional.leaky_relu(gate_logits).float().softmax(dim=-1).to(chunks.dtype)  # (N, L, c)
        gated = torch.einsum("nlc,ntcd->nltd", gate_weights, chunks)  # (N, L, t, 2d)

        # Images of one example side by side on the token axis: (B, L, P, 2d).
        prefix = gated.view(batch_size, num_images, self.num_layers, -1, 2 * self.hidden_size).transpose(1, 2)
        prefix = prefix.flatten(2, 3)
        num_tokens = prefix.shape[2]

        def to_heads(states: torch.Tensor) -> tuple[torch.Tensor, ...]:
            """(B, L, P, d) → L tensors (B, H, P, h) by the original's raw reshape of each layer's (P, d) memory."""
            states = states.contiguous().view(batch_size, self.num_layers, self.num_heads, num_tokens, -1)
            return states.unbind(1)

        return VisualPrefix(
            keys=to_heads(prefix[..., : self.hidden_size]),
            values=to_heads(prefix[..., self.hidden_size :]),
            mask=present.new_ones(batch_size, num_tokens),
            gate_weights=gate_weights.view(batch_size, num_images, self.num_layers, self.num_stages),
        )


__all__ = ["HVPNetOriginalVisualPrefixEncoder"]
