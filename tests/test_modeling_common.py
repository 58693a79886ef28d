"""What every HVPNeT model class must do as a transformers model, checked for all three classes alike: saving and
loading, initializing missing and meta-device weights, attention and hidden-state outputs under eager and sdpa,
activation checkpointing in both modes, `inputs_embeds`, resizing the embeddings, batching and tuple outputs, and the
relation head's `problem_type`. Written in the spirit of transformers' shared model tests (`ModelTesterMixin`)."""

import pytest
import torch
from modeling_utils import tiny_config, tiny_inputs
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoModelForSequenceClassification, AutoModelForTokenClassification
from transformers.modeling_layers import GradientCheckpointingLayer

from hvpnet_hf import HVPNetForSequenceClassification, HVPNetForTokenClassification, HVPNetModel

CLASSES = [HVPNetModel, HVPNetForTokenClassification, HVPNetForSequenceClassification]
AUTO_CLASS = {
    HVPNetModel: AutoModel,
    HVPNetForTokenClassification: AutoModelForTokenClassification,
    HVPNetForSequenceClassification: AutoModelForSequenceClassification,
}
HEAD, TAIL = 3, 4  # marker token ids of the tiny relation config
# float32 through a few dozen positions and 4 layers: equivalent computations differ by ~1e-7 per operation.
ATOL = 1e-5


def config_and_inputs(model_class, with_labels: bool = False, **overrides) -> tuple:
    """A tiny config and inputs for `model_class`: three examples, text padding in the last, one absent crop."""
    config = tiny_config(head_start_token_id=HEAD, tail_start_token_id=TAIL, **overrides)
    inputs = tiny_inputs()
    inputs["image_mask"] = torch.tensor([[True, True, True], [True, False, True], [False, True, True]])
    if model_class is HVPNetForSequenceClassification:
        inputs["input_ids"][:, 1] = HEAD
        inputs["input_ids"][:, 4] = TAIL
        if with_labels:
            inputs["labels"] = torch.tensor([0, 3, 1])
    if model_class is HVPNetForTokenClassification:
        inputs["word_start_mask"] = inputs["attention_mask"].bool()
        if with_labels:
            labels = torch.randint(0, config.num_labels, (3, 9), generator=torch.Generator().manual_seed(1))
            inputs["labels"] = labels.masked_fill(~inputs["word_start_mask"], -100)
    return config, inputs


def build(model_class, config, seed: int = 0):
    torch.manual_seed(seed)
    return model_class(config).eval()


def first_output(output) -> torch.Tensor:
    """`last_hidden_state` of the base model, the logits of a head (the loss when labels were given)."""
    return output[0]


def with_file_state(folder, keep) -> set[str]:
    """Rewrite the saved weights of `folder` keeping only the entries `keep(name)` accepts; return the dropped."""
    weights = load_file(folder / "model.safetensors")
    save_file(
        {name: value for name, value in weights.items() if keep(name)}, folder / "model.safetensors", {"format": "pt"}
    )
    return {name for name in weights if not keep(name)}


@pytest.mark.parametrize("model_class", CLASSES)
def test_save_and_load_round_trip(tmp_path, model_class):
    config, inputs = config_and_inputs(model_class)
    model = build(model_class, config)
    model.save_pretrained(tmp_path)
    for loader in (model_class, AUTO_CLASS[model_class]):
        reloaded, info = loader.from_pretrained(tmp_path, output_loading_info=True)
        assert type(reloaded) is model_class
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
        with torch.no_grad():
            torch.testing.assert_close(
                first_output(reloaded.eval()(**inputs)), first_output(model(**inputs)), atol=0, rtol=0
            )


