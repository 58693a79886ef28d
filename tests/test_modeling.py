"""The HVPNeT encoder: prefix attention, ablation modes, masking, batching and the frozen backbone."""

import pytest
import torch
from modeling_utils import IMAGE_SIZE, tiny_config, tiny_inputs
from transformers import BertModel
from transformers.models.bert.modeling_bert import BertSelfAttention

from hvpnet_hf import HVPNetConfig, HVPNetModel
from hvpnet_hf.modeling_hvpnet import HVPNetSelfAttention

# float32 attention over a few dozen positions: differences between equivalent computations stay near 1e-6.
ATOL = 1e-5


def build(**overrides) -> HVPNetModel:
    torch.manual_seed(0)
    return HVPNetModel(tiny_config(**overrides)).eval()


def text_only_reference(model: HVPNetModel) -> BertModel:
    bert = BertModel(model.config.text_config).eval()
    bert.load_state_dict(model.text_model.state_dict())
    return bert


def test_self_attention_subclasses_bert():
    assert issubclass(HVPNetSelfAttention, BertSelfAttention)
    model = build()
    assert all(isinstance(layer.attention.self, HVPNetSelfAttention) for layer in model.text_model.encoder.layer)


def test_without_visual_prefix_equals_bert():
    model = build(use_visual_prefix=False)
    assert model.visual_encoder is None
    inputs = tiny_inputs()
    expected = text_only_reference(model)(inputs["input_ids"], attention_mask=inputs["attention_mask"])
    output = model(**inputs)
    torch.testing.assert_close(output.last_hidden_state, expected.last_hidden_state, atol=ATOL, rtol=0)
    torch.testing.assert_close(output.pooler_output, expected.pooler_output, atol=ATOL, rtol=0)


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_all_images_masked_equals_bert(attn_implementation):
    model = build()
    model.set_attn_implementation(attn_implementation)
    inputs = tiny_inputs()
    batch_size = len(inputs["input_ids"])
    masked = model(
        **inputs,
        image_mask=torch.zeros(batch_size, dtype=torch.bool),
        object_mask=torch.zeros(batch_size, 2, dtype=torch.bool),
    )
    expected = text_only_reference(model)(inputs["input_ids"], attention_mask=inputs["attention_mask"])
    torch.testing.assert_close(masked.last_hidden_state, expected.last_hidden_state, atol=ATOL, rtol=0)
    # and the images do matter when they are not masked
    assert (model(**inputs).last_hidden_state - expected.last_hidden_state).abs().max() > 1e-3


@pytest.mark.parametrize("prefix_mode", ["pyramid", "flat", "one_to_three"])
def test_eager_and_sdpa_agree_with_prefix_and_padding(prefix_mode):
    model = build(prefix_mode=prefix_mode)
    inputs = tiny_inputs()
    inputs["object_mask"] = torch.tensor([[True, False], [True, True], [False, False]])
    model.set_attn_implementation("sdpa")
    sdpa = model(**inputs).last_hidden_state
    model.set_attn_implementation("eager")
    eager = model(**inputs).last_hidden_state
    torch.testing.assert_close(sdpa, eager, atol=ATOL, rtol=0)


def test_a_different_image_changes_the_text_states():
    model = build()
    inputs = tiny_inputs()
    inputs["pixel_values"][0] = 2.0  # a bright image ...
    before = model(**inputs).last_hidden_state
    inputs["pixel_values"][0] = -2.0  # ... replaced by a dark one
    after = model(**inputs).last_hidden_state
    # Freshly initialised projections (std 0.02) keep the prefix small, so the change is small too, but it is two
    # orders of magnitude above float32 noise (~1e-7); the other examples do not move at all.
    assert (after[0] - before[0]).abs().max() > 1e-5
    torch.testing.assert_close(after[1:], before[1:], atol=ATOL, rtol=0)


def test_extra_text_padding_does_not_change_real_tokens():
    model = build()
    inputs = tiny_inputs()
    padded = dict(inputs)
    padded["input_ids"] = torch.nn.functional.pad(inputs["input_ids"], (0, 5))
    padded["attention_mask"] = torch.nn.functional.pad(inputs["attention_mask"], (0, 5))
    short = model(**inputs).last_hidden_state
    long = model(**padded).last_hidden_state
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(long[:, : short.shape[1]][real], short[real], atol=ATOL, rtol=0)


