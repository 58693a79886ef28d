"""The HVPNeT models: prefix attention, ablation modes, masking, batching, the frozen backbone, the task heads,
the prefix against the paper's equations, mixed precision, and saving and loading."""

import itertools
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from modeling_utils import IMAGE_SIZE, TINY_TEXT, tiny_config, tiny_inputs
from torch.nn import functional
from transformers import (
    AutoModel,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    BertConfig,
    BertModel,
    BertTokenizerFast,
)

from hvpnet_hf import (
    HVPNetConfig,
    HVPNetForSequenceClassification,
    HVPNetForTokenClassification,
    HVPNetModel,
    HVPNetProcessor,
)

# float32 attention over a few dozen positions: differences between equivalent computations stay near 1e-6.
ATOL = 1e-5


def build(**overrides) -> HVPNetModel:
    torch.manual_seed(0)
    return HVPNetModel(tiny_config(**overrides)).eval()


def text_only_reference(model: HVPNetModel) -> BertModel:
    bert = BertModel(model.config.text_config).eval()
    bert.load_state_dict(model.text_model.state_dict())
    return bert


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
    masked = model(**inputs, image_mask=torch.zeros(3, 3, dtype=torch.bool))
    expected = text_only_reference(model)(inputs["input_ids"], attention_mask=inputs["attention_mask"])
    torch.testing.assert_close(masked.last_hidden_state, expected.last_hidden_state, atol=ATOL, rtol=0)
    # and the images do matter when they are not masked
    assert (model(**inputs).last_hidden_state - expected.last_hidden_state).abs().max() > 1e-3


@pytest.mark.parametrize("prefix_mode", ["pyramid", "flat", "one_to_three"])
def test_eager_and_sdpa_agree_with_prefix_and_padding(prefix_mode):
    model = build(prefix_mode=prefix_mode)
    inputs = tiny_inputs()
    inputs["image_mask"] = torch.tensor([[True, True, False], [True, True, True], [True, False, False]])
    model.set_attn_implementation("sdpa")
    sdpa = model(**inputs).last_hidden_state
    model.set_attn_implementation("eager")
    eager = model(**inputs).last_hidden_state
    torch.testing.assert_close(sdpa, eager, atol=ATOL, rtol=0)


def test_a_different_image_changes_the_text_states():
    model = build()
    inputs = tiny_inputs()
    inputs["pixel_values"][0, 0] = 2.0  # a bright image ...
    before = model(**inputs).last_hidden_state
    inputs["pixel_values"][0, 0] = -2.0  # ... replaced by a dark one
    after = model(**inputs).last_hidden_state
    # Freshly initialized projections (std 0.02) keep the prefix small, so the change is small too, but it is two
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
    inputs["image_mask"] = torch.tensor([[True, True, False], [False, True, True], [True, False, False]])
    batched = model(**inputs).last_hidden_state
    for index in range(len(batched)):
        single = model(**{name: value[index : index + 1] for name, value in inputs.items()}).last_hidden_state
        torch.testing.assert_close(single[0], batched[index], atol=ATOL, rtol=0)


def test_absent_images_never_reach_the_backbone():
    model = build()
    seen = []
    model.visual_encoder.backbone.register_forward_hook(lambda module, args, output: seen.append(len(args[0])))
    inputs = tiny_inputs()
    inputs["image_mask"] = torch.tensor([[True, True, False], [False, False, False], [True, False, False]])
    model(**inputs)
    assert seen == [3], "one batched backbone call over the 3 present images"


