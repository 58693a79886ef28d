"""The NER head (emissions + CRF over first sub-words) and the relation head."""

import itertools

import pytest
import torch
from modeling_utils import tiny_config, tiny_inputs

from hvpnet_hf import HVPNetForSequenceClassification, HVPNetForTokenClassification

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
        best = output.predicted_tags[row, starts].tolist()
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
    assert output.predicted_tags is None, "no Viterbi decoding in training mode"
    output.loss.backward()
    assert model.crf.transitions.grad.abs().sum() > 0
    assert model.classifier.weight.grad.abs().sum() > 0


def test_decoding_respects_word_starts_and_padding():
    model = ner_model()
    inputs = ner_inputs()
    inputs.pop("labels")
    with torch.no_grad():
        tags = model(**inputs).predicted_tags
    assert tags.shape == (3, 9)
    starts = inputs["word_start_mask"]
    assert (tags[~starts] == -100).all()
    assert ((tags[starts] >= 0) & (tags[starts] < 3)).all()


def test_word_starts_default_to_labelled_positions():
    model = ner_model()
    inputs = ner_inputs()
    with torch.no_grad():
        explicit = model(**inputs)
        implicit = model(**{name: value for name, value in inputs.items() if name != "word_start_mask"})
    torch.testing.assert_close(explicit.loss, implicit.loss)
    assert torch.equal(explicit.predicted_tags, implicit.predicted_tags)


def test_example_without_words_is_allowed():
    model = ner_model()
    inputs = ner_inputs()
    inputs["word_start_mask"][1] = False
    inputs["labels"][1] = -100
    with torch.no_grad():
        output = model(**inputs)
    assert torch.isfinite(output.loss)
    assert (output.predicted_tags[1] == -100).all()


def test_crf_runs_over_words_not_sub_words():
    """Extra sub-words (continuation pieces) must not change the word-level loss when their emissions are unused."""
    model = ner_model(use_visual_prefix=False)
    inputs = ner_inputs()
    for name in ("pixel_values", "object_pixel_values"):
        inputs.pop(name)
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
        ({"labels": torch.zeros(3, 8, dtype=torch.long)}, "labels must have the shape of input_ids"),
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


def test_word_starts_or_labels_are_required():
    inputs = ner_inputs()
    inputs.pop("labels")
    inputs.pop("word_start_mask")
    with pytest.raises(ValueError, match="word_start_mask"):
        ner_model()(**inputs)


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


def test_activation_checkpointing_gives_the_same_gradients():
    model = ner_model()
    model.train()
    inputs = ner_inputs()
    model(**inputs).loss.backward()
    expected = {
        name: parameter.grad.clone() for name, parameter in model.named_parameters() if parameter.grad is not None
    }
    model.zero_grad()
    model.activation_checkpointing_enable()
    model(**inputs).loss.backward()
    assert expected.keys() == {name for name, parameter in model.named_parameters() if parameter.grad is not None}
    for name, parameter in model.named_parameters():
        if name in expected:
            torch.testing.assert_close(parameter.grad, expected[name], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(("build", "make_inputs"), [(ner_model, ner_inputs), (re_model, re_inputs)])
def test_heads_take_stacked_images_and_return_tuples(build, make_inputs):
    model = build()
    inputs = make_inputs()
    stacked = {name: value for name, value in inputs.items() if name != "object_pixel_values"}
    stacked["pixel_values"] = torch.cat([inputs["pixel_values"][:, None], inputs["object_pixel_values"]], dim=1)
    with torch.no_grad():
        expected = model(**inputs)
        as_tuple = model(**stacked, return_dict=False)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], expected.loss, atol=0, rtol=0)
    torch.testing.assert_close(as_tuple[1], expected.logits, atol=0, rtol=0)