def assert_initialized_like_a_new_model(model, reference, names: set[str]) -> None:
    """Every entry of `names` holds what construction gives it: the same constants (ones, zeros, the fixed gate,
    BERT's position ids) exactly, and random weights of the same spread."""
    state, expected = model.state_dict(), reference.state_dict()
    for name in names:
        value, new = state[name], expected[name]
        assert torch.isfinite(value.float()).all(), name
        if new.numel() == 1 or new.float().std() == 0:
            torch.testing.assert_close(value, new, atol=0, rtol=0, msg=name)
        elif new.numel() < 100:
            # Too few draws to compare spreads (the CRF's 5 start and end transitions): the same order of magnitude.
            # The largest of 5 uniform draws is below a fifth of the bound with probability 0.2**5 = 3e-4, so 5x the
            # reference's largest value covers a fresh draw; uninitialized memory is off by far more.
            assert 0 < value.float().std() and value.abs().max() <= 5 * new.abs().max(), name
        else:
            # A sample std over >= 100 draws is within ~10% of the true one; uninitialized memory or transformers'
            # N(0, 0.02) in place of He-normal convolutions are off by far more.
            ratio = value.float().std() / new.float().std()
            assert 0.7 < ratio < 1.4, (name, ratio.item())


@pytest.mark.parametrize("model_class", CLASSES)
def test_missing_weights_are_initialized_and_reported(tmp_path, model_class):
    """A checkpoint without the backbone (or with a changed one): the load report lists exactly those weights, and
    they are initialized as in a new model, BatchNorm statistics included; the others are the saved ones."""
    config, inputs = config_and_inputs(model_class)
    model = build(model_class, config)
    model.save_pretrained(tmp_path)
    dropped = with_file_state(tmp_path, lambda name: "backbone." not in name and "key_value" not in name)
    reloaded, info = model_class.from_pretrained(tmp_path, output_loading_info=True)
    assert set(info["missing_keys"]) == dropped
    assert any("running_var" in name for name in dropped)
    assert_initialized_like_a_new_model(reloaded, build(model_class, config, seed=1), dropped)
    kept = model.state_dict()
    for name, value in reloaded.state_dict().items():
        if name not in dropped:
            torch.testing.assert_close(value, kept[name], atol=0, rtol=0, msg=name)
    with torch.no_grad():
        assert torch.isfinite(first_output(reloaded.eval()(**inputs))).all()


@pytest.mark.parametrize("prefix_mode", ["pyramid", "one_to_three", "original"])
@pytest.mark.parametrize("model_class", CLASSES)
def test_a_model_materialized_from_the_meta_device_is_fully_initialized(tmp_path, model_class, prefix_mode):
    """With no weight in the checkpoint, `from_pretrained` builds everything on the meta device and initializes it:
    parameters, persistent buffers and the non-persistent ones (the ablations' fixed gate, BERT's position ids)."""
    config, inputs = config_and_inputs(model_class, prefix_mode=prefix_mode)
    build(model_class, config).save_pretrained(tmp_path)
    with_file_state(tmp_path, lambda name: False)
    reloaded = model_class.from_pretrained(tmp_path)
    reference = build(model_class, config, seed=1)
    assert_initialized_like_a_new_model(reloaded, reference, set(reference.state_dict()))
    buffers, expected = dict(reloaded.named_buffers()), dict(reference.named_buffers())
    for name, buffer in expected.items():  # non-persistent buffers are not in the state dict
        torch.testing.assert_close(buffers[name], buffer, atol=0, rtol=0, msg=name)
    with torch.no_grad():
        assert torch.isfinite(first_output(reloaded.eval()(**inputs))).all()


@pytest.mark.parametrize("model_class", CLASSES)
def test_hidden_states_and_attentions_under_eager_and_sdpa(model_class):
    config, inputs = config_and_inputs(model_class)
    model = build(model_class, config)
    layers, heads = config.text_config.num_hidden_layers, config.text_config.num_attention_heads
    outputs = {}
    for implementation in ("eager", "sdpa"):
        model.set_attn_implementation(implementation)
        with torch.no_grad():
            outputs[implementation] = model(**inputs, output_hidden_states=True, output_attentions=True)
    eager, sdpa = outputs["eager"], outputs["sdpa"]
    assert len(eager.hidden_states) == len(sdpa.hidden_states) == layers + 1
    for eager_states, sdpa_states in zip(eager.hidden_states, sdpa.hidden_states, strict=True):
        assert eager_states.shape == (3, 9, config.text_config.hidden_size)
        torch.testing.assert_close(sdpa_states, eager_states, atol=ATOL, rtol=0)
    torch.testing.assert_close(first_output(sdpa), first_output(eager), atol=ATOL, rtol=0)
    assert len(eager.attentions) == layers
    for weights in eager.attentions:
        assert weights.shape == (3, heads, 9, config.prefix_length + 9)
        torch.testing.assert_close(weights.sum(-1), torch.ones(3, heads, 9))
    assert sdpa.attentions == (), "sdpa computes no weights: an empty tuple, as BERT gives"

    model.config.output_hidden_states = True  # the config's default applies when the flag is not passed
    with torch.no_grad():
        assert len(model(**inputs).hidden_states) == layers + 1