def test_fewer_object_images_than_slots_are_masked():
    model = build()
    inputs = tiny_inputs(num_objects=1)
    padded = dict(inputs)
    padded["pixel_values"] = torch.cat([inputs["pixel_values"], torch.randn(3, 1, 3, 64, 64)], dim=1)
    padded["image_mask"] = torch.tensor([[True, True, False]] * 3)
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
    images = inputs["pixel_values"][:, 1:] if not config.use_global_image else inputs["pixel_values"]
    prefix = model.visual_encoder(images, torch.ones(images.shape[:2], dtype=torch.bool))
    layers, heads = config.text_config.num_hidden_layers, config.text_config.num_attention_heads
    assert len(prefix.keys) == len(prefix.values) == layers
    assert {tuple(tensor.shape) for tensor in (*prefix.keys, *prefix.values)} == {
        (3, heads, prefix_tokens, 32 // heads)
    }
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


@pytest.mark.parametrize("model_class", [HVPNetModel, HVPNetForTokenClassification, HVPNetForSequenceClassification])
@pytest.mark.parametrize("prefix_mode", ["pyramid", "original"])
def test_building_a_model_leaves_its_backbone_settings_as_they_are(model_class, prefix_mode):
    config = tiny_config(prefix_mode=prefix_mode)
    assert config.vision_out_indices is None
    settings = config.to_dict()
    model = model_class(config)
    assert config.to_dict() == settings
    assert model.config.to_dict() == settings
    assert list(model.base_model.visual_encoder.backbone.feature_info.out_indices) == [1, 2, 3, 4]


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
    trained = [encoder.gate.weight, encoder.stage_projections[0].weight]
    trained += [projection.weight for projection in encoder.key_value_projections]
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
        ({"pixel_values": torch.randn(3, 3, 64, 64)}, r"pixel_values must have shape \(batch=3, num_images, 3"),
        ({"pixel_values": torch.randn(3, 3, 3, 3, 64, 64)}, "pixel_values must have shape"),
        ({"pixel_values": torch.randn(2, 3, 3, 64, 64)}, r"pixel_values must have shape \(batch=3,.* got \(2, 3"),
        ({"pixel_values": torch.randn(3, 3, 1, 64, 64)}, "pixel_values must have shape .* got \\(3, 3, 1"),
        (
            {"pixel_values": torch.randn(3, 4, 3, 64, 64), "image_mask": torch.ones(3, 4, dtype=torch.bool)},
            "pixel_values holds 4 images per example .* 3 object crops.* num_object_images=2",
        ),
        ({"image_mask": torch.ones(3, dtype=torch.bool)}, r"image_mask must have shape \(3, 3\)"),
        ({"pixel_values": None, "image_mask": torch.ones(3, 3, dtype=torch.bool)}, "image_mask was given without"),
    ],
)
def test_bad_image_inputs_raise(change, message):
    model = build()
    inputs = {**tiny_inputs(), **change}
    with pytest.raises(ValueError, match=message):
        model(**inputs)


def test_image_size_is_free():
    model = build()
    inputs = tiny_inputs()
    inputs["pixel_values"] = torch.randn(3, 3, 3, IMAGE_SIZE + 32, IMAGE_SIZE + 32)
    assert model(**inputs).last_hidden_state.shape == (3, 9, 32)


def test_output_attentions_covers_prefix_and_text():
    model = build()
    model.set_attn_implementation("eager")
    inputs = tiny_inputs()
    inputs["image_mask"] = torch.tensor([[True, True, True], [False, True, True], [True, True, True]])
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
    inputs["image_mask"] = torch.tensor([[True, True, True], [False, True, True], [True, True, True]])
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


def test_output_attentions_under_sdpa_returns_what_bert_returns():
    """sdpa computes no attention weights: BERT then warns and returns an empty tuple, and so does HVPNeT (with the
    same hidden states as without the flag)."""
    model = build()
    model.set_attn_implementation("sdpa")
    inputs = tiny_inputs()
    bert = text_only_reference(model)
    bert.set_attn_implementation("sdpa")
    expected = bert(inputs["input_ids"], attention_mask=inputs["attention_mask"], output_attentions=True).attentions
    output = model(**inputs, output_attentions=True)
    assert output.attentions == expected == ()
    torch.testing.assert_close(output.last_hidden_state, model(**inputs).last_hidden_state, atol=0, rtol=0)


@pytest.mark.parametrize("prefix_mode", ["pyramid", "original"])
def test_chunked_backbone_gives_the_outputs_of_one_call(prefix_mode):
    model = build(prefix_mode=prefix_mode, vision_chunk_size=2)
    seen = []
    model.visual_encoder.backbone.register_forward_hook(lambda module, args, output: seen.append(len(args[0])))
    inputs = tiny_inputs(batch_size=2)
    inputs["image_mask"] = torch.tensor([[True, True, True], [False, True, True]])
    chunked = model(**inputs).last_hidden_state
    # 5 present images (of 6) in the paper mode, all 6 slots in the original layout (absent ones as zero images).
    assert seen == ([2, 2, 1] if prefix_mode == "pyramid" else [2, 2, 2])
    seen.clear()
    model.visual_encoder.chunk_size = None
    torch.testing.assert_close(model(**inputs).last_hidden_state, chunked, atol=1e-5, rtol=0)
    assert seen == [5 if prefix_mode == "pyramid" else 6]


