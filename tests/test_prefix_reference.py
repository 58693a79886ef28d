"""The batched prefix encoder against a plain loop that follows the paper's equations one image, stage and layer at
a time (section 3.1-3.3). The loop is slow on purpose: it is the readable specification."""

import pytest
import torch
from modeling_utils import tiny_config, tiny_inputs
from torch.nn import functional

from hvpnet_hf import HVPNetModel


def paper_prefix(model: HVPNetModel, images: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values (L, H, P, h) for one example's images [global, object_1, ...], each (3, H, W)."""
    encoder = model.visual_encoder
    config = model.config
    layers, heads = config.text_config.num_hidden_layers, config.text_config.num_attention_heads
    grid = config.prefix_grid
    per_image = []  # per image: list over layers of (g*g, d)
    for image in images:
        feature_maps = encoder.backbone(image[None])
        stages = []
        for projection, stage in zip(encoder.stage_projections, encoder.stage_indices, strict=True):
            pooled = functional.adaptive_avg_pool2d(feature_maps[stage], grid)[0]  # (C, g, g)
            conv_weight = projection.weight[:, :, None, None]  # the 1x1 convolution of eq. 1-2
            projected = functional.conv2d(pooled[None], conv_weight, projection.bias)[0]  # (d, g, g)
            stages.append(projected.flatten(1).T)  # (g*g, d)
        layer_features = []
        for layer in range(layers):
            if config.prefix_mode == "pyramid":
                summary = torch.stack([stage.mean(0) for stage in stages]).mean(0)  # eq. 3: mean of GAPs
                gate_weight = encoder.gate.weight.view(layers, -1, summary.shape[0])[layer]
                gate_bias = encoder.gate.bias.view(layers, -1)[layer]
                gate = functional.softmax(functional.leaky_relu(gate_weight @ summary + gate_bias), dim=0)  # eq. 4
            else:
                gate = encoder.fixed_gate[layer]
            layer_features.append(sum(weight * stage for weight, stage in zip(gate, stages, strict=True)))  # eq. 5
        per_image.append(layer_features)
    keys, values = [], []
    for layer in range(layers):
        prefix = torch.cat([features[layer] for features in per_image])  # eq. 6: (P, d)
        key_value = prefix @ encoder.key_value_weight[layer].T + encoder.key_value_bias[layer]  # eq. 8
        key, value = key_value.chunk(2, dim=-1)
        keys.append(key.view(len(prefix), heads, -1).transpose(0, 1))
        values.append(value.view(len(prefix), heads, -1).transpose(0, 1))
    return torch.stack(keys), torch.stack(values)


@pytest.mark.parametrize("prefix_mode", ["pyramid", "flat", "one_to_three"])
def test_batched_prefix_matches_the_paper_loop(prefix_mode):
    torch.manual_seed(0)
    model = HVPNetModel(tiny_config(prefix_mode=prefix_mode)).eval()
    inputs = tiny_inputs()
    images = torch.cat([inputs["pixel_values"][:, None], inputs["object_pixel_values"]], dim=1)
    with torch.no_grad():
        prefix = model.visual_encoder(images, torch.ones(images.shape[:2], dtype=torch.bool))
        for example in range(len(images)):
            keys, values = paper_prefix(model, list(images[example]))
            # Same arithmetic in another order (einsum vs. loops, pool-then-project vs. conv): float32 rounding only.
            torch.testing.assert_close(prefix.keys[:, example], keys, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(prefix.values[:, example], values, atol=1e-5, rtol=1e-4)