def test_batch_equals_one_at_a_time():
    model = build()
    inputs = tiny_inputs()
    inputs["image_mask"] = torch.tensor([True, False, True])
    inputs["object_mask"] = torch.tensor([[True, False], [True, True], [False, False]])
    batched = model(**inputs).last_hidden_state
    for index in range(len(batched)):
        single = model(**{name: value[index : index + 1] for name, value in inputs.items()}).last_hidden_state
        torch.testing.assert_close(single[0], batched[index], atol=ATOL, rtol=0)


def test_absent_images_never_reach_the_backbone():
    model = build()
    seen = []
    model.visual_encoder.backbone.register_forward_hook(lambda module, args, output: seen.append(len(args[0])))
    inputs = tiny_inputs()
    inputs["image_mask"] = torch.tensor([True, False, True])
    inputs["object_mask"] = torch.tensor([[True, False], [False, False], [False, False]])
    model(**inputs)
    assert seen == [3], "one batched backbone call over the 3 present images"


def test_fewer_object_images_than_slots_are_masked():
    model = build()
    inputs = tiny_inputs(num_objects=1)
    padded = dict(inputs)
    padded["object_pixel_values"] = torch.cat([inputs["object_pixel_values"], torch.randn(3, 1, 3, 64, 64)], dim=1)
    padded["object_mask"] = torch.tensor([[True, False]] * 3)
    torch.testing.assert_close(model(**inputs).last_hidden_state, model(**padded).last_hidden_state, atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    ("overrides", "stages", "prefix_tokens"),
    [
        ({}, 4, 3 * 4),
        ({"prefix_mode": "flat"}, 1, 3 * 4),
        ({"prefix_mode": "one_to_three"}, 4, 3 * 4),
        ({"use_global_image": False}, 4, 2 * 4),
        ({"prefix_grid": 3}, 4, 3 * 9),
    ],
)
def test_prefix_shapes_and_gates(overrides, stages, prefix_tokens):
    model = build(**overrides)
    config = model.config
    assert config.prefix_length == prefix_tokens
    inputs = tiny_inputs()
    images = torch.cat([inputs["pixel_values"][:, None], inputs["object_pixel_values"]], dim=1)
    images = images[:, 1:] if not config.use_global_image else images
    prefix = model.visual_encoder(images, torch.ones(images.shape[:2], dtype=torch.bool))
    layers, heads = config.text_config.num_hidden_layers, config.text_config.num_attention_heads
    assert prefix.keys.shape == (layers, 3, heads, prefix_tokens, 32 // heads)
    assert prefix.values.shape == prefix.keys.shape
    gates = model(**inputs, output_gate_weights=True).gate_weights
    assert gates.shape == (3, config.num_images, layers, stages)
    torch.testing.assert_close(gates.sum(-1), torch.ones(gates.shape[:-1]))


def test_one_to_three_routes_three_layers_per_stage():
    config = HVPNetConfig(
        text_config={**tiny_config().text_config.to_dict(), "num_hidden_layers": 12},
        vision_backbone="test_resnet",
        prefix_mode="one_to_three",
    )
    routing = HVPNetModel(config).visual_encoder.fixed_gate.argmax(-1).tolist()
    assert routing == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]


def test_pyramid_gate_depends_on_the_image():
    model = build()
    gates = model(**tiny_inputs(), output_gate_weights=True).gate_weights
    assert (gates[0, 0] - gates[1, 0]).abs().max() > 0


def test_frozen_backbone_gets_no_gradient_and_keeps_its_statistics():
    model = build()
    model.train()
    backbone = model.visual_encoder.backbone
    assert not backbone.training, "a frozen backbone stays in eval mode inside a training model"
    statistics = {name: buffer.clone() for name, buffer in backbone.named_buffers()}
    model(**tiny_inputs()).last_hidden_state.sum().backward()
    assert all(parameter.grad is None for parameter in backbone.parameters())
    for name, buffer in backbone.named_buffers():
        torch.testing.assert_close(buffer, statistics[name], atol=0, rtol=0)
    encoder = model.visual_encoder
    trained = [encoder.key_value_weight, encoder.gate.weight, encoder.stage_projections[0].weight]
    trained.append(model.text_model.encoder.layer[0].attention.self.query.weight)
    assert all(parameter.grad is not None and parameter.grad.abs().sum() > 0 for parameter in trained)