# The task heads: the NER head (emissions + CRF over first sub-words) and the relation head.

HEAD, TAIL = 3, 4  # marker token ids of the tiny relation configs


def ner_model(**overrides) -> HVPNetForTokenClassification:
    torch.manual_seed(0)
    return HVPNetForTokenClassification(tiny_config(num_labels=3, **overrides)).eval()


def ner_inputs() -> dict:
    """Three examples of 9 tokens: words start at the marked positions; the last example is padded."""
    inputs = tiny_inputs()
    word_starts = torch.zeros(3, 9, dtype=torch.bool)
    word_starts[0, [1, 2, 4, 7]] = True  # 4 words, some with several sub-words
    word_starts[1, [1, 3]] = True
    word_starts[2, [1, 2, 3, 4]] = True  # attention_mask ends at position 6
    labels = torch.full((3, 9), -100)
    generator = torch.Generator().manual_seed(1)
    labels[word_starts] = torch.randint(0, 3, (int(word_starts.sum()),), generator=generator)
    return {**inputs, "word_start_mask": word_starts, "labels": labels}


def path_score(model: HVPNetForTokenClassification, emissions: torch.Tensor, tags: list[int]) -> float:
    """Linear-chain score of one tag path: start + emissions + transitions + end."""
    crf = model.crf
    emissions = emissions.detach()
    score = crf.start_transitions[tags[0]] + crf.end_transitions[tags[-1]]
    score += sum(emissions[step, tag] for step, tag in enumerate(tags))
    score += sum(crf.transitions[previous, current] for previous, current in itertools.pairwise(tags))
    return float(score.detach())


def test_viterbi_path_scores_at_least_as_high_as_every_other_path():
    model = ner_model()
    inputs = ner_inputs()
    with torch.no_grad():
        output = model(**inputs)
    for row in range(3):
        starts = inputs["word_start_mask"][row].nonzero().flatten()
        emissions = output.logits[row, starts]
        best = model.decode(output.logits, inputs["word_start_mask"])[row, starts].tolist()
        best_score = path_score(model, emissions, best)
        # 3 tags and at most 4 words: all 81 paths can be scored exhaustively.
        for path in itertools.product(range(3), repeat=len(starts)):
            assert path_score(model, emissions, list(path)) <= best_score + 1e-5


def test_crf_loss_is_a_non_negative_nll_and_trains():
    model = ner_model()
    model.train()
    inputs = ner_inputs()
    output = model(**inputs)
    assert output.loss.item() >= 0
    output.loss.backward()
    assert model.crf.transitions.grad.abs().sum() > 0
    assert model.classifier.weight.grad.abs().sum() > 0


def test_decoding_respects_word_starts_and_padding():
    model = ner_model()
    inputs = ner_inputs()
    inputs.pop("labels")
    with torch.no_grad():
        tags = model.decode(model(**inputs).logits, inputs["word_start_mask"])
    assert tags.shape == (3, 9)
    starts = inputs["word_start_mask"]
    assert (tags[~starts] == -100).all()
    assert ((tags[starts] >= 0) & (tags[starts] < 3)).all()


def test_word_starts_default_to_labeled_positions():
    model = ner_model()
    inputs = ner_inputs()
    with torch.no_grad():
        explicit = model(**inputs)
        implicit = model(**{name: value for name, value in inputs.items() if name != "word_start_mask"})
    torch.testing.assert_close(explicit.loss, implicit.loss)


def test_example_without_words_is_allowed():
    model = ner_model()
    inputs = ner_inputs()
    inputs["word_start_mask"][1] = False
    inputs["labels"][1] = -100
    with torch.no_grad():
        output = model(**inputs)
    assert torch.isfinite(output.loss)
    assert (model.decode(output.logits, inputs["word_start_mask"])[1] == -100).all()


