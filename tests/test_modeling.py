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


def stacked_form(inputs: dict) -> dict:
    """The same inputs with one image tensor (B, 1 + k, 3, H, W) and one mask (B, 1 + k), global image first."""
    stacked = {name: value for name, value in inputs.items() if name not in IMAGE_INPUTS}
    stacked["pixel_values"] = torch.cat([inputs["pixel_values"][:, None], inputs["object_pixel_values"]], dim=1)
    batch_size, num_objects = inputs["object_pixel_values"].shape[:2]
    image_mask = inputs.get("image_mask", torch.ones(batch_size, dtype=torch.bool))
    object_mask = inputs.get("object_mask", torch.ones(batch_size, num_objects, dtype=torch.bool))
    stacked["image_mask"] = torch.cat([image_mask[:, None], object_mask], dim=1)
    return stacked


IMAGE_INPUTS = ("pixel_values", "object_pixel_values", "image_mask", "object_mask")


@pytest.mark.parametrize("overrides", [{}, {"use_global_image": False}, {"prefix_mode": "original"}], ids=str)
@pytest.mark.parametrize("num_objects", [1, 2])
def test_stacked_and_separate_image_inputs_agree(overrides, num_objects):
    model = build(**overrides)
    inputs = tiny_inputs(num_objects=num_objects)
    inputs["image_mask"] = torch.tensor([True, False, True])
    inputs["object_mask"] = torch.tensor([[True, False], [True, True], [False, True]])[:, :num_objects]
    separate = model(**inputs, output_gate_weights=True)
    stacked = model(**stacked_form(inputs), output_gate_weights=True)
    # One computation on the same stacked tensor either way: the outputs are identical, not merely close.
    torch.testing.assert_close(stacked.last_hidden_state, separate.last_hidden_state, atol=0, rtol=0)
    torch.testing.assert_close(stacked.gate_weights, separate.gate_weights, atol=0, rtol=0)


def test_global_image_alone_in_the_stacked_form_equals_the_old_form():
    model = build()
    inputs = tiny_inputs()
    inputs.pop("object_pixel_values")
    old = model(**inputs).last_hidden_state
    new = model(**{**inputs, "pixel_values": inputs["pixel_values"][:, None]}).last_hidden_state
    torch.testing.assert_close(new, old, atol=0, rtol=0)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"pixel_values": torch.randn(3, 64, 64)}, "pixel_values must have shape"),
        ({"pixel_values": torch.randn(2, 3, 64, 64)}, "pixel_values must hold 3 examples"),
        ({"pixel_values": torch.randn(3, 1, 3, 64, 64)}, "already holds the object crops"),
        ({"object_pixel_values": torch.randn(3, 3, 64, 64)}, "object_pixel_values must have shape"),
        ({"object_pixel_values": torch.randn(2, 2, 3, 64, 64)}, "object_pixel_values must hold 3 examples"),
        ({"object_pixel_values": torch.randn(3, 2, 1, 64, 64)}, "object_pixel_values must hold .* 3-channel"),
        ({"object_pixel_values": torch.randn(3, 3, 3, 64, 64)}, "object_pixel_values has 3 .* num_object_images=2"),
        ({"object_pixel_values": torch.randn(3, 2, 3, 32, 32)}, "share one image shape"),
        ({"image_mask": torch.ones(2, dtype=torch.bool)}, r"image_mask must have shape \(3,\)"),
        ({"object_mask": torch.ones(3, 1, dtype=torch.bool)}, r"object_mask must have shape \(3, 2\)"),
    ],
)
def test_bad_image_inputs_raise(change, message):
    model = build()
    inputs = {**tiny_inputs(), **change}
    with pytest.raises(ValueError, match=message):
        model(**inputs)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"pixel_values": torch.randn(3, 4, 3, 64, 64), "image_mask": torch.ones(3, 4, dtype=torch.bool)},
            r"pixel_values \(slot 0 is the global image\) has 3 object images",
        ),
        ({"pixel_values": torch.randn(3, 3, 3, 3, 64, 64)}, "pixel_values must have shape"),
        ({"pixel_values": torch.randn(2, 3, 3, 64, 64)}, "pixel_values must hold 3 examples"),
        ({"image_mask": torch.ones(3, dtype=torch.bool)}, r"image_mask must have shape \(3, 3\)"),
    ],
)
def test_bad_stacked_image_inputs_raise(change, message):
    model = build()
    inputs = {**stacked_form(tiny_inputs()), **change}
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


@pytest.mark.parametrize("attn_implementation", ["flex_attention", "flash_attention_2"])
def test_unsupported_attention_backends_are_refused(attn_implementation):
    """The prefix extends the eager (additive) or sdpa (boolean) mask; the other backends are not claimed."""
    with pytest.raises(ValueError, match="does not support"):
        build().set_attn_implementation(attn_implementation)


@pytest.mark.parametrize("with_padding", [True, False])
def test_eager_and_sdpa_agree_on_every_output(with_padding):
    """Without padding BertModel passes no mask at all; with it, a float (eager) or boolean (sdpa) one."""
    model = build()
    inputs = tiny_inputs()
    inputs["image_mask"] = torch.tensor([True, False, True])
    if not with_padding:
        inputs.pop("attention_mask")
    model.set_attn_implementation("sdpa")
    sdpa = model(**inputs, output_hidden_states=True)
    model.set_attn_implementation("eager")
    eager = model(**inputs, output_hidden_states=True)
    assert len(sdpa.hidden_states) == len(eager.hidden_states) == 5
    for sdpa_states, eager_states in zip(sdpa.hidden_states, eager.hidden_states, strict=True):
        torch.testing.assert_close(sdpa_states, eager_states, atol=ATOL, rtol=0)


def test_return_dict_false_gives_the_same_tensors_as_a_tuple():
    model = build()
    inputs = tiny_inputs()
    as_dict = model(**inputs, output_hidden_states=True)
    as_tuple = model(**inputs, output_hidden_states=True, return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 3
    torch.testing.assert_close(as_tuple[0], as_dict.last_hidden_state, atol=0, rtol=0)
    torch.testing.assert_close(as_tuple[1], as_dict.pooler_output, atol=0, rtol=0)
    assert len(as_tuple[2]) == len(as_dict.hidden_states)


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(attn_implementation):
    model = build(freeze_vision=False)
    model.set_attn_implementation(attn_implementation)
    model.train()
    inputs = tiny_inputs()

    def loss_and_gradients() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad()
        loss = model(**inputs).last_hidden_state.pow(2).mean()
        loss.backward()
        return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    plain_loss, plain_gradients = loss_and_gradients()
    model.activation_checkpointing_enable()
    assert all(layer.gradient_checkpointing for layer in model.text_model.encoder.layer)
    checkpointed_loss, checkpointed_gradients = loss_and_gradients()
    # Dropout is off in the tiny config, so the recomputed forward is the same computation.
    torch.testing.assert_close(checkpointed_loss, plain_loss, atol=0, rtol=0)
    assert checkpointed_gradients.keys() == plain_gradients.keys()
    assert "visual_encoder.key_value_weight" in checkpointed_gradients, "the prefix gets gradients through it"
    for name, gradient in plain_gradients.items():
        torch.testing.assert_close(checkpointed_gradients[name], gradient, atol=1e-6, rtol=1e-5, msg=name)


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