def test_unfrozen_backbone_trains():
    model = build(freeze_vision=False)
    model.train()
    assert model.visual_encoder.backbone.training
    model(**tiny_inputs()).last_hidden_state.sum().backward()
    assert any(parameter.grad is not None for parameter in model.visual_encoder.backbone.parameters())


def test_output_hidden_states():
    model = build()
    output = model(**tiny_inputs(), output_hidden_states=True)
    assert len(output.hidden_states) == model.config.text_config.num_hidden_layers + 1
    torch.testing.assert_close(output.hidden_states[-1], output.last_hidden_state)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"pixel_values": torch.randn(3, 64, 64)}, "pixel_values must have shape"),
        ({"pixel_values": torch.randn(2, 3, 64, 64)}, "batch=3"),
        ({"object_pixel_values": torch.randn(3, 3, 64, 64)}, "object_pixel_values must have shape"),
        ({"object_pixel_values": torch.randn(3, 3, 3, 64, 64)}, "at most num_object_images=2"),
        ({"object_pixel_values": torch.randn(3, 2, 3, 32, 32)}, "share one image shape"),
        ({"image_mask": torch.ones(2, dtype=torch.bool)}, "image_mask must have shape"),
        ({"object_mask": torch.ones(3, 1, dtype=torch.bool)}, "object_mask must have shape"),
    ],
)
def test_bad_image_inputs_raise(change, message):
    model = build()
    inputs = {**tiny_inputs(), **change}
    with pytest.raises(ValueError, match=message):
        model(**inputs)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"prefix_mode": "diagonal"}, "prefix_mode"),
        ({"relation_pooling": "mean"}, "relation_pooling"),
        ({"use_global_image": False, "num_object_images": 0}, "no image"),
    ],
)
def test_bad_config_raises(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_image_size_is_free():
    model = build()
    inputs = tiny_inputs()
    inputs["pixel_values"] = torch.randn(3, 3, IMAGE_SIZE + 32, IMAGE_SIZE + 32)
    inputs["object_pixel_values"] = torch.randn(3, 2, 3, IMAGE_SIZE + 32, IMAGE_SIZE + 32)
    assert model(**inputs).last_hidden_state.shape == (3, 9, 32)


def test_output_attentions_covers_prefix_and_text():
    model = build()
    model.set_attn_implementation("eager")
    inputs = tiny_inputs()
    inputs["image_mask"] = torch.tensor([True, False, True])
    attentions = model(**inputs, output_attentions=True).attentions
    prefix_length = model.config.prefix_length
    assert len(attentions) == model.config.text_config.num_hidden_layers
    assert attentions[0].shape == (3, 4, 9, prefix_length + 9)
    for weights in attentions:
        torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:-1]))
        assert (weights[1, :, :, :4] == 0).all(), "the absent global image of example 1 gets no attention"
        assert (weights[2, :, :, prefix_length + 6 :] == 0).all(), "nor does text padding"
        assert (weights[0, :, :, :prefix_length] > 0).all()


def test_output_attentions_needs_eager_attention():
    model = build()
    model.set_attn_implementation("sdpa")
    with pytest.raises(ValueError, match="attn_implementation='eager'"):
        model(**tiny_inputs(), output_attentions=True)


@pytest.mark.parametrize("prefix_mode", ["pyramid", "original"])
def test_chunked_backbone_gives_the_outputs_of_one_call(prefix_mode):
    model = build(prefix_mode=prefix_mode, vision_chunk_size=2)
    seen = []
    model.visual_encoder.backbone.register_forward_hook(lambda module, args, output: seen.append(len(args[0])))
    inputs = tiny_inputs(batch_size=2)
    inputs["image_mask"] = torch.tensor([True, False])
    chunked = model(**inputs).last_hidden_state
    # 5 present images (of 6) in the paper mode, all 6 slots in the original layout (absent ones as zero images).
    assert seen == ([2, 2, 1] if prefix_mode == "pyramid" else [2, 2, 2])
    seen.clear()
    model.visual_encoder.chunk_size = None
    torch.testing.assert_close(model(**inputs).last_hidden_state, chunked, atol=1e-5, rtol=0)
    assert seen == [5 if prefix_mode == "pyramid" else 6]


def test_vision_chunk_size_must_be_positive_or_none():
    with pytest.raises(ValueError, match="vision_chunk_size"):
        tiny_config(vision_chunk_size=0)
    assert tiny_config(vision_chunk_size=None).vision_chunk_size is None