def test_crf_runs_over_words_not_sub_words():
    """Extra sub-words (continuation pieces) must not change the word-level loss when their emissions are unused."""
    model = ner_model(use_visual_prefix=False)
    inputs = ner_inputs()
    inputs.pop("pixel_values")
    with torch.no_grad():
        full = model(**inputs)
        emissions = full.logits
        starts = inputs["word_start_mask"][0]
        word_mask = torch.ones(1, int(starts.sum()), dtype=torch.bool)
        expected = -model.crf(emissions[:1, starts], inputs["labels"][:1, starts], mask=word_mask, reduction="sum")
        single = model(**{name: value[:1] for name, value in inputs.items()})
    torch.testing.assert_close(single.loss, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"labels": torch.zeros(3, 8, dtype=torch.long)}, r"labels must have the text.s shape \(3, 9\)"),
        ({"labels": torch.full((3, 9), 7)}, "off a word start"),
    ],
)
def test_bad_ner_labels_raise(change, message):
    with pytest.raises(ValueError, match=message):
        ner_model()(**{**ner_inputs(), **change})


def test_out_of_range_tag_raises():
    inputs = ner_inputs()
    inputs["labels"][inputs["word_start_mask"]] = 3
    with pytest.raises(ValueError, match=r"tag ids in \[0, 3\)"):
        ner_model()(**inputs)


def test_emissions_need_no_word_starts():
    """Word starts matter to the CRF only: the loss reads them, `decode` takes them; the emissions do not."""
    inputs = ner_inputs()
    inputs.pop("labels")
    word_start_mask = inputs.pop("word_start_mask")
    model = ner_model()
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, model(**inputs, word_start_mask=word_start_mask).logits)


@pytest.mark.parametrize(
    ("logits_shape", "mask_shape"), [((2, 5, 3), (2, 4)), ((2, 5, 3), (3, 5)), ((2, 5, 4), (2, 5)), ((5, 3), (2, 5))]
)
def test_decode_refuses_emissions_and_word_starts_of_different_texts(logits_shape, mask_shape):
    """A word-start mask of another text would otherwise be gathered from the first positions and give tags."""
    with pytest.raises(ValueError, match=r"decoding needs emissions \(batch, tokens, 3 tags\)"):
        ner_model().decode(torch.randn(logits_shape), torch.ones(mask_shape, dtype=torch.bool))


def test_decode_finds_the_paths_of_pytorch_crf():
    """The batched Viterbi decode gives, row by row, the path pytorch-crf's `CRF.decode` finds over the words."""
    model = ner_model()
    generator = torch.Generator().manual_seed(0)
    emissions = torch.randn(6, 11, 3, generator=generator)
    word_start_mask = torch.rand(6, 11, generator=generator) < 0.6
    word_start_mask[2] = False  # a row without words
    tags = model.decode(emissions, word_start_mask)
    assert (tags[~word_start_mask] == -100).all()
    for row in range(6):
        starts = word_start_mask[row].nonzero().flatten()
        if len(starts):
            with torch.no_grad():
                (path,) = model.crf.decode(emissions[row : row + 1, starts])
            assert tags[row, starts].tolist() == path


def re_model(**overrides) -> HVPNetForSequenceClassification:
    torch.manual_seed(0)
    config = tiny_config(num_labels=4, head_start_token_id=HEAD, tail_start_token_id=TAIL, **overrides)
    return HVPNetForSequenceClassification(config).eval()


def re_inputs() -> dict:
    inputs = tiny_inputs()
    inputs["input_ids"][:, 2] = HEAD
    inputs["input_ids"][:, 5] = TAIL
    return {**inputs, "labels": torch.tensor([0, 3, 1])}


def test_relation_head_reads_the_marker_states():
    model = re_model()
    inputs = re_inputs()
    with torch.no_grad():
        output = model(**inputs)
        hidden = model.hvpnet(**{name: value for name, value in inputs.items() if name != "labels"}).last_hidden_state
    assert output.logits.shape == (3, 4)
    expected = model.classifier(torch.cat([hidden[:, 2], hidden[:, 5]], dim=-1))
    torch.testing.assert_close(output.logits, expected)
    torch.testing.assert_close(output.loss, torch.nn.functional.cross_entropy(expected, inputs["labels"]))