def parameter_gradients(model, inputs: dict) -> dict[str, torch.Tensor]:
    """The gradients of the head's loss (of the mean square of the base model's last hidden state) by parameter."""
    model.zero_grad()
    output = model(**inputs)
    loss = output.loss if not isinstance(model, HVPNetModel) else output.last_hidden_state.pow(2).mean()
    loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize("model_class", CLASSES)
def test_activation_checkpointing_keeps_the_gradients(model_class, use_reentrant, attn_implementation):
    config, inputs = config_and_inputs(model_class, with_labels=True, freeze_vision=False)
    model = build(model_class, config).train()
    model.set_attn_implementation(attn_implementation)

    plain = parameter_gradients(model, inputs)
    model.activation_checkpointing_enable({"use_reentrant": use_reentrant})
    checkpointed = parameter_gradients(model, inputs)
    base = "" if model_class is HVPNetModel else "hvpnet."
    assert (
        f"{base}visual_encoder.key_value_projections.0.weight" in plain
        and f"{base}visual_encoder.backbone.conv1.0.weight" in plain
    )
    assert checkpointed.keys() == plain.keys()
    for name, gradient in plain.items():
        # Dropout is off, so the recomputation repeats the same float32 operations; only the summation order of
        # gradients that meet from several layers may differ.
        torch.testing.assert_close(checkpointed[name], gradient, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize("model_class", CLASSES)
def test_activation_checkpointing_accepts_a_wrapped_layer_forward(model_class, use_reentrant):
    """A layer's checkpoint function may be handed any callable, not only transformers' `partial` of the layer's
    forward: a wrapper around it (here one that counts the recomputations, as transformers' own tests install) is
    checkpointed in both modes with the gradients of the plain run. It hides the visual prefix, a keyword of the
    layer's forward, from reentrant checkpointing, which only tracks positional inputs."""
    config, inputs = config_and_inputs(model_class, with_labels=True, freeze_vision=False)
    model = build(model_class, config).train()

    plain = parameter_gradients(model, inputs)
    model.activation_checkpointing_enable({"use_reentrant": use_reentrant})
    layer = next(module for module in model.modules() if isinstance(module, GradientCheckpointingLayer))
    checkpoint_function, calls = layer._gradient_checkpointing_func, []

    def counting(layer_forward, *args):
        def forward(*inner_args):
            calls.append(torch.is_grad_enabled())
            return layer_forward(*inner_args)

        return checkpoint_function(forward, *args)

    layer._gradient_checkpointing_func = counting
    checkpointed = parameter_gradients(model, inputs)
    assert len(calls) == 2, "the wrapped forward runs once in forward and once more in backward"
    assert checkpointed.keys() == plain.keys()
    for name, gradient in plain.items():
        # As test_activation_checkpointing_keeps_the_gradients: the same float32 operations, recomputed.
        torch.testing.assert_close(checkpointed[name], gradient, atol=1e-6, rtol=1e-5, msg=name)


def test_reentrant_activation_checkpointing_stays_reentrant():
    """`use_reentrant=True` runs torch's reentrant checkpointing on the text layers, the visual prefix among their
    positional inputs: the mode that refuses `torch.autograd.grad` (the gradients are checked above)."""
    config, inputs = config_and_inputs(HVPNetModel, freeze_vision=False)
    model = build(HVPNetModel, config).train()
    model.activation_checkpointing_enable({"use_reentrant": True})
    loss = model(**inputs).last_hidden_state.pow(2).mean()
    with pytest.raises(RuntimeError, match="use_reentrant=True"):
        torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad], allow_unused=True)