def test_relation_head_with_cls_pooling():
    model = re_model(relation_pooling="cls")
    inputs = re_inputs()
    inputs["input_ids"][:, 2] = 7  # no markers needed
    with torch.no_grad():
        output = model(**inputs)
        hidden = model.hvpnet(**{name: value for name, value in inputs.items() if name != "labels"}).last_hidden_state
    torch.testing.assert_close(output.logits, model.classifier(hidden[:, 0]))


def test_relation_input_without_markers_raises():
    inputs = re_inputs()
    inputs["input_ids"][1, 5] = 9
    with pytest.raises(ValueError, match=r"rows \[1\] lack the entity marker tail_start_token_id"):
        re_model()(**inputs)


def test_relation_labels_of_wrong_shape_raise():
    inputs = {**re_inputs(), "labels": torch.zeros(3, 2, dtype=torch.long)}
    with pytest.raises(ValueError, match=r"labels must have shape \(3,\)"):
        re_model()(**inputs)


def test_gate_weights_and_attentions_reach_both_heads():
    models = [ner_model(attn_implementation="eager"), re_model(attn_implementation="eager")]
    with torch.no_grad():
        ner, relation = (
            model(**inputs, output_gate_weights=True, output_attentions=True)
            for model, inputs in zip(models, (ner_inputs(), re_inputs()), strict=True)
        )
    assert ner.gate_weights.shape == relation.gate_weights.shape == (3, 3, 4, 4)
    assert len(ner.attentions) == len(relation.attentions) == 4


@pytest.mark.parametrize(("make_model", "make_inputs"), [(ner_model, ner_inputs), (re_model, re_inputs)])
def test_heads_return_tuples(make_model, make_inputs):
    model = make_model()
    inputs = make_inputs()
    with torch.no_grad():
        expected = model(**inputs)
        as_tuple = model(**inputs, return_dict=False)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], expected.loss, atol=0, rtol=0)
    torch.testing.assert_close(as_tuple[1], expected.logits, atol=0, rtol=0)


# The batched prefix encoder against a plain loop that follows the paper's equations one image, stage and layer at a
# time (section 3.1-3.3). The loop is slow on purpose: it is the readable specification.


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
        projection = encoder.key_value_projections[layer]
        key_value = prefix @ projection.weight.T + projection.bias  # eq. 8
        key, value = key_value.chunk(2, dim=-1)
        keys.append(key.view(len(prefix), heads, -1).transpose(0, 1))
        values.append(value.view(len(prefix), heads, -1).transpose(0, 1))
    return torch.stack(keys), torch.stack(values)


@pytest.mark.parametrize("prefix_mode", ["pyramid", "flat", "one_to_three"])
def test_batched_prefix_matches_the_paper_loop(prefix_mode):
    torch.manual_seed(0)
    model = HVPNetModel(tiny_config(prefix_mode=prefix_mode)).eval()
    inputs = tiny_inputs()
    images = inputs["pixel_values"]
    with torch.no_grad():
        prefix = model.visual_encoder(images, torch.ones(images.shape[:2], dtype=torch.bool))
        for example in range(len(images)):
            keys, values = paper_prefix(model, list(images[example]))
            # Same arithmetic in another order (einsum vs. loops, pool-then-project vs. conv): float32 rounding only.
            torch.testing.assert_close(torch.stack(prefix.keys)[:, example], keys, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(torch.stack(prefix.values)[:, example], values, atol=1e-5, rtol=1e-4)


# The models under bfloat16 autocast on CPU (what `Trainer`'s `--bf16` does) against float32.
#
# bfloat16 keeps 8 significant bits: every matmul rounds by up to 2**-8 (0.4%) of its size. Through 4 layers the
# logits may drift by a few of those steps; 5% of the largest logit leaves room for that and still fails when a
# part of the model breaks (a dropped prefix moves the logits by far more, see the tests above).
RELATIVE_TOLERANCE = 0.05


def labeled_ner_inputs() -> dict:
    inputs = tiny_inputs()
    generator = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 5, inputs["input_ids"].shape, generator=generator)
    inputs["labels"] = labels.masked_fill(inputs["attention_mask"] == 0, -100)
    inputs["image_mask"] = torch.tensor([[True, True, False], [True, True, True], [True, False, False]])
    return inputs