@pytest.mark.parametrize("model_class", CLASSES)
def test_inputs_embeds_give_the_outputs_of_input_ids(model_class):
    config, inputs = config_and_inputs(model_class, with_labels=True)
    model = build(model_class, config)
    embedded = {name: value for name, value in inputs.items() if name != "input_ids"}
    embedded["inputs_embeds"] = model.get_input_embeddings()(inputs["input_ids"])
    with torch.no_grad():
        expected, output = model(**inputs), model(**embedded)
    for name in ("loss", "logits", "last_hidden_state"):
        if name in expected:
            torch.testing.assert_close(output[name], expected[name], atol=ATOL, rtol=0, msg=name)


def test_relation_markers_must_keep_their_embedding():
    """With inputs_embeds the relation head finds the markers by their embedding row; when a marker's embedding
    was changed it says so instead of reading some other position."""
    config, inputs = config_and_inputs(HVPNetForSequenceClassification)
    model = build(HVPNetForSequenceClassification, config)
    inputs_embeds = model.get_input_embeddings()(inputs.pop("input_ids")).detach()
    inputs_embeds[2, 4] += 0.01  # the tail marker of example 2
    with pytest.raises(ValueError, match=r"rows \[2\] lack the entity marker tail_start_token_id .* inputs_embeds"):
        model(inputs_embeds=inputs_embeds, **inputs)


@pytest.mark.parametrize("model_class", CLASSES)
def test_resized_embeddings_keep_the_old_tokens(model_class):
    config, inputs = config_and_inputs(model_class)
    model = build(model_class, config)
    with torch.no_grad():
        before = first_output(model(**inputs))
    vocab_size = config.text_config.vocab_size
    model.resize_token_embeddings(vocab_size + 7)
    assert model.get_input_embeddings().num_embeddings == model.config.text_config.vocab_size == vocab_size + 7
    with torch.no_grad():
        torch.testing.assert_close(first_output(model(**inputs)), before, atol=0, rtol=0)
        new_token = {**inputs, "input_ids": inputs["input_ids"].clone()}
        new_token["input_ids"][0, 6] = vocab_size + 6
        assert first_output(model(**new_token)).shape == before.shape
    model.resize_token_embeddings(vocab_size - 9)
    assert model.get_input_embeddings().num_embeddings == model.config.text_config.vocab_size == vocab_size - 9


@pytest.mark.parametrize("model_class", CLASSES)
def test_batched_outputs_equal_one_example_at_a_time(model_class):
    config, inputs = config_and_inputs(model_class)
    model = build(model_class, config)
    with torch.no_grad():
        batched = first_output(model(**inputs))
        for index in range(3):
            single = first_output(model(**{name: value[index : index + 1] for name, value in inputs.items()}))
            torch.testing.assert_close(single[0], batched[index], atol=ATOL, rtol=0)


@pytest.mark.parametrize("model_class", CLASSES)
def test_return_dict_false_gives_the_tuple_of_the_output(model_class):
    config, inputs = config_and_inputs(model_class, with_labels=True)
    model = build(model_class, config)
    with torch.no_grad():
        as_dict = model(**inputs, output_hidden_states=True, output_gate_weights=True)
        as_tuple = model(**inputs, output_hidden_states=True, output_gate_weights=True, return_dict=False)
    expected = as_dict.to_tuple()
    assert isinstance(as_tuple, tuple) and len(as_tuple) == len(expected)
    for value, expected_value in zip(as_tuple, expected, strict=True):
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(value, expected_value, atol=0, rtol=0)
        else:
            assert len(value) == len(expected_value)


def relation_model(num_labels: int, problem_type: str | None = None) -> tuple:
    config, inputs = config_and_inputs(
        HVPNetForSequenceClassification, num_labels=num_labels, problem_type=problem_type
    )
    return build(HVPNetForSequenceClassification, config), inputs


@pytest.mark.parametrize(
    ("num_labels", "problem_type", "labels", "loss_function"),
    [
        (4, None, torch.tensor([0, 3, 1]), torch.nn.functional.cross_entropy),
        (4, None, torch.tensor([[1.0, 0, 0, 1], [0, 0, 0, 0], [0, 1, 1, 0]]), torch.nn.functional.binary_cross_entropy_with_logits),
        (4, "multi_label_classification", torch.tensor([[1, 0, 0, 1], [0, 0, 0, 0], [0, 1, 1, 0]]), lambda logits, labels: torch.nn.functional.binary_cross_entropy_with_logits(logits, labels.float())),
        (1, None, torch.tensor([0.5, -1.0, 2.0]), lambda logits, labels: torch.nn.functional.mse_loss(logits[:, 0], labels)),
        (2, "regression", torch.tensor([[0.5, 1.0], [-1.0, 0.0], [2.0, 3.0]]), torch.nn.functional.mse_loss),
    ],
    ids=["single_label", "multi_label_from_floats", "multi_label_set", "regression_one", "regression_two"],
)  # fmt: skip
def test_relation_loss_follows_the_problem_type(num_labels, problem_type, labels, loss_function):
    """As `BertForSequenceClassification`: cross-entropy for relation ids, BCE for several relations per pair, MSE
    for regression; unset, the type follows num_labels and the labels' dtype."""
    model, inputs = relation_model(num_labels, problem_type)
    with torch.no_grad():
        output = model(**inputs, labels=labels)
    torch.testing.assert_close(output.loss, loss_function(output.logits, labels))


@pytest.mark.parametrize(
    ("num_labels", "problem_type", "labels", "message"),
    [
        (4, None, torch.tensor([[0], [3], [1]]), r"labels must have shape \(3,\)"),
        (4, "multi_label_classification", torch.ones(3, 3), r"multi-label labels must have shape \(3, 4\)"),
        (2, "regression", torch.ones(3), r"regression labels must have shape \(3, 2\)"),
    ],
)
def test_relation_labels_of_the_wrong_shape_for_the_problem_type_raise(num_labels, problem_type, labels, message):
    model, inputs = relation_model(num_labels, problem_type)
    with pytest.raises(ValueError, match=message):
        model(**inputs, labels=labels)


@pytest.mark.parametrize("model_class", CLASSES)
def test_outputs_are_the_same_in_training_and_eval_mode(model_class):
    """A head computes its logits and loss alike in both modes (dropout is 0 in the tiny config): it decodes
    nothing in eval mode that training would lack."""
    config, inputs = config_and_inputs(model_class, with_labels=True)
    model = build(model_class, config)
    with torch.no_grad():
        evaluated = model.eval()(**inputs)
        trained = model.train()(**inputs)
    assert trained.keys() == evaluated.keys()
    for name in evaluated.keys():
        torch.testing.assert_close(trained[name], evaluated[name], atol=0, rtol=0, msg=name)


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("model_class", CLASSES)
def test_torch_export_gives_the_eager_outputs(model_class, dynamic):
    config, inputs = config_and_inputs(model_class)
    model = build(model_class, config)
    dynamic_shapes = None
    if dynamic:  # batch and text length (the images' batch) free
        dynamic_shapes = {
            name: {0: torch.export.Dim.AUTO, 1: torch.export.Dim.AUTO}
            if value.dim() == 2
            else {0: torch.export.Dim.AUTO}
            for name, value in inputs.items()
        }
        dynamic_shapes["image_mask"] = {0: torch.export.Dim.AUTO}
    with torch.no_grad():
        program = torch.export.export(model, (), kwargs=inputs, dynamic_shapes=dynamic_shapes, strict=False)
        torch.testing.assert_close(
            first_output(program.module()(**inputs)), first_output(model(**inputs)), atol=ATOL, rtol=0
        )


def test_crf_parameters_are_created_in_float32_whatever_the_default_dtype():
    """`_keep_in_fp32_modules_strict` keeps the CRF in float32 when a checkpoint is loaded; built from a config in
    bfloat16 (`from_config(dtype=...)`) it must be float32 too."""
    config, _ = config_and_inputs(HVPNetForTokenClassification)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = HVPNetForTokenClassification(config)
    finally:
        torch.set_default_dtype(default)
    assert model.classifier.weight.dtype == torch.bfloat16
    assert {parameter.dtype for parameter in model.crf.parameters()} == {torch.float32}


@pytest.mark.parametrize("model_class", CLASSES)
def test_built_and_loaded_weights_are_contiguous(tmp_path, model_class):
    config, _ = config_and_inputs(model_class)
    model = build(model_class, config)
    assert [name for name, parameter in model.named_parameters() if not parameter.is_contiguous()] == []
    model.save_pretrained(tmp_path)
    loaded = model_class.from_pretrained(tmp_path)
    assert [name for name, parameter in loaded.named_parameters() if not parameter.is_contiguous()] == []