@pytest.mark.parametrize("prefix_mode", ["pyramid", "original"])
def test_token_classification_under_bf16_autocast(prefix_mode):
    torch.manual_seed(0)
    model = HVPNetForTokenClassification(tiny_config(prefix_mode=prefix_mode)).eval()
    inputs = labeled_ner_inputs()
    reference = model(**inputs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = model(**inputs)
    assert mixed.logits.dtype == torch.bfloat16, "autocast is active"
    assert mixed.loss.dtype == torch.float32, "the CRF loss stays in float32"
    scale = reference.logits.abs().max().item()
    torch.testing.assert_close(mixed.logits.float(), reference.logits, atol=RELATIVE_TOLERANCE * scale, rtol=0)
    assert mixed.loss.item() == pytest.approx(reference.loss.item(), rel=RELATIVE_TOLERANCE)


def test_relation_classification_trains_under_bf16_autocast():
    torch.manual_seed(0)
    model = HVPNetForSequenceClassification(tiny_config(relation_pooling="cls", num_labels=4)).train()
    inputs = tiny_inputs()
    inputs["labels"] = torch.tensor([0, 3, 1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**inputs).loss
    assert loss.dtype == torch.float32
    loss.backward()
    gradient = model.hvpnet.visual_encoder.key_value_projections[-1].weight.grad
    assert gradient is not None and torch.isfinite(gradient).all() and gradient.abs().sum() > 0


@pytest.mark.parametrize("prefix_mode", ["pyramid", "original"])
def test_bf16_model_keeps_its_crf_in_float32_and_takes_float32_images(prefix_mode, tmp_path):
    torch.manual_seed(0)
    HVPNetForTokenClassification(tiny_config(prefix_mode=prefix_mode)).eval().save_pretrained(tmp_path)
    reference = HVPNetForTokenClassification.from_pretrained(tmp_path).eval()
    model = HVPNetForTokenClassification.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    float32 = {name for name, parameter in model.named_parameters() if parameter.dtype == torch.float32}
    assert float32 == {f"crf.{name}" for name, _ in model.crf.named_parameters()}
    inputs = labeled_ner_inputs()  # float32 pixels, as the processor gives them
    expected, output = reference(**inputs), model(**inputs)
    assert output.logits.dtype == torch.bfloat16 and output.loss.dtype == torch.float32
    scale = expected.logits.abs().max().item()
    torch.testing.assert_close(output.logits.float(), expected.logits, atol=RELATIVE_TOLERANCE * scale, rtol=0)
    word_starts = inputs["labels"] != -100
    assert torch.equal(model.decode(output.logits, word_starts), reference.decode(output.logits.float(), word_starts))
    with torch.no_grad():  # float32 cached features too
        features = reference.hvpnet.visual_encoder.visual_features(inputs["pixel_values"].flatten(0, 1))
    cached = model(
        input_ids=inputs["input_ids"],
        attention_mask=inputs["attention_mask"],
        word_start_mask=inputs["attention_mask"].bool(),
        image_features=features.view(*inputs["pixel_values"].shape[:2], *features.shape[1:]),
        image_features_mask=torch.ones(inputs["pixel_values"].shape[:2], dtype=torch.bool),
    )
    assert torch.isfinite(cached.logits).all()


# Saving, reloading (also as remote code where hvpnet_hf is not importable) and building from pretrained parts.


def example_inputs(model_class) -> dict:
    inputs = tiny_inputs()
    if model_class is HVPNetForSequenceClassification:
        inputs["input_ids"][:, 1] = HEAD
        inputs["input_ids"][:, 4] = TAIL
    if model_class is HVPNetForTokenClassification:
        inputs["word_start_mask"] = inputs["attention_mask"].bool()
    return inputs


def main_output(model_class, output) -> torch.Tensor:
    return output.last_hidden_state if model_class is HVPNetModel else output.logits


CLASSES = [
    (HVPNetModel, AutoModel),
    (HVPNetForTokenClassification, AutoModelForTokenClassification),
    (HVPNetForSequenceClassification, AutoModelForSequenceClassification),
]


def saved_model(model_class, folder) -> tuple[dict, torch.Tensor]:
    """Save a tiny random model to `folder`; return example inputs and its output on them."""
    torch.manual_seed(0)
    model = model_class(tiny_config(head_start_token_id=HEAD, tail_start_token_id=TAIL)).eval()
    inputs = example_inputs(model_class)
    with torch.no_grad():
        expected = main_output(model_class, model(**inputs))
    model.save_pretrained(folder)
    return inputs, expected


@pytest.mark.parametrize(("model_class", "auto_class"), CLASSES)
def test_remote_code_loads_where_the_package_cannot_be_imported(tmp_path, model_class, auto_class):
    inputs, expected = saved_model(model_class, tmp_path / "model")
    torch.save({"inputs": inputs, "expected": expected}, tmp_path / "case.pt")
    attribute = "last_hidden_state" if model_class is HVPNetModel else "logits"
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["hvpnet_hf"] = None  # any import of the package now fails
        import torch
        import transformers
        case = torch.load({str(tmp_path / "case.pt")!r})
        model = transformers.{auto_class.__name__}.from_pretrained({str(tmp_path / "model")!r}, trust_remote_code=True)
        assert "hvpnet_hf" not in type(model).__module__, type(model).__module__
        with torch.no_grad():
            output = model.eval()(**case["inputs"]).{attribute}
        torch.testing.assert_close(output, case["expected"], atol=1e-6, rtol=0)
        print("remote-code load ok", type(model).__name__)
        """
    )
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=environment)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"remote-code load ok {model_class.__name__}" in result.stdout


@pytest.fixture
def tiny_bert_folder(tmp_path):
    """A tiny pretrained-looking BERT: weights, config and a WordPiece vocabulary."""
    folder = tmp_path / "tiny-bert"
    torch.manual_seed(1)
    vocabulary = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [
        f"word{i}" for i in range(TINY_TEXT["vocab_size"] - 5)
    ]
    BertModel(BertConfig(**TINY_TEXT)).save_pretrained(folder)
    (folder / "vocab.txt").write_text("\n".join(vocabulary) + "\n")
    return folder


def test_builder_loads_the_pretrained_text_encoder(tiny_bert_folder):
    model = HVPNetForTokenClassification.from_text_vision_pretrained(
        str(tiny_bert_folder), vision_backbone="test_resnet", num_labels=3, num_object_images=2
    )
    pretrained = BertModel.from_pretrained(tiny_bert_folder, add_pooling_layer=False).state_dict()
    loaded = model.hvpnet.text_model.state_dict()
    assert loaded.keys() == pretrained.keys()
    for name, weight in pretrained.items():
        torch.testing.assert_close(loaded[name], weight, atol=0, rtol=0)
    assert model.config.vision_backbone == "test_resnet"
    assert model.config.num_labels == 3


def test_builder_refuses_settings_that_no_configuration_reads(tiny_bert_folder):
    with pytest.raises(TypeError, match=r"'num_object_image' \(did you mean 'num_object_images'\?\).*'tokenizer'"):
        HVPNetForTokenClassification.from_text_vision_pretrained(
            str(tiny_bert_folder), vision_backbone="test_resnet", tokenizer=object(), num_object_image=5
        )


def test_builder_resizes_embeddings_and_reads_markers_from_the_processor(tiny_bert_folder):
    processor = HVPNetProcessor(BertTokenizerFast.from_pretrained(tiny_bert_folder), task="re")
    tokenizer = processor.tokenizer
    model = HVPNetForSequenceClassification.from_text_vision_pretrained(
        str(tiny_bert_folder), vision_backbone="test_resnet", processor=processor, num_labels=4
    ).eval()
    assert model.get_input_embeddings().num_embeddings == len(tokenizer) == TINY_TEXT["vocab_size"] + 4
    assert model.config.text_config.vocab_size == len(tokenizer)
    assert model.config.head_start_token_id == tokenizer.convert_tokens_to_ids("<s>")
    assert model.config.tail_start_token_id == tokenizer.convert_tokens_to_ids("<o>")
    encoded = tokenizer(["word1 <s> word2 </s> word3 <o> word4 </o>"], return_tensors="pt")
    with torch.no_grad():
        assert model(**encoded).logits.shape == (1, 4)
